//! A virtual node with its kubelet API in-process, whose mock pods run real processes
//! (`mock.updraft.dev/run: "true"`), for the logs/exec/attach tests with real kubectl.
#![allow(dead_code)] // each test binary uses a different part

#[path = "../kubelet_node/mod.rs"]
#[macro_use]
mod kubelet_node;

use std::net::Ipv4Addr;
use std::process::Output;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use updraft_kubelet_api::streaming::StreamingConfig;
use updraft_testing::{TestCluster, wait_for};

pub use kubelet_node::{KubeletNode as Kubelet, StreamingPath, TIMEOUT};

/// Starts a node on 127.0.0.1 with its kubelet API and waits until it is Ready; kubectl's
/// streams reach it translated to SPDY (the passthrough path has tests of its own).
pub async fn start(cluster: &TestCluster) -> Kubelet {
    start_with(cluster, StreamingConfig::default()).await
}

/// [`start`] with the given streaming timeouts.
pub async fn start_with(cluster: &TestCluster, streaming: StreamingConfig) -> Kubelet {
    start_on_with(cluster, StreamingPath::TranslatedToSpdy, streaming).await
}

/// [`start`], kubectl's streams reaching the node on `path`.
pub async fn start_on(cluster: &TestCluster, path: StreamingPath) -> Kubelet {
    start_on_with(cluster, path, StreamingConfig::default()).await
}

/// [`start_on`] with the given streaming timeouts.
pub async fn start_on_with(
    cluster: &TestCluster,
    path: StreamingPath,
    streaming: StreamingConfig,
) -> Kubelet {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("a loopback port");
    kubelet_node::start_node(cluster, "rc-node", listener, path, streaming).await
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

/// Creates a running pod on `node` with one idle container, `main`, to exec into.
pub async fn idle_pod(cluster: &TestCluster, namespace: &str, node: &str, name: &str) -> Pod {
    create_pod(
        cluster,
        namespace,
        node,
        name,
        serde_json::json!({"containers": [{"name": "main", "image": "busybox"}]}),
        running,
    )
    .await
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
