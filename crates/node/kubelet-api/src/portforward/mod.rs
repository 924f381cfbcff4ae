//! `/portForward/{namespace}/{pod}`: `kubectl port-forward` into a pod.
//!
//! Two transports, chosen by the request's upgrade header, as the kubelet does:
//! - **SPDY/3.1** with the `portforward.k8s.io` protocol ([`spdy`]): one connection carries
//!   any number of forwarded connections, each a pair of streams (`streamType: data` and
//!   `error`, matched by the `requestID` header). This is what kubectl exercises: API servers
//!   1.31+ tunnel kubectl's WebSocket port-forward to the kubelet as SPDY.
//! - **SPDY/3.1 tunnelled through a WebSocket** (subprotocol `SPDY/3.1+portforward.k8s.io`,
//!   [`tunnel`]): the same SPDY session inside a WebSocket's binary messages. kubectl 1.31+
//!   asks for this; API servers 1.36+ pass it through to nodes that declare
//!   `ExtendWebSocketsToKubelet`, and unwrap it into plain SPDY for the others.
//! - **WebSocket** (`v4.channel.k8s.io`, `v4.base64.channel.k8s.io` or no subprotocol) with
//!   the ports in `port` query parameters ([`websocket`]): one forwarded connection per port,
//!   on channels `2i` (data) and `2i+1` (error).
//!
//! Either way the provider's [`PortForward`](updraft_provider::PortForward) connects each
//! forwarded connection to the port in the pod; a failure (nothing listens there) is written
//! to that connection's error stream, which kubectl prints.

mod spdy;
pub mod tunnel;
pub mod websocket;

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use updraft_provider::{Duplex, PodRef, Provider, ProviderError};

use crate::state::{Endpoints, bound_pod, provider_error};
use crate::streaming::{IdleTimeout, StreamingConfig, StreamingMetrics};

/// The SPDY subprotocol of port-forwarding.
pub const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";

/// `/portForward/{namespace}/{pod}` (any method; kubectl uses POST): the pod must be bound to
/// this node.
pub(crate) async fn handler(
    State(endpoints): State<Endpoints>,
    Path((namespace, name)): Path<(String, String)>,
    request: Request,
) -> Response {
    if endpoints.state.provider.port_forward().is_none() {
        return unsupported();
    }
    match bound_pod(&endpoints, &namespace, &name).await {
        Ok(pod) => {
            port_forward(
                request,
                endpoints.state.provider.clone(),
                pod,
                endpoints.options.streaming,
            )
            .await
        }
        Err(response) => response,
    }
}

fn unsupported() -> Response {
    provider_error(&ProviderError::Unsupported(
        "port-forward (kubectl port-forward)",
    ))
}

/// Serves a port-forward request for `pod` (already checked to be bound to this node):
/// answers the upgrade and runs the session in the background, with `config`'s idle and
/// stream-creation timeouts; the accepted session is counted in the request's
/// [`StreamingMetrics`].
pub async fn port_forward(
    request: Request,
    provider: Arc<dyn Provider>,
    pod: PodRef,
    config: StreamingConfig,
) -> Response {
    if provider.port_forward().is_none() {
        return unsupported();
    }
    let metrics = StreamingMetrics::of(&request);
    let forwarder = Forwarder { provider, pod };
    if is_websocket_upgrade(request.headers()) {
        if tunnel::requested(request.headers()) {
            tunnel::upgrade(request, forwarder, config, metrics)
        } else {
            websocket::upgrade(request, forwarder, config, metrics)
        }
    } else {
        spdy::upgrade(request, forwarder, config, metrics)
    }
}

/// Connects forwarded connections to one pod's ports through the provider.
#[derive(Clone)]
struct Forwarder {
    provider: Arc<dyn Provider>,
    pod: PodRef,
}

impl Forwarder {
    /// Forwards `stream` to `port` until it ends; `Err` is the message for the client's error
    /// stream (worded as the kubelet words it).
    async fn forward(&self, port: u16, stream: Box<dyn Duplex>) -> Result<(), String> {
        let result = match self.provider.port_forward() {
            Some(forwarder) => forwarder.port_forward(&self.pod, port, stream).await,
            None => Err(ProviderError::Unsupported("port-forward")),
        };
        result.map_err(|err| {
            tracing::info!(pod = %self.pod, port, "port-forward failed: {err}");
            format!(
                "error forwarding port {port} to pod {}, uid {}: {err}",
                self.pod, self.pod.uid
            )
        })
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The server-side WebSocket of a port-forward session, with the idle timeout applied.
type ServerWebSocket = WebSocketStream<IdleTimeout<TokioIo<hyper::upgrade::Upgraded>>>;

/// Answers a WebSocket upgrade request with `protocol` (none if empty) after checking its
/// version and key, and once upgraded runs `session` on the socket, whose messages and frames
/// are limited to `max_message` bytes. Returns the 101, or a 400 naming what is wrong.
fn accept_websocket<F, Fut>(
    mut request: Request,
    protocol: &str,
    max_message: usize,
    idle_timeout: Duration,
    session: F,
) -> Response
where
    F: FnOnce(ServerWebSocket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let headers = request.headers();
    if !header_has_token(headers, header::SEC_WEBSOCKET_VERSION, "13") {
        let mut response = (
            StatusCode::BAD_REQUEST,
            "unsupported WebSocket version: only 13 is\n",
        )
            .into_response();
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return (
            StatusCode::BAD_REQUEST,
            "the Sec-WebSocket-Key header is required\n",
        )
            .into_response();
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let io = IdleTimeout::new(TokioIo::new(upgraded), idle_timeout);
                let limits = WebSocketConfig::default()
                    .max_message_size(Some(max_message))
                    .max_frame_size(Some(max_message));
                session(WebSocketStream::from_raw_socket(io, Role::Server, Some(limits)).await)
                    .await;
            }
            Err(err) => tracing::debug!("port-forward WebSocket upgrade failed: {err}"),
        }
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let response_headers = response.headers_mut();
    response_headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    response_headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        response_headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if let Ok(protocol) = HeaderValue::from_str(protocol)
        && !protocol.is_empty()
    {
        response_headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket")
}
