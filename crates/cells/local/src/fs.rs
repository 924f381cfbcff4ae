//! The cell's view of the filesystem.
//!
//! A cell sees the host's filesystem, like a machine booted from the same image, except:
//! - **private directories** (`privateDirs`, and for each `write_files` entry whose directory
//!   does not exist on the host, the topmost missing directory): a directory of the cell's own
//!   under `stateDir/cells/<id>/root/<path>`, bind-mounted at the path. It starts empty (plus
//!   the bootstrap's files) and is a real directory, so the agent may keep overlayfs layers in
//!   it. Where the mount point does not exist on the host, an empty directory is created there
//!   once (like `/mnt`); nothing is ever written into it on the host.
//! - **overlaid directories**: a `write_files` entry whose directory exists on the host
//!   overlays that directory (overlayfs; upper = the same per-cell tree): the cell sees the
//!   host's files plus its own, and its writes there stay in the cell.
//!
//! Why not a per-cell root with `pivot_root`: the agent, iproute2 and the cgroup mounts must
//! stay the host's, and rewriting every path of the bootstrap would make the cell see paths
//! the provider did not write. Mounts in a private mount namespace keep the paths honest.
//!
//! Refused (with the path named): `/`, anything under `/proc`, `/sys`, `/dev` or
//! `/run/netns`, a directory containing the backend's `stateDir` or inside it, and a directory
//! with other mounts below it (an overlay or bind would hide them from the cell).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{LocalError, io};
use crate::userdata::WriteFile;

/// Where a cell's own directories and files go, and what to mount in its namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsPlan {
    /// Host directories overlaid with the cell's tree (outermost only), mounted first.
    pub overlays: Vec<PathBuf>,
    /// Paths where the cell's own directory is bind-mounted (outermost only), mounted after the
    /// overlays.
    pub binds: Vec<PathBuf>,
    /// Bind targets missing on the host and not inside an overlay: created empty on the host.
    pub host_mountpoints: Vec<PathBuf>,
}

fn under(path: &Path, ancestor: &Path) -> bool {
    path != ancestor && path.starts_with(ancestor)
}

/// Whether `dir` may be overlaid or bind-mounted in a cell; the error says why not.
pub(crate) fn check_mount_target(dir: &Path, state_dir: &Path) -> Result<(), String> {
    if !dir.is_absolute() {
        return Err(format!("{} must be an absolute path", dir.display()));
    }
    if dir == Path::new("/") {
        return Err(
            "/ cannot be given to a cell; write below a directory such as /etc or /var/lib".into(),
        );
    }
    for system in ["/proc", "/sys", "/dev", "/run/netns"] {
        if dir.starts_with(system) {
            return Err(format!(
                "{} is below {system}, which cells share with the host; choose another directory",
                dir.display()
            ));
        }
    }
    if state_dir.starts_with(dir) {
        return Err(format!(
            "{} contains the local backend's stateDir {}; write elsewhere or move local.stateDir",
            dir.display(),
            state_dir.display()
        ));
    }
    if dir.starts_with(state_dir) {
        return Err(format!(
            "{} is inside the local backend's stateDir {}",
            dir.display(),
            state_dir.display()
        ));
    }
    Ok(())
}

/// Mount points of this process's mount namespace.
fn mount_points() -> Result<Vec<PathBuf>, LocalError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("read", "/proc/self/mountinfo"))?;
    Ok(text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(point.replace("\\040", " ")))
        .collect())
}

/// Decides what a cell with these files and private directories mounts.
pub fn plan(
    files: &[WriteFile],
    private_dirs: &[PathBuf],
    state_dir: &Path,
) -> Result<FsPlan, LocalError> {
    let mut binds: Vec<PathBuf> = private_dirs.to_vec();
    let mut overlays: Vec<PathBuf> = Vec::new();
    for file in files {
        let refuse = |message: String| LocalError::Filesystem {
            path: file.path.clone(),
            message,
        };
        if file.path.is_dir() {
            return Err(refuse(
                "is a directory on the host; write_files needs a file path".into(),
            ));
        }
        let missing = file
            .path
            .ancestors()
            .skip(1)
            .filter(|ancestor| !ancestor.exists())
            .last()
            .map(Path::to_path_buf);
        match missing {
            Some(topmost) => binds.push(topmost),
            None => {
                let parent = file.path.parent().unwrap_or(Path::new("/")).to_path_buf();
                if !parent.is_dir() {
                    return Err(refuse(format!(
                        "{} is not a directory on the host",
                        parent.display()
                    )));
                }
                overlays.push(parent);
            }
        }
    }
    binds.sort();
    binds.dedup();
    let outer_binds: Vec<PathBuf> = binds
        .iter()
        .filter(|bind| !binds.iter().any(|other| under(bind, other)))
        .cloned()
        .collect();
    overlays.sort();
    overlays.dedup();
    let outer_overlays: Vec<PathBuf> = overlays
        .iter()
        .filter(|dir| {
            !overlays.iter().any(|other| under(dir, other))
                && !outer_binds.iter().any(|bind| dir.starts_with(bind))
        })
        .cloned()
        .collect();
    let mounts = mount_points()?;
    for dir in outer_overlays.iter().chain(&outer_binds) {
        let refuse = |message: String| LocalError::Filesystem {
            path: dir.clone(),
            message,
        };
        check_mount_target(dir, state_dir).map_err(refuse)?;
        if let Some(hidden) = mounts.iter().find(|point| under(point, dir)) {
            return Err(refuse(format!(
                "the host has a mount at {} below it, which the cell would not see; write elsewhere",
                hidden.display()
            )));
        }
    }
    let host_mountpoints = outer_binds
        .iter()
        .filter(|bind| {
            !bind.exists()
                && !outer_overlays
                    .iter()
                    .any(|overlay| bind.starts_with(overlay))
        })
        .cloned()
        .collect();
    Ok(FsPlan {
        overlays: outer_overlays,
        binds: outer_binds,
        host_mountpoints,
    })
}

/// `root` joined with the absolute `path`.
pub fn in_root(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Creates `path` inside `root` and its ancestors, each with the mode and owner of the host
/// directory of the same path when there is one (an overlay's upper directories must look
/// like the host's), 0755 root otherwise.
fn create_like_host(root: &Path, path: &Path) -> Result<(), LocalError> {
    let mut ancestors: Vec<&Path> = path.ancestors().collect();
    ancestors.reverse();
    for ancestor in ancestors {
        let copy = in_root(root, ancestor);
        if copy.is_dir() {
            continue;
        }
        std::fs::create_dir(&copy).map_err(io("create directory", &copy))?;
        match std::fs::metadata(ancestor) {
            Ok(host) if host.is_dir() => {
                std::fs::set_permissions(
                    &copy,
                    std::fs::Permissions::from_mode(host.mode() & 0o7777),
                )
                .map_err(io("chmod", &copy))?;
                std::os::unix::fs::chown(&copy, Some(host.uid()), Some(host.gid()))
                    .map_err(io("chown", &copy))?;
            }
            _ => {
                std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
                    .map_err(io("chmod", &copy))?;
            }
        }
    }
    Ok(())
}

/// Creates the cell's tree under `root`: the mounted directories and the files (with their
/// modes), so that the mounts show them at their paths; and the host mount points.
pub fn populate(
    plan: &FsPlan,
    files: &[WriteFile],
    root: &Path,
    work: &Path,
) -> Result<(), LocalError> {
    std::fs::create_dir_all(root).map_err(io("create directory", root))?;
    for (index, dir) in plan.overlays.iter().enumerate() {
        create_like_host(root, dir)?;
        let work_dir = work.join(index.to_string());
        std::fs::create_dir_all(&work_dir).map_err(io("create directory", &work_dir))?;
    }
    for dir in &plan.binds {
        create_like_host(root, dir)?;
    }
    for dir in &plan.host_mountpoints {
        std::fs::create_dir_all(dir).map_err(io("create the mount point", dir))?;
    }
    for file in files {
        let parent = file.path.parent().unwrap_or(Path::new("/"));
        create_like_host(root, parent)?;
        let target = in_root(root, &file.path);
        let mut contents = Vec::new();
        if file.append {
            let privately_mounted = plan.binds.iter().any(|bind| file.path.starts_with(bind));
            if target.exists() {
                contents = std::fs::read(&target).map_err(io("read", &target))?;
            } else if !privately_mounted && file.path.is_file() {
                contents = std::fs::read(&file.path).map_err(io("read", &file.path))?;
            }
        }
        contents.extend_from_slice(&file.contents);
        std::fs::write(&target, &contents).map_err(io("write", &target))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(file.mode))
            .map_err(io("chmod", &target))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> WriteFile {
        WriteFile {
            path: PathBuf::from(path),
            contents: b"x".to_vec(),
            mode: 0o600,
            append: false,
        }
    }

    #[test]
    fn plans_overlays_for_existing_directories_and_binds_for_missing_ones() {
        let tmp = tempfile::tempdir().expect("tmp");
        let base = tmp.path();
        std::fs::create_dir_all(base.join("etc/ssl")).expect("mkdir");
        let state = base.join("state");
        std::fs::create_dir_all(&state).expect("mkdir");
        let p = |rel: &str| base.join(rel);
        let files = [
            file(&p("etc/motd").to_string_lossy()),
            file(&p("etc/ssl/extra.pem").to_string_lossy()),
            file(&p("etc/agent/tls/ca.crt").to_string_lossy()),
            file(&p("etc/agent/key").to_string_lossy()),
            file(&p("opt/new/deep/file").to_string_lossy()),
        ];
        let plan = plan(&files, &[p("var/agent"), p("etc/agent/sub")], &state).expect("plan");
        assert_eq!(plan.overlays, vec![p("etc")]);
        assert_eq!(plan.binds, vec![p("etc/agent"), p("opt"), p("var/agent")]);
        // etc/agent is inside the /etc overlay: its mount point comes from the cell's tree.
        assert_eq!(plan.host_mountpoints, vec![p("opt"), p("var/agent")]);

        let root = base.join("state/cell/root");
        populate(&plan, &files, &root, &base.join("state/cell/work")).expect("populate");
        let key = in_root(&root, &p("etc/agent/key"));
        assert_eq!(std::fs::read(&key).expect("read"), b"x");
        assert_eq!(
            std::fs::metadata(&key).expect("stat").permissions().mode() & 0o7777,
            0o600
        );
        assert!(in_root(&root, &p("etc/ssl")).is_dir());
        assert!(
            p("opt").is_dir() && !p("opt/new").exists(),
            "host mount point only, empty"
        );
        assert!(!p("etc/motd").exists(), "nothing written on the host");
    }

    #[test]
    fn refuses_what_would_break_the_host() {
        let state = Path::new("/var/lib/updraft/local-cells");
        for (dir, expected) in [
            ("/", "cannot be given"),
            ("/proc/sys", "below /proc"),
            ("/var/lib", "contains the local backend's stateDir"),
            (
                "/var/lib/updraft/local-cells/x",
                "inside the local backend's stateDir",
            ),
        ] {
            let message = check_mount_target(Path::new(dir), state).expect_err(dir);
            assert!(message.contains(expected), "{dir}: {message}");
        }
        check_mount_target(Path::new("/etc/updraft-cell"), state).expect("fine");
        // A file below /sys would overlay a directory of /sys.
        let message = plan(&[file("/sys/fs/x")], &[], state)
            .expect_err("sys")
            .to_string();
        assert!(message.contains("/sys"), "{message}");
    }
}
