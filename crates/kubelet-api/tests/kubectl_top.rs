//! `kubectl top pod` against the real metrics-server, which scrapes the node's
//! `/metrics/resource` the way it scrapes any kubelet: the node's InternalIP and status port,
//! the serving certificate verified against the cluster CA, the API server's kubelet client
//! certificate as its credentials (authorized by the node through SubjectAccessReview).
//!
//! metrics-server is built once per machine from its Go module (`go install
//! sigs.k8s.io/metrics-server/cmd/metrics-server@v0.9.0`, through the Go module proxy) into
//! `~/.cache/updraft/metrics-server-v0.9.0/bin`, like the control plane's binaries.
//!
//! The dev control plane runs without the aggregation layer's front proxy (no requestheader CA
//! or proxy client certificate), so the API server cannot forward `metrics.k8s.io` to an
//! APIService; kubectl is pointed at metrics-server itself instead (`--server`), which is
//! where the aggregator would forward the request. metrics-server authenticates kubectl's
//! admin certificate and authorizes it through the API server, as behind the aggregator.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

#[path = "port_forward_support/mod.rs"]
mod support;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use updraft_devcluster::pki::{CertificateAuthority, Identity};
use updraft_testing::TestCluster;

use support::{TIMEOUT, running_pod, start_loopback_node};

const METRICS_SERVER_VERSION: &str = "0.9.0";

/// The metrics-server binary, built from its Go module on first use.
fn metrics_server() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let root = home
        .join(".cache/updraft")
        .join(format!("metrics-server-v{METRICS_SERVER_VERSION}"));
    let binary = root.join("bin/metrics-server");
    if binary.exists() {
        return binary;
    }
    // Built into a directory of its own and renamed, so a concurrent or interrupted build
    // never leaves a half-written binary at the final path.
    let partial = root.join(format!("bin.partial-{}", std::process::id()));
    std::fs::create_dir_all(&partial).unwrap();
    eprintln!(
        "building metrics-server v{METRICS_SERVER_VERSION} from its Go module (once per machine)"
    );
    let output = Command::new("go")
        .args(["install", "-trimpath", "-ldflags", "-s -w"])
        .arg(format!(
            "sigs.k8s.io/metrics-server/cmd/metrics-server@v{METRICS_SERVER_VERSION}"
        ))
        .env("GOBIN", &partial)
        .env("GOFLAGS", "")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap_or_else(|e| {
            panic!("kubectl top needs the Go toolchain (`go` on PATH) to build metrics-server: {e}")
        });
    assert!(
        output.status.success(),
        "go install metrics-server failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::rename(&partial, root.join("bin"));
    let _ = std::fs::remove_dir_all(&partial);
    assert!(binary.exists(), "{} after the build", binary.display());
    binary
}

fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_top_pod_reads_what_metrics_server_scraped_from_the_node() {
    let binary = metrics_server();
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("top").await;
    let node = start_loopback_node(&cluster).await;
    running_pod(
        &cluster,
        ns.name(),
        &node.name,
        "busy",
        serde_json::json!([
            {"name": "app", "image": "busybox", "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}}
        ]),
    )
    .await;

    let pki = cluster.layout().pki();
    let scratch = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load(&pki).unwrap();
    let serving = ca
        .issue(&Identity {
            common_name: "metrics-server".into(),
            ip_addresses: vec![Ipv4Addr::LOCALHOST.into()],
            server: true,
            ..Identity::default()
        })
        .unwrap();
    let (cert, key) = (
        scratch.path().join("serving.crt"),
        scratch.path().join("serving.key"),
    );
    std::fs::write(&cert, &serving.cert_pem).unwrap();
    std::fs::write(&key, &serving.key_pem).unwrap();
    let ca_file = scratch.path().join("ca.crt");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let admin = cluster.layout().admin_kubeconfig();
    let port = free_loopback_port();
    let log_path = scratch.path().join("metrics-server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let path_arg = |flag: &str, path: &std::path::Path| format!("{flag}={}", path.display());
    let mut server = tokio::process::Command::new(&binary)
        .arg(format!("--secure-port={port}"))
        .arg("--bind-address=127.0.0.1")
        .arg(path_arg("--tls-cert-file", &cert))
        .arg(path_arg("--tls-private-key-file", &key))
        .arg(path_arg("--kubeconfig", &admin))
        .arg(path_arg("--authentication-kubeconfig", &admin))
        .arg(path_arg("--authorization-kubeconfig", &admin))
        .arg("--kubelet-preferred-address-types=InternalIP")
        .arg("--kubelet-use-node-status-port")
        .arg(path_arg("--kubelet-certificate-authority", &ca_file))
        .arg(path_arg(
            "--kubelet-client-certificate",
            &pki.join("apiserver-kubelet-client.crt"),
        ))
        .arg(path_arg(
            "--kubelet-client-key",
            &pki.join("apiserver-kubelet-client.key"),
        ))
        // Only this test's node: the shared cluster has other tests' nodes.
        .arg(format!(
            "--node-selector=kubernetes.io/hostname={}",
            node.name
        ))
        .arg("--metric-resolution=10s")
        .arg("--kubelet-request-timeout=5s")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // metrics-server needs two scrapes (10 s apart) before it has a CPU rate.
    let server_url = format!("https://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let line = loop {
        let output = cluster
            .kubectl()
            .args(["--server", &server_url, "top", "pod", "-n", ns.name()])
            .args(["busy", "--no-headers"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() && stdout.contains("busy") {
            break stdout;
        }
        if let Ok(Some(status)) = server.try_wait() {
            panic!(
                "metrics-server exited ({status}): {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "kubectl top pod never succeeded; last: {} {}\nmetrics-server log:\n{}",
                stdout,
                String::from_utf8_lossy(&output.stderr),
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    };
    // "busy   250m   64Mi": the mock uses what the container requests.
    let columns: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(columns.first(), Some(&"busy"), "{line}");
    let cpu: u32 = columns
        .get(1)
        .and_then(|c| c.strip_suffix('m'))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("CPU column in {line:?}"));
    assert!((240..=260).contains(&cpu), "CPU {cpu}m in {line:?}");
    assert_eq!(columns.get(2), Some(&"64Mi"), "{line}");

    let _ = server.start_kill();
    drop(node);
}
