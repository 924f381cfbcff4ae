//! Updraft under the least-privilege ClusterRole of `deploy/rbac.yaml`, as a service account
//! (the node-identity case is what every other test runs under).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

mod support;

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, DeleteParams, PostParams};
use serde::Deserialize as _;
use support::*;
use updraft_testing::{TestCluster, unique_name, wait_for};

const RBAC: &str = include_str!("../../../../deploy/rbac.yaml");

/// Deletes the test's cluster-scoped RBAC objects at the end.
struct ClusterRbac(String);

impl Drop for ClusterRbac {
    fn drop(&mut self) {
        let name = self.0.clone();
        updraft_testing::cleanup_as_admin(move |client| async move {
            let _ = Api::<ClusterRoleBinding>::all(client.clone())
                .delete(&name, &DeleteParams::default())
                .await;
            let _ = Api::<ClusterRole>::all(client.clone())
                .delete(&name, &DeleteParams::default())
                .await;
            let _ = Api::<RoleBinding>::namespaced(client.clone(), "kube-node-lease")
                .delete(&name, &DeleteParams::default())
                .await;
            let _ = Api::<Role>::namespaced(client, "kube-node-lease")
                .delete(&name, &DeleteParams::default())
                .await;
        });
    }
}

#[tokio::test]
async fn updraft_runs_under_the_least_privilege_cluster_role() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("rbac").await;
    let admin = cluster.client();
    // The manifests as shipped, in this test's namespace and under unique cluster-wide names.
    let cluster_name = unique_name("updraft-test-rbac");
    let rbac_guard = ClusterRbac(cluster_name.clone());
    let text = RBAC.replace("updraft-system", ns.name());
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_json::Value::deserialize(document).unwrap();
        let post = PostParams::default();
        match value["kind"].as_str().unwrap() {
            "ServiceAccount" => {
                let sa: ServiceAccount = serde_json::from_value(value).unwrap();
                Api::<ServiceAccount>::namespaced(admin.clone(), ns.name())
                    .create(&post, &sa)
                    .await
                    .unwrap();
            }
            "ClusterRole" => {
                let mut role: ClusterRole = serde_json::from_value(value).unwrap();
                role.metadata.name = Some(cluster_name.clone());
                Api::<ClusterRole>::all(admin.clone())
                    .create(&post, &role)
                    .await
                    .unwrap();
            }
            "ClusterRoleBinding" => {
                let mut binding: ClusterRoleBinding = serde_json::from_value(value).unwrap();
                binding.metadata.name = Some(cluster_name.clone());
                binding.role_ref.name = cluster_name.clone();
                Api::<ClusterRoleBinding>::all(admin.clone())
                    .create(&post, &binding)
                    .await
                    .unwrap();
            }
            "Role" => {
                let mut role: Role = serde_json::from_value(value).unwrap();
                role.metadata.name = Some(cluster_name.clone());
                let _ = Api::<Role>::namespaced(admin.clone(), "kube-node-lease")
                    .create(&post, &role)
                    .await;
            }
            "RoleBinding" => {
                let mut binding: RoleBinding = serde_json::from_value(value).unwrap();
                binding.metadata.name = Some(cluster_name.clone());
                binding.role_ref.name = cluster_name.clone();
                let _ = Api::<RoleBinding>::namespaced(admin.clone(), "kube-node-lease")
                    .create(&post, &binding)
                    .await;
            }
            other => panic!("unexpected kind {other} in deploy/rbac.yaml"),
        }
    }

    let kubeconfig = updraft_devcluster::cluster::service_account_kubeconfig(
        cluster.layout(),
        ns.name(),
        "updraft",
        3600,
    )
    .await
    .unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), kubeconfig).unwrap();
    let client = updraft_devcluster::cluster::client_for(file.path())
        .await
        .unwrap();

    let name = node_name();
    let vnode = start_node_as(client, config(&name.0), mock());
    wait_ready(&cluster, &name.0).await;
    let pods = Api::<Pod>::namespaced(admin.clone(), ns.name());
    let none = serde_json::json!({});
    pods.create(
        &PostParams::default(),
        &pod(&name.0, "least", none.clone(), none),
    )
    .await
    .unwrap();
    wait_for(&pods, "least", "the pod to run", TIMEOUT, running_and_ready).await;
    pods.delete("least", &DeleteParams::default())
        .await
        .unwrap();
    updraft_testing::wait_for_deletion(&pods, "least", TIMEOUT).await;
    assert_eq!(vnode.provider.pod_count(), 0);
    drop(rbac_guard);
}
