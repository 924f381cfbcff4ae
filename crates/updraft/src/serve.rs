//! `updraft run`: the virtual node and its kubelet API, until SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail};
use tokio::sync::watch;
use updraft_kubelet_api::auth::{Auth, AuthConfig};
use updraft_kubelet_api::csr::{ServingRequest, keep_renewed, request_serving_certificate};
use updraft_kubelet_api::routes::{KubeletOptions, KubeletState, PodLookup, routes_with};
use updraft_kubelet_api::server::{protect, serve};
use updraft_kubelet_api::streaming::{StreamingConfig, StreamingMetrics};
use updraft_kubelet_api::tls::{ServingCertificate, server_config};
use updraft_node::VirtualNode;
use updraft_provider::Provider;
use updraft_provider_cells::CellsProvider;
use updraft_provider_mock::{MockConfig, MockProvider};

use crate::config::{
    ProviderKind, RunArgs, ServingCertificateSource, cells_node_file, read_cells_config,
    read_mock_config,
};
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
    let counted = builder.with_layer(&metrics.count_requests());
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
    match args.provider {
        ProviderKind::Mock => {
            let provider_file = read_mock_config(args.provider_config.as_ref())?;
            let provider = Arc::new(MockProvider::new(MockConfig {
                host_ip: args.node_ip.clone(),
                keep_inputs: false,
                ..MockConfig::default()
            }));
            let node_config = args.node_config(provider_file.node());
            let streaming = StreamingMetrics::default();
            let metrics = Metrics::with_extra(|registry| streaming.register(registry));
            run_with(args, provider, node_config, metrics, streaming).await
        }
        ProviderKind::Cells => {
            let config = read_cells_config(args.provider_config.as_ref())?;
            let provider = CellsProvider::from_config(&config, &args.node_name)
                .await
                .context("starting the cells provider")?;
            let streaming = StreamingMetrics::default();
            let metrics = Metrics::with_extra(|registry| {
                provider.register_metrics(registry);
                streaming.register(registry);
            });
            let node_config = args.node_config(cells_node_file(&config));
            let provider = Arc::new(provider);
            let result = run_with(args, provider.clone(), node_config, metrics, streaming).await;
            // Cells keep running: the next start adopts them.
            provider.shutdown();
            result
        }
    }
}

/// Runs the node with `provider` until SIGTERM or SIGINT.
async fn run_with<P: Provider>(
    args: RunArgs,
    provider: Arc<P>,
    node_config: updraft_node::NodeConfig,
    metrics: Metrics,
    streaming_metrics: StreamingMetrics,
) -> anyhow::Result<()> {
    let client = kube_client(&args, &metrics).await?;
    let pod_metrics = metrics.pods.clone();
    let listen = args.listen_address()?;

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
    let node =
        VirtualNode::new(client.clone(), node_config, provider.clone()).with_metrics(pod_metrics);
    let kubelet = KubeletState {
        provider: provider.clone(),
        client: client.clone(),
        node_name: args.node_name.clone(),
        metrics: Arc::new(move || metrics.encode()),
    };
    // Pods are looked up in the node's own watch cache: no API request per exec or log call.
    let options = KubeletOptions {
        pods: PodLookup::Cache(node.pods()),
        streaming: StreamingConfig {
            idle_timeout: args.streaming_connection_idle_timeout,
            stream_creation_timeout: args.stream_creation_timeout,
        },
        // The node's stats start now, when its kubelet API is built (not at the first scrape).
        stats_started: SystemTime::now(),
    };
    let app = protect(
        streaming_metrics.count_sessions_of(routes_with(kubelet, options)),
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
    let node_task = tokio::spawn(node.run(stopped(stop_rx)));
    shutdown_signal().await;
    tracing::info!("signal received: shutting down");
    let _ = stop_tx.send(true);
    node_task.await.context("the node task panicked")??;
    let _ = server.await;
    Ok(())
}
