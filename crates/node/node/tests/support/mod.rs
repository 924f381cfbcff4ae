//! Running virtual nodes in-process against the dev control plane, for the node's tests.
#![allow(dead_code)] // each test binary uses a different part

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use updraft_node::{NodeConfig, VirtualNode};
use updraft_provider_mock::{MockConfig, MockProvider};
use updraft_testing::{TestCluster, unique_name, wait_for};

/// Generous: the control plane shares two cores with the test build.
pub const TIMEOUT: Duration = Duration::from_secs(90);

/// A virtual node running in this process; stopped when dropped (and its Node deleted when
/// the last handle for that name goes, see [`NodeName`]).
pub struct RunningNode {
    pub name: String,
    pub provider: MockProvider,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningNode {
    /// Stops the node as SIGTERM would (pods keep running in the provider) and waits.
    pub async fn stop(mut self) -> (String, MockProvider) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        (self.name.clone(), self.provider.clone())
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Deletes the Node object named `name` when dropped.
pub struct NodeName(pub String);

impl Drop for NodeName {
    fn drop(&mut self) {
        updraft_testing::delete_node(&self.0);
    }
}

/// A fresh node name whose Node is deleted at the end of the test.
pub fn node_name() -> NodeName {
    NodeName(unique_name("vnode"))
}

/// Test-friendly timings: quick orphan sweeps.
pub fn config(name: &str) -> NodeConfig {
    let mut config = NodeConfig::new(name, "mock");
    config.orphan_sweep_interval = Duration::from_secs(1);
    config
}

/// Starts a node named `name` on `provider`, authenticated as `system:node:<name>`.
/// Set `UPDRAFT_TEST_LOG=debug` (a tracing filter) to see what the node does.
pub async fn start_node(
    cluster: &TestCluster,
    config: NodeConfig,
    provider: MockProvider,
) -> RunningNode {
    if let Ok(filter) = std::env::var("UPDRAFT_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let client = cluster.node_client(&config.name).await;
    start_node_as(client, config, provider)
}

/// Starts a node on `provider` that talks to the API server through `client`.
pub fn start_node_as(
    client: kube::Client,
    config: NodeConfig,
    provider: MockProvider,
) -> RunningNode {
    let name = config.name.clone();
    let node = VirtualNode::new(client, config, Arc::new(provider.clone()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        node.run(async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    RunningNode {
        name,
        provider,
        stop: Some(stop),
        task: Some(task),
    }
}

/// A new mock provider.
pub fn mock() -> MockProvider {
    MockProvider::new(MockConfig::default())
}

/// Waits until the node is Ready.
pub async fn wait_ready(cluster: &TestCluster, name: &str) -> Node {
    wait_for(
        &Api::<Node>::all(cluster.client()),
        name,
        "the node to be Ready",
        TIMEOUT,
        |n| node_condition(n, "Ready").as_deref() == Some("True"),
    )
    .await
}

/// The status of a node condition.
pub fn node_condition(node: &Node, type_: &str) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

/// A pod spec (JSON) that tolerates the virtual node's taint and selects the node.
pub fn pod_template(
    node: &str,
    annotations: serde_json::Value,
    extra_spec: serde_json::Value,
) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "nodeSelector": {"kubernetes.io/hostname": node},
        "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists", "effect": "NoSchedule"}],
        "containers": [{"name": "main", "image": "busybox"}]
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::json!({"metadata": {"annotations": annotations}, "spec": spec})
}

/// A pod named `name` for `node`.
pub fn pod(
    node: &str,
    name: &str,
    annotations: serde_json::Value,
    extra_spec: serde_json::Value,
) -> Pod {
    let mut template = pod_template(node, annotations, extra_spec);
    template["metadata"]["name"] = serde_json::json!(name);
    serde_json::from_value(template).unwrap()
}

/// Whether the pod is Running with Ready=True.
pub fn running_and_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The reasons of the Events about object `name` in `namespace`.
pub async fn event_reasons(cluster: &TestCluster, namespace: &str, name: &str) -> Vec<String> {
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(cluster.client(), namespace);
    let list = events
        .list(&kube::api::ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .unwrap();
    list.items.into_iter().filter_map(|e| e.reason).collect()
}
