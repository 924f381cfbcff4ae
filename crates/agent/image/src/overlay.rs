//! overlayfs: mounting one, and probing whether this host can.
//!
//! The store probes once when it opens ([`probe`], for [`RootfsMode::Auto`](crate::RootfsMode));
//! container root filesystems mount one per container. Both live here so that the store and
//! the root filesystems share this module instead of importing each other.

use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

use crate::unpack::remove_any;

/// overlayfs takes its options in one page; leave room for the other options.
pub(crate) const MAX_OPTIONS: usize = 4000;

/// The mount options of an overlay of `lower` (top layer first) with `upper` and `work`.
pub(crate) fn options(lower: &[String], upper: &Path, work: &Path) -> String {
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    )
}

/// Mounts an overlay with `options` (see [`options`]) on `merged`.
pub(crate) fn mount(options: &str, merged: &Path) -> nix::Result<()> {
    nix::mount::mount(
        Some("overlay"),
        merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(options),
    )
}

/// Unmounts `merged` lazily: processes that still hold it keep it until they let go.
pub(crate) fn unmount(merged: &Path) -> nix::Result<()> {
    nix::mount::umount2(merged, MntFlags::MNT_DETACH)
}

/// Mounts and unmounts a throwaway overlay under `tmp` to learn whether overlayfs works here.
pub(crate) fn probe(tmp: &Path) -> Result<(), String> {
    let dir = tmp.join(format!("overlay-probe-{}", std::process::id()));
    let result = (|| {
        let (lower, upper, work, merged) = (
            dir.join("lower"),
            dir.join("upper"),
            dir.join("work"),
            dir.join("merged"),
        );
        for d in [&lower, &upper, &work, &merged] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let options = options(&[lower.display().to_string()], &upper, &work);
        mount(&options, &merged).map_err(|e| format!("mounting a probe overlay: {e}"))?;
        unmount(&merged).map_err(|e| format!("unmounting the probe overlay: {e}"))
    })();
    let _ = remove_any(&dir);
    result
}
