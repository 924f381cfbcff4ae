//! The API of the Updraft cell agent (`updraft-cell`), shared by the agent and the cells
//! provider: request/response types, the framing of exec/attach streams, and a client.
//!
//! # Transport
//! HTTPS with mutual TLS on one port. The provider's CA issues the agent's server
//! certificate (with the DNS name [`SERVER_NAME`], not tied to an IP address) and the
//! provider's client certificate; the agent refuses connections without a client certificate
//! signed by that CA, and the client verifies the agent against the CA and [`SERVER_NAME`].
//!
//! # Routes (all under [`API_PREFIX`] = `/v1`)
//! | method and path | body / query | answer |
//! | --- | --- | --- |
//! | `GET /v1/ping` | | `200 {}` |
//! | `GET /v1/version` | | [`VersionInfo`] |
//! | `PUT /v1/pod` | [`ApplyPodRequest`] | [`ApplyPodResponse`]; idempotent |
//! | `DELETE /v1/pod` | `?gracePeriodSeconds=N` | `200 {}` once every container is gone |
//! | `GET /v1/pod/status` | `?after=V&waitSeconds=S` (long-poll) | [`PodStatusResponse`] |
//! | `GET /v1/logs/{container}` | `follow, tailLines, sinceSeconds, sinceTime, timestamps, previous, limitBytes` | `text/plain`, streamed |
//! | `POST /v1/exec/{container}` | `command` (repeated), `stdin, stdout, stderr, tty`; `Upgrade: updraft-cell-stream.v1` | `101`, then [`frame`]s |
//! | `POST /v1/attach/{container}` | `stdin, stdout, stderr`; `Upgrade: updraft-cell-stream.v1` | `101`, then [`frame`]s |
//! | `POST /v1/portforward` | `port`; `Upgrade: updraft-cell-portforward.v1` | `101`, then raw bytes to the pod's port |
//! | `GET /v1/stats` | | [`StatsResponse`] |
//! | `PUT /v1/volumes/{name}` | [`VolumeContent`] | `200 {}`; atomic `..data` swap |
//! | `PUT /v1/services` | [`services::ServiceRoutes`] | [`services::ServiceRoutesStatus`]; a lower version than the agent's is ignored |
//! | `GET /v1/services` | | [`services::ServiceRoutesStatus`] |
//!
//! The agent keeps the newest Service routes table it was sent (in memory only) and installs
//! it in the pod's network namespace, now and whenever a pod sandbox is created, before the
//! containers start. `PUT /v1/services` answers `200` once the table is kept, also when its
//! rules could not be installed: `appliedVersion` is then still the version in force and
//! `problems` says why (e.g. no `nft` on the cell). The version in force is also
//! [`PodStatusResponse::services_version`], and its changes wake the status long-poll.
//!
//! Errors are JSON [`ErrorBody`] with `400` (bad input, the message names the field), `404`
//! (no pod, container or volume of that name), `409` (e.g. exec into a container that is not
//! running), `503` (the agent is shutting down), `500` (the host failed).
#![forbid(unsafe_code)]

pub mod client;
pub mod frame;
pub mod types;

/// The Service routes the provider pushes (`PUT /v1/services`).
pub use updraft_common::services;

pub use client::{CellClient, ClientError, ClientTls, StreamOutput, StreamSession};
pub use frame::{Frame, FrameCodec, FrameError};
pub use types::*;

/// Path prefix of this API version.
pub const API_PREFIX: &str = "/v1";
/// The port the agent listens on unless told otherwise (`updraft-cell --listen`), and so the
/// one the backends open to and connect to by default (Kip's itzo used the same).
pub const DEFAULT_AGENT_PORT: u16 = 6421;
/// The DNS name in the agent's server certificate, verified by the client whatever the
/// address it connects to.
pub const SERVER_NAME: &str = "updraft-cell";
