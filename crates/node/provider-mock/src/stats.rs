//! Resource usage of mock pods, for `/stats/summary`, `/metrics/resource` and `kubectl top`.
//!
//! Mock containers run nothing, so their usage is derived, predictably: every running
//! container uses exactly its CPU request (1m without one) and its memory request as working
//! set (16 MiB without one). CPU time accumulates at that rate from the container's start.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Container, ContainerStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use updraft_common::quantity::Quantity;
use updraft_provider::{ContainerStats, PodStats, ProviderStats, Result};

use crate::{MockPod, MockProvider};

/// CPU of a container without a request: one millicore, in nanocores.
const DEFAULT_NANO_CORES: u64 = 1_000_000;
/// Working set of a container without a memory request.
const DEFAULT_WORKING_SET: u64 = 16 * 1024 * 1024;

#[async_trait::async_trait]
impl ProviderStats for MockProvider {
    async fn pod_stats(&self) -> Result<Vec<PodStats>> {
        let now = SystemTime::now();
        let state = self.lock();
        Ok(state
            .pods
            .values()
            .filter_map(|pod| pod_stats(pod, now))
            .collect())
    }
}

fn pod_stats(pod: &MockPod, now: SystemTime) -> Option<PodStats> {
    if pod.status.phase.as_deref() != Some("Running") {
        return None;
    }
    let start_time = pod.status.start_time.as_ref().map_or(now, system_time);
    let slim = pod.slim_pod();
    let specs = slim.spec.as_ref().map(|s| s.containers.as_slice())?;
    let containers: Vec<ContainerStats> = pod
        .status
        .container_statuses
        .iter()
        .flatten()
        .filter_map(|status| {
            let spec = specs.iter().find(|c| c.name == status.name)?;
            container_stats(spec, status, now)
        })
        .collect();
    Some(PodStats {
        pod: pod.pod.clone(),
        start_time,
        time: now,
        cpu_usage_core_nanoseconds: containers
            .iter()
            .map(|c| c.cpu_usage_core_nanoseconds)
            .sum(),
        cpu_usage_nano_cores: Some(
            containers
                .iter()
                .filter_map(|c| c.cpu_usage_nano_cores)
                .sum(),
        ),
        memory_working_set_bytes: containers.iter().map(|c| c.memory_working_set_bytes).sum(),
        containers,
    })
}

fn container_stats(
    spec: &Container,
    status: &ContainerStatus,
    now: SystemTime,
) -> Option<ContainerStats> {
    let started = status
        .state
        .as_ref()?
        .running
        .as_ref()?
        .started_at
        .as_ref()?;
    let start_time = system_time(started);
    let request = |name: &str| {
        spec.resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get(name))
            // Not a quantity: the mock uses its default.
            .and_then(|q| Quantity::parse(&q.0).ok())
    };
    // A CPU quantity's billionths are its nano-cores.
    let nano_cores = request("cpu")
        .and_then(|cpu| u64::try_from(cpu.nanos()).ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_NANO_CORES);
    let working_set = request("memory")
        .and_then(|memory| u64::try_from(memory.to_units()).ok())
        .filter(|b| *b > 0)
        .unwrap_or(DEFAULT_WORKING_SET);
    let running_for = now.duration_since(start_time).unwrap_or(Duration::ZERO);
    // At least one nanosecond: consumers such as metrics-server drop containers whose
    // cumulative CPU is zero, and a container that just started has used some.
    let cpu = (u128::from(nano_cores) * running_for.as_nanos() / 1_000_000_000).max(1);
    Some(ContainerStats {
        name: status.name.clone(),
        start_time,
        cpu_usage_core_nanoseconds: u64::try_from(cpu).unwrap_or(u64::MAX),
        cpu_usage_nano_cores: Some(nano_cores),
        memory_working_set_bytes: working_set,
        memory_usage_bytes: Some(working_set),
    })
}

fn system_time(time: &Time) -> SystemTime {
    let seconds = u64::try_from(time.0.as_second()).unwrap_or(0);
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds)
}

#[cfg(test)]
mod tests {
    use updraft_provider::{PodRef, Provider as _, ResolvedPod};

    use super::*;
    use crate::MockConfig;

    #[tokio::test]
    async fn running_containers_use_their_requests() {
        let mock = MockProvider::new(MockConfig::default());
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "p", "uid": "u1"},
            "spec": {"containers": [
                {"name": "a", "image": "busybox", "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}},
                {"name": "b", "image": "busybox"}
            ]}
        }))
        .unwrap();
        mock.create_pod(&ResolvedPod::unresolved(pod.clone()))
            .await
            .unwrap();
        let stats = mock.pod_stats().await.unwrap();
        assert_eq!(stats.len(), 1);
        let pod_stats = &stats[0];
        assert_eq!(pod_stats.pod, PodRef::of(&pod));
        let by_name = |n: &str| pod_stats.containers.iter().find(|c| c.name == n).unwrap();
        assert_eq!(by_name("a").cpu_usage_nano_cores, Some(250_000_000));
        assert_eq!(by_name("a").memory_working_set_bytes, 64 * 1024 * 1024);
        assert_eq!(by_name("b").cpu_usage_nano_cores, Some(DEFAULT_NANO_CORES));
        assert_eq!(
            pod_stats.memory_working_set_bytes,
            64 * 1024 * 1024 + DEFAULT_WORKING_SET
        );
        assert!(
            pod_stats
                .containers
                .iter()
                .all(|c| c.cpu_usage_core_nanoseconds > 0)
        );
    }
}
