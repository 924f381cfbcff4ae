//! The Kubernetes remote command protocols for `/exec` and `/attach`: what the client asked
//! for (query), which transport it speaks (SPDY/3.1 upgrade or WebSocket), and how the outcome
//! is reported (the error stream).
//!
//! | protocol | transport | error stream | resize |
//! | --- | --- | --- | --- |
//! | `v5.channel.k8s.io` | SPDY or WebSocket (+ close signal) | `metav1.Status` JSON | yes |
//! | `v4.channel.k8s.io`, `v4.base64.channel.k8s.io` | SPDY or WebSocket | `metav1.Status` JSON | yes |
//! | `v3.channel.k8s.io` | SPDY | plain text | yes |
//! | `v2.channel.k8s.io` | SPDY | plain text | no |
//! | `channel.k8s.io`, `base64.channel.k8s.io` | WebSocket | plain text | yes |
//!
//! The SPDY `channel.k8s.io` (v1) protocol is not implemented, so it is not advertised.

mod spdy;
mod websocket;

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use updraft_provider::{ExitStatus, ProviderError, StreamIo, TerminalSize};

use crate::streaming::{StreamingConfig, StreamingMetrics};

/// The provider side of a session: given the client's streams, runs until done.
pub type Session = Box<dyn FnOnce(StreamIo) -> BoxFuture<'static, SessionResult> + Send>;
/// What a session ended with.
pub type SessionResult = Result<ExitStatus, ProviderError>;

/// Exec or attach: they differ only in how the outcome is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A new process: its exit code is reported (`NonZeroExitCode`).
    Exec,
    /// The main process: the session ends with Success unless attaching failed, as the
    /// kubelet reports it (the exit code is in the pod's status).
    Attach,
}

impl Kind {
    /// The endpoint's name (a metrics label).
    fn endpoint(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::Attach => "attach",
        }
    }
}

/// The streams the client asked for (query `stdin`, `stdout`, `stderr`, `tty`, `command`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Options {
    /// Client → process input.
    pub stdin: bool,
    /// Process output.
    pub stdout: bool,
    /// Process error output (never with `tty`: a terminal merges it into stdout).
    pub stderr: bool,
    /// A terminal.
    pub tty: bool,
    /// The command (exec only).
    pub command: Vec<String>,
}

impl Options {
    /// Parses the query the API server sends (`stdin=1&stdout=1&command=sh&command=-c…`; `true`
    /// is accepted as well as `1`).
    pub fn from_query(query: Option<&str>, kind: Kind) -> Result<Self, String> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or_default())
            .map_err(|e| format!("malformed query: {e}"))?;
        let mut options = Self::default();
        for (key, value) in pairs {
            let on = value == "1" || value.eq_ignore_ascii_case("true");
            match key.as_str() {
                "stdin" | "input" => options.stdin = on,
                "stdout" | "output" => options.stdout = on,
                "stderr" | "error" => options.stderr = on,
                "tty" => options.tty = on,
                "command" => options.command.push(value),
                _ => {}
            }
        }
        // A terminal has no separate error output; the kubelet drops stderr the same way.
        if options.tty {
            options.stderr = false;
        }
        if !options.stdin && !options.stdout && !options.stderr {
            return Err("you must specify at least one of stdin, stdout, stderr".into());
        }
        if kind == Kind::Exec && options.command.is_empty() {
            return Err("you must specify at least one command for the container".into());
        }
        Ok(options)
    }
}

/// How the error stream reports the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusFormat {
    /// v4+: a `metav1.Status` as JSON, always written.
    Json,
    /// Older protocols: the error's text; nothing on success.
    Text,
}

/// What the error stream carries for `result`, if anything.
fn status_bytes(kind: Kind, result: &SessionResult, format: StatusFormat) -> Option<Vec<u8>> {
    let status = match (kind, result) {
        (Kind::Exec, Ok(ExitStatus::Code(0))) | (Kind::Attach, Ok(_)) => {
            serde_json::json!({"metadata": {}, "status": "Success"})
        }
        (Kind::Exec, Ok(status)) => {
            let code = match *status {
                ExitStatus::Code(code) => code,
                ExitStatus::Signal(signal) => 128 + signal,
            };
            serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("command terminated with non-zero exit code: exit status {code}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}
            })
        }
        (_, Err(err)) => {
            let message = format!("error executing command in container: {err}");
            serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": format!("Internal error occurred: {message}"),
                "reason": "InternalError",
                "details": {"causes": [{"message": message}]},
                "code": 500
            })
        }
    };
    encode_status(&status, format)
}

/// What the error stream carries when the session was ended by the streaming idle timeout
/// (`idle`): a failure naming it, so that the client does not take the closed connection
/// for a successful end.
fn idle_timeout_status(idle: std::time::Duration, format: StatusFormat) -> Option<Vec<u8>> {
    let status = serde_json::json!({
        "metadata": {},
        "status": "Failure",
        "message": format!(
            "the session was closed after {idle:?} without traffic (the node's streaming \
             connection idle timeout, --streaming-connection-idle-timeout)"
        ),
        "reason": "Timeout",
        "code": 504
    });
    encode_status(&status, format)
}

/// `status` in the error stream's format: JSON (always), or its message for the text
/// protocols (nothing on success).
fn encode_status(status: &serde_json::Value, format: StatusFormat) -> Option<Vec<u8>> {
    match format {
        StatusFormat::Json => serde_json::to_vec(status).ok(),
        StatusFormat::Text => {
            if status["status"] == "Success" {
                None
            } else {
                Some(
                    status["message"]
                        .as_str()
                        .unwrap_or_default()
                        .as_bytes()
                        .to_vec(),
                )
            }
        }
    }
}

/// Decodes terminal sizes (`{"Width":80,"Height":24}`, one JSON object after another) from
/// `stream` into `sizes` until either side ends. A malformed size ends resizing only.
async fn read_resizes(
    mut stream: impl tokio::io::AsyncRead + Unpin,
    sizes: mpsc::Sender<TerminalSize>,
) {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Size {
        width: u16,
        height: u16,
    }
    const MAX_PENDING: usize = 4096;
    let mut pending = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(buf.get(..n).unwrap_or_default());
        let mut objects = serde_json::Deserializer::from_slice(&pending).into_iter::<Size>();
        let mut consumed = 0;
        loop {
            match objects.next() {
                Some(Ok(size)) => {
                    consumed = objects.byte_offset();
                    let size = TerminalSize {
                        width: size.width,
                        height: size.height,
                    };
                    if sizes.send(size).await.is_err() {
                        return;
                    }
                }
                Some(Err(err)) if err.is_eof() => break,
                Some(Err(err)) => {
                    tracing::info!("ignoring further terminal sizes: malformed size: {err}");
                    return;
                }
                None => {
                    consumed = pending.len();
                    break;
                }
            }
        }
        pending.drain(..consumed);
        if pending.len() > MAX_PENDING {
            tracing::info!(
                "ignoring further terminal sizes: a size larger than {MAX_PENDING} bytes"
            );
            return;
        }
    }
}

fn is_websocket(headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(header::CONNECTION, "upgrade") && has(header::UPGRADE, "websocket")
}

/// Serves an exec or attach request: upgrades to SPDY or WebSocket as the client asks, opens
/// the streams, runs `session` and reports its outcome. The session is dropped (cancelled) as
/// soon as the client goes away or the connection is idle for `streaming.idle_timeout`. The
/// accepted session is counted in the request's [`StreamingMetrics`].
pub fn serve(
    request: Request,
    options: Options,
    kind: Kind,
    session: Session,
    streaming: StreamingConfig,
) -> Response {
    let metrics = &StreamingMetrics::of(&request);
    if is_websocket(request.headers()) {
        websocket::serve(request, options, kind, session, streaming, metrics)
    } else {
        spdy::serve(request, options, kind, session, streaming, metrics)
    }
}

/// A plain error answer before any upgrade.
fn refuse(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, format!("{message}\n")).into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;

    #[test]
    fn options_follow_the_kubelet() {
        let options = Options::from_query(
            Some("command=sh&command=-c&command=echo%20hi&stdin=1&stdout=true&stderr=1&tty=1"),
            Kind::Exec,
        )
        .unwrap();
        assert_eq!(options.command, ["sh", "-c", "echo hi"]);
        assert!(options.stdin && options.stdout && options.tty && !options.stderr);
        assert!(Options::from_query(Some("stdout=1"), Kind::Exec).is_err());
        assert!(Options::from_query(Some("command=ls"), Kind::Exec).is_err());
        assert!(Options::from_query(Some("stdout=1"), Kind::Attach).is_ok());
    }

    #[test]
    fn exit_codes_become_non_zero_exit_code_statuses() {
        let json = status_bytes(Kind::Exec, &Ok(ExitStatus::Code(3)), StatusFormat::Json).unwrap();
        let status: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(status["reason"], "NonZeroExitCode");
        assert_eq!(status["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(status["details"]["causes"][0]["message"], "3");
        assert_eq!(
            status_bytes(Kind::Exec, &Ok(ExitStatus::Code(0)), StatusFormat::Text),
            None
        );
        let success =
            status_bytes(Kind::Attach, &Ok(ExitStatus::Code(1)), StatusFormat::Json).unwrap();
        assert!(String::from_utf8(success).unwrap().contains("Success"));
    }

    #[test]
    fn an_idle_timeout_is_a_failure_naming_it() {
        let json = idle_timeout_status(Duration::from_secs(5), StatusFormat::Json).unwrap();
        let status: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(status["status"], "Failure");
        assert_eq!(status["reason"], "Timeout");
        assert!(
            status["message"].as_str().unwrap().contains("idle timeout"),
            "{status}"
        );
        let text = idle_timeout_status(Duration::from_secs(5), StatusFormat::Text).unwrap();
        assert!(String::from_utf8(text).unwrap().contains("idle timeout"));
    }

    #[tokio::test]
    async fn resizes_are_decoded_across_reads() {
        let (mut client, server) = tokio::io::duplex(64);
        let (tx, mut rx) = mpsc::channel(4);
        let reader = tokio::spawn(read_resizes(server, tx));
        use tokio::io::AsyncWriteExt as _;
        client.write_all(b"{\"Width\":100,\"Hei").await.unwrap();
        client
            .write_all(b"ght\":40}{\"Width\":1,\"Height\":2}")
            .await
            .unwrap();
        drop(client);
        assert_eq!(
            rx.recv().await,
            Some(TerminalSize {
                width: 100,
                height: 40
            })
        );
        assert_eq!(
            rx.recv().await,
            Some(TerminalSize {
                width: 1,
                height: 2
            })
        );
        reader.await.unwrap();
    }
}
