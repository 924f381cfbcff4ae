//! SPDY/3.1 as Kubernetes API servers speak it to a kubelet's `/exec`, `/attach` and
//! `/portForward` endpoints (peer: github.com/moby/spdystream).
//!
//! - [`frame`]: the frame types and a partial-input [`FrameCodec`] with size limits.
//! - [`headers`]: name/value header blocks and their zlib compression with the SPDY/3 dictionary.
//! - [`session`]: [`Connection`] multiplexes [`Stream`]s over any async transport in client or
//!   server role, with per-stream and session flow control, PING and GOAWAY.
//!
//! Against the Go spdystream library (every Kubernetes API server and kubectl) use
//! [`Config::spdystream_compatible`]: spdystream implements no flow control, so strict
//! SPDY/3.1 windows would stall after 64 KiB.
//!
//! Errors: a malformed frame or header block is a session error (GOAWAY PROTOCOL_ERROR, then the
//! transport is closed); misuse of a single stream (data after FIN, window overflow, too many
//! streams) resets only that stream.
//!
//! ```no_run
//! # async fn serve(io: tokio::net::TcpStream) -> Result<(), Box<dyn std::error::Error>> {
//! use updraft_spdy::{Config, Connection, Headers, Role};
//! let (_handle, mut incoming) = Connection::new(io, Role::Server, Config::spdystream_compatible())?;
//! while let Some(stream) = incoming.accept().await {
//!     let kind = stream.headers().get("streamtype").unwrap_or_default().to_owned();
//!     stream.reply(Headers::new(), false)?;
//!     let (mut rx, mut tx) = stream.split();
//!     tokio::spawn(async move { tokio::io::copy(&mut rx, &mut tx).await });
//!     let _ = kind;
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod dictionary;
pub mod frame;
pub mod headers;
pub mod session;

pub use frame::{CodecLimits, Frame, FrameCodec, FrameError, GoAwayStatus, RstStatus, StreamId};
pub use headers::{HeaderError, Headers};
pub use session::{
    CloseReason, Config, Connection, ConnectionHandle, Diagnostics, IncomingStreams, ReaderWait,
    RecvStream, Role, SendStream, SessionError, Stream, StreamDiagnostics, StreamError,
};
