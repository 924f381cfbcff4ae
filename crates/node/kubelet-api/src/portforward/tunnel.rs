//! Port-forwarding with SPDY/3.1 tunnelled through a WebSocket (`SPDY/3.1+portforward.k8s.io`).
//!
//! kubectl 1.31+ port-forwards over a WebSocket whose subprotocol is the SPDY one with the
//! prefix `SPDY/3.1+`: the WebSocket is only a byte pipe, and a whole SPDY/3.1 session with
//! the `portforward.k8s.io` protocol (data/error stream pairs per `requestID`) runs inside it.
//! Each binary message carries the next bytes of the SPDY byte stream (message boundaries mean
//! nothing; a sender writes whatever it has); text messages are not part of the protocol; a
//! Close frame is the end of the stream. API servers 1.36+ pass such a WebSocket through to
//! the kubelet unchanged when the Node declares `ExtendWebSocketsToKubelet`; otherwise they
//! unwrap the tunnel and speak plain SPDY to the kubelet.
//!
//! [`WebSocketBytes`] turns the WebSocket back into a byte stream and the SPDY port-forward
//! session ([`super::spdy::run_session`]) runs over it unchanged.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::{Forwarder, PORT_FORWARD_PROTOCOL, accept_websocket};
use crate::streaming::{StreamingConfig, StreamingMetrics};

/// The WebSocket subprotocol of SPDY-tunnelled port-forwarding.
pub const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
/// What marks a WebSocket subprotocol as a SPDY tunnel (followed by a `….k8s.io` protocol).
const TUNNEL_PREFIX: &str = "SPDY/3.1+";
/// Largest message a client may send: one SPDY frame (at most 1 MiB, the SPDY codec's
/// limit) plus its header fits, whatever the client's chunking.
const MAX_MESSAGE: usize = 2 * 1024 * 1024;
/// Bytes collected before they are sent as one message (the SPDY writer flushes after each
/// batch of frames, which also sends what is collected).
const MAX_OUTGOING_MESSAGE: usize = 64 * 1024;

/// The WebSocket subprotocols the client offers, in its order.
fn offered_protocols(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// Whether a WebSocket request asks for a SPDY tunnel: one of its subprotocols is
/// `SPDY/3.1+<something>.k8s.io` (how the kubelet and API server recognise one).
pub(super) fn requested(headers: &HeaderMap) -> bool {
    offered_protocols(headers)
        .iter()
        .any(|p| p.starts_with(TUNNEL_PREFIX) && p.ends_with(".k8s.io"))
}

/// Answers a WebSocket upgrade asking for a SPDY tunnel and runs the port-forward session
/// inside it once upgraded.
pub(super) fn upgrade(
    request: Request,
    forwarder: Forwarder,
    config: StreamingConfig,
    metrics: StreamingMetrics,
) -> Response {
    let headers = request.headers();
    let offered = offered_protocols(headers);
    if !offered.contains(&TUNNEL_PROTOCOL) {
        let tunnelled: Vec<&str> = offered
            .iter()
            .filter_map(|p| p.strip_prefix(TUNNEL_PREFIX))
            .collect();
        return (
            StatusCode::FORBIDDEN,
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports \
                 {tunnelled:?}, server accepts [{PORT_FORWARD_PROTOCOL:?}] (WebSocket \
                 subprotocol {TUNNEL_PROTOCOL})\n"
            ),
        )
            .into_response();
    }
    let response = accept_websocket(
        request,
        TUNNEL_PROTOCOL,
        MAX_MESSAGE,
        config.idle_timeout,
        move |socket| super::spdy::run_session(WebSocketBytes::new(socket), forwarder, config),
    );
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        metrics.accepted("portforward", "websocket", TUNNEL_PROTOCOL);
    }
    response
}

/// A WebSocket as a byte stream: reads return the payloads of binary messages in order,
/// writes are sent as binary messages (collected until flushed or 64 KiB), shutdown sends a
/// normal Close. A text message is an error (it cannot be part of the stream); a Close from
/// the peer is the end of the stream.
pub struct WebSocketBytes<S> {
    socket: WebSocketStream<S>,
    /// What is left of the message being read.
    reading: Bytes,
    /// The peer closed: reads return EOF.
    read_closed: bool,
    /// Written bytes not yet sent.
    writing: BytesMut,
    /// Shutdown has queued our Close frame.
    close_sent: bool,
}

impl<S> WebSocketBytes<S> {
    /// The byte stream carried by `socket`.
    pub fn new(socket: WebSocketStream<S>) -> Self {
        Self {
            socket,
            reading: Bytes::new(),
            read_closed: false,
            writing: BytesMut::new(),
            close_sent: false,
        }
    }
}

/// A WebSocket failure as an I/O error, keeping the underlying I/O error (e.g. the idle
/// timeout) as it was.
fn io_error(err: WsError) -> io::Error {
    match err {
        WsError::Io(err) => err,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "the WebSocket tunnel is closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WebSocketBytes<S> {
    /// Sends the collected bytes as one message.
    fn poll_send_collected(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.writing.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut self.socket).poll_ready(cx)).map_err(io_error)?;
        let message = Message::Binary(self.writing.split().freeze());
        Pin::new(&mut self.socket)
            .start_send(message)
            .map_err(io_error)?;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WebSocketBytes<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.reading.is_empty() {
                let n = this.reading.len().min(buf.remaining());
                buf.put_slice(&this.reading.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.read_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.socket).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.reading = data,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text message in a SPDY-over-WebSocket tunnel (only binary messages \
                         carry the stream)",
                    )));
                }
                Some(Ok(Message::Close(frame))) => {
                    if let Some(frame) = frame
                        && frame.code != CloseCode::Normal
                    {
                        this.read_closed = true;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            format!(
                                "the client closed the WebSocket tunnel with {} {:?}",
                                u16::from(frame.code),
                                frame.reason.as_str()
                            ),
                        )));
                    }
                    // Polling on sends the reply Close; the stream then ends.
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(err)) => return Poll::Ready(Err(io_error(err))),
                None => this.read_closed = true,
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WebSocketBytes<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the WebSocket tunnel is shut down",
            )));
        }
        if this.writing.len() >= MAX_OUTGOING_MESSAGE {
            ready!(this.poll_send_collected(cx))?;
        }
        let n = data
            .len()
            .min(MAX_OUTGOING_MESSAGE.saturating_sub(this.writing.len()));
        this.writing
            .extend_from_slice(data.get(..n).unwrap_or_default());
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_collected(cx))?;
        Pin::new(&mut this.socket).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            ready!(this.poll_send_collected(cx))?;
            ready!(Pin::new(&mut this.socket).poll_ready(cx)).map_err(io_error)?;
            // A normal closure code: Go clients read it as the end of the stream, a Close
            // without a code as an error.
            let close = Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }));
            match Pin::new(&mut this.socket).start_send(close) {
                Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => {}
                Err(err) => return Poll::Ready(Err(io_error(err))),
            }
            this.close_sent = true;
        }
        match ready!(Pin::new(&mut this.socket).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(err) => Poll::Ready(Err(io_error(err))),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::Arc;
    use std::time::Duration;

    use futures::{SinkExt as _, StreamExt as _};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use updraft_provider::PodRef;
    use updraft_spdy::{Config, Connection, Role as SpdyRole};

    use axum::http::HeaderValue;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::super::spdy::test_support::{EchoProvider, headers, read_all};
    use super::*;

    /// A WebSocket pair over an in-memory pipe: (server, client).
    async fn socket_pair() -> (
        WebSocketStream<tokio::io::DuplexStream>,
        WebSocketStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
        let client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        (server, client)
    }

    #[tokio::test]
    async fn binary_messages_are_one_byte_stream_and_close_is_its_end() {
        let (server, mut client) = socket_pair().await;
        let mut bytes = WebSocketBytes::new(server);
        client.send(Message::binary(b"hel".to_vec())).await.unwrap();
        client.send(Message::Ping(Bytes::new())).await.unwrap();
        client.send(Message::binary(Vec::new())).await.unwrap();
        client.send(Message::binary(b"lo".to_vec())).await.unwrap();
        client
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await
            .unwrap();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), bytes.read_to_end(&mut got))
                .await
                .expect("the tunnel's reader to reach the end")
                .unwrap();
            (got, bytes)
        });
        // The client keeps reading so the pong and the close reply get through.
        let mut replies = Vec::new();
        while let Ok(Some(Ok(message))) =
            tokio::time::timeout(Duration::from_secs(10), client.next()).await
        {
            let close = message.is_close();
            replies.push(message);
            if close {
                break;
            }
        }
        let (got, _) = reader.await.unwrap();
        assert_eq!(got, b"hello");
        assert!(replies.iter().any(Message::is_pong), "{replies:?}");
    }

    #[tokio::test]
    async fn writes_go_out_as_binary_messages_and_shutdown_closes_normally() {
        let (server, mut client) = socket_pair().await;
        let mut bytes = WebSocketBytes::new(server);
        let big = vec![7u8; 200 * 1024];
        let writer = tokio::spawn(async move {
            bytes.write_all(b"spdy").await.unwrap();
            bytes.flush().await.unwrap();
            bytes.write_all(&big).await.unwrap();
            bytes.shutdown().await.unwrap();
            bytes
        });
        let mut received = Vec::new();
        let mut close = None;
        while let Some(message) = client.next().await {
            match message.unwrap() {
                Message::Binary(data) => {
                    assert!(data.len() <= MAX_OUTGOING_MESSAGE);
                    received.extend_from_slice(&data);
                }
                Message::Close(frame) => {
                    close = frame;
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        drop(client);
        let _ = writer.await.unwrap();
        assert_eq!(received.len(), 4 + 200 * 1024);
        assert_eq!(&received[..4], b"spdy");
        assert_eq!(close.expect("a close code").code, CloseCode::Normal);
    }

    #[tokio::test]
    async fn a_text_message_or_an_abnormal_close_is_an_error() {
        let (server, mut client) = socket_pair().await;
        let mut bytes = WebSocketBytes::new(server);
        client.send(Message::text("hello")).await.unwrap();
        let mut buf = [0u8; 8];
        let err = bytes.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("text message"), "{err}");

        let (server, mut client) = socket_pair().await;
        let mut bytes = WebSocketBytes::new(server);
        client
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Protocol,
                reason: "broken".into(),
            })))
            .await
            .unwrap();
        let err = bytes.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        assert!(err.to_string().contains("1002"), "{err}");
    }

    #[test]
    fn tunnel_requests_are_recognised_by_their_subprotocol() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("SPDY/3.1+portforward.k8s.io"),
        );
        assert!(requested(&headers));
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("v4.channel.k8s.io, v4.base64.channel.k8s.io"),
        );
        assert!(!requested(&headers));
        assert!(!requested(&HeaderMap::new()));
    }

    /// A SPDY client session inside a WebSocket, against the port-forward session: the same
    /// byte stream kubectl's tunnelling dialer produces.
    #[tokio::test]
    async fn the_spdy_port_forward_session_runs_inside_the_websocket() {
        let (server, client) = socket_pair().await;
        let forwarder = Forwarder {
            provider: Arc::new(EchoProvider),
            pod: PodRef {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u1".into(),
            },
        };
        let session = tokio::spawn(super::super::spdy::run_session(
            WebSocketBytes::new(server),
            forwarder,
            StreamingConfig::default(),
        ));
        let (spdy, _incoming) = Connection::new(
            WebSocketBytes::new(client),
            SpdyRole::Client,
            Config::spdystream_compatible(),
        )
        .unwrap();
        let mut refused_error = spdy.open_stream(headers("error", "2", "0"), true).unwrap();
        let _refused_data = spdy.open_stream(headers("data", "2", "0"), false).unwrap();
        let _error = spdy.open_stream(headers("error", "1", "1"), true).unwrap();
        let mut data = spdy.open_stream(headers("data", "1", "1"), false).unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (mut rx, mut tx) = tokio::io::split(&mut data);
        let sent = payload.clone();
        let (_, echoed) = tokio::join!(
            async move {
                tx.write_all(&sent).await.unwrap();
                tx.shutdown().await.unwrap();
            },
            async move {
                let mut out = Vec::new();
                tokio::time::timeout(Duration::from_secs(30), rx.read_to_end(&mut out))
                    .await
                    .expect("the echo to end")
                    .unwrap();
                out
            }
        );
        assert_eq!(echoed, payload);
        let message = String::from_utf8(read_all(&mut refused_error).await).unwrap();
        assert_eq!(
            message,
            "error forwarding port 2 to pod ns/p, uid u1: transient failure: connection refused"
        );
        spdy.close().await;
        tokio::time::timeout(Duration::from_secs(10), session)
            .await
            .expect("the server session to end when the client leaves")
            .unwrap();
    }
}
