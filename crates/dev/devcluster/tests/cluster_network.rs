//! What pods on cells rely on from the dev control plane, against the running one: the
//! `kubernetes` Service's endpoint is the host address (not loopback, which no cell reaches),
//! and the cluster DNS answers for Services on it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use updraft_devcluster::coredns::CLUSTER_DNS_IP;
use updraft_devcluster::host_address::HOST_ADDRESS;
use updraft_devcluster::{Layout, cluster};

async fn admin() -> kube::Client {
    cluster::admin_client(&Layout::for_workspace())
        .await
        .expect("no control plane is up: run `cargo xtask cluster up` (or `cargo xtask test`)")
}

#[tokio::test]
async fn the_kubernetes_service_points_at_the_host_address() {
    let slice = Api::<EndpointSlice>::namespaced(admin().await, "default")
        .get("kubernetes")
        .await
        .unwrap();
    let addresses: Vec<String> = slice
        .endpoints
        .iter()
        .flatten()
        .flat_map(|e| e.addresses.clone())
        .collect();
    assert_eq!(addresses, [HOST_ADDRESS.to_string()], "{slice:?}");
}

#[tokio::test]
async fn the_cluster_dns_answers_for_services_on_the_host_address() {
    // The API server is up once `admin` connects; CoreDNS's first sync may still be running.
    let _ = admin().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match resolve("kube-dns.kube-system.svc.cluster.local") {
            Ok(Some(ip)) => {
                assert_eq!(ip, CLUSTER_DNS_IP);
                break;
            }
            other if std::time::Instant::now() > deadline => {
                panic!("CoreDNS on {HOST_ADDRESS}:53 did not answer within 60 s: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    assert_eq!(
        resolve("kubernetes.default.svc.cluster.local").unwrap(),
        Some(Ipv4Addr::new(10, 96, 0, 1))
    );
    assert_eq!(
        resolve("no-such-service.default.svc.cluster.local").unwrap(),
        None
    );
}

/// One A query to the cluster DNS: the first address of the answer, `None` for no answer.
fn resolve(name: &str) -> std::io::Result<Option<Ipv4Addr>> {
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(u8::try_from(label.len()).unwrap());
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    socket.send_to(&query, (HOST_ADDRESS, 53))?;
    let mut answer = [0u8; 512];
    let n = socket.recv(&mut answer)?;
    let answers = u16::from_be_bytes([answer[6], answer[7]]);
    let rcode = answer[3] & 0x0f;
    if rcode != 0 && rcode != 3 {
        return Err(std::io::Error::other(format!("DNS rcode {rcode}")));
    }
    if answers == 0 || n < 4 {
        return Ok(None);
    }
    // A single A record ends the message with its four address bytes.
    Ok(Some(Ipv4Addr::new(
        answer[n - 4],
        answer[n - 3],
        answer[n - 2],
        answer[n - 1],
    )))
}
