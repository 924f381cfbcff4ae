//! The timeouts of the streaming endpoints (exec, attach, port-forward), as the kubelet has
//! them, for both transports (SPDY/3.1 and WebSocket).
//!
//! - **Idle**: a streaming connection that carries no traffic in either direction for
//!   [`StreamingConfig::idle_timeout`] is closed (the kubelet's
//!   `--streaming-connection-idle-timeout`, 4 h by default), whatever runs over it: an exec'd
//!   process is then killed like when its client goes away, forwarded connections are closed.
//!   Every byte read or written counts as traffic, so SPDY PINGs keep a connection alive, as
//!   with the kubelet's spdystream.
//! - **Stream creation** (SPDY only; a WebSocket's channels need no opening): how long the
//!   client may take to open the streams it announced, i.e. all streams of an exec/attach
//!   session, or the second stream of a port-forward pair (30 s).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// Timeouts of the streaming endpoints; `Default` is the kubelet's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamingConfig {
    /// A streaming connection with no traffic in either direction for this long is closed
    /// (kubelet default 4 h).
    pub idle_timeout: Duration,
    /// How long a SPDY client may take to open the streams of a session (kubelet default
    /// 30 s).
    pub stream_creation_timeout: Duration,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(4 * 60 * 60),
            stream_creation_timeout: Duration::from_secs(30),
        }
    }
}

/// Labels of a streaming session: which endpoint, over which transport, with which
/// negotiated subprotocol.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    /// `exec`, `attach` or `portforward`.
    pub endpoint: &'static str,
    /// `spdy` (an HTTP upgrade to SPDY/3.1) or `websocket`.
    pub transport: &'static str,
    /// The subprotocol agreed on (`X-Stream-Protocol-Version` for SPDY,
    /// `Sec-WebSocket-Protocol` for WebSocket; empty when a WebSocket client named none).
    pub protocol: &'static str,
}

/// Counts the streaming sessions the kubelet API accepted, by endpoint, transport and
/// subprotocol (`updraft_kubelet_streaming_sessions_total`): it shows which path a client's
/// `kubectl exec`/`port-forward` took, e.g. WebSocket passed through by the API server
/// (`ExtendWebSocketsToKubelet`) or SPDY translated by it. Clones share the counters; the
/// endpoints find them in the request (see [`StreamingMetrics::count_sessions_of`]).
#[derive(Debug, Clone, Default)]
pub struct StreamingMetrics {
    sessions: Family<SessionLabels, Counter>,
}

impl StreamingMetrics {
    /// Registers the counters in `registry` (under its prefix, e.g. `updraft_`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kubelet_streaming_sessions",
            "Exec, attach and port-forward sessions accepted by the kubelet API, by endpoint, \
             transport and negotiated subprotocol",
            self.sessions.clone(),
        );
    }

    /// Sessions accepted so far with these labels.
    pub fn sessions(
        &self,
        endpoint: &'static str,
        transport: &'static str,
        protocol: &'static str,
    ) -> u64 {
        self.sessions
            .get(&SessionLabels {
                endpoint,
                transport,
                protocol,
            })
            .map_or(0, |counter| counter.get())
    }

    /// `router` with these counters in every request, where the streaming endpoints count
    /// the sessions they accept (without it they count into nothing).
    pub fn count_sessions_of(&self, router: axum::Router) -> axum::Router {
        router.layer(axum::Extension(self.clone()))
    }

    /// The counters `request` carries (see [`StreamingMetrics::count_sessions_of`]); unshared
    /// ones when it carries none.
    pub(crate) fn of<B>(request: &http::Request<B>) -> Self {
        request
            .extensions()
            .get::<Self>()
            .cloned()
            .unwrap_or_default()
    }

    /// Counts one accepted session.
    pub(crate) fn accepted(
        &self,
        endpoint: &'static str,
        transport: &'static str,
        protocol: &'static str,
    ) {
        self.sessions
            .get_or_create(&SessionLabels {
                endpoint,
                transport,
                protocol,
            })
            .inc();
    }
}

/// How long a session that was told of the idle timeout ([`IdleTimeout::with_notice`]) has
/// to say so to its client before the connection fails anyway.
const NOTICE_GRACE: Duration = Duration::from_secs(10);

/// A connection that fails its reads with [`io::ErrorKind::TimedOut`] once it has carried no
/// traffic for `idle` (and every read and write after that), which ends whatever session
/// runs over it.
///
/// With a notice ([`IdleTimeout::with_notice`]) the session is told first: the notice fires
/// at the timeout, reads then wait, and writes still go through for a grace period (10 s)
/// so that the session can tell its client why it ends (exec and attach write a status on
/// their error stream); after the grace period the connection fails as without a notice.
///
/// The deadline is checked only while a read is pending: the session's reader always waits
/// on the connection, so that is where expiry is noticed; a timer reset per byte moved would
/// cost more than the check.
pub(crate) struct IdleTimeout<T> {
    inner: T,
    idle: Duration,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
    /// Told when the timeout passes (before the connection fails).
    notice: Option<CancellationToken>,
    /// The notice has been given; the grace period runs.
    noticed: bool,
    expired: bool,
}

impl<T> IdleTimeout<T> {
    /// `inner`, closed after `idle` without traffic.
    pub(crate) fn new(inner: T, idle: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner,
            idle,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
            notice: None,
            noticed: false,
            expired: false,
        }
    }

    /// `inner`, whose session is told through the returned token when it has been idle for
    /// `idle`, and closed 10 s later.
    pub(crate) fn with_notice(inner: T, idle: Duration) -> (Self, CancellationToken) {
        let notice = CancellationToken::new();
        let mut connection = Self::new(inner, idle);
        connection.notice = Some(notice.clone());
        (connection, notice)
    }

    fn timed_out(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the streaming connection was idle for {:?} (the streaming idle timeout)",
                self.idle
            ),
        )
    }

    /// Ready with the error once the connection has been idle for too long (and the grace
    /// period after a notice is over); otherwise the timer is armed for the next deadline
    /// (waking `cx`).
    fn poll_expiry(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            if !self.noticed {
                let deadline = self.last_activity + self.idle;
                if deadline > now {
                    self.timer.as_mut().reset(deadline);
                    continue;
                }
                if let Some(notice) = &self.notice {
                    tracing::info!(
                        "a streaming connection was idle for {:?} (streaming idle timeout); \
                         ending its session",
                        self.idle
                    );
                    notice.cancel();
                    self.noticed = true;
                    self.timer.as_mut().reset(now + NOTICE_GRACE);
                    continue;
                }
            }
            self.expired = true;
            tracing::info!(
                "closing a streaming connection idle for {:?} (streaming idle timeout)",
                self.idle
            );
            return Poll::Ready(self.timed_out());
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Err(this.timed_out()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.last_activity = Instant::now();
                }
                Poll::Ready(result)
            }
            Poll::Pending => this.poll_expiry(cx).map(Err),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Err(this.timed_out()));
        }
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = result
            && n > 0
        {
            this.last_activity = Instant::now();
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Err(this.timed_out()));
        }
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result
            && n > 0
        {
            this.last_activity = Instant::now();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_traffic_fails_its_reads_after_the_idle_timeout() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut conn = IdleTimeout::new(ours, Duration::from_secs(10));
        // Traffic both ways keeps it open past the timeout.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            peer.write_all(b"x").await.unwrap();
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte).await.unwrap();
            tokio::time::sleep(Duration::from_secs(6)).await;
            conn.write_all(b"y").await.unwrap();
            peer.read_exact(&mut byte).await.unwrap();
        }
        // Then nothing: the pending read fails, and so does everything after.
        let mut buf = [0u8; 8];
        let err = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("idle"), "{err}");
        assert_eq!(
            conn.write(b"z").await.unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_noticed_connection_is_told_first_and_may_still_write() {
        let (mut peer, ours) = tokio::io::duplex(1024);
        let (conn, notice) = IdleTimeout::with_notice(ours, Duration::from_secs(10));
        let (mut read_half, mut write_half) = tokio::io::split(conn);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            read_half.read(&mut buf).await
        });
        notice.cancelled().await;
        assert!(!reader.is_finished(), "reads wait during the grace period");
        write_half.write_all(b"bye").await.unwrap();
        let mut got = [0u8; 3];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"bye");
        let err = reader.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            write_half.write(b"late").await.unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
    }

    #[tokio::test(start_paused = true)]
    async fn writes_alone_count_as_traffic() {
        let (mut peer, ours) = tokio::io::duplex(1024);
        let conn = IdleTimeout::new(ours, Duration::from_secs(10));
        let (mut read_half, mut write_half) = tokio::io::split(conn);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            read_half.read(&mut buf).await
        });
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            write_half.write_all(b"out").await.unwrap();
            let mut got = [0u8; 3];
            peer.read_exact(&mut got).await.unwrap();
            assert!(!reader.is_finished());
        }
        let err = reader.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
