//! The kubelet API's endpoints: `/healthz`, `/metrics`, `/pods`, `/runningpods/`,
//! `/containerLogs`, `/exec`, `/attach`, `/portForward`, `/stats/summary`, `/metrics/resource`.
//!
//! Every per-pod endpoint first checks that the pod is bound to this node ([`bound_pod`]); a
//! pod of another node is 404, so a node never serves another node's pods. With the node's
//! pod cache ([`PodLookup::Cache`]) that check costs no API request.

use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, ObjectList};
use serde::Deserialize;
use tokio::io::AsyncReadExt as _;
use updraft_provider::{ExecRequest, LogOptions, ProviderError};

use crate::remotecommand::{self, Kind, Options};
use crate::state::{Endpoints, bound_pod, cache_synced};
pub use crate::state::{KubeletOptions, KubeletState, MetricsEncoder, PodLookup, provider_error};

/// The kubelet API router with the default [`KubeletOptions`] (not yet wrapped with
/// authentication: see [`crate::server::protect`]).
pub fn routes(state: KubeletState) -> Router {
    routes_with(state, KubeletOptions::default())
}

/// The kubelet API router (not yet wrapped with authentication: see
/// [`crate::server::protect`]).
pub fn routes_with(state: KubeletState, options: KubeletOptions) -> Router {
    let endpoints = Endpoints { state, options };
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|State(endpoints): State<Endpoints>| async move { (endpoints.state.metrics)() }),
        )
        .route("/pods", get(pods))
        .route("/runningpods/", get(running_pods))
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .route("/exec/{namespace}/{pod}/{container}", any(exec))
        .route("/attach/{namespace}/{pod}/{container}", any(attach))
        .route(
            "/portForward/{namespace}/{pod}",
            any(crate::portforward::handler),
        )
        .route("/stats/summary", get(crate::stats::stats_summary))
        .route("/metrics/resource", get(crate::stats::metrics_resource))
        .with_state(endpoints)
}

/// The pods bound to this node (from the node's cache when it has one).
async fn pods(State(endpoints): State<Endpoints>) -> Response {
    let state = &endpoints.state;
    if let PodLookup::Cache(cache) = &endpoints.options.pods {
        if let Err(response) = cache_synced(cache).await {
            return response;
        }
        let mut items: Vec<Pod> = cache.all().iter().map(|pod| pod.pod()).collect();
        items.sort_by(|a, b| {
            (&a.metadata.namespace, &a.metadata.name)
                .cmp(&(&b.metadata.namespace, &b.metadata.name))
        });
        let list = ObjectList::<Pod> {
            types: Default::default(),
            metadata: Default::default(),
            items,
        };
        return axum::Json(list).into_response();
    }
    let params = ListParams::default().fields(&format!("spec.nodeName={}", state.node_name));
    match Api::<Pod>::all(state.client.clone()).list(&params).await {
        Ok(list) => axum::Json(list).into_response(),
        Err(err) => (StatusCode::BAD_GATEWAY, format!("listing pods: {err}\n")).into_response(),
    }
}

/// The pods the provider runs.
async fn running_pods(State(endpoints): State<Endpoints>) -> Response {
    match endpoints.state.provider.list_pods().await {
        Ok(running) => {
            let items: Vec<Pod> = running
                .into_iter()
                .filter_map(|p| {
                    serde_json::from_value(serde_json::json!({
                        "metadata": {"namespace": p.pod.namespace, "name": p.pod.name, "uid": p.pod.uid},
                        "status": p.status
                    }))
                    .ok()
                })
                .collect();
            let list = ObjectList::<Pod> {
                types: Default::default(),
                metadata: Default::default(),
                items,
            };
            axum::Json(list).into_response()
        }
        Err(err) => provider_error(&err),
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    #[serde(default)]
    follow: Option<String>,
    tail_lines: Option<u64>,
    limit_bytes: Option<u64>,
    #[serde(default)]
    timestamps: Option<String>,
    since_seconds: Option<u64>,
    since_time: Option<String>,
    #[serde(default)]
    previous: Option<String>,
}

/// A boolean query parameter as the kubelet reads them (`true`/`1`).
pub(crate) fn flag(value: &Option<String>) -> bool {
    value.as_deref().is_some_and(|v| v == "true" || v == "1")
}

async fn container_logs(
    State(endpoints): State<Endpoints>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    Query(query): Query<LogQuery>,
) -> Response {
    let Some(logs) = endpoints.state.provider.logs() else {
        return provider_error(&ProviderError::Unsupported("container logs"));
    };
    let pod_ref = match bound_pod(&endpoints, &namespace, &pod).await {
        Ok(pod_ref) => pod_ref,
        Err(response) => return response,
    };
    let since = match (query.since_seconds, &query.since_time) {
        (Some(seconds), _) => Some(SystemTime::now() - Duration::from_secs(seconds)),
        (None, Some(time)) => match time.parse::<k8s_openapi::jiff::Timestamp>() {
            Ok(t) => Some(
                SystemTime::UNIX_EPOCH
                    + Duration::from_secs(u64::try_from(t.as_second()).unwrap_or(0)),
            ),
            Err(_) => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("sinceTime {time:?} is not RFC 3339\n"),
                )
                    .into_response();
            }
        },
        (None, None) => None,
    };
    let options = LogOptions {
        follow: flag(&query.follow),
        tail_lines: query.tail_lines,
        limit_bytes: query.limit_bytes,
        timestamps: flag(&query.timestamps),
        since,
        previous: flag(&query.previous),
    };
    match logs.logs(&pod_ref, &container, options).await {
        Ok(stream) => {
            let stream: Box<dyn tokio::io::AsyncRead + Send + Unpin> = match query.limit_bytes {
                Some(limit) => Box::new(stream.take(limit)),
                None => stream,
            };
            Body::from_stream(tokio_util::io::ReaderStream::new(stream)).into_response()
        }
        Err(err) => provider_error(&err),
    }
}

/// `/exec/{ns}/{pod}/{container}?command=…&stdin=…&stdout=…&stderr=…&tty=…` over SPDY or
/// WebSocket (see [`remotecommand`]).
async fn exec(
    State(endpoints): State<Endpoints>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    request: Request,
) -> Response {
    let options = match Options::from_query(request.uri().query(), Kind::Exec) {
        Ok(options) => options,
        Err(problem) => return (StatusCode::BAD_REQUEST, format!("{problem}\n")).into_response(),
    };
    if endpoints.state.provider.exec().is_none() {
        return provider_error(&ProviderError::Unsupported("exec"));
    }
    let pod = match bound_pod(&endpoints, &namespace, &pod).await {
        Ok(pod) => pod,
        Err(response) => return response,
    };
    let provider = endpoints.state.provider.clone();
    let exec_request = ExecRequest {
        pod,
        container,
        command: options.command.clone(),
    };
    let session: remotecommand::Session = Box::new(move |io| {
        Box::pin(async move {
            match provider.exec() {
                Some(exec) => exec.exec(exec_request, io).await,
                None => Err(ProviderError::Unsupported("exec")),
            }
        })
    });
    let streaming = endpoints.options.streaming;
    remotecommand::serve(request, options, Kind::Exec, session, streaming)
}

/// `/attach/{ns}/{pod}/{container}?stdin=…&stdout=…&stderr=…&tty=…` over SPDY or WebSocket.
async fn attach(
    State(endpoints): State<Endpoints>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    request: Request,
) -> Response {
    let options = match Options::from_query(request.uri().query(), Kind::Attach) {
        Ok(options) => options,
        Err(problem) => return (StatusCode::BAD_REQUEST, format!("{problem}\n")).into_response(),
    };
    if endpoints.state.provider.attach().is_none() {
        return provider_error(&ProviderError::Unsupported("attach"));
    }
    let pod = match bound_pod(&endpoints, &namespace, &pod).await {
        Ok(pod) => pod,
        Err(response) => return response,
    };
    let provider = endpoints.state.provider.clone();
    let session: remotecommand::Session = Box::new(move |io| {
        Box::pin(async move {
            match provider.attach() {
                Some(attach) => attach.attach(&pod, &container, io).await,
                None => Err(ProviderError::Unsupported("attach")),
            }
        })
    });
    let streaming = endpoints.options.streaming;
    remotecommand::serve(request, options, Kind::Attach, session, streaming)
}
