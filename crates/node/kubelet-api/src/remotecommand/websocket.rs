//! Remote command over a WebSocket: channel 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize
//! (framing in [`crate::ws_channels`]).

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use updraft_provider::StreamIo;

use super::{
    Kind, Options, Session, StatusFormat, idle_timeout_status, read_resizes, refuse, status_bytes,
};
use crate::streaming::{IdleTimeout, StreamingConfig, StreamingMetrics};
use crate::ws_channels::{Encoding, Framing, Mux};

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;

/// Largest message a client may send (stdin chunks are far smaller).
const MAX_MESSAGE: usize = 1024 * 1024;

/// The subprotocols we speak, best first: name, framing, and how errors are reported.
const PROTOCOLS: [(&str, Framing, StatusFormat); 5] = [
    (
        "v5.channel.k8s.io",
        Framing {
            encoding: Encoding::Binary,
            close_signal: true,
        },
        StatusFormat::Json,
    ),
    (
        "v4.channel.k8s.io",
        Framing {
            encoding: Encoding::Binary,
            close_signal: false,
        },
        StatusFormat::Json,
    ),
    (
        "v4.base64.channel.k8s.io",
        Framing {
            encoding: Encoding::Base64,
            close_signal: false,
        },
        StatusFormat::Json,
    ),
    (
        "channel.k8s.io",
        Framing {
            encoding: Encoding::Binary,
            close_signal: false,
        },
        StatusFormat::Text,
    ),
    (
        "base64.channel.k8s.io",
        Framing {
            encoding: Encoding::Base64,
            close_signal: false,
        },
        StatusFormat::Text,
    ),
];

pub(super) fn serve(
    mut request: Request,
    options: Options,
    kind: Kind,
    session: Session,
    streaming: StreamingConfig,
    metrics: &StreamingMetrics,
) -> Response {
    let Some(key) = request
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "WebSocket upgrade without Sec-WebSocket-Key",
        );
    };
    let offered: Vec<String> = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .collect();
    let Some((protocol, framing, format)) = offered
        .iter()
        .find_map(|o| PROTOCOLS.iter().find(|(p, _, _)| p == o))
        .copied()
    else {
        let supported: Vec<&str> = PROTOCOLS.iter().map(|(p, _, _)| *p).collect();
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "no supported WebSocket subprotocol: the client offered {offered:?}; offer one of {supported:?} \
                 in Sec-WebSocket-Protocol"
            ),
        );
    };
    metrics.accepted(kind.endpoint(), "websocket", protocol);
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let config = WebSocketConfig::default()
                    .max_message_size(Some(MAX_MESSAGE))
                    .max_frame_size(Some(MAX_MESSAGE));
                let (io, idle) =
                    IdleTimeout::with_notice(TokioIo::new(upgraded), streaming.idle_timeout);
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                let idle = IdleNotice {
                    fired: idle,
                    after: streaming.idle_timeout,
                };
                run(ws, framing, format, options, kind, session, idle).await;
            }
            Err(err) => tracing::debug!("WebSocket upgrade failed: {err}"),
        }
    });
    let accept = HeaderValue::from_str(&key).unwrap_or(HeaderValue::from_static(""));
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, HeaderValue::from_static("Upgrade")),
            (header::UPGRADE, HeaderValue::from_static("websocket")),
            (header::SEC_WEBSOCKET_ACCEPT, accept),
            (
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            ),
        ],
    )
        .into_response()
}

/// Fires when the connection has been idle for the streaming idle timeout (`after`).
struct IdleNotice {
    fired: CancellationToken,
    after: std::time::Duration,
}

async fn run<S>(
    ws: WebSocketStream<S>,
    framing: Framing,
    format: StatusFormat,
    options: Options,
    kind: Kind,
    session: Session,
    idle: IdleNotice,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let mut reads = vec![];
    if options.stdin {
        reads.push(STDIN);
    }
    if options.tty {
        reads.push(RESIZE);
    }
    let mut writes = vec![ERROR];
    if options.stdout {
        writes.push(STDOUT);
    }
    if options.stderr {
        writes.push(STDERR);
    }
    let mut mux = Mux::start(ws, framing, &reads, &writes);
    let closed = mux.closed();
    let Some(mut error) = mux.writer(ERROR) else {
        return;
    };
    let mut stdout = mux.writer(STDOUT);
    let mut stderr = mux.writer(STDERR);
    // Like the kubelet: an empty message on the first output channel tells the client the
    // session is ready.
    let first = stdout.as_mut().or(stderr.as_mut()).unwrap_or(&mut error);
    let _ = tokio::io::AsyncWriteExt::write(first, &[]).await;
    let (resize_tx, resize_rx) = mpsc::channel(8);
    let resizing = mux
        .reader(RESIZE)
        .map(|reader| tokio::spawn(read_resizes(reader, resize_tx)));
    let io = StreamIo {
        stdin: mux
            .reader(STDIN)
            .map(|r| Box::new(r) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        stdout: stdout.map(|w| Box::new(w) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>),
        stderr: stderr.map(|w| Box::new(w) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>),
        tty: options.tty,
        resize: options.tty.then_some(resize_rx),
    };
    drop(mux);
    // The client going away cancels the session (dropping it kills the process), and so
    // does the idle timeout, which the client is told.
    let status = tokio::select! {
        result = session(io) => status_bytes(kind, &result, format),
        () = closed.cancelled() => None,
        () = idle.fired.cancelled() => idle_timeout_status(idle.after, format),
    };
    if let Some(resizing) = resizing {
        resizing.abort();
    }
    if let Some(status) = status {
        let _ = error.write_all(&status).await;
    }
    // The last writer: dropping it makes the connection send Close after what is queued.
    drop(error);
}
