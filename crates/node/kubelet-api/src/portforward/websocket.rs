//! Port-forwarding over WebSocket, as the kubelet serves it to clients that reach it directly.
//!
//! The ports come from `port` query parameters (repeatable, comma-separated; `ports`, the API
//! server's name, is accepted too). Port number `i` in that list gets channel `2i` for data
//! (both ways) and `2i+1` for errors (to the client only); the first message on each of them
//! carries the port as 2 bytes, little-endian. Subprotocols: `v4.channel.k8s.io` (binary
//! messages, the first byte is the channel), `v4.base64.channel.k8s.io` (text messages: the
//! channel as an ASCII digit, then base64) or none (binary).
//!
//! There is one forwarded connection per port, and the v4 protocol has no half-close: when
//! the pod closes a port's connection, that port is done; when every port is done the
//! WebSocket is closed. A client that closes the WebSocket ends every forward at once.

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, WriteHalf};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::{Forwarder, accept_websocket};
use crate::streaming::{StreamingConfig, StreamingMetrics};

/// The binary channel subprotocol.
pub const CHANNEL_PROTOCOL_V4: &str = "v4.channel.k8s.io";
/// The base64 channel subprotocol (for clients that can only send text, such as browsers).
pub const BASE64_CHANNEL_PROTOCOL_V4: &str = "v4.base64.channel.k8s.io";
/// Bytes buffered between the WebSocket and the provider, per port and direction.
const PIPE_BUFFER: usize = 64 * 1024;
/// Largest message (and frame) a client may send; clients send what they read from a socket,
/// far less. tungstenite's default (64 MiB) would let one client make the node buffer that.
const MAX_MESSAGE: usize = 1024 * 1024;
/// Messages queued towards the client before the ports' readers wait.
const OUTBOX_MESSAGES: usize = 64;

/// How channel numbers and payloads are put into WebSocket messages (the `channel.k8s.io`
/// family of subprotocols, shared by exec, attach and port-forward).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelFraming {
    /// Binary messages: one byte of channel number, then the payload.
    Binary,
    /// Text messages: the channel number as an ASCII digit, then the payload in base64.
    Base64,
}

impl ChannelFraming {
    /// The framing a subprotocol uses; `None` for other subprotocols.
    pub fn of_protocol(protocol: &str) -> Option<Self> {
        match protocol {
            "" | CHANNEL_PROTOCOL_V4 | "channel.k8s.io" => Some(Self::Binary),
            BASE64_CHANNEL_PROTOCOL_V4 | "base64.channel.k8s.io" => Some(Self::Base64),
            _ => None,
        }
    }

    /// `data` on `channel` as one message.
    pub fn encode(self, channel: u8, data: &[u8]) -> Message {
        match self {
            Self::Binary => {
                let mut frame = Vec::with_capacity(data.len() + 1);
                frame.push(channel);
                frame.extend_from_slice(data);
                Message::binary(frame)
            }
            Self::Base64 => {
                let mut text = String::with_capacity(data.len() * 4 / 3 + 5);
                text.push(char::from(b'0'.saturating_add(channel)));
                base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
                Message::text(text)
            }
        }
    }

    /// The channel and payload of a data message; `None` for control messages and for
    /// messages that are empty or not valid in this framing (they are ignored, as the
    /// kubelet ignores them).
    pub fn decode(self, message: Message) -> Option<(u8, Bytes)> {
        match (self, message) {
            (Self::Binary, Message::Binary(mut data)) if !data.is_empty() => {
                let channel = data.split_to(1);
                Some((channel[0], data))
            }
            (Self::Base64, Message::Text(text)) => {
                let (digit, encoded) = text.as_str().split_at_checked(1)?;
                let channel = digit.as_bytes().first()?.checked_sub(b'0')?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .ok()?;
                Some((channel, Bytes::from(data)))
            }
            _ => None,
        }
    }
}

/// The ports of a WebSocket port-forward request, or the message of a 400.
fn requested_ports(query: Option<&str>) -> Result<Vec<u16>, String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or_default())
        .map_err(|e| format!("malformed query: {e}"))?;
    let mut ports = Vec::new();
    for (name, value) in pairs {
        if name != "port" && name != "ports" {
            continue;
        }
        if value.is_empty() {
            return Err(format!("query parameter {name:?} cannot be empty"));
        }
        for text in value.split(',') {
            match text.trim().parse::<u16>() {
                Ok(port) if port > 0 => ports.push(port),
                _ => return Err(format!("unable to parse {text:?} as a port (1-65535)")),
            }
        }
    }
    if ports.is_empty() {
        return Err("query parameter \"port\" is required (one per port to forward)".into());
    }
    // Channel numbers are one byte: two per port.
    if ports.len() > 127 {
        return Err(format!(
            "{} ports requested; one WebSocket forwards at most 127",
            ports.len()
        ));
    }
    Ok(ports)
}

/// Answers a WebSocket upgrade for port-forwarding and runs the session once upgraded.
pub(super) fn upgrade(
    request: Request,
    forwarder: Forwarder,
    config: StreamingConfig,
    metrics: StreamingMetrics,
) -> Response {
    let bad_request = |message: String| (StatusCode::BAD_REQUEST, message + "\n").into_response();
    let ports = match requested_ports(request.uri().query()) {
        Ok(ports) => ports,
        Err(message) => return bad_request(message),
    };
    let headers = request.headers();
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    let chosen = if offered.is_empty() {
        Some((String::new(), ChannelFraming::Binary))
    } else {
        offered
            .iter()
            .filter(|p| {
                p.as_str() == CHANNEL_PROTOCOL_V4 || p.as_str() == BASE64_CHANNEL_PROTOCOL_V4
            })
            .find_map(|p| ChannelFraming::of_protocol(p).map(|f| (p.clone(), f)))
    };
    let Some((protocol, framing)) = chosen else {
        return bad_request(format!(
            "none of the requested WebSocket subprotocols {offered:?} is supported; \
             port-forward speaks {CHANNEL_PROTOCOL_V4} and {BASE64_CHANNEL_PROTOCOL_V4}"
        ));
    };
    let counted_protocol = match protocol.as_str() {
        CHANNEL_PROTOCOL_V4 => CHANNEL_PROTOCOL_V4,
        BASE64_CHANNEL_PROTOCOL_V4 => BASE64_CHANNEL_PROTOCOL_V4,
        _ => "",
    };
    let response = accept_websocket(
        request,
        &protocol,
        MAX_MESSAGE,
        config.idle_timeout,
        move |socket| run_session(socket, framing, ports, forwarder),
    );
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        metrics.accepted("portforward", "websocket", counted_protocol);
    }
    response
}

/// Runs one WebSocket port-forward session until every port is done or the client leaves.
async fn run_session<S>(
    socket: WebSocketStream<S>,
    framing: ChannelFraming,
    ports: Vec<u16>,
    forwarder: Forwarder,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut source) = socket.split();
    let (outbox, mut outbox_rx) = mpsc::channel::<Message>(OUTBOX_MESSAGES);
    let writer = tokio::spawn(async move {
        while let Some(message) = outbox_rx.recv().await {
            if sink.send(message).await.is_err() {
                return;
            }
        }
        // A normal closure code: Go clients take a Close without one for a failure.
        let close = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        let _ = sink.send(Message::Close(Some(close))).await;
        let _ = sink.close().await;
    });

    let (finished_tx, mut finished_rx) = mpsc::unbounded_channel::<usize>();
    let mut to_pod: Vec<Option<WriteHalf<tokio::io::DuplexStream>>> = Vec::new();
    let mut ports_running = JoinSet::new();
    for (index, port) in ports.iter().copied().enumerate() {
        let (data_channel, error_channel) = channels(index);
        let port_bytes = port.to_le_bytes();
        for channel in [data_channel, error_channel] {
            if outbox
                .send(framing.encode(channel, &port_bytes))
                .await
                .is_err()
            {
                return;
            }
        }
        let (ours, provider_side) = tokio::io::duplex(PIPE_BUFFER);
        let (mut from_pod, writer_half) = tokio::io::split(ours);
        to_pod.push(Some(writer_half));
        let outbox = outbox.clone();
        let forwarder = forwarder.clone();
        let finished = finished_tx.clone();
        ports_running.spawn(async move {
            let pump = async {
                let mut buffer = vec![0u8; 32 * 1024];
                loop {
                    match from_pod.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let message =
                                framing.encode(data_channel, buffer.get(..n).unwrap_or_default());
                            if outbox.send(message).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                // The pod closed its side: without half-close in v4, this port is done.
                let _ = finished.send(index);
            };
            let forward = async {
                if let Err(message) = forwarder.forward(port, Box::new(provider_side)).await {
                    let _ = outbox
                        .send(framing.encode(error_channel, message.as_bytes()))
                        .await;
                }
            };
            tokio::join!(pump, forward);
        });
    }
    drop(outbox);
    drop(finished_tx);

    loop {
        tokio::select! {
            message = source.next() => match message {
                Some(Ok(message)) => {
                    if message.is_close() {
                        break;
                    }
                    let Some((channel, data)) = framing.decode(message) else { continue };
                    let index = usize::from(channel / 2);
                    if channel % 2 != 0 || data.is_empty() {
                        continue; // error channels are ours to write; clients do not
                    }
                    if let Some(slot) = to_pod.get_mut(index)
                        && let Some(pipe) = slot
                        && pipe.write_all(&data).await.is_err()
                    {
                        *slot = None;
                    }
                }
                Some(Err(err)) => {
                    tracing::debug!(pod = %forwarder.pod, "port-forward WebSocket failed: {err}");
                    break;
                }
                None => break,
            },
            Some(index) = finished_rx.recv() => {
                if let Some(mut pipe) = to_pod.get_mut(index).and_then(Option::take) {
                    let _ = pipe.shutdown().await;
                }
            }
            done = ports_running.join_next() => {
                if done.is_none() {
                    // Every port is done: the writer sends what is queued, then a Close frame.
                    let _ = writer.await;
                    return;
                }
            }
        }
    }
    // The client left: end every forward (closing its connection in the pod).
    ports_running.shutdown().await;
    writer.abort();
}

/// The data and error channels of the port at `index` (at most 127 ports, checked earlier).
fn channels(index: usize) -> (u8, u8) {
    let data = u8::try_from(index * 2).unwrap_or(u8::MAX - 1);
    (data, data.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_come_from_repeated_and_comma_separated_parameters() {
        assert_eq!(
            requested_ports(Some("port=80&port=443,8080")),
            Ok(vec![80, 443, 8080])
        );
        assert_eq!(requested_ports(Some("ports=80%2C1234")), Ok(vec![80, 1234]));
        assert!(
            requested_ports(Some("port=0"))
                .unwrap_err()
                .contains("\"0\"")
        );
        assert!(
            requested_ports(Some("port=http"))
                .unwrap_err()
                .contains("http")
        );
        assert!(requested_ports(None).unwrap_err().contains("required"));
    }

    #[test]
    fn binary_and_base64_framing_round_trip() {
        for framing in [ChannelFraming::Binary, ChannelFraming::Base64] {
            let message = framing.encode(3, b"hello\x00\xff");
            assert_eq!(
                framing.decode(message),
                Some((3, Bytes::from_static(b"hello\x00\xff")))
            );
        }
        assert_eq!(
            ChannelFraming::Base64.encode(1, &8080u16.to_le_bytes()),
            Message::text("1kB8=")
        );
        assert_eq!(
            ChannelFraming::Binary.decode(Message::binary(Vec::new())),
            None
        );
        assert_eq!(
            ChannelFraming::Base64.decode(Message::text("0not base64!")),
            None
        );
    }
}
