//! Containers: processes in their own mount, PID, UTS and IPC namespaces, in the pod's netns,
//! pivot_root'ed into a prepared rootfs, limited by a cgroup; plus `exec` into them.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Pid, Uid, pipe2};

use crate::caps;
use crate::cgroup::{Cgroup, CgroupStats, Resources};
use crate::child::{self, ChildPlan, ChildStdio, FsOp, RootPlan};
use crate::error::{Error, Result, io, sys};
use crate::process::{ExitStatus, Process};
use crate::sandbox::PodSandbox;

/// A bind mount of a host path (a volume) into the container.
#[derive(Debug, Clone)]
pub struct BindMount {
    /// Host path (file or directory).
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub destination: PathBuf,
    /// Mount read-only.
    pub read_only: bool,
}

/// How the process's stdin/stdout/stderr are connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StdioMode {
    /// All three on /dev/null.
    Null,
    /// Pipes for stdout and stderr, and for stdin if `stdin`.
    Pipes {
        /// Give the process a stdin pipe (else /dev/null).
        stdin: bool,
    },
    /// A pseudo-terminal of this initial size.
    Tty {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Named pipes (created if missing), opened read-write for the process so it never sees
    /// EPIPE or EOF while nobody reads: the caller (the agent) opens them itself and can reopen
    /// them after a restart, with unread output still in the pipe. `stdin: None` = /dev/null.
    Fifos {
        /// FIFO for stdin.
        stdin: Option<PathBuf>,
        /// FIFO for stdout.
        stdout: PathBuf,
        /// FIFO for stderr.
        stderr: PathBuf,
    },
}

/// Creates the FIFO at `path` unless a FIFO is already there.
pub fn ensure_fifo(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_fifo() => Ok(()),
        Ok(_) => Err(Error::InvalidSpec(format!(
            "{} exists and is not a FIFO",
            path.display()
        ))),
        Err(_) => nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(sys("mkfifo")),
    }
}

/// The caller's ends of the process's stdio.
#[derive(Debug)]
pub enum Stdio {
    /// Nothing to read or write.
    Null,
    /// Pipe ends.
    Pipes {
        /// Write end of stdin, if requested.
        stdin: Option<File>,
        /// Read end of stdout.
        stdout: File,
        /// Read end of stderr.
        stderr: File,
    },
    /// The pty master.
    Tty(Pty),
}

/// The master side of a container's terminal.
#[derive(Debug)]
pub struct Pty {
    master: File,
}

mod ioctl {
    nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, libc::winsize);
}

impl Pty {
    /// The master, for reading output and writing input.
    pub fn master(&self) -> &File {
        &self.master
    }

    /// Resizes the terminal (the foreground process gets SIGWINCH).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which points to a live local.
        #[allow(unsafe_code)]
        unsafe { ioctl::set_winsize(self.master.as_raw_fd(), &ws) }
            .map(drop)
            .map_err(sys("TIOCSWINSZ"))
    }
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// Container name, unique in the pod; `[a-z0-9-]`, ≤ 63 (cgroup directory name).
    pub name: String,
    /// The prepared root filesystem directory.
    pub rootfs: PathBuf,
    /// Program and arguments; a program without `/` is searched in the `PATH` of `env`.
    pub argv: Vec<String>,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Working directory inside the container (default `/`).
    pub working_dir: Option<String>,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    pub supplementary_groups: Vec<u32>,
    /// Capabilities added to the default set (names with or without `CAP_`, or `ALL`).
    pub capabilities_add: Vec<String>,
    /// Capabilities dropped from the default set.
    pub capabilities_drop: Vec<String>,
    /// Mount the rootfs read-only.
    pub read_only_rootfs: bool,
    /// Volume mounts.
    pub mounts: Vec<BindMount>,
    /// Container limits.
    pub resources: Resources,
    /// Stdio wiring.
    pub stdio: StdioMode,
}

/// Why the container stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// Exit code 0.
    Completed,
    /// Non-zero exit or killed by a signal.
    Error,
    /// The kernel OOM killer killed a process of the container.
    OomKilled,
    /// An adopted container ended; its exit status could not be known.
    Unknown,
}

/// Final state of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerExit {
    /// How the init process ended.
    pub status: ExitStatus,
    /// Classification as Kubernetes reports it.
    pub reason: ExitReason,
}

/// A started container; dropping it kills everything in it and removes its cgroup.
#[derive(Debug)]
pub struct Container {
    name: String,
    init: Process,
    cgroup: Cgroup,
    exit: Option<ContainerExit>,
}

/// A process started by [`Container::exec`].
#[derive(Debug)]
pub struct ExecProcess {
    process: Process,
}

impl ExecProcess {
    /// Waits for the exec'd process to exit.
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        self.process.wait().await
    }

    /// SIGKILLs the process (its reaping is left to [`Self::wait`] or drop).
    pub fn kill(&self) -> Result<()> {
        self.process.signal(Signal::SIGKILL)
    }
}

/// Options of [`Container::exec`].
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Working directory (default `/`).
    pub working_dir: Option<String>,
    /// Stdio wiring.
    pub stdio: StdioMode,
}

fn cstr(field: &str, s: impl AsRef<[u8]>) -> Result<CString> {
    CString::new(s.as_ref().to_vec())
        .map_err(|_| Error::InvalidSpec(format!("{field} contains a NUL byte")))
}

fn path_cstr(field: &str, p: &Path) -> Result<CString> {
    cstr(field, p.as_os_str().as_encoded_bytes())
}

/// Joins an absolute in-container path onto `root`, refusing `..` so it cannot escape.
fn under_root(root: &Path, inner: &Path) -> Result<PathBuf> {
    if !inner.is_absolute()
        || inner
            .components()
            .any(|c| matches!(c, Component::ParentDir))
    {
        return Err(Error::InvalidSpec(format!(
            "container path {} must be absolute without ..",
            inner.display()
        )));
    }
    Ok(root.join(inner.strip_prefix("/").unwrap_or(inner)))
}

fn cloexec_pipe() -> Result<(OwnedFd, OwnedFd)> {
    pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe2"))
}

/// Builds argv/env/exec candidates; `PATH` comes from `env` or the usual default.
fn exec_strings(
    argv: &[String],
    env: &[(String, String)],
) -> Result<(Vec<CString>, Vec<CString>, Vec<CString>)> {
    let Some(program) = argv.first().filter(|p| !p.is_empty()) else {
        return Err(Error::InvalidSpec("argv must name a program".into()));
    };
    let c_argv = argv
        .iter()
        .map(|a| cstr("argv", a))
        .collect::<Result<Vec<_>>>()?;
    let c_env = env
        .iter()
        .map(|(k, v)| cstr("env", format!("{k}={v}")))
        .collect::<Result<Vec<_>>>()?;
    let path = env.iter().find(|(k, _)| k == "PATH").map_or(
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        |(_, v)| v.as_str(),
    );
    let candidates = if program.contains('/') {
        vec![cstr("argv", program)?]
    } else {
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| cstr("PATH", format!("{d}/{program}")))
            .collect::<Result<_>>()?
    };
    Ok((c_argv, c_env, candidates))
}

/// Creates the stdio of the child and the caller's ends.
fn make_stdio(mode: &StdioMode) -> Result<(ChildStdio, Stdio)> {
    let null = || -> Result<OwnedFd> {
        Ok(OwnedFd::from(
            File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(io("open", "/dev/null"))?,
        ))
    };
    match mode {
        StdioMode::Null => Ok((ChildStdio::Fds([null()?, null()?, null()?]), Stdio::Null)),
        StdioMode::Fifos {
            stdin,
            stdout,
            stderr,
        } => {
            let open_rw = |p: &Path| -> Result<OwnedFd> {
                ensure_fifo(p)?;
                Ok(OwnedFd::from(
                    File::options()
                        .read(true)
                        .write(true)
                        .open(p)
                        .map_err(io("open fifo", p))?,
                ))
            };
            let stdin = match stdin {
                Some(p) => open_rw(p)?,
                None => null()?,
            };
            Ok((
                ChildStdio::Fds([stdin, open_rw(stdout)?, open_rw(stderr)?]),
                Stdio::Null,
            ))
        }
        StdioMode::Pipes { stdin } => {
            let (in_child, in_parent) = if *stdin {
                let (r, w) = cloexec_pipe()?;
                (r, Some(File::from(w)))
            } else {
                (null()?, None)
            };
            let (out_r, out_w) = cloexec_pipe()?;
            let (err_r, err_w) = cloexec_pipe()?;
            Ok((
                ChildStdio::Fds([in_child, out_w, err_w]),
                Stdio::Pipes {
                    stdin: in_parent,
                    stdout: File::from(out_r),
                    stderr: File::from(err_r),
                },
            ))
        }
        StdioMode::Tty { rows, cols } => {
            let ws = nix::pty::Winsize {
                ws_row: *rows,
                ws_col: *cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pty = nix::pty::openpty(Some(&ws), None).map_err(sys("openpty"))?;
            for fd in [&pty.master, &pty.slave] {
                nix::fcntl::fcntl(
                    fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                )
                .map_err(sys("fcntl"))?;
            }
            Ok((
                ChildStdio::Tty(pty.slave),
                Stdio::Tty(Pty {
                    master: File::from(pty.master),
                }),
            ))
        }
    }
}

/// The filesystem plan: rootfs bind, /proc, minimal /dev, read-only /sys, etc files, volumes.
fn root_plan(sandbox: &PodSandbox, spec: &ContainerSpec) -> Result<RootPlan> {
    let root = std::fs::canonicalize(&spec.rootfs).map_err(io("resolve rootfs", &spec.rootfs))?;
    let at = |p: &str| -> Result<CString> { path_cstr("path", &root.join(p)) };
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    // Mount points in the rootfs are created by the parent; those under the /dev tmpfs by the child.
    for dir in ["proc", "dev", "sys", "etc"] {
        std::fs::create_dir_all(root.join(dir)).map_err(io("create directory", root.join(dir)))?;
    }
    let mount = |src: Option<&str>,
                 target: CString,
                 fstype: Option<&str>,
                 flags: MsFlags,
                 data: Option<&str>|
     -> Result<FsOp> {
        Ok(FsOp::Mount {
            src: src.map(|s| cstr("mount source", s)).transpose()?,
            target,
            fstype: fstype.map(|s| cstr("fstype", s)).transpose()?,
            flags,
            data: data.map(|s| cstr("mount data", s)).transpose()?,
        })
    };
    let mut ops = vec![
        mount(
            Some("proc"),
            at("proc")?,
            Some("proc"),
            nosuid_nodev_noexec,
            None,
        )?,
        mount(
            Some("tmpfs"),
            at("dev")?,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
            Some("mode=755,size=65536k"),
        )?,
    ];
    for dev in ["null", "zero", "full", "random", "urandom", "tty"] {
        ops.push(FsOp::CreateFile(at(&format!("dev/{dev}"))?));
        ops.push(mount(
            Some(&format!("/dev/{dev}")),
            at(&format!("dev/{dev}"))?,
            None,
            MsFlags::MS_BIND,
            None,
        )?);
    }
    ops.push(FsOp::Mkdir(at("dev/pts")?));
    ops.push(mount(
        Some("devpts"),
        at("dev/pts")?,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?);
    ops.push(FsOp::Mkdir(at("dev/shm")?));
    ops.push(mount(
        Some("shm"),
        at("dev/shm")?,
        Some("tmpfs"),
        nosuid_nodev_noexec,
        Some("mode=1777,size=65536k"),
    )?);
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ops.push(FsOp::Symlink {
            target: cstr("symlink", target)?,
            link: at(&format!("dev/{link}"))?,
        });
    }
    ops.push(mount(
        Some("sysfs"),
        at("sys")?,
        Some("sysfs"),
        nosuid_nodev_noexec | MsFlags::MS_RDONLY,
        None,
    )?);
    for name in ["hosts", "resolv.conf", "hostname"] {
        let target = root.join("etc").join(name);
        if std::fs::symlink_metadata(&target).is_err() {
            File::create(&target).map_err(io("create", &target))?;
        }
        let src = path_cstr("etc file", &sandbox.etc_file(name))?;
        ops.push(FsOp::Mount {
            src: Some(src),
            target: path_cstr("etc file", &target)?,
            fstype: None,
            flags: MsFlags::MS_BIND,
            data: None,
        });
    }
    for m in &spec.mounts {
        let target = under_root(&root, &m.destination)?;
        let meta = std::fs::metadata(&m.source).map_err(io("stat volume source", &m.source))?;
        if meta.is_dir() {
            std::fs::create_dir_all(&target).map_err(io("create directory", &target))?;
        } else if std::fs::symlink_metadata(&target).is_err() {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io("create directory", parent))?;
            }
            File::create(&target).map_err(io("create", &target))?;
        }
        let t = path_cstr("mount destination", &target)?;
        if m.destination.starts_with("/dev") {
            // /dev is a tmpfs mounted by the child: the mount point must be made there.
            ops.push(if meta.is_dir() {
                FsOp::Mkdir(t.clone())
            } else {
                FsOp::CreateFile(t.clone())
            });
        }
        ops.push(FsOp::Mount {
            src: Some(path_cstr("mount source", &m.source)?),
            target: t.clone(),
            fstype: None,
            flags: MsFlags::MS_BIND | MsFlags::MS_REC,
            data: None,
        });
        if m.read_only {
            ops.push(FsOp::RemountReadOnly {
                target: t,
                flags: MsFlags::empty(),
            });
        }
    }
    Ok(RootPlan {
        root: path_cstr("rootfs", &root)?,
        ops,
        readonly: spec.read_only_rootfs,
    })
}

fn read_report(err_read: OwnedFd) -> Result<()> {
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut File::from(err_read), &mut buf)
        .map_err(io("read", "setup pipe"))?;
    child::decode_report(&buf)
}

const STACK_SIZE: usize = 1 << 20;

impl Container {
    /// Starts the container in `sandbox`. Returns the container and the caller's stdio ends.
    /// Needs a tokio runtime (exit is awaited through a pidfd).
    pub fn start(sandbox: &PodSandbox, spec: ContainerSpec) -> Result<(Self, Stdio)> {
        if spec.name.is_empty()
            || spec.name.len() > 63
            || !spec
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(Error::InvalidSpec(format!(
                "container name {:?} must be 1-63 of [a-z0-9-]",
                spec.name
            )));
        }
        let (argv, env, exec_candidates) = exec_strings(&spec.argv, &spec.env)?;
        let cap_drop = caps::to_drop(
            &spec.capabilities_add,
            &spec.capabilities_drop,
            caps::last_cap(),
        )?;
        let root = root_plan(sandbox, &spec)?;
        let cgroup = sandbox.cgroup().child(&spec.name)?;
        cgroup.apply(&spec.resources)?;
        let (child_stdio, stdio) = make_stdio(&spec.stdio)?;
        let (sync_read, sync_write) = cloexec_pipe()?;
        let (err_read, err_write) = cloexec_pipe()?;
        let netns = sandbox.netns().try_clone().map_err(io("dup", "netns"))?;
        let plan = ChildPlan {
            join_ns: vec![(OwnedFd::from(netns), CloneFlags::CLONE_NEWNET)],
            root: Some(root),
            hostname: Some(sandbox.hostname().into()),
            stdio: child_stdio,
            cap_drop,
            uid: Uid::from_raw(spec.uid),
            gid: Gid::from_raw(spec.gid),
            groups: spec
                .supplementary_groups
                .iter()
                .map(|g| Gid::from_raw(*g))
                .collect(),
            cwd: cstr("working dir", spec.working_dir.as_deref().unwrap_or("/"))?,
            exec_candidates,
            argv_ptrs: child::pointer_array(&argv),
            env_ptrs: child::pointer_array(&env),
            argv,
            env,
            sync_read,
            err_write,
            pid_write: None,
        };
        let mut stack = vec![0u8; STACK_SIZE];
        let flags = CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC;
        let cb = Box::new(|| child::run(&plan));
        // SAFETY: the child only makes async-signal-safe calls on data prepared above (see
        // child.rs); without CLONE_VM it runs on its own copy of `stack`.
        #[allow(unsafe_code)]
        let pid = unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) }
            .map_err(sys("clone"))?;
        drop(plan);
        let init = Process::watch(pid);
        let init = match init {
            Ok(p) => p,
            Err(e) => {
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(pid, None);
                return Err(e);
            }
        };
        let container = Self {
            name: spec.name,
            init,
            cgroup,
            exit: None,
        };
        // Join the cgroup before the child runs anything of its own.
        container.cgroup.add(pid)?;
        nix::unistd::write(&sync_write, &[1]).map_err(sys("write sync pipe"))?;
        drop(sync_write);
        read_report(err_read)?;
        Ok((container, stdio))
    }

    /// Takes over a container started by an earlier instance of the agent: `pid` is its init
    /// process, found again by the caller (same PID and start time). The process is not our
    /// child, so its exit is noticed (pidfd) but its exit status is unknown: [`Container::wait`]
    /// then reports `ExitStatus::Unknown` (or OOMKilled from the cgroup).
    pub fn adopt(sandbox: &PodSandbox, name: &str, pid: Pid) -> Result<Self> {
        let init = Process::watch_foreign(pid)?;
        let cgroup = sandbox.cgroup().child(name)?;
        Ok(Self {
            name: name.to_owned(),
            init,
            cgroup,
            exit: None,
        })
    }

    /// Leaves the container running when this handle is dropped (the agent exits without
    /// stopping its pod; a later instance adopts it). Returns the init PID.
    pub fn detach(mut self) -> Pid {
        let pid = self.init.pid();
        self.exit = Some(ContainerExit {
            status: ExitStatus::Unknown,
            reason: ExitReason::Error,
        });
        self.init.forget();
        self.cgroup.keep();
        pid
    }

    /// Container name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Host PID of the container's init process.
    pub fn pid(&self) -> Pid {
        self.init.pid()
    }

    /// Waits for the init process to exit; classifies OOM kills.
    pub async fn wait(&mut self) -> Result<ContainerExit> {
        if let Some(exit) = self.exit {
            return Ok(exit);
        }
        let status = self.init.wait().await?;
        let reason = if self.cgroup.oom_kills().unwrap_or(0) > 0 {
            ExitReason::OomKilled
        } else if status == ExitStatus::Unknown {
            ExitReason::Unknown
        } else if status == ExitStatus::Exited(0) {
            ExitReason::Completed
        } else {
            ExitReason::Error
        };
        Ok(*self.exit.insert(ContainerExit { status, reason }))
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL everything in the container's cgroup; then
    /// removes the cgroup. The PID namespace dies with its init, taking exec'd processes along.
    pub async fn stop(mut self, grace: Duration) -> Result<ContainerExit> {
        if self.exit.is_none() {
            self.init.signal(Signal::SIGTERM)?;
            if tokio::time::timeout(grace, self.init.wait()).await.is_err() {
                self.init.signal(Signal::SIGKILL)?;
            }
        }
        let exit = self.wait().await?;
        self.cgroup.remove()?;
        Ok(exit)
    }

    /// Usage of the container's cgroup.
    pub fn stats(&self) -> Result<CgroupStats> {
        self.cgroup.stats()
    }

    /// Host PIDs currently in the container's cgroup.
    pub fn procs(&self) -> Result<Vec<Pid>> {
        self.cgroup.procs()
    }

    /// Starts a new process inside the running container: its mount, PID, UTS, IPC and network
    /// namespaces and its cgroup, as root with the container's environment given in `spec`.
    pub fn exec(&self, spec: ExecSpec) -> Result<(ExecProcess, Stdio)> {
        if self.exit.is_some() || self.init.status().is_some() {
            return Err(Error::InvalidSpec(format!(
                "container {} is not running",
                self.name
            )));
        }
        self.exec_target().exec(spec)
    }

    /// A handle for starting processes in this container from other tasks while the owner of
    /// the [`Container`] waits for it.
    pub fn exec_target(&self) -> ExecTarget {
        ExecTarget {
            name: self.name.clone(),
            pid: self.init.pid(),
            cgroup_procs: self.cgroup.procs_files(),
        }
    }
}

/// Where [`ExecTarget::exec`] starts processes: a running container's namespaces and cgroup.
#[derive(Debug, Clone)]
pub struct ExecTarget {
    name: String,
    pid: Pid,
    cgroup_procs: Vec<PathBuf>,
}

impl ExecTarget {
    /// Host PID of the container's init process.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Starts a new process inside the container (see [`Container::exec`]). Fails with
    /// `InvalidSpec` when the container is gone.
    pub fn exec(&self, spec: ExecSpec) -> Result<(ExecProcess, Stdio)> {
        let (argv, env, exec_candidates) = exec_strings(&spec.argv, &spec.env)?;
        let pid = self.pid;
        if !Path::new(&format!("/proc/{pid}/ns")).exists() {
            return Err(Error::InvalidSpec(format!(
                "container {} is not running",
                self.name
            )));
        }
        // Order matters: the user-visible namespaces first, mount last (paths resolve in it).
        let mut join_ns = Vec::new();
        for (name, kind) in [
            ("ipc", CloneFlags::CLONE_NEWIPC),
            ("uts", CloneFlags::CLONE_NEWUTS),
            ("net", CloneFlags::CLONE_NEWNET),
            ("pid", CloneFlags::CLONE_NEWPID),
            ("mnt", CloneFlags::CLONE_NEWNS),
        ] {
            let path = format!("/proc/{pid}/ns/{name}");
            join_ns.push((
                OwnedFd::from(File::open(&path).map_err(io("open", &path))?),
                kind,
            ));
        }
        let (child_stdio, stdio) = make_stdio(&spec.stdio)?;
        let (sync_read, sync_write) = cloexec_pipe()?;
        let (err_read, err_write) = cloexec_pipe()?;
        let (pid_read, pid_write) = cloexec_pipe()?;
        let mut plan = ChildPlan {
            join_ns,
            root: None,
            hostname: None,
            stdio: child_stdio,
            cap_drop: Vec::new(),
            uid: Uid::from_raw(0),
            gid: Gid::from_raw(0),
            groups: Vec::new(),
            cwd: cstr("working dir", spec.working_dir.as_deref().unwrap_or("/"))?,
            exec_candidates,
            argv_ptrs: child::pointer_array(&argv),
            env_ptrs: child::pointer_array(&env),
            argv,
            env,
            sync_read,
            err_write,
            pid_write: Some(pid_write),
        };
        let mut stack = vec![0u8; STACK_SIZE];
        let mut inner_stack = vec![0u8; STACK_SIZE];
        let cb = Box::new(|| child::run_via_intermediate(&mut plan, &mut inner_stack));
        // SAFETY: as in `start`; the intermediate child is single-threaded, so it may setns
        // into the mount namespace and clone again.
        #[allow(unsafe_code)]
        let mid =
            unsafe { nix::sched::clone(cb, &mut stack, CloneFlags::empty(), Some(libc::SIGCHLD)) }
                .map_err(sys("clone"))?;
        drop(plan);
        // The intermediate exits right after cloning; reaping it is immediate.
        let _ = nix::sys::wait::waitpid(mid, None);
        // Read exactly the PID: the exec'd process still holds the write end until it execs,
        // which it only does after we release it, so waiting for EOF here would deadlock.
        let mut buf = [0u8; 4];
        let got = std::io::Read::read_exact(&mut File::from(pid_read), &mut buf).is_ok();
        let buf: &[u8] = if got { &buf } else { &[] };
        let Some(exec_pid) = child::pid_from_bytes(buf) else {
            drop(sync_write);
            read_report(err_read)?;
            return Err(Error::Setup {
                stage: "clone",
                errno: nix::errno::Errno::ECHILD,
            });
        };
        let process = Process::watch(exec_pid)?;
        for procs in &self.cgroup_procs {
            std::fs::write(procs, exec_pid.to_string()).map_err(io("write", procs))?;
        }
        nix::unistd::write(&sync_write, &[1]).map_err(sys("write sync pipe"))?;
        drop(sync_write);
        read_report(err_read)?;
        Ok((ExecProcess { process }, stdio))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.init.signal(Signal::SIGKILL);
        }
        // Cgroup's own Drop kills the rest and removes the directories.
    }
}
