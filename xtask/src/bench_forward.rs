//! `cargo xtask bench forward`: many concurrent `kubectl port-forward` sessions through the
//! real API server into one pod of an Updraft node (the release binary, mock provider), while
//! the node's Lease keeps renewing.
//!
//! Each session (one kubectl process) carries `connections` concurrent connections, each
//! sending `mib` MiB to a loopback echo server (the mock's pod network) and reading them back.
//! Reported: the aggregate throughput, the longest gap between two renewals of the node's
//! Lease seen during the run (the heartbeat; renewed every 10 s, expired after 40 s), and
//! Updraft's memory (VmRSS) and open file descriptors before, at the peak, and after every
//! session has ended — waiting until the descriptors are back to the baseline, so that what
//! the sessions held has been released.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use updraft_devcluster::{Layout, cluster};

use crate::node_process::{build_updraft, node_files, start_node, wait, wait_node_ready};

const NODE: &str = "updraft-bench-forward";
const PORT: u16 = 10252;
const MIB: usize = 1024 * 1024;

/// What to run.
pub struct ForwardBench {
    /// Concurrent kubectl port-forward sessions.
    pub sessions: usize,
    /// Concurrent connections per session.
    pub connections: usize,
    /// MiB each connection sends (and receives back).
    pub mib: usize,
}

/// (VmRSS KiB, VmHWM KiB, open file descriptors) of a process.
fn process_memory(pid: u32) -> anyhow::Result<(u64, u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((kib("VmRSS:"), kib("VmHWM:"), fds))
}

/// A loopback echo server; returns its port.
async fn echo_server() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rx, mut tx) = conn.split();
                let _ = tokio::io::copy(&mut rx, &mut tx).await;
                let _ = tx.shutdown().await;
            });
        }
    });
    Ok(port)
}

/// Starts `kubectl port-forward` to `pod` and returns it with its local port.
async fn port_forward(
    kubectl: &PathBuf,
    kubeconfig: &PathBuf,
    namespace: &str,
    pod: &str,
    remote: u16,
) -> anyhow::Result<(tokio::process::Child, u16)> {
    let mut child = tokio::process::Command::new(kubectl)
        .env("KUBECONFIG", kubeconfig)
        .args(["port-forward", "-n", namespace, "--address", "127.0.0.1"])
        .arg(format!("pod/{pod}"))
        .arg(format!(":{remote}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting kubectl port-forward")?;
    let mut lines = BufReader::new(child.stdout.take().context("kubectl stdout")?).lines();
    let local = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:")
                && let Some((port, _)) = rest.split_once(' ')
            {
                return port.parse::<u16>().ok();
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .context("kubectl port-forward did not start listening")?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, local))
}

/// Sends `bytes` through `port` and reads them back; returns how many came back.
async fn echo_through(port: u16, bytes: usize) -> anyhow::Result<usize> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut rx, mut tx) = conn.split();
    let send = async {
        let chunk = vec![0x5a_u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            tx.write_all(&chunk[..n]).await?;
            left -= n;
        }
        tx.shutdown().await
    };
    let receive = async {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut got = 0;
        loop {
            let n = rx.read(&mut buffer).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(got);
            }
            got += n;
        }
    };
    let (sent, received) = tokio::join!(send, receive);
    sent?;
    Ok(received?)
}

/// Records every change of the node Lease's renewTime until `stop`; returns the longest gap
/// between two observed renewals and how many were seen.
async fn watch_lease(
    leases: Api<Lease>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> (Duration, usize) {
    let mut last_renew = None;
    let mut last_change = Instant::now();
    let mut longest = Duration::ZERO;
    let mut renewals = 0;
    loop {
        if let Ok(lease) = leases.get(NODE).await {
            let renew = lease.spec.and_then(|s| s.renew_time).map(|t| t.0);
            if renew.is_some() && renew != last_renew {
                if last_renew.is_some() {
                    renewals += 1;
                }
                longest = longest.max(last_change.elapsed());
                last_change = Instant::now();
                last_renew = renew;
            }
        }
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    (longest.max(last_change.elapsed()), renewals)
}

/// Runs the benchmark and prints its results.
pub async fn run(layout: &Layout, bench: ForwardBench) -> anyhow::Result<()> {
    cluster::up(layout).await?;
    let updraft = build_updraft(true)?;
    let files = node_files(layout, NODE)?;
    let extra: Vec<String> = ["--kubelet-port", &PORT.to_string(), "--log-level", "warn"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let pid = start_node(layout, &updraft, NODE, &files, &extra)?;
    let client = cluster::admin_client(layout).await?;
    wait_node_ready(client.clone(), NODE).await?;

    let namespace = format!("bench-forward-{}", std::process::id());
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "target"},
        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "busybox"}]}
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    wait(
        &pods,
        "target",
        "the target pod running",
        Duration::from_secs(120),
        |p: &Pod| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"),
    )
    .await?;
    let echo_port = echo_server().await?;

    let (rss_before, _, fds_before) = process_memory(pid)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let lease_watch = tokio::spawn(watch_lease(
        Api::<Lease>::namespaced(client.clone(), "kube-node-lease"),
        stop_rx,
    ));

    let kubectl = layout.kubectl();
    let kubeconfig = layout.admin_kubeconfig();
    let started = Instant::now();
    let mut sessions = tokio::task::JoinSet::new();
    for _ in 0..bench.sessions {
        let (kubectl, kubeconfig, namespace) =
            (kubectl.clone(), kubeconfig.clone(), namespace.clone());
        let (connections, bytes) = (bench.connections, bench.mib * MIB);
        sessions.spawn(async move {
            let (child, local) =
                port_forward(&kubectl, &kubeconfig, &namespace, "target", echo_port).await?;
            let transfers = (0..connections).map(|_| echo_through(local, bytes));
            let echoed: usize = futures::future::try_join_all(transfers).await?.iter().sum();
            Ok::<_, anyhow::Error>((child, echoed))
        });
    }
    let mut children = Vec::new();
    let mut echoed = 0;
    let mut failures = Vec::new();
    while let Some(done) = sessions.join_next().await {
        match done {
            Ok(Ok((child, bytes))) => {
                children.push(child);
                echoed += bytes;
            }
            Ok(Err(err)) => failures.push(err.to_string()),
            Err(err) => failures.push(err.to_string()),
        }
    }
    let elapsed = started.elapsed();
    let (rss_peak, hwm, fds_peak) = process_memory(pid)?;
    for child in &mut children {
        let _ = child.kill().await;
    }
    // Wait until the node has released every session (its descriptors are back to the
    // baseline), then read its memory.
    let released = Instant::now();
    let mut fds_after;
    loop {
        fds_after = process_memory(pid)?.2;
        if fds_after <= fds_before || released.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (rss_after, _, _) = process_memory(pid)?;
    if fds_after > fds_before {
        println!(
            "descriptors still open: {}",
            crate::bench_exec::descriptor_kinds(pid)
        );
    }
    let _ = stop_tx.send(true);
    let (longest_gap, renewals) = lease_watch.await.unwrap_or_default();

    let expected = bench.sessions * bench.connections * bench.mib * MIB;
    println!(
        "\n| sessions × connections × MiB | echoed | time | throughput (each way) | longest Lease gap (renewals) | RSS before → peak → after | VmHWM | fds before → peak → after |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {} × {} × {} | {} MiB | {:.1} s | {:.0} MiB/s | {:.1} s ({renewals}) | {:.1} → {:.1} → {:.1} MiB | {:.1} MiB | {fds_before} → {fds_peak} → {fds_after} |",
        bench.sessions,
        bench.connections,
        bench.mib,
        echoed / MIB,
        elapsed.as_secs_f64(),
        echoed as f64 / MIB as f64 / elapsed.as_secs_f64(),
        longest_gap.as_secs_f64(),
        rss_before as f64 / 1024.0,
        rss_peak as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        hwm as f64 / 1024.0,
    );
    Api::<Namespace>::all(client.clone())
        .delete(&namespace, &DeleteParams::background())
        .await?;
    // Give the node the chance to delete the pod before it stops.
    let on_node = kube::api::ListParams::default().fields(&format!("spec.nodeName={NODE}"));
    let all_pods = Api::<Pod>::all(client.clone());
    for _ in 0..120 {
        if all_pods.list_metadata(&on_node).await?.items.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cluster::down_extra(layout, NODE)?;
    if !failures.is_empty() || echoed != expected {
        bail!(
            "{} of {} sessions failed ({echoed} of {expected} bytes echoed): {}",
            failures.len(),
            bench.sessions,
            failures.first().cloned().unwrap_or_default()
        );
    }
    Ok(())
}
