//! `/stats/summary` and `/metrics/resource`: the node's and its pods' CPU and memory, for
//! metrics-server (`kubectl top`), the HPA and monitoring.
//!
//! Both are rendered from one sample of the provider's [`ProviderStats`]. The node's numbers
//! are the sum of its pods': a virtual node has no machine of its own to measure.
//!
//! - `/stats/summary` is the kubelet's `stats/v1alpha1` `Summary` (the subset a provider can
//!   fill: CPU and memory of the node, the pods and their containers), JSON in camelCase.
//! - `/metrics/resource` is the Prometheus text format the kubelet's resource-metrics
//!   collector writes and metrics-server reads: cumulative CPU seconds and working-set bytes
//!   of the node, each container and each pod, each sample with its timestamp in
//!   milliseconds, and `resource_scrape_error`. It is written by hand because per-sample
//!   timestamps are something the Prometheus client crates do not encode.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};
use updraft_provider::{Provider, ProviderError};

use crate::state::{Endpoints, provider_error};

/// The kubelet's `stats/v1alpha1` `Summary`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// The node as a whole.
    pub node: NodeStats,
    /// Every pod with stats.
    pub pods: Vec<PodStats>,
}

/// Node-level stats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStats {
    /// The node's name.
    pub node_name: String,
    /// When collection of node stats began.
    pub start_time: Time,
    /// CPU of the whole node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuStats>,
    /// Memory of the whole node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStats>,
}

/// Pod-level stats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStats {
    /// Which pod.
    pub pod_ref: PodReference,
    /// When the pod started.
    pub start_time: Time,
    /// Its containers.
    pub containers: Vec<ContainerStats>,
    /// CPU of the whole pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuStats>,
    /// Memory of the whole pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStats>,
}

/// Identifies a pod in the summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodReference {
    /// The pod's name.
    pub name: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's UID.
    pub uid: String,
}

/// Container-level stats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStats {
    /// The container's name.
    pub name: String,
    /// When this instance of the container started.
    pub start_time: Time,
    /// Its CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<CpuStats>,
    /// Its memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryStats>,
}

/// CPU usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CpuStats {
    /// When sampled.
    pub time: Time,
    /// Current usage in billionths of a core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_nano_cores: Option<u64>,
    /// Cumulative usage, core-nanoseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_core_nano_seconds: Option<u64>,
}

/// Memory usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryStats {
    /// When sampled.
    pub time: Time,
    /// All memory in use, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_bytes: Option<u64>,
    /// The working set, bytes (what `kubectl top` shows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_set_bytes: Option<u64>,
}

fn time(at: SystemTime) -> Time {
    Time(
        k8s_openapi::jiff::Timestamp::try_from(at)
            .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
}

/// The summary of `pods` on node `node_name`, sampled at `now`; the node's numbers are the
/// sums of its pods'.
pub fn summary(
    node_name: &str,
    pods: &[updraft_provider::PodStats],
    node_started: SystemTime,
    now: SystemTime,
) -> Summary {
    let pods: Vec<PodStats> = pods
        .iter()
        .map(|pod| {
            let at = time(pod.time);
            PodStats {
                pod_ref: PodReference {
                    name: pod.pod.name.clone(),
                    namespace: pod.pod.namespace.clone(),
                    uid: pod.pod.uid.clone(),
                },
                start_time: time(pod.start_time),
                containers: pod
                    .containers
                    .iter()
                    .map(|c| ContainerStats {
                        name: c.name.clone(),
                        start_time: time(c.start_time),
                        cpu: Some(CpuStats {
                            time: at.clone(),
                            usage_nano_cores: c.cpu_usage_nano_cores,
                            usage_core_nano_seconds: Some(c.cpu_usage_core_nanoseconds),
                        }),
                        memory: Some(MemoryStats {
                            time: at.clone(),
                            usage_bytes: c.memory_usage_bytes,
                            working_set_bytes: Some(c.memory_working_set_bytes),
                        }),
                    })
                    .collect(),
                cpu: Some(CpuStats {
                    time: at.clone(),
                    usage_nano_cores: pod.cpu_usage_nano_cores,
                    usage_core_nano_seconds: Some(pod.cpu_usage_core_nanoseconds),
                }),
                memory: Some(MemoryStats {
                    time: at,
                    usage_bytes: None,
                    working_set_bytes: Some(pod.memory_working_set_bytes),
                }),
            }
        })
        .collect();
    let sum = |f: &dyn Fn(&PodStats) -> Option<u64>| -> u64 { pods.iter().filter_map(f).sum() };
    let cpu_total = sum(&|p| p.cpu.as_ref()?.usage_core_nano_seconds);
    let nano_cores = sum(&|p| p.cpu.as_ref()?.usage_nano_cores);
    let working_set = sum(&|p| p.memory.as_ref()?.working_set_bytes);
    let at = time(now);
    Summary {
        node: NodeStats {
            node_name: node_name.to_owned(),
            start_time: time(node_started),
            cpu: Some(CpuStats {
                time: at.clone(),
                usage_nano_cores: Some(nano_cores),
                usage_core_nano_seconds: Some(cpu_total),
            }),
            memory: Some(MemoryStats {
                time: at,
                usage_bytes: None,
                working_set_bytes: Some(working_set),
            }),
        },
        pods,
    }
}

/// Milliseconds since the epoch, the Prometheus text format's timestamp.
fn millis(time: &Time) -> i64 {
    time.0.as_millisecond()
}

fn seconds(nanoseconds: u64) -> f64 {
    Duration::from_nanos(nanoseconds).as_secs_f64()
}

/// A label value with `\`, `"` and newlines escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `summary` as `/metrics/resource` (Prometheus text format 0.0.4); `scrape_failed` sets
/// `resource_scrape_error` (and then `summary` is empty).
pub fn resource_metrics(summary: Option<&Summary>) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[String]| {
        let _ = writeln!(out, "# HELP {name} [STABLE] {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for sample in samples {
            out.push_str(sample);
            out.push('\n');
        }
    };
    let empty = Vec::new();
    let pods = summary.map_or(&empty, |s| &s.pods);
    let cpu_sample = |labels: &str, cpu: Option<&CpuStats>| {
        let cpu = cpu?;
        let total = cpu.usage_core_nano_seconds?;
        Some(format!("{labels} {} {}", seconds(total), millis(&cpu.time)))
    };
    let memory_sample = |labels: &str, memory: Option<&MemoryStats>| {
        let memory = memory?;
        let bytes = memory.working_set_bytes?;
        Some(format!("{labels} {bytes} {}", millis(&memory.time)))
    };
    let container_labels = |metric: &str, pod: &PodStats, container: &ContainerStats| {
        format!(
            "{metric}{{container=\"{}\",namespace=\"{}\",pod=\"{}\"}}",
            label(&container.name),
            label(&pod.pod_ref.namespace),
            label(&pod.pod_ref.name)
        )
    };
    let pod_labels = |metric: &str, pod: &PodStats| {
        format!(
            "{metric}{{namespace=\"{}\",pod=\"{}\"}}",
            label(&pod.pod_ref.namespace),
            label(&pod.pod_ref.name)
        )
    };
    let containers = || {
        pods.iter()
            .flat_map(|p| p.containers.iter().map(move |c| (p, c)))
    };

    let name = "container_cpu_usage_seconds_total";
    let samples: Vec<String> = containers()
        .filter_map(|(p, c)| cpu_sample(&container_labels(name, p, c), c.cpu.as_ref()))
        .collect();
    family(
        name,
        "counter",
        "Cumulative cpu time consumed by the container in core-seconds",
        &samples,
    );

    let name = "container_memory_working_set_bytes";
    let samples: Vec<String> = containers()
        .filter_map(|(p, c)| memory_sample(&container_labels(name, p, c), c.memory.as_ref()))
        .collect();
    family(
        name,
        "gauge",
        "Current working set of the container in bytes",
        &samples,
    );

    let name = "container_start_time_seconds";
    let samples: Vec<String> = containers()
        .map(|(p, c)| {
            let started = c.start_time.0.as_millisecond() as f64 / 1000.0;
            format!("{} {started}", container_labels(name, p, c))
        })
        .collect();
    family(
        name,
        "gauge",
        "Start time of the container since unix epoch in seconds",
        &samples,
    );

    let node = summary.map(|s| &s.node);
    let name = "node_cpu_usage_seconds_total";
    let samples: Vec<String> = node
        .and_then(|n| cpu_sample(name, n.cpu.as_ref()))
        .into_iter()
        .collect();
    family(
        name,
        "counter",
        "Cumulative cpu time consumed by the node in core-seconds",
        &samples,
    );

    let name = "node_memory_working_set_bytes";
    let samples: Vec<String> = node
        .and_then(|n| memory_sample(name, n.memory.as_ref()))
        .into_iter()
        .collect();
    family(
        name,
        "gauge",
        "Current working set of the node in bytes",
        &samples,
    );

    let name = "pod_cpu_usage_seconds_total";
    let samples: Vec<String> = pods
        .iter()
        .filter_map(|p| cpu_sample(&pod_labels(name, p), p.cpu.as_ref()))
        .collect();
    family(
        name,
        "counter",
        "Cumulative cpu time consumed by the pod in core-seconds",
        &samples,
    );

    let name = "pod_memory_working_set_bytes";
    let samples: Vec<String> = pods
        .iter()
        .filter_map(|p| memory_sample(&pod_labels(name, p), p.memory.as_ref()))
        .collect();
    family(
        name,
        "gauge",
        "Current working set of the pod in bytes",
        &samples,
    );

    let failed = u8::from(summary.is_none());
    family(
        "resource_scrape_error",
        "gauge",
        "1 if there was an error while getting container metrics, 0 otherwise",
        &[format!("resource_scrape_error {failed}")],
    );
    out
}

/// One sample of the provider's stats as a summary.
async fn sample(endpoints: &Endpoints) -> Result<Summary, ProviderError> {
    let provider: &dyn Provider = endpoints.state.provider.as_ref();
    let Some(stats) = provider.stats() else {
        return Err(ProviderError::Unsupported("resource usage (stats)"));
    };
    let pods = stats.pod_stats().await?;
    Ok(summary(
        &endpoints.state.node_name,
        &pods,
        endpoints.options.stats_started,
        SystemTime::now(),
    ))
}

/// `GET /stats/summary`.
pub(crate) async fn stats_summary(State(endpoints): State<Endpoints>) -> Response {
    match sample(&endpoints).await {
        Ok(summary) => axum::Json(summary).into_response(),
        Err(err) => provider_error(&err),
    }
}

/// `GET /metrics/resource`.
pub(crate) async fn metrics_resource(State(endpoints): State<Endpoints>) -> Response {
    let summary = match sample(&endpoints).await {
        Ok(summary) => Some(summary),
        Err(ProviderError::Unsupported(what)) => {
            return provider_error(&ProviderError::Unsupported(what));
        }
        Err(err) => {
            tracing::warn!("sampling resource usage for /metrics/resource: {err}");
            None
        }
    };
    let mut response = (StatusCode::OK, resource_metrics(summary.as_ref())).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use updraft_provider::PodRef;

    use super::*;

    fn sample_pods(at: SystemTime) -> Vec<updraft_provider::PodStats> {
        vec![updraft_provider::PodStats {
            pod: PodRef {
                namespace: "ns".into(),
                name: "web".into(),
                uid: "u1".into(),
            },
            start_time: at - Duration::from_secs(60),
            time: at,
            cpu_usage_core_nanoseconds: 3_000_000_000,
            cpu_usage_nano_cores: Some(50_000_000),
            memory_working_set_bytes: 64 << 20,
            containers: vec![updraft_provider::ContainerStats {
                name: "main".into(),
                start_time: at - Duration::from_secs(30),
                cpu_usage_core_nanoseconds: 2_500_000_000,
                cpu_usage_nano_cores: Some(50_000_000),
                memory_working_set_bytes: 60 << 20,
                memory_usage_bytes: Some(70 << 20),
            }],
        }]
    }

    #[test]
    fn the_summary_has_the_kubelets_field_names() {
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let summary = summary("n1", &sample_pods(at), at - Duration::from_secs(600), at);
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["node"]["nodeName"], "n1");
        assert_eq!(
            json["node"]["cpu"]["usageCoreNanoSeconds"],
            3_000_000_000u64
        );
        assert_eq!(json["node"]["memory"]["workingSetBytes"], 64u64 << 20);
        let pod = &json["pods"][0];
        assert_eq!(
            pod["podRef"],
            serde_json::json!({"name": "web", "namespace": "ns", "uid": "u1"})
        );
        assert_eq!(pod["containers"][0]["name"], "main");
        assert_eq!(pod["containers"][0]["cpu"]["usageNanoCores"], 50_000_000u64);
        assert_eq!(pod["containers"][0]["memory"]["usageBytes"], 70u64 << 20);
        assert_eq!(pod["cpu"]["time"], "2027-01-15T08:00:00Z");
        let back: Summary = serde_json::from_value(json).unwrap();
        assert_eq!(back, summary);
    }

    #[test]
    fn resource_metrics_are_timestamped_samples_with_the_kubelets_labels() {
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let text = resource_metrics(Some(&summary("n1", &sample_pods(at), at, at)));
        let ms = 1_800_000_000_000u64;
        for line in [
            format!("container_cpu_usage_seconds_total{{container=\"main\",namespace=\"ns\",pod=\"web\"}} 2.5 {ms}"),
            format!("container_memory_working_set_bytes{{container=\"main\",namespace=\"ns\",pod=\"web\"}} 62914560 {ms}"),
            "container_start_time_seconds{container=\"main\",namespace=\"ns\",pod=\"web\"} 1799999970".to_owned(),
            format!("node_cpu_usage_seconds_total 3 {ms}"),
            format!("node_memory_working_set_bytes 67108864 {ms}"),
            format!("pod_cpu_usage_seconds_total{{namespace=\"ns\",pod=\"web\"}} 3 {ms}"),
            format!("pod_memory_working_set_bytes{{namespace=\"ns\",pod=\"web\"}} 67108864 {ms}"),
            "# TYPE container_cpu_usage_seconds_total counter".to_owned(),
            "resource_scrape_error 0".to_owned(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        let failed = resource_metrics(None);
        assert!(
            failed.lines().any(|l| l == "resource_scrape_error 1"),
            "{failed}"
        );
        assert!(
            !failed
                .lines()
                .any(|l| l.starts_with("node_cpu_usage_seconds_total")),
            "{failed}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
