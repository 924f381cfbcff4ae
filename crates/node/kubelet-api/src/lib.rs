//! The kubelet HTTPS API of an Updraft node.
//!
//! The API server (for `kubectl logs/exec/attach/port-forward/top`), metrics-server and
//! Prometheus reach a node through its kubelet port. This crate serves that port the way the
//! kubelet does:
//! - [`tls`]: TLS 1.2+ with rustls, the serving certificate swappable at run time (renewal),
//!   client certificates optional and verified against a CA;
//! - [`auth`]: who is calling (client certificate, bearer token through TokenReview, or
//!   anonymous only if allowed) and whether they may (SubjectAccessReview on `nodes/<sub>`),
//!   both cached;
//! - [`server`]: the accept loop that ties TLS, authentication and authorization to an axum
//!   router, with HTTP upgrades for the streaming protocols;
//! - [`routes`]: the router and the endpoints (pods, logs, exec, attach), with what every
//!   endpoint sees ([`routes::KubeletState`], [`routes::KubeletOptions`]);
//! - [`remotecommand`]: `kubectl exec/attach/cp` over SPDY/3.1 and WebSocket;
//! - [`ws_channels`]: the WebSocket channel framing (`channel.k8s.io` family), shared by the
//!   streaming endpoints;
//! - [`portforward`]: `kubectl port-forward` over SPDY/3.1 and WebSocket;
//! - [`stats`]: `/stats/summary` and `/metrics/resource` (`kubectl top`);
//! - [`streaming`]: the idle and stream-creation timeouts of the streaming endpoints.
#![forbid(unsafe_code)]

pub mod auth;
pub mod csr;
pub mod portforward;
pub mod remotecommand;
pub mod routes;
pub mod server;
mod state;
pub mod stats;
pub mod streaming;
pub mod tls;
mod ttl_cache;
pub mod ws_channels;
