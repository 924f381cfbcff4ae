//! The kubelet port's authentication and authorization against the real API server: direct
//! clients with and without credentials, and the API server's own node proxy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, LogParams, Patch, PatchParams, PostParams};
use updraft_devcluster::pki::{CertificateAuthority, Identity};
use updraft_kubelet_api::auth::{Auth, AuthConfig};
use updraft_kubelet_api::server::{protect, serve};
use updraft_kubelet_api::tls::{ServingCertificate, server_config};
use updraft_testing::{TestCluster, unique_name};

struct KubeletPort {
    port: u16,
    ca_pem: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for KubeletPort {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Serves a tiny router on 127.0.0.1 the way an Updraft node serves its kubelet port: a
/// serving certificate from the cluster CA, client certificates verified against it, reviews
/// made with the node's own identity.
async fn start_kubelet_port(cluster: &TestCluster, node: &str) -> KubeletPort {
    let ca = CertificateAuthority::load(&cluster.layout().pki()).unwrap();
    let serving = ca
        .issue(&Identity::loopback_server(node, &["localhost"]))
        .unwrap();
    let serving =
        ServingCertificate::from_pem(serving.cert_pem.as_bytes(), serving.key_pem.as_bytes())
            .unwrap();
    let tls = server_config(serving, Some(ca.cert_pem().as_bytes())).unwrap();
    let auth = Arc::new(Auth::new(
        cluster.node_client(node).await,
        AuthConfig::new(node),
    ));
    let app = protect(
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/containerLogs/{ns}/{pod}/{container}",
                get(|| async { "log line\n" }),
            ),
        auth,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, tls, app, async {
        let _ = rx.await;
    }));
    KubeletPort {
        port,
        ca_pem: ca.cert_pem().to_owned(),
        shutdown: Some(tx),
    }
}

fn https_client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn service_account_token(cluster: &TestCluster, namespace: &str, name: &str) -> String {
    let sa: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    Api::<ServiceAccount>::namespaced(cluster.client(), namespace)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let kubeconfig = updraft_devcluster::cluster::service_account_kubeconfig(
        cluster.layout(),
        namespace,
        name,
        600,
    )
    .await
    .unwrap();
    kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn requests_without_credentials_get_401_and_a_token_without_nodes_proxy_gets_403() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("kubelet-auth").await;
    let node = unique_name("auth-node");
    let kubelet = start_kubelet_port(&cluster, &node).await;
    let client = https_client(&kubelet.ca_pem);
    let url = format!("https://127.0.0.1:{}/containerLogs/a/b/c", kubelet.port);

    let anonymous = client.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);

    let garbage = client
        .get(&url)
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 401);

    let token = service_account_token(&cluster, ns.name(), "reader").await;
    let forbidden = client.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(forbidden.status(), 403);
    let body = forbidden.text().await.unwrap();
    assert!(
        body.contains("verb=get") && body.contains("subresource=proxy") && body.contains(":reader"),
        "403 body should name the user, verb and subresource: {body}"
    );
}

#[tokio::test]
async fn a_token_granted_nodes_proxy_is_allowed() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("kubelet-auth").await;
    let node = unique_name("auth-node");
    let kubelet = start_kubelet_port(&cluster, &node).await;
    let token = service_account_token(&cluster, ns.name(), "log-reader").await;

    let role_name = unique_name("updraft-test-nodes-proxy");
    let role: ClusterRole = serde_json::from_value(serde_json::json!({
        "metadata": {"name": role_name},
        "rules": [{"apiGroups": [""], "resources": ["nodes/proxy"], "verbs": ["get"]}]
    }))
    .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": role_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "name": "log-reader", "namespace": ns.name()}]
    }))
    .unwrap();
    let roles = Api::<ClusterRole>::all(cluster.client());
    let bindings = Api::<ClusterRoleBinding>::all(cluster.client());
    roles.create(&PostParams::default(), &role).await.unwrap();
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    let client = https_client(&kubelet.ca_pem);
    let url = format!("https://127.0.0.1:{}/containerLogs/a/b/c", kubelet.port);
    let allowed = client.get(&url).bearer_auth(&token).send().await.unwrap();
    let status = allowed.status();
    let body = allowed.text().await.unwrap();

    let _ = bindings.delete(&role_name, &DeleteParams::default()).await;
    let _ = roles.delete(&role_name, &DeleteParams::default()).await;
    assert_eq!((status.as_u16(), body.as_str()), (200, "log line\n"));
}

/// The API server calls kubelets with its kubelet-client certificate (bound to
/// `system:kubelet-api-admin`) and verifies our serving certificate against the cluster CA.
/// Pod logs are the path for it: the node proxy (`nodes/NAME/proxy`) refuses loopback node
/// addresses by design (only global unicast addresses are proxyable).
#[tokio::test]
async fn the_api_server_reaches_the_kubelet_port_for_pod_logs() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("kubelet-auth").await;
    let node_name = unique_name("logs-node");
    let kubelet = start_kubelet_port(&cluster, &node_name).await;

    // A Node that points at our port, as the node controller registers it.
    let nodes = Api::<Node>::all(cluster.client());
    let node: Node =
        serde_json::from_value(serde_json::json!({"metadata": {"name": node_name}})).unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let status = serde_json::json!({"status": {
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet.port}}
    }});
    nodes
        .patch_status(&node_name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let pods = Api::<Pod>::namespaced(cluster.client(), ns.name());
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "talker"},
        "spec": {"nodeName": node_name, "containers": [{"name": "main", "image": "busybox"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();

    let logs = pods
        .logs(
            "talker",
            &LogParams {
                container: Some("main".into()),
                ..Default::default()
            },
        )
        .await;
    let _ = nodes.delete(&node_name, &DeleteParams::default()).await;
    assert_eq!(logs.unwrap(), "log line\n");
}
