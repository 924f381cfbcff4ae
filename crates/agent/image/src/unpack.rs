//! Layer extraction: tar (plain or gzip) into a directory, with whiteouts.
//!
//! Two modes. For overlayfs every layer gets its own directory and whiteouts
//! become what overlayfs understands (the kubelet/containerd way): `.wh.NAME` a
//! character device 0/0 named NAME, `.wh..wh..opq` the `trusted.overlay.opaque=y`
//! xattr on the directory. For the copy fallback all layers go in order into one
//! directory and whiteouts delete what lower layers put there.
//!
//! Safety: entry names are sanitized by [`classify_entry`] (`..` rejected), and no
//! entry is ever written *through* a symlink: a symlink among an entry's parent
//! directories is an error (tools that build layers record real paths), so an
//! absolute or climbing symlink in the image cannot redirect a write to the host.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{CWD, FileType, Mode, Timespec, Timestamps, XattrFlags};
use sha2::{Digest as _, Sha256};

use crate::layer_path::{LayerEntry, LayerPathError, classify_entry};

/// How whiteouts and opaque directories are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WhiteoutMode {
    /// Convert to overlayfs whiteouts (device 0/0, opaque xattr) in a layer's own directory.
    Overlay,
    /// Delete from the merged directory (copy fallback).
    Delete,
}

/// The xattr overlayfs reads to hide a lower directory's content.
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Unpacks the layer blob at `blob` into `dest` (which must exist). Returns the
/// layer's diff ID: the sha256 of the uncompressed tar.
pub(crate) fn unpack_layer(
    blob: &Path,
    media_type: &str,
    dest: &Path,
    mode: WhiteoutMode,
) -> Result<String, String> {
    if media_type.contains("zstd") {
        return Err(format!(
            "media type {media_type} (zstd) is not supported; push the image with gzip layers"
        ));
    }
    let file = File::open(blob).map_err(|e| format!("opening blob {}: {e}", blob.display()))?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let magic = reader
        .fill_buf()
        .map_err(|e| format!("reading blob: {e}"))?
        .get(..4)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let decompressed: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(reader))
    } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
        return Err(
            "zstd-compressed layers are not supported; push the image with gzip layers".into(),
        );
    } else {
        Box::new(reader)
    };
    let hashing = HashingReader {
        inner: decompressed,
        hasher: Sha256::new(),
    };
    let mut archive = tar::Archive::new(hashing);
    let mut unpacker = Unpacker {
        dest,
        mode,
        written: HashSet::new(),
        dir_times: Vec::new(),
    };
    let entries = archive.entries().map_err(|e| format!("reading tar: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("reading tar: {e}"))?;
        unpacker.entry(entry)?;
    }
    unpacker.finish();
    // The tar's trailing blocks and padding count towards the diff ID.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| format!("reading tar: {e}"))?;
    Ok(format!("sha256:{}", hex::encode(rest.hasher.finalize())))
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

struct Unpacker<'a> {
    dest: &'a Path,
    mode: WhiteoutMode,
    /// Paths (relative) this layer wrote, so an opaque marker after them keeps them.
    written: HashSet<PathBuf>,
    /// Directory mtimes, applied last (writing children changes them).
    dir_times: Vec<(PathBuf, u64)>,
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), String> {
        let raw_name = entry.path().map_err(|e| format!("entry name: {e}"))?;
        let name = raw_name
            .to_str()
            .ok_or_else(|| format!("entry name {raw_name:?} is not UTF-8"))?
            .to_owned();
        let kind = entry.header().entry_type();
        let classified = match classify_entry(&name) {
            Ok(classified) => classified,
            // The archive's root ("./"): nothing to create.
            Err(LayerPathError::Empty(_)) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        match classified {
            LayerEntry::Whiteout(path) => self.whiteout(&path),
            LayerEntry::OpaqueDir(path) => self.opaque(&path),
            LayerEntry::Plain(path) => {
                if matches!(kind, tar::EntryType::XGlobalHeader) {
                    return Ok(());
                }
                self.plain(&path, &mut entry, kind)
                    .map_err(|e| format!("{name}: {e}"))
            }
        }
    }

    fn whiteout(&mut self, path: &Path) -> Result<(), String> {
        let target = self.dest.join(path);
        match self.mode {
            WhiteoutMode::Delete => {
                ensure_parents(self.dest, path, false)?;
                remove_any(&target).map_err(|e| format!("whiteout {}: {e}", path.display()))
            }
            WhiteoutMode::Overlay => {
                ensure_parents(self.dest, path, true)?;
                remove_any(&target).map_err(|e| format!("whiteout {}: {e}", path.display()))?;
                rustix::fs::mknodat(
                    CWD,
                    &target,
                    FileType::CharacterDevice,
                    Mode::empty(),
                    rustix::fs::makedev(0, 0),
                )
                .map_err(|e| format!("whiteout device for {}: {e}", path.display()))?;
                self.written.insert(path.to_path_buf());
                Ok(())
            }
        }
    }

    fn opaque(&mut self, dir: &Path) -> Result<(), String> {
        ensure_parents(self.dest, &dir.join("x"), true)?;
        let target = self.dest.join(dir);
        match self.mode {
            WhiteoutMode::Overlay => {
                rustix::fs::lsetxattr(&target, OPAQUE_XATTR, b"y", XattrFlags::empty())
                    .map_err(|e| format!("opaque directory {}: {e}", dir.display()))
            }
            WhiteoutMode::Delete => {
                let children = fs::read_dir(&target)
                    .map_err(|e| format!("opaque directory {}: {e}", dir.display()))?;
                for child in children {
                    let child = child.map_err(|e| format!("opaque directory: {e}"))?;
                    let relative = dir.join(child.file_name());
                    if !self.written.contains(&relative) {
                        remove_any(&child.path())
                            .map_err(|e| format!("opaque directory {}: {e}", dir.display()))?;
                    }
                }
                Ok(())
            }
        }
    }

    fn plain<R: Read>(
        &mut self,
        path: &Path,
        entry: &mut tar::Entry<'_, R>,
        kind: tar::EntryType,
    ) -> io::Result<()> {
        ensure_parents(self.dest, path, true).map_err(io::Error::other)?;
        let target = self.dest.join(path);
        let header = entry.header();
        let mode = header.mode()? & 0o7777;
        let uid = u32::try_from(header.uid()?).map_err(io::Error::other)?;
        let gid = u32::try_from(header.gid()?).map_err(io::Error::other)?;
        let mtime = header.mtime().unwrap_or(0);
        let is_dir = kind == tar::EntryType::Directory;
        replace_existing(&target, is_dir)?;
        self.mark_written(path);
        match kind {
            tar::EntryType::Directory => {
                if !target.is_dir() {
                    fs::create_dir(&target)?;
                }
                self.dir_times.push((target.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&target)?;
                io::copy(entry, &mut file)?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()?
                    .ok_or_else(|| io::Error::other("symlink without a target"))?;
                std::os::unix::fs::symlink(link, &target)?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()?
                    .ok_or_else(|| io::Error::other("hardlink without a target"))?;
                let link = link
                    .to_str()
                    .ok_or_else(|| io::Error::other("hardlink target is not UTF-8"))?;
                let LayerEntry::Plain(source) = classify_entry(link).map_err(io::Error::other)?
                else {
                    return Err(io::Error::other(format!(
                        "hardlink to a whiteout name {link:?}"
                    )));
                };
                ensure_parents(self.dest, &source, false).map_err(io::Error::other)?;
                fs::hard_link(self.dest.join(&source), &target).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("hardlink to {link:?} (must be in this layer or below): {e}"),
                    )
                })?;
                // A hardlink shares the source's inode and so its metadata.
                return Ok(());
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let file_type = match kind {
                    tar::EntryType::Char => FileType::CharacterDevice,
                    tar::EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let major = header.device_major()?.unwrap_or(0);
                let minor = header.device_minor()?.unwrap_or(0);
                rustix::fs::mknodat(
                    CWD,
                    &target,
                    file_type,
                    Mode::from_raw_mode(0o600),
                    rustix::fs::makedev(major, minor),
                )?;
            }
            other => {
                tracing::debug!(entry = %path.display(), kind = ?other, "skipping tar entry of unsupported type");
                return Ok(());
            }
        }
        std::os::unix::fs::lchown(&target, Some(uid), Some(gid))?;
        if kind != tar::EntryType::Symlink {
            // After chown, which clears setuid/setgid bits.
            fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
            self.apply_xattrs(entry, &target)?;
        }
        if !is_dir {
            set_mtime(&target, mtime)?;
        }
        Ok(())
    }

    /// File capabilities and user xattrs from PAX headers; never `trusted.*`
    /// (a layer must not forge overlay metadata).
    fn apply_xattrs<R: Read>(
        &self,
        entry: &mut tar::Entry<'_, R>,
        target: &Path,
    ) -> io::Result<()> {
        let Some(extensions) = entry.pax_extensions()? else {
            return Ok(());
        };
        for extension in extensions {
            let extension = extension?;
            let Ok(key) = extension.key() else { continue };
            let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
                continue;
            };
            if name == "security.capability" || name.starts_with("user.") {
                rustix::fs::lsetxattr(target, name, extension.value_bytes(), XattrFlags::empty())?;
            }
        }
        Ok(())
    }

    fn mark_written(&mut self, path: &Path) {
        let mut current = PathBuf::new();
        for component in path.components() {
            current.push(component);
            self.written.insert(current.clone());
        }
    }

    fn finish(&mut self) {
        for (dir, mtime) in self.dir_times.iter().rev() {
            if let Err(e) = set_mtime(dir, *mtime) {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot set directory mtime");
            }
        }
    }
}

fn set_mtime(path: &Path, mtime: u64) -> io::Result<()> {
    let time = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(0),
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: time,
            last_modification: time,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// Makes sure every parent of `relative` under `root` is a real directory (never a
/// symlink), creating missing ones when `create` is set.
pub(crate) fn ensure_parents(root: &Path, relative: &Path, create: bool) -> Result<(), String> {
    let Some(parent) = relative.parent() else {
        return Ok(());
    };
    let mut current = root.to_path_buf();
    for component in parent.components() {
        let Component::Normal(part) = component else {
            return Err(format!("{}: not a plain relative path", relative.display()));
        };
        current.push(part);
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(format!(
                    "{} passes through the symlink {} (refused: it could point outside the root)",
                    relative.display(),
                    current.strip_prefix(root).unwrap_or(&current).display()
                ));
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "{}: parent {} is not a directory",
                    relative.display(),
                    current.strip_prefix(root).unwrap_or(&current).display()
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir(&current).map_err(|e| format!("{}: {e}", current.display()))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("{}: {e}", current.display())),
        }
    }
    Ok(())
}

/// Clears the way for a new entry: an existing directory stays when the entry is a
/// directory too (its metadata is updated), anything else is removed.
fn replace_existing(target: &Path, new_is_dir: bool) -> io::Result<()> {
    match fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() && new_is_dir => Ok(()),
        Ok(_) => remove_any(target),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes a file, symlink, device or whole directory tree; absent is fine.
pub(crate) fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `path` is an overlayfs whiteout (character device 0/0).
#[cfg(test)]
fn is_whiteout_device(path: &Path) -> bool {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::unix::fs::MetadataExt as _;

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header
    }

    /// A gzip layer from (name, kind, content-or-link) triples.
    fn layer(dir: &Path, name: &str, entries: &[(&str, tar::EntryType, &str)]) -> PathBuf {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            match kind {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let mut h = header(*kind, 0o777, 0);
                    builder.append_link(&mut h, path, data).unwrap();
                }
                _ => {
                    let mut h = header(*kind, 0o644, data.len() as u64);
                    builder.append_data(&mut h, path, data.as_bytes()).unwrap();
                }
            }
        }
        let tar = builder.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let path = dir.join(name);
        fs::write(&path, gz.finish().unwrap()).unwrap();
        path
    }

    const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    #[test]
    fn delete_mode_applies_whiteouts_and_opaque_dirs_in_order() {
        use tar::EntryType::{Directory, Link, Regular, Symlink};
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let base = layer(
            dir.path(),
            "base",
            &[
                ("etc/", Directory, ""),
                ("etc/motd", Regular, "hi"),
                ("data/", Directory, ""),
                ("data/old", Regular, "old"),
                ("bin/tool", Regular, "#!"),
                ("bin/alias", Link, "bin/tool"),
                ("bin/sh", Symlink, "/bin/tool"),
            ],
        );
        let top = layer(
            dir.path(),
            "top",
            &[
                ("data/new", Regular, "new"),
                ("data/.wh..wh..opq", Regular, ""),
                ("etc/.wh.motd", Regular, ""),
            ],
        );
        let diff_id = unpack_layer(&base, GZ, &root, WhiteoutMode::Delete).unwrap();
        assert!(diff_id.starts_with("sha256:"));
        assert_eq!(
            fs::metadata(root.join("bin/alias")).unwrap().ino(),
            fs::metadata(root.join("bin/tool")).unwrap().ino()
        );
        assert_eq!(
            fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("/bin/tool")
        );
        unpack_layer(&top, GZ, &root, WhiteoutMode::Delete).unwrap();
        assert!(!root.join("etc/motd").exists());
        assert!(root.join("etc").is_dir());
        assert!(!root.join("data/old").exists());
        assert_eq!(fs::read_to_string(root.join("data/new")).unwrap(), "new");
    }

    #[test]
    fn overlay_mode_makes_whiteout_devices_and_opaque_xattrs() {
        use tar::EntryType::Regular;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("layer");
        fs::create_dir(&root).unwrap();
        let top = layer(
            dir.path(),
            "top",
            &[
                ("data/.wh..wh..opq", Regular, ""),
                ("data/new", Regular, "new"),
                ("etc/.wh.motd", Regular, ""),
            ],
        );
        unpack_layer(&top, GZ, &root, WhiteoutMode::Overlay).unwrap();
        assert!(is_whiteout_device(&root.join("etc/motd")));
        assert!(!root.join("etc/.wh.motd").exists());
        let mut value = [0u8; 4];
        let len = rustix::fs::lgetxattr(root.join("data"), OPAQUE_XATTR, &mut value).unwrap();
        assert_eq!(&value[..len], b"y");
        assert_eq!(fs::read_to_string(root.join("data/new")).unwrap(), "new");
    }

    #[test]
    fn writes_through_symlinks_and_climbing_names_are_refused() {
        use tar::EntryType::{Regular, Symlink};
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let evil = layer(
            dir.path(),
            "evil",
            &[
                ("escape", Symlink, outside.to_str().unwrap()),
                ("escape/pwned", Regular, "x"),
            ],
        );
        let err = unpack_layer(&evil, GZ, &root, WhiteoutMode::Delete).unwrap_err();
        assert!(err.contains("symlink"), "{err}");
        assert!(!outside.join("pwned").exists());

        // tar::Builder refuses '..' names, so write the header by hand.
        let mut h = header(Regular, 0o644, 1);
        h.as_gnu_mut().unwrap().name[..12].copy_from_slice(b"../../pwned2");
        h.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&h, &b"x"[..]).unwrap();
        let plain = dir.path().join("climb.tar");
        fs::write(&plain, builder.into_inner().unwrap()).unwrap();
        let err = unpack_layer(
            &plain,
            "application/vnd.oci.image.layer.v1.tar",
            &root,
            WhiteoutMode::Delete,
        )
        .unwrap_err();
        assert!(err.contains("escapes"), "{err}");
    }
}
