//! Updraft's own Prometheus metrics, served at `/metrics` on the kubelet port.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Labels of an API request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The HTTP method (GET, POST, PATCH, PUT, DELETE).
    pub method: String,
}

/// The metrics registry and the handles the code updates.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Requests Updraft made to the API server, by method.
    pub api_requests: Family<RequestLabels, Counter>,
    /// The pod controller's metrics (pods by phase, reconcile latency, provider errors).
    pub pods: updraft_node::PodMetrics,
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("updraft");
        let api_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "Requests made to the Kubernetes API server, by HTTP method",
            api_requests.clone(),
        );
        let pods = updraft_node::PodMetrics::default();
        pods.register(&mut registry);
        Self {
            registry: Arc::new(registry),
            api_requests,
            pods,
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }

    /// A tower layer for the kube client that counts each request.
    pub fn count_requests<B>(
        &self,
    ) -> impl Fn(http::Request<B>) -> http::Request<B> + Clone + use<B> {
        let family = self.api_requests.clone();
        move |request: http::Request<B>| {
            family
                .get_or_create(&RequestLabels {
                    method: request.method().to_string(),
                })
                .inc();
            request
        }
    }
}
