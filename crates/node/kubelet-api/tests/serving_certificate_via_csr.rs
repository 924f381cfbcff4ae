//! The serving certificate obtained through a kubelet-serving CSR, signed by the real
//! controller manager once approved, and trusted by the API server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, ListParams, Patch, PatchParams};
use updraft_kubelet_api::csr::{CsrError, ServingRequest, request_serving_certificate};
use updraft_testing::{TestCluster, eventually, unique_name};

async fn decide(cluster: &TestCluster, node: &str, approve: bool) {
    let api = Api::<CertificateSigningRequest>::all(cluster.client());
    let user = format!("system:node:{node}");
    let name = eventually(Duration::from_secs(30), || async {
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .into_iter()
            .find(|csr| csr.spec.username.as_deref() == Some(user.as_str()))
            .and_then(|csr| csr.metadata.name)
            .ok_or_else(|| format!("no CSR from {user} yet"))
    })
    .await;
    let condition = if approve { "Approved" } else { "Denied" };
    let patch = serde_json::json!({"status": {"conditions": [{
        "type": condition, "status": "True", "reason": "UpdraftTest", "message": "decided by the test"
    }]}});
    api.patch_approval(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_approved_csr_yields_a_certificate_for_the_nodes_addresses() {
    let cluster = TestCluster::connect().await;
    let node = unique_name("csr-node");
    let request = ServingRequest {
        node_name: node.clone(),
        ip_addresses: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        dns_names: vec![node.clone()],
        signing_timeout: Duration::from_secs(60),
    };
    let (issued, ()) = tokio::join!(
        request_serving_certificate(cluster.node_client(&node).await, &request),
        decide(&cluster, &node, true)
    );
    let issued = issued.unwrap();
    assert!(issued.cert_pem.contains("BEGIN CERTIFICATE"));
    assert!(issued.not_after > std::time::SystemTime::now() + Duration::from_secs(3600));
    // The key and the certificate belong together and rustls accepts them for serving.
    updraft_kubelet_api::tls::ServingCertificate::from_pem(
        issued.cert_pem.as_bytes(),
        issued.key_pem.as_bytes(),
    )
    .unwrap();
}

#[tokio::test]
async fn a_denied_csr_is_reported_with_its_reason() {
    let cluster = TestCluster::connect().await;
    let node = unique_name("csr-node");
    let request = ServingRequest {
        node_name: node.clone(),
        ip_addresses: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        dns_names: vec![],
        signing_timeout: Duration::from_secs(60),
    };
    let (issued, ()) = tokio::join!(
        request_serving_certificate(cluster.node_client(&node).await, &request),
        decide(&cluster, &node, false)
    );
    match issued {
        Err(CsrError::Refused {
            condition, message, ..
        }) => {
            assert_eq!(condition, "Denied");
            assert!(message.contains("UpdraftTest"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}
