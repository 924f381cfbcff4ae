//! Errors of the cell runtime.

use std::path::PathBuf;

/// Everything that can go wrong while creating, running or tearing down sandboxes and containers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory operation on the host failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done (e.g. "write", "create directory").
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A system call made by the runtime itself failed.
    #[error("{call} failed: {errno}")]
    Sys {
        /// The call, e.g. "clone", "pidfd_open".
        call: &'static str,
        /// The errno it returned.
        errno: nix::errno::Errno,
    },
    /// No usable cgroup hierarchy (neither v2 nor v1 with memory/cpu/pids) was found.
    #[error("no usable cgroup hierarchy found: {0}")]
    NoCgroups(String),
    /// The spec is invalid; the message names the offending field.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// The container process failed during setup before its program started.
    #[error("container setup failed at {stage}: {errno}")]
    Setup {
        /// The setup step that failed (e.g. "pivot_root", "execve").
        stage: &'static str,
        /// The errno of the failing call.
        errno: nix::errno::Errno,
    },
    /// An external command (iproute2) failed.
    #[error("command `{command}` failed: {stderr}")]
    Command {
        /// The command line that was run.
        command: String,
        /// What it printed on stderr (trimmed, bounded).
        stderr: String,
    },
    /// The cgroup still had processes after the kill deadline.
    #[error("processes still in cgroup {0} after kill")]
    CgroupBusy(PathBuf),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io {
        action,
        path,
        source,
    }
}

pub(crate) fn sys(call: &'static str) -> impl FnOnce(nix::errno::Errno) -> Error {
    move |errno| Error::Sys { call, errno }
}
