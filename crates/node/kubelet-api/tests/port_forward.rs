//! `kubectl port-forward` through the real API server to a virtual node's kubelet API. The
//! concurrent-connections and closed-port scenarios run once per [`StreamingPath`]: the node
//! declaring `ExtendWebSocketsToKubelet` (the API server passes kubectl's WebSocket through,
//! SPDY tunnelled inside) and not (the API server unwraps the tunnel and speaks SPDY/3.1 to
//! the node); each checks at the node's `/metrics` that its sessions took that path. The
//! heavy transfers run on the translated path only (the benchmark compares the two).
//!
//! The mock provider's pod network is the host's loopback: forwarding to port P of a mock pod
//! connects to 127.0.0.1:P, so each test runs its own TCP server on a free loopback port.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

#[path = "port_forward_support/mod.rs"]
#[macro_use]
mod support;

use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use updraft_testing::TestCluster;

use support::{
    StreamingPath, TIMEOUT, kubectl_port_forward, kubectl_port_forward_with_env, running_pod,
    start_loopback_node, start_loopback_node_on,
};

const MIB: usize = 1024 * 1024;

/// A loopback TCP server answering each connection with `answer(what it received)` after the
/// client half-closes.
async fn answering_server(answer: fn(Vec<u8>) -> Vec<u8>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut received = Vec::new();
                if conn.read_to_end(&mut received).await.is_ok() {
                    let _ = conn.write_all(&answer(received)).await;
                }
            });
        }
    });
    port
}

/// Deterministic pseudo-random bytes (xorshift), so a transfer's content is not trivially
/// compressible or repetitive.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {TIMEOUT:?}"))
}

test_on_both_paths!(
    several_concurrent_connections_each_get_their_own_answer,
    several_concurrent_connections_each_get_their_own_answer,
    flavor = "multi_thread",
    worker_threads = 4
);

async fn several_concurrent_connections_each_get_their_own_answer(path: StreamingPath) {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("port-forward").await;
    let node = start_loopback_node_on(&cluster, path).await;
    running_pod(
        &cluster,
        ns.name(),
        &node.name,
        "web",
        serde_json::json!([{"name": "main", "image": "busybox"}]),
    )
    .await;
    let server_port = answering_server(|mut got| {
        got.reverse();
        got
    })
    .await;
    let forward = kubectl_port_forward(&cluster, ns.name(), "web", server_port).await;

    let clients = (0..8u64).map(|i| {
        let port = forward.local_port;
        tokio::spawn(async move {
            let message = pattern(64 * 1024 + usize::try_from(i).unwrap(), i + 1);
            let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            conn.write_all(&message).await.unwrap();
            conn.shutdown().await.unwrap();
            let mut answer = Vec::new();
            conn.read_to_end(&mut answer).await.unwrap();
            let mut expected = message;
            expected.reverse();
            assert!(
                answer == expected,
                "connection {i}: got {} bytes back, not its own message reversed",
                answer.len()
            );
        })
    });
    within(
        "8 concurrent forwarded connections",
        futures::future::try_join_all(clients),
    )
    .await
    .unwrap();
    // The session survives its connections: one more after all of them.
    let mut conn = TcpStream::connect(("127.0.0.1", forward.local_port))
        .await
        .unwrap();
    conn.write_all(b"again").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut answer = Vec::new();
    within(
        "a connection after the others",
        conn.read_to_end(&mut answer),
    )
    .await
    .unwrap();
    assert_eq!(answer, b"niaga", "kubectl stderr:\n{}", forward.stderr());
    node.assert_sessions_took(&cluster, path, "portforward", 1)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_100_mib_download_and_upload_keep_their_sha256() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("port-forward").await;
    let node = start_loopback_node(&cluster).await;
    running_pod(
        &cluster,
        ns.name(),
        &node.name,
        "bulk",
        serde_json::json!([{"name": "main", "image": "busybox"}]),
    )
    .await;

    // Download: the server sends 100 MiB and closes.
    let payload = pattern(100 * MIB, 42);
    let expected = hex::encode(Sha256::digest(&payload));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let download_port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        conn.write_all(&payload).await.unwrap();
        conn.shutdown().await.unwrap();
    });
    // Upload: the server hashes what it receives and answers with the hex digest.
    let upload_port = answering_server(|got| hex::encode(Sha256::digest(&got)).into_bytes()).await;

    let download = kubectl_port_forward(&cluster, ns.name(), "bulk", download_port).await;
    let mut conn = TcpStream::connect(("127.0.0.1", download.local_port))
        .await
        .unwrap();
    let mut hasher = Sha256::new();
    let mut received = 0usize;
    let mut buffer = vec![0u8; MIB];
    within("downloading 100 MiB", async {
        loop {
            let n = conn.read(&mut buffer).await.unwrap();
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            received += n;
        }
    })
    .await;
    assert_eq!(
        received,
        100 * MIB,
        "kubectl stderr:\n{}",
        download.stderr()
    );
    assert_eq!(hex::encode(hasher.finalize()), expected);

    let upload = kubectl_port_forward(&cluster, ns.name(), "bulk", upload_port).await;
    let payload = pattern(100 * MIB, 7);
    let expected = hex::encode(Sha256::digest(&payload));
    let mut conn = TcpStream::connect(("127.0.0.1", upload.local_port))
        .await
        .unwrap();
    let answer = within("uploading 100 MiB", async {
        let (mut rx, mut tx) = conn.split();
        let send = async {
            tx.write_all(&payload).await.unwrap();
            tx.shutdown().await.unwrap();
        };
        let mut answer = String::new();
        let receive = rx.read_to_string(&mut answer);
        let ((), read) = tokio::join!(send, receive);
        read.unwrap();
        answer
    })
    .await;
    assert_eq!(answer, expected, "kubectl stderr:\n{}", upload.stderr());
}

test_on_both_paths!(
    a_connection_to_a_closed_port_is_reported_as_an_error_not_a_hang,
    a_connection_to_a_closed_port_is_reported_as_an_error_not_a_hang,
    flavor = "multi_thread",
    worker_threads = 4
);

async fn a_connection_to_a_closed_port_is_reported_as_an_error_not_a_hang(path: StreamingPath) {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("port-forward").await;
    let node = start_loopback_node_on(&cluster, path).await;
    running_pod(
        &cluster,
        ns.name(),
        &node.name,
        "nothing",
        serde_json::json!([{"name": "main", "image": "busybox"}]),
    )
    .await;
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut forward = kubectl_port_forward(&cluster, ns.name(), "nothing", closed_port).await;

    let mut conn = TcpStream::connect(("127.0.0.1", forward.local_port))
        .await
        .unwrap();
    let mut rest = Vec::new();
    // kubectl closes the local connection once the error arrives (EOF or a reset: either way
    // not a hang).
    let _ = within(
        "the forwarded connection to end",
        conn.read_to_end(&mut rest),
    )
    .await;
    assert!(rest.is_empty());
    // kubectl prints the kubelet's error and, since client-go 1.31, ends the session.
    let status = within("kubectl to exit", forward.child.wait())
        .await
        .unwrap();
    let stderr = within("kubectl's stderr", async {
        loop {
            let text = forward.stderr();
            if text.contains("lost connection to pod")
                || text.contains("error forwarding port") && text.contains("refused")
            {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(!status.success(), "kubectl should fail; stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "error forwarding port {closed_port} to pod {}/nothing",
            ns.name()
        )) && stderr.contains("refused"),
        "kubectl should print why: {stderr}"
    );
    node.assert_sessions_took(&cluster, path, "portforward", 1)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_kubectl_goes_away_the_connection_in_the_pod_is_closed() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("port-forward").await;
    let node = start_loopback_node(&cluster).await;
    running_pod(
        &cluster,
        ns.name(),
        &node.name,
        "held",
        serde_json::json!([{"name": "main", "image": "busybox"}]),
    )
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_port = listener.local_addr().unwrap().port();
    let mut forward = kubectl_port_forward(&cluster, ns.name(), "held", server_port).await;

    let mut conn = TcpStream::connect(("127.0.0.1", forward.local_port))
        .await
        .unwrap();
    conn.write_all(b"ping").await.unwrap();
    let (mut in_pod, _) = within("the forwarded connection to arrive", listener.accept())
        .await
        .unwrap();
    let mut ping = [0u8; 4];
    within("the first bytes", in_pod.read_exact(&mut ping))
        .await
        .unwrap();
    assert_eq!(&ping, b"ping");

    forward.child.kill().await.unwrap();
    // The pod side sees its connection end (EOF or reset), not an open socket forever.
    let mut rest = Vec::new();
    let _ = within(
        "the pod-side connection to close",
        in_pod.read_to_end(&mut rest),
    )
    .await;
    drop(conn);
}

/// Legacy clients speak SPDY to the API server, which passes the upgrade through to the node
/// unchanged: kubectl does so with its WebSocket port-forward turned off. They arrive as SPDY
/// also at a node declaring `ExtendWebSocketsToKubelet` (Updraft's default).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_port_forward_over_spdy_end_to_end() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("port-forward").await;
    let node = start_loopback_node_on(&cluster, StreamingPath::Passthrough).await;
    running_pod(
        &cluster,
        ns.name(),
        &node.name,
        "legacy",
        serde_json::json!([{"name": "main", "image": "busybox"}]),
    )
    .await;
    let server_port = answering_server(|mut got| {
        got.reverse();
        got
    })
    .await;
    let forward = kubectl_port_forward_with_env(
        &cluster,
        ns.name(),
        "legacy",
        server_port,
        &[("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")],
    )
    .await;
    let message = pattern(256 * 1024, 7);
    let mut conn = TcpStream::connect(("127.0.0.1", forward.local_port))
        .await
        .unwrap();
    conn.write_all(&message).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut answer = Vec::new();
    within("the answer over SPDY", conn.read_to_end(&mut answer))
        .await
        .unwrap();
    let mut expected = message;
    expected.reverse();
    assert!(
        answer == expected,
        "got {} bytes back, not the message reversed; kubectl stderr:\n{}",
        answer.len(),
        forward.stderr()
    );
    node.assert_sessions(&cluster, "portforward", "spdy", "portforward.k8s.io", 1)
        .await;
}
