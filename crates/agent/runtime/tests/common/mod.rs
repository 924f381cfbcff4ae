//! Shared helpers of the integration tests: root check, busybox rootfs, sandboxes, output.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use updraft_cell_runtime::{
    CgroupDriver, Container, ContainerExit, ContainerSpec, DnsConfig, PodSandbox, Resources,
    SandboxSpec, Stdio, StdioMode,
};

/// Fails loudly (instead of skipping) when not root.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the cell-runtime integration tests must run as root (namespaces, cgroups, mounts)"
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox missing: apt-get install busybox-static"
    );
}

/// A unique id per test in this process run.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A rootfs of /bin/busybox plus its applet symlinks.
pub fn busybox_rootfs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir bin");
    std::fs::create_dir_all(dir.path().join("tmp")).expect("mkdir tmp");
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("copy busybox");
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("symlink applet");
        }
    }
    dir
}

/// A state dir for sandboxes, and the driver.
pub struct Env {
    pub driver: CgroupDriver,
    pub state: tempfile::TempDir,
}

pub fn env() -> Env {
    require_root();
    Env {
        driver: CgroupDriver::detect().expect("cgroup driver"),
        state: tempfile::tempdir().expect("tempdir"),
    }
}

pub fn sandbox_spec(env: &Env, id: &str) -> SandboxSpec {
    SandboxSpec {
        id: id.to_owned(),
        hostname: "pod-a".into(),
        host_network: false,
        network: None,
        dns: DnsConfig {
            nameservers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        },
        host_aliases: vec![],
        resources: Resources::default(),
        state_dir: env.state.path().join(id),
        cgroup_root: PathBuf::from("updraft-test"),
    }
}

pub fn container_spec(name: &str, rootfs: &Path, argv: &[&str]) -> ContainerSpec {
    ContainerSpec {
        name: name.to_owned(),
        rootfs: rootfs.to_path_buf(),
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        env: vec![("PATH".into(), "/bin".into())],
        working_dir: None,
        uid: 0,
        gid: 0,
        supplementary_groups: vec![],
        capabilities_add: vec![],
        capabilities_drop: vec![],
        read_only_rootfs: false,
        mounts: vec![],
        resources: Resources::default(),
        stdio: StdioMode::Pipes { stdin: false },
    }
}

/// Reads stdout and stderr to the end on blocking threads.
pub async fn collect(stdio: Stdio) -> (String, String) {
    let Stdio::Pipes { stdout, stderr, .. } = stdio else {
        panic!("expected pipes")
    };
    let read = |mut f: std::fs::File| {
        tokio::task::spawn_blocking(move || {
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            s
        })
    };
    let (o, e) = (read(stdout), read(stderr));
    (o.await.unwrap(), e.await.unwrap())
}

/// Runs a container to completion and returns its exit and output.
pub async fn run(sandbox: &PodSandbox, spec: ContainerSpec) -> (ContainerExit, String, String) {
    let (mut c, stdio) = Container::start(sandbox, spec).expect("start container");
    let out = tokio::time::timeout(Duration::from_secs(30), collect(stdio))
        .await
        .expect("output within 30 s");
    let exit = tokio::time::timeout(Duration::from_secs(30), c.wait())
        .await
        .expect("exit within 30 s")
        .expect("wait");
    c.stop(Duration::from_secs(1)).await.expect("stop");
    (exit, out.0, out.1)
}

/// Lines of /proc/self/mountinfo mentioning `needle`.
pub fn mounts_mentioning(needle: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let needle = needle.to_string_lossy().into_owned();
    text.lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_owned)
        .collect()
}

/// Asserts the sandbox left nothing behind: netns, cgroup dirs.
pub fn assert_sandbox_gone(id: &str) {
    assert!(
        !Path::new("/run/netns")
            .join(format!("updraft-{id}"))
            .exists(),
        "netns of {id} left behind"
    );
    for c in ["memory", "pids", "cpu", "cpuacct"] {
        let p = Path::new("/sys/fs/cgroup")
            .join(c)
            .join("updraft-test")
            .join(id);
        assert!(!p.exists(), "cgroup {} left behind", p.display());
    }
}
