//! Remote command over SPDY/3.1: the upgrade with `X-Stream-Protocol-Version` negotiation,
//! then one SPDY stream per purpose, named by its `streamType` header.

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use updraft_provider::StreamIo;
use updraft_spdy::{Config, Connection, Headers, RecvStream, Role, RstStatus, SendStream, Stream};

use super::{
    Kind, Options, Session, StatusFormat, idle_timeout_status, read_resizes, refuse, status_bytes,
};
use crate::streaming::{IdleTimeout, StreamingConfig, StreamingMetrics};

/// The negotiation header (client: what it speaks, in preference order; server: the choice).
const PROTOCOL_HEADER: &str = "x-stream-protocol-version";
/// Sent with a refusal: what we speak.
const ACCEPTED_HEADER: &str = "x-accepted-stream-protocol-versions";
/// How long a finished session waits for the client to close the connection after the
/// outcome was sent (it closes as soon as it has read it) before closing it itself.
const CLIENT_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// What we speak over SPDY, best first, with the protocol's version number.
const PROTOCOLS: [(&str, u8); 4] = [
    ("v5.channel.k8s.io", 5),
    ("v4.channel.k8s.io", 4),
    ("v3.channel.k8s.io", 3),
    ("v2.channel.k8s.io", 2),
];

/// Picks the first protocol in the client's order that we speak.
fn negotiate(request: &Request) -> Option<(&'static str, u8)> {
    request
        .headers()
        .get_all(PROTOCOL_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|offered| PROTOCOLS.iter().find(|(p, _)| *p == offered).copied())
}

pub(super) fn serve(
    mut request: Request,
    options: Options,
    kind: Kind,
    session: Session,
    streaming: StreamingConfig,
    metrics: &StreamingMetrics,
) -> Response {
    let upgrade_to_spdy = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("SPDY/3.1"))
        });
    if !upgrade_to_spdy {
        return refuse(
            StatusCode::BAD_REQUEST,
            "this endpoint streams: upgrade the connection to SPDY/3.1 (Upgrade: SPDY/3.1) or \
             to a WebSocket (Upgrade: websocket)",
        );
    }
    let Some((protocol, version)) = negotiate(&request) else {
        let offered: Vec<&str> = request
            .headers()
            .get_all(PROTOCOL_HEADER)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let supported: Vec<&str> = PROTOCOLS.iter().map(|(p, _)| *p).collect();
        let mut response = refuse(
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, \
                 server accepts {supported:?}"
            ),
        );
        for p in supported {
            response
                .headers_mut()
                .append(ACCEPTED_HEADER, HeaderValue::from_static(p));
        }
        return response;
    };
    tracing::debug!(protocol, ?options, ?kind, "remote command over SPDY");
    metrics.accepted(kind.endpoint(), "spdy", protocol);
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let (io, idle) =
                    IdleTimeout::with_notice(TokioIo::new(upgraded), streaming.idle_timeout);
                run(io, idle, version, options, kind, session, streaming).await;
            }
            Err(err) => tracing::debug!("SPDY upgrade failed: {err}"),
        }
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, HeaderValue::from_static("Upgrade")),
            (header::UPGRADE, HeaderValue::from_static("SPDY/3.1")),
            (
                header::HeaderName::from_static(PROTOCOL_HEADER),
                HeaderValue::from_static(protocol),
            ),
        ],
    )
        .into_response()
}

/// The streams of one session, as the client opens them.
#[derive(Default)]
struct Streams {
    error: Option<SendStream>,
    stdin: Option<RecvStream>,
    stdout: Option<SendStream>,
    stderr: Option<SendStream>,
    resize: Option<RecvStream>,
    /// The halves we do not use, kept so the streams stay open until the session ends.
    unused_send: Vec<SendStream>,
    unused_recv: Vec<RecvStream>,
    count: usize,
}

impl Streams {
    /// Files `stream` by its `streamType`; unknown and duplicate streams are reset.
    fn add(&mut self, stream: Stream) {
        let kind = stream
            .headers()
            .get("streamtype")
            .unwrap_or_default()
            .to_owned();
        tracing::debug!(stream_type = %kind, "remote command stream");
        let taken = match kind.as_str() {
            "error" => self.error.is_some(),
            "stdin" => self.stdin.is_some(),
            "stdout" => self.stdout.is_some(),
            "stderr" => self.stderr.is_some(),
            "resize" => self.resize.is_some(),
            _ => true,
        };
        if taken {
            tracing::info!(stream_type = %kind, "resetting an unexpected remote command stream");
            stream.reset(RstStatus::REFUSED_STREAM);
            return;
        }
        if stream.reply(Headers::new(), false).is_err() {
            return;
        }
        let (recv, send) = stream.split();
        match kind.as_str() {
            "error" => {
                self.error = Some(send);
                self.unused_recv.push(recv);
            }
            "stdin" => {
                self.stdin = Some(recv);
                self.unused_send.push(send);
            }
            "stdout" => {
                self.stdout = Some(send);
                self.unused_recv.push(recv);
            }
            "stderr" => {
                self.stderr = Some(send);
                self.unused_recv.push(recv);
            }
            _ => {
                self.resize = Some(recv);
                self.unused_send.push(send);
            }
        }
        self.count += 1;
    }
}

/// Runs one session over `io`; `idle` fires when the connection has been idle for the
/// streaming idle timeout (the session then ends with a status saying so).
async fn run<T>(
    io: T,
    idle: CancellationToken,
    version: u8,
    options: Options,
    kind: Kind,
    session: Session,
    streaming: StreamingConfig,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (handle, mut incoming) =
        match Connection::new(io, Role::Server, Config::spdystream_compatible()) {
            Ok(connection) => connection,
            Err(err) => {
                tracing::warn!("starting a SPDY session: {err}");
                return;
            }
        };
    let expected = 1
        + usize::from(options.stdin)
        + usize::from(options.stdout)
        + usize::from(options.stderr)
        + usize::from(options.tty && version >= 3);
    let mut streams = Streams::default();
    let creation_timeout = streaming.stream_creation_timeout;
    let deadline = tokio::time::sleep(creation_timeout);
    tokio::pin!(deadline);
    while streams.count < expected {
        tokio::select! {
            stream = incoming.accept() => match stream {
                Some(stream) => streams.add(stream),
                None => return,
            },
            () = idle.cancelled() => {
                handle.close().await;
                return;
            }
            () = &mut deadline => {
                tracing::info!(
                    "closing a remote command session: the client opened {} of {expected} streams within {creation_timeout:?} (the stream creation timeout)",
                    streams.count
                );
                handle.close().await;
                return;
            }
        }
    }
    tracing::debug!(expected, "remote command streams open");
    let Some(mut error) = streams.error.take() else {
        // `expected` counts the error stream, so this needs a client that sent five of one kind;
        // `add` refuses duplicates, so it cannot happen.
        handle.close().await;
        return;
    };
    let (resize_tx, resize_rx) = mpsc::channel(8);
    let resizing = streams
        .resize
        .take()
        .map(|stream| tokio::spawn(read_resizes(stream, resize_tx)));
    let io = StreamIo {
        stdin: streams
            .stdin
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        stdout: streams
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>),
        stderr: streams
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>),
        tty: options.tty,
        resize: options.tty.then_some(resize_rx),
    };
    // The client going away cancels the session (dropping it kills the process), and so
    // does the idle timeout.
    let format = if version >= 4 {
        StatusFormat::Json
    } else {
        StatusFormat::Text
    };
    let status = tokio::select! {
        result = session(io) => {
            tracing::debug!(?result, "remote command session ended");
            Some(status_bytes(kind, &result, format))
        }
        reason = handle.closed() => {
            tracing::debug!("remote command client went away: {reason}");
            None
        }
        () = idle.cancelled() => Some(idle_timeout_status(streaming.idle_timeout, format)),
    };
    if let Some(resizing) = resizing {
        resizing.abort();
    }
    let reported = status.is_some();
    if let Some(status) = status {
        if let Some(status) = status {
            let _ = error.write_all(&status).await;
        }
        let _ = error.shutdown().await;
    }
    drop(error);
    drop(streams);
    if reported {
        // Like the kubelet (spdystream closes once the client has finished its streams): let
        // the client read the outcome and close first. Closing at once, with the client's
        // last frames still unread, makes the kernel answer with a reset, and a reset can
        // discard output the client (or the API server relaying it) has not read yet.
        tokio::select! {
            _ = handle.closed() => {}
            () = idle.cancelled() => {}
            () = tokio::time::sleep(CLIENT_CLOSE_GRACE) => {
                tracing::debug!(
                    "the remote command client did not close within {CLIENT_CLOSE_GRACE:?} after the outcome; closing"
                );
            }
        }
    }
    drop(incoming);
    handle.close().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use updraft_provider::ExitStatus;

    use super::*;

    #[tokio::test]
    async fn a_client_that_does_not_open_its_streams_in_time_is_closed_without_a_session() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let started = Arc::new(AtomicBool::new(false));
        let session: Session = {
            let started = started.clone();
            Box::new(move |_io| {
                started.store(true, Ordering::SeqCst);
                Box::pin(async { Ok(ExitStatus::Code(0)) })
            })
        };
        let options = Options {
            stdin: true,
            stdout: true,
            command: vec!["true".into()],
            ..Options::default()
        };
        let streaming = StreamingConfig {
            stream_creation_timeout: Duration::from_millis(200),
            ..StreamingConfig::default()
        };
        let server = tokio::spawn(run(
            server_io,
            CancellationToken::new(),
            5,
            options,
            Kind::Exec,
            session,
            streaming,
        ));
        let (client, _incoming) =
            Connection::new(client_io, Role::Client, Config::spdystream_compatible()).unwrap();
        let mut headers = Headers::new();
        headers.insert("streamType", "error");
        let _error = client.open_stream(headers, false).unwrap();
        // stdin and stdout never come: the server gives up and closes the connection.
        tokio::time::timeout(Duration::from_secs(30), client.closed())
            .await
            .expect("the server to close the connection");
        tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .expect("the server to finish")
            .unwrap();
        assert!(!started.load(Ordering::SeqCst), "no process was started");
    }

    /// Set when dropped: the session was cancelled (the provider kills the process then).
    struct DropFlag(Arc<AtomicBool>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_session_ended_by_the_idle_timeout_reports_it_as_a_failure() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let cancelled = Arc::new(AtomicBool::new(false));
        let session: Session = {
            let flag = DropFlag(cancelled.clone());
            Box::new(move |_io| {
                Box::pin(async move {
                    let _flag = flag;
                    std::future::pending::<()>().await;
                    Ok(ExitStatus::Code(0))
                })
            })
        };
        let options = Options {
            stdout: true,
            command: vec!["sleep".into(), "1000".into()],
            ..Options::default()
        };
        let streaming = StreamingConfig {
            idle_timeout: Duration::from_millis(300),
            ..StreamingConfig::default()
        };
        let (io, idle) = IdleTimeout::with_notice(server_io, streaming.idle_timeout);
        let server = tokio::spawn(run(io, idle, 5, options, Kind::Exec, session, streaming));
        let (client, _incoming) =
            Connection::new(client_io, Role::Client, Config::spdystream_compatible()).unwrap();
        let mut headers = Headers::new();
        headers.insert("streamType", "error");
        let mut error = client.open_stream(headers, true).unwrap();
        let mut headers = Headers::new();
        headers.insert("streamType", "stdout");
        let _stdout = client.open_stream(headers, true).unwrap();
        let mut status = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(30),
            tokio::io::AsyncReadExt::read_to_end(&mut error, &mut status),
        )
        .await
        .expect("a status on the error stream")
        .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&status).unwrap();
        assert_eq!(status["status"], "Failure", "{status}");
        assert!(
            status["message"].as_str().unwrap().contains("idle timeout"),
            "{status}"
        );
        tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .expect("the server to finish")
            .unwrap();
        assert!(
            cancelled.load(Ordering::SeqCst),
            "the session was cancelled"
        );
    }
}
