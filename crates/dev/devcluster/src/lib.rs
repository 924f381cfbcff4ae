//! The local Kubernetes control plane that Updraft is developed and tested against.
//!
//! Real components, not fakes: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler built with the Go toolchain from their Go modules at pinned versions,
//! cached per machine, started on 127.0.0.1 (and on the [`host_address`] that cells reach)
//! with a generated PKI, RBAC, the Node authorizer, the `NodeRestriction` admission plugin
//! and the aggregation layer's front proxy (so that extension API servers such as
//! metrics-server can serve APIServices).
//!
//! The crate has three layers, each usable on its own:
//! - [`toolchain`]: builds (once per machine) and locates the pinned binaries and kubectl;
//! - [`pki`] and [`kubeconfig`]: the cluster's certificates and the identities that use them;
//! - [`cluster`]: starts, checks and stops the processes whose state lives in a [`Layout`].
#![forbid(unsafe_code)]

pub mod cluster;
pub mod coredns;
pub mod host_address;
pub mod kubeconfig;
mod layout;
pub mod pki;
pub mod toolchain;
pub mod versions;

pub use layout::{Layout, workspace_root};

use std::path::PathBuf;

/// Everything that can go wrong while building, starting or talking to the dev cluster.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "writing".
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A tool the dev cluster needs is not installed.
    #[error("`{tool}` was not found on PATH: {hint}")]
    MissingTool {
        /// The program's name.
        tool: &'static str,
        /// How to install it.
        hint: &'static str,
    },
    /// An external command ran but failed.
    #[error("{what} failed ({status}); its output is in {log}")]
    CommandFailed {
        /// What the command was for.
        what: String,
        /// How it exited.
        status: std::process::ExitStatus,
        /// Where its output went.
        log: PathBuf,
    },
    /// A certificate or key could not be generated or parsed.
    #[error("certificate {what}: {source}")]
    Pki {
        /// Which certificate.
        what: String,
        /// The underlying error.
        source: rcgen::Error,
    },
    /// A port the control plane needs is taken by a process we did not start.
    #[error(
        "127.0.0.1:{port} (for {component}) is already in use by another process; stop it or run `cargo xtask cluster down`"
    )]
    PortInUse {
        /// The port.
        port: u16,
        /// The component that wanted it.
        component: &'static str,
    },
    /// A component did not become ready in time.
    #[error("{what} was not ready after {seconds} s; last seen: {last_seen}; logs: {log}")]
    NotReady {
        /// What was awaited.
        what: String,
        /// How long we waited.
        seconds: u64,
        /// The last state or error observed, to say why.
        last_seen: String,
        /// Where to look next.
        log: PathBuf,
    },
    /// A component exited right after it was started.
    #[error("{component} exited during start-up ({status}); see {log}")]
    Exited {
        /// Which component.
        component: &'static str,
        /// How it exited.
        status: String,
        /// Its log file.
        log: PathBuf,
    },
    /// The cluster is not running, so there is nothing to connect to.
    #[error(
        "the dev control plane is not running ({reason}); start it with `cargo xtask cluster up`"
    )]
    NotRunning {
        /// What is missing.
        reason: String,
    },
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A kubeconfig could not be loaded.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The kubeconfig file.
        path: PathBuf,
        /// The underlying error.
        source: kube::config::KubeconfigError,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps an I/O error with what was done and to which path.
pub(crate) fn io_err(
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
