//! Port-forwarding over SPDY/3.1 (`portforward.k8s.io`).
//!
//! The client opens two streams per forwarded connection: `streamType: error` (which it
//! half-closes at once and only reads) and `streamType: data`, both carrying the `port` and
//! the same `requestID`. Streams are paired by `requestID`; the second must arrive within the
//! stream-creation timeout. A complete pair is forwarded in its own task; a failure is
//! written to the error stream, then both streams are closed. When the client goes away, every
//! forward of the session is dropped, which closes its connection in the pod.

use std::collections::HashMap;

use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::task::JoinSet;
use tokio::time::Instant;
use updraft_spdy::{Config, Connection, Headers, Role, RstStatus, Stream};

use super::{Forwarder, PORT_FORWARD_PROTOCOL, header_has_token};
use crate::streaming::{IdleTimeout, StreamingConfig, StreamingMetrics};

/// The request header listing the client's subprotocols, and the response header naming ours.
const PROTOCOL_HEADER: &str = "x-stream-protocol-version";
/// The response header listing what we accept when negotiation fails.
const ACCEPTED_PROTOCOLS_HEADER: &str = "x-accepted-stream-protocol-versions";
/// Streams a client may have open at once on one session (two per forwarded connection). The
/// Go spdystream library has no limit; this one bounds memory (each stream buffers at most
/// its 64 KiB window).
const MAX_CONCURRENT_STREAMS: u32 = 2_000;

/// Answers a SPDY upgrade for port-forwarding and runs the session once upgraded.
pub(super) fn upgrade(
    mut request: Request,
    forwarder: Forwarder,
    config: StreamingConfig,
    metrics: StreamingMetrics,
) -> Response {
    let headers = request.headers();
    if !(header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "spdy/3.1"))
    {
        return (
            StatusCode::BAD_REQUEST,
            "unable to upgrade: port-forwarding needs a SPDY/3.1 or WebSocket upgrade \
             (Connection: Upgrade, Upgrade: SPDY/3.1)\n",
        )
            .into_response();
    }
    let offered: Vec<&str> = headers
        .get_all(PROTOCOL_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            format!("unable to upgrade: {PROTOCOL_HEADER} is required\n"),
        )
            .into_response();
    }
    if !offered.contains(&PORT_FORWARD_PROTOCOL) {
        let message = format!(
            "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, \
             server accepts [{PORT_FORWARD_PROTOCOL:?}]\n"
        );
        let mut response = (StatusCode::FORBIDDEN, message).into_response();
        response.headers_mut().insert(
            ACCEPTED_PROTOCOLS_HEADER,
            HeaderValue::from_static(PORT_FORWARD_PROTOCOL),
        );
        return response;
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let io = IdleTimeout::new(TokioIo::new(upgraded), config.idle_timeout);
                run_session(io, forwarder, config).await;
            }
            Err(err) => tracing::debug!("port-forward upgrade failed: {err}"),
        }
    });
    metrics.accepted("portforward", "spdy", PORT_FORWARD_PROTOCOL);
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    headers.insert(
        PROTOCOL_HEADER,
        HeaderValue::from_static(PORT_FORWARD_PROTOCOL),
    );
    response
}

/// Which half of a pair a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    Error,
}

/// A forwarded connection whose second stream has not arrived yet.
struct PendingPair {
    data: Option<Stream>,
    error: Option<Stream>,
    deadline: Instant,
}

/// Why a stream was refused.
#[derive(Debug, thiserror::Error)]
enum StreamRejection {
    /// No `port` header.
    #[error("the \"port\" header is required")]
    NoPort,
    /// A `port` that is not 1–65535.
    #[error("unable to parse {0:?} as a port (1-65535)")]
    BadPort(String),
    /// No `streamType` header.
    #[error("the \"streamType\" header is required")]
    NoStreamType,
    /// A `streamType` other than `data` and `error`.
    #[error("invalid stream type {0:?} (expected \"data\" or \"error\")")]
    BadStreamType(String),
}

/// The stream's kind, port and request id, or why it cannot be used.
fn classify(stream: &Stream) -> Result<(Kind, u16, String), StreamRejection> {
    let headers = stream.headers();
    let port_text = headers.get("port").ok_or(StreamRejection::NoPort)?;
    let port = port_text
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| StreamRejection::BadPort(port_text.to_owned()))?;
    let kind = match headers.get("streamtype") {
        None => return Err(StreamRejection::NoStreamType),
        Some("data") => Kind::Data,
        Some("error") => Kind::Error,
        Some(other) => return Err(StreamRejection::BadStreamType(other.to_owned())),
    };
    let request_id = match headers.get("requestid").filter(|id| !id.is_empty()) {
        Some(id) => id.to_owned(),
        // Clients from before request ids (Kubernetes < 1.6) open the error stream, then the
        // data stream, with consecutive odd ids: pair them by that, as the kubelet does.
        None => match kind {
            Kind::Error => stream.id().to_string(),
            Kind::Data => stream.id().saturating_sub(2).to_string(),
        },
    };
    Ok((kind, port, request_id))
}

/// Runs one port-forward session over `io` until the client goes away (or `io` fails: it
/// carries the idle timeout).
pub(super) async fn run_session<T>(io: T, forwarder: Forwarder, config: StreamingConfig)
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let spdy_config = Config {
        max_concurrent_streams: MAX_CONCURRENT_STREAMS,
        ..Config::spdystream_compatible()
    };
    let (connection, mut incoming) = match Connection::new(io, Role::Server, spdy_config) {
        Ok(session) => session,
        Err(err) => {
            tracing::warn!("starting a port-forward SPDY session: {err}");
            return;
        }
    };
    let mut pending: HashMap<String, PendingPair> = HashMap::new();
    let mut forwards = JoinSet::new();
    loop {
        let next_expiry = pending.values().map(|p| p.deadline).min();
        tokio::select! {
            stream = incoming.accept() => {
                let Some(stream) = stream else { break };
                let (kind, port, request_id) = match classify(&stream) {
                    Ok(classified) => classified,
                    Err(rejection) => {
                        tracing::info!(pod = %forwarder.pod, stream = stream.id(), "port-forward stream refused: {rejection}");
                        stream.reset(RstStatus::PROTOCOL_ERROR);
                        continue;
                    }
                };
                if let Err(err) = stream.reply(Headers::new(), false) {
                    tracing::debug!("replying to a port-forward stream: {err}");
                    continue;
                }
                let pair = pending.entry(request_id.clone()).or_insert_with(|| PendingPair {
                    data: None,
                    error: None,
                    deadline: Instant::now() + config.stream_creation_timeout,
                });
                let slot = match kind {
                    Kind::Data => &mut pair.data,
                    Kind::Error => &mut pair.error,
                };
                if slot.is_some() {
                    tracing::info!(pod = %forwarder.pod, request_id, "port-forward: a second {kind:?} stream for one request; refused");
                    stream.reset(RstStatus::PROTOCOL_ERROR);
                    continue;
                }
                *slot = Some(stream);
                if pair.data.is_some() && pair.error.is_some()
                    && let Some(PendingPair { data: Some(data), error: Some(error), .. }) = pending.remove(&request_id)
                {
                    let forwarder = forwarder.clone();
                    forwards.spawn(forward_pair(forwarder, port_of(&data, port), data, error));
                }
            }
            () = sleep_until(next_expiry), if next_expiry.is_some() => {
                let now = Instant::now();
                let expired: Vec<String> = pending
                    .iter()
                    .filter(|(_, p)| p.deadline <= now)
                    .map(|(id, _)| id.clone())
                    .collect();
                for request_id in expired {
                    if let Some(pair) = pending.remove(&request_id) {
                        let message = format!(
                            "timed out waiting for the {} stream of request {request_id}",
                            if pair.data.is_none() { "data" } else { "error" }
                        );
                        tracing::info!(pod = %forwarder.pod, "port-forward: {message}");
                        if let Some(mut error) = pair.error {
                            tokio::spawn(async move {
                                let _ = error.write_all(message.as_bytes()).await;
                                let _ = error.shutdown().await;
                            });
                        }
                    }
                }
            }
            Some(_) = forwards.join_next(), if !forwards.is_empty() => {}
        }
    }
    // The client is gone (or the connection idled out): drop every forward, closing its
    // connection in the pod.
    forwards.shutdown().await;
    connection.close().await;
}

/// The data stream's port (the one forwarded to, as the kubelet uses it); `fallback` is the
/// already-validated port of the stream that completed the pair.
fn port_of(data: &Stream, fallback: u16) -> u16 {
    data.headers()
        .get("port")
        .and_then(|p| p.parse().ok())
        .unwrap_or(fallback)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Forwards one connection; a failure goes to the error stream, then both streams close.
async fn forward_pair(forwarder: Forwarder, port: u16, data: Stream, mut error: Stream) {
    if let Err(message) = forwarder.forward(port, Box::new(data)).await {
        let _ = error.write_all(message.as_bytes()).await;
    }
    let _ = error.shutdown().await;
}

/// Test doubles shared by the port-forward sessions' tests (plain SPDY and tunnelled).
#[cfg(test)]
pub(super) mod test_support {
    #![allow(clippy::expect_used)]
    use std::time::Duration;

    use k8s_openapi::api::core::v1::PodStatus;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use updraft_provider::{
        Duplex, PodRef, PortForward, Provider, ProviderError, ProviderPod, ResolvedPod, Result,
    };
    use updraft_spdy::{Headers, Stream};

    /// Port 1 echoes; any other port refuses, as a closed port would.
    pub(crate) struct EchoProvider;

    #[async_trait::async_trait]
    impl Provider for EchoProvider {
        async fn create_pod(&self, _: &ResolvedPod) -> Result<()> {
            Ok(())
        }
        async fn update_pod(&self, _: &ResolvedPod) -> Result<()> {
            Ok(())
        }
        async fn delete_pod(&self, _: &PodRef, _: i64) -> Result<()> {
            Ok(())
        }
        async fn pod_status(&self, _: &PodRef) -> Result<Option<PodStatus>> {
            Ok(None)
        }
        async fn list_pods(&self) -> Result<Vec<ProviderPod>> {
            Ok(Vec::new())
        }
        fn port_forward(&self) -> Option<&dyn PortForward> {
            Some(self)
        }
    }

    #[async_trait::async_trait]
    impl PortForward for EchoProvider {
        async fn port_forward(&self, _: &PodRef, port: u16, stream: Box<dyn Duplex>) -> Result<()> {
            if port != 1 {
                return Err(ProviderError::transient("connection refused"));
            }
            let (mut rx, mut tx) = tokio::io::split(stream);
            let _ = tokio::io::copy(&mut rx, &mut tx).await;
            let _ = tx.shutdown().await;
            Ok(())
        }
    }

    /// The headers of one stream of a port-forward pair.
    pub(crate) fn headers(kind: &str, port: &str, request_id: &str) -> Headers {
        let mut headers = Headers::new();
        headers.insert("streamType", kind);
        headers.insert("port", port);
        if !request_id.is_empty() {
            headers.insert("requestID", request_id);
        }
        headers
    }

    pub(crate) async fn read_all(stream: &mut Stream) -> Vec<u8> {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("the stream to end")
            .expect("reading");
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::AsyncReadExt as _;
    use updraft_provider::PodRef;
    use updraft_spdy::{ConnectionHandle, StreamError};

    use super::test_support::{EchoProvider, headers, read_all};
    use super::*;

    fn session(creation_timeout: Duration) -> ConnectionHandle {
        let (client_io, server_io) = tokio::io::duplex(256 * 1024);
        let forwarder = Forwarder {
            provider: Arc::new(EchoProvider),
            pod: PodRef {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u1".into(),
            },
        };
        let config = StreamingConfig {
            stream_creation_timeout: creation_timeout,
            ..StreamingConfig::default()
        };
        tokio::spawn(run_session(server_io, forwarder, config));
        let (client, _incoming) =
            Connection::new(client_io, Role::Client, Config::spdystream_compatible()).unwrap();
        client
    }

    #[tokio::test]
    async fn interleaved_pairs_are_matched_by_request_id() {
        let client = session(Duration::from_secs(30));
        let error_a = client
            .open_stream(headers("error", "1", "a"), true)
            .unwrap();
        let error_b = client
            .open_stream(headers("error", "1", "b"), true)
            .unwrap();
        let mut data_b = client
            .open_stream(headers("data", "1", "b"), false)
            .unwrap();
        let mut data_a = client
            .open_stream(headers("data", "1", "a"), false)
            .unwrap();
        data_a.write_all(b"first").await.unwrap();
        data_a.shutdown().await.unwrap();
        data_b.write_all(b"second").await.unwrap();
        data_b.shutdown().await.unwrap();
        assert_eq!(read_all(&mut data_a).await, b"first");
        assert_eq!(read_all(&mut data_b).await, b"second");
        for mut error in [error_a, error_b] {
            assert_eq!(read_all(&mut error).await, b"", "no error");
        }
    }

    #[tokio::test]
    async fn a_refused_port_is_reported_on_the_error_stream_and_others_continue() {
        let client = session(Duration::from_secs(30));
        let mut error = client
            .open_stream(headers("error", "2", "0"), true)
            .unwrap();
        let _data = client
            .open_stream(headers("data", "2", "0"), false)
            .unwrap();
        let message = String::from_utf8(read_all(&mut error).await).unwrap();
        assert_eq!(
            message,
            "error forwarding port 2 to pod ns/p, uid u1: transient failure: connection refused"
        );
        // The session carries on.
        let _error = client
            .open_stream(headers("error", "1", "1"), true)
            .unwrap();
        let mut data = client
            .open_stream(headers("data", "1", "1"), false)
            .unwrap();
        data.write_all(b"still here").await.unwrap();
        data.shutdown().await.unwrap();
        assert_eq!(read_all(&mut data).await, b"still here");
    }

    #[tokio::test]
    async fn a_lonely_error_stream_times_out_with_a_message() {
        let client = session(Duration::from_millis(200));
        let mut error = client
            .open_stream(headers("error", "1", "7"), true)
            .unwrap();
        let message = String::from_utf8(read_all(&mut error).await).unwrap();
        assert_eq!(
            message,
            "timed out waiting for the data stream of request 7"
        );
    }

    #[tokio::test]
    async fn streams_with_bad_headers_are_reset() {
        let client = session(Duration::from_secs(30));
        for bad in [
            headers("data", "", "1"),
            headers("data", "0", "1"),
            headers("data", "http", "1"),
            headers("stdin", "1", "1"),
        ] {
            let mut stream = client.open_stream(bad, false).unwrap();
            let mut out = Vec::new();
            let err = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
                .await
                .expect("a reset")
                .unwrap_err();
            let inner = err.into_inner().unwrap().downcast::<StreamError>().unwrap();
            assert!(
                matches!(*inner, StreamError::Reset { by: "peer", .. }),
                "{inner}"
            );
        }
    }

    #[tokio::test]
    async fn clients_without_request_ids_are_paired_by_stream_id() {
        let client = session(Duration::from_secs(30));
        let _error = client.open_stream(headers("error", "1", ""), true).unwrap();
        let mut data = client.open_stream(headers("data", "1", ""), false).unwrap();
        data.write_all(b"legacy").await.unwrap();
        data.shutdown().await.unwrap();
        assert_eq!(read_all(&mut data).await, b"legacy");
    }
}
