//! Benchmark of the `updraft-cell` binary on this machine (as root), with the busybox test
//! image in a real `docker-registry` on 127.0.0.1:
//!
//! ```sh
//! cargo build --release -p updraft-cell-agent --bins --examples &&
//!   $CARGO_TARGET_DIR/release/examples/bench_cell [warm_runs] [log_lines] [cold_runs]
//! ```
//!
//! Prints:
//! - cold start: apply → container Running with an empty image cache (a fresh agent and state
//!   directory per run, so the image is pulled, verified and unpacked);
//! - warm start: apply → Running with the image cached (`IfNotPresent`), one agent;
//! - the agent's RSS: idle (after its first answer), with a running pod, and after the pod is
//!   deleted;
//! - log throughput: one container writing `log_lines` lines of 100 bytes to stdout, apply →
//!   Completed, and the CRI log file's size.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // a benchmark: a panic is a failure report

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use updraft_cell_api::{ApplyPodRequest, CellClient, ClientTls};
use updraft_cell_image::test_support::TestRegistry;

struct Pki {
    ca: String,
    client_cert: String,
    client_key: String,
}

fn pki(dir: &Path) -> Pki {
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
    let (client_cert, client_key) = leaf("bench");
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.crt"), sc).unwrap();
    std::fs::write(dir.join("server.key"), sk).unwrap();
    Pki {
        ca: ca.pem(),
        client_cert,
        client_key,
    }
}

fn request(image: &str, n: u32, command: &str) -> ApplyPodRequest {
    let mut pod: Pod = serde_yaml::from_str(&format!(
        "metadata: {{name: bench}}\nspec:\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: app\n    image: {image}\n    command: [sh, -c, '{command}']\n"
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

fn running(s: &PodStatus) -> bool {
    app_state(s).is_some_and(|st| st.running.is_some())
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0) as f64
        / 1024.0
}

/// An agent process with its own state directory, killed on drop.
struct Agent {
    child: Child,
    client: CellClient,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_agent(dir: &Path, state: &Path, pki: &Pki, cgroup_root: &str) -> Agent {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("updraft-cell");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&bin)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--dir")
        .arg(state)
        .arg("--tls-cert")
        .arg(dir.join("server.crt"))
        .arg("--tls-key")
        .arg(dir.join("server.key"))
        .arg("--client-ca")
        .arg(dir.join("ca.crt"))
        .args(["--cgroup-root", cgroup_root])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let client = CellClient::new(
        ([127, 0, 0, 1], port).into(),
        ClientTls::from_pem(
            pki.ca.as_bytes(),
            pki.client_cert.as_bytes(),
            pki.client_key.as_bytes(),
        )
        .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.ping().await.is_err() {
        assert!(Instant::now() < deadline, "the agent never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Agent { child, client }
}

/// apply → Running for `request`, then the pod is deleted.
async fn start_once(client: &CellClient, request: &ApplyPodRequest) -> Duration {
    let t = Instant::now();
    client.apply_pod(request).await.unwrap();
    wait(client, running).await;
    t.elapsed()
}

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "{name}, {} runs: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        samples.len(),
        ms(p(0.5)),
        ms(p(0.9)),
        ms(samples[samples.len() - 1])
    );
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let arg = |n: usize, default: u64| {
        std::env::args()
            .nth(n)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    };
    let (warm_runs, lines, cold_runs) = (arg(1, 20) as u32, arg(2, 2_000_000), arg(3, 5) as u32);
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (_registry, busybox) = TestRegistry::start_with_busybox("bench/busybox:1")
        .await
        .unwrap();
    let image = busybox.reference.to_string();
    let sleeper = "while true; do sleep 1; done";

    // Cold: a fresh agent and an empty image store each run.
    let mut cold = Vec::new();
    for n in 0..cold_runs {
        let state = dir.path().join(format!("cold-{n}"));
        let agent = start_agent(dir.path(), &state, &pki, "updraft-cell-bench").await;
        cold.push(start_once(&agent.client, &request(&image, n, sleeper)).await);
        agent.client.delete_pod(None).await.unwrap();
        drop(agent);
        let _ = std::fs::remove_dir_all(&state);
    }

    // Warm: one agent, the image cached by the first (unmeasured) start.
    let agent = start_agent(
        dir.path(),
        &dir.path().join("warm"),
        &pki,
        "updraft-cell-bench",
    )
    .await;
    let pid = agent.child.id();
    let rss_idle = rss_mib(pid);
    let client = &agent.client;
    start_once(client, &request(&image, 1000, sleeper)).await;
    client.delete_pod(None).await.unwrap();
    let mut warm = Vec::new();
    let mut rss_running: f64 = 0.0;
    for n in 0..warm_runs {
        warm.push(start_once(client, &request(&image, 1001 + n, sleeper)).await);
        rss_running = rss_running.max(rss_mib(pid));
        client.delete_pod(None).await.unwrap();
    }
    // A pod running for a while, with its status long-polled and stats read, as the provider
    // does.
    client
        .apply_pod(&request(&image, 2000, sleeper))
        .await
        .unwrap();
    wait(client, running).await;
    for _ in 0..20 {
        client.stats().await.unwrap();
        let _ = client.pod_status(None, Duration::ZERO).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rss_running = rss_running.max(rss_mib(pid));
    client.delete_pod(None).await.unwrap();
    let rss_after = rss_mib(pid);

    summary("cold start apply→Running (empty image cache)", cold);
    summary("warm start apply→Running (image cached)", warm);
    println!(
        "agent RSS: idle {rss_idle:.1} MiB, with a running pod max {rss_running:.1} MiB, after delete {rss_after:.1} MiB"
    );

    // Log throughput: `lines` lines of 100 bytes to stdout, apply → Completed.
    let line = "x".repeat(99);
    let t = Instant::now();
    client
        .apply_pod(&request(
            &image,
            3000,
            &format!("yes {line} | head -n {lines}"),
        ))
        .await
        .unwrap();
    wait(client, |s| {
        app_state(s).is_some_and(|st| st.terminated.is_some())
    })
    .await;
    let secs = t.elapsed().as_secs_f64();
    let mb = lines as f64 * 100.0 / 1e6;
    let log_bytes: u64 = std::fs::read_dir(dir.path().join("warm/pod/logs/app"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    println!(
        "log throughput: {mb:.0} MB of output in {secs:.2} s = {:.1} MB/s ({:.0} lines/s); CRI log files {:.0} MB; agent RSS after: {:.1} MiB",
        mb / secs,
        lines as f64 / secs,
        log_bytes as f64 / 1e6,
        rss_mib(pid)
    );
    client.delete_pod(None).await.unwrap();
}
