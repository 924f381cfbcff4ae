//! Errors of the local backend, and how they map onto the backend trait's kinds.

use std::path::PathBuf;

use updraft_cells_backend::BackendError;

/// What went wrong in the local backend; every message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// Namespaces, cgroups and mounts need root.
    #[error("local cells need root (network namespaces, cgroups, mounts); run updraft as root")]
    NotRoot,
    /// The configured agent program does not exist or is not executable.
    #[error(
        "updraft-cell binary not found at {path} (local.agentBinary): build it (cargo build -p updraft-cell-agent) or install it there"
    )]
    AgentBinaryMissing {
        /// The configured path.
        path: PathBuf,
    },
    /// A program the backend runs is missing.
    #[error("{program} not found on PATH: install the Debian package {package}")]
    ToolMissing {
        /// The program, e.g. `nsenter`.
        program: String,
        /// The Debian package providing it.
        package: String,
    },
    /// A setting cannot work.
    #[error("local backend config: {field}: {message}")]
    Config {
        /// The field, e.g. `cidr`.
        field: String,
        /// What is wrong and what to write instead.
        message: String,
    },
    /// The instance type is not in the catalog the backend was given.
    #[error("instance type {name:?} is not in the local catalog; known types: {known}")]
    UnknownInstanceType {
        /// The requested type.
        name: String,
        /// The catalog's types, comma separated.
        known: String,
    },
    /// Every address of the CIDR is taken.
    #[error(
        "CIDR {cidr} exhausted: {in_use} addresses are held by cells; terminate cells or configure a larger local.cidr"
    )]
    CidrExhausted {
        /// The configured CIDR.
        cidr: String,
        /// How many addresses cells hold.
        in_use: usize,
    },
    /// The cell's user data cannot be run as cloud-init would.
    #[error("cell user data: {0}")]
    UserData(String),
    /// A `write_files` path or private directory cannot be given to a cell.
    #[error("cell filesystem: {path}: {message}")]
    Filesystem {
        /// The path.
        path: PathBuf,
        /// Why, and what to do.
        message: String,
    },
    /// An external command (iproute2, util-linux) failed.
    #[error("command `{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr (bounded).
        stderr: String,
    },
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// Creating, limiting or removing a cell's cgroup failed.
    #[error("cell cgroup: {0}")]
    Cgroup(#[from] updraft_cell_runtime::Error),
    /// A cell's record file cannot be read.
    #[error(
        "cell record {path} is unreadable: {message}; inspect or delete the file (terminating the cell also cleans up what it names)"
    )]
    Record {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// The cell's init did not come up.
    #[error("cell {id} did not boot: {message}; console output: {console}")]
    BootFailed {
        /// The cell id.
        id: String,
        /// What was observed.
        message: String,
        /// The end of the cell's console log.
        console: String,
    },
    /// No cell with this id.
    #[error("cell {id} not found")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// A cell to hand to a pod is not (any more) a standby cell of the controller.
    #[error("cell {id} is not a standby cell of controller {controller_id}: {now}")]
    NotStandby {
        /// The cell id.
        id: String,
        /// The controller that asked.
        controller_id: String,
        /// What the cell is instead.
        now: String,
    },
}

/// Shorthand for [`LocalError::Io`].
pub(crate) fn io(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> LocalError {
    let path = path.into();
    move |source| LocalError::Io {
        action,
        path,
        source,
    }
}

impl From<LocalError> for BackendError {
    fn from(error: LocalError) -> BackendError {
        let detail = error.to_string();
        match error {
            LocalError::NotFound { id } => BackendError::NotFound { id },
            LocalError::CidrExhausted { .. } => BackendError::Capacity { detail },
            LocalError::NotRoot => BackendError::Unauthorized { detail },
            LocalError::Command { .. } | LocalError::Io { .. } | LocalError::Cgroup(_) => {
                BackendError::Transient { detail }
            }
            LocalError::AgentBinaryMissing { .. }
            | LocalError::ToolMissing { .. }
            | LocalError::Config { .. }
            | LocalError::UnknownInstanceType { .. }
            | LocalError::UserData(_)
            | LocalError::Filesystem { .. }
            | LocalError::Record { .. }
            | LocalError::BootFailed { .. }
            | LocalError::NotStandby { .. } => BackendError::InvalidRequest { detail },
        }
    }
}
