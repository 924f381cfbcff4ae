//! Local cells for real, as root: network namespaces, mount namespaces, cgroups, the real
//! `updraft-cell` agent reached over mutual TLS at its management address, pods with a
//! busybox directory image, and everything gone after terminate.
//!
//! Needs the agent binary next to this test's (`cargo build -p updraft-cell-agent` with the same
//! target directory; `cargo test --workspace` builds it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use updraft_cell_api::{
    ApplyPodRequest, CellClient, ClientTls, ExecOptions, PodInterface, PodNetworkConfig,
};
use updraft_cells_backend::cloud_init::{
    Bootstrap, BootstrapFile, CloudConfig, EC2_USER_DATA_LIMIT, UserData,
};
use updraft_cells_backend::{
    BackendError, Cell, CellBackend, CellId, CellIdentity, CellSpec, CellState, LaunchType,
};
use updraft_cells_catalog::Catalog;
use updraft_cells_local::{LocalBackend, LocalConfig, ProcessRef};

// ---------------------------------------------------------------------------------------------
// Helpers

/// A CA with the agent's server certificate and the provider's client certificate, PEM.
struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "updraft local cells test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |name: &str, client: bool| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(updraft_cell_api::SERVER_NAME, false);
    let (client_cert, client_key) = leaf("updraft-provider", true);
    Pki {
        ca: ca_cert.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}

/// A rootfs of /bin/busybox plus its applet symlinks.
fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
}

/// `updraft-cell` from the same target directory as this test binary.
fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // <target>/debug/deps/cells-<hash> → <target>/debug/updraft-cell
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("updraft-cell"))
        .unwrap();
    assert!(
        path.is_file(),
        "the agent binary {} is missing: build it first with `cargo build -p updraft-cell-agent` \
         (same CARGO_TARGET_DIR), or run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the local cells tests must run as root (namespaces, cgroups, mounts)"
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
}

static ENVS: AtomicU32 = AtomicU32::new(0);

/// One backend with its own state directory, bridge and /24; Drop terminates every cell of
/// it and deletes the bridge, so a failing test leaks nothing.
struct Env {
    tmp: tempfile::TempDir,
    config: LocalConfig,
    backend: LocalBackend,
    pki: Pki,
}

impl Env {
    fn new() -> Env {
        Env::with_cidr_len(24)
    }

    fn with_cidr_len(prefix_len: u8) -> Env {
        require_root();
        let n = ENVS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tmp = tempfile::tempdir().unwrap();
        let third = ((pid % 25) * 10 + n % 10) as u8 + 1;
        let config = LocalConfig {
            state_dir: tmp.path().join("state"),
            cidr: format!("10.214.{third}.0/{prefix_len}").parse().unwrap(),
            bridge: format!("ucl{}x{n}", pid % 100_000),
            agent_binary: agent_binary(),
            cgroup_parent: format!("updraft-cells-test-{pid}-{n}"),
            private_dirs: vec![tmp.path().join("agent")],
            ..LocalConfig::default()
        };
        busybox_rootfs(&tmp.path().join("busybox-image"));
        std::fs::create_dir_all(tmp.path().join("existing")).unwrap();
        std::fs::write(tmp.path().join("existing/host.txt"), "from the host\n").unwrap();
        let backend = LocalBackend::new(config.clone(), Catalog::local().unwrap()).unwrap();
        Env {
            tmp,
            config,
            backend,
            pki: pki(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn client(&self, cell: &Cell) -> CellClient {
        let address = cell.management_ip.expect("management ip");
        CellClient::new(
            SocketAddr::new(address, self.config.agent_port),
            ClientTls::from_pem(
                self.pki.ca.as_bytes(),
                self.pki.client_cert.as_bytes(),
                self.pki.client_key.as_bytes(),
            )
            .unwrap(),
        )
    }

    /// What the provider would send: the agent's TLS files and start command, plus an
    /// operator cloud-init with a gzip file in a host directory, a hostname and a command.
    fn agent_user_data(&self) -> Vec<u8> {
        let tls = |name: &str| self.path("tls").join(name).display().to_string();
        let bootstrap = Bootstrap {
            files: vec![
                BootstrapFile {
                    path: tls("ca.crt"),
                    contents: self.pki.ca.clone().into_bytes(),
                    mode: 0o644,
                },
                BootstrapFile {
                    path: tls("server.crt"),
                    contents: self.pki.server_cert.clone().into_bytes(),
                    mode: 0o644,
                },
                BootstrapFile {
                    path: tls("server.key"),
                    contents: self.pki.server_key.clone().into_bytes(),
                    mode: 0o600,
                },
            ],
            commands: vec![vec![
                "updraft-cell".into(),
                "--dir".into(),
                self.path("agent").display().to_string(),
                "--tls-cert".into(),
                tls("server.crt"),
                "--tls-key".into(),
                tls("server.key"),
                "--client-ca".into(),
                tls("ca.crt"),
                "--image-dir".into(),
                format!("busybox={}", self.path("busybox-image").display()),
            ]],
        };
        let gz = {
            use base64::Engine;
            use std::io::Write;
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(b"hello from cloud-init\n").unwrap();
            base64::engine::general_purpose::STANDARD.encode(encoder.finish().unwrap())
        };
        let existing = self.path("existing");
        let operator = CloudConfig::parse(
            &format!(
                "#cloud-config\nhostname: cell-test\nwrite_files:\n  - path: {0}/motd\n    encoding: gzip\n    content: {gz}\n    permissions: '0640'\nruncmd:\n  - echo \"ran on $(cat /proc/sys/kernel/hostname) with $UPDRAFT_CELL_POD_IP\" > {0}/marker\n",
                existing.display()
            ),
            "test-cloud-init.yaml",
        )
        .unwrap();
        UserData::build(&bootstrap, Some(&operator), EC2_USER_DATA_LIMIT)
            .unwrap()
            .bytes
    }

    /// A bootstrap without an agent: one long-running command.
    fn plain_user_data(&self) -> Vec<u8> {
        UserData::build(
            &Bootstrap {
                files: vec![],
                commands: vec![vec!["sleep".into(), "3600".into()]],
            },
            None,
            EC2_USER_DATA_LIMIT,
        )
        .unwrap()
        .bytes
    }

    fn spec(&self, controller: &str, pod: &str, user_data: Vec<u8>) -> CellSpec {
        CellSpec {
            name: format!("burst-default-{pod}"),
            instance_type: "local.nano".into(),
            launch_type: LaunchType::OnDemand,
            image: None,
            user_data,
            identity: CellIdentity {
                controller_id: controller.into(),
                node: "burst".into(),
                namespace: "default".into(),
                pod_name: pod.into(),
                pod_uid: format!("uid-{pod}"),
                pod_labels: BTreeMap::from([("app".to_string(), pod.to_string())]),
            },
            security_groups: vec![],
            private_ip_only: true,
            root_volume_bytes: None,
            instance_profile: None,
            idempotency_token: format!("uid-{pod}-1"),
        }
    }

    /// Waits until describe reports `state` (60 s bound), printing the console on failure.
    async fn wait_state(&self, id: &CellId, state: CellState) -> Cell {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let cell = self.backend.describe(id).await.unwrap();
            if cell.state == state {
                return cell;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "cell {id} stayed {:?}, expected {state:?}; console:\n{}",
                cell.state,
                self.backend.console_output(id).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts a cell with the agent and waits until the agent answers over mTLS.
    async fn agent_cell(&self, pod: &str) -> (Cell, CellClient) {
        let started = self
            .backend
            .start(&self.spec("ctl", pod, self.agent_user_data()))
            .await
            .unwrap();
        let cell = self.wait_state(&started.id, CellState::Running).await;
        let client = self.wait_for_agent(&cell).await;
        (cell, client)
    }

    /// Waits (up to 60 s) until the agent of `cell` answers over mTLS; the failure shows the
    /// cell's console.
    async fn wait_for_agent(&self, cell: &Cell) -> CellClient {
        let client = self.client(cell);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while let Err(error) = client.ping().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent of {} never answered at {}: {error}; console:\n{}",
                cell.id,
                client.addr(),
                self.backend.console_output(&cell.id).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        client
    }

    /// This test binary run as `helper_start_a_cell_then_wait` with this env's config and the
    /// user data in `user_data`: a separate process that starts a cell (to be killed).
    fn helper_process(&self, user_data: &std::path::Path) -> std::process::Command {
        let mut command = std::process::Command::new(std::env::current_exe().unwrap());
        command
            .args([
                "--exact",
                "helper_start_a_cell_then_wait",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                "UPDRAFT_LOCAL_CELLS_TEST_CONFIG",
                serde_json::to_string(&self.config).unwrap(),
            )
            .env("UPDRAFT_LOCAL_CELLS_TEST_USER_DATA", user_data);
        command
    }

    fn agent_pid(&self, id: &CellId) -> i32 {
        self.backend
            .record(id)
            .unwrap()
            .agent
            .expect("agent process recorded")
            .pid
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Ok(scan) = self.backend.scan() {
            let ids = scan
                .cells
                .iter()
                .map(|c| c.id.clone())
                .chain(scan.broken.iter().map(|(id, _)| CellId(id.clone())));
            for id in ids {
                if let Err(error) = self.backend.terminate_blocking(&id) {
                    eprintln!("cleanup: terminating {id}: {error}");
                }
            }
        }
        if let Err(error) = self.backend.remove_bridge_if_unused() {
            eprintln!("cleanup: bridge {}: {error}", self.config.bridge);
        }
        for base in cgroup_bases() {
            let _ = std::fs::remove_dir(base.join(&self.config.cgroup_parent));
        }
    }
}

fn cgroup_bases() -> Vec<PathBuf> {
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    if v2 {
        vec![PathBuf::from("/sys/fs/cgroup")]
    } else {
        ["pids", "memory", "cpu", "cpuacct"]
            .iter()
            .map(|c| Path::new("/sys/fs/cgroup").join(c))
            .collect()
    }
}

/// A pod running busybox httpd on 8080 that serves `text`.
fn web_pod(name: &str, text: &str, wiring: &updraft_cells_local::PodWiring) -> ApplyPodRequest {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
        "spec": {"containers": [{
            "name": "web",
            "image": "busybox",
            "command": ["sh", "-c", format!("echo {text} > /tmp/index.html && exec httpd -f -p 8080 -h /tmp")],
        }]},
    }))
    .unwrap();
    ApplyPodRequest {
        pod,
        network: PodNetworkConfig {
            interface: Some(PodInterface {
                host_netns: None,
                bridge: wiring.bridge.clone(),
                host_veth: wiring.host_veth.clone(),
                address: wiring.address,
                prefix_len: wiring.prefix_len,
                gateway: Some(wiring.gateway),
            }),
            dns: Default::default(),
        },
        ..ApplyPodRequest::default()
    }
}

async fn wait_pod(client: &CellClient, what: &str, pred: impl Fn(&PodStatus) -> bool) -> PodStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut response = client.pod_status(None, Duration::ZERO).await.unwrap();
    loop {
        if pred(&response.status) {
            return response.status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last status: {}",
            serde_json::to_string_pretty(&response.status).unwrap()
        );
        response = client
            .pod_status(Some(response.version), Duration::from_secs(5))
            .await
            .unwrap();
    }
}

fn running(status: &PodStatus) -> bool {
    status
        .container_statuses
        .iter()
        .flatten()
        .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
}

async fn run_web_pod(env: &Env, cell: &Cell, client: &CellClient, text: &str) {
    let wiring = env.backend.pod_network(cell).expect("pod wiring");
    client
        .apply_pod(&web_pod(&cell.name, text, &wiring))
        .await
        .unwrap();
    let status = wait_pod(client, "the web container running", running).await;
    assert_eq!(
        status.pod_ip.as_deref(),
        Some(wiring.address.to_string().as_str()),
        "the pod reports the cell's pod IP"
    );
}

/// GET / from `address`:8080, retried until it answers (the server may still be binding).
async fn http_get(address: IpAddr) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect((address, 8080)).await?;
            stream
                .write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
                .await?;
            let mut body = String::new();
            stream.read_to_string(&mut body).await?;
            Ok::<_, std::io::Error>(body)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(body)) if body.contains("200") => return body,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "no answer from {address}:8080: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn exec(client: &CellClient, argv: &[&str]) -> (String, i32) {
    let session = client
        .exec(
            "web",
            &ExecOptions {
                command: argv.iter().map(|s| (*s).to_owned()).collect(),
                stdout: true,
                stderr: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (out, err, end) = tokio::time::timeout(Duration::from_secs(30), session.collect())
        .await
        .unwrap()
        .unwrap();
    (
        format!(
            "{}{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        ),
        end.exit_code.unwrap_or(-1),
    )
}

/// Reads a file as the cell's processes see it (through the agent's mount namespace).
fn read_in_cell(pid: i32, path: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/root{}", path.display()))
}

fn ipv4(address: Option<IpAddr>) -> Ipv4Addr {
    match address {
        Some(IpAddr::V4(v4)) => v4,
        other => panic!("expected an IPv4 address, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn a_cell_boots_the_agent_from_cloud_init_and_runs_a_pod_within_its_limits() {
    let env = Env::new();
    let (cell, client) = env.agent_cell("web-1").await;

    // Identity, type and addresses as the provider needs them.
    assert_eq!(cell.name, "burst-default-web-1");
    assert_eq!(cell.instance_type, "local.nano");
    assert_eq!(cell.launch_type, LaunchType::OnDemand);
    let identity = cell.identity.clone().expect("complete identity");
    assert_eq!(identity.controller_id, "ctl");
    assert_eq!(identity.pod_uid, "uid-web-1");
    assert_eq!(identity.pod_labels["app"], "web-1");
    assert_eq!(cell.tags["updraft:label:app"], "web-1");
    let management = ipv4(cell.management_ip);
    let pod_ip = ipv4(cell.pod_ip);
    assert!(env.config.cidr.contains(management) && env.config.cidr.contains(pod_ip));
    assert_ne!(management, pod_ip);
    assert_ne!(management, env.config.cidr.gateway());
    assert!(cell.launch_time.is_some());
    assert_eq!(env.backend.list("ctl").await.unwrap(), vec![cell.clone()]);

    // The agent runs in the cell's cgroup, whose limits are the instance type's.
    let agent = env.agent_pid(&cell.id);
    let cgroup = env.backend.cgroup_path(&cell.id);
    let agent_cgroups = std::fs::read_to_string(format!("/proc/{agent}/cgroup")).unwrap();
    assert!(
        agent_cgroups.contains(&format!("/{}/init", cgroup.display())),
        "{agent_cgroups}"
    );
    let nano = Catalog::local().unwrap().get("local.nano").unwrap().clone();
    let read = |path: PathBuf| {
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        let dir = Path::new("/sys/fs/cgroup").join(&cgroup);
        assert_eq!(
            read(dir.join("memory.max")).trim(),
            nano.memory_bytes().to_string()
        );
        assert_eq!(
            read(dir.join("cpu.max")).trim(),
            format!("{} 100000", nano.vcpus * 100_000)
        );
    } else {
        let memory = Path::new("/sys/fs/cgroup/memory").join(&cgroup);
        assert_eq!(
            read(memory.join("memory.limit_in_bytes")).trim(),
            nano.memory_bytes().to_string()
        );
        let cpu = Path::new("/sys/fs/cgroup/cpu").join(&cgroup);
        assert_eq!(
            read(cpu.join("cpu.cfs_quota_us")).trim(),
            (u64::from(nano.vcpus) * 100_000).to_string()
        );
    }

    // write_files: visible to the cell at their paths with their modes, never on the host.
    let key = env.path("tls/server.key");
    let inside = format!("/proc/{agent}/root{}", key.display());
    assert_eq!(
        std::fs::read(&inside).unwrap(),
        env.pki.server_key.as_bytes()
    );
    assert_eq!(
        std::fs::metadata(&inside).unwrap().permissions().mode() & 0o7777,
        0o600
    );
    assert!(!key.exists(), "the key must not appear on the host");
    let motd = env.path("existing/motd");
    assert_eq!(
        read_in_cell(agent, &motd).unwrap(),
        b"hello from cloud-init\n"
    );
    assert!(
        !motd.exists(),
        "the overlaid file must not appear on the host"
    );
    assert_eq!(
        read_in_cell(agent, &env.path("existing/host.txt")).unwrap(),
        b"from the host\n",
        "the overlay shows the host's files too"
    );
    // runcmd ran inside the cell, after the agent, with the hostname and the metadata env.
    let marker = env.path("existing/marker");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let marker_text = loop {
        if let Ok(bytes) = read_in_cell(agent, &marker) {
            break String::from_utf8(bytes).unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "runcmd never wrote {}",
            marker.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(marker_text, format!("ran on cell-test with {pod_ip}\n"));
    assert!(!marker.exists());

    // A pod gets the cell's pod IP, runs under the cell's cgroup, and the host reaches it.
    run_web_pod(&env, &cell, &client, "hello-web-1").await;
    let body = http_get(IpAddr::V4(pod_ip)).await;
    assert!(body.contains("hello-web-1"), "{body}");
    let pods_dir = cgroup_bases()[0].join(&cgroup).join("pods");
    let pod_cgroups: Vec<_> = std::fs::read_dir(&pods_dir)
        .unwrap_or_else(|e| panic!("{}: {e} (is updraft-cell built from this tree? it must read UPDRAFT_CELL_CGROUP_ROOT)", pods_dir.display()))
        .collect();
    assert!(
        !pod_cgroups.is_empty(),
        "the pod's cgroup is inside the cell's"
    );
}

#[tokio::test]
async fn pods_on_two_cells_reach_each_other() {
    let env = Env::new();
    let (a, client_a) = env.agent_cell("a").await;
    let (b, client_b) = env.agent_cell("b").await;
    assert_ne!(a.pod_ip, b.pod_ip);
    assert_ne!(a.management_ip, b.management_ip);
    run_web_pod(&env, &a, &client_a, "hello-a").await;
    run_web_pod(&env, &b, &client_b, "hello-b").await;
    let ip_a = ipv4(a.pod_ip).to_string();
    let ip_b = ipv4(b.pod_ip).to_string();

    let (out, code) = exec(&client_a, &["ping", "-c", "1", "-W", "5", &ip_b]).await;
    assert_eq!(code, 0, "a → b ping: {out}");
    let (out, code) = exec(&client_b, &["ping", "-c", "1", "-W", "5", &ip_a]).await;
    assert_eq!(code, 0, "b → a ping: {out}");
    let (out, code) = exec(
        &client_a,
        &[
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{ip_b}:8080/index.html"),
        ],
    )
    .await;
    assert_eq!((out.trim(), code), ("hello-b", 0));
    let (out, code) = exec(
        &client_b,
        &[
            "wget",
            "-q",
            "-O",
            "-",
            &format!("http://{ip_a}:8080/index.html"),
        ],
    )
    .await;
    assert_eq!((out.trim(), code), ("hello-a", 0));
}

/// Every process whose network namespace has this inode.
fn processes_in_netns(inode: u64) -> Vec<i32> {
    let wanted = format!("net:[{inode}]");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|link| link.to_string_lossy() == wanted)
        })
        .collect()
}

fn netns_inode(pid: i32) -> u64 {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let text = link.to_string_lossy();
    text.trim_start_matches("net:[")
        .trim_end_matches(']')
        .parse()
        .unwrap()
}

#[tokio::test]
async fn terminate_leaves_nothing_behind_and_is_idempotent() {
    let env = Env::new();
    let (cell, client) = env.agent_cell("gone").await;
    run_web_pod(&env, &cell, &client, "bye").await;
    let id = cell.id.clone();
    let record = env.backend.record(&id).unwrap();
    let agent = record.agent.expect("agent");
    let init = record.init.expect("init");
    let cgroup = env.backend.cgroup_path(&id);
    // The container's processes: everything in the cell's pod cgroups.
    let mut pod_pids = Vec::new();
    for entry in walk(&cgroup_bases()[0].join(&cgroup).join("pods")) {
        if let Ok(text) = std::fs::read_to_string(entry.join("cgroup.procs")) {
            pod_pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    assert!(
        !pod_pids.is_empty(),
        "the pod's processes are in the cell's cgroup"
    );
    let pod_netns = netns_inode(pod_pids[0]);
    let cell_netns = netns_inode(agent.pid);
    assert_ne!(
        pod_netns, cell_netns,
        "the pod has its own network namespace"
    );
    let pod_processes: Vec<ProcessRef> = pod_pids
        .iter()
        .filter_map(|pid| ProcessRef::current(*pid))
        .collect();
    let netns_file = PathBuf::from(format!("/run/netns/updraft-{id}"));
    let veth = format!("uc{}", id.0.trim_start_matches("cell-"));
    assert!(netns_file.exists());
    assert!(
        std::process::Command::new("ip")
            .args(["link", "show", &veth])
            .output()
            .unwrap()
            .status
            .success()
    );
    let cell_dir = env.config.state_dir.join("cells").join(&id.0);
    assert!(cell_dir.exists());

    env.backend.terminate(&id).await.unwrap();

    assert!(!agent.alive(), "the agent is gone");
    assert!(!init.alive(), "the init is gone");
    for process in &pod_processes {
        assert!(!process.alive(), "pod process {} is gone", process.pid);
    }
    assert_eq!(
        processes_in_netns(cell_netns),
        Vec::<i32>::new(),
        "no process in the cell's netns"
    );
    assert_eq!(
        processes_in_netns(pod_netns),
        Vec::<i32>::new(),
        "no process in the pod's netns"
    );
    assert!(!netns_file.exists(), "{} removed", netns_file.display());
    let link = std::process::Command::new("ip")
        .args(["link", "show", &veth])
        .output()
        .unwrap();
    assert!(!link.status.success(), "veth {veth} removed");
    for base in cgroup_bases() {
        assert!(
            !base.join(&cgroup).exists(),
            "cgroup {} removed",
            base.join(&cgroup).display()
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&id.0),
        "no mount of the cell on the host:\n{mounts}"
    );
    assert!(!cell_dir.exists(), "{} removed", cell_dir.display());
    assert!(
        std::fs::read_dir(env.path("tls")).unwrap().next().is_none(),
        "the host mount point stays empty"
    );

    // Idempotent, and visible as Terminated; unknown ids are NotFound.
    env.backend.terminate(&id).await.unwrap();
    assert_eq!(
        env.backend.describe(&id).await.unwrap().state,
        CellState::Terminated
    );
    assert!(env.backend.list("ctl").await.unwrap().is_empty());
    let unknown = CellId("cell-0badc0de".into());
    assert!(matches!(
        env.backend.terminate(&unknown).await,
        Err(BackendError::NotFound { .. })
    ));
    assert!(matches!(
        env.backend.describe(&unknown).await,
        Err(BackendError::NotFound { .. })
    ));
    assert!(matches!(
        env.backend
            .describe(&CellId("../../etc/passwd".into()))
            .await,
        Err(BackendError::NotFound { .. })
    ));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(walk(&entry.path()));
        }
    }
    out
}

#[tokio::test]
async fn starts_are_idempotent_and_a_new_backend_finds_the_cells_despite_a_garbage_record() {
    let env = Env::new();
    let spec = env.spec("ctl", "one", env.plain_user_data());
    let first = env.backend.start(&spec).await.unwrap();
    let again = env.backend.start(&spec).await.unwrap();
    assert_eq!(first, again, "the same token returns the same cell");
    let other = env
        .backend
        .start(&env.spec("other-ctl", "two", env.plain_user_data()))
        .await
        .unwrap();
    let one = env.wait_state(&first.id, CellState::Running).await;
    let two = env.wait_state(&other.id, CellState::Running).await;
    assert_eq!(env.backend.list("ctl").await.unwrap(), vec![one.clone()]);

    // A garbage record: its cell reports a clear error, the others are still listed.
    let garbage = env.config.state_dir.join("records/cell-deadbeef.json");
    std::fs::write(&garbage, b"{ this is not a record").unwrap();

    // A new backend over the same state directory (Updraft restarted).
    let restarted = LocalBackend::new(env.config.clone(), Catalog::local().unwrap()).unwrap();
    assert_eq!(restarted.list("ctl").await.unwrap(), vec![one.clone()]);
    assert_eq!(
        restarted.list("other-ctl").await.unwrap(),
        vec![two.clone()]
    );
    let scan = restarted.scan().unwrap();
    assert_eq!(scan.broken.len(), 1);
    assert_eq!(scan.broken[0].0, "cell-deadbeef");
    let message = scan.broken[0].1.to_string();
    assert!(
        message.contains("cell-deadbeef.json is unreadable"),
        "{message}"
    );
    let described = restarted.describe(&CellId("cell-deadbeef".into())).await;
    assert!(
        matches!(&described, Err(BackendError::InvalidRequest { detail }) if detail.contains("cell-deadbeef.json")),
        "{described:?}"
    );
    // The same token on the new backend still returns the first cell.
    assert_eq!(restarted.start(&spec).await.unwrap(), first);

    // Addresses held by the cells are not handed out again.
    let third = restarted
        .start(&env.spec("ctl", "three", env.plain_user_data()))
        .await
        .unwrap();
    let three = restarted.describe(&third.id).await.unwrap();
    let held = [one.management_ip, one.pod_ip, two.management_ip, two.pod_ip];
    assert!(
        !held.contains(&three.management_ip) && !held.contains(&three.pod_ip),
        "{three:?}"
    );

    // Terminating the garbage record's cell cleans up by id and removes the record.
    restarted
        .terminate(&CellId("cell-deadbeef".into()))
        .await
        .unwrap();
    assert!(!garbage.exists());
    assert!(restarted.scan().unwrap().broken.is_empty());
}

#[tokio::test]
async fn bad_requests_are_refused_clearly_and_leave_nothing() {
    let env = Env::with_cidr_len(29);
    let mut unknown_type = env.spec("ctl", "x", env.plain_user_data());
    unknown_type.instance_type = "m5.large".into();
    let error = env
        .backend
        .start(&unknown_type)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("\"m5.large\" is not in the local catalog; known types: local.nano"),
        "{error}"
    );

    let mut script = env.spec("ctl", "y", b"#!/bin/sh\necho hi\n".to_vec());
    script.idempotency_token = "y".into();
    let error = env.backend.start(&script).await.unwrap_err().to_string();
    assert!(error.contains("not a #cloud-config document"), "{error}");

    let proc_file = env.spec(
        "ctl",
        "z",
        b"#cloud-config\nwrite_files:\n  - path: /proc/sys/kernel/x\n    content: x\n".to_vec(),
    );
    let error = env.backend.start(&proc_file).await.unwrap_err().to_string();
    assert!(error.contains("below /proc"), "{error}");
    assert!(
        env.backend.scan().unwrap().cells.is_empty(),
        "refused starts leave no record"
    );

    // A /29 holds two cells (5 addresses after the gateway); the third is refused.
    for pod in ["p1", "p2"] {
        env.backend
            .start(&env.spec("ctl", pod, env.plain_user_data()))
            .await
            .unwrap();
    }
    let error = env
        .backend
        .start(&env.spec("ctl", "p3", env.plain_user_data()))
        .await
        .unwrap_err();
    assert!(matches!(error, BackendError::Capacity { .. }), "{error:?}");
    assert!(error.to_string().contains("CIDR 10.214."), "{error}");
    assert!(error.to_string().contains("exhausted"), "{error}");
}

/// Not a test on its own: `cells_outlive_the_process_that_started_them` runs it in a child
/// process, which starts a cell, prints its id and waits to be SIGKILLed.
#[tokio::test]
#[ignore = "helper process of cells_outlive_the_process_that_started_them"]
async fn helper_start_a_cell_then_wait() {
    let Ok(config) = std::env::var("UPDRAFT_LOCAL_CELLS_TEST_CONFIG") else {
        return;
    };
    let config: LocalConfig = serde_json::from_str(&config).unwrap();
    let user_data =
        std::fs::read(std::env::var("UPDRAFT_LOCAL_CELLS_TEST_USER_DATA").unwrap()).unwrap();
    let backend = LocalBackend::new(config, Catalog::local().unwrap()).unwrap();
    let spec = CellSpec {
        name: "survivor".into(),
        instance_type: "local.nano".into(),
        launch_type: LaunchType::Spot,
        image: None,
        user_data,
        identity: CellIdentity {
            controller_id: "ctl".into(),
            node: "burst".into(),
            namespace: "default".into(),
            pod_name: "survivor".into(),
            pod_uid: "uid-survivor".into(),
            pod_labels: BTreeMap::new(),
        },
        security_groups: vec![],
        private_ip_only: true,
        root_volume_bytes: None,
        instance_profile: None,
        idempotency_token: "uid-survivor-1".into(),
    };
    let started = backend.start(&spec).await.unwrap();
    println!("CELL {}", started.id);
    tokio::time::sleep(Duration::from_secs(3600)).await;
}

#[tokio::test]
async fn cells_outlive_the_process_that_started_them_and_a_killed_agent_stops_the_cell() {
    use std::io::BufRead;
    let env = Env::new();
    let user_data = env.path("user-data");
    std::fs::write(&user_data, env.agent_user_data()).unwrap();
    let mut child = env
        .helper_process(&user_data)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            // libtest prints "test <name> ... " on the same line before the test's output.
            if let Some((_, id)) = line.split_once("CELL ") {
                return CellId(id.trim().to_string());
            }
            seen.push(line);
        }
        panic!("the helper process ended without starting a cell: {seen:?}");
    });
    let id = match tokio::time::timeout(Duration::from_secs(120), reader).await {
        Ok(id) => id.unwrap(),
        Err(_) => {
            let _ = child.kill();
            panic!("the helper process did not start a cell within 120 s");
        }
    };
    // SIGKILL the process that started the cell (as `updraft` killed mid-burst).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();

    let cell = env.wait_state(&id, CellState::Running).await;
    assert_eq!(cell.launch_type, LaunchType::Spot, "recorded as asked");
    // The agent answers after its starter died.
    env.wait_for_agent(&cell).await;

    // The agent killed from outside: the cell is Stopped (still listed, until terminated).
    let agent = env.agent_pid(&id);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    env.wait_state(&id, CellState::Stopped).await;
    let listed = env.backend.list("ctl").await.unwrap();
    assert_eq!(
        listed.iter().map(|c| (&c.id, c.state)).collect::<Vec<_>>(),
        vec![(&id, CellState::Stopped)]
    );
    env.backend.terminate(&id).await.unwrap();
    assert!(env.backend.list("ctl").await.unwrap().is_empty());
}

/// The records of a state directory, read as files (what a start left, whatever its phase).
fn record_files(env: &Env) -> Vec<updraft_cells_local::CellRecord> {
    let dir = env.config.state_dir.join("records");
    let mut records: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
        .collect();
    records.sort_by(|a: &updraft_cells_local::CellRecord, b| a.id.cmp(&b.id));
    records
}

#[tokio::test]
async fn a_start_cut_short_by_a_killed_process_is_resumed_under_the_same_id() {
    use std::os::unix::process::CommandExt;
    let env = Env::new();
    let user_data = env.path("user-data");
    std::fs::write(&user_data, env.agent_user_data()).unwrap();
    // The helper's `ip` stops for good when the start creates the cell's namespace: the
    // helper is killed right there, in the middle of the cell's creation.
    let wrappers = env.path("wrappers");
    std::fs::create_dir_all(&wrappers).unwrap();
    let reached = env.path("netns-add-reached");
    let real_ip = which("ip");
    std::fs::write(
        wrappers.join("ip"),
        format!(
            "#!/bin/sh\nif [ \"$1\" = netns ] && [ \"$2\" = add ]; then\n  touch {reached}\n  while :; do sleep 1; done\nfi\nexec {real_ip} \"$@\"\n",
            reached = reached.display(),
            real_ip = real_ip.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(wrappers.join("ip"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        wrappers.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = env
        .helper_process(&user_data)
        .env("PATH", path)
        .stdout(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !reached.exists() {
        if tokio::time::Instant::now() >= deadline || child.try_wait().unwrap().is_some() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("the helper never reached the cell's namespace creation");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGKILL the starting process and its stuck `ip` (as `updraft` killed mid-start).
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();

    let cut_short = record_files(&env);
    assert_eq!(cut_short.len(), 1, "{cut_short:?}");
    let cut_short = cut_short.into_iter().next().unwrap();
    assert_eq!(cut_short.phase, updraft_cells_local::Phase::Creating);
    let id = CellId(cut_short.id.clone());
    assert_eq!(
        env.backend.describe(&id).await.unwrap().state,
        CellState::Pending,
        "the cell was cut short while being created"
    );

    // What a restarted provider does first: the start is finished, under the same cell.
    let backend = env.backend.clone();
    let resumed = tokio::task::spawn_blocking(move || backend.resume_abandoned_starts())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0].0, id);
    assert!(resumed[0].1.is_ok(), "{resumed:?}");
    let cell = env.wait_state(&id, CellState::Running).await;
    assert_eq!(
        cell.management_ip,
        Some(IpAddr::V4(cut_short.management_ip))
    );
    assert_eq!(cell.pod_ip, Some(IpAddr::V4(cut_short.pod_ip)));
    assert_eq!(
        cell.identity.as_ref().map(|i| i.pod_uid.as_str()),
        Some("uid-survivor")
    );
    env.wait_for_agent(&cell).await;
    // One cell, none started twice; the same start's token names it; nothing left to resume.
    assert_eq!(
        env.backend
            .list("ctl")
            .await
            .unwrap()
            .iter()
            .map(|c| c.id.clone())
            .collect::<Vec<_>>(),
        vec![id.clone()]
    );
    let mut again = env.spec("ctl", "survivor", env.agent_user_data());
    again.idempotency_token = "uid-survivor-1".into();
    assert_eq!(env.backend.start(&again).await.unwrap().id, id);
    let backend = env.backend.clone();
    let none = tokio::task::spawn_blocking(move || backend.resume_abandoned_starts())
        .await
        .unwrap()
        .unwrap();
    assert!(none.is_empty(), "{none:?}");
    assert!(
        !env.config
            .state_dir
            .join("records")
            .join(format!("{id}.user-data"))
            .exists(),
        "the start's copy of the user data (the agent's key) is gone once launched"
    );
}

fn which(program: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{program} not on PATH"))
}

#[tokio::test]
async fn concurrent_first_starts_set_the_bridge_up_once() {
    // Each round: a new bridge that no cell has used yet, and eight cells started at once.
    for _round in 0..2 {
        let env = Env::new();
        let starts: Vec<_> = (0..8)
            .map(|i| {
                let spec = env.spec("ctl", &format!("first-{i}"), env.plain_user_data());
                let backend = env.backend.clone();
                tokio::spawn(async move { backend.start(&spec).await })
            })
            .collect();
        let mut started = Vec::new();
        for start in starts {
            started.push(start.await.unwrap());
        }
        let failed: Vec<String> = started
            .iter()
            .filter_map(|r| r.as_ref().err().map(ToString::to_string))
            .collect();
        assert!(
            failed.is_empty(),
            "concurrent first starts failed: {failed:?}"
        );
        for result in &started {
            env.wait_state(&result.as_ref().unwrap().id, CellState::Running)
                .await;
        }
        let addresses = updraft_cells_local::net::addresses(None, &env.config.bridge)
            .unwrap()
            .unwrap();
        assert_eq!(
            addresses,
            vec![(env.config.cidr.gateway(), env.config.cidr.prefix_len)],
            "the bridge has the gateway address once"
        );
    }
}
