//! OCI images for the cell agent.
//!
//! This first piece holds image reference parsing with Docker Hub
//! normalization (`busybox` → `docker.io/library/busybox:latest`), the way the
//! kubelet and the container runtimes resolve names; registry credentials from
//! `imagePullSecrets`; and the pull errors with the kubelet's reasons. Pulling, the layer cache
//! and root filesystems are not written yet.
#![forbid(unsafe_code)]

mod auth;
mod digest;
mod error;
mod layer_path;
mod reference;

pub use auth::{Keyring, PullAuth, SecretError};
pub use digest::{DigestError, DigestVerifier};
pub use error::{ImageError, PullPolicy};
pub use layer_path::{LayerEntry, LayerPathError, classify_entry};

pub use reference::{ImageReference, ReferenceError};
