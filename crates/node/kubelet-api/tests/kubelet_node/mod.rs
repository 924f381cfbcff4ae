//! One virtual node with its kubelet API in-process, shared by the support modules of the
//! logs/exec/attach and port-forward/stats tests: the mock provider (its pods run real
//! processes when annotated `mock.updraft.dev/run: "true"`, in a scratch directory), the node
//! controller under `system:node:<name>`, and the kubelet port serving a certificate from the
//! cluster CA (so the API server trusts it) with kubelet-style authentication and
//! authorization, and `/metrics` with the streaming session counters.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use updraft_devcluster::pki::{CertificateAuthority, Identity};
use updraft_kubelet_api::auth::{Auth, AuthConfig};
use updraft_kubelet_api::routes::{KubeletOptions, KubeletState, PodLookup, routes_with};
use updraft_kubelet_api::server::{protect, serve};
use updraft_kubelet_api::streaming::{StreamingConfig, StreamingMetrics};
use updraft_kubelet_api::tls::{ServingCertificate, server_config};
use updraft_node::{NodeConfig, VirtualNode};
use updraft_provider_mock::{MockConfig, MockProvider};
use updraft_testing::{TestCluster, unique_name, wait_for};

/// Generous: the control plane shares two cores with the test build.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// How kubectl's exec/attach/port-forward WebSocket reaches the node through the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamingPath {
    /// The Node declares `ExtendWebSocketsToKubelet` (Updraft's default): the API server
    /// (1.36+) passes the WebSocket through unchanged (exec/attach: `v5.channel.k8s.io`;
    /// port-forward: SPDY tunnelled in the WebSocket, `SPDY/3.1+portforward.k8s.io`).
    Passthrough,
    /// The Node declares nothing (older API servers behave the same way): the API server
    /// translates the WebSocket to SPDY/3.1 toward the node.
    TranslatedToSpdy,
}

impl StreamingPath {
    /// The `transport` label the node counts this path's sessions under.
    pub fn transport(self) -> &'static str {
        match self {
            Self::Passthrough => "websocket",
            Self::TranslatedToSpdy => "spdy",
        }
    }
}

/// Defines module `$name` with one `#[tokio::test]` per [`StreamingPath`], `passed_through`
/// and `translated_to_spdy`, each running the scenario `$scenario(path)` (a function of the
/// calling test file, which imports `StreamingPath`); what follows the scenario goes into
/// `#[tokio::test(…)]` (e.g. `flavor = "multi_thread", worker_threads = 2`).
#[allow(unused_macros)] // not every test binary has scenarios of both paths
macro_rules! test_on_both_paths {
    ($name:ident, $scenario:ident $(, $($runtime:tt)+)?) => {
        mod $name {
            #[tokio::test$(($($runtime)+))?]
            async fn passed_through() {
                super::$scenario(super::StreamingPath::Passthrough).await;
            }

            #[tokio::test$(($($runtime)+))?]
            async fn translated_to_spdy() {
                super::$scenario(super::StreamingPath::TranslatedToSpdy).await;
            }
        }
    };
}

/// A running virtual node and kubelet port; both stop, the Node is deleted and the scratch
/// directory removed when dropped.
pub struct KubeletNode {
    pub name: String,
    pub provider: MockProvider,
    pub address: IpAddr,
    pub port: u16,
    pub ca_pem: String,
    /// Where the mock runs its pods' processes.
    pub scratch: tempfile::TempDir,
    /// The sessions its kubelet API accepted, by endpoint, transport and subprotocol (also
    /// served at its `/metrics`).
    pub metrics: StreamingMetrics,
    stop: Option<tokio::sync::watch::Sender<bool>>,
}

impl Drop for KubeletNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        updraft_testing::delete_node(&self.name);
    }
}

/// Starts a node named `<prefix>-…` whose kubelet API listens on `listener` (bound to the
/// node's address), reached on `path`, and waits until it is Ready. Set `UPDRAFT_TEST_LOG` (a
/// tracing filter) to see what it does.
pub async fn start_node(
    cluster: &TestCluster,
    prefix: &str,
    listener: tokio::net::TcpListener,
    path: StreamingPath,
    streaming: StreamingConfig,
) -> KubeletNode {
    if let Ok(filter) = std::env::var("UPDRAFT_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let name = unique_name(prefix);
    let local = listener.local_addr().expect("listener address");
    let ca = CertificateAuthority::load(&cluster.layout().pki()).expect("the cluster CA");
    let serving = ca
        .issue(&Identity {
            common_name: name.clone(),
            dns_names: vec![name.clone()],
            ip_addresses: vec![local.ip()],
            server: true,
            ..Identity::default()
        })
        .expect("a serving certificate");
    let serving =
        ServingCertificate::from_pem(serving.cert_pem.as_bytes(), serving.key_pem.as_bytes())
            .expect("serving certificate");
    let tls = server_config(serving, Some(ca.cert_pem().as_bytes())).expect("TLS config");
    let client = cluster.node_client(&name).await;
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let provider = MockProvider::new(MockConfig {
        scratch_dir: scratch.path().to_owned(),
        ..MockConfig::default()
    });
    let auth = Arc::new(Auth::new(client.clone(), AuthConfig::new(&name)));
    let mut config = NodeConfig::new(&name, "mock");
    config.internal_ip = local.ip().to_string();
    config.kubelet_port = local.port();
    match path {
        // Declared by default, as `updraft run` does.
        StreamingPath::Passthrough => assert!(
            config
                .declared_features
                .iter()
                .any(|f| f == "ExtendWebSocketsToKubelet"),
            "the node declares ExtendWebSocketsToKubelet by default"
        ),
        StreamingPath::TranslatedToSpdy => config.declared_features.clear(),
    }
    let metrics = StreamingMetrics::default();
    let mut registry = prometheus_client::registry::Registry::with_prefix("updraft");
    metrics.register(&mut registry);
    let node = VirtualNode::new(client.clone(), config, Arc::new(provider.clone()));
    let app = protect(
        metrics.count_sessions_of(routes_with(
            KubeletState {
                provider: Arc::new(provider.clone()),
                client: client.clone(),
                node_name: name.clone(),
                metrics: Arc::new(move || {
                    let mut text = String::new();
                    prometheus_client::encoding::text::encode(&mut text, &registry)
                        .expect("encoding the metrics");
                    text
                }),
            },
            KubeletOptions {
                pods: PodLookup::Cache(node.pods()),
                streaming,
                stats_started: std::time::SystemTime::now(),
            },
        )),
        auth,
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(serve(listener, tls, app, until_stopped(stopped.clone())));
    tokio::spawn(node.run(until_stopped(stopped)));
    wait_for(
        &Api::<Node>::all(cluster.client()),
        &name,
        "the node to be Ready",
        TIMEOUT,
        |n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        },
    )
    .await;
    KubeletNode {
        name,
        provider,
        address: local.ip(),
        port: local.port(),
        ca_pem: ca.cert_pem().to_owned(),
        scratch,
        metrics,
        stop: Some(stop),
    }
}

impl KubeletNode {
    /// The node's `updraft_kubelet_streaming_sessions_total` counters of `endpoint`, read from
    /// its `/metrics` with the API server's kubelet client certificate (the API server's node
    /// proxy refuses loopback addresses): transport → protocol → sessions.
    pub async fn sessions_at_metrics(
        &self,
        cluster: &TestCluster,
        endpoint: &str,
    ) -> BTreeMap<String, BTreeMap<String, u64>> {
        let pki = cluster.layout().pki();
        let mut identity =
            std::fs::read(pki.join("apiserver-kubelet-client.crt")).expect("the client cert");
        identity.extend(std::fs::read(pki.join("apiserver-kubelet-client.key")).expect("its key"));
        let client = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.ca_pem.as_bytes()).expect("the cluster CA"),
            )
            .identity(reqwest::Identity::from_pem(&identity).expect("the client identity"))
            .build()
            .expect("an HTTPS client");
        let response = client
            .get(format!("https://{}:{}/metrics", self.address, self.port))
            .send()
            .await
            .unwrap_or_else(|err| panic!("reading the node's /metrics: {err}"));
        assert!(response.status().is_success(), "/metrics: {response:?}");
        let text = response.text().await.expect("the metrics text");
        let mut sessions: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("updraft_kubelet_streaming_sessions_total{") else {
                continue;
            };
            let (labels, value) = rest
                .split_once("} ")
                .unwrap_or_else(|| panic!("a malformed sample: {line}"));
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or_else(|| panic!("no {name} label in {line}"))
                    .to_owned()
            };
            if label("endpoint") != endpoint {
                continue;
            }
            let value: u64 = value.parse().unwrap_or_else(|err| panic!("{line}: {err}"));
            *sessions
                .entry(label("transport"))
                .or_default()
                .entry(label("protocol"))
                .or_default() += value;
        }
        sessions
    }

    /// Proof of the path: the node's `/metrics` counts at least `at_least` sessions of
    /// `endpoint` (`exec`, `attach`, `portforward`), all of them over `path`'s transport and
    /// subprotocol, none over the other path's.
    pub async fn assert_sessions_took(
        &self,
        cluster: &TestCluster,
        path: StreamingPath,
        endpoint: &str,
        at_least: u64,
    ) {
        let protocol = match (path, endpoint) {
            (StreamingPath::Passthrough, "portforward") => "SPDY/3.1+portforward.k8s.io",
            (StreamingPath::TranslatedToSpdy, "portforward") => "portforward.k8s.io",
            _ => "v5.channel.k8s.io",
        };
        self.assert_sessions(cluster, endpoint, path.transport(), protocol, at_least)
            .await;
    }

    /// The node's `/metrics` counts at least `at_least` sessions of `endpoint`, all of them
    /// over `transport` with `protocol`.
    pub async fn assert_sessions(
        &self,
        cluster: &TestCluster,
        endpoint: &str,
        transport: &str,
        protocol: &str,
        at_least: u64,
    ) {
        let seen = self.sessions_at_metrics(cluster, endpoint).await;
        let only = seen
            .iter()
            .flat_map(|(t, protocols)| protocols.iter().map(move |(p, n)| (t, p, *n)))
            .collect::<Vec<_>>();
        assert!(
            matches!(only.as_slice(), [(t, p, n)] if *t == transport && *p == protocol && *n >= at_least),
            "expected at least {at_least} {endpoint} sessions, all over {transport} \
             ({protocol}); the node's /metrics counts (transport, protocol, sessions): {only:?}"
        );
    }
}
