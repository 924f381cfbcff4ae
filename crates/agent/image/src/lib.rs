//! OCI images for the cell agent: pull from registries, cache layers by digest,
//! make container root filesystems.
//!
//! - [`ImageReference`]: references with Docker Hub normalization
//!   (`busybox` → `docker.io/library/busybox:latest`), as the kubelet resolves them.
//! - [`Keyring`]/[`PullAuth`]: registry credentials from `imagePullSecrets`.
//! - [`ImageStore`]: one per agent, owning a root directory.
//!   [`ImageStore::ensure`] applies the `imagePullPolicy`, resolves the manifest
//!   through the OCI distribution API (`oci-client`; anonymous, basic and bearer
//!   token auth; plain HTTP only for [`StoreOptions::insecure_registries`]), picks the
//!   store's [`Platform`] from image indexes, verifies every blob against its
//!   digest and every layer against its diff ID, and unpacks each layer once per
//!   digest (concurrent calls share the work). [`ImageStore::create_rootfs`] makes a
//!   container's root filesystem: overlayfs over the cached layers, or an
//!   extracted copy where overlayfs is unavailable ([`RootfsMode`]).
//! - [`ImageError`]: failures with the kubelet's reasons ([`ImageError::reason`]:
//!   `ErrImagePull`, `ErrImageNeverPull`, `InvalidImageName`, …) and messages that
//!   name the image and the registry's answer, never credentials.
//!   `ImagePullBackOff` (retrying with backoff after `ErrImagePull`) is the agent's.
//!
//! Differences from the first sketch of this API: `Image` has a private layer list
//! (read it with [`Image::layer_digests`]), [`Rootfs`] says which [`RootfsMode`] made
//! it, and [`ImageStore::open_with`] takes [`StoreOptions`].
//!
//! Process note: `oci-client` uses rustls without a built-in crypto provider; the
//! store installs the ring provider as the process default if none is installed.
//!
//! With the `test-support` feature, [`test_support`] starts a real Debian
//! `docker-registry` on loopback and pushes generated test images into it.
#![forbid(unsafe_code)]
// Errors carry the image reference so every message names it; they happen once per
// pull, so their size does not matter.
#![allow(clippy::result_large_err)]

mod auth;
mod digest;
mod error;
mod layer_path;
mod overlay;
mod platform;
mod reference;
mod registry;
mod rootfs;
mod store;
#[cfg(feature = "test-support")]
pub mod test_support;
mod unpack;

pub use auth::{Keyring, PullAuth, SecretError};
pub use digest::{DigestError, DigestVerifier};
pub use error::{ImageError, PullPolicy};
pub use layer_path::{LayerEntry, LayerPathError, classify_entry};
pub use platform::Platform;
pub use reference::{ImageReference, ReferenceError};
pub use rootfs::Rootfs;
pub use store::{Image, ImageConfig, ImageStore, RootfsMode, StoreOptions, StoreStats};
