//! Container root filesystems.
//!
//! Overlay mode: `containers/<id>/{upper,work,merged}`, `merged` an overlayfs with
//! the image's cached layer directories as lower layers (top layer leftmost), so
//! containers of one image share the layers and each writes only to its upper.
//! Copy mode: `containers/<id>/rootfs`, all layers extracted in order, whiteouts
//! applied by deletion; a `complete` marker says the extraction finished.
//!
//! Both are idempotent: calling [`ImageStore::create_rootfs`] again for a
//! container (an agent restarted) returns the existing root filesystem with the
//! container's writes, remounting the overlay if it is no longer mounted.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use crate::ImageError;
use crate::overlay;
use crate::store::{Image, ImageStore, RootfsMode};
use crate::unpack::{WhiteoutMode, remove_any, unpack_layer};

/// A container's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rootfs {
    /// The directory to `pivot_root` into.
    pub path: PathBuf,
    /// The container it belongs to.
    pub container_id: String,
    /// Whether it is an overlay mount or an extracted copy.
    pub mode: RootfsMode,
}

impl ImageStore {
    /// A root filesystem for `container_id` from `image` (which [`ImageStore::ensure`]
    /// returned): an overlayfs mount, or an extracted copy when overlay is unavailable.
    pub fn create_rootfs(&self, image: &Image, container_id: &str) -> Result<Rootfs, ImageError> {
        let error = |message: String| ImageError::Rootfs {
            container_id: container_id.to_owned(),
            message,
        };
        validate_container_id(container_id).map_err(error)?;
        let dir = self.root.join("containers").join(container_id);
        match self.mode {
            RootfsMode::Overlay => {
                let (upper, work, merged) =
                    (dir.join("upper"), dir.join("work"), dir.join("merged"));
                for d in [&upper, &work, &merged] {
                    std::fs::create_dir_all(d)
                        .map_err(|e| error(format!("{}: {e}", d.display())))?;
                }
                if is_mountpoint(&merged, &dir) {
                    return Ok(Rootfs {
                        path: merged,
                        container_id: container_id.to_owned(),
                        mode: RootfsMode::Overlay,
                    });
                }
                let mut lower = Vec::new();
                for layer in image.layers.iter().rev() {
                    let path = self.layer_dir(&layer.digest)?;
                    if !path.is_dir() {
                        return Err(error(format!(
                            "layer {} of {} is not in the cache (ensure the image first)",
                            layer.digest, image.reference
                        )));
                    }
                    lower.push(path.display().to_string());
                }
                if lower.is_empty() {
                    lower.push(self.root.join("empty").display().to_string());
                }
                let options = overlay::options(&lower, &upper, &work);
                if options.len() > overlay::MAX_OPTIONS {
                    return Err(error(format!(
                        "{} layers make overlay options of {} bytes, more than the kernel's page; \
                         open the store in RootfsMode::Copy or use a shorter store path",
                        image.layers.len(),
                        options.len()
                    )));
                }
                overlay::mount(&options, &merged)
                    .map_err(|e| error(format!("mounting overlay on {}: {e}", merged.display())))?;
                Ok(Rootfs {
                    path: merged,
                    container_id: container_id.to_owned(),
                    mode: RootfsMode::Overlay,
                })
            }
            RootfsMode::Copy | RootfsMode::Auto => {
                let rootfs = dir.join("rootfs");
                let marker = dir.join("complete");
                if marker.exists() {
                    return Ok(Rootfs {
                        path: rootfs,
                        container_id: container_id.to_owned(),
                        mode: RootfsMode::Copy,
                    });
                }
                remove_any(&rootfs).map_err(|e| error(format!("{}: {e}", rootfs.display())))?;
                std::fs::create_dir_all(&rootfs)
                    .map_err(|e| error(format!("{}: {e}", rootfs.display())))?;
                for layer in &image.layers {
                    let blob = self.blob_path(&layer.digest)?;
                    let diff_id =
                        unpack_layer(&blob, &layer.media_type, &rootfs, WhiteoutMode::Delete)
                            .map_err(|message| ImageError::Layer {
                                image: image.reference.clone(),
                                digest: layer.digest.clone(),
                                message,
                            })?;
                    if diff_id != layer.diff_id {
                        return Err(ImageError::Layer {
                            image: image.reference.clone(),
                            digest: layer.digest.clone(),
                            message: format!(
                                "uncompressed content digest mismatch: expected {} (config diff ID), got {diff_id}",
                                layer.diff_id
                            ),
                        });
                    }
                }
                std::fs::write(&marker, image.digest.as_bytes())
                    .map_err(|e| error(format!("{}: {e}", marker.display())))?;
                Ok(Rootfs {
                    path: rootfs,
                    container_id: container_id.to_owned(),
                    mode: RootfsMode::Copy,
                })
            }
        }
    }

    /// Unmounts (lazily) and deletes a container's root filesystem, with its writes.
    /// Absent is fine. Stop the container's processes first.
    pub fn remove_rootfs(&self, container_id: &str) -> Result<(), ImageError> {
        let error = |message: String| ImageError::Rootfs {
            container_id: container_id.to_owned(),
            message,
        };
        validate_container_id(container_id).map_err(error)?;
        let dir = self.root.join("containers").join(container_id);
        let merged = dir.join("merged");
        if is_mountpoint(&merged, &dir) {
            overlay::unmount(&merged)
                .map_err(|e| error(format!("unmounting {}: {e}", merged.display())))?;
        }
        remove_any(&dir).map_err(|e| error(format!("removing {}: {e}", dir.display())))
    }
}

/// Container ids become directory names: keep them plain.
fn validate_container_id(id: &str) -> Result<(), String> {
    let valid = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid container id {id:?}: use 1-128 letters, digits, '-', '_' or '.', not starting with '.'"
        ))
    }
}

/// A mount point has another device than its parent.
fn is_mountpoint(path: &Path, parent: &Path) -> bool {
    match (std::fs::metadata(path), std::fs::metadata(parent)) {
        (Ok(inner), Ok(outer)) => inner.dev() != outer.dev(),
        _ => false,
    }
}
