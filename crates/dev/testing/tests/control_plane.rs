//! The harness against the real control plane: what every other integration test relies on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::api::{Api, ListParams, PostParams};
use updraft_testing::{TestCluster, wait_for};

#[tokio::test]
async fn a_configmap_round_trips_through_the_api_server() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("harness").await;
    let namespace = wait_for(
        &Api::<Namespace>::all(cluster.client()),
        ns.name(),
        "the namespace to be active",
        Duration::from_secs(30),
        |n| n.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Active"),
    )
    .await;
    assert_eq!(namespace.metadata.name.as_deref(), Some(ns.name()));

    let api = Api::<ConfigMap>::namespaced(cluster.client(), ns.name());
    let config_map: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "greeting" },
        "data": { "hello": "world" }
    }))
    .unwrap();
    api.create(&PostParams::default(), &config_map)
        .await
        .unwrap();
    let read = api.get("greeting").await.unwrap();
    assert_eq!(
        read.data.unwrap().get("hello").map(String::as_str),
        Some("world")
    );
}

#[tokio::test]
async fn the_node_authorizer_confines_a_node_identity() {
    let cluster = TestCluster::connect().await;
    let node = cluster.node_client("harness-node").await;
    let err = Api::<Secret>::all(node)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403 Forbidden, got {other}"),
    }
}

#[test]
fn the_pinned_kubectl_reaches_a_ready_1_37_api_server() {
    let cluster = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(TestCluster::connect());
    let readyz = cluster
        .kubectl()
        .args(["get", "--raw", "/readyz"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&readyz.stdout), "ok");
    let version = cluster
        .kubectl()
        .args(["version", "-o", "json"])
        .output()
        .unwrap();
    let version: serde_json::Value = serde_json::from_slice(&version.stdout).unwrap();
    let server = version["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap_or_default();
    assert!(server.starts_with("v1.37."), "server version {server}");
    let client = version["clientVersion"]["gitVersion"]
        .as_str()
        .unwrap_or_default();
    assert!(client.starts_with("v1.37."), "kubectl version {client}");
}
