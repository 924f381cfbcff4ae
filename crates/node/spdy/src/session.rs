//! A SPDY/3.1 session: multiplexed streams with flow control over one byte stream.
//!
//! Two tasks drive a connection: the reader decodes frames and applies them to the shared
//! state, the writer drains the outbox. Stream handles and the [`ConnectionHandle`] only touch
//! the shared state under a short synchronous lock, so frame order on the wire is exactly the
//! order in which frames were queued (SYN_STREAM before its data, ids increasing).
//!
//! Memory bounds: the outbox holds at most `OUTBOX_DATA_LIMIT` data bytes before stream
//! writers wait (plus the writer's batch in flight) and at most `OUTBOX_FRAME_LIMIT` frames
//! before the reader waits. Each stream buffers at most `initial_window` received bytes (or one
//! frame), except that in lax receive mode the reader may go past that, by at most
//! [`Config::stalled_read_ahead`] bytes over the whole session, and only while the outbox is
//! full: then our own sending is what stalls, and refusing to read as well can deadlock
//! against a peer that stops reading until its writes go through (spdystream does).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::frame::{
    CodecLimits, Frame, FrameCodec, FrameError, GoAwayStatus, RstStatus, Setting, SettingId,
    StreamId,
};
use crate::headers::Headers;

/// The window every stream and the session start with (SPDY/3.1).
pub const DEFAULT_WINDOW: u32 = 64 * 1024;
const MAX_WINDOW: i64 = 0x7fff_ffff;
/// Largest data frame we send; keeps one stream from monopolising the connection.
const MAX_DATA_FRAME: usize = 16 * 1024;
/// Data bytes queued for the writer before stream writers wait.
const OUTBOX_DATA_LIMIT: usize = 256 * 1024;
/// Frames queued for the writer before the reader stops reading (a peer that sends PINGs but never reads).
const OUTBOX_FRAME_LIMIT: usize = 1024;
/// Default [`Config::stalled_read_ahead`].
pub const DEFAULT_STALLED_READ_AHEAD: usize = 4 << 20;

/// Which end of the connection we are: clients open odd streams, servers even ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Initiated the transport; opens odd-numbered streams and odd pings.
    Client,
    /// Accepted the transport; opens even-numbered streams and even pings.
    Server,
}

/// Session parameters.
#[derive(Clone, Debug)]
pub struct Config {
    /// Frame and header-block size limits for decoding.
    pub limits: CodecLimits,
    /// Receive window per stream we advertise; also the bound on data buffered per stream.
    pub initial_window: u32,
    /// Receive window for the whole session.
    pub session_window: u32,
    /// Streams the peer may have open towards us at once; more are refused.
    pub max_concurrent_streams: u32,
    /// Whether our sending honours the peer's windows. The Go spdystream library (what
    /// Kubernetes API servers use) never sends WINDOW_UPDATE, so against it this must be off;
    /// the transport's own backpressure then bounds what is in flight.
    pub send_flow_control: bool,
    /// Whether a peer overrunning our receive window gets RST_STREAM FLOW_CONTROL_ERROR. When
    /// off (spdystream peers), the reader instead stops reading the transport until the
    /// application drains the stream, so memory stays bounded either way (at the cost of
    /// head-of-line blocking: one unread stream stalls the others). Only per-stream windows are
    /// policed; the session window is credited back as data is consumed.
    pub strict_receive_window: bool,
    /// How long closing waits to flush queued frames to a peer that does not read.
    pub close_timeout: Duration,
    /// With `strict_receive_window` off: bytes the reader may buffer beyond the per-stream
    /// bound, summed over the session, while our own sending is stalled (the outbox is full).
    /// A spdystream peer stops reading while one of its frame handlers waits to write (it
    /// sends SYN_REPLY from its stream handler, queued behind its data writers). If we then
    /// also stopped reading because the application draining a stream is itself blocked
    /// sending to that peer (an echo, a port forward, `cat` under exec), both ends would wait
    /// on each other forever. Reading ahead lets the peer's writes complete so it reads
    /// again; a peer that needs more than this absorbed before it reads can still stall.
    pub stalled_read_ahead: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            limits: CodecLimits::default(),
            initial_window: DEFAULT_WINDOW,
            session_window: DEFAULT_WINDOW,
            max_concurrent_streams: 100,
            send_flow_control: true,
            strict_receive_window: true,
            close_timeout: Duration::from_secs(5),
            stalled_read_ahead: DEFAULT_STALLED_READ_AHEAD,
        }
    }
}

impl Config {
    /// Settings for a peer using github.com/moby/spdystream (Kubernetes API servers, kubectl):
    /// it implements no flow control, so ours is relaxed to transport backpressure.
    pub fn spdystream_compatible() -> Self {
        Self {
            send_flow_control: false,
            strict_receive_window: false,
            ..Self::default()
        }
    }
}

/// Why a connection ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// The peer closed the transport.
    #[error("peer closed the connection")]
    PeerClosed,
    /// We closed the connection.
    #[error("connection closed locally")]
    Local,
    /// The peer violated the protocol; we sent GOAWAY PROTOCOL_ERROR.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The transport failed.
    #[error("transport error: {0}")]
    Io(String),
}

/// Errors from connection-level operations.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection has ended.
    #[error("connection closed: {0}")]
    Closed(CloseReason),
    /// A GOAWAY was sent or received, so no new streams may start.
    #[error("connection is going away; no new streams")]
    GoingAway,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS is reached.
    #[error("peer allows at most {0} concurrent streams")]
    TooManyStreams(u32),
    /// All 2^31 stream ids of our parity are used.
    #[error("stream ids exhausted")]
    StreamIdsExhausted,
    /// The [`Config`] is out of range.
    #[error("invalid SPDY config: {0}")]
    InvalidConfig(&'static str),
    /// Setting up the codec failed.
    #[error("codec: {0}")]
    Codec(#[from] FrameError),
}

/// Errors from stream operations.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The stream was reset by RST_STREAM.
    #[error("stream reset by {by} with status {}", status.0)]
    Reset {
        /// Who reset it ("peer" or "us").
        by: &'static str,
        /// The RST_STREAM status.
        status: RstStatus,
    },
    /// The peer's GOAWAY says it never processed this stream.
    #[error("stream refused by the peer's GOAWAY")]
    Refused,
    /// The connection ended before the stream did.
    #[error("connection closed: {0}")]
    ConnectionClosed(CloseReason),
    /// SYN_REPLY was already sent, or the stream was opened by us.
    #[error("stream cannot be replied to (already replied or locally opened)")]
    CannotReply,
    /// Only streams we opened receive a SYN_REPLY.
    #[error("the peer opened this stream; there is no reply to wait for")]
    NotOpenedByUs,
    /// We already finished sending on this stream.
    #[error("stream is closed for sending")]
    SendClosed,
}

impl From<StreamError> for io::Error {
    fn from(e: StreamError) -> Self {
        let kind = match &e {
            StreamError::Reset { .. } | StreamError::Refused => io::ErrorKind::ConnectionReset,
            StreamError::ConnectionClosed(_) => io::ErrorKind::ConnectionAborted,
            StreamError::CannotReply => io::ErrorKind::InvalidInput,
            StreamError::SendClosed => io::ErrorKind::BrokenPipe,
            StreamError::NotOpenedByUs => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    ResetByPeer(RstStatus),
    ResetByUs(RstStatus),
    Refused,
}

#[derive(Debug)]
struct StreamState {
    local: bool,
    recv_buf: VecDeque<Bytes>,
    recv_buffered: usize,
    recv_fin: bool,
    /// Credit the peer still has on this stream (may go negative with a non-conforming peer).
    recv_window: i64,
    /// Bytes consumed by the application and not yet returned with WINDOW_UPDATE.
    recv_unacked: u32,
    send_window: i64,
    send_fin: bool,
    /// For incoming streams: SYN_REPLY sent. Always true for ours.
    replied: bool,
    /// For our streams: the peer's SYN_REPLY headers.
    reply: Option<Headers>,
    ended: Option<Ended>,
    recv_open: bool,
    send_open: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    reply_waiters: Vec<oneshot::Sender<()>>,
}

impl StreamState {
    fn new(local: bool, send_window: i64, recv_window: u32) -> Self {
        Self {
            local,
            recv_buf: VecDeque::new(),
            recv_buffered: 0,
            recv_fin: false,
            recv_window: i64::from(recv_window),
            recv_unacked: 0,
            send_window,
            send_fin: false,
            replied: local,
            reply: None,
            ended: None,
            recv_open: true,
            send_open: true,
            read_waker: None,
            write_waker: None,
            reply_waiters: Vec::new(),
        }
    }

    fn is_active(&self) -> bool {
        self.ended.is_none() && !(self.recv_fin && self.send_fin)
    }

    fn wake_all(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
        for w in self.reply_waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

#[derive(Debug)]
struct Shared {
    role: Role,
    config: Config,
    streams: HashMap<StreamId, StreamState>,
    next_local_id: u32,
    next_ping_id: u32,
    last_remote_id: StreamId,
    session_send_window: i64,
    session_recv_unacked: u32,
    peer_initial_window: i64,
    peer_max_streams: Option<u32>,
    goaway_sent: bool,
    goaway_received: Option<StreamId>,
    closed: Option<CloseReason>,
    outbox: VecDeque<Frame>,
    outbox_data: usize,
    send_waiters: Vec<Waker>,
    pings: HashMap<u32, oneshot::Sender<()>>,
    /// What the reader task is waiting for instead of reading the transport, if anything.
    reader_waiting: Option<ReaderWait>,
    /// The writer is handing a batch of frames to the transport.
    writing: bool,
    /// Live ConnectionHandle clones plus the IncomingStreams, for closing an abandoned connection.
    users: usize,
}

#[derive(Debug)]
struct Inner {
    shared: Mutex<Shared>,
    /// Wakes the writer task: frames were queued or the connection closed.
    writer_wake: Notify,
    /// Wakes the reader task: buffered stream data was consumed or outbox space freed.
    reader_wake: Notify,
    shutdown: CancellationToken,
    done: CancellationToken,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A poisoned lock means a panic elsewhere; the state is still usable for shutting down.
        updraft_common::sync::lock(&self.shared)
    }
}

impl Shared {
    /// Whether the reader may buffer `len` more bytes for a stream holding `buffered`, past its
    /// bound `capacity`: only while stream writers wait on a full outbox (our sending is
    /// stalled on the peer), and within [`Config::stalled_read_ahead`] over all streams.
    fn may_read_ahead(&self, capacity: usize, buffered: usize, len: usize) -> bool {
        if self.outbox_data < OUTBOX_DATA_LIMIT {
            return false;
        }
        let ahead: usize = self
            .streams
            .values()
            .map(|s| s.recv_buffered.saturating_sub(capacity))
            .sum();
        let more = (buffered + len)
            .saturating_sub(capacity)
            .saturating_sub(buffered.saturating_sub(capacity));
        ahead.saturating_add(more) <= self.config.stalled_read_ahead
    }

    fn queue(&mut self, frame: Frame) {
        if let Frame::Data { data, .. } = &frame {
            self.outbox_data += data.len();
        }
        self.outbox.push_back(frame);
    }

    fn close(&mut self, reason: CloseReason) {
        if self.closed.is_some() {
            return;
        }
        tracing::debug!(%reason, "spdy connection closing");
        self.closed = Some(reason);
        for s in self.streams.values_mut() {
            s.wake_all();
        }
        self.pings.clear();
        for w in self.send_waiters.drain(..) {
            w.wake();
        }
    }

    fn reset(&mut self, id: StreamId, status: RstStatus) {
        if let Some(s) = self.streams.get_mut(&id) {
            if s.ended.is_none() {
                s.ended = Some(Ended::ResetByUs(status));
            }
            s.wake_all();
        }
        self.queue(Frame::RstStream {
            stream_id: id,
            status,
        });
    }

    fn is_remote_id(&self, id: StreamId) -> bool {
        let ours_odd = self.role == Role::Client;
        (id % 2 == 1) != ours_odd
    }

    /// Forgets a stream once no handle refers to it, cancelling it if it is still open.
    fn release(&mut self, id: StreamId) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if s.recv_open || s.send_open {
            return;
        }
        let active = s.is_active();
        self.streams.remove(&id);
        if active && self.closed.is_none() {
            self.queue(Frame::RstStream {
                stream_id: id,
                status: RstStatus::CANCEL,
            });
        }
        self.maybe_close_idle();
    }

    fn maybe_close_idle(&mut self) {
        if self.users == 0 && self.streams.is_empty() {
            self.close(CloseReason::Local);
        }
    }

    fn stream_error(&self, s: &StreamState) -> Option<StreamError> {
        match s.ended {
            Some(ended) => Some(ended_error(ended)),
            None => self.closed.clone().map(StreamError::ConnectionClosed),
        }
    }
}

fn ended_error(ended: Ended) -> StreamError {
    match ended {
        Ended::ResetByPeer(status) => StreamError::Reset { by: "peer", status },
        Ended::ResetByUs(status) => StreamError::Reset { by: "us", status },
        Ended::Refused => StreamError::Refused,
    }
}

/// Why the reader task is not reading the transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReaderWait {
    /// The outbox holds too many frames: the peer is not reading what we send.
    Outbox,
    /// This stream's buffer is full (head-of-line blocking, lax receive mode only).
    Stream(StreamId),
}

/// A snapshot of one stream's flow-control state; see [`ConnectionHandle::diagnostics`].
#[derive(Clone, Debug)]
pub struct StreamDiagnostics {
    /// The stream id.
    pub id: StreamId,
    /// Received bytes the application has not read yet.
    pub recv_buffered: usize,
    /// Credit the peer still has on this stream.
    pub recv_window: i64,
    /// Our credit for sending on this stream.
    pub send_window: i64,
    /// The peer finished sending.
    pub recv_fin: bool,
    /// We finished sending.
    pub send_fin: bool,
    /// How the stream ended early, if it did.
    pub ended: Option<StreamError>,
}

/// A snapshot of a session's flow-control state, for explaining a stall.
#[derive(Clone, Debug)]
pub struct Diagnostics {
    /// Why the connection ended, if it has.
    pub closed: Option<CloseReason>,
    /// What the reader task waits for instead of reading the transport.
    pub reader_waiting: Option<ReaderWait>,
    /// The writer is inside a transport write; if this persists, the peer is not reading.
    pub writing: bool,
    /// Frames queued for the writer.
    pub outbox_frames: usize,
    /// Data bytes queued for the writer; stream writers wait once this reaches the limit.
    pub outbox_data: usize,
    /// Our credit for sending on the whole session.
    pub session_send_window: i64,
    /// Streams in id order.
    pub streams: Vec<StreamDiagnostics>,
}

impl std::fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "closed={:?} reader_waiting={:?} writing={} outbox={} frames/{} data bytes (limit {OUTBOX_DATA_LIMIT}) session_send_window={}",
            self.closed,
            self.reader_waiting,
            self.writing,
            self.outbox_frames,
            self.outbox_data,
            self.session_send_window
        )?;
        for s in &self.streams {
            write!(
                f,
                "; stream {}: recv_buffered={} recv_window={} send_window={} recv_fin={} send_fin={} ended={:?}",
                s.id,
                s.recv_buffered,
                s.recv_window,
                s.send_window,
                s.recv_fin,
                s.send_fin,
                s.ended
            )?;
        }
        Ok(())
    }
}

/// Entry point: wraps a transport into a running SPDY session.
#[derive(Debug)]
pub struct Connection;

impl Connection {
    /// Starts a session over `io` (e.g. a hyper-upgraded connection) on the current tokio
    /// runtime. Returns the handle for opening streams and the queue of streams the peer opens.
    #[allow(
        clippy::new_ret_no_self,
        reason = "a connection is only reachable through its two halves"
    )]
    pub fn new<T>(
        io: T,
        role: Role,
        config: Config,
    ) -> Result<(ConnectionHandle, IncomingStreams), SessionError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if i64::from(config.initial_window) > MAX_WINDOW
            || i64::from(config.session_window) > MAX_WINDOW
        {
            return Err(SessionError::InvalidConfig(
                "windows must be at most 2^31-1 bytes",
            ));
        }
        if config.initial_window == 0 || config.max_concurrent_streams == 0 {
            return Err(SessionError::InvalidConfig(
                "initial_window and max_concurrent_streams must be positive",
            ));
        }
        let read_codec = FrameCodec::new(config.limits)?;
        let write_codec = FrameCodec::new(config.limits)?;
        let mut shared = Shared {
            role,
            config: config.clone(),
            streams: HashMap::new(),
            next_local_id: if role == Role::Client { 1 } else { 2 },
            next_ping_id: if role == Role::Client { 1 } else { 2 },
            last_remote_id: 0,
            session_send_window: i64::from(DEFAULT_WINDOW),
            session_recv_unacked: 0,
            peer_initial_window: i64::from(DEFAULT_WINDOW),
            peer_max_streams: None,
            goaway_sent: false,
            goaway_received: None,
            closed: None,
            outbox: VecDeque::new(),
            outbox_data: 0,
            send_waiters: Vec::new(),
            pings: HashMap::new(),
            reader_waiting: None,
            writing: false,
            users: 2,
        };
        shared.queue(Frame::Settings {
            clear: false,
            entries: vec![
                Setting {
                    flags: 0,
                    id: SettingId::MAX_CONCURRENT_STREAMS,
                    value: config.max_concurrent_streams,
                },
                Setting {
                    flags: 0,
                    id: SettingId::INITIAL_WINDOW_SIZE,
                    value: config.initial_window,
                },
            ],
        });
        if config.session_window > DEFAULT_WINDOW {
            shared.queue(Frame::WindowUpdate {
                stream_id: 0,
                delta: config.session_window - DEFAULT_WINDOW,
            });
        }
        let inner = Arc::new(Inner {
            shared: Mutex::new(shared),
            writer_wake: Notify::new(),
            reader_wake: Notify::new(),
            shutdown: CancellationToken::new(),
            done: CancellationToken::new(),
        });
        let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
        let (read_half, write_half) = tokio::io::split(io);
        let reader = FramedRead::new(read_half, read_codec);
        let writer = FramedWrite::new(write_half, write_codec);
        tokio::spawn(run_reader(inner.clone(), reader, incoming_tx));
        tokio::spawn(run_writer(inner.clone(), writer));
        Ok((
            ConnectionHandle {
                inner: inner.clone(),
            },
            IncomingStreams {
                inner,
                rx: incoming_rx,
            },
        ))
    }
}

async fn run_reader<R>(
    inner: Arc<Inner>,
    mut reader: FramedRead<R, FrameCodec>,
    incoming: mpsc::UnboundedSender<Stream>,
) where
    R: AsyncRead + Unpin,
{
    let reason = loop {
        let next = tokio::select! {
            next = reader.next() => next,
            () = inner.shutdown.cancelled() => break None,
        };
        match next {
            None => break Some(CloseReason::PeerClosed),
            Some(Err(FrameError::Io(e))) => break Some(CloseReason::Io(e.to_string())),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "spdy peer sent a bad frame");
                let mut shared = inner.lock();
                let last_good_stream_id = shared.last_remote_id;
                shared.queue(Frame::GoAway {
                    last_good_stream_id,
                    status: GoAwayStatus::PROTOCOL_ERROR,
                });
                break Some(CloseReason::Protocol(e.to_string()));
            }
            Some(Ok(frame)) => {
                if let Err(reason) = handle_frame(&inner, frame, &incoming).await {
                    let mut shared = inner.lock();
                    let last_good_stream_id = shared.last_remote_id;
                    shared.queue(Frame::GoAway {
                        last_good_stream_id,
                        status: GoAwayStatus::PROTOCOL_ERROR,
                    });
                    break Some(reason);
                }
            }
        }
    };
    if let Some(reason) = reason {
        inner.lock().close(reason);
    }
    inner.shutdown.cancel();
    inner.writer_wake.notify_one();
}

async fn run_writer<W>(inner: Arc<Inner>, mut writer: FramedWrite<W, FrameCodec>)
where
    W: AsyncWrite + Unpin,
{
    let close_timeout = inner.lock().config.close_timeout;
    let result: Result<(), FrameError> = async {
        loop {
            let (frames, closing) = {
                let mut shared = inner.lock();
                let frames: Vec<Frame> = shared.outbox.drain(..).collect();
                shared.outbox_data = 0;
                for w in shared.send_waiters.drain(..) {
                    w.wake();
                }
                (frames, shared.closed.is_some())
            };
            inner.reader_wake.notify_one();
            if frames.is_empty() {
                if closing {
                    return Ok(());
                }
                tokio::select! {
                    () = inner.writer_wake.notified() => {}
                    () = inner.shutdown.cancelled() => {
                        // Flush whatever the closing path queued (GOAWAY), then stop.
                        inner.lock().close(CloseReason::Local);
                    }
                }
                continue;
            }
            inner.lock().writing = true;
            let write_all = async {
                for frame in frames {
                    writer.feed(frame).await?;
                }
                writer.flush().await
            };
            if closing {
                // A peer that stopped reading must not keep us alive forever.
                tokio::time::timeout(close_timeout, write_all)
                    .await
                    .map_err(|_| {
                        FrameError::Io(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "flushing on close timed out",
                        ))
                    })??;
            } else {
                write_all.await?;
            }
            inner.lock().writing = false;
        }
    }
    .await;
    if let Err(e) = result {
        inner.lock().close(CloseReason::Io(e.to_string()));
    }
    let _ = tokio::time::timeout(close_timeout, writer.get_mut().shutdown_flush()).await;
    inner.shutdown.cancel();
    inner.done.cancel();
}

trait ShutdownFlush {
    fn shutdown_flush(&mut self) -> impl std::future::Future<Output = io::Result<()>>;
}

impl<W: AsyncWrite + Unpin> ShutdownFlush for W {
    async fn shutdown_flush(&mut self) -> io::Result<()> {
        tokio::io::AsyncWriteExt::shutdown(self).await
    }
}

/// Applies one frame. An `Err` is a session error: the caller sends GOAWAY PROTOCOL_ERROR.
async fn handle_frame(
    inner: &Arc<Inner>,
    frame: Frame,
    incoming: &mpsc::UnboundedSender<Stream>,
) -> Result<(), CloseReason> {
    // Bound what a peer that never reads can make us queue.
    loop {
        let wait = inner.reader_wake.notified();
        {
            let mut shared = inner.lock();
            if shared.outbox.len() < OUTBOX_FRAME_LIMIT {
                shared.reader_waiting = None;
                break;
            }
            shared.reader_waiting = Some(ReaderWait::Outbox);
        }
        inner.writer_wake.notify_one();
        wait.await;
    }
    match frame {
        Frame::Data {
            stream_id,
            fin,
            data,
        } => on_data(inner, stream_id, fin, data).await,
        Frame::SynStream {
            stream_id,
            fin,
            unidirectional,
            headers,
            ..
        } => {
            let mut shared = inner.lock();
            if shared.goaway_sent {
                // SPDY: after GOAWAY, new streams are ignored.
                return Ok(());
            }
            if !shared.is_remote_id(stream_id) || stream_id <= shared.last_remote_id {
                return Err(CloseReason::Protocol(format!(
                    "SYN_STREAM with invalid or non-increasing stream id {stream_id}"
                )));
            }
            shared.last_remote_id = stream_id;
            let max = shared.config.max_concurrent_streams as usize;
            let (held, active) = shared
                .streams
                .iter()
                .filter(|(id, _)| shared.is_remote_id(**id))
                .fold((0, 0), |(held, active), (_, s)| {
                    (held + 1, active + usize::from(s.is_active()))
                });
            // Streams that ended but are still held (e.g. never accepted) count too, up to a
            // second allowance, so a peer opening and resetting streams cannot grow the queue.
            if active >= max || held >= 2 * max {
                shared.queue(Frame::RstStream {
                    stream_id,
                    status: RstStatus::REFUSED_STREAM,
                });
                inner.writer_wake.notify_one();
                return Ok(());
            }
            let mut state = StreamState::new(
                false,
                shared.peer_initial_window,
                shared.config.initial_window,
            );
            state.recv_fin = fin;
            if unidirectional {
                state.send_fin = true;
                state.replied = true;
            }
            shared.streams.insert(stream_id, state);
            let stream = Stream::new(inner.clone(), stream_id, headers);
            drop(shared);
            if let Err(rejected) = incoming.send(stream) {
                let mut shared = inner.lock();
                // Nobody accepts streams any more: refuse instead of cancelling.
                if let Some(s) = shared.streams.get_mut(&stream_id) {
                    s.ended = Some(Ended::ResetByUs(RstStatus::REFUSED_STREAM));
                }
                shared.queue(Frame::RstStream {
                    stream_id,
                    status: RstStatus::REFUSED_STREAM,
                });
                drop(shared);
                drop(rejected);
                inner.writer_wake.notify_one();
            }
            Ok(())
        }
        Frame::SynReply {
            stream_id,
            fin,
            headers,
        } => {
            let mut shared = inner.lock();
            match shared.streams.get_mut(&stream_id) {
                Some(s) if s.local && s.reply.is_none() => {
                    s.reply = Some(headers);
                    s.recv_fin |= fin;
                    s.wake_all();
                }
                Some(s) if s.local => {
                    let _ = s;
                    shared.reset(stream_id, RstStatus::STREAM_IN_USE);
                }
                Some(_) => shared.reset(stream_id, RstStatus::PROTOCOL_ERROR),
                None => shared.queue(Frame::RstStream {
                    stream_id,
                    status: RstStatus::INVALID_STREAM,
                }),
            }
            inner.writer_wake.notify_one();
            Ok(())
        }
        Frame::Headers { stream_id, fin, .. } => {
            let mut shared = inner.lock();
            if let Some(s) = shared.streams.get_mut(&stream_id) {
                s.recv_fin |= fin;
                s.wake_all();
            }
            Ok(())
        }
        Frame::RstStream { stream_id, status } => {
            let mut shared = inner.lock();
            if let Some(s) = shared.streams.get_mut(&stream_id) {
                if s.ended.is_none() {
                    s.ended = Some(Ended::ResetByPeer(status));
                }
                s.wake_all();
            }
            Ok(())
        }
        Frame::Settings { entries, .. } => {
            let mut shared = inner.lock();
            for e in entries {
                if e.id == SettingId::INITIAL_WINDOW_SIZE {
                    let new = i64::from(e.value);
                    if new > MAX_WINDOW {
                        return Err(CloseReason::Protocol(format!(
                            "SETTINGS_INITIAL_WINDOW_SIZE {new} too large"
                        )));
                    }
                    let delta = new - shared.peer_initial_window;
                    shared.peer_initial_window = new;
                    for s in shared.streams.values_mut() {
                        s.send_window += delta;
                        if let Some(w) = s.write_waker.take() {
                            w.wake();
                        }
                    }
                } else if e.id == SettingId::MAX_CONCURRENT_STREAMS {
                    shared.peer_max_streams = Some(e.value);
                }
            }
            Ok(())
        }
        Frame::Ping { id } => {
            let mut shared = inner.lock();
            if shared.is_remote_id(id) {
                shared.queue(Frame::Ping { id });
                inner.writer_wake.notify_one();
            } else if let Some(waiter) = shared.pings.remove(&id) {
                let _ = waiter.send(());
            }
            Ok(())
        }
        Frame::GoAway {
            last_good_stream_id,
            ..
        } => {
            let mut shared = inner.lock();
            shared.goaway_received = Some(last_good_stream_id);
            for (id, s) in shared.streams.iter_mut() {
                if s.local && *id > last_good_stream_id && s.ended.is_none() {
                    s.ended = Some(Ended::Refused);
                    s.wake_all();
                }
            }
            Ok(())
        }
        Frame::WindowUpdate {
            stream_id: 0,
            delta,
        } => {
            let mut shared = inner.lock();
            shared.session_send_window += i64::from(delta);
            if shared.session_send_window > MAX_WINDOW {
                return Err(CloseReason::Protocol("session window overflow".into()));
            }
            for w in shared.send_waiters.drain(..) {
                w.wake();
            }
            Ok(())
        }
        Frame::WindowUpdate { stream_id, delta } => {
            let mut shared = inner.lock();
            let overflow = match shared.streams.get_mut(&stream_id) {
                Some(s) => {
                    s.send_window += i64::from(delta);
                    if let Some(w) = s.write_waker.take() {
                        w.wake();
                    }
                    s.send_window > MAX_WINDOW
                }
                None => false,
            };
            if overflow {
                shared.reset(stream_id, RstStatus::FLOW_CONTROL_ERROR);
                inner.writer_wake.notify_one();
            }
            Ok(())
        }
        Frame::Unknown { frame_type } => {
            tracing::debug!(frame_type, "ignoring unknown SPDY control frame");
            Ok(())
        }
    }
}

async fn on_data(
    inner: &Arc<Inner>,
    stream_id: StreamId,
    fin: bool,
    data: Bytes,
) -> Result<(), CloseReason> {
    let len = data.len();
    loop {
        let wait = inner.reader_wake.notified();
        {
            let mut shared = inner.lock();
            shared.reader_waiting = None;
            let strict = shared.config.strict_receive_window;
            let capacity = shared.config.initial_window as usize;
            let session_window = shared.config.session_window;
            let Some(s) = shared.streams.get_mut(&stream_id) else {
                // Unknown or forgotten stream: return the session credit and tell the peer.
                credit_session(&mut shared, len);
                if stream_id > shared.last_remote_id && shared.is_remote_id(stream_id) {
                    return Err(CloseReason::Protocol(format!(
                        "DATA for stream {stream_id} that was never opened"
                    )));
                }
                shared.queue(Frame::RstStream {
                    stream_id,
                    status: RstStatus::INVALID_STREAM,
                });
                inner.writer_wake.notify_one();
                return Ok(());
            };
            if s.ended.is_some() || !s.recv_open {
                // Nobody will read it: drop it and give the credit straight back, so a peer
                // still sending to a stream whose reader we dropped is not stalled forever.
                s.recv_fin |= fin;
                let stream_credit = s.ended.is_none() && !s.recv_fin && len > 0;
                if stream_credit {
                    let delta = u32::try_from(len).unwrap_or(u32::MAX);
                    shared.queue(Frame::WindowUpdate { stream_id, delta });
                }
                credit_session(&mut shared, len);
                inner.writer_wake.notify_one();
                return Ok(());
            }
            if s.recv_fin {
                shared.reset(stream_id, RstStatus::STREAM_ALREADY_CLOSED);
                credit_session(&mut shared, len);
                inner.writer_wake.notify_one();
                return Ok(());
            }
            if strict && s.recv_window < len as i64 {
                shared.reset(stream_id, RstStatus::FLOW_CONTROL_ERROR);
                credit_session(&mut shared, len);
                inner.writer_wake.notify_one();
                return Ok(());
            }
            // A peer ignoring our window waits here until the application drains the stream,
            // unless our own sending is stalled too (see `Config::stalled_read_ahead`).
            let buffered = s.recv_buffered;
            let fits = buffered == 0 || buffered + len <= capacity;
            if (fits || shared.may_read_ahead(capacity, buffered, len))
                && let Some(s) = shared.streams.get_mut(&stream_id)
            {
                s.recv_window -= len as i64;
                s.recv_buffered += len;
                if !data.is_empty() {
                    s.recv_buf.push_back(data);
                }
                s.recv_fin |= fin;
                if let Some(w) = s.read_waker.take() {
                    w.wake();
                }
                let _ = session_window;
                return Ok(());
            }
            shared.reader_waiting = Some(ReaderWait::Stream(stream_id));
        }
        wait.await;
    }
}

fn credit_session(shared: &mut Shared, len: usize) {
    shared.session_recv_unacked = shared
        .session_recv_unacked
        .saturating_add(u32::try_from(len).unwrap_or(u32::MAX));
    let threshold = shared.config.session_window / 2;
    if shared.session_recv_unacked >= threshold.max(1) {
        let delta = std::mem::take(&mut shared.session_recv_unacked);
        shared.queue(Frame::WindowUpdate {
            stream_id: 0,
            delta,
        });
    }
}

/// Opens streams, pings and shuts down a connection. Cheap to clone.
#[derive(Debug)]
pub struct ConnectionHandle {
    inner: Arc<Inner>,
}

impl Clone for ConnectionHandle {
    fn clone(&self) -> Self {
        self.inner.lock().users += 1;
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl Drop for ConnectionHandle {
    fn drop(&mut self) {
        let mut shared = self.inner.lock();
        shared.users -= 1;
        shared.maybe_close_idle();
        drop(shared);
        self.inner.writer_wake.notify_one();
    }
}

impl ConnectionHandle {
    /// Opens a stream with SYN_STREAM carrying `headers`; `fin` means we will send no data.
    pub fn open_stream(&self, headers: Headers, fin: bool) -> Result<Stream, SessionError> {
        let mut shared = self.inner.lock();
        if let Some(reason) = &shared.closed {
            return Err(SessionError::Closed(reason.clone()));
        }
        if shared.goaway_sent || shared.goaway_received.is_some() {
            return Err(SessionError::GoingAway);
        }
        if let Some(max) = shared.peer_max_streams {
            let active = shared
                .streams
                .values()
                .filter(|s| s.local && s.is_active())
                .count();
            if active >= max as usize {
                return Err(SessionError::TooManyStreams(max));
            }
        }
        let stream_id = shared.next_local_id;
        if stream_id > 0x7fff_ffff {
            return Err(SessionError::StreamIdsExhausted);
        }
        shared.next_local_id += 2;
        let mut state = StreamState::new(
            true,
            shared.peer_initial_window,
            shared.config.initial_window,
        );
        state.send_fin = fin;
        shared.streams.insert(stream_id, state);
        shared.queue(Frame::SynStream {
            stream_id,
            associated_stream_id: 0,
            priority: 0,
            slot: 0,
            fin,
            unidirectional: false,
            headers: headers.clone(),
        });
        drop(shared);
        self.inner.writer_wake.notify_one();
        Ok(Stream::new(self.inner.clone(), stream_id, headers))
    }

    /// Sends a PING and waits for its echo; returns the round-trip time.
    pub async fn ping(&self) -> Result<Duration, SessionError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut shared = self.inner.lock();
            if let Some(reason) = &shared.closed {
                return Err(SessionError::Closed(reason.clone()));
            }
            let id = shared.next_ping_id;
            shared.next_ping_id = if id >= u32::MAX - 2 {
                id % 2 + 1
            } else {
                id + 2
            };
            shared.pings.insert(id, tx);
            shared.queue(Frame::Ping { id });
        }
        self.inner.writer_wake.notify_one();
        let start = Instant::now();
        match rx.await {
            Ok(()) => Ok(start.elapsed()),
            Err(_) => Err(SessionError::Closed(self.close_reason())),
        }
    }

    /// Sends GOAWAY (status OK): no new streams in either direction; open streams continue.
    pub fn goaway(&self) {
        let mut shared = self.inner.lock();
        if shared.goaway_sent || shared.closed.is_some() {
            return;
        }
        shared.goaway_sent = true;
        let last_good_stream_id = shared.last_remote_id;
        shared.queue(Frame::GoAway {
            last_good_stream_id,
            status: GoAwayStatus::OK,
        });
        drop(shared);
        self.inner.writer_wake.notify_one();
    }

    /// Sends GOAWAY and closes the connection; open streams fail with `ConnectionClosed`.
    pub async fn close(&self) {
        self.goaway();
        self.inner.lock().close(CloseReason::Local);
        self.inner.writer_wake.notify_one();
        self.closed().await;
    }

    /// Waits until the connection has ended and its transport is shut down.
    pub async fn closed(&self) -> CloseReason {
        self.inner.done.cancelled().await;
        self.close_reason()
    }

    /// A snapshot of the session's flow-control state, for explaining a stall.
    pub fn diagnostics(&self) -> Diagnostics {
        let shared = self.inner.lock();
        let mut streams: Vec<StreamDiagnostics> = shared
            .streams
            .iter()
            .map(|(&id, s)| StreamDiagnostics {
                id,
                recv_buffered: s.recv_buffered,
                recv_window: s.recv_window,
                send_window: s.send_window,
                recv_fin: s.recv_fin,
                send_fin: s.send_fin,
                ended: s.ended.map(ended_error),
            })
            .collect();
        streams.sort_by_key(|s| s.id);
        Diagnostics {
            closed: shared.closed.clone(),
            reader_waiting: shared.reader_waiting,
            writing: shared.writing,
            outbox_frames: shared.outbox.len(),
            outbox_data: shared.outbox_data,
            session_send_window: shared.session_send_window,
            streams,
        }
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed.is_some()
    }

    fn close_reason(&self) -> CloseReason {
        self.inner
            .lock()
            .closed
            .clone()
            .unwrap_or(CloseReason::Local)
    }
}

/// The streams the peer opens, in order.
#[derive(Debug)]
pub struct IncomingStreams {
    inner: Arc<Inner>,
    rx: mpsc::UnboundedReceiver<Stream>,
}

impl IncomingStreams {
    /// The next stream the peer opened; `None` once the connection has ended.
    pub async fn accept(&mut self) -> Option<Stream> {
        tokio::select! {
            stream = self.rx.recv() => stream,
            () = self.inner.shutdown.cancelled() => self.rx.try_recv().ok(),
        }
    }
}

impl Drop for IncomingStreams {
    fn drop(&mut self) {
        let mut shared = self.inner.lock();
        shared.users -= 1;
        shared.maybe_close_idle();
        drop(shared);
        self.inner.writer_wake.notify_one();
    }
}

/// One SPDY stream: its SYN_STREAM headers and both directions of data.
///
/// Reading returns the peer's data and EOF at its FIN; writing sends data frames (blocking on
/// flow control) and shutdown sends FIN. Dropping both halves of a stream that is still open
/// resets it with CANCEL.
#[derive(Debug)]
pub struct Stream {
    id: StreamId,
    headers: Headers,
    recv: RecvStream,
    send: SendStream,
}

impl Stream {
    fn new(inner: Arc<Inner>, id: StreamId, headers: Headers) -> Self {
        Self {
            id,
            headers,
            recv: RecvStream {
                inner: inner.clone(),
                id,
            },
            send: SendStream { inner, id },
        }
    }

    /// The stream id.
    pub fn id(&self) -> StreamId {
        self.id
    }

    /// The SYN_STREAM headers (the peer's for incoming streams, ours for opened ones).
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Accepts an incoming stream with SYN_REPLY; `fin` means we send no data. Writing to an
    /// incoming stream that was not replied to sends an empty SYN_REPLY first.
    pub fn reply(&self, headers: Headers, fin: bool) -> Result<(), StreamError> {
        let mut shared = self.send.inner.lock();
        let Some(s) = shared.streams.get(&self.id) else {
            return Err(StreamError::CannotReply);
        };
        if let Some(e) = shared.stream_error(s) {
            return Err(e);
        }
        if s.replied {
            return Err(StreamError::CannotReply);
        }
        if let Some(s) = shared.streams.get_mut(&self.id) {
            s.replied = true;
            s.send_fin |= fin;
        }
        shared.queue(Frame::SynReply {
            stream_id: self.id,
            fin,
            headers,
        });
        drop(shared);
        self.send.inner.writer_wake.notify_one();
        Ok(())
    }

    /// For a stream we opened: waits for the peer's SYN_REPLY and returns its headers.
    pub async fn reply_headers(&self) -> Result<Headers, StreamError> {
        loop {
            let rx = {
                let mut shared = self.send.inner.lock();
                let Some(s) = shared.streams.get(&self.id) else {
                    return Err(StreamError::ConnectionClosed(CloseReason::Local));
                };
                if !s.local {
                    return Err(StreamError::NotOpenedByUs);
                }
                if let Some(h) = &s.reply {
                    return Ok(h.clone());
                }
                if let Some(e) = shared.stream_error(s) {
                    return Err(e);
                }
                let (tx, rx) = oneshot::channel();
                if let Some(s) = shared.streams.get_mut(&self.id) {
                    s.reply_waiters.push(tx);
                }
                rx
            };
            let _ = rx.await;
        }
    }

    /// Aborts the stream with RST_STREAM.
    pub fn reset(&self, status: RstStatus) {
        self.send.reset(status);
    }

    /// Splits into independently usable read and write halves.
    pub fn split(self) -> (RecvStream, SendStream) {
        (self.recv, self.send)
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.send).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_shutdown(cx)
    }
}

/// The receiving half of a stream. Dropping it discards further data from the peer.
#[derive(Debug)]
pub struct RecvStream {
    inner: Arc<Inner>,
    id: StreamId,
}

impl AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut guard = self.inner.lock();
        let shared = &mut *guard;
        let Some(s) = shared.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(StreamError::ConnectionClosed(CloseReason::Local).into()));
        };
        if s.recv_buf.is_empty() {
            // A FIN that arrived before a reset still completes this direction cleanly.
            if s.recv_fin {
                return Poll::Ready(Ok(()));
            }
            if let Some(ended) = s.ended {
                return Poll::Ready(Err(ended_error(ended).into()));
            }
            if let Some(reason) = &shared.closed {
                return Poll::Ready(Err(StreamError::ConnectionClosed(reason.clone()).into()));
            }
            s.read_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut copied = 0;
        while buf.remaining() > 0 {
            let Some(front) = s.recv_buf.front_mut() else {
                break;
            };
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front.split_to(n));
            copied += n;
            if front.is_empty() {
                s.recv_buf.pop_front();
            }
        }
        s.recv_buffered -= copied;
        s.recv_unacked += copied as u32;
        let threshold = (shared.config.initial_window / 2).max(1);
        let mut queued = false;
        if s.recv_unacked >= threshold && !s.recv_fin {
            let delta = std::mem::take(&mut s.recv_unacked);
            s.recv_window += i64::from(delta);
            shared.queue(Frame::WindowUpdate {
                stream_id: self.id,
                delta,
            });
            queued = true;
        }
        let before = shared.outbox.len();
        credit_session(shared, copied);
        queued |= shared.outbox.len() != before;
        drop(guard);
        if queued {
            self.inner.writer_wake.notify_one();
        }
        self.inner.reader_wake.notify_one();
        Poll::Ready(Ok(()))
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        let mut shared = self.inner.lock();
        let mut discarded = 0;
        if let Some(s) = shared.streams.get_mut(&self.id) {
            s.recv_open = false;
            discarded = std::mem::take(&mut s.recv_buffered);
            s.recv_buf.clear();
        }
        credit_session(&mut shared, discarded);
        shared.release(self.id);
        drop(shared);
        self.inner.writer_wake.notify_one();
        self.inner.reader_wake.notify_one();
    }
}

/// The sending half of a stream. Shutdown sends FIN; dropping it without shutdown also sends FIN.
#[derive(Debug)]
pub struct SendStream {
    inner: Arc<Inner>,
    id: StreamId,
}

impl SendStream {
    /// Aborts the stream with RST_STREAM.
    pub fn reset(&self, status: RstStatus) {
        let mut shared = self.inner.lock();
        let open = shared
            .streams
            .get(&self.id)
            .is_some_and(|s| s.ended.is_none());
        if open && shared.closed.is_none() {
            shared.reset(self.id, status);
        }
        drop(shared);
        self.inner.writer_wake.notify_one();
    }

    fn finish(&self, shared: &mut Shared) -> Result<(), StreamError> {
        let Some(s) = shared.streams.get(&self.id) else {
            return Ok(());
        };
        if let Some(e) = shared.stream_error(s) {
            return Err(e);
        }
        if s.send_fin {
            return Ok(());
        }
        let replied = s.replied;
        if let Some(s) = shared.streams.get_mut(&self.id) {
            s.send_fin = true;
            s.replied = true;
        }
        if replied {
            shared.queue(Frame::Data {
                stream_id: self.id,
                fin: true,
                data: Bytes::new(),
            });
        } else {
            shared.queue(Frame::SynReply {
                stream_id: self.id,
                fin: true,
                headers: Headers::new(),
            });
        }
        Ok(())
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut guard = self.inner.lock();
        let shared = &mut *guard;
        let Some(s) = shared.streams.get(&self.id) else {
            return Poll::Ready(Err(StreamError::ConnectionClosed(CloseReason::Local).into()));
        };
        if let Some(e) = shared.stream_error(s) {
            return Poll::Ready(Err(e.into()));
        }
        if s.send_fin {
            return Poll::Ready(Err(StreamError::SendClosed.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if shared.outbox_data >= OUTBOX_DATA_LIMIT {
            shared.send_waiters.push(cx.waker().clone());
            drop(guard);
            self.inner.writer_wake.notify_one();
            // Our sending is stalled: a reader waiting on a full stream buffer may read ahead.
            self.inner.reader_wake.notify_one();
            return Poll::Pending;
        }
        let mut n = buf.len().min(MAX_DATA_FRAME);
        if shared.config.send_flow_control {
            let window = s.send_window.min(shared.session_send_window);
            if window <= 0 {
                if s.send_window <= 0 {
                    if let Some(s) = shared.streams.get_mut(&self.id) {
                        s.write_waker = Some(cx.waker().clone());
                    }
                } else if !shared.send_waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    shared.send_waiters.push(cx.waker().clone());
                }
                return Poll::Pending;
            }
            n = n.min(usize::try_from(window).unwrap_or(usize::MAX));
        }
        let replied = s.replied;
        if !replied {
            shared.queue(Frame::SynReply {
                stream_id: self.id,
                fin: false,
                headers: Headers::new(),
            });
        }
        if let Some(s) = shared.streams.get_mut(&self.id) {
            s.replied = true;
            s.send_window -= n as i64;
        }
        shared.session_send_window -= n as i64;
        shared.queue(Frame::Data {
            stream_id: self.id,
            fin: false,
            data: Bytes::copy_from_slice(buf.get(..n).unwrap_or_default()),
        });
        drop(guard);
        self.inner.writer_wake.notify_one();
        Poll::Ready(Ok(n))
    }

    /// Data is handed to the connection's writer as it is written, so there is nothing to flush per stream.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = self.inner.lock();
        let result = self.finish(&mut shared);
        drop(shared);
        self.inner.writer_wake.notify_one();
        Poll::Ready(result.map_err(Into::into))
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        let mut shared = self.inner.lock();
        if shared.closed.is_none() {
            let _ = self.finish(&mut shared);
        }
        if let Some(s) = shared.streams.get_mut(&self.id) {
            s.send_open = false;
        }
        shared.release(self.id);
        drop(shared);
        self.inner.writer_wake.notify_one();
    }
}
