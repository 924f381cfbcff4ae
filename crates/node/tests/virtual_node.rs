//! The virtual node against the real control plane: registration, heartbeat, scheduling by
//! the real kube-scheduler, pod lifecycle — all under the node identity (Node authorizer and
//! NodeRestriction active).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use updraft_node::{NodeConfig, VirtualNode};
use updraft_provider_mock::{MockConfig, MockProvider};
use updraft_testing::{TestCluster, unique_name, wait_for, wait_for_deletion};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A running virtual node; stopped and its Node deleted when dropped.
struct RunningNode {
    name: String,
    provider: MockProvider,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    admin: kube::Client,
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // The admin client belongs to the test's runtime; a fresh one is made here.
            runtime.block_on(async move {
                drop(admin);
                let client = updraft_devcluster::cluster::admin_client(
                    &updraft_devcluster::Layout::for_workspace(),
                )
                .await
                .unwrap();
                let _ = Api::<Node>::all(client)
                    .delete(&name, &DeleteParams::default())
                    .await;
            });
        })
        .join();
    }
}

async fn start_node(cluster: &TestCluster) -> RunningNode {
    let name = unique_name("vnode");
    let provider = MockProvider::new(MockConfig::default());
    let client = cluster.node_client(&name).await;
    let node = VirtualNode::new(
        client,
        NodeConfig::new(&name, "mock"),
        Arc::new(provider.clone()),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
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
        admin: cluster.client(),
    }
}

fn pod_for(node: &str, name: &str, tolerate: bool) -> Pod {
    let tolerations = if tolerate {
        serde_json::json!([{"key": "virtual-kubelet.io/provider", "operator": "Exists", "effect": "NoSchedule"}])
    } else {
        serde_json::json!([])
    };
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": tolerations,
            "containers": [{"name": "main", "image": "busybox"}]
        }
    }))
    .unwrap()
}

fn condition(node: &Node, type_: &str) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

#[tokio::test]
async fn the_node_registers_ready_with_its_labels_taint_and_a_renewing_lease() {
    let cluster = TestCluster::connect().await;
    let vnode = start_node(&cluster).await;
    let nodes = Api::<Node>::all(cluster.client());
    let node = wait_for(&nodes, &vnode.name, "the node to be Ready", TIMEOUT, |n| {
        condition(n, "Ready").as_deref() == Some("True")
    })
    .await;

    let labels = node.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("type").map(String::as_str),
        Some("virtual-kubelet")
    );
    assert_eq!(labels.get("kubernetes.io/hostname"), Some(&vnode.name));
    assert_eq!(
        labels
            .get("node.kubernetes.io/exclude-from-external-load-balancers")
            .map(String::as_str),
        Some("true")
    );
    // Under the node identity NodeRestriction forbids kubernetes.io/role; it is left out.
    assert!(!labels.contains_key("kubernetes.io/role"));
    let taints = node
        .spec
        .clone()
        .unwrap_or_default()
        .taints
        .unwrap_or_default();
    assert!(
        taints.iter().any(|t| t.key == "virtual-kubelet.io/provider"
            && t.value.as_deref() == Some("mock")
            && t.effect == "NoSchedule"),
        "{taints:?}"
    );
    let status = node.status.clone().unwrap();
    assert_eq!(
        status.capacity.unwrap().get("pods").map(|q| q.0.as_str()),
        Some("110")
    );
    assert_eq!(
        status
            .daemon_endpoints
            .unwrap()
            .kubelet_endpoint
            .unwrap()
            .port,
        10250
    );

    let leases = Api::<Lease>::namespaced(cluster.client(), "kube-node-lease");
    let first = wait_for(&leases, &vnode.name, "the node lease", TIMEOUT, |_| true).await;
    let spec = first.spec.clone().unwrap();
    assert_eq!(spec.lease_duration_seconds, Some(40));
    assert_eq!(
        first.metadata.owner_references.unwrap()[0].uid,
        node.metadata.uid.clone().unwrap()
    );
    let first_renewal = spec.renew_time.unwrap();
    wait_for(
        &leases,
        &vnode.name,
        "the lease to be renewed",
        Duration::from_secs(30),
        |l| {
            l.spec
                .as_ref()
                .and_then(|s| s.renew_time.as_ref())
                .is_some_and(|t| t.0 > first_renewal.0)
        },
    )
    .await;
}

#[tokio::test]
async fn the_scheduler_places_tolerating_pods_which_run_and_are_deleted_gracefully() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("vnode-pods").await;
    let vnode = start_node(&cluster).await;
    let nodes = Api::<Node>::all(cluster.client());
    wait_for(&nodes, &vnode.name, "the node to be Ready", TIMEOUT, |n| {
        condition(n, "Ready").as_deref() == Some("True")
    })
    .await;

    let pods = Api::<Pod>::namespaced(cluster.client(), ns.name());
    pods.create(&PostParams::default(), &pod_for(&vnode.name, "runs", true))
        .await
        .unwrap();
    pods.create(
        &PostParams::default(),
        &pod_for(&vnode.name, "untolerated", false),
    )
    .await
    .unwrap();

    let running = wait_for(
        &pods,
        "runs",
        "the pod to be Running and Ready",
        TIMEOUT,
        |p| {
            let status = p.status.as_ref();
            status.and_then(|s| s.phase.as_deref()) == Some("Running")
                && status
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        },
    )
    .await;
    let status = running.status.unwrap();
    assert!(status.pod_ip.is_some_and(|ip| !ip.is_empty()));
    assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
    assert!(
        status
            .conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "PodScheduled" && c.status == "True"),
        "PodScheduled kept"
    );
    assert_eq!(vnode.provider.pod_count(), 1);

    let untolerated = wait_for(
        &pods,
        "untolerated",
        "the scheduler to refuse the pod",
        TIMEOUT,
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.type_ == "PodScheduled"
                            && c.status == "False"
                            && c.reason.as_deref() == Some("Unschedulable")
                    })
                })
        },
    )
    .await;
    assert!(untolerated.spec.unwrap().node_name.is_none());

    pods.delete("runs", &DeleteParams::default()).await.unwrap();
    wait_for_deletion(&pods, "runs", TIMEOUT).await;
    assert_eq!(
        vnode.provider.pod_count(),
        0,
        "the provider pod is gone too"
    );
}
