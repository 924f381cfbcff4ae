//! Updraft's own Prometheus metrics, served at `/metrics` on the kubelet port.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Labels of an API request, like client-go's `rest_client_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The HTTP method (GET, POST, PATCH, PUT, DELETE).
    pub method: String,
    /// The response's status code, or `<error>` when no response came (connection failed).
    pub code: String,
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
    /// A registry with every metric registered, plus what `extra` registers (a provider's,
    /// the kubelet API's session counters).
    pub fn with_extra(extra: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::with_prefix("updraft");
        extra(&mut registry);
        let api_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "Requests made to the Kubernetes API server, by HTTP method and response code",
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

    /// A tower layer for the kube client that counts each request when its response (or its
    /// failure) arrives.
    pub fn count_requests(&self) -> CountRequests {
        CountRequests {
            family: self.api_requests.clone(),
        }
    }
}

/// Counts the requests of the service it wraps, by method and response code.
#[derive(Clone)]
pub struct CountRequests {
    family: Family<RequestLabels, Counter>,
}

impl<S> tower::Layer<S> for CountRequests {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Counted {
            inner,
            family: self.family.clone(),
        }
    }
}

/// A service whose requests are counted; see [`CountRequests`].
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    family: Family<RequestLabels, Counter>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.method().to_string();
        let family = self.family.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let result = response.await;
            let code = match &result {
                Ok(response) => response.status().as_u16().to_string(),
                Err(_) => "<error>".to_owned(),
            };
            family.get_or_create(&RequestLabels { method, code }).inc();
            result
        })
    }
}
