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

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

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

/// A connection that fails its reads with [`io::ErrorKind::TimedOut`] once it has carried no
/// traffic for `idle` (and every read and write after that), which ends whatever session
/// runs over it.
///
/// The deadline is checked only while a read is pending: the session's reader always waits
/// on the connection, so that is where expiry is noticed; a timer reset per byte moved would
/// cost more than the check.
pub(crate) struct IdleTimeout<T> {
    inner: T,
    idle: Duration,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
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
            expired: false,
        }
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

    /// Ready with the error once the connection has been idle for too long; otherwise the
    /// timer is armed for the current deadline (waking `cx`).
    fn poll_expiry(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = self.last_activity + self.idle;
            if deadline <= Instant::now() {
                self.expired = true;
                tracing::info!(
                    "closing a streaming connection idle for {:?} (streaming idle timeout)",
                    self.idle
                );
                return Poll::Ready(self.timed_out());
            }
            self.timer.as_mut().reset(deadline);
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
