//! `/healthz`, `/pods` and `/runningpods/` on the kubelet port, read as the API server reads
//! them (its kubelet client certificate), with the node serving pod lookups from its own
//! watch cache.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

mod remote_command_support;

use k8s_openapi::api::core::v1::Pod;
use kube::api::ObjectList;
use remote_command_support::{Kubelet, idle_pod, start};
use updraft_testing::TestCluster;

/// An HTTPS client of the kubelet port with the API server's kubelet client certificate.
fn kubelet_client(cluster: &TestCluster, kubelet: &Kubelet) -> reqwest::Client {
    let pki = cluster.layout().pki();
    let mut identity = std::fs::read(pki.join("apiserver-kubelet-client.crt")).unwrap();
    identity.extend(std::fs::read(pki.join("apiserver-kubelet-client.key")).unwrap());
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(kubelet.ca_pem.as_bytes()).unwrap())
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test]
async fn healthz_pods_and_running_pods_list_this_nodes_pods() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("kubelet-pods").await;
    let kubelet = start(&cluster).await;
    let pod = idle_pod(&cluster, ns.name(), &kubelet.name, "listed").await;
    let client = kubelet_client(&cluster, &kubelet);
    let base = format!("https://127.0.0.1:{}", kubelet.port);

    let healthz = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert!(healthz.status().is_success());
    assert_eq!(healthz.text().await.unwrap(), "ok");

    let pods: ObjectList<Pod> = client
        .get(format!("{base}/pods"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = pods
        .items
        .iter()
        .find(|p| p.metadata.namespace.as_deref() == Some(ns.name()))
        .expect("the pod in /pods");
    assert_eq!(listed.metadata.uid, pod.metadata.uid);
    assert!(
        pods.items.iter().all(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(kubelet.name.as_str())
        }),
        "/pods lists only this node's pods"
    );

    let running_pods: serde_json::Value = client
        .get(format!("{base}/runningpods/"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let running = running_pods["items"]
        .as_array()
        .expect("a list")
        .iter()
        .find(|p| p["metadata"]["namespace"] == ns.name())
        .expect("the pod in /runningpods/");
    assert_eq!(running["metadata"]["name"], "listed");
    assert_eq!(
        running["metadata"]["uid"].as_str(),
        pod.metadata.uid.as_deref()
    );

    // A pod the node does not have is 404, on every per-pod endpoint.
    for path in [
        format!("/containerLogs/{}/absent/main", ns.name()),
        format!("/exec/{}/absent/main?command=true&stdout=1", ns.name()),
        format!("/portForward/{}/absent", ns.name()),
    ] {
        let response = client.post(format!("{base}{path}")).send().await.unwrap();
        // Logs answer GET only; exec and port-forward answer any method.
        let response = if response.status() == reqwest::StatusCode::METHOD_NOT_ALLOWED {
            client.get(format!("{base}{path}")).send().await.unwrap()
        } else {
            response
        };
        assert_eq!(response.status(), reqwest::StatusCode::NOT_FOUND, "{path}");
        let body = response.text().await.unwrap();
        assert!(body.contains("is not on node"), "{path}: {body}");
    }
}
