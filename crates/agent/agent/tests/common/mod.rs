//! Helpers: PKI, a busybox directory image, an in-process agent on 127.0.0.1, waits.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use tokio_util::sync::CancellationToken;
use updraft_cell_agent::images::{DirectoryImages, PreparedImage};
use updraft_cell_agent::{Agent, Nft, server, tls};
use updraft_cell_api::{ApplyPodRequest, CellClient, ClientTls, PodStatusResponse};

/// A CA with server and client certificates, in PEM.
pub struct Pki {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

pub fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "updraft cells CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |name: &str, client: bool| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("updraft-cell", false);
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
pub fn busybox_rootfs(dir: &Path) {
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

/// An agent serving on 127.0.0.1 in this process.
pub struct TestAgent {
    pub agent: Arc<Agent>,
    pub client: CellClient,
    pub pki: Pki,
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the cell agent tests must run as root (namespaces, cgroups, mounts)"
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
}

pub fn images(dir: &Path) -> DirectoryImages {
    let template = dir.join("busybox-image");
    if !template.exists() {
        busybox_rootfs(&template);
    }
    DirectoryImages::new(dir.join("rootfs")).with_image(
        "busybox",
        &template,
        PreparedImage {
            cmd: vec!["sh".into()],
            env: vec![("PATH".into(), "/bin".into())],
            image_id: "dir://busybox".into(),
            ..PreparedImage::default()
        },
    )
}

pub async fn start_agent(backoff: Option<Duration>) -> TestAgent {
    start_agent_with(|dir| Arc::new(images(dir)), backoff).await
}

pub async fn start_agent_with(
    images: impl FnOnce(&Path) -> Arc<dyn updraft_cell_agent::images::ImageSource>,
    backoff: Option<Duration>,
) -> TestAgent {
    start_agent_full(images, backoff, Nft::default()).await
}

/// An agent installing Service routes with `nft`.
pub async fn start_agent_with_nft(nft: Nft) -> TestAgent {
    start_agent_full(|dir| Arc::new(images(dir)), None, nft).await
}

async fn start_agent_full(
    images: impl FnOnce(&Path) -> Arc<dyn updraft_cell_agent::images::ImageSource>,
    backoff: Option<Duration>,
    nft: Nft,
) -> TestAgent {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let mut agent = Agent::open(
        dir.path().join("agent"),
        images(dir.path()),
        PathBuf::from("updraft-cell-test"),
        nft,
    )
    .await
    .unwrap();
    if let Some(b) = backoff {
        agent.set_backoff(b, b * 4);
    }
    let tls = tls::server_config(
        pki.ca.as_bytes(),
        pki.server_cert.as_bytes(),
        pki.server_key.as_bytes(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(server::serve(
        listener,
        tls,
        agent.clone(),
        shutdown.clone(),
    ));
    let client = CellClient::new(
        addr,
        ClientTls::from_pem(
            pki.ca.as_bytes(),
            pki.client_cert.as_bytes(),
            pki.client_key.as_bytes(),
        )
        .unwrap(),
    );
    TestAgent {
        agent,
        client,
        pki,
        dir,
        shutdown,
    }
}

impl TestAgent {
    /// Deletes the pod (stopping everything) and stops serving.
    pub async fn finish(self) {
        let _ = self.client.delete_pod(None).await;
        self.shutdown.cancel();
    }
}

/// A pod from YAML, with a fresh UID.
pub fn pod(yaml: &str) -> ApplyPodRequest {
    let mut pod: Pod = serde_yaml::from_str(yaml).unwrap();
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    pod.metadata.uid = Some(format!(
        "uid-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    ApplyPodRequest {
        pod,
        ..ApplyPodRequest::default()
    }
}

/// Long-polls the status until `pred` holds (60 s bound), returning it.
pub async fn wait_status(
    client: &CellClient,
    what: &str,
    pred: impl Fn(&PodStatus) -> bool,
) -> PodStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut resp: PodStatusResponse = client.pod_status(None, Duration::ZERO).await.unwrap();
    loop {
        if pred(&resp.status) {
            return resp.status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last status: {}",
            serde_json::to_string_pretty(&resp.status).unwrap()
        );
        resp = client
            .pod_status(Some(resp.version), Duration::from_secs(5))
            .await
            .unwrap();
    }
}

pub fn container<'a>(
    s: &'a PodStatus,
    name: &str,
) -> Option<&'a k8s_openapi::api::core::v1::ContainerStatus> {
    s.container_statuses
        .iter()
        .flatten()
        .chain(s.init_container_statuses.iter().flatten())
        .find(|c| c.name == name)
}

pub fn running(s: &PodStatus, name: &str) -> bool {
    container(s, name).is_some_and(|c| c.state.as_ref().is_some_and(|st| st.running.is_some()))
}

pub fn ready(s: &PodStatus) -> bool {
    s.conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Runs a command through exec and returns (stdout, stderr, exit code).
pub async fn exec(client: &CellClient, container: &str, argv: &[&str]) -> (String, String, i32) {
    let session = client
        .exec(
            container,
            &updraft_cell_api::ExecOptions {
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
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        end.exit_code.unwrap_or(-1),
    )
}

/// A TLS connection to the agent with the provider's client certificate, for speaking raw
/// (possibly broken) HTTP and frames to it.
pub async fn raw_tls(t: &TestAgent) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in updraft_cell_api::client::certs_from_pem(t.pki.ca.as_bytes()).unwrap() {
        roots.add(ca).unwrap();
    }
    let certs = updraft_cell_api::client::certs_from_pem(t.pki.client_cert.as_bytes()).unwrap();
    let key = updraft_cell_api::client::key_from_pem(t.pki.client_key.as_bytes()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(t.client.addr())
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from(updraft_cell_api::SERVER_NAME).unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// Reads an HTTP response head (through the blank line) byte by byte, so nothing after it is
/// consumed; returns the status code and the head.
pub async fn read_head(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(30), io.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(n == 1, "connection closed in the response head: {head:?}");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    (status, head)
}

/// Sends `request` verbatim (it should say `Connection: close`) and returns the status and
/// the body.
pub async fn raw_request(t: &TestAgent, request: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut io = raw_tls(t).await;
    io.write_all(request).await.unwrap();
    io.flush().await.unwrap();
    let (status, _) = read_head(&mut io).await;
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), io.read_to_end(&mut body)).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `nft list table ip updraft-proxy` in the named network namespace `netns` (the table must
/// exist).
pub fn proxy_rules(netns: &str) -> String {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "nft",
            "list",
            "table",
            "ip",
            "updraft-proxy",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "nft list in {netns}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
