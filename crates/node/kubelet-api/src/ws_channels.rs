//! The Kubernetes WebSocket channel protocols (`channel.k8s.io` family), reusable by exec,
//! attach and port-forward.
//!
//! Every WebSocket message carries one channel's data, prefixed by the channel number:
//! - binary protocols (`channel.k8s.io`, `v4.channel.k8s.io`, `v5.channel.k8s.io`,
//!   `portforward.k8s.io`, `v4.channel.k8s.io`…): a binary message `[channel, data…]`;
//! - base64 protocols (`base64.channel.k8s.io`, `v4.base64.channel.k8s.io`, …): a text
//!   message `'0' + channel` followed by the data in standard base64;
//! - `v5.channel.k8s.io` adds a close signal: the binary message `[255, channel]` means the
//!   client will send nothing more on `channel` (e.g. stdin's end of input).
//!
//! [`Mux::start`] runs a WebSocket with a set of channels and hands out a [`ChannelReader`]
//! (what the client sends on a channel, EOF at its close signal or the connection's end) and a
//! [`ChannelWriter`] per channel. Writes from all channels go out in the order they are made
//! (so an exit status written after the last output arrives after it); once every writer is
//! dropped the mux sends a normal Close and ends. A malformed message (bad base64, wrong
//! message type, a close signal without a channel) closes that connection only, with a Close
//! frame naming the problem; messages for channels nobody reads are ignored, as the kubelet does.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::{CancellationToken, PollSender};

/// The first byte of a v5 close signal.
pub const CLOSE_SIGNAL: u8 = 255;
/// Largest chunk of data put into one message.
const MAX_CHUNK: usize = 32 * 1024;
/// Messages queued per direction before the other side waits.
const QUEUE: usize = 16;

/// How channel numbers and data are put into messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Binary messages, channel number as the first byte.
    Binary,
    /// Text messages, channel number as an ASCII digit, data in base64.
    Base64,
}

/// A negotiated channel protocol's framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// Binary or base64.
    pub encoding: Encoding,
    /// Whether the client may close single channels (`v5.channel.k8s.io`).
    pub close_signal: bool,
}

/// One decoded client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Data for a channel (possibly empty).
    Data {
        /// The channel.
        channel: u8,
        /// The data.
        data: Bytes,
    },
    /// The client will send nothing more on this channel.
    Close {
        /// The channel.
        channel: u8,
    },
    /// Nothing to act on (an empty message, a ping or pong).
    Nothing,
    /// The client closed the WebSocket.
    End,
}

/// Why a client message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// A text message on a binary protocol or the reverse.
    #[error("a {got} message on a {expected} channel protocol")]
    WrongMessageType {
        /// What the protocol uses.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// The channel digit of a base64 message is not a digit.
    #[error("base64 channel message starts with {0:?}, not a channel digit")]
    BadChannelDigit(char),
    /// The data of a base64 message is not base64.
    #[error("channel {channel} data is not valid base64: {reason}")]
    BadBase64 {
        /// The channel.
        channel: u8,
        /// What the decoder said.
        reason: String,
    },
    /// A v5 close signal without the channel it closes.
    #[error("close signal without a channel number")]
    CloseWithoutChannel,
}

impl Framing {
    /// Encodes `data` for `channel`.
    pub fn encode(&self, channel: u8, data: &[u8]) -> Message {
        match self.encoding {
            Encoding::Binary => {
                let mut frame = Vec::with_capacity(data.len() + 1);
                frame.push(channel);
                frame.extend_from_slice(data);
                Message::Binary(frame.into())
            }
            Encoding::Base64 => {
                let mut text = String::with_capacity(data.len() * 4 / 3 + 5);
                text.push(char::from(b'0'.wrapping_add(channel)));
                base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
                Message::Text(text.into())
            }
        }
    }

    /// Decodes one client message.
    pub fn decode(&self, message: Message) -> Result<Incoming, FramingError> {
        let (payload, binary): (Bytes, bool) = match message {
            Message::Binary(data) => (data, true),
            Message::Text(text) => (Bytes::from(text.as_str().to_owned()), false),
            Message::Close(_) => return Ok(Incoming::End),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                return Ok(Incoming::Nothing);
            }
        };
        let expected = match self.encoding {
            Encoding::Binary => "binary",
            Encoding::Base64 => "text",
        };
        if binary != (self.encoding == Encoding::Binary) {
            return Err(FramingError::WrongMessageType {
                expected,
                got: if binary { "binary" } else { "text" },
            });
        }
        let Some(&first) = payload.first() else {
            return Ok(Incoming::Nothing);
        };
        let rest = payload.slice(1..);
        if self.close_signal && first == CLOSE_SIGNAL {
            return match rest.first() {
                Some(&channel) => Ok(Incoming::Close { channel }),
                None => Err(FramingError::CloseWithoutChannel),
            };
        }
        match self.encoding {
            Encoding::Binary => Ok(Incoming::Data {
                channel: first,
                data: rest,
            }),
            Encoding::Base64 => {
                if !first.is_ascii_digit() {
                    return Err(FramingError::BadChannelDigit(char::from(first)));
                }
                let channel = first - b'0';
                let data = base64::engine::general_purpose::STANDARD
                    .decode(&rest)
                    .map_err(|e| FramingError::BadBase64 {
                        channel,
                        reason: e.to_string(),
                    })?;
                Ok(Incoming::Data {
                    channel,
                    data: data.into(),
                })
            }
        }
    }
}

/// What the client sends on one channel; EOF at its close signal or the connection's end.
pub struct ChannelReader {
    inner: tokio_util::io::StreamReader<
        tokio_stream::wrappers::ReceiverStream<io::Result<Bytes>>,
        Bytes,
    >,
}

impl std::fmt::Debug for ChannelReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelReader")
    }
}

impl AsyncRead for ChannelReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

/// Writes to one channel. Writes of all channels are sent in order; shutdown is a no-op
/// (channels are not closed individually towards the client); dropping every writer ends the
/// connection.
#[derive(Debug)]
pub struct ChannelWriter {
    channel: u8,
    queue: PollSender<(u8, Bytes)>,
}

impl ChannelWriter {
    /// The channel this writer sends on.
    pub fn channel(&self) -> u8 {
        self.channel
    }
}

impl AsyncWrite for ChannelWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let gone = || io::Error::new(io::ErrorKind::BrokenPipe, "the WebSocket has closed");
        match self.queue.poll_reserve(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(Err(gone())),
            Poll::Ready(Ok(())) => {}
        }
        let n = buf.len().min(MAX_CHUNK);
        let chunk = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
        let channel = self.channel;
        match self.queue.send_item((channel, chunk)) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A running channel multiplexer over one WebSocket.
#[derive(Debug)]
pub struct Mux {
    readers: HashMap<u8, ChannelReader>,
    writers: HashMap<u8, ChannelWriter>,
    closed: CancellationToken,
}

impl Mux {
    /// Starts serving `ws` with `framing`: `read_channels` are the channels the client may send
    /// on, `write_channels` those we send on. The connection runs on its own task.
    pub fn start<S>(
        ws: WebSocketStream<S>,
        framing: Framing,
        read_channels: &[u8],
        write_channels: &[u8],
    ) -> Self
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut readers = HashMap::new();
        let mut inboxes = HashMap::new();
        for &channel in read_channels {
            let (tx, rx) = mpsc::channel(QUEUE);
            inboxes.insert(channel, tx);
            readers.insert(
                channel,
                ChannelReader {
                    inner: tokio_util::io::StreamReader::new(
                        tokio_stream::wrappers::ReceiverStream::new(rx),
                    ),
                },
            );
        }
        let (out_tx, out_rx) = mpsc::channel(QUEUE);
        let writers = write_channels
            .iter()
            .map(|&channel| {
                (
                    channel,
                    ChannelWriter {
                        channel,
                        queue: PollSender::new(out_tx.clone()),
                    },
                )
            })
            .collect();
        drop(out_tx);
        let closed = CancellationToken::new();
        tokio::spawn(run(ws, framing, inboxes, out_rx, closed.clone()));
        Self {
            readers,
            writers,
            closed,
        }
    }

    /// Takes the reader of `channel` (once).
    pub fn reader(&mut self, channel: u8) -> Option<ChannelReader> {
        self.readers.remove(&channel)
    }

    /// Takes the writer of `channel` (once).
    pub fn writer(&mut self, channel: u8) -> Option<ChannelWriter> {
        self.writers.remove(&channel)
    }

    /// Resolves when the connection has ended (the client went away, or all writers are done).
    pub fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }
}

/// Runs the connection: the reading and the writing direction are separate tasks, so a
/// channel whose reader is slow (stdin of a busy process) never holds up output.
async fn run<S>(
    ws: WebSocketStream<S>,
    framing: Framing,
    inboxes: HashMap<u8, mpsc::Sender<io::Result<Bytes>>>,
    outgoing: mpsc::Receiver<(u8, Bytes)>,
    closed: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    let (violation_tx, violation_rx) = tokio::sync::oneshot::channel();
    let reading = tokio::spawn(read_messages(
        stream,
        framing,
        inboxes,
        violation_tx,
        closed.clone(),
    ));
    write_messages(sink, framing, outgoing, violation_rx, closed.clone()).await;
    closed.cancel();
    let _ = reading.await;
}

async fn write_messages<S>(
    mut sink: futures::stream::SplitSink<WebSocketStream<S>, Message>,
    framing: Framing,
    mut outgoing: mpsc::Receiver<(u8, Bytes)>,
    mut violation: tokio::sync::oneshot::Receiver<FramingError>,
    closed: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        tokio::select! {
            next = outgoing.recv() => match next {
                Some((channel, data)) => {
                    if sink.send(framing.encode(channel, &data)).await.is_err() {
                        return;
                    }
                }
                None => {
                    // Every writer is gone: the session is over. A normal closure code: Go
                    // clients (kubectl) take a Close without one for a failed connection and
                    // drop what they read on the error channel.
                    let close = CloseFrame { code: CloseCode::Normal, reason: "".into() };
                    let _ = sink.send(Message::Close(Some(close))).await;
                    let _ = sink.close().await;
                    return;
                }
            },
            err = &mut violation => {
                if let Ok(err) = err {
                    tracing::info!("closing a WebSocket channel connection: {err}");
                    let code = match err {
                        FramingError::WrongMessageType { .. } => CloseCode::Unsupported,
                        _ => CloseCode::Invalid,
                    };
                    let reason: String = err.to_string().chars().take(120).collect();
                    let frame = CloseFrame { code, reason: reason.into() };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    let _ = sink.close().await;
                }
                return;
            }
            () = closed.cancelled() => return,
        }
    }
}

async fn read_messages<S>(
    mut stream: futures::stream::SplitStream<WebSocketStream<S>>,
    framing: Framing,
    mut inboxes: HashMap<u8, mpsc::Sender<io::Result<Bytes>>>,
    violation: tokio::sync::oneshot::Sender<FramingError>,
    closed: CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let message = tokio::select! {
            message = stream.next() => message,
            () = closed.cancelled() => return,
        };
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(err)) => {
                tracing::debug!("WebSocket channel connection failed: {err}");
                break;
            }
            None => break,
        };
        match framing.decode(message) {
            Ok(Incoming::Data { channel, data }) => {
                let Some(inbox) = inboxes.get(&channel) else {
                    tracing::debug!(channel, "ignoring data for a channel nobody reads");
                    continue;
                };
                if !data.is_empty() && inbox.send(Ok(data)).await.is_err() {
                    // The reader is gone: further data on it is dropped.
                    inboxes.remove(&channel);
                }
            }
            Ok(Incoming::Close { channel }) => {
                inboxes.remove(&channel);
            }
            Ok(Incoming::Nothing) => {}
            Ok(Incoming::End) => break,
            Err(err) => {
                let _ = violation.send(err);
                return;
            }
        }
    }
    // The client is gone (or said goodbye): readers see EOF, the session is cancelled.
    drop(inboxes);
    closed.cancel();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BINARY_V5: Framing = Framing {
        encoding: Encoding::Binary,
        close_signal: true,
    };
    const BASE64: Framing = Framing {
        encoding: Encoding::Base64,
        close_signal: false,
    };

    #[test]
    fn binary_round_trip_and_close_signal() {
        let message = BINARY_V5.encode(1, b"hi");
        assert_eq!(message, Message::Binary(vec![1, b'h', b'i'].into()));
        assert_eq!(
            BINARY_V5.decode(message).unwrap(),
            Incoming::Data {
                channel: 1,
                data: Bytes::from_static(b"hi")
            }
        );
        assert_eq!(
            BINARY_V5
                .decode(Message::Binary(vec![255, 0].into()))
                .unwrap(),
            Incoming::Close { channel: 0 }
        );
        assert_eq!(
            BINARY_V5.decode(Message::Binary(vec![255].into())),
            Err(FramingError::CloseWithoutChannel)
        );
    }

    #[test]
    fn base64_round_trip_and_errors() {
        let message = BASE64.encode(2, b"hello");
        assert_eq!(message, Message::Text("2aGVsbG8=".into()));
        assert_eq!(
            BASE64.decode(message).unwrap(),
            Incoming::Data {
                channel: 2,
                data: Bytes::from_static(b"hello")
            }
        );
        assert!(matches!(
            BASE64.decode(Message::Text("0!!!".into())),
            Err(FramingError::BadBase64 { channel: 0, .. })
        ));
        assert!(matches!(
            BASE64.decode(Message::Text("x".into())),
            Err(FramingError::BadChannelDigit('x'))
        ));
        assert!(matches!(
            BASE64.decode(Message::Binary(vec![0].into())),
            Err(FramingError::WrongMessageType { .. })
        ));
    }
}
