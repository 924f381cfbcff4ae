//! Where container root filesystems come from. The agent needs only [`ImageSource`]; the OCI
//! image store of `updraft-cell-image` implements it once it lands, and [`DirectoryImages`]
//! serves prepared directories (tests, air-gapped cells).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use updraft_cell_api::PullSecret;

/// An image made ready for one container.
#[derive(Debug, Clone, Default)]
pub struct PreparedImage {
    /// The container's own root filesystem directory.
    pub rootfs: PathBuf,
    /// Image entrypoint.
    pub entrypoint: Vec<String>,
    /// Image cmd.
    pub cmd: Vec<String>,
    /// Image environment (`NAME=value` split).
    pub env: Vec<(String, String)>,
    /// Image working directory.
    pub working_dir: Option<String>,
    /// `imageID` to report (a digest).
    pub image_id: String,
}

/// Why an image could not be prepared; `reason` is the kubelet's (`ErrImagePull`, ...).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct ImageFailure {
    /// Kubelet reason for the Waiting state.
    pub reason: String,
    /// Message naming the image and the cause.
    pub message: String,
}

/// Provides root filesystems for containers.
#[async_trait::async_trait]
pub trait ImageSource: Send + Sync + 'static {
    /// Pulls `image` if needed (per `pull_policy`: `Always`, `IfNotPresent`, `Never`) and
    /// creates the root filesystem of `container_id`.
    async fn prepare(
        &self,
        image: &str,
        pull_policy: &str,
        pull_secrets: &[PullSecret],
        container_id: &str,
    ) -> Result<PreparedImage, ImageFailure>;

    /// The root filesystem of an existing container (after an agent restart), if still there.
    fn existing(&self, container_id: &str) -> Option<PathBuf>;

    /// Removes the root filesystem of `container_id`.
    fn remove(&self, container_id: &str);
}

/// Images that are directories prepared on the cell: `name → template directory`; each
/// container gets a copy (`cp -a`) under `work`.
#[derive(Debug, Clone)]
pub struct DirectoryImages {
    images: BTreeMap<String, (PathBuf, PreparedImage)>,
    work: PathBuf,
}

impl DirectoryImages {
    /// Copies go under `work`.
    pub fn new(work: PathBuf) -> Self {
        Self {
            images: BTreeMap::new(),
            work,
        }
    }

    /// Serves `template` (with `config`'s entrypoint/cmd/env/workdir) as image `name`.
    pub fn with_image(mut self, name: &str, template: &Path, config: PreparedImage) -> Self {
        self.images
            .insert(name.to_owned(), (template.to_path_buf(), config));
        self
    }
}

#[async_trait::async_trait]
impl ImageSource for DirectoryImages {
    async fn prepare(
        &self,
        image: &str,
        _pull_policy: &str,
        _pull_secrets: &[PullSecret],
        container_id: &str,
    ) -> Result<PreparedImage, ImageFailure> {
        let Some((template, config)) = self.images.get(image) else {
            return Err(ImageFailure {
                reason: "ErrImagePull".into(),
                message: format!("image {image:?} is not among this cell's directory images"),
            });
        };
        let target = self.work.join(container_id);
        let fail = |m: String| ImageFailure {
            reason: "CreateContainerError".into(),
            message: format!("preparing the root filesystem of {image}: {m}"),
        };
        if !target.exists() {
            std::fs::create_dir_all(&self.work).map_err(|e| fail(e.to_string()))?;
            let out = tokio::process::Command::new("cp")
                .arg("-a")
                .arg(template)
                .arg(&target)
                .output()
                .await
                .map_err(|e| fail(e.to_string()))?;
            if !out.status.success() {
                return Err(fail(String::from_utf8_lossy(&out.stderr).into_owned()));
            }
        }
        Ok(PreparedImage {
            rootfs: target,
            ..config.clone()
        })
    }

    fn existing(&self, container_id: &str) -> Option<PathBuf> {
        Some(self.work.join(container_id)).filter(|p| p.exists())
    }

    fn remove(&self, container_id: &str) {
        let _ = std::fs::remove_dir_all(self.work.join(container_id));
    }
}

/// OCI images pulled from registries by `updraft-cell-image`'s store (layer cache by digest,
/// overlay or copied root filesystems).
pub struct OciImages {
    store: updraft_cell_image::ImageStore,
}

impl OciImages {
    /// Wraps an opened store.
    pub fn new(store: updraft_cell_image::ImageStore) -> Self {
        Self { store }
    }
}

/// Splits `NAME=value` entries of an image config.
fn split_env(env: &[String]) -> Vec<(String, String)> {
    env.iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (e.clone(), String::new()),
        })
        .collect()
}

#[async_trait::async_trait]
impl ImageSource for OciImages {
    async fn prepare(
        &self,
        image: &str,
        pull_policy: &str,
        pull_secrets: &[PullSecret],
        container_id: &str,
    ) -> Result<PreparedImage, ImageFailure> {
        use updraft_cell_image::{ImageReference, Keyring, PullPolicy};
        let reference = ImageReference::parse(image).map_err(|e| ImageFailure {
            reason: "InvalidImageName".into(),
            message: format!("image {image:?}: {e}"),
        })?;
        let policy = PullPolicy::from_kubernetes(pull_policy).unwrap_or(PullPolicy::IfNotPresent);
        let mut keyring = Keyring::default();
        for s in pull_secrets {
            if let Err(e) = keyring.add_docker_config_json(&s.docker_config_json) {
                tracing::warn!(secret = %s.name, error = %e, "unusable image pull secret");
            }
        }
        let auth = keyring.lookup(&reference);
        let failure = |e: updraft_cell_image::ImageError| ImageFailure {
            reason: e.reason().into(),
            message: e.to_string(),
        };
        let pulled = self
            .store
            .ensure(&reference, policy, &auth)
            .await
            .map_err(failure)?;
        let rootfs = self
            .store
            .create_rootfs(&pulled, container_id)
            .map_err(failure)?;
        Ok(PreparedImage {
            rootfs: rootfs.path,
            entrypoint: pulled.config.entrypoint.clone(),
            cmd: pulled.config.cmd.clone(),
            env: split_env(&pulled.config.env),
            working_dir: pulled.config.working_dir.clone().filter(|w| !w.is_empty()),
            image_id: pulled.digest.clone(),
        })
    }

    fn existing(&self, _container_id: &str) -> Option<PathBuf> {
        None
    }

    fn remove(&self, container_id: &str) {
        if let Err(e) = self.store.remove_rootfs(container_id) {
            tracing::warn!(container = %container_id, error = %e, "removing a root filesystem failed");
        }
    }
}
