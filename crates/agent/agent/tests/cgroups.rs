//! Resource limits enforced through this host's cgroups — v1 on the hybrid development
//! machine, v2 where the host is pure v2 — and the same test again inside a pure cgroup v2
//! virtual machine (QEMU/KVM with Debian's kernel, this host's root shared read-only over
//! 9p), so both drivers are proven on every machine that runs the suite.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The test run inside the VM (by name).
const LIMITS_TEST: &str = "memory_and_cpu_limits_hold_under_this_hosts_cgroups";

#[tokio::test]
async fn memory_and_cpu_limits_hold_under_this_hosts_cgroups() {
    let t = start_agent(Some(Duration::from_secs(1))).await;
    let c = &t.client;
    let version = c.version().await.unwrap().cgroup_version;
    if let Ok(expected) = std::env::var("UPDRAFT_EXPECT_CGROUP") {
        assert_eq!(version, expected, "the agent's cgroup driver");
    }
    let req = pod(r#"
metadata: {name: limits}
spec:
  restartPolicy: Never
  containers:
  - name: hog
    image: busybox
    command: [tail, /dev/zero]
    resources: {limits: {memory: 16Mi}}
  - name: spin
    image: busybox
    command: [sh, -c, 'while :; do :; done']
    resources: {limits: {cpu: 100m, memory: 32Mi}}
"#);
    c.apply_pod(&req).await.unwrap();
    let status = wait_status(c, "the hog OOMKilled, the spinner running", |s| {
        running(s, "spin")
            && container(s, "hog")
                .and_then(|h| h.state.as_ref())
                .is_some_and(|st| st.terminated.is_some())
    })
    .await;
    let term = container(&status, "hog")
        .and_then(|h| h.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .unwrap();
    assert_eq!(
        (term.reason.as_deref(), term.exit_code),
        (Some("OOMKilled"), 137),
        "cgroup {version}"
    );
    // The CPU limit throttles the busy loop; its memory is accounted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stats = c.stats().await.unwrap();
        let spin = stats.containers.iter().find(|s| s.name == "spin").unwrap();
        if spin.usage.cpu_throttled_periods > 0 && spin.usage.memory_usage_bytes > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cgroup {version}: never throttled: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("cgroup {version}: OOM kill and CPU throttling observed");
    t.finish().await;
}

/// The newest kernel image under /boot and its module directory.
fn kernel() -> Option<(PathBuf, PathBuf)> {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    let image = kernels.pop()?;
    let release = image
        .file_name()?
        .to_str()?
        .strip_prefix("vmlinuz-")?
        .to_owned();
    let modules = PathBuf::from("/lib/modules").join(release);
    modules.exists().then_some((image, modules))
}

fn pure_v2_host() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.contains(" /sys/fs/cgroup ") && l.contains(" - cgroup2 "))
}

/// Modules the VM's init loads, in dependency order: virtio PCI, 9p, overlayfs, veth, bridge.
const MODULES: [&str; 15] = [
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/netfs/netfs",
    "fs/fscache/fscache",
    "fs/9p/9p",
    "fs/overlayfs/overlay",
    "drivers/net/veth",
    "net/llc/llc",
    "net/802/stp",
    "net/bridge/bridge",
];

/// An initramfs whose init mounts this host's root read-only over 9p and switches to it,
/// running `stage2` there.
fn initramfs(dir: &Path, modules: &Path, stage2: &Path) -> PathBuf {
    let root = dir.join("initramfs");
    for d in ["bin", "modules", "proc", "dev", "newroot"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let mut insmods = String::new();
    for m in MODULES {
        let name = Path::new(m).file_name().unwrap().to_str().unwrap();
        let src = modules.join("kernel").join(format!("{m}.ko"));
        if src.exists() {
            std::fs::copy(&src, root.join("modules").join(format!("{name}.ko"))).unwrap();
            insmods.push_str(&format!("/bin/busybox insmod /modules/{name}.ko\n"));
        }
        // Otherwise built into this kernel (or absent: the 9p mount below says so).
    }
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t devtmpfs dev /dev\n\
         exec </dev/console >/dev/console 2>&1\n\
         /bin/busybox mount -t proc proc /proc\n\
         {insmods}\
         /bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /newroot \
           || {{ echo 'UPDRAFT-VM: mounting the host root over 9p failed'; /bin/busybox poweroff -f; }}\n\
         /bin/busybox umount /proc\n\
         /bin/busybox mount --move /dev /newroot/dev\n\
         exec /bin/busybox switch_root /newroot /bin/busybox sh {}\n",
        stage2.display()
    );
    let init_path = root.join("init");
    std::fs::write(&init_path, init).unwrap();
    std::fs::set_permissions(
        &init_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = dir.join("initramfs.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | /bin/busybox cpio -o -H newc > {}",
            root.display(),
            out.display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "building the initramfs");
    out
}

#[test]
fn memory_and_cpu_limits_hold_in_a_pure_cgroup_v2_vm() {
    require_root();
    if pure_v2_host() {
        println!("this host is pure cgroup v2: {LIMITS_TEST} proves v2 here");
        return;
    }
    let qemu = "qemu-system-x86_64";
    let (kernel, modules) = kernel().unwrap_or_else(|| {
        panic!("no kernel under /boot with modules: apt-get install linux-image-amd64 (xtask/apt-packages.txt)")
    });
    assert!(
        Command::new(qemu)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "{qemu} missing: apt-get install qemu-system-x86 (xtask/apt-packages.txt)"
    );
    // Outside /tmp: the VM mounts a fresh tmpfs there.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let exe = std::env::current_exe().unwrap();
    let stage2 = dir.path().join("stage2.sh");
    std::fs::write(
        &stage2,
        format!(
            "B=/bin/busybox\n\
             $B mount -t proc proc /proc\n\
             $B mount -t sysfs sys /sys\n\
             $B mkdir -p /dev/pts /dev/shm\n\
             $B mount -t devpts devpts /dev/pts\n\
             $B mount -t tmpfs shm /dev/shm\n\
             $B mount -t tmpfs tmp /tmp\n\
             $B mount -t tmpfs run /run\n\
             $B mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
             echo \"UPDRAFT-VM: cgroup controllers: $($B cat /sys/fs/cgroup/cgroup.controllers)\"\n\
             $B ip link set lo up\n\
             cd /tmp\n\
             HOME=/tmp PATH=/usr/sbin:/usr/bin:/sbin:/bin UPDRAFT_EXPECT_CGROUP=v2 RUST_BACKTRACE=1 \
               {} --exact {LIMITS_TEST} --nocapture --test-threads=1\n\
             echo \"UPDRAFT-VM-EXIT=$?\"\n\
             $B poweroff -f\n",
            exe.display()
        ),
    )
    .unwrap();
    let initrd = initramfs(dir.path(), &modules, &stage2);
    // KVM only when asked: nested under another hypervisor (this development machine is a
    // Firecracker guest) the kernel hangs before its first message; TCG always works.
    let kvm = std::env::var("UPDRAFT_VM_KVM").is_ok_and(|v| v == "1");
    let mut cmd = Command::new(qemu);
    if kvm {
        cmd.args(["-enable-kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]);
    }
    cmd.args([
        "-m",
        "2048",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
    ])
    .arg("-kernel")
    .arg(&kernel)
    .arg("-initrd")
    .arg(&initrd)
    .args([
        "-append",
        "console=ttyS0 loglevel=3 panic=-1 rdinit=/init",
        "-fsdev",
        "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device",
        "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut vm = cmd.spawn().unwrap();
    let mut stdout = vm.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    });
    let deadline = Instant::now() + Duration::from_secs(if kvm { 300 } else { 1500 });
    let exited = loop {
        if let Some(status) = vm.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = vm.kill();
            let _ = vm.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut stderr = String::new();
    let _ = vm.stderr.take().unwrap().read_to_string(&mut stderr);
    let console = reader.join().unwrap();
    // The console only when something went wrong: its inner libtest summary would otherwise
    // sit among this binary's own output.
    let report = format!("VM console:\n{console}\nqemu stderr: {stderr}");
    assert!(exited.is_some(), "the VM did not finish in time; {report}");
    assert!(
        console.contains("UPDRAFT-VM: cgroup controllers:") && console.contains("memory"),
        "the VM has no cgroup v2 memory controller; {report}"
    );
    assert!(
        console.contains("UPDRAFT-VM-EXIT=0") && console.contains("cgroup v2: OOM kill"),
        "the limits test failed inside the cgroup v2 VM; {report}"
    );
    for line in console
        .lines()
        .filter(|l| l.contains("UPDRAFT-VM") || l.contains("cgroup v2:"))
    {
        println!(
            "{}",
            line.trim_start_matches(|c: char| c != 'U' && c != 'c')
        );
    }
}
