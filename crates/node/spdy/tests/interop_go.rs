//! Interop with the Go implementation Kubernetes uses (github.com/moby/spdystream v0.5.1):
//! a small Go program of ours (tests/go-peer) is built with `go build` and talks to this crate
//! over TCP on 127.0.0.1, in both roles, with header checks and SHA-256-checked transfers.
//!
//! Every wait is bounded. A stall fails with what stalled: the stream and its progress, our
//! session's flow-control state ([`updraft_spdy::ConnectionHandle::diagnostics`]) and, where
//! the Go peer is still running, its goroutine dump (SIGQUIT).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use updraft_spdy::{Config, Connection, ConnectionHandle, Headers, Role};

/// Bound for a bulk transfer (megabytes through a debug build), generous for a loaded 2-core machine.
const DATA_WAIT: Duration = Duration::from_secs(120);
/// Bound for a handshake step (accept, reply, ping, close).
const STEP_WAIT: Duration = Duration::from_secs(30);

/// Makes the Go peer dump its goroutines (SIGQUIT) and returns its stderr, for a stall report.
async fn go_dump(child: &mut Child) -> String {
    let Some(pid) = child.id() else {
        return "(go-peer already exited)".to_owned();
    };
    let _ = std::process::Command::new("kill")
        .arg("-QUIT")
        .arg(pid.to_string())
        .status();
    let mut err = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ =
            tokio::time::timeout(Duration::from_secs(10), stderr.read_to_string(&mut err)).await;
    }
    err
}

/// The failure message for a stalled wait: what stalled, our session state and the Go peer's
/// goroutines (its stderr; when that is inherited, the dump is in the test output instead).
async fn stall_report(what: &str, handle: &ConnectionHandle, child: &mut Child) -> String {
    let ours = handle.diagnostics();
    let go = go_dump(child).await;
    format!("{what} stalled.\nour session: {ours}\ngo-peer stderr:\n{go}")
}

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
    let mut child = Command::new(&peer)
        .arg("client")
        .arg(addr.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (tcp, _) = tokio::time::timeout(STEP_WAIT, listener.accept())
        .await
        .expect("the go-peer client did not connect")
        .unwrap();
    let (handle, mut incoming) =
        Connection::new(tcp, Role::Server, Config::spdystream_compatible()).unwrap();

    let push_handle = handle.clone();
    let pushed = Arc::new(AtomicU64::new(0));
    let push_progress = pushed.clone();
    let push = tokio::spawn(async move {
        let data = payload(99, 2 << 20);
        let mut stream = push_handle
            .open_stream([("streamtype", "push")].into_iter().collect(), false)
            .unwrap();
        let reply = stream.reply_headers().await.unwrap();
        assert_eq!(reply.get("pushed"), Some("accepted"));
        for chunk in data.chunks(32 << 10) {
            stream.write_all(chunk).await.unwrap();
            push_progress.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
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
        let Ok(stream) = tokio::time::timeout(STEP_WAIT, incoming.accept()).await else {
            let what = format!("accepting data stream {} of 4", echoes.len() + 1);
            panic!("{}", stall_report(&what, &handle, &mut child).await)
        };
        let stream = stream.expect("the connection ended before 4 data streams arrived");
        let h = stream.headers();
        assert_eq!(h.get("streamtype"), Some("data"));
        let requestid: u32 = h.get("requestid").unwrap().parse().unwrap();
        assert_eq!(h.get("port"), Some((8080 + requestid).to_string().as_str()));
        assert_eq!(stream.id() % 2, 1, "client streams are odd");
        ids.push(requestid);
        stream
            .reply([("echo", "yes")].into_iter().collect(), false)
            .unwrap();
        let id = stream.id();
        let (mut rx, mut tx) = stream.split();
        let progress = Arc::new(AtomicU64::new(0));
        let echoed = progress.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 32 << 10];
            loop {
                let n = rx.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                tx.write_all(&buf[..n]).await.unwrap();
                echoed.fetch_add(n as u64, Ordering::SeqCst);
            }
            tx.shutdown().await.unwrap();
            echoed.load(Ordering::SeqCst)
        });
        echoes.push((id, task, progress));
    }
    let report = |echoes: &[(u32, u64)]| {
        let streams: Vec<String> = echoes
            .iter()
            .map(|(id, n)| format!("stream {id} echoed {n} of {} bytes", 3 << 20))
            .collect();
        format!(
            "{}; pushed {} of {} bytes",
            streams.join(", "),
            pushed.load(Ordering::SeqCst),
            2 << 20
        )
    };
    let progress: Vec<(u32, Arc<AtomicU64>)> =
        echoes.iter().map(|(id, _, p)| (*id, p.clone())).collect();
    let snapshot = || {
        progress
            .iter()
            .map(|(id, p)| (*id, p.load(Ordering::SeqCst)))
            .collect::<Vec<_>>()
    };
    let all_echoes = async {
        let mut out = Vec::new();
        for (id, task, _) in echoes {
            out.push((id, task.await.unwrap()));
        }
        out
    };
    match tokio::time::timeout(DATA_WAIT, all_echoes).await {
        Ok(done) => {
            for (id, n) in done {
                assert_eq!(n, 3 << 20, "stream {id} echoed the wrong length");
            }
        }
        Err(_) => {
            let what = format!("echoing 4 x 3 MiB ({})", report(&snapshot()));
            panic!("{}", stall_report(&what, &handle, &mut child).await)
        }
    }
    match tokio::time::timeout(DATA_WAIT, push).await {
        Ok(done) => done.unwrap(),
        Err(_) => {
            let what = format!("the 2 MiB push to go-peer ({})", report(&snapshot()));
            panic!("{}", stall_report(&what, &handle, &mut child).await)
        }
    }
    let mut stdout = String::new();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let mut stderr = String::new();
    let outputs = async {
        tokio::try_join!(
            out.read_to_string(&mut stdout),
            err.read_to_string(&mut stderr)
        )
    };
    if tokio::time::timeout(STEP_WAIT, outputs).await.is_err() {
        panic!(
            "{}",
            stall_report("go-peer exiting after the transfers", &handle, &mut child).await
        )
    }
    let status = tokio::time::timeout(STEP_WAIT, child.wait())
        .await
        .expect("go-peer closed its output but did not exit")
        .unwrap();
    assert!(status.success(), "go-peer failed: {stdout}{stderr}");
    assert!(
        stdout.contains("OK streams=4 bytes=3145728 pushed streamtype=push bytes=2097152"),
        "go-peer said: {stdout}"
    );
    ids.sort();
    assert_eq!(ids, [0, 1, 2, 3]);
    // Go closed with GOAWAY and hung up.
    let reason = tokio::time::timeout(STEP_WAIT, handle.closed())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "our session did not end after go-peer hung up: {}",
                handle.diagnostics()
            )
        });
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
    let first = tokio::time::timeout(STEP_WAIT, lines.next_line())
        .await
        .expect("go-peer server did not print its address")
        .unwrap()
        .unwrap();
    let addr = first
        .strip_prefix("LISTEN ")
        .unwrap_or_else(|| panic!("unexpected go-peer output {first:?}"))
        .to_owned();
    let tcp = tokio::time::timeout(STEP_WAIT, TcpStream::connect(&addr))
        .await
        .expect("connecting to go-peer server timed out")
        .unwrap();
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
        let id = stream.id();
        let progress = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let counters = progress.clone();
        let task = tokio::spawn(async move {
            let reply = stream.reply_headers().await.unwrap();
            assert_eq!(reply.get("echo"), Some("yes"));
            assert_eq!(reply.get("requestid"), Some(i.to_string().as_str()));
            let data = payload(i + 10, 3 << 20);
            let want = sha_hex(&data);
            let (mut rx, mut tx) = stream.split();
            let sent = counters.clone();
            let writer = tokio::spawn(async move {
                for chunk in data.chunks(32 << 10) {
                    tx.write_all(chunk).await.unwrap();
                    sent[0].fetch_add(chunk.len() as u64, Ordering::SeqCst);
                }
                tx.shutdown().await.unwrap();
            });
            let mut echoed = Vec::new();
            let mut buf = vec![0u8; 32 << 10];
            loop {
                let n = rx.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                echoed.extend_from_slice(&buf[..n]);
                counters[1].fetch_add(n as u64, Ordering::SeqCst);
            }
            writer.await.unwrap();
            assert_eq!(echoed.len(), 3 << 20);
            assert_eq!(sha_hex(&echoed), want);
        });
        tasks.push((id, task, progress));
    }
    let progress: Vec<(u32, Arc<[AtomicU64; 2]>)> =
        tasks.iter().map(|(id, _, p)| (*id, p.clone())).collect();
    for (id, task, _) in tasks {
        if let Ok(done) = tokio::time::timeout(DATA_WAIT, task).await {
            done.unwrap();
            continue;
        }
        let streams: Vec<String> = progress
            .iter()
            .map(|(id, p)| {
                format!(
                    "stream {id} sent {} and got back {} of {} bytes",
                    p[0].load(Ordering::SeqCst),
                    p[1].load(Ordering::SeqCst),
                    3 << 20
                )
            })
            .collect();
        let what = format!("the echo of stream {id} ({})", streams.join(", "));
        panic!("{}", stall_report(&what, &handle, &mut child).await);
    }
    let rtt = tokio::time::timeout(STEP_WAIT, handle.ping())
        .await
        .unwrap_or_else(|_| panic!("ping to go-peer timed out: {}", handle.diagnostics()))
        .unwrap();
    assert!(rtt < Duration::from_secs(5));
    tokio::time::timeout(STEP_WAIT, handle.close())
        .await
        .unwrap_or_else(|_| panic!("closing the session timed out: {}", handle.diagnostics()));
    let last = tokio::time::timeout(STEP_WAIT, lines.next_line())
        .await
        .expect("go-peer server did not report after we closed")
        .unwrap();
    assert_eq!(last.as_deref(), Some("OK echoed=3"));
    let status = tokio::time::timeout(STEP_WAIT, child.wait())
        .await
        .expect("go-peer server did not exit after reporting")
        .unwrap();
    assert!(status.success());
}
