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

/// The Cargo workspace root: the nearest directory holding a `[workspace]` manifest above the
/// package being run (cargo sets `CARGO_MANIFEST_DIR` at run time for `cargo run` and
/// `cargo test`) or else the current directory.
///
/// Never the compile-time `env!("CARGO_MANIFEST_DIR")`: cargo does not rebuild a crate when
/// its checkout moves, so with a shared `CARGO_TARGET_DIR` (as CI and the development machines
/// use) a compiled-in path may name another clone.
pub fn workspace_root() -> PathBuf {
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::current_dir().ok())
        .unwrap_or_default();
    start
        .ancestors()
        .find(|dir| {
            std::fs::read_to_string(dir.join("Cargo.toml"))
                .is_ok_and(|manifest| manifest.lines().any(|l| l.trim() == "[workspace]"))
        })
        .map(Path::to_path_buf)
        .unwrap_or(start)
}
