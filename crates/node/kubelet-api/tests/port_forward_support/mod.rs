//! A virtual node with its kubelet API, in-process, for the port-forward and stats tests
//! (see `kubelet_node`), and `kubectl port-forward` driven from a test.
#![allow(dead_code)] // each test binary uses a different part

#[path = "../kubelet_node/mod.rs"]
#[macro_use]
mod kubelet_node;

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use updraft_kubelet_api::streaming::StreamingConfig;
use updraft_testing::{TestCluster, wait_for};

pub use kubelet_node::{KubeletNode, StreamingPath, TIMEOUT};

/// Starts a node whose kubelet API listens on `listener` (bound to the node's address) and
/// waits until it is Ready; kubectl's streams reach it translated to SPDY.
pub async fn start_node(cluster: &TestCluster, listener: tokio::net::TcpListener) -> KubeletNode {
    start_node_with(cluster, listener, StreamingConfig::default()).await
}

/// [`start_node`] with the given streaming timeouts.
pub async fn start_node_with(
    cluster: &TestCluster,
    listener: tokio::net::TcpListener,
    streaming: StreamingConfig,
) -> KubeletNode {
    kubelet_node::start_node(
        cluster,
        "pf-node",
        listener,
        StreamingPath::TranslatedToSpdy,
        streaming,
    )
    .await
}

/// A node whose kubelet API listens on a free loopback port (reached translated to SPDY).
pub async fn start_loopback_node(cluster: &TestCluster) -> KubeletNode {
    start_loopback_node_on(cluster, StreamingPath::TranslatedToSpdy).await
}

/// A node whose kubelet API listens on a free loopback port, reached on `path`.
pub async fn start_loopback_node_on(cluster: &TestCluster, path: StreamingPath) -> KubeletNode {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("a loopback port");
    kubelet_node::start_node(
        cluster,
        "pf-node",
        listener,
        path,
        StreamingConfig::default(),
    )
    .await
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
