//! `moto_server` (PyPI `moto[server]`, pinned) on loopback: the EC2 the tests run against
//! (feature `moto`, for tests only).
//!
//! [`install`] puts moto into a venv under the Updraft cache (`$UPDRAFT_CACHE_DIR`, else
//! `~/.cache/updraft`), once per machine, like the devcluster's kubectl; [`MotoServer::start`]
//! runs one on `127.0.0.1:<free port>` and stops it on drop. Installing and running use only
//! `std`.
//!
//! [`Ec2Proxy`] sits in front of moto where moto grants what EC2 may refuse (spot capacity,
//! private addresses): it answers the requests a test picks with EC2's error and records every
//! request, so tests can also check what EC2 would have been asked.
//!
//! [`backend`] and [`client`] reach moto (or a proxy) with dummy credentials; the backend is
//! told that the endpoint ignores client tokens (moto launches again for a repeated one), which
//! EC2 does not. [`instances_of_pod`] is what tests ask EC2 about a pod's instances.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::Credentials;
use aws_sdk_ec2::types::{Filter, Instance};
use updraft_cells_backend::BackendError;

use crate::{AwsBackend, AwsConfig, AwsConfigError, TAG_POD_UID, classify};

/// The dummy access key id and secret moto accepts.
const DUMMY_KEY: &str = "testing";

/// The moto release the tests are written against.
pub const MOTO_VERSION: &str = "5.2.5";

/// Installing or starting moto failed.
#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    /// A filesystem step failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("{command} failed ({status}); {hint}")]
    Command {
        /// The command.
        command: String,
        /// Its exit status.
        status: String,
        /// What to check.
        hint: String,
    },
    /// The server did not answer in time.
    #[error("moto_server on 127.0.0.1:{port} did not answer within {seconds} s; its log: {log}")]
    NotReady {
        /// The port it was started on.
        port: u16,
        /// How long we waited.
        seconds: u64,
        /// Its log file.
        log: PathBuf,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MotoError {
    let what = what.into();
    move |source| MotoError::Io { what, source }
}

/// The Updraft cache directory: `$UPDRAFT_CACHE_DIR`, else `$HOME/.cache/updraft`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("UPDRAFT_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("updraft")
}

/// The venv moto is installed into.
pub fn venv_dir() -> PathBuf {
    cache_dir()
        .join(format!("moto-{MOTO_VERSION}"))
        .join("venv")
}

/// Installs `moto[server]==MOTO_VERSION` into [`venv_dir`] unless it is there; returns the path
/// of `moto_server`. Safe to call from parallel tests and processes (a file lock serializes
/// installs).
pub fn install() -> Result<PathBuf, MotoError> {
    let venv = venv_dir();
    let server = venv.join("bin").join("moto_server");
    let root = venv.parent().unwrap_or(&venv).to_path_buf();
    let done_marker = root.join("installed");
    if done_marker.exists() && server.exists() {
        return Ok(server);
    }
    std::fs::create_dir_all(&root).map_err(io(format!("creating {}", root.display())))?;
    let lock_path = root.join("install.lock");
    let lock = File::create(&lock_path).map_err(io(format!("creating {}", lock_path.display())))?;
    lock.lock()
        .map_err(io(format!("locking {}", lock_path.display())))?;
    if done_marker.exists() && server.exists() {
        return Ok(server);
    }
    let mut make_venv = Command::new("python3");
    make_venv.args(["-m", "venv", "--clear"]).arg(&venv);
    run(
        make_venv,
        "python3 -m venv",
        "install python3-venv (Debian) if this fails",
    )?;
    let mut pip = Command::new(venv.join("bin").join("pip"));
    pip.args(["install", "--quiet"])
        .arg(format!("moto[server]=={MOTO_VERSION}"));
    run(
        pip,
        &format!("pip install moto[server]=={MOTO_VERSION}"),
        "PyPI must be reachable",
    )?;
    if !server.exists() {
        return Err(MotoError::Command {
            command: "pip install".into(),
            status: "no moto_server".into(),
            hint: format!(
                "moto installed but put no moto_server in {}",
                venv.display()
            ),
        });
    }
    std::fs::write(&done_marker, MOTO_VERSION)
        .map_err(io(format!("writing {}", done_marker.display())))?;
    Ok(server)
}

fn run(mut command: Command, name: &str, hint: &str) -> Result<(), MotoError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("running {name}")))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
    Err(MotoError::Command {
        command: name.to_string(),
        status: output.status.to_string(),
        hint: format!(
            "{hint}; last output: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ),
    })
}

/// A running `moto_server` on loopback, stopped when dropped.
#[derive(Debug)]
pub struct MotoServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl MotoServer {
    /// Installs moto if needed and starts a fresh server (empty state) on a free loopback port;
    /// returns once it answers HTTP.
    pub fn start() -> Result<MotoServer, MotoError> {
        let binary = install()?;
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
            listener
                .local_addr()
                .map_err(io("finding a free port"))?
                .port()
        };
        let logs = cache_dir().join("moto-logs");
        std::fs::create_dir_all(&logs).map_err(io(format!("creating {}", logs.display())))?;
        let log = logs.join(format!("moto-{port}.log"));
        let log_file = File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let log_err = log_file
            .try_clone()
            .map_err(io(format!("opening {}", log.display())))?;
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(io(format!("starting {}", binary.display())))?;
        let mut server = MotoServer { child, port, log };
        server.wait_ready(Duration::from_secs(60))?;
        Ok(server)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), MotoError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(MotoError::Command {
                    command: "moto_server".into(),
                    status: status.to_string(),
                    hint: format!("see {}", self.log.display()),
                });
            }
            if http_answers(self.port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(MotoError::NotReady {
                    port: self.port,
                    seconds: timeout.as_secs(),
                    log: self.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `http://127.0.0.1:<port>`: the SDK's endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The server's log file.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

/// Whether an HTTP request to the moto dashboard API gets a status line back.
fn http_answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!(
        "GET /moto-api/data.json HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What an [`Ec2Proxy`] answers instead of moto: EC2's error code and message.
pub type Refusal = (&'static str, &'static str);

/// A loopback HTTP/1.1 proxy in front of moto that records every request body (EC2's query
/// protocol: `Action=RunInstances&…`) and answers those its rule picks with an EC2 error (HTTP
/// 400 and EC2's XML); everything else is forwarded. Stopped when dropped.
#[derive(Debug)]
pub struct Ec2Proxy {
    address: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    stopped: Arc<AtomicBool>,
}

impl Ec2Proxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:<port>`, see [`MotoServer::endpoint`])
    /// that refuses the requests for which `refuse` returns an error.
    pub fn start(
        upstream: &str,
        refuse: fn(&str) -> Option<Refusal>,
    ) -> Result<Ec2Proxy, MotoError> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(io("binding the EC2 proxy"))?;
        let address = listener.local_addr().map_err(io("binding the EC2 proxy"))?;
        let upstream = upstream.trim_start_matches("http://").to_string();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stopped = Arc::new(AtomicBool::new(false));
        let (recorded, stop) = (requests.clone(), stopped.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let (upstream, recorded) = (upstream.clone(), recorded.clone());
                std::thread::spawn(move || {
                    let _ = proxy_connection(client, &upstream, &recorded, refuse);
                });
            }
        });
        Ok(Ec2Proxy {
            address,
            requests,
            stopped,
        })
    }

    /// `http://127.0.0.1:<port>`: the SDK's endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The bodies of every request seen so far, in order.
    pub fn all_requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The bodies of the requests for `action` (e.g. `RunInstances`) seen so far, in order.
    pub fn requests(&self, action: &str) -> Vec<String> {
        let needle = format!("Action={action}&");
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|body| body.starts_with(&needle) || body.contains(&format!("&{needle}")))
            .cloned()
            .collect()
    }
}

impl Drop for Ec2Proxy {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.address);
    }
}

/// Refuses every spot `RunInstances` as EC2 does when it has no spot capacity.
pub fn no_spot_capacity(body: &str) -> Option<Refusal> {
    (body.contains("Action=RunInstances") && body.contains("InstanceMarketOptions.MarketType=spot"))
        .then_some((
            "InsufficientInstanceCapacity",
            "There is no Spot capacity available that matches your request.",
        ))
}

/// Serves one client connection (keep-alive: request after request).
fn proxy_connection(
    client: TcpStream,
    upstream: &str,
    recorded: &Mutex<Vec<String>>,
    refuse: fn(&str) -> Option<Refusal>,
) -> std::io::Result<()> {
    let mut writer = client.try_clone()?;
    let mut reader = BufReader::new(client);
    while let Some((head, body)) = read_message(&mut reader)? {
        let text = String::from_utf8_lossy(&body).into_owned();
        recorded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(text.clone());
        if let Some((code, message)) = refuse(&text) {
            let xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>updraft-ec2-proxy</RequestID></Response>"
            );
            write!(
                writer,
                "HTTP/1.1 400 Bad Request\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{xml}",
                xml.len()
            )?;
            continue;
        }
        let server = TcpStream::connect(upstream)?;
        let mut server_writer = server.try_clone()?;
        server_writer.write_all(&head)?;
        server_writer.write_all(&body)?;
        let mut server_reader = BufReader::new(server);
        let Some((head, body)) = read_message(&mut server_reader)? else {
            return Ok(());
        };
        writer.write_all(&head)?;
        writer.write_all(&body)?;
    }
    Ok(())
}

/// One HTTP/1.1 message with a `Content-Length` body (what the SDK and moto send); `None` at
/// the end of the stream.
fn read_message(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" {
            break;
        }
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length = text
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Some((head, body)))
}

/// A backend of `config` at `endpoint` (moto's or an [`Ec2Proxy`]'s) with dummy credentials,
/// told that the endpoint ignores client tokens (see
/// [`AwsConfig::endpoint_ignores_client_tokens`]).
pub async fn backend(endpoint: String, config: AwsConfig) -> Result<AwsBackend, AwsConfigError> {
    let config = AwsConfig {
        endpoint_url: Some(endpoint),
        endpoint_ignores_client_tokens: true,
        ..config
    };
    AwsBackend::with_credentials(config, DUMMY_KEY, DUMMY_KEY).await
}

/// An EC2 client of `region` at `endpoint` with dummy credentials: what a test sets moto up
/// with (VPCs, subnets, images) before a backend's configuration can name them.
pub async fn client(region: &str, endpoint: &str) -> Client {
    let credentials = Credentials::new(DUMMY_KEY, DUMMY_KEY, None, None, "updraft-moto");
    let loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .credentials_provider(credentials);
    crate::sdk_client(region, Some(endpoint), loader).await
}

/// Every instance (in any state) tagged with the pod UID `uid`.
pub async fn instances_of_pod(client: &Client, uid: &str) -> Result<Vec<Instance>, BackendError> {
    let described = client
        .describe_instances()
        .filters(
            Filter::builder()
                .name(format!("tag:{TAG_POD_UID}"))
                .values(uid)
                .build(),
        )
        .send()
        .await
        .map_err(|error| classify("DescribeInstances", error))?;
    Ok(described
        .reservations()
        .iter()
        .flat_map(|reservation| reservation.instances().iter().cloned())
        .collect())
}

/// Refuses nothing: an [`Ec2Proxy`] that only records.
pub fn refuse_nothing(_body: &str) -> Option<Refusal> {
    None
}
