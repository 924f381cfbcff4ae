//! Prometheus metrics of the pod controller: pods by phase, reconcile latency, provider
//! call errors.
//!
//! Pods by phase are derived at scrape time from the controller's pod cache (nothing is
//! counted twice or forgotten when a pod goes away); the rest are updated as work happens.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::cache::PodCache;

/// Labels of a provider call that failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderErrorLabels {
    /// The call: `create`, `update`, `delete`, `status`, `list`.
    pub operation: String,
    /// The error's kind: `not_found`, `invalid_input`, `transient`, `permanent`,
    /// `unsupported`.
    pub kind: String,
}

/// Labels of one reconciliation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// `ok` or `error`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

/// The pod controller's metrics. Cheap to clone (handles share the same values); a value
/// that is never registered simply counts into nothing.
#[derive(Clone, Debug)]
pub struct PodMetrics {
    reconcile_duration: Family<ReconcileLabels, Histogram>,
    provider_errors: Family<ProviderErrorLabels, Counter>,
    pods: Arc<PodsByPhase>,
}

impl Default for PodMetrics {
    fn default() -> Self {
        Self {
            // 1 ms … ~16 s.
            reconcile_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 15))
            }),
            provider_errors: Family::default(),
            pods: Arc::new(PodsByPhase::default()),
        }
    }
}

impl PodMetrics {
    /// Registers every metric in `registry` (names get the registry's prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "pod_reconcile_duration_seconds",
            "Time one reconciliation of a pod took, by result",
            self.reconcile_duration.clone(),
        );
        registry.register(
            "provider_errors",
            "Provider calls that failed, by operation and error kind",
            self.provider_errors.clone(),
        );
        registry.register_collector(Box::new(self.pods.clone()));
    }

    /// Records one reconciliation.
    pub fn observe_reconcile(&self, duration: Duration, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reconcile_duration
            .get_or_create(&ReconcileLabels {
                result: result.into(),
            })
            .observe(duration.as_secs_f64());
    }

    /// Counts a failed provider call.
    pub fn provider_error(&self, operation: &str, error: &updraft_provider::ProviderError) {
        use updraft_provider::ProviderError as E;
        let kind = match error {
            E::NotFound { .. } => "not_found",
            E::InvalidInput { .. } => "invalid_input",
            E::Transient { .. } => "transient",
            E::Permanent { .. } => "permanent",
            E::Unsupported(_) => "unsupported",
        };
        self.provider_errors
            .get_or_create(&ProviderErrorLabels {
                operation: operation.into(),
                kind: kind.into(),
            })
            .inc();
    }

    /// Reports pods by phase from `store` (the pod controller's cache) from now on.
    pub(crate) fn observe_pods(&self, store: PodCache) {
        // Only the first controller's cache counts; a second one on the same metrics would be
        // a wiring mistake, and ignoring it keeps the numbers of the first.
        let _ = self.pods.store.set(store);
    }

    /// The number of pods in each phase, as the scrape reports them.
    pub fn pods_by_phase(&self) -> BTreeMap<String, i64> {
        self.pods.count()
    }
}

/// Counts the cached pods by phase on each scrape.
#[derive(Debug, Default)]
struct PodsByPhase {
    store: OnceLock<PodCache>,
}

impl PodsByPhase {
    fn count(&self) -> BTreeMap<String, i64> {
        let mut counts = BTreeMap::new();
        for phase in ["Pending", "Running", "Succeeded", "Failed", "Unknown"] {
            counts.insert(phase.to_owned(), 0);
        }
        if let Some(store) = self.store.get() {
            for pod in store.all() {
                let phase = pod.phase().unwrap_or("Pending").to_owned();
                *counts.entry(phase).or_insert(0) += 1;
            }
        }
        counts
    }
}

impl Collector for PodsByPhase {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "pods",
            "Pods bound to this node, by phase",
            None,
            MetricType::Gauge,
        )?;
        for (phase, count) in self.count() {
            let labels = PhaseLabels { phase };
            ConstGauge::new(count).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CachedPod;
    use k8s_openapi::api::core::v1::Pod;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher;

    fn pod(name: &str, phase: Option<&str>) -> CachedPod {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.namespace = Some("default".into());
        pod.status = phase.map(|p| k8s_openapi::api::core::v1::PodStatus {
            phase: Some(p.into()),
            ..Default::default()
        });
        CachedPod::new(pod)
    }

    fn encode(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    #[test]
    fn scrape_reports_pods_by_phase_errors_and_latency() {
        let metrics = PodMetrics::default();
        let mut registry = Registry::with_prefix("updraft");
        metrics.register(&mut registry);

        let mut writer = Writer::<CachedPod>::default();
        for event in [
            watcher::Event::Apply(pod("a", Some("Running"))),
            watcher::Event::Apply(pod("b", Some("Running"))),
            watcher::Event::Apply(pod("c", None)),
            watcher::Event::Apply(pod("d", Some("Succeeded"))),
        ] {
            writer.apply_watcher_event(&event);
        }
        let (_listed, is_listed) = tokio::sync::watch::channel(true);
        metrics.observe_pods(PodCache::new(writer.as_reader(), is_listed));
        metrics.observe_reconcile(Duration::from_millis(3), true);
        metrics.provider_error(
            "create",
            &updraft_provider::ProviderError::transient("busy"),
        );

        let text = encode(&registry);
        assert!(
            text.contains(r#"updraft_pods{phase="Running"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"updraft_pods{phase="Pending"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"updraft_pods{phase="Failed"} 0"#), "{text}");
        assert!(
            text.contains(
                r#"updraft_provider_errors_total{operation="create",kind="transient"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"updraft_pod_reconcile_duration_seconds_count{result="ok"} 1"#),
            "{text}"
        );

        // A pod that goes away is no longer counted.
        writer.apply_watcher_event(&watcher::Event::Delete(pod("a", Some("Running"))));
        assert_eq!(metrics.pods_by_phase().get("Running"), Some(&1));
    }
}
