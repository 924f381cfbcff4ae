//! A virtual node with its kubelet API, in-process, for the port-forward and stats tests:
//! the mock provider, the node controller under `system:node:<name>`, and the kubelet port
//! serving a certificate from the cluster CA (so the API server trusts it) with kubelet-style
//! authentication and authorization.
#![allow(dead_code)] // each test binary uses a different part

use std::net::{IpAddr, Ipv4Addr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use tokio::io::{AsyncBufReadExt as _, BufReader};
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

/// A running virtual node and kubelet port; both stop and the Node is deleted when dropped.
pub struct KubeletNode {
    pub name: String,
    pub provider: MockProvider,
    pub address: IpAddr,
    pub port: u16,
    pub ca_pem: String,
    /// The sessions its kubelet API accepted, by endpoint, transport and subprotocol.
    pub metrics: StreamingMetrics,
    stop: Option<tokio::sync::watch::Sender<bool>>,
}

impl Drop for KubeletNode {
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

/// Starts a node whose kubelet API listens on `listener` (bound to the node's address) and
/// waits until it is Ready. Set `UPDRAFT_TEST_LOG` (a tracing filter) to see what it does.
pub async fn start_node(cluster: &TestCluster, listener: tokio::net::TcpListener) -> KubeletNode {
    start_node_with(cluster, listener, StreamingConfig::default()).await
}

/// [`start_node`] with the given streaming timeouts.
pub async fn start_node_with(
    cluster: &TestCluster,
    listener: tokio::net::TcpListener,
    streaming: StreamingConfig,
) -> KubeletNode {
    start_node_declaring(cluster, listener, streaming, false).await
}

/// [`start_node_with`], the Node declaring `ExtendWebSocketsToKubelet` if `websockets` (the
/// API server then passes kubectl's WebSocket through instead of unwrapping its SPDY tunnel,
/// which it does for the other tests).
pub async fn start_node_declaring(
    cluster: &TestCluster,
    listener: tokio::net::TcpListener,
    streaming: StreamingConfig,
    websockets: bool,
) -> KubeletNode {
    if let Ok(filter) = std::env::var("UPDRAFT_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let name = unique_name("pf-node");
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
    let provider = MockProvider::new(MockConfig::default());
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
    KubeletNode {
        name,
        provider,
        address: local.ip(),
        port: local.port(),
        ca_pem: ca.cert_pem().to_owned(),
        metrics,
        stop: Some(stop),
    }
}

/// A node whose kubelet API listens on a free loopback port.
pub async fn start_loopback_node(cluster: &TestCluster) -> KubeletNode {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("a loopback port");
    start_node(cluster, listener).await
}

/// Creates pod `name` on `node` (with `containers` as JSON) and waits until it runs.
pub async fn running_pod(
    cluster: &TestCluster,
    namespace: &str,
    node: &str,
    name: &str,
    containers: serde_json::Value,
) -> Pod {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": containers
        }
    }))
    .expect("a pod literal");
    let pods = Api::<Pod>::namespaced(cluster.client(), namespace);
    pods.create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|err| panic!("creating pod {name}: {err}"));
    wait_for(&pods, name, "the pod to run", TIMEOUT, |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await
}

/// A running `kubectl port-forward` (killed when dropped).
pub struct KubectlPortForward {
    pub child: tokio::process::Child,
    /// The local port kubectl listens on.
    pub local_port: u16,
    /// What kubectl wrote to stderr so far is collected here by a background task.
    pub stderr: Arc<std::sync::Mutex<String>>,
}

impl KubectlPortForward {
    /// What kubectl has written to stderr.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Starts `kubectl port-forward pod/<pod> :<remote_port>` and waits until it listens.
pub async fn kubectl_port_forward(
    cluster: &TestCluster,
    namespace: &str,
    pod: &str,
    remote_port: u16,
) -> KubectlPortForward {
    kubectl_port_forward_with_env(cluster, namespace, pod, remote_port, &[]).await
}

/// [`kubectl_port_forward`] with extra environment variables for kubectl.
pub async fn kubectl_port_forward_with_env(
    cluster: &TestCluster,
    namespace: &str,
    pod: &str,
    remote_port: u16,
    env: &[(&str, &str)],
) -> KubectlPortForward {
    let mut command = tokio::process::Command::from(cluster.kubectl());
    command.envs(env.iter().copied());
    command
        .args(["port-forward", "-n", namespace, "--address", "127.0.0.1"])
        .arg(format!("pod/{pod}"))
        .arg(format!(":{remote_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("starting kubectl port-forward");
    let stderr = Arc::new(std::sync::Mutex::new(String::new()));
    let mut err_lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let collected = stderr.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = err_lines.next_line().await {
            if let Ok(mut text) = collected.lock() {
                text.push_str(&line);
                text.push('\n');
            }
        }
    });
    let mut out_lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let local_port = tokio::time::timeout(TIMEOUT, async {
        while let Ok(Some(line)) = out_lines.next_line().await {
            // "Forwarding from 127.0.0.1:41234 -> 8080"
            if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:")
                && let Some((port, _)) = rest.split_once(' ')
            {
                return port.parse::<u16>().ok();
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    let Some(local_port) = local_port else {
        let _ = child.start_kill();
        panic!(
            "kubectl port-forward did not report a local port; stderr:\n{}",
            stderr.lock().map(|s| s.clone()).unwrap_or_default()
        );
    };
    // Keep draining stdout ("Handling connection for …") so kubectl never blocks on it.
    tokio::spawn(async move { while let Ok(Some(_)) = out_lines.next_line().await {} });
    KubectlPortForward {
        child,
        local_port,
        stderr,
    }
}
