//! `updraft run`: the virtual node and its kubelet API, until SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, ObjectList};
use serde::Deserialize;
use tokio::io::AsyncReadExt as _;
use tokio::sync::watch;
use updraft_kubelet_api::auth::{Auth, AuthConfig};
use updraft_kubelet_api::csr::{ServingRequest, keep_renewed, request_serving_certificate};
use updraft_kubelet_api::server::{protect, serve};
use updraft_kubelet_api::tls::{ServingCertificate, server_config};
use updraft_node::VirtualNode;
use updraft_provider::{LogOptions, PodRef, Provider, ProviderError};
use updraft_provider_mock::{MockConfig, MockProvider};

use crate::config::{RunArgs, ServingCertificateSource, read_mock_config};
use crate::metrics::Metrics;

async fn kube_client(args: &RunArgs, metrics: &Metrics) -> anyhow::Result<kube::Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig and no in-cluster config")?,
    };
    let builder =
        kube::client::ClientBuilder::try_from(config).context("building the Kubernetes client")?;
    let counted = builder.with_layer(&tower::util::MapRequestLayer::new(metrics.count_requests()));
    Ok(match args.qps {
        // A fixed window of `qps` requests per second (so bursts up to `qps`), as a guard for
        // shared API servers; unlimited by default like the Go virtual-kubelet.
        Some(qps) if qps > 0 => counted
            .with_layer(&tower::limit::RateLimitLayer::new(
                u64::from(qps),
                Duration::from_secs(1),
            ))
            .build(),
        _ => counted.build(),
    })
}

async fn serving_certificate(
    args: &RunArgs,
    client: &kube::Client,
) -> anyhow::Result<ServingCertificate> {
    match args.serving_certificate {
        ServingCertificateSource::Files => {
            let (Some(cert), Some(key)) = (&args.tls_cert_file, &args.tls_key_file) else {
                bail!(
                    "--serving-certificate files needs --tls-cert-file and --tls-key-file \
                     (APISERVER_CERT_LOCATION / APISERVER_KEY_LOCATION); or use --serving-certificate csr"
                );
            };
            Ok(ServingCertificate::from_files(cert, key)?)
        }
        ServingCertificateSource::Csr => {
            let request = ServingRequest {
                node_name: args.node_name.clone(),
                ip_addresses: vec![args.node_ip.parse().context("--node-ip")?],
                dns_names: vec![args.node_name.clone()],
                signing_timeout: Duration::from_secs(600),
            };
            let issued = request_serving_certificate(client.clone(), &request).await?;
            let serving = ServingCertificate::from_pem(
                issued.cert_pem.as_bytes(),
                issued.key_pem.as_bytes(),
            )?;
            tokio::spawn(keep_renewed(
                client.clone(),
                request,
                serving.clone(),
                issued,
            ));
            Ok(serving)
        }
        ServingCertificateSource::SelfSigned => {
            tracing::warn!(
                "serving a self-signed certificate: API servers that verify kubelet certificates will refuse it"
            );
            let names = vec![args.node_name.clone(), args.node_ip.clone()];
            let certified = rcgen::generate_simple_self_signed(names)
                .context("generating a self-signed certificate")?;
            Ok(ServingCertificate::from_pem(
                certified.cert.pem().as_bytes(),
                certified.signing_key.serialize_pem().as_bytes(),
            )?)
        }
    }
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Runs the node until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let provider_file = read_mock_config(args.provider_config.as_ref())?;
    let metrics = Metrics::new();
    let client = kube_client(&args, &metrics).await?;
    let pod_metrics = metrics.pods.clone();
    let listen = args.listen_address()?;
    let provider = Arc::new(MockProvider::new(MockConfig {
        host_ip: args.node_ip.clone(),
        ..MockConfig::default()
    }));
    let node_config = args.node_config(&provider_file);

    let serving = serving_certificate(&args, &client).await?;
    let client_ca = match &args.client_ca_file {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("reading --client-ca-file {}", path.display()))?,
        ),
        None => None,
    };
    let tls = server_config(serving, client_ca.as_deref())?;
    let mut auth_config = AuthConfig::new(&args.node_name);
    auth_config.allow_anonymous = args.anonymous_auth;
    let auth = Arc::new(Auth::new(client.clone(), auth_config));
    let app = protect(
        routes(KubeletState {
            provider: provider.clone(),
            client: client.clone(),
            node_name: args.node_name.clone(),
            metrics,
        }),
        auth,
    );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen} for the kubelet API"))?;
    tracing::info!(node = %args.node_name, %listen, "kubelet API listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let server = tokio::spawn(serve(listener, tls, app, stopped(stop_rx.clone())));
    let node = VirtualNode::new(client, node_config, provider).with_metrics(pod_metrics);
    let node_task = tokio::spawn(node.run(stopped(stop_rx)));
    shutdown_signal().await;
    tracing::info!("signal received: shutting down");
    let _ = stop_tx.send(true);
    node_task.await.context("the node task panicked")??;
    let _ = server.await;
    Ok(())
}

#[derive(Clone)]
struct KubeletState {
    provider: Arc<MockProvider>,
    client: kube::Client,
    node_name: String,
    metrics: Metrics,
}

fn routes(state: KubeletState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(|State(state): State<KubeletState>| async move { state.metrics.encode() }),
        )
        .route("/pods", get(pods))
        .route("/runningpods/", get(running_pods))
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .route("/exec/{namespace}/{pod}/{container}", any(not_yet))
        .route("/attach/{namespace}/{pod}/{container}", any(not_yet))
        .route("/portForward/{namespace}/{pod}", any(not_yet))
        .with_state(state)
}

async fn not_yet() -> Response {
    (
        StatusCode::NOT_IMPLEMENTED,
        "not implemented by this Updraft build yet\n",
    )
        .into_response()
}

fn provider_error(err: &ProviderError) -> Response {
    let status = match err {
        ProviderError::NotFound(_) => StatusCode::NOT_FOUND,
        ProviderError::InvalidInput(_) => StatusCode::BAD_REQUEST,
        ProviderError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
        ProviderError::Transient(_) => StatusCode::SERVICE_UNAVAILABLE,
        ProviderError::Permanent(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, format!("{err}\n")).into_response()
}

/// The pods bound to this node, as the API server has them.
async fn pods(State(state): State<KubeletState>) -> Response {
    let params = ListParams::default().fields(&format!("spec.nodeName={}", state.node_name));
    match Api::<Pod>::all(state.client.clone()).list(&params).await {
        Ok(list) => axum::Json(list).into_response(),
        Err(err) => (StatusCode::BAD_GATEWAY, format!("listing pods: {err}\n")).into_response(),
    }
}

/// The pods the provider runs.
async fn running_pods(State(state): State<KubeletState>) -> Response {
    match state.provider.list_pods().await {
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

fn flag(value: &Option<String>) -> bool {
    value.as_deref().is_some_and(|v| v == "true" || v == "1")
}

/// Finds a pod bound to this node; anything else is 404, so a node never serves another
/// node's pods.
async fn bound_pod(state: &KubeletState, namespace: &str, name: &str) -> Result<PodRef, Response> {
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            format!(
                "pod {namespace}/{name} is not on node {}\n",
                state.node_name
            ),
        )
            .into_response()
    };
    match Api::<Pod>::namespaced(state.client.clone(), namespace)
        .get_opt(name)
        .await
    {
        Ok(Some(pod))
            if pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
                == Some(state.node_name.as_str()) =>
        {
            Ok(PodRef::of(&pod))
        }
        Ok(_) | Err(kube::Error::Api(_)) => Err(not_found()),
        Err(err) => Err((
            StatusCode::BAD_GATEWAY,
            format!("reading pod {namespace}/{name}: {err}\n"),
        )
            .into_response()),
    }
}

async fn container_logs(
    State(state): State<KubeletState>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    Query(query): Query<LogQuery>,
) -> Response {
    let Some(logs) = state.provider.logs() else {
        return provider_error(&ProviderError::Unsupported("container logs"));
    };
    let pod_ref = match bound_pod(&state, &namespace, &pod).await {
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
