//! A WebSocket client straight to the kubelet port (as API servers with
//! ExtendWebSocketsToKubelet and kube-rs-style clients do): exec over `v5.channel.k8s.io` and
//! `v4.base64.channel.k8s.io`, and garbage that closes only its own connection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

mod remote_command_support;

use std::sync::Arc;

use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use remote_command_support::{TIMEOUT, idle_pod, start, start_with};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use updraft_kubelet_api::streaming::StreamingConfig;
use updraft_testing::TestCluster;

type Socket = WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Opens `path` on the kubelet port as the API server would (its kubelet client certificate),
/// offering `protocol`.
async fn connect(
    cluster: &TestCluster,
    port: u16,
    ca_pem: &str,
    path: &str,
    protocol: &str,
) -> Socket {
    let pki = cluster.layout().pki();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(pki.join("apiserver-kubelet-client.crt"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(pki.join("apiserver-kubelet-client.key")).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            tcp,
        )
        .await
        .unwrap();
    let mut request = format!("wss://127.0.0.1:{port}{path}")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (socket, response) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    assert_eq!(
        response.headers().get("Sec-WebSocket-Protocol").unwrap(),
        protocol,
        "the server chose the protocol offered"
    );
    socket
}

/// Collects channel output until the server closes: (stdout, stderr, error status).
async fn collect(socket: &mut Socket, base64: bool) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut channels: [Vec<u8>; 4] = Default::default();
    loop {
        let message = tokio::time::timeout(TIMEOUT, socket.next())
            .await
            .expect("the session ends");
        let (channel, data) = match message {
            Some(Ok(Message::Binary(data))) if !base64 => match data.split_first() {
                Some((channel, data)) => (*channel, data.to_vec()),
                None => continue,
            },
            Some(Ok(Message::Text(text))) if base64 => {
                let bytes = text.as_bytes();
                let Some((channel, data)) = bytes.split_first() else {
                    continue;
                };
                (
                    channel - b'0',
                    base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .unwrap(),
                )
            }
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(other)) => panic!("unexpected message {other:?}"),
            Some(Err(err)) => panic!("{err}"),
        };
        channels[usize::from(channel)].extend_from_slice(&data);
    }
    let [_, stdout, stderr, error] = channels;
    (stdout, stderr, error)
}

#[tokio::test]
async fn exec_over_websocket_v5_and_v4_base64_with_stdin_close_and_exit_codes() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("rc-ws").await;
    let kubelet = start(&cluster).await;
    idle_pod(&cluster, ns.name(), &kubelet.name, "box").await;
    let exec = |command: &str| {
        let command: String = url_encode(command);
        format!(
            "/exec/{}/box/main?command=sh&command=-c&command={command}&stdin=1&stdout=1&stderr=1",
            ns.name()
        )
    };

    // v5: stdin, then the close signal ([255, 0]) ends `cat`'s input.
    let mut socket = connect(
        &cluster,
        kubelet.port,
        &kubelet.ca_pem,
        &exec("cat; echo done >&2; exit 3"),
        "v5.channel.k8s.io",
    )
    .await;
    socket
        .send(Message::Binary(b"\x00hello ".to_vec().into()))
        .await
        .unwrap();
    socket
        .send(Message::Binary(b"\x00world".to_vec().into()))
        .await
        .unwrap();
    socket
        .send(Message::Binary(vec![255, 0].into()))
        .await
        .unwrap();
    let (stdout, stderr, error) = collect(&mut socket, false).await;
    assert_eq!(stdout, b"hello world");
    assert_eq!(stderr, b"done\n");
    let status: serde_json::Value = serde_json::from_slice(&error).unwrap();
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "NonZeroExitCode");
    assert_eq!(status["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "3");

    // v4 base64: text messages, channel as a digit.
    let mut socket = connect(
        &cluster,
        kubelet.port,
        &kubelet.ca_pem,
        &exec("echo base64 works"),
        "v4.base64.channel.k8s.io",
    )
    .await;
    let (stdout, _, error) = collect(&mut socket, true).await;
    assert_eq!(stdout, b"base64 works\n");
    let status: serde_json::Value = serde_json::from_slice(&error).unwrap();
    assert_eq!(status["status"], "Success");
}

#[tokio::test]
async fn garbage_frames_close_only_their_own_connection() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("rc-ws-garbage").await;
    let kubelet = start(&cluster).await;
    idle_pod(&cluster, ns.name(), &kubelet.name, "box").await;
    let path = |command: &str| {
        format!(
            "/exec/{}/box/main?command=sh&command=-c&command={}&stdin=1&stdout=1",
            ns.name(),
            url_encode(command)
        )
    };
    // A healthy session stays open across the garbage: it waits for its stdin.
    let mut healthy = connect(
        &cluster,
        kubelet.port,
        &kubelet.ca_pem,
        &path("read line; echo got $line"),
        "v5.channel.k8s.io",
    )
    .await;

    // Seeded garbage on many connections: random message types, channels and bytes.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..20 {
        let protocol = if round % 2 == 0 {
            "v5.channel.k8s.io"
        } else {
            "v4.base64.channel.k8s.io"
        };
        let mut victim = connect(
            &cluster,
            kubelet.port,
            &kubelet.ca_pem,
            &path("cat > /dev/null"),
            protocol,
        )
        .await;
        for _ in 0..50 {
            let len = (next() % 64) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let message = match next() % 3 {
                0 => Message::Binary(bytes.into()),
                1 => Message::Text(String::from_utf8_lossy(&bytes).into_owned().into()),
                _ => Message::Binary([vec![255], bytes].concat().into()),
            };
            if victim.send(message).await.is_err() {
                break; // the server closed this connection: what a bad frame should do
            }
        }
        drop(victim);
    }
    // A frame that is always wrong: text on a binary protocol, answered with a Close frame
    // naming the problem.
    let mut wrong = connect(
        &cluster,
        kubelet.port,
        &kubelet.ca_pem,
        &path("cat"),
        "v5.channel.k8s.io",
    )
    .await;
    wrong.send(Message::Text("0hello".into())).await.unwrap();
    let close = loop {
        match tokio::time::timeout(TIMEOUT, wrong.next())
            .await
            .expect("a Close frame")
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a Close frame, got {other:?}"),
        }
    };
    let close = close.expect("a Close frame with a reason");
    assert!(
        close.reason.contains("text message on a binary"),
        "{close:?}"
    );

    healthy
        .send(Message::Binary(b"\x00still here\n".to_vec().into()))
        .await
        .unwrap();
    let (stdout, _, error) = collect(&mut healthy, false).await;
    assert_eq!(stdout, b"got still here\n");
    assert!(String::from_utf8_lossy(&error).contains("Success"));
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn a_client_that_goes_away_kills_its_process() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("rc-ws-cancel").await;
    let kubelet = start(&cluster).await;
    idle_pod(&cluster, ns.name(), &kubelet.name, "box").await;
    let path = format!(
        "/exec/{}/box/main?command=sh&command=-c&command={}&stdout=1",
        ns.name(),
        url_encode("echo $$; exec sleep 100000")
    );
    let mut socket = connect(
        &cluster,
        kubelet.port,
        &kubelet.ca_pem,
        &path,
        "v5.channel.k8s.io",
    )
    .await;
    let mut pid = String::new();
    while !pid.ends_with('\n') {
        match tokio::time::timeout(TIMEOUT, socket.next())
            .await
            .expect("the pid")
        {
            Some(Ok(Message::Binary(data))) if data.first() == Some(&1) => {
                pid.push_str(&String::from_utf8_lossy(&data[1..]));
            }
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    let pid: i32 = pid.trim().parse().unwrap();
    let alive = || std::path::Path::new(&format!("/proc/{pid}")).exists();
    assert!(alive());
    drop(socket);
    updraft_testing::eventually(TIMEOUT, || async {
        if alive() {
            Err(format!("process {pid} still runs"))
        } else {
            Ok(())
        }
    })
    .await;
}

/// The idle timeout applies to WebSocket clients too: a silent session is closed and its
/// process killed.
#[tokio::test]
async fn an_idle_websocket_exec_is_closed_and_its_process_killed() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("rc-ws-idle").await;
    let streaming = StreamingConfig {
        idle_timeout: std::time::Duration::from_secs(3),
        ..StreamingConfig::default()
    };
    let kubelet = start_with(&cluster, streaming).await;
    idle_pod(&cluster, ns.name(), &kubelet.name, "box").await;
    let path = format!(
        "/exec/{}/box/main?command=sh&command=-c&command={}&stdout=1",
        ns.name(),
        url_encode("echo $$; exec sleep 100000")
    );
    let mut socket = connect(
        &cluster,
        kubelet.port,
        &kubelet.ca_pem,
        &path,
        "v5.channel.k8s.io",
    )
    .await;
    // The pid, then silence until the kubelet ends the connection (without a closing
    // handshake: the connection is dropped, as the kubelet drops it).
    let mut stdout = Vec::new();
    loop {
        match tokio::time::timeout(TIMEOUT, socket.next())
            .await
            .expect("the idle timeout to end the session")
        {
            Some(Ok(Message::Binary(data))) if data.first() == Some(&1) => {
                stdout.extend_from_slice(&data[1..]);
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            Some(Ok(_)) => {}
        }
    }
    let pid: i32 = String::from_utf8(stdout).unwrap().trim().parse().unwrap();
    let alive = || std::path::Path::new(&format!("/proc/{pid}")).exists();
    updraft_testing::eventually(TIMEOUT, || async {
        if alive() {
            Err(format!("process {pid} still runs"))
        } else {
            Ok(())
        }
    })
    .await;
}
