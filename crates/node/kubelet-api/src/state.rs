//! What every endpoint of the kubelet API sees and the checks they share: the provider and
//! the node's identity ([`KubeletState`]), the tuning ([`KubeletOptions`]), where a pod is
//! looked up ([`PodLookup`]) and the one check every per-pod endpoint makes first
//! ([`bound_pod`]: a pod of another node is 404).
//!
//! The router (`routes`) and the endpoint modules beside it (`stats`, `portforward`) all
//! import this module and it imports none of them: no import loop between them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use updraft_node::PodCache;
use updraft_provider::{PodRef, Provider, ProviderError};

use crate::streaming::StreamingConfig;

/// Renders the node's own metrics (`/metrics`) in the Prometheus text format.
pub type MetricsEncoder = Arc<dyn Fn() -> String + Send + Sync>;

/// What the endpoints need: the provider, the API client and the node's identity.
#[derive(Clone)]
pub struct KubeletState {
    /// The provider that runs this node's pods.
    pub provider: Arc<dyn Provider>,
    /// A client of the API server, under the node's identity.
    pub client: kube::Client,
    /// The node's name: only pods bound to it are served.
    pub node_name: String,
    /// Renders `/metrics`.
    pub metrics: MetricsEncoder,
}

/// Where the endpoints find the pods bound to this node.
#[derive(Clone, Default)]
pub enum PodLookup {
    /// The node's own watch cache (`VirtualNode::pods`): no API request per lookup, so a
    /// burst of exec or port-forward sessions costs the API server nothing.
    Cache(PodCache),
    /// A `GET` of the pod (a `LIST` for `/pods`) from the API server per request, for
    /// callers without the node's cache.
    #[default]
    ApiServer,
}

/// How long a lookup waits for the node's pod cache to finish its first list (at start-up)
/// before answering 503.
const CACHE_SYNC_WAIT: Duration = Duration::from_secs(10);

/// What the endpoints can be tuned with; `Default` is the kubelet's timeouts with pods looked
/// up from the API server, the node's stats clock started when the options are made.
#[derive(Clone)]
pub struct KubeletOptions {
    /// Where pods are looked up.
    pub pods: PodLookup,
    /// Idle and stream-creation timeouts of exec, attach and port-forward.
    pub streaming: StreamingConfig,
    /// When this node began collecting stats: the node's `startTime` in `/stats/summary`.
    /// Set by whoever builds the server (the kubelet reports its own start the same way), so
    /// that it is the time the node started rather than the first scrape.
    pub stats_started: SystemTime,
}

impl Default for KubeletOptions {
    fn default() -> Self {
        Self {
            pods: PodLookup::default(),
            streaming: StreamingConfig::default(),
            stats_started: SystemTime::now(),
        }
    }
}

/// The state every endpoint sees.
#[derive(Clone)]
pub(crate) struct Endpoints {
    pub(crate) state: KubeletState,
    pub(crate) options: KubeletOptions,
}

/// The HTTP answer to a provider error: status code by kind, the error and its causes as body.
pub fn provider_error(err: &ProviderError) -> Response {
    let status = match err {
        ProviderError::NotFound { .. } => StatusCode::NOT_FOUND,
        ProviderError::InvalidInput { .. } => StatusCode::BAD_REQUEST,
        ProviderError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
        ProviderError::Transient { .. } => StatusCode::SERVICE_UNAVAILABLE,
        ProviderError::Permanent { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, format!("{}\n", updraft_common::error_chain(err))).into_response()
}

/// Waits (briefly) for the node's pod cache to have listed the pods: until then it would
/// call every pod missing.
pub(crate) async fn cache_synced(cache: &PodCache) -> Result<(), Response> {
    match tokio::time::timeout(CACHE_SYNC_WAIT, cache.listed()).await {
        Ok(true) => Ok(()),
        Ok(false) | Err(_) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            "the node has not listed its pods yet (it is starting or cannot reach the API \
             server); retry shortly\n",
        )
            .into_response()),
    }
}

/// Finds a pod bound to this node; anything else is 404, so a node never serves another
/// node's pods.
pub(crate) async fn bound_pod(
    endpoints: &Endpoints,
    namespace: &str,
    name: &str,
) -> Result<PodRef, Response> {
    let node_name = endpoints.state.node_name.as_str();
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            format!("pod {namespace}/{name} is not on node {node_name}\n"),
        )
            .into_response()
    };
    let on_this_node =
        |pod: &Pod| pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node_name);
    match &endpoints.options.pods {
        PodLookup::Cache(cache) => {
            cache_synced(cache).await?;
            // The cache holds only the pods bound to this node (its watch selects them).
            match cache.get(namespace, name) {
                Some(pod) => Ok(pod.pod_ref()),
                None => Err(not_found()),
            }
        }
        PodLookup::ApiServer => {
            match Api::<Pod>::namespaced(endpoints.state.client.clone(), namespace)
                .get_opt(name)
                .await
            {
                Ok(Some(pod)) if on_this_node(&pod) => Ok(PodRef::of(&pod)),
                Ok(_) | Err(kube::Error::Api(_)) => Err(not_found()),
                Err(err) => Err((
                    StatusCode::BAD_GATEWAY,
                    format!("reading pod {namespace}/{name}: {err}\n"),
                )
                    .into_response()),
            }
        }
    }
}
