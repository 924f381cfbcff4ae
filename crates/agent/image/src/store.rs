//! The image store: pulls by policy, a layer cache by digest, image records.
//!
//! Layout under the store's root:
//! - `blobs/sha256/<hex>`: verified blobs — image configs, and in copy mode the
//!   compressed layers (overlay mode deletes a layer's blob once it is unpacked);
//! - `layers/sha256/<hex>/`: a layer unpacked for overlayfs (overlay mode);
//! - `images/<sha256 of the reference>.json`: what a reference resolved to
//!   (manifest digest, config, layers), for `IfNotPresent` and `Never`;
//! - `containers/<id>/`: root filesystems (see [`ImageStore::create_rootfs`]);
//! - `tmp/`: downloads and unpacks in progress, renamed into place when complete,
//!   so nothing half-written is ever taken for a cached layer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use oci_client::manifest::OciDescriptor;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use updraft_common::sync::lock;

use crate::registry::{RegistrySession, Resolved};
use crate::unpack::{WhiteoutMode, unpack_layer};
use crate::{ImageError, ImageReference, Platform, PullAuth, PullPolicy};

/// How container root filesystems are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsMode {
    /// Overlayfs if a probe mount works at [`ImageStore::open`], else [`RootfsMode::Copy`].
    Auto,
    /// Overlayfs: cached layers as lower directories, an upper and work directory per container.
    Overlay,
    /// Every container gets its own extracted copy of all layers.
    Copy,
}

/// Options for [`ImageStore::open_with`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Registries spoken to over plain HTTP (`host` matches every port of that
    /// host, `host:port` only that port). All others use HTTPS. Default:
    /// `localhost`, `127.0.0.1` and `[::1]`, as dockerd treats loopback registries.
    pub insecure_registries: Vec<String>,
    /// How root filesystems are made; default [`RootfsMode::Auto`].
    pub rootfs_mode: RootfsMode,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            insecure_registries: vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()],
            rootfs_mode: RootfsMode::Auto,
        }
    }
}

/// What an image's config says about running it (the OCI image config's `config`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Entrypoint`; overridden by the container's `command`.
    pub entrypoint: Vec<String>,
    /// `Cmd`; overridden by the container's `args` (or dropped when only `command` is set).
    pub cmd: Vec<String>,
    /// `Env` as `NAME=value`; the container's `env` comes after it.
    pub env: Vec<String>,
    /// `WorkingDir`, unless empty.
    pub working_dir: Option<String>,
    /// `User` (`uid`, `uid:gid`, or names to look up in the rootfs), unless empty.
    pub user: Option<String>,
}

/// A layer of an image, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LayerRecord {
    /// Digest of the (compressed) blob.
    pub(crate) digest: String,
    /// Media type from the manifest.
    pub(crate) media_type: String,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub(crate) diff_id: String,
}

/// An image available in the store: everything needed to make root filesystems.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The reference it was asked for by.
    pub reference: ImageReference,
    /// Digest of the platform manifest (what `imageID`/`imageRef` report).
    pub digest: String,
    /// How to run it.
    pub config: ImageConfig,
    pub(crate) layers: Vec<LayerRecord>,
}

impl Image {
    /// The layer blob digests, bottom first.
    pub fn layer_digests(&self) -> impl Iterator<Item = &str> {
        self.layers.iter().map(|l| l.digest.as_str())
    }
}

/// What the store has done since it was opened (for tests and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Manifests fetched (an index and its platform manifest count as two).
    pub manifest_requests: u64,
    /// Blobs (configs and layers) downloaded.
    pub blobs_downloaded: u64,
    /// Bytes of those blobs.
    pub bytes_downloaded: u64,
    /// Layers unpacked into the overlay layer cache.
    pub layers_unpacked: u64,
}

#[derive(Serialize, Deserialize)]
struct ImageRecord {
    reference: String,
    digest: String,
    config: ImageConfig,
    layers: Vec<LayerRecord>,
}

/// The parts of the OCI image config we use.
#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ContainerConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Default)]
pub(crate) struct Counters {
    manifest_requests: AtomicU64,
    blobs_downloaded: AtomicU64,
    bytes_downloaded: AtomicU64,
    layers_unpacked: AtomicU64,
}

/// One per agent: owns a root directory with the layer cache and the containers'
/// root filesystems. Safe to share (`Arc`) between tasks; concurrent
/// [`ensure`](Self::ensure) calls for images sharing layers download and unpack
/// each layer once.
pub struct ImageStore {
    pub(crate) root: PathBuf,
    platform: Platform,
    options: StoreOptions,
    /// The mode in use (never `Auto` once open).
    pub(crate) mode: RootfsMode,
    layer_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// HTTP clients by (registry, sha256 of the credentials).
    clients: Mutex<HashMap<(String, String), oci_client::Client>>,
    counters: Counters,
    temp_counter: AtomicU64,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.root)
            .field("platform", &self.platform)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl ImageStore {
    /// Opens (creating) a store at `root` for images of `platform`, with default
    /// [`StoreOptions`].
    pub fn open(root: PathBuf, platform: Platform) -> Result<Self, ImageError> {
        Self::open_with(root, platform, StoreOptions::default())
    }

    /// Opens (creating) a store with explicit options.
    pub fn open_with(
        root: PathBuf,
        platform: Platform,
        options: StoreOptions,
    ) -> Result<Self, ImageError> {
        for dir in [
            "blobs/sha256",
            "layers/sha256",
            "images",
            "containers",
            "tmp",
            "empty",
        ] {
            let path = root.join(dir);
            std::fs::create_dir_all(&path)
                .map_err(|e| ImageError::store(&path, "creating directory", e))?;
        }
        // Leftovers of a crash mid-download or mid-unpack.
        let tmp = root.join("tmp");
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                if let Err(e) = crate::unpack::remove_any(&entry.path()) {
                    tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove leftover temporary file");
                }
            }
        }
        let mode = match options.rootfs_mode {
            RootfsMode::Auto => match crate::overlay::probe(&tmp) {
                Ok(()) => RootfsMode::Overlay,
                Err(e) => {
                    tracing::warn!(error = %e, "overlayfs unavailable; container root filesystems will be extracted copies");
                    RootfsMode::Copy
                }
            },
            other => other,
        };
        Ok(Self {
            root,
            platform,
            options,
            mode,
            layer_locks: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            temp_counter: AtomicU64::new(0),
        })
    }

    /// How this store makes root filesystems ([`RootfsMode::Overlay`] or [`RootfsMode::Copy`]).
    pub fn rootfs_mode(&self) -> RootfsMode {
        self.mode
    }

    /// The platform images are pulled for.
    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    /// Counters since the store was opened.
    pub fn stats(&self) -> StoreStats {
        StoreStats {
            manifest_requests: self.counters.manifest_requests.load(Ordering::Relaxed),
            blobs_downloaded: self.counters.blobs_downloaded.load(Ordering::Relaxed),
            bytes_downloaded: self.counters.bytes_downloaded.load(Ordering::Relaxed),
            layers_unpacked: self.counters.layers_unpacked.load(Ordering::Relaxed),
        }
    }

    /// Makes `image` available according to `policy`: `Never` only looks in the
    /// store; `IfNotPresent` pulls when the reference is not stored; `Always` asks
    /// the registry for the manifest every time and downloads only layers the cache
    /// lacks. Every blob is verified against its digest, every layer's content
    /// against the config's diff ID.
    pub async fn ensure(
        &self,
        image: &ImageReference,
        policy: PullPolicy,
        auth: &PullAuth,
    ) -> Result<Image, ImageError> {
        let stored = self.stored(image)?;
        match (policy, stored) {
            (PullPolicy::Never, Some(stored)) | (PullPolicy::IfNotPresent, Some(stored)) => {
                Ok(stored)
            }
            (PullPolicy::Never, None) => Err(ImageError::NeverPull {
                image: image.clone(),
            }),
            (PullPolicy::IfNotPresent, None) | (PullPolicy::Always, _) => {
                self.pull(image, auth).await
            }
        }
    }

    /// The image stored for `image`, if its record and all its layers are here.
    fn stored(&self, image: &ImageReference) -> Result<Option<Image>, ImageError> {
        let path = self.record_path(image);
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ImageError::store(&path, "reading image record", e)),
        };
        let record: ImageRecord = match serde_json::from_slice(&data) {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable image record");
                return Ok(None);
            }
        };
        if !record.layers.iter().all(|l| self.layer_ready(&l.digest)) {
            return Ok(None);
        }
        Ok(Some(Image {
            reference: image.clone(),
            digest: record.digest,
            config: record.config,
            layers: record.layers,
        }))
    }

    async fn pull(&self, image: &ImageReference, auth: &PullAuth) -> Result<Image, ImageError> {
        let session = RegistrySession::new(self.client_for(image, auth)?, image, auth);
        let Resolved { manifest, digest } = session.resolve(&self.platform).await?;
        self.counters
            .manifest_requests
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(%image, %digest, layers = manifest.layers.len(), "resolved image");

        let config_bytes = self.config_blob(&session, &manifest.config).await?;
        let config_file: ConfigFile =
            serde_json::from_slice(&config_bytes).map_err(|e| ImageError::Protocol {
                image: image.clone(),
                message: format!(
                    "image config {} is not valid JSON: {e}",
                    manifest.config.digest
                ),
            })?;
        let diff_ids = config_file.rootfs.map(|r| r.diff_ids).unwrap_or_default();
        if diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::Protocol {
                image: image.clone(),
                message: format!(
                    "the manifest lists {} layers but the config {} diff IDs",
                    manifest.layers.len(),
                    diff_ids.len()
                ),
            });
        }
        let layers: Vec<LayerRecord> = manifest
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(descriptor, diff_id)| LayerRecord {
                digest: descriptor.digest.clone(),
                media_type: descriptor.media_type.clone(),
                diff_id,
            })
            .collect();
        futures::future::try_join_all(
            manifest
                .layers
                .iter()
                .zip(&layers)
                .map(|(descriptor, layer)| self.ensure_layer(&session, image, descriptor, layer)),
        )
        .await?;

        let container = config_file.config.unwrap_or_default();
        let config = ImageConfig {
            entrypoint: container.entrypoint.unwrap_or_default(),
            cmd: container.cmd.unwrap_or_default(),
            env: container.env.unwrap_or_default(),
            working_dir: container.working_dir.filter(|w| !w.is_empty()),
            user: container.user.filter(|u| !u.is_empty()),
        };
        let record = ImageRecord {
            reference: image.to_string(),
            digest: digest.clone(),
            config: config.clone(),
            layers: layers.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&record)
            .map_err(|e| ImageError::store(&self.record_path(image), "encoding image record", e))?;
        self.write_atomically(&self.record_path(image), &bytes)?;
        Ok(Image {
            reference: image.clone(),
            digest,
            config,
            layers,
        })
    }

    /// The config blob, from the cache or the registry (then cached).
    async fn config_blob(
        &self,
        session: &RegistrySession,
        descriptor: &OciDescriptor,
    ) -> Result<Vec<u8>, ImageError> {
        let path = self.blob_path(&descriptor.digest)?;
        if let Ok(data) = std::fs::read(&path) {
            return Ok(data);
        }
        let data = session.fetch_json_blob(descriptor).await?;
        self.counters
            .blobs_downloaded
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_downloaded
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.write_atomically(&path, &data)?;
        Ok(data)
    }

    /// Downloads and (in overlay mode) unpacks one layer, once per digest.
    async fn ensure_layer(
        &self,
        session: &RegistrySession,
        image: &ImageReference,
        descriptor: &OciDescriptor,
        layer: &LayerRecord,
    ) -> Result<(), ImageError> {
        let lock = {
            let mut locks = lock(&self.layer_locks);
            locks.entry(layer.digest.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        if self.layer_ready(&layer.digest) {
            return Ok(());
        }
        let blob = self.blob_path(&layer.digest)?;
        if !blob.exists() {
            let partial = self.temp_path("blob");
            let result = session.fetch_blob_to_file(descriptor, &partial).await;
            if let Err(e) = result {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
            std::fs::rename(&partial, &blob)
                .map_err(|e| ImageError::store(&blob, "storing blob", e))?;
            self.counters
                .blobs_downloaded
                .fetch_add(1, Ordering::Relaxed);
            self.counters.bytes_downloaded.fetch_add(
                u64::try_from(descriptor.size).unwrap_or(0),
                Ordering::Relaxed,
            );
        }
        if self.mode == RootfsMode::Overlay {
            let unpacked = self.temp_path("layer");
            let target = self.layer_dir(&layer.digest)?;
            let (blob_for_task, dir_for_task, media_type) =
                (blob.clone(), unpacked.clone(), layer.media_type.clone());
            let result = tokio::task::spawn_blocking(move || {
                std::fs::create_dir(&dir_for_task).map_err(|e| e.to_string())?;
                unpack_layer(
                    &blob_for_task,
                    &media_type,
                    &dir_for_task,
                    WhiteoutMode::Overlay,
                )
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            let layer_error = |message: String| ImageError::Layer {
                image: image.clone(),
                digest: layer.digest.clone(),
                message,
            };
            let checked = match result {
                Ok(diff_id) if diff_id == layer.diff_id => Ok(()),
                Ok(diff_id) => Err(layer_error(format!(
                    "uncompressed content digest mismatch: expected {} (config diff ID), got {diff_id}",
                    layer.diff_id
                ))),
                Err(message) => Err(layer_error(message)),
            };
            if let Err(e) = checked {
                let _ = crate::unpack::remove_any(&unpacked);
                // The blob is sound (its digest matched) but unusable; drop it so a
                // fixed image under the same tag is not shadowed by it.
                let _ = std::fs::remove_file(&blob);
                return Err(e);
            }
            std::fs::rename(&unpacked, &target)
                .map_err(|e| ImageError::store(&target, "storing unpacked layer", e))?;
            self.counters
                .layers_unpacked
                .fetch_add(1, Ordering::Relaxed);
            // Overlay mode never reads the blob again.
            if let Err(e) = std::fs::remove_file(&blob) {
                tracing::debug!(blob = %blob.display(), error = %e, "cannot remove unpacked blob");
            }
        }
        Ok(())
    }

    /// Whether a layer is usable in this store's mode.
    fn layer_ready(&self, digest: &str) -> bool {
        match self.mode {
            RootfsMode::Overlay => self.layer_dir(digest).is_ok_and(|p| p.is_dir()),
            _ => self.blob_path(digest).is_ok_and(|p| p.is_file()),
        }
    }

    /// The HTTP client for this registry and these credentials, made once. One
    /// client per credentials: a client keeps the first credentials it saw for a
    /// registry, so a pull with other (fixed) credentials must not reuse it.
    fn client_for(
        &self,
        image: &ImageReference,
        auth: &PullAuth,
    ) -> Result<oci_client::Client, ImageError> {
        let fingerprint = match auth {
            PullAuth::Anonymous => String::new(),
            PullAuth::Basic { username, password } => {
                let mut hasher = Sha256::new();
                hasher.update(username.as_bytes());
                hasher.update([0]);
                hasher.update(password.as_bytes());
                hex::encode(hasher.finalize())
            }
        };
        let key = (image.registry.clone(), fingerprint);
        let mut clients = lock(&self.clients);
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let client =
            RegistrySession::client(self.plain_http(&image.registry)).map_err(|message| {
                ImageError::Unreachable {
                    image: image.clone(),
                    message,
                }
            })?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    fn plain_http(&self, registry: &str) -> bool {
        let host = match registry.rsplit_once(':') {
            Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
            _ => registry,
        };
        self.options
            .insecure_registries
            .iter()
            .any(|entry| entry == registry || entry == host)
    }

    fn record_path(&self, image: &ImageReference) -> PathBuf {
        let key = hex::encode(Sha256::digest(image.to_string().as_bytes()));
        self.root.join("images").join(format!("{key}.json"))
    }

    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    pub(crate) fn layer_dir(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("layers/sha256").join(digest_hex(digest)?))
    }

    pub(crate) fn temp_path(&self, what: &str) -> PathBuf {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{what}-{}-{n}", std::process::id()))
    }

    fn write_atomically(&self, path: &Path, data: &[u8]) -> Result<(), ImageError> {
        let temp = self.temp_path("write");
        std::fs::write(&temp, data).map_err(|e| ImageError::store(&temp, "writing", e))?;
        std::fs::rename(&temp, path).map_err(|e| ImageError::store(path, "storing", e))
    }
}

/// The hex part of a `sha256:` digest, checked so it is safe as a file name.
fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex) if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) => Ok(hex),
        _ => Err(ImageError::Store {
            path: PathBuf::from(digest),
            message: "not a sha256 digest".to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_named_registries() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open_with(
            dir.path().to_path_buf(),
            Platform::host(),
            StoreOptions {
                insecure_registries: vec!["127.0.0.1".into(), "reg.example:5000".into()],
                rootfs_mode: RootfsMode::Copy,
            },
        )
        .unwrap();
        assert!(store.plain_http("127.0.0.1:5000"));
        assert!(store.plain_http("127.0.0.1"));
        assert!(store.plain_http("reg.example:5000"));
        assert!(!store.plain_http("reg.example:5001"));
        assert!(!store.plain_http("docker.io"));
        assert!(!store.plain_http("127.0.0.1.evil.example"));
    }

    #[tokio::test]
    async fn never_without_the_image_is_err_image_never_pull() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path().to_path_buf(), Platform::host()).unwrap();
        let image = ImageReference::parse("127.0.0.1:1/absent:v1").unwrap();
        let err = store
            .ensure(&image, PullPolicy::Never, &PullAuth::Anonymous)
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "ErrImageNeverPull");
        assert!(err.to_string().contains("127.0.0.1:1/absent:v1"), "{err}");
    }
}
