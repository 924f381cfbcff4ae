//! A virtual node with its kubelet API in-process, whose mock pods run real processes
//! (`mock.updraft.dev/run: "true"`), for the logs/exec/attach tests with real kubectl.
#![allow(dead_code)] // each test binary uses a different part

use std::net::Ipv4Addr;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};
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

/// A running node and kubelet port; stopped, its Node deleted and its scratch directory
/// removed when dropped.
pub struct Kubelet {
    pub name: String,
    pub port: u16,
    pub ca_pem: String,
    /// The sessions its kubelet API accepted, by endpoint, transport and subprotocol.
    pub metrics: StreamingMetrics,
    pub scratch: tempfile::TempDir,
    stop: Option<tokio::sync::watch::Sender<bool>>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        let name = self.name.clone();
        updraft_testing::cleanup_as_admin(move |client| async move {
            let _ = Api::<Node>::all(client)
                .delete(&name, &DeleteParams::default())
                .await;
        });
    }
}

/// Starts a node on 127.0.0.1 with its kubelet API and waits until it is Ready.
pub async fn start(cluster: &TestCluster) -> Kubelet {
    start_with(cluster, StreamingConfig::default()).await
}

/// [`start`] with the given streaming timeouts.
pub async fn start_with(cluster: &TestCluster, streaming: StreamingConfig) -> Kubelet {
    start_declaring(cluster, streaming, false).await
}

/// [`start_with`], the Node declaring `ExtendWebSocketsToKubelet` if `websockets` (the API
/// server then passes kubectl's WebSockets through instead of translating them to SPDY, which
/// it does for the other tests).
pub async fn start_declaring(
    cluster: &TestCluster,
    streaming: StreamingConfig,
    websockets: bool,
) -> Kubelet {
    if let Ok(filter) = std::env::var("UPDRAFT_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let name = unique_name("rc-node");
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let local = listener.local_addr().unwrap();
    let ca = CertificateAuthority::load(&cluster.layout().pki()).unwrap();
    let serving = ca
        .issue(&Identity {
            common_name: name.clone(),
            dns_names: vec![name.clone()],
            ip_addresses: vec![local.ip()],
            server: true,
            ..Identity::default()
        })
        .unwrap();
    let serving =
        ServingCertificate::from_pem(serving.cert_pem.as_bytes(), serving.key_pem.as_bytes())
            .unwrap();
    let tls = server_config(serving, Some(ca.cert_pem().as_bytes())).unwrap();
    let client = cluster.node_client(&name).await;
    let scratch = tempfile::tempdir().unwrap();
    let provider = MockProvider::new(MockConfig {
        scratch_dir: scratch.path().to_owned(),
        ..MockConfig::default()
    });
    let auth = Arc::new(Auth::new(client.clone(), AuthConfig::new(&name)));
    let mut config = NodeConfig::new(&name, "mock");
    config.internal_ip = local.ip().to_string();
    config.kubelet_port = local.port();
    if !websockets {
        config.declared_features.clear();
    }
    let metrics = StreamingMetrics::default();
    let node = VirtualNode::new(client.clone(), config, Arc::new(provider.clone()));
    let app = protect(
        metrics.count_sessions_of(routes_with(
            KubeletState {
                provider: Arc::new(provider.clone()),
                client: client.clone(),
                node_name: name.clone(),
                metrics: Arc::new(String::new),
            },
            KubeletOptions {
                pods: PodLookup::Cache(node.pods()),
                streaming,
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
    Kubelet {
        name,
        port: local.port(),
        ca_pem: ca.cert_pem().to_owned(),
        metrics,
        scratch,
        stop: Some(stop),
    }
}

/// Creates a pod on `node` whose containers (JSON) run as real processes, and waits until
/// `ready` holds for it.
pub async fn create_pod(
    cluster: &TestCluster,
    namespace: &str,
    node: &str,
    name: &str,
    spec: serde_json::Value,
    ready: impl Fn(&Pod) -> bool,
) -> Pod {
    let mut spec = spec;
    spec["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": node});
    spec["tolerations"] = serde_json::json!([{"key": "virtual-kubelet.io/provider", "operator": "Exists", "effect": "NoSchedule"}]);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "annotations": {"mock.updraft.dev/run": "true"}},
        "spec": spec
    }))
    .unwrap();
    let pods = Api::<Pod>::namespaced(cluster.client(), namespace);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    wait_for(&pods, name, "the pod's condition", TIMEOUT, ready).await
}

/// Whether every container of the pod runs.
pub fn running(pod: &Pod) -> bool {
    pod.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Running")
            && s.container_statuses
                .as_ref()
                .is_some_and(|cs| cs.iter().all(|c| c.ready))
    })
}

/// Runs kubectl with `args` (stdin closed) and returns its output.
pub async fn kubectl(cluster: &TestCluster, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::from(cluster.kubectl());
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish within {TIMEOUT:?}"))
        .unwrap()
}

/// kubectl's stdout, after checking it succeeded.
pub async fn kubectl_ok(cluster: &TestCluster, args: &[&str]) -> String {
    let output = kubectl(cluster, args).await;
    assert!(
        output.status.success(),
        "kubectl {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}
