//! The heartbeat as the node lifecycle controller sees it: a node whose Lease stops being
//! renewed goes NotReady (status Unknown), and comes back Ready when Updraft returns.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use support::*;
use updraft_testing::{TestCluster, wait_for};

#[tokio::test]
async fn a_node_whose_lease_expires_goes_not_ready_and_recovers() {
    let cluster = TestCluster::connect().await;
    let name = node_name();
    let provider = mock();
    let vnode = start_node(&cluster, config(&name.0), provider.clone()).await;
    wait_ready(&cluster, &name.0).await;
    vnode.stop().await;

    // The controller manager's node-monitor grace period (50 s) plus its 5 s check period.
    let nodes = Api::<Node>::all(cluster.client());
    let unreachable = |n: &Node| {
        n.spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|ts| ts.iter().any(|t| t.key == "node.kubernetes.io/unreachable"))
    };
    wait_for(
        &nodes,
        &name.0,
        "the controller manager to mark the node NotReady and unreachable",
        Duration::from_secs(180),
        |n| node_condition(n, "Ready").as_deref() == Some("Unknown") && unreachable(n),
    )
    .await;

    let _vnode = start_node(&cluster, config(&name.0), provider).await;
    wait_ready(&cluster, &name.0).await;
    let back = wait_for(
        &nodes,
        &name.0,
        "the unreachable taint to be lifted",
        TIMEOUT,
        |n| {
            !n.spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|ts| ts.iter().any(|t| t.key == "node.kubernetes.io/unreachable"))
        },
    )
    .await;
    assert!(
        back.spec
            .unwrap()
            .taints
            .unwrap()
            .iter()
            .any(|t| t.key == "virtual-kubelet.io/provider"),
        "our taint kept"
    );
}
