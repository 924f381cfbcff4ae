//! `cargo xtask bench cells`: pods on local cells, from binding to Ready, with the release
//! `updraft` (cells provider, local backend) and the release agent `updraft-cell` against the
//! real control plane.
//!
//! Pods are created already bound (`spec.nodeName`), so creation is binding; a watch records
//! when each becomes Ready. Two rounds: one pod alone, then a burst of `--count` pods.
//! Cold: every pod waits for a new cell (namespaces, cgroup, the agent's boot). With
//! `--standby N` the provider keeps N idle `local.nano` cells (its standby pool) and the
//! rounds start once the pool is full. Images are a directory copy of the host's busybox
//! (`--image-dir`): the numbers are the cells' and the provider's, not a registry's (image
//! pulls are measured by the cell-image bench). Reported: latency per pod (p50, p90, max),
//! time to all Ready, Updraft's peak RSS, and the memory the cells take (their cgroups' usage
//! and the host's `MemAvailable` before and with every pod Ready).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher::{self, Event};
use updraft_devcluster::{Layout, cluster};

use crate::node_process::{create_bench_namespace, node_files, wait_node_ready};

const NODE: &str = "updraft-bench-cells";
const PORT: u16 = 10252;
const CONTROLLER_ID: &str = "bench-cells";
const CGROUP_PARENT: &str = "updraft-bench-cells";
/// The cells' addresses: the gateway plus two per cell, room for 126 cells.
const CIDR: &str = "10.217.0.0/24";
/// Most pods one burst may have (the CIDR's room, with a full standby pool besides).
pub const MAX_COUNT: usize = 100;

/// What to measure.
pub struct CellsBench {
    /// Pods in the burst.
    pub count: usize,
    /// Idle `local.nano` cells the provider keeps ready (0: cold).
    pub standby: u32,
    /// Updraft's pod workers (concurrent pod starts).
    pub pod_workers: usize,
}

/// Builds the release `updraft` and `updraft-cell`; returns their paths.
fn build_release() -> anyhow::Result<(PathBuf, PathBuf)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--release",
            "--package",
            "updraft",
            "--package",
            "updraft-cell-agent",
        ])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p updraft -p updraft-cell-agent failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| updraft_devcluster::workspace_root().join("target"))
        .join("release");
    Ok((target.join("updraft"), target.join("updraft-cell")))
}

/// A busybox root filesystem at `dir`: the host's static busybox and its applets.
fn busybox_rootfs(dir: &Path) -> anyhow::Result<()> {
    let bin = dir.join("bin");
    if bin.join("busybox").is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .context("copying /bin/busybox (apt-get install -y busybox-static)")?;
    let list = Command::new("/bin/busybox").arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet))?;
        }
    }
    Ok(())
}

fn write_config(dir: &Path, agent: &Path, bench: &CellsBench) -> anyhow::Result<PathBuf> {
    let rootfs = dir.join("busybox");
    busybox_rootfs(&rootfs)?;
    let mut text = format!(
        r#"backend: local
controllerId: {CONTROLLER_ID}
certificateDir: {dir}/pki
bootTimeout: 300s
healthTimeout: 120s
agent:
  dir: {dir}/agent
  tlsDir: {dir}/tls
  extraArgs: ["--image-dir", "busybox={rootfs}"]
local:
  stateDir: {dir}/state
  cidr: {CIDR}
  bridge: updraft-bench0
  agentBinary: {agent}
  cgroupParent: {CGROUP_PARENT}
  privateDirs: [{dir}/agent]
capacity: {{cpu: "1000", memory: 4Ti, pods: "{pods}"}}
"#,
        dir = dir.display(),
        rootfs = rootfs.display(),
        agent = agent.display(),
        pods = bench.count + 10,
    );
    if bench.standby > 0 {
        text.push_str(&format!(
            "standbyPool:\n  - {{instanceType: local.nano, count: {}}}\n",
            bench.standby
        ));
    }
    let path = dir.join("cells.yaml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The bench's cells that are not ending: (with a pod, idle).
fn live_cells(backend: &updraft_cells_local::LocalBackend) -> anyhow::Result<(usize, usize)> {
    let scan = backend.scan()?;
    let live: Vec<_> = scan
        .cells
        .into_iter()
        .filter(|c| !c.state.is_ending())
        .collect();
    let with_pod = live
        .iter()
        .filter(|c| c.identity.as_ref().is_some_and(|i| !i.pod_uid.is_empty()))
        .count();
    Ok((with_pod, live.len() - with_pod))
}

/// Terminates every cell of the bench's state directory and removes its bridge.
fn terminate_all(backend: &updraft_cells_local::LocalBackend) -> anyhow::Result<usize> {
    let mut terminated = 0;
    for cell in backend.scan()?.cells {
        if !cell.state.is_ending() {
            terminated += 1;
        }
        backend.terminate_blocking(&cell.id)?;
    }
    let _ = backend.remove_bridge_if_unused();
    // Each cell's cgroups go with it; the parent is the bench's.
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")?.flatten() {
        let _ = std::fs::remove_dir(hierarchy.path().join(CGROUP_PARENT));
    }
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(CGROUP_PARENT));
    Ok(terminated)
}

/// Host memory still available (KiB), from /proc/meminfo.
fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Memory charged to the cells' cgroups (bytes): cgroup v1 `memory.usage_in_bytes`, or v2
/// `memory.current`.
fn cells_memory_bytes() -> Option<u64> {
    [
        format!("/sys/fs/cgroup/memory/{CGROUP_PARENT}/memory.usage_in_bytes"),
        format!("/sys/fs/cgroup/{CGROUP_PARENT}/memory.current"),
    ]
    .iter()
    .find_map(|path| std::fs::read_to_string(path).ok()?.trim().parse().ok())
}

/// Peak RSS of a process (KiB), from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The host's load averages (1, 5, 15 min) as `/proc/loadavg` has them: the machine is shared,
/// and the numbers mean something only next to the load they were taken at.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn pod(name: &str) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": NODE,
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "c",
                "image": "busybox",
                "command": ["/bin/sleep", "3600"],
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}
            }]
        }
    }))?)
}

/// One round's results.
struct Round {
    ready: usize,
    total: Duration,
    latencies: Vec<Duration>,
}

/// Creates `count` pods named `<prefix>-<i>` (16 requests at a time) and waits until all are
/// Ready (at most 10 minutes).
async fn round(pods: &Api<Pod>, prefix: &str, count: usize) -> anyhow::Result<Round> {
    let mut events = watcher::watcher(pods.clone(), watcher::Config::default()).boxed();
    // The watch is established before the first pod exists.
    let _ = tokio::time::timeout(Duration::from_secs(10), events.next()).await;
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let started = Instant::now();
    let creator = {
        let (pods, created, prefix) = (pods.clone(), created.clone(), prefix.to_owned());
        tokio::spawn(async move {
            let semaphore = Arc::new(tokio::sync::Semaphore::new(16));
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..count {
                let Ok(permit) = semaphore.clone().acquire_owned().await else {
                    break;
                };
                let (pods, created, name) =
                    (pods.clone(), created.clone(), format!("{prefix}-{i}"));
                tasks.spawn(async move {
                    if let Ok(spec) = pod(&name) {
                        let sent = Instant::now();
                        if pods.create(&PostParams::default(), &spec).await.is_ok() {
                            created
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(name, sent);
                        }
                    }
                    drop(permit);
                });
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    let mut ready_at: HashMap<String, Instant> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while ready_at.len() < count && Instant::now() < deadline {
        let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(60), events.next()).await
        else {
            break;
        };
        if let Ok(Event::Apply(pod) | Event::InitApply(pod)) = event {
            let is_ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if let (true, Some(name)) = (is_ready, pod.metadata.name)
                && name.starts_with(prefix)
            {
                ready_at.entry(name).or_insert_with(Instant::now);
            }
        }
    }
    let _ = creator.await;
    let total = started.elapsed();
    let created = created.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut latencies: Vec<Duration> = ready_at
        .iter()
        .filter_map(|(name, at)| {
            created
                .get(name)
                .map(|sent| at.saturating_duration_since(*sent))
        })
        .collect();
    latencies.sort();
    Ok(Round {
        ready: ready_at.len(),
        total,
        latencies,
    })
}

/// Waits until no pod is bound to the bench node and the cells with a pod are gone (once a
/// second, at most 10 minutes).
async fn wait_drained(
    client: &kube::Client,
    backend: &updraft_cells_local::LocalBackend,
) -> anyhow::Result<()> {
    let pods = Api::<Pod>::all(client.clone());
    let on_node = kube::api::ListParams::default().fields(&format!("spec.nodeName={NODE}"));
    for _ in 0..600 {
        let left = pods.list_metadata(&on_node).await?.items.len();
        let (with_pod, _) = live_cells(backend)?;
        if left == 0 && with_pod == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bail!("pods bound to {NODE} or their cells were not gone within 10 minutes")
}

/// Waits until the standby pool holds `count` idle cells (once a second, at most 10 minutes).
async fn wait_pool(backend: &updraft_cells_local::LocalBackend, count: u32) -> anyhow::Result<()> {
    for _ in 0..600 {
        let (_, idle) = live_cells(backend)?;
        if idle >= count as usize {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bail!("the standby pool did not reach {count} idle cells within 10 minutes")
}

fn print_round(label: &str, round: &Round, count: usize, bench: &CellsBench) {
    println!(
        "| {label} | {} | {} | {:.1} s | {:.1} s | {:.1} s | {:.1} s |",
        if bench.standby > 0 {
            format!("standby {}", bench.standby)
        } else {
            "cold".to_owned()
        },
        if round.ready == count {
            format!("{count}")
        } else {
            format!("{} of {count}", round.ready)
        },
        round.total.as_secs_f64(),
        percentile(&round.latencies, 0.5).as_secs_f64(),
        percentile(&round.latencies, 0.9).as_secs_f64(),
        round
            .latencies
            .last()
            .copied()
            .unwrap_or_default()
            .as_secs_f64(),
    );
}

/// Runs the benchmark and prints its results.
pub async fn run(layout: &Layout, bench: CellsBench) -> anyhow::Result<()> {
    if bench.count == 0 || bench.count > MAX_COUNT {
        bail!("--count must be 1..={MAX_COUNT} (the bench CIDR {CIDR} holds 126 cells)");
    }
    if bench.count + bench.standby as usize > 120 {
        bail!("--count plus --standby must stay within the bench CIDR {CIDR} (126 cells)");
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the cells bench runs local cells: run it as root (namespaces, cgroups, mounts)");
    }
    cluster::up(layout).await?;
    let (updraft, agent) = build_release()?;
    let dir = layout.root().join("bench-cells");
    std::fs::create_dir_all(&dir)?;
    let config_path = write_config(&dir, &agent, &bench)?;
    let config = updraft_provider_cells::CellsConfig::load(&config_path)?;
    let backend = updraft_provider_cells::local_backend(&config)?;
    // A run that was interrupted leaves its cells: start from none.
    cluster::down_extra(layout, NODE)?;
    let leftovers = terminate_all(&backend)?;
    if leftovers > 0 {
        println!("terminated {leftovers} cells of an earlier run");
    }
    // Earlier runs' cells stay an hour as tombstones in the state directory, which Updraft's
    // listings read: a number to put next to its memory.
    let tombstones = backend.scan()?.cells.len();
    println!("the state directory holds {tombstones} terminated cells of earlier runs");

    // Updraft's log filter (its log is the node's under target/updraft-cluster/logs), e.g.
    // `UPDRAFT_BENCH_LOG=info,updraft_provider_cells=debug` to follow each pod's boot.
    let log_level = std::env::var("UPDRAFT_BENCH_LOG").unwrap_or_else(|_| "info".to_owned());
    let files = node_files(layout, NODE)?;
    let path = |p: &Path| p.display().to_string();
    let args: Vec<String> = [
        "run",
        "--provider",
        "cells",
        "--provider-config",
        &path(&config_path),
        "--nodename",
        NODE,
        "--kubeconfig",
        &path(&files.kubeconfig),
        "--tls-cert-file",
        &path(&files.serving.0),
        "--tls-key-file",
        &path(&files.serving.1),
        "--client-ca-file",
        &path(&files.client_ca),
        "--kubelet-port",
        &PORT.to_string(),
        "--pod-workers",
        &bench.pod_workers.to_string(),
        "--log-level",
        &log_level,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let pid = cluster::start_extra(layout, NODE, &updraft, &args)?;
    let result = measure(layout, &backend, pid, &bench).await;
    // Stop Updraft, then terminate what is left (the standby pool's idle cells).
    cluster::down_extra(layout, NODE)?;
    let left = terminate_all(&backend)?;
    if left > 0 {
        println!("terminated {left} cells left after the run (the standby pool's)");
    }
    result
}

async fn measure(
    layout: &Layout,
    backend: &updraft_cells_local::LocalBackend,
    pid: u32,
    bench: &CellsBench,
) -> anyhow::Result<()> {
    let client = cluster::admin_client(layout).await?;
    wait_node_ready(client.clone(), NODE).await?;
    wait_drained(&client, backend).await?;
    let namespace = format!("bench-cells-{}", std::process::id());
    create_bench_namespace(&client, &namespace).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let result = async {
        if bench.standby > 0 {
            wait_pool(backend, bench.standby).await?;
        }
        let load_at_start = load_average();
        let single = round(&pods, "single", 1).await?;
        pods.delete("single-0", &DeleteParams::default()).await?;
        wait_drained(&client, backend).await?;
        if bench.standby > 0 {
            wait_pool(backend, bench.standby).await?;
        }
        let available_before = mem_available_kib();
        let cells_before = cells_memory_bytes().unwrap_or(0);
        let load_before_burst = load_average();
        let burst = round(&pods, "burst", bench.count).await?;
        let load_after_burst = load_average();
        let available_after = mem_available_kib();
        let cells_after = cells_memory_bytes().unwrap_or(0);
        let (with_pod, idle) = live_cells(backend)?;
        println!(
            "\n| round | cells | pods Ready | all Ready | p50 bound→Ready | p90 | max |"
        );
        println!("|---|---|---|---|---|---|---|");
        print_round("1 pod", &single, 1, bench);
        print_round("burst", &burst, bench.count, bench);
        println!(
            "with every burst pod Ready: {with_pod} cells with a pod, {idle} idle; the cells' cgroups hold {:.1} MiB ({:.1} MiB per pod); host MemAvailable {:.0} → {:.0} MiB (−{:.1} MiB per pod); Updraft peak RSS {:.1} MiB",
            cells_after as f64 / 1048576.0,
            cells_after.saturating_sub(cells_before) as f64 / 1048576.0 / bench.count as f64,
            available_before as f64 / 1024.0,
            available_after as f64 / 1024.0,
            available_before.saturating_sub(available_after) as f64 / 1024.0 / bench.count as f64,
            peak_rss_kib(pid) as f64 / 1024.0,
        );
        println!(
            "load average (1/5/15 min): {load_at_start} before the 1-pod round, {load_before_burst} before the burst, {load_after_burst} with every burst pod Ready"
        );
        anyhow::Ok(())
    }
    .await;
    Api::<Namespace>::all(client.clone())
        .delete(&namespace, &DeleteParams::background())
        .await?;
    // Updraft stops each pod's cell before the pod goes: keep it running until it has.
    wait_drained(&client, backend).await?;
    result
}
