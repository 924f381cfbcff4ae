//! Pod volumes: emptyDir (disk or tmpfs), file volumes written like the kubelet's atomic writer
//! (`..<timestamp>/` data dir, `..data` symlink swapped with a rename, top-level entries as
//! symlinks through `..data`), and hostPath.

use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use updraft_cell_api::VolumeContent;

/// Errors of volume handling.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A file path in the content escapes the volume or is empty.
    #[error("volume {volume}: file path {path:?} must be relative without '..'")]
    BadPath {
        /// Volume name.
        volume: String,
        /// The offending path.
        path: String,
    },
    /// The host refused a file operation.
    #[error("volume {volume}: {action} {path}: {source}")]
    Io {
        /// Volume name.
        volume: String,
        /// What was done.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Mounting a tmpfs failed.
    #[error("volume {volume}: mounting tmpfs at {path}: {errno}")]
    Mount {
        /// Volume name.
        volume: String,
        /// Mount point.
        path: PathBuf,
        /// errno.
        errno: nix::errno::Errno,
    },
}

fn io_err(
    volume: &str,
    action: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> VolumeError {
    let (volume, path) = (volume.to_owned(), path.to_path_buf());
    move |source| VolumeError::Io {
        volume,
        action,
        path,
        source,
    }
}

/// Creates an emptyDir at `dir`; `memory` mounts a tmpfs (size-limited when `size_limit`).
pub fn empty_dir(
    volume: &str,
    dir: &Path,
    memory: bool,
    size_limit: Option<u64>,
) -> Result<(), VolumeError> {
    std::fs::create_dir_all(dir).map_err(io_err(volume, "create", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))
        .map_err(io_err(volume, "chmod", dir))?;
    if memory && !is_mount_point(dir) {
        let data = size_limit.map(|s| format!("size={s}"));
        nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            data.as_deref(),
        )
        .map_err(|errno| VolumeError::Mount {
            volume: volume.to_owned(),
            path: dir.to_path_buf(),
            errno,
        })?;
    }
    Ok(())
}

/// Whether `dir` is a mount point (its device differs from its parent's).
pub fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) {
        (Ok(a), Some(Ok(b))) => a.dev() != b.dev(),
        _ => false,
    }
}

/// Unmounts a tmpfs emptyDir (ignoring "not mounted").
pub fn unmount(dir: &Path) {
    if is_mount_point(dir) {
        let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn check_path(volume: &str, path: &str) -> Result<PathBuf, VolumeError> {
    let p = Path::new(path);
    let ok = !path.is_empty()
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && !path.starts_with("..");
    if ok {
        Ok(p.to_path_buf())
    } else {
        Err(VolumeError::BadPath {
            volume: volume.to_owned(),
            path: path.to_owned(),
        })
    }
}

/// Writes `content` into `dir` atomically: readers see the old or the new set of files, never
/// a mix. Safe to call again with the same or new content.
pub fn write_atomic(volume: &str, dir: &Path, content: &VolumeContent) -> Result<(), VolumeError> {
    let paths = content
        .files
        .iter()
        .map(|f| check_path(volume, &f.path))
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(dir).map_err(io_err(volume, "create", dir))?;
    let stamp = format!("..{}", crate::now().as_nanosecond());
    let data_dir = dir.join(&stamp);
    std::fs::create_dir(&data_dir).map_err(io_err(volume, "create", &data_dir))?;
    for (file, rel) in content.files.iter().zip(&paths) {
        let path = data_dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(volume, "create", parent))?;
        }
        std::fs::write(&path, &file.content).map_err(io_err(volume, "write", &path))?;
        std::fs::set_permissions(
            &path,
            std::fs::Permissions::from_mode(file.mode.unwrap_or(0o644)),
        )
        .map_err(io_err(volume, "chmod", &path))?;
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp).map_err(io_err(volume, "symlink", &tmp))?;
    std::fs::rename(&tmp, dir.join("..data")).map_err(io_err(volume, "rename", &tmp))?;
    // Top-level entries point through ..data; stale ones go.
    let tops: std::collections::BTreeSet<String> = paths
        .iter()
        .filter_map(|p| p.components().next())
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    for top in &tops {
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(top), &link)
                .map_err(io_err(volume, "symlink", &link))?;
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("..") && !tops.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if let Some(old) = old.filter(|o| o.as_os_str() != stamp.as_str()) {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use updraft_cell_api::VolumeFile;

    fn content(files: &[(&str, &str)]) -> VolumeContent {
        VolumeContent {
            files: files
                .iter()
                .map(|(p, c)| VolumeFile {
                    path: (*p).into(),
                    content: c.as_bytes().to_vec(),
                    mode: None,
                })
                .collect(),
        }
    }

    #[test]
    fn atomic_writer_swaps_data_and_removes_stale_entries() -> Result<(), VolumeError> {
        let tmp = tempfile::tempdir().map_err(io_err("t", "tempdir", Path::new("/tmp")))?;
        let dir = tmp.path().join("cfg");
        write_atomic("cfg", &dir, &content(&[("a", "1"), ("d/b", "2")]))?;
        let read = |p: &str| std::fs::read_to_string(dir.join(p)).unwrap_or_default();
        assert_eq!((read("a").as_str(), read("d/b").as_str()), ("1", "2"));
        write_atomic("cfg", &dir, &content(&[("a", "3")]))?;
        assert_eq!(read("a"), "3");
        assert!(!dir.join("d").exists(), "stale entry removed");
        let data_dirs = std::fs::read_dir(&dir)
            .map(|r| {
                r.flatten()
                    .filter(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.starts_with("..") && n != "..data"
                    })
                    .count()
            })
            .unwrap_or(0);
        assert_eq!(data_dirs, 1, "the old data dir is gone");
        assert!(matches!(
            write_atomic("cfg", &dir, &content(&[("../x", "")])),
            Err(VolumeError::BadPath { .. })
        ));
        Ok(())
    }
}
