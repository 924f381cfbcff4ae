use std::path::{Path, PathBuf};

/// Where a dev cluster keeps its state: `<workspace>/target/updraft-cluster` by default.
///
/// Everything the cluster writes (PKI, kubeconfigs, etcd data, logs, PID files) lives below
/// this one directory, so `cluster down` plus removing it leaves nothing behind.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// A layout rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The layout of the workspace that contains this crate, or the one named by
    /// `UPDRAFT_CLUSTER_DIR` when that is set.
    pub fn for_workspace() -> Self {
        match std::env::var_os("UPDRAFT_CLUSTER_DIR") {
            Some(dir) => Self::new(dir),
            None => Self::new(workspace_root().join("target").join("updraft-cluster")),
        }
    }

    /// The state directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// Certificates and keys.
    pub fn pki(&self) -> PathBuf {
        self.root.join("pki")
    }
    /// One log file per component.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    /// The log file of one component.
    pub fn log(&self, component: &str) -> PathBuf {
        self.logs().join(format!("{component}.log"))
    }
    /// PID files of the running components.
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }
    /// etcd's data directory.
    pub fn etcd_data(&self) -> PathBuf {
        self.root.join("etcd-data")
    }
    /// Tools put on PATH by `cluster env` (the pinned kubectl).
    pub fn bin(&self) -> PathBuf {
        self.root.join("bin")
    }
    /// The cluster-admin kubeconfig (`system:masters`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.root.join("admin.kubeconfig")
    }
    /// The kubeconfig of a control-plane component.
    pub fn component_kubeconfig(&self, component: &str) -> PathBuf {
        self.root.join(format!("{component}.kubeconfig"))
    }
    /// The pinned kubectl, once `cluster up` linked it.
    pub fn kubectl(&self) -> PathBuf {
        self.bin().join("kubectl")
    }
}

/// The Cargo workspace root: two levels above this crate's manifest.
pub(crate) fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.to_path_buf())
}
