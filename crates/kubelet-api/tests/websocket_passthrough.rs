//! kubectl exec, attach and port-forward through the real API server to a node that declares
//! `ExtendWebSocketsToKubelet`: the API server (1.36+) then passes kubectl's WebSocket through
//! to the kubelet API unchanged (exec/attach: `v5.channel.k8s.io`; port-forward: SPDY tunnelled
//! in the WebSocket, `SPDY/3.1+portforward.k8s.io`) instead of translating it to SPDY. The
//! node's session counters prove which path was taken: a test cannot pass on the old one.
//! (The other test files run with the feature off, so the translated SPDY path stays covered.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

mod port_forward_support;
mod remote_command_support;

use std::process::Stdio;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use updraft_kubelet_api::streaming::{StreamingConfig, StreamingMetrics};
use updraft_testing::TestCluster;

use remote_command_support::{TIMEOUT, create_pod, running, start_declaring};

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {TIMEOUT:?}"))
}

/// Sessions that reached the kubelet as SPDY (the API server's translation), any endpoint.
fn spdy_sessions(metrics: &StreamingMetrics) -> u64 {
    [
        "v5.channel.k8s.io",
        "v4.channel.k8s.io",
        "v3.channel.k8s.io",
        "v2.channel.k8s.io",
    ]
    .into_iter()
    .flat_map(|p| {
        [
            metrics.sessions("exec", "spdy", p),
            metrics.sessions("attach", "spdy", p),
        ]
    })
    .sum::<u64>()
        + metrics.sessions("portforward", "spdy", "portforward.k8s.io")
}

#[tokio::test]
async fn kubectl_exec_and_attach_reach_the_node_as_websockets() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("ws-pass").await;
    let kubelet = start_declaring(&cluster, StreamingConfig::default(), true).await;
    create_pod(
        &cluster,
        ns.name(),
        &kubelet.name,
        "box",
        serde_json::json!({"containers": [{"name": "main", "image": "busybox"}]}),
        running,
    )
    .await;

    // An exit code comes through as kubectl's own.
    let mut exec = tokio::process::Command::from(cluster.kubectl());
    exec.args([
        "exec",
        "-n",
        ns.name(),
        "box",
        "--",
        "sh",
        "-c",
        "echo out; exit 3",
    ])
    .stdin(Stdio::null())
    .kill_on_drop(true);
    let output = within("kubectl exec", exec.output()).await.unwrap();
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "out\n");

    // stdin piped through cat: 4 MiB come back unchanged.
    let input: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut exec = tokio::process::Command::from(cluster.kubectl());
    exec.args(["exec", "-i", "-n", ns.name(), "box", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut exec = exec.spawn().unwrap();
    let mut stdin = exec.stdin.take().unwrap();
    let sent = input.clone();
    let writer = tokio::spawn(async move {
        stdin.write_all(&sent).await.unwrap();
        drop(stdin);
    });
    let output = within("kubectl exec -i cat", exec.wait_with_output())
        .await
        .unwrap();
    writer.await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        hex::encode(Sha256::digest(&output.stdout)),
        hex::encode(Sha256::digest(&input))
    );

    // attach to a process that answers its stdin.
    create_pod(
        &cluster,
        ns.name(),
        &kubelet.name,
        "echoer",
        serde_json::json!({
            "restartPolicy": "Never",
            "containers": [{
                "name": "main", "image": "busybox", "stdin": true, "stdinOnce": true,
                "command": ["sh", "-c", "while read line; do echo \"got $line\"; done; echo bye"]
            }]
        }),
        running,
    )
    .await;
    let mut attach = tokio::process::Command::from(cluster.kubectl());
    attach
        .args(["attach", "-i", "-n", ns.name(), "echoer", "-c", "main"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut attach = attach.spawn().unwrap();
    let mut stdin = attach.stdin.take().unwrap();
    let mut stdout = attach.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    stdin.write_all(b"hello\n").await.unwrap();
    within("the attached process to answer", async {
        while !String::from_utf8_lossy(&seen).contains("got hello") {
            match tokio::time::timeout(Duration::from_secs(2), stdout.read(&mut buf)).await {
                Ok(Ok(0)) => panic!("kubectl attach ended: {:?}", String::from_utf8_lossy(&seen)),
                Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
                Ok(Err(err)) => panic!("{err}"),
                Err(_) => stdin.write_all(b"hello\n").await.unwrap(),
            }
        }
    })
    .await;
    drop(stdin);
    let mut rest = Vec::new();
    within(
        "kubectl attach to end with the process",
        stdout.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    let status = within("kubectl attach", attach.wait()).await.unwrap();
    assert!(status.success(), "kubectl attach: {status}");
    assert!(String::from_utf8_lossy(&rest).contains("bye"));

    // Proof of the path: every session reached the node as a v5 WebSocket, none as SPDY.
    let metrics = &kubelet.metrics;
    assert_eq!(
        metrics.sessions("exec", "websocket", "v5.channel.k8s.io"),
        2
    );
    assert_eq!(
        metrics.sessions("attach", "websocket", "v5.channel.k8s.io"),
        1
    );
    assert_eq!(spdy_sessions(metrics), 0);
}

/// A loopback TCP server answering each connection with the reverse of what it received
/// after the client half-closes (the mock's pod network is the host's loopback).
async fn reversing_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut received = Vec::new();
                if conn.read_to_end(&mut received).await.is_ok() {
                    received.reverse();
                    let _ = conn.write_all(&received).await;
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_port_forward_reaches_the_node_as_a_spdy_tunnel_in_a_websocket() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("ws-pass-pf").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let node = port_forward_support::start_node_declaring(
        &cluster,
        listener,
        StreamingConfig::default(),
        true,
    )
    .await;
    port_forward_support::running_pod(
        &cluster,
        ns.name(),
        &node.name,
        "web",
        serde_json::json!([{"name": "main", "image": "busybox"}]),
    )
    .await;
    let server_port = reversing_server().await;
    let forward =
        port_forward_support::kubectl_port_forward(&cluster, ns.name(), "web", server_port).await;

    // Several connections at once, one of them 16 MiB, each answered on its own.
    let mut connections = Vec::new();
    for i in 0..6u32 {
        let local_port = forward.local_port;
        connections.push(tokio::spawn(async move {
            let len = if i == 0 {
                16 * 1024 * 1024
            } else {
                1000 + i as usize
            };
            let payload: Vec<u8> = (0..len as u32)
                .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i) >> 11) as u8)
                .collect();
            let conn = TcpStream::connect(("127.0.0.1", local_port)).await.unwrap();
            let (mut rx, mut tx) = conn.into_split();
            let sent = payload.clone();
            let writer = tokio::spawn(async move {
                tx.write_all(&sent).await.unwrap();
                tx.shutdown().await.unwrap();
            });
            let mut answer = Vec::new();
            rx.read_to_end(&mut answer).await.unwrap();
            writer.await.unwrap();
            let mut expected = payload;
            expected.reverse();
            (
                hex::encode(Sha256::digest(&answer)),
                hex::encode(Sha256::digest(&expected)),
            )
        }));
    }
    for connection in connections {
        let (got, expected) = within("a forwarded connection", connection).await.unwrap();
        assert_eq!(got, expected, "kubectl stderr:\n{}", forward.stderr());
    }
    drop(forward);

    // A closed port: kubectl reports the kubelet's error and ends.
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut forward =
        port_forward_support::kubectl_port_forward(&cluster, ns.name(), "web", closed_port).await;
    let mut conn = TcpStream::connect(("127.0.0.1", forward.local_port))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = within(
        "the forwarded connection to end",
        conn.read_to_end(&mut rest),
    )
    .await;
    assert!(rest.is_empty());
    let status = within("kubectl to exit", forward.child.wait())
        .await
        .unwrap();
    let stderr = within("kubectl's stderr", async {
        loop {
            let text = forward.stderr();
            if text.contains("error forwarding port") {
                break text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(!status.success(), "kubectl should fail; stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "error forwarding port {closed_port} to pod {}/web",
            ns.name()
        )) && stderr.contains("refused"),
        "kubectl should print why: {stderr}"
    );

    // Proof of the path: both kubectl sessions reached the node as SPDY tunnelled in a
    // WebSocket, none as plain SPDY.
    let metrics = &node.metrics;
    assert_eq!(
        metrics.sessions("portforward", "websocket", "SPDY/3.1+portforward.k8s.io"),
        2
    );
    assert_eq!(spdy_sessions(metrics), 0);
}
