//! Classification and sanitizing of layer tar entry names.

use std::path::{Component, Path, PathBuf};

/// A tar entry name that would land outside the root.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayerPathError {
    /// The name climbs out of the root with `..`.
    #[error("layer entry {0:?} escapes the root with '..'")]
    Escapes(String),
    /// The name is empty once `.` and `/` are removed.
    #[error("layer entry {0:?} names the root itself")]
    Empty(String),
}

/// What a tar entry means for the root filesystem.
#[derive(Debug, PartialEq, Eq)]
pub enum LayerEntry {
    /// A regular entry at this path (relative to the root).
    Plain(PathBuf),
    /// `.wh.NAME`: delete this path from the lower layers.
    Whiteout(PathBuf),
    /// `.wh..wh..opq`: hide the lower layers' content of this directory.
    OpaqueDir(PathBuf),
}

/// Sanitizes an entry name: absolute names are taken relative to the root,
/// `.` components dropped, `..` rejected (even when it would stay inside,
/// since layers produced by real tools never contain it).
pub fn classify_entry(name: &str) -> Result<LayerEntry, LayerPathError> {
    let mut path = PathBuf::new();
    for component in Path::new(name).components() {
        match component {
            Component::Normal(part) => path.push(part),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => return Err(LayerPathError::Escapes(name.to_owned())),
        }
    }
    let file_name = path.file_name().and_then(|n| n.to_str()).map(str::to_owned);
    let Some(file_name) = file_name else {
        return Err(LayerPathError::Empty(name.to_owned()));
    };
    let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
    if file_name == ".wh..wh..opq" {
        return Ok(LayerEntry::OpaqueDir(parent));
    }
    match file_name.strip_prefix(".wh.") {
        Some(target) if !target.is_empty() => Ok(LayerEntry::Whiteout(parent.join(target))),
        _ => Ok(LayerEntry::Plain(path)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteouts_opaque_and_traversal() {
        assert_eq!(
            classify_entry("/etc/./passwd"),
            Ok(LayerEntry::Plain("etc/passwd".into()))
        );
        assert_eq!(
            classify_entry("etc/.wh.motd"),
            Ok(LayerEntry::Whiteout("etc/motd".into()))
        );
        assert_eq!(
            classify_entry("var/lib/.wh..wh..opq"),
            Ok(LayerEntry::OpaqueDir("var/lib".into()))
        );
        assert!(matches!(
            classify_entry("../../etc/shadow"),
            Err(LayerPathError::Escapes(_))
        ));
        assert!(matches!(
            classify_entry("a/../../b"),
            Err(LayerPathError::Escapes(_))
        ));
        assert!(matches!(
            classify_entry("./"),
            Err(LayerPathError::Empty(_))
        ));
    }
}
