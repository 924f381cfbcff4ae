//! WebSocket port-forwarding: a WebSocket client straight to the kubelet port (as clients that
//! reach kubelets directly use it), and kube-rs's port-forward through the API server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

#[path = "port_forward_support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use updraft_testing::TestCluster;

use support::{KubeletNode, TIMEOUT, running_pod, start_loopback_node};

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {TIMEOUT:?}"))
}

/// A loopback echo server (echoes as it reads); sends `()` on `closed` when a connection ends.
async fn echo_server() -> (u16, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buffer).await {
                    if n == 0 || conn.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = closed_tx.send(());
            });
        }
    });
    (port, closed)
}

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Opens a WebSocket to the kubelet port as the API server's kubelet client (mTLS).
async fn kubelet_websocket(
    cluster: &TestCluster,
    node: &KubeletNode,
    path_and_query: &str,
    protocol: &str,
) -> (Socket, String) {
    let pki = cluster.layout().pki();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(node.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(pki.join("apiserver-kubelet-client.crt"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_file(pki.join("apiserver-kubelet-client.key")).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    let tcp = TcpStream::connect((node.address, node.port)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(node.address.into()), tcp)
        .await
        .unwrap();
    let url = format!("wss://{}:{}{path_and_query}", node.address, node.port);
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (socket, response) = tokio_tungstenite::client_async(request, tls)
        .await
        .unwrap_or_else(|err| panic!("WebSocket to {path_and_query}: {err}"));
    let chosen = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (socket, chosen)
}

/// Reads binary channel messages until `done` says enough; returns everything per channel.
async fn collect_channels(
    socket: &mut Socket,
    mut done: impl FnMut(&HashMap<u8, Vec<u8>>) -> bool,
) -> HashMap<u8, Vec<u8>> {
    let mut channels: HashMap<u8, Vec<u8>> = HashMap::new();
    within("the expected channel data", async {
        while !done(&channels) {
            match socket.next().await {
                Some(Ok(Message::Binary(data))) if !data.is_empty() => {
                    channels
                        .entry(data[0])
                        .or_default()
                        .extend_from_slice(&data[1..]);
                }
                Some(Ok(_)) => {}
                other => panic!("the WebSocket ended early: {other:?}; so far {channels:?}"),
            }
        }
    })
    .await;
    channels
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_websocket_client_straight_to_the_kubelet_forwards_ports_and_reports_a_closed_one() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("pf-websocket").await;
    let node = start_loopback_node(&cluster).await;
    running_pod(
        &cluster,
        ns.name(),
        &node.name,
        "web",
        serde_json::json!([{"name": "main", "image": "busybox"}]),
    )
    .await;
    let (echo_port, mut echo_closed) = echo_server().await;
    let closed = closed_port();

    let path = format!(
        "/portForward/{}/web?port={echo_port}&port={closed}",
        ns.name()
    );
    let (mut socket, protocol) =
        kubelet_websocket(&cluster, &node, &path, "v4.channel.k8s.io").await;
    assert_eq!(protocol, "v4.channel.k8s.io");

    // The first message on every channel is its port, 2 bytes little-endian; the closed port's
    // error channel then carries the kubelet's error.
    let channels = collect_channels(&mut socket, |c| {
        (0..4).all(|ch| c.get(&ch).is_some_and(|d| d.len() >= 2))
            && c.get(&3)
                .is_some_and(|d| String::from_utf8_lossy(d).contains("refused"))
    })
    .await;
    assert_eq!(channels[&0][..2], echo_port.to_le_bytes());
    assert_eq!(channels[&1], echo_port.to_le_bytes());
    assert_eq!(channels[&2][..2], closed.to_le_bytes());
    let error = String::from_utf8_lossy(&channels[&3][2..]).into_owned();
    assert!(
        error.contains(&format!(
            "error forwarding port {closed} to pod {}/web",
            ns.name()
        )),
        "{error}"
    );

    socket
        .send(Message::binary(b"\x00hello over websocket".to_vec()))
        .await
        .unwrap();
    let echoed = collect_channels(&mut socket, |c| c.get(&0).is_some_and(|d| d.len() >= 20)).await;
    assert_eq!(echoed[&0], b"hello over websocket");

    // Closing the WebSocket closes the connection in the pod.
    socket.close(None).await.unwrap();
    within("the pod-side connection to close", echo_closed.recv())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_base64_subprotocol_carries_the_same_channels_as_text() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("pf-websocket").await;
    let node = start_loopback_node(&cluster).await;
    running_pod(
        &cluster,
        ns.name(),
        &node.name,
        "web",
        serde_json::json!([{"name": "main", "image": "busybox"}]),
    )
    .await;
    let (echo_port, _closed) = echo_server().await;

    let path = format!("/portForward/{}/web?port={echo_port}", ns.name());
    let (mut socket, protocol) =
        kubelet_websocket(&cluster, &node, &path, "v4.base64.channel.k8s.io").await;
    assert_eq!(protocol, "v4.base64.channel.k8s.io");
    let b64 = base64::engine::general_purpose::STANDARD;
    socket
        .send(Message::text(format!("0{}", b64.encode(b"text frames"))))
        .await
        .unwrap();
    let mut data = Vec::new();
    within("the echo", async {
        while data.len() < 2 + 11 {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    let (channel, payload) = text.as_str().split_at(1);
                    if channel == "0" {
                        data.extend(b64.decode(payload).unwrap());
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("the WebSocket ended early: {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(&data[..2], echo_port.to_le_bytes());
    assert_eq!(&data[2..], b"text frames");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kube_rs_port_forward_through_the_api_server() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("pf-websocket").await;
    let node = start_loopback_node(&cluster).await;
    running_pod(
        &cluster,
        ns.name(),
        &node.name,
        "web",
        serde_json::json!([{"name": "main", "image": "busybox"}]),
    )
    .await;
    let (echo_port, _closed) = echo_server().await;

    let pods = Api::<Pod>::namespaced(cluster.client(), ns.name());
    let mut forwarder = within(
        "the port-forward upgrade",
        pods.portforward("web", &[echo_port]),
    )
    .await
    .unwrap();
    let mut stream = forwarder.take_stream(echo_port).unwrap();
    stream.write_all(b"through the API server").await.unwrap();
    let mut echoed = [0u8; 22];
    within("the echo", stream.read_exact(&mut echoed))
        .await
        .unwrap();
    assert_eq!(&echoed, b"through the API server");
    drop(stream);
    forwarder.abort();
}
