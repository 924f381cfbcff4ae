//! Benchmark of the cell agent binary on this machine (as root):
//! `cargo build --release -p updraft-cell-agent --bins --examples &&
//!  target/release/examples/bench_cell [runs]`
//!
//! Prints: warm start (apply → Running, busybox directory image copied per container),
//! the agent's RSS with a running pod, and log throughput (one container writing to stdout).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use updraft_cell_api::{ApplyPodRequest, CellClient, ClientTls};

fn pki(dir: &Path) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (sc, sk) = leaf("updraft-cell");
    let (cc, ck) = leaf("bench");
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.crt"), sc).unwrap();
    std::fs::write(dir.join("server.key"), sk).unwrap();
    (ca.pem(), cc, ck)
}

fn busybox(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
}

fn request(n: u32, command: &str) -> ApplyPodRequest {
    let mut pod: Pod = serde_yaml::from_str(&format!(
        "metadata: {{name: bench}}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    image: busybox\n    command: [sh, -c, '{command}']\n"
    ))
    .unwrap();
    pod.metadata.uid = Some(format!("bench-{}-{n}", std::process::id()));
    ApplyPodRequest {
        pod,
        ..ApplyPodRequest::default()
    }
}

async fn wait(client: &CellClient, pred: impl Fn(&PodStatus) -> bool) {
    let mut r = client.pod_status(None, Duration::ZERO).await.unwrap();
    while !pred(&r.status) {
        r = client
            .pod_status(Some(r.version), Duration::from_secs(30))
            .await
            .unwrap();
    }
}

fn app_state(s: &PodStatus) -> Option<&k8s_openapi::api::core::v1::ContainerState> {
    s.container_statuses
        .iter()
        .flatten()
        .find(|c| c.name == "app")
        .and_then(|c| c.state.as_ref())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

struct Agent(Child);
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    let runs: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let (ca, cc, ck) = pki(dir.path());
    busybox(&dir.path().join("image"));
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("updraft-cell");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent = Agent(
        Command::new(&bin)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--dir")
            .arg(dir.path().join("agent"))
            .arg("--tls-cert")
            .arg(dir.path().join("server.crt"))
            .arg("--tls-key")
            .arg(dir.path().join("server.key"))
            .arg("--client-ca")
            .arg(dir.path().join("ca.crt"))
            .args(["--cgroup-root", "updraft-cell-bench"])
            .arg("--image-dir")
            .arg(format!("busybox={}", dir.path().join("image").display()))
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let client = CellClient::new(
        ([127, 0, 0, 1], port).into(),
        ClientTls::from_pem(ca.as_bytes(), cc.as_bytes(), ck.as_bytes()).unwrap(),
    );
    while client.ping().await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut starts = Vec::new();
    let mut rss_max = 0;
    for n in 0..runs {
        let t = Instant::now();
        client
            .apply_pod(&request(n, "while true; do sleep 1; done"))
            .await
            .unwrap();
        wait(&client, |s| {
            app_state(s).is_some_and(|st| st.running.is_some())
        })
        .await;
        starts.push(t.elapsed());
        rss_max = rss_max.max(rss_kib(agent.0.id()));
        client.delete_pod(None).await.unwrap();
    }
    starts.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "warm start apply→Running, {runs} runs: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        ms(starts[starts.len() / 2]),
        ms(starts[starts.len() * 9 / 10]),
        ms(starts[starts.len() - 1])
    );
    println!(
        "agent RSS with a running pod: max {:.1} MiB",
        rss_max as f64 / 1024.0
    );
    // Log throughput: N lines (default 2,000,000) of 100 bytes to stdout, apply → Completed.
    let lines: u64 = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let line = "x".repeat(99);
    let t = Instant::now();
    client
        .apply_pod(&request(runs + 1, &format!("yes {line} | head -n 2000000")))
        .await
        .unwrap();
    wait(&client, |s| {
        app_state(s).is_some_and(|st| st.terminated.is_some())
    })
    .await;
    let secs = t.elapsed().as_secs_f64();
    let mb = lines as f64 * 100.0 / 1e6;
    println!(
        "log throughput: {mb:.0} MB in {secs:.2} s = {:.1} MB/s ({:.0} lines/s); agent RSS after: {:.1} MiB",
        mb / secs,
        lines as f64 / secs,
        rss_kib(agent.0.id()) as f64 / 1024.0
    );
    client.delete_pod(None).await.unwrap();
}
