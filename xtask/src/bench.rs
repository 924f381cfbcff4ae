//! `cargo xtask bench pods`: Updraft with the mock provider against the real control plane.
//!
//! Pods are created already bound to the node (`spec.nodeName`), at a fixed rate or as a
//! burst; a watch records when each becomes Running and Ready. Reported: time to all Ready,
//! per-pod latency from creation to Ready (p50/p99), Updraft's peak RSS and CPU seconds (from
//! /proc), and the API writes Updraft made per pod (from its own /metrics: accepted writes,
//! and refused ones such as a 403 while the Node authorizer catches up).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher::{self, Event};
use updraft_devcluster::pki::{CertificateAuthority, Identity};
use updraft_devcluster::{Layout, cluster};

use crate::node_process::{
    build_updraft, create_bench_namespace, node_files, start_node, wait_node_ready,
};

const NODE: &str = "updraft-bench";
const PORT: u16 = 10251;

/// What to measure.
pub struct PodBench {
    /// How many pods.
    pub count: usize,
    /// Pods created per second; 0 for a burst.
    pub rate: u32,
}

/// Peak RSS (KiB) and CPU seconds of a process, from /proc.
fn process_usage(pid: u32) -> anyhow::Result<(u64, u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (peak_kib, now_kib) = (kib("VmHWM:"), kib("VmRSS:"));
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    Ok((peak_kib, now_kib, ticks as f64 / per_second as f64))
}

/// Updraft's API requests so far by (method, response code), from its own /metrics.
async fn api_requests(client: &reqwest::Client) -> anyhow::Result<HashMap<(String, String), u64>> {
    let text = client
        .get(format!("https://127.0.0.1:{PORT}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let label = |line: &str, name: &str| {
        line.split(&format!("{name}=\""))
            .nth(1)?
            .split('"')
            .next()
            .map(str::to_owned)
    };
    Ok(text
        .lines()
        .filter(|l| l.starts_with("updraft_api_requests_total{"))
        .filter_map(|l| {
            let count = l.split_whitespace().last()?.parse::<f64>().ok()? as u64;
            Some(((label(l, "method")?, label(l, "code")?), count))
        })
        .collect())
}

/// The requests made between two readings of [`api_requests`].
fn requests_between(
    before: &HashMap<(String, String), u64>,
    after: &HashMap<(String, String), u64>,
) -> Vec<((String, String), u64)> {
    let mut made: Vec<_> = after
        .iter()
        .map(|(key, n)| {
            (
                key.clone(),
                n.saturating_sub(before.get(key).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    made.sort();
    made
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Waits until no pod is bound to the bench node (checked once a second, for 10 minutes).
async fn wait_node_empty(client: &kube::Client) -> anyhow::Result<()> {
    let pods = Api::<Pod>::all(client.clone());
    let on_node = kube::api::ListParams::default().fields(&format!("spec.nodeName={NODE}"));
    for _ in 0..600 {
        let left = pods.list_metadata(&on_node).await?.items.len();
        if left == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    anyhow::bail!("pods bound to {NODE} were not deleted within 10 minutes")
}

/// Runs the benchmark and prints its results.
pub async fn run(layout: &Layout, bench: PodBench) -> anyhow::Result<()> {
    cluster::up(layout).await?;
    let updraft = build_updraft(true)?;
    let files = node_files(layout, NODE)?;
    let ca = CertificateAuthority::load(&layout.pki())?;
    let reader = ca.issue(&Identity::client(
        "updraft-bench-reader",
        &["system:masters"],
    ))?;
    let metrics_client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem().as_bytes())?)
        .identity(reqwest::Identity::from_pem(
            format!("{}{}", reader.cert_pem, reader.key_pem).as_bytes(),
        )?)
        .build()?;
    let capacity = files.dir.join("provider.yaml");
    std::fs::write(
        &capacity,
        format!("capacity:\n  pods: \"{}\"\n", bench.count + 10),
    )?;
    let extra: Vec<String> = [
        "--kubelet-port",
        &PORT.to_string(),
        "--pod-workers",
        "32",
        "--log-level",
        "warn",
        "--provider-config",
        &capacity.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let pid = start_node(layout, &updraft, NODE, &files, &extra)?;
    let client = cluster::admin_client(layout).await?;
    wait_node_ready(client.clone(), NODE).await?;
    // Pods of an earlier run that were still being deleted would be counted in this one.
    wait_node_empty(&client).await?;

    let namespace = format!("bench-{}", std::process::id());
    create_bench_namespace(&client, &namespace).await?;
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);

    let requests_before = api_requests(&metrics_client).await?;
    let (_, _, cpu_before) = process_usage(pid)?;
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut ready_at: HashMap<String, Instant> = HashMap::new();
    let mut events = watcher::watcher(pods.clone(), watcher::Config::default()).boxed();

    let started = Instant::now();
    let creator = {
        let (pods, created, count, rate) = (pods.clone(), created.clone(), bench.count, bench.rate);
        tokio::spawn(async move {
            let semaphore = Arc::new(tokio::sync::Semaphore::new(16));
            let interval = (rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(rate)));
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..count {
                if let Some(interval) = interval {
                    let due = started + interval.mul_f64(i as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                let Ok(permit) = semaphore.clone().acquire_owned().await else {
                    break;
                };
                let (pods, created) = (pods.clone(), created.clone());
                tasks.spawn(async move {
                    let name = format!("p{i}");
                    let pod: Pod = serde_json::from_value(serde_json::json!({
                        "metadata": {"name": name},
                        "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "busybox"}]}
                    }))
                    .unwrap_or_default();
                    let sent = Instant::now();
                    if pods.create(&PostParams::default(), &pod).await.is_ok() {
                        created.lock().unwrap_or_else(|e| e.into_inner()).insert(name, sent);
                    }
                    drop(permit);
                });
            }
            while tasks.join_next().await.is_some() {}
        })
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while ready_at.len() < bench.count && Instant::now() < deadline {
        let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(30), events.next()).await
        else {
            break;
        };
        if let Ok(Event::Apply(pod) | Event::InitApply(pod)) = event {
            let is_ready = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if let (true, Some(name)) = (is_ready, pod.metadata.name) {
                ready_at.entry(name).or_insert_with(Instant::now);
            }
        }
    }
    let _ = creator.await;
    let total = started.elapsed();
    let requests = requests_between(&requests_before, &api_requests(&metrics_client).await?);
    let is_write = |((method, _), _): &&((String, String), u64)| method != "GET";
    let accepted = |((_, code), _): &&((String, String), u64)| code.starts_with('2');
    let writes: u64 = requests
        .iter()
        .filter(is_write)
        .filter(accepted)
        .map(|(_, n)| n)
        .sum();
    let refused: u64 = requests
        .iter()
        .filter(is_write)
        .filter(|r| !accepted(r))
        .map(|(_, n)| n)
        .sum();
    let (peak_kib, rss_kib, cpu_after) = process_usage(pid)?;
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

    println!(
        "\n| pods | rate | all Ready | p50 created→Ready | p99 | peak RSS | CPU s | API writes/pod (refused) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {:.1} s | {} ms | {} ms | {:.1} MiB | {:.1} | {:.2} ({:.2}) |",
        ready_at.len(),
        if bench.rate == 0 {
            "burst".to_owned()
        } else {
            format!("{}/s", bench.rate)
        },
        total.as_secs_f64(),
        percentile(&latencies, 0.5).as_millis(),
        percentile(&latencies, 0.99).as_millis(),
        peak_kib as f64 / 1024.0,
        cpu_after - cpu_before,
        writes as f64 / bench.count.max(1) as f64,
        refused as f64 / bench.count.max(1) as f64,
    );
    let breakdown: Vec<String> = requests
        .iter()
        .map(|((method, code), n)| format!("{method} {code}: {n}"))
        .collect();
    println!("API requests by method and code: {}", breakdown.join(", "));
    println!(
        "Updraft RSS with every pod Ready: {:.1} MiB",
        rss_kib as f64 / 1024.0
    );
    if ready_at.len() < bench.count {
        println!(
            "only {} of {} pods became Ready",
            ready_at.len(),
            bench.count
        );
    }

    Api::<Namespace>::all(client.clone())
        .delete(&namespace, &DeleteParams::background())
        .await?;
    // The node deletes the pods from its provider and then from the API: keep it running
    // until it has, so no run leaves work behind for the next.
    wait_node_empty(&client).await?;
    cluster::down_extra(layout, NODE)?;
    Ok(())
}
