//! Interop with the Go implementation Kubernetes uses (github.com/moby/spdystream v0.5.1):
//! a small Go program of ours (tests/go-peer) is built with `go build` and talks to this crate
//! over TCP on 127.0.0.1, in both roles, with header checks and SHA-256-checked transfers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use updraft_spdy::{Config, Connection, Headers, Role};

/// Same generator as `payload` in go-peer/main.go (xorshift32).
fn payload(seed: u32, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn sha_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Builds the Go peer into the cargo target dir once per test run (go's own cache makes
/// rebuilds cheap); concurrent tests share the one build instead of overwriting a running binary.
fn build_go_peer() -> PathBuf {
    static PEER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PEER.get_or_init(go_build).clone()
}

fn go_build() -> PathBuf {
    let src = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("tests/go-peer");
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("spdy-go-peer");
    let status = std::process::Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&out)
        .arg(".")
        .current_dir(&src)
        .status()
        .unwrap_or_else(|e| {
            panic!("the SPDY interop test needs the Go toolchain (`go` on PATH, Go >= 1.22) to build {}: {e}", src.display())
        });
    assert!(
        status.success(),
        "`go build` of {} failed: {status}",
        src.display()
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_client_against_our_server() {
    let peer = build_go_peer();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let child = Command::new(&peer)
        .arg("client")
        .arg(addr.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (tcp, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let (handle, mut incoming) =
        Connection::new(tcp, Role::Server, Config::spdystream_compatible()).unwrap();

    let push_handle = handle.clone();
    let push = tokio::spawn(async move {
        let data = payload(99, 2 << 20);
        let mut stream = push_handle
            .open_stream([("streamtype", "push")].into_iter().collect(), false)
            .unwrap();
        let reply = stream.reply_headers().await.unwrap();
        assert_eq!(reply.get("pushed"), Some("accepted"));
        stream.write_all(&data).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut hash = String::new();
        stream.read_to_string(&mut hash).await.unwrap();
        assert_eq!(
            hash,
            sha_hex(&data),
            "Go hashed our pushed stream differently"
        );
    });

    let mut echoes = Vec::new();
    let mut ids = Vec::new();
    while echoes.len() < 4 {
        let stream = tokio::time::timeout(Duration::from_secs(30), incoming.accept())
            .await
            .unwrap()
            .unwrap();
        let h = stream.headers();
        assert_eq!(h.get("streamtype"), Some("data"));
        let requestid: u32 = h.get("requestid").unwrap().parse().unwrap();
        assert_eq!(h.get("port"), Some((8080 + requestid).to_string().as_str()));
        assert_eq!(stream.id() % 2, 1, "client streams are odd");
        ids.push(requestid);
        stream
            .reply([("echo", "yes")].into_iter().collect(), false)
            .unwrap();
        let (mut rx, mut tx) = stream.split();
        echoes.push(tokio::spawn(async move {
            let n = tokio::io::copy(&mut rx, &mut tx).await.unwrap();
            tx.shutdown().await.unwrap();
            n
        }));
    }
    for echo in echoes {
        assert_eq!(echo.await.unwrap(), 3 << 20);
    }
    tokio::time::timeout(Duration::from_secs(60), push)
        .await
        .unwrap()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "go-peer failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("OK streams=4 bytes=3145728 pushed streamtype=push bytes=2097152"),
        "go-peer said: {stdout}"
    );
    ids.sort();
    assert_eq!(ids, [0, 1, 2, 3]);
    // Go closed with GOAWAY and hung up.
    let reason = tokio::time::timeout(Duration::from_secs(10), handle.closed())
        .await
        .unwrap();
    assert_eq!(reason, updraft_spdy::CloseReason::PeerClosed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_against_go_server() {
    let peer = build_go_peer();
    let mut child = Command::new(&peer)
        .arg("server")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap();
    let addr = first
        .strip_prefix("LISTEN ")
        .unwrap_or_else(|| panic!("unexpected go-peer output {first:?}"))
        .to_owned();
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let (handle, _incoming) =
        Connection::new(tcp, Role::Client, Config::spdystream_compatible()).unwrap();

    let mut tasks = Vec::new();
    for i in 0..3u32 {
        let headers: Headers = [
            ("streamtype", "data".to_owned()),
            ("requestid", i.to_string()),
        ]
        .into_iter()
        .collect();
        let stream = handle.open_stream(headers, false).unwrap();
        tasks.push(tokio::spawn(async move {
            let reply = stream.reply_headers().await.unwrap();
            assert_eq!(reply.get("echo"), Some("yes"));
            assert_eq!(reply.get("requestid"), Some(i.to_string().as_str()));
            let data = payload(i + 10, 3 << 20);
            let want = sha_hex(&data);
            let (mut rx, mut tx) = stream.split();
            let writer = tokio::spawn(async move {
                tx.write_all(&data).await.unwrap();
                tx.shutdown().await.unwrap();
            });
            let mut echoed = Vec::new();
            rx.read_to_end(&mut echoed).await.unwrap();
            writer.await.unwrap();
            assert_eq!(echoed.len(), 3 << 20);
            assert_eq!(sha_hex(&echoed), want);
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap();
    }
    let rtt = handle.ping().await.unwrap();
    assert!(rtt < Duration::from_secs(5));
    handle.close().await;
    let last = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.as_deref(), Some("OK echoed=3"));
    assert!(child.wait().await.unwrap().success());
}
