//! The older remote command protocols end to end: a client of ours speaks SPDY/3.1 straight to
//! the real API server (as legacy clients do; the API server passes SPDY upgrades through to
//! the node unchanged), offering a single `X-Stream-Protocol-Version`, to an Updraft node
//! whose mock pods run real processes.
//!
//! What the versions differ in (the kubelet's `remotecommand` server): v2 has the error,
//! stdin, stdout and stderr streams, and the error stream carries the failure as plain text
//! (nothing on success); v3 adds the resize stream for a TTY; v4+ write a `metav1.Status` as
//! JSON instead. The SPDY `channel.k8s.io` (v1) is not implemented, so it is not advertised:
//! a client offering only it is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

mod remote_command_support;

use std::time::Duration;

use http::{StatusCode, header};
use hyper_util::rt::TokioIo;
use remote_command_support::{Kubelet, StreamingPath, TIMEOUT, idle_pod, start_on};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use updraft_spdy::{
    Config, Connection, ConnectionHandle, Headers, IncomingStreams, RecvStream, Role, SendStream,
};
use updraft_testing::{TestCluster, TestNamespace};

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {TIMEOUT:?}"))
}

/// A node (declaring `ExtendWebSocketsToKubelet`, Updraft's default: SPDY clients arrive as
/// SPDY all the same) with a running pod `box` in a fresh namespace.
async fn node_with_a_pod(cluster: &TestCluster, prefix: &str) -> (Kubelet, TestNamespace) {
    let ns = cluster.namespace(prefix).await;
    let kubelet = start_on(cluster, StreamingPath::Passthrough).await;
    idle_pod(cluster, ns.name(), &kubelet.name, "box").await;
    (kubelet, ns)
}

/// What the exec asks for (the query of `pods/exec`).
struct ExecRequest<'a> {
    command: &'a [&'a str],
    stdin: bool,
    stderr: bool,
    tty: bool,
}

impl ExecRequest<'_> {
    fn query(&self) -> String {
        let mut pairs: Vec<(&str, &str)> = self.command.iter().map(|c| ("command", *c)).collect();
        let flag = |on: bool| if on { "true" } else { "false" };
        pairs.extend([
            ("stdin", flag(self.stdin)),
            ("stdout", "true"),
            ("stderr", flag(self.stderr)),
            ("tty", flag(self.tty)),
        ]);
        serde_urlencoded::to_string(pairs).unwrap()
    }
}

/// The API server's answer when it did not switch protocols.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    accepted: Vec<String>,
    body: String,
}

/// An exec session over SPDY, with the streams a client-go v2/v3 client opens (error, stdin,
/// stdout, stderr, and for v3 with a TTY resize), in that order.
struct SpdyExec {
    handle: ConnectionHandle,
    _incoming: IncomingStreams,
    error: RecvStream,
    stdin: Option<SendStream>,
    stdout: RecvStream,
    stderr: Option<RecvStream>,
    resize: Option<SendStream>,
    /// The halves we do not use, kept until the session ends.
    kept: (Vec<SendStream>, Vec<RecvStream>),
}

/// Upgrades `POST pods/box/exec` in `namespace` to SPDY/3.1 through the API server, offering
/// only `protocol`, and opens the streams.
async fn spdy_exec(
    cluster: &TestCluster,
    namespace: &str,
    protocol: &str,
    request: &ExecRequest<'_>,
) -> Result<SpdyExec, Refusal> {
    let upgrade = http::Request::post(format!(
        "/api/v1/namespaces/{namespace}/pods/box/exec?{}",
        request.query()
    ))
    .header(header::CONNECTION, "Upgrade")
    .header(header::UPGRADE, "SPDY/3.1")
    .header("X-Stream-Protocol-Version", protocol)
    .body(kube::client::Body::empty())
    .unwrap();
    let mut response = within("the API server's answer", cluster.client().send(upgrade))
        .await
        .unwrap_or_else(|err| panic!("sending the SPDY upgrade: {err}"));
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let accepted = response
            .headers()
            .get_all("X-Accepted-Stream-Protocol-Versions")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        let body = response.into_body().collect_bytes().await.unwrap();
        return Err(Refusal {
            status,
            accepted,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    assert_eq!(
        response
            .headers()
            .get("X-Stream-Protocol-Version")
            .and_then(|v| v.to_str().ok()),
        Some(protocol),
        "the negotiated protocol"
    );
    let upgraded = within("the upgrade", hyper::upgrade::on(&mut response))
        .await
        .unwrap();
    let (handle, incoming) = Connection::new(
        TokioIo::new(upgraded),
        Role::Client,
        Config::spdystream_compatible(),
    )
    .unwrap();
    let mut unused = (Vec::new(), Vec::new());
    let open = |stream_type: &str| {
        let mut headers = Headers::new();
        headers.insert("streamType", stream_type);
        handle.open_stream(headers, false).unwrap().split()
    };
    let (error, error_send) = open("error");
    unused.0.push(error_send);
    let stdin = request.stdin.then(|| {
        let (recv, send) = open("stdin");
        unused.1.push(recv);
        send
    });
    let (stdout, stdout_send) = open("stdout");
    unused.0.push(stdout_send);
    let stderr = (request.stderr && !request.tty).then(|| {
        let (recv, send) = open("stderr");
        unused.0.push(send);
        recv
    });
    let resize = (request.tty && protocol == "v3.channel.k8s.io").then(|| {
        let (recv, send) = open("resize");
        unused.1.push(recv);
        send
    });
    Ok(SpdyExec {
        handle,
        _incoming: incoming,
        error,
        stdin,
        stdout,
        stderr,
        resize,
        kept: unused,
    })
}

async fn read_all(what: &str, mut stream: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut out = Vec::new();
    within(what, stream.read_to_end(&mut out)).await.unwrap();
    out
}

/// What a finished exec left on its streams.
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// The error stream: for v2/v3 the failure's text, empty on success.
    error: String,
}

impl SpdyExec {
    /// Writes `input` to stdin and closes it while reading stdout, stderr and the error
    /// stream to their ends.
    async fn finish(mut self, input: &[u8]) -> Outcome {
        let stdin = self.stdin.take();
        let stderr = self.stderr.take();
        let ((), stdout, stderr, error) = tokio::join!(
            async {
                if let Some(mut stdin) = stdin {
                    within("writing stdin", stdin.write_all(input))
                        .await
                        .unwrap();
                    stdin.shutdown().await.unwrap();
                }
            },
            read_all("stdout", &mut self.stdout),
            async {
                match stderr {
                    Some(stderr) => read_all("stderr", stderr).await,
                    None => Vec::new(),
                }
            },
            read_all("the error stream", &mut self.error),
        );
        self.handle.close().await;
        Outcome {
            stdout,
            stderr,
            error: String::from_utf8(error).unwrap(),
        }
    }
}

/// The kubelet's text for a non-zero exit on the v1–v3 error stream.
fn non_zero_exit(code: u8) -> String {
    format!("command terminated with non-zero exit code: exit status {code}")
}

/// stdout, stderr, stdin and the exit code as v2 and v3 report them: the error stream carries
/// the failure as text (not a JSON Status), and nothing when the command succeeds.
async fn streams_and_exit_codes_over(protocol: &str) {
    let cluster = TestCluster::connect().await;
    let (kubelet, ns) = node_with_a_pod(&cluster, "rc-spdy-versions").await;
    let command = ["sh", "-c", "cat; echo to-stderr >&2; exit 3"];
    let request = ExecRequest {
        command: &command,
        stdin: true,
        stderr: true,
        tty: false,
    };
    let exec = spdy_exec(&cluster, ns.name(), protocol, &request)
        .await
        .unwrap();
    let input: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 253) as u8).collect();
    let outcome = exec.finish(&input).await;
    assert!(
        outcome.stdout == input,
        "stdin came back through cat unchanged"
    );
    assert_eq!(String::from_utf8_lossy(&outcome.stderr), "to-stderr\n");
    assert_eq!(outcome.error, non_zero_exit(3));

    let command = ["sh", "-c", "echo fine"];
    let request = ExecRequest {
        command: &command,
        stdin: false,
        stderr: true,
        tty: false,
    };
    let exec = spdy_exec(&cluster, ns.name(), protocol, &request)
        .await
        .unwrap();
    let outcome = exec.finish(b"").await;
    assert_eq!(String::from_utf8_lossy(&outcome.stdout), "fine\n");
    assert_eq!(outcome.error, "", "success leaves the error stream empty");

    kubelet
        .assert_sessions(&cluster, "exec", "spdy", protocol, 2)
        .await;
}

#[tokio::test]
async fn v3_spdy_client_streams_stdin_stdout_stderr_and_gets_the_exit_code_as_text() {
    streams_and_exit_codes_over("v3.channel.k8s.io").await;
}

#[tokio::test]
async fn v2_spdy_client_streams_stdin_stdout_stderr_and_gets_the_exit_code_as_text() {
    streams_and_exit_codes_over("v2.channel.k8s.io").await;
}

/// v3 with a TTY: the terminal takes the size sent on the resize stream, and the exit code of
/// the shell comes back as text.
#[tokio::test]
async fn v3_spdy_client_gets_a_terminal_that_follows_resizes() {
    let cluster = TestCluster::connect().await;
    let (kubelet, ns) = node_with_a_pod(&cluster, "rc-spdy-v3-tty").await;
    let command = ["sh"];
    let request = ExecRequest {
        command: &command,
        stdin: true,
        stderr: true,
        tty: true,
    };
    let mut exec = spdy_exec(&cluster, ns.name(), "v3.channel.k8s.io", &request)
        .await
        .unwrap();
    assert!(exec.stderr.is_none(), "a terminal has no stderr stream");
    let mut resize = exec.resize.take().expect("v3 opens a resize stream");
    resize
        .write_all(br#"{"Width":123,"Height":45}"#)
        .await
        .unwrap();
    let mut stdin = exec.stdin.take().unwrap();
    // The size travels on its own stream: ask until the shell sees it.
    let mut screen = Vec::new();
    let mut buf = [0u8; 4096];
    within("the terminal to be 45x123", async {
        while !String::from_utf8_lossy(&screen).contains("45 123") {
            stdin.write_all(b"stty size\n").await.unwrap();
            match tokio::time::timeout(Duration::from_secs(2), exec.stdout.read(&mut buf)).await {
                Ok(Ok(0)) => panic!(
                    "the terminal closed: {:?}",
                    String::from_utf8_lossy(&screen)
                ),
                Ok(Ok(n)) => screen.extend_from_slice(&buf[..n]),
                Ok(Err(err)) => panic!("{err}"),
                Err(_) => {}
            }
        }
    })
    .await;
    stdin.write_all(b"exit 7\n").await.unwrap();
    exec.stdin = Some(stdin);
    exec.kept.0.push(resize);
    let outcome = exec.finish(b"").await;
    assert_eq!(outcome.error, non_zero_exit(7));
    kubelet
        .assert_sessions(&cluster, "exec", "spdy", "v3.channel.k8s.io", 1)
        .await;
}

/// v2 with a TTY: no resize stream (the protocol has none), and the session starts anyway.
#[tokio::test]
async fn v2_spdy_client_gets_a_terminal_without_a_resize_stream() {
    let cluster = TestCluster::connect().await;
    let (kubelet, ns) = node_with_a_pod(&cluster, "rc-spdy-v2-tty").await;
    let command = ["sh", "-c", "test -t 1 && echo on-a-terminal; exit 5"];
    let request = ExecRequest {
        command: &command,
        stdin: true,
        stderr: true,
        tty: true,
    };
    let exec = spdy_exec(&cluster, ns.name(), "v2.channel.k8s.io", &request)
        .await
        .unwrap();
    assert!(exec.resize.is_none() && exec.stderr.is_none());
    let outcome = exec.finish(b"").await;
    assert!(
        String::from_utf8_lossy(&outcome.stdout).contains("on-a-terminal"),
        "{:?}",
        String::from_utf8_lossy(&outcome.stdout)
    );
    assert_eq!(outcome.error, non_zero_exit(5));
    kubelet
        .assert_sessions(&cluster, "exec", "spdy", "v2.channel.k8s.io", 1)
        .await;
}

/// SPDY `channel.k8s.io` (v1) is not implemented, so it is not advertised: a client offering
/// only it gets the kubelet's refusal naming what it accepts, and no session starts.
#[tokio::test]
async fn a_spdy_client_offering_only_v1_is_refused_with_what_is_accepted() {
    let cluster = TestCluster::connect().await;
    let (kubelet, ns) = node_with_a_pod(&cluster, "rc-spdy-v1").await;
    let command = ["true"];
    let request = ExecRequest {
        command: &command,
        stdin: false,
        stderr: false,
        tty: false,
    };
    let Err(refusal) = spdy_exec(&cluster, ns.name(), "channel.k8s.io", &request).await else {
        panic!("an exec offering only channel.k8s.io over SPDY was accepted");
    };
    assert_eq!(refusal.status, StatusCode::FORBIDDEN, "{refusal:?}");
    assert!(
        refusal.body.contains("unable to negotiate protocol"),
        "{refusal:?}"
    );
    assert!(
        refusal
            .accepted
            .iter()
            .any(|p| p.contains("v3.channel.k8s.io"))
            && !refusal.accepted.iter().any(|p| p == "channel.k8s.io"),
        "{refusal:?}"
    );
    assert!(
        kubelet
            .sessions_at_metrics(&cluster, "exec")
            .await
            .is_empty(),
        "no exec session was counted"
    );
}
