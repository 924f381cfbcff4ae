//! The API server the node talks to goes away and comes back: the node's watches recover and
//! what changed meanwhile is reconciled. The node talks to a second, real kube-apiserver on
//! the shared etcd (its own test binary, so no other test sees it restart), while the test
//! makes its changes through the main one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

mod support;

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use support::*;
use updraft_devcluster::cluster;
use updraft_provider::Provider as _;
use updraft_testing::{TestCluster, eventually, wait_for, wait_for_deletion};

/// Stops the API server replica when the test ends, however it ends.
struct Replica<'a> {
    layout: &'a updraft_devcluster::Layout,
    port: u16,
}

impl Drop for Replica<'_> {
    fn drop(&mut self) {
        let _ = cluster::down_extra(self.layout, &cluster::apiserver_replica_name(self.port));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn client_for_yaml(kubeconfig: &str) -> kube::Client {
    let parsed = kube::config::Kubeconfig::from_yaml(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(parsed, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

#[tokio::test]
async fn watches_recover_after_the_api_server_restarts() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("apirestart").await;
    let name = node_name();
    let layout = cluster.layout();
    let port = free_port();
    cluster::start_apiserver_replica(layout, port)
        .await
        .unwrap();
    let replica = Replica { layout, port };

    let kubeconfig =
        cluster::with_server_port(&cluster::node_kubeconfig(layout, &name.0).unwrap(), port);
    let vnode = start_node_as(client_for_yaml(&kubeconfig).await, config(&name.0), mock());
    wait_ready(&cluster, &name.0).await;

    let pods = Api::<Pod>::namespaced(cluster.client(), ns.name());
    let create = |pod_name: &'static str| {
        let pods = pods.clone();
        let node = name.0.clone();
        async move {
            pods.create(
                &PostParams::default(),
                &pod(
                    &node,
                    pod_name,
                    serde_json::json!({}),
                    serde_json::json!({}),
                ),
            )
            .await
            .unwrap();
        }
    };
    create("before").await;
    wait_for(
        &pods,
        "before",
        "the pod to run",
        TIMEOUT,
        running_and_ready,
    )
    .await;

    // The node's API server goes away; meanwhile the cluster changes through the other one.
    assert!(
        cluster::down_extra(layout, &cluster::apiserver_replica_name(port)).unwrap(),
        "the replica was running"
    );
    create("during").await;
    pods.delete("before", &DeleteParams::default())
        .await
        .unwrap();

    cluster::start_apiserver_replica(layout, port)
        .await
        .unwrap();
    wait_for(
        &pods,
        "during",
        "the pod created meanwhile to run",
        TIMEOUT,
        running_and_ready,
    )
    .await;
    wait_for_deletion(&pods, "before", TIMEOUT).await;
    let provider = vnode.provider.clone();
    let ns_name = ns.name().to_owned();
    eventually(TIMEOUT, || {
        let (provider, ns_name) = (provider.clone(), ns_name.clone());
        async move {
            let running: BTreeSet<String> = provider
                .list_pods()
                .await
                .unwrap()
                .into_iter()
                .filter(|p| p.pod.namespace == ns_name)
                .map(|p| p.pod.name)
                .collect();
            if running == BTreeSet::from(["during".to_owned()]) {
                Ok(())
            } else {
                Err(format!("the provider runs {running:?}"))
            }
        }
    })
    .await;
    drop(replica);
}
