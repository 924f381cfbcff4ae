//! `cargo xtask bench exec`: many concurrent exec sessions through the real API server into
//! one pod of an Updraft node (the release binary; the mock provider running the pod's
//! processes for real, `mock.updraft.dev/run`), while the node's Lease keeps renewing.
//!
//! Each session is kube-rs's WebSocket exec (the API server translates it to SPDY towards the
//! node) of `sh -c 'echo ready; sleep N; echo bye'`: all sessions are open at the same time
//! for `hold` seconds. Reported: the time until every session printed `ready`, the longest gap
//! between two renewals of the node's Lease during the run (renewed every 10 s, expired after
//! 40 s), and Updraft's memory (VmRSS) and open descriptors before, with every session open,
//! and after they have all ended (waiting until the descriptors are back to the baseline).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, AttachParams, DeleteParams, PostParams};
use tokio::io::AsyncReadExt as _;
use updraft_devcluster::{Layout, cluster};

use crate::node_process::{build_updraft, node_files, start_node, wait, wait_node_ready};

const NODE: &str = "updraft-bench-exec";
const PORT: u16 = 10253;

/// What to run.
pub struct ExecBench {
    /// Concurrent exec sessions.
    pub sessions: usize,
    /// Seconds every session stays open.
    pub hold: u64,
}

/// (VmRSS KiB, open file descriptors) of a process.
fn process_memory(pid: u32) -> anyhow::Result<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((rss, fds))
}

/// What the process's open descriptors are, counted by kind (socket, pipe, file, anon inode).
pub(crate) fn descriptor_kinds(pid: u32) -> String {
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in entries.flatten() {
            let target = std::fs::read_link(entry.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            let kind = target.split(':').next().unwrap_or_default().to_owned();
            *kinds.entry(kind).or_default() += 1;
        }
    }
    format!(
        "{kinds:?}; TCP connections by remote port: {:?}",
        tcp_peers(pid)
    )
}

/// The process's TCP connections counted by remote port (6443: its API client's pool).
fn tcp_peers(pid: u32) -> std::collections::BTreeMap<u16, usize> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?.display().to_string();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .trim_end_matches(']')
                    .to_owned(),
            )
        })
        .collect();
    let mut peers = std::collections::BTreeMap::new();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(remote), Some(inode)) = (fields.get(2), fields.get(9)) else {
            continue;
        };
        if inodes.contains(*inode)
            && let Some(port) = remote.split(':').nth(1)
            && let Ok(port) = u16::from_str_radix(port, 16)
        {
            *peers.entry(port).or_default() += 1;
        }
    }
    peers
}

/// Samples the node Lease's renewTime until `stop`; returns the longest time between two
/// observed renewals and how many there were.
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
                renewals += usize::from(last_renew.is_some());
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

/// One session: waits for `ready`, reports it, then reads to the end and checks the status.
async fn session(
    pods: Api<Pod>,
    hold: u64,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<()> {
    let script = format!("echo ready; sleep {hold}; echo bye");
    let mut process = pods
        .exec(
            "target",
            ["sh", "-c", script.as_str()],
            &AttachParams::default().stdout(true).stderr(false),
        )
        .await
        .context("starting exec")?;
    let mut stdout = process.stdout().context("exec stdout")?;
    let status = process.take_status().context("exec status")?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 64];
    let mut announced = false;
    loop {
        let n = stdout.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if !announced && seen.starts_with(b"ready\n") {
            announced = true;
            let _ = ready.send(()).await;
        }
    }
    let status = status.await.context("no exit status")?;
    if seen != b"ready\nbye\n" || status.status.as_deref() != Some("Success") {
        bail!(
            "session ended with {:?} and status {status:?}",
            String::from_utf8_lossy(&seen)
        );
    }
    process.join().await.context("closing the session")?;
    Ok(())
}

/// Runs the benchmark and prints its results.
pub async fn run(layout: &Layout, bench: ExecBench) -> anyhow::Result<()> {
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

    let namespace = format!("bench-exec-{}", std::process::id());
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "target", "annotations": {"mock.updraft.dev/run": "true"}},
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

    let (rss_before, fds_before) = process_memory(pid)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let lease_watch = tokio::spawn(watch_lease(
        Api::<Lease>::namespaced(client.clone(), "kube-node-lease"),
        stop_rx,
    ));
    let started = Instant::now();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(bench.sessions.max(1));
    let mut sessions = tokio::task::JoinSet::new();
    for _ in 0..bench.sessions {
        sessions.spawn(session(pods.clone(), bench.hold, ready_tx.clone()));
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < bench.sessions && ready_rx.recv().await.is_some() {
        ready += 1;
    }
    let all_open = started.elapsed();
    let (rss_open, fds_open) = process_memory(pid)?;
    let mut failures = Vec::new();
    while let Some(done) = sessions.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(err)) => failures.push(format!("{err:#}")),
            Err(err) => failures.push(err.to_string()),
        }
    }
    let elapsed = started.elapsed();
    let released = Instant::now();
    let mut fds_after;
    loop {
        fds_after = process_memory(pid)?.1;
        if fds_after <= fds_before || released.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (rss_after, _) = process_memory(pid)?;
    if fds_after > fds_before {
        println!("descriptors still open: {}", descriptor_kinds(pid));
    }
    let _ = stop_tx.send(true);
    let (longest_gap, renewals) = lease_watch.await.unwrap_or_default();

    println!(
        "\n| sessions × hold | all open after | total | failed | longest Lease gap (renewals) | RSS before → all open → after | fds before → all open → after |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {} × {} s | {:.1} s | {:.1} s | {} | {:.1} s ({renewals}) | {:.1} → {:.1} → {:.1} MiB | {fds_before} → {fds_open} → {fds_after} |",
        bench.sessions,
        bench.hold,
        all_open.as_secs_f64(),
        elapsed.as_secs_f64(),
        failures.len(),
        longest_gap.as_secs_f64(),
        rss_before as f64 / 1024.0,
        rss_open as f64 / 1024.0,
        rss_after as f64 / 1024.0,
    );
    Api::<Namespace>::all(client.clone())
        .delete(&namespace, &DeleteParams::background())
        .await?;
    let on_node = kube::api::ListParams::default().fields(&format!("spec.nodeName={NODE}"));
    let all_pods = Api::<Pod>::all(client.clone());
    for _ in 0..120 {
        if all_pods.list_metadata(&on_node).await?.items.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    cluster::down_extra(layout, NODE)?;
    if !failures.is_empty() {
        bail!(
            "{} of {} sessions failed: {}",
            failures.len(),
            bench.sessions,
            failures.first().cloned().unwrap_or_default()
        );
    }
    Ok(())
}
