//! What runs in the cloned child between `clone` and `execve`.
//!
//! Everything the child needs is prepared by the parent (C strings, fds, a list of mount
//! operations), because after `clone` in a multi-threaded program only async-signal-safe calls
//! are allowed: the child allocates nothing. A failing step writes `(stage, errno)` to a
//! close-on-exec pipe; a successful `execve` closes it, which the parent reads as success.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns};
use nix::unistd::{Gid, Pid, Uid, chdir, dup2_raw, pivot_root, read, sethostname, setsid, write};

use crate::error::{Error, Result};

/// Names of the setup steps, indexed by the stage number the child reports.
pub(crate) const STAGES: [&str; 17] = [
    "wait for parent",
    "setns",
    "make mounts private",
    "mount",
    "mkdir",
    "create file",
    "symlink",
    "remount read-only",
    "pivot_root",
    "detach old root",
    "sethostname",
    "setsid",
    "stdio",
    "drop capabilities",
    "set user/groups",
    "chdir",
    "execve",
];

/// One filesystem step performed inside the new mount namespace, before `pivot_root`.
#[derive(Debug)]
pub(crate) enum FsOp {
    Mount {
        src: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: MsFlags,
        data: Option<CString>,
    },
    RemountReadOnly {
        target: CString,
        flags: MsFlags,
    },
    Mkdir(CString),
    CreateFile(CString),
    Symlink {
        target: CString,
        link: CString,
    },
}

/// Root filesystem switch.
#[derive(Debug)]
pub(crate) struct RootPlan {
    pub root: CString,
    pub ops: Vec<FsOp>,
    pub readonly: bool,
}

/// The child's stdio.
#[derive(Debug)]
pub(crate) enum ChildStdio {
    /// fds to dup onto 0, 1, 2 (`None` = /dev/null was opened by the parent for it).
    Fds([OwnedFd; 3]),
    /// The pty slave, made the controlling terminal and dup'ed onto 0, 1, 2.
    Tty(OwnedFd),
}

/// Everything the child does, prepared in advance.
#[derive(Debug)]
pub(crate) struct ChildPlan {
    pub join_ns: Vec<(OwnedFd, CloneFlags)>,
    pub root: Option<RootPlan>,
    pub hostname: Option<std::ffi::OsString>,
    pub stdio: ChildStdio,
    pub cap_drop: Vec<u32>,
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
    pub cwd: CString,
    pub exec_candidates: Vec<CString>,
    /// Owns the strings `argv_ptrs` points into.
    #[allow(dead_code)]
    pub argv: Vec<CString>,
    /// Owns the strings `env_ptrs` points into.
    #[allow(dead_code)]
    pub env: Vec<CString>,
    pub argv_ptrs: Vec<*const libc::c_char>,
    pub env_ptrs: Vec<*const libc::c_char>,
    pub sync_read: OwnedFd,
    pub err_write: OwnedFd,
    pub pid_write: Option<OwnedFd>,
}

fn report(fd: RawFd, stage: usize, errno: Errno) -> isize {
    let mut buf = [0u8; 8];
    buf[..4].copy_from_slice(&(stage as u32).to_ne_bytes());
    buf[4..].copy_from_slice(&(errno as i32).to_ne_bytes());
    // SAFETY-free: borrowing a raw fd we own for the duration of the call.
    let _ = write(borrow(fd), &buf);
    127
}

fn borrow(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only used on fds owned by the plan, which outlives the child's use of them.
    #[allow(unsafe_code)]
    unsafe {
        std::os::fd::BorrowedFd::borrow_raw(fd)
    }
}

macro_rules! step {
    ($plan:expr, $stage:expr, $e:expr) => {
        if let Err(errno) = $e {
            return report($plan.err_write.as_raw_fd(), $stage, errno);
        }
    };
}

/// Runs in the child of `clone`: wait for the parent, then namespaces, filesystem, identity,
/// exec. Returns only on failure (the exit code).
pub(crate) fn run(plan: &ChildPlan) -> isize {
    let mut byte = [0u8; 1];
    step!(
        plan,
        0,
        match read(&plan.sync_read, &mut byte) {
            Ok(1) => Ok(()),
            Ok(_) => Err(Errno::EPIPE),
            Err(e) => Err(e),
        }
    );
    for (fd, kind) in &plan.join_ns {
        step!(plan, 1, setns(fd, *kind));
    }
    if let Some(root) = &plan.root {
        step!(
            plan,
            2,
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>
            )
        );
        // pivot_root needs the new root to be a mount point.
        step!(
            plan,
            3,
            mount(
                Some(root.root.as_c_str()),
                root.root.as_c_str(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>
            )
        );
        for op in &root.ops {
            match op {
                FsOp::Mount {
                    src,
                    target,
                    fstype,
                    flags,
                    data,
                } => {
                    step!(
                        plan,
                        3,
                        mount(
                            src.as_deref(),
                            target.as_c_str(),
                            fstype.as_deref(),
                            *flags,
                            data.as_deref()
                        )
                    );
                }
                FsOp::RemountReadOnly { target, flags } => {
                    step!(
                        plan,
                        7,
                        mount(
                            None::<&str>,
                            target.as_c_str(),
                            None::<&str>,
                            *flags | MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
                            None::<&str>
                        )
                    );
                }
                FsOp::Mkdir(path) => {
                    step!(
                        plan,
                        4,
                        nix::unistd::mkdir(
                            path.as_c_str(),
                            nix::sys::stat::Mode::from_bits_truncate(0o755)
                        )
                    );
                }
                FsOp::CreateFile(path) => {
                    step!(
                        plan,
                        5,
                        nix::fcntl::open(
                            path.as_c_str(),
                            nix::fcntl::OFlag::O_CREAT
                                | nix::fcntl::OFlag::O_WRONLY
                                | nix::fcntl::OFlag::O_CLOEXEC,
                            nix::sys::stat::Mode::from_bits_truncate(0o644)
                        )
                        .map(drop)
                    );
                }
                FsOp::Symlink { target, link } => {
                    step!(
                        plan,
                        6,
                        nix::unistd::symlinkat(
                            target.as_c_str(),
                            nix::fcntl::AT_FDCWD,
                            link.as_c_str()
                        )
                    );
                }
            }
        }
        step!(plan, 8, chdir(root.root.as_c_str()));
        // pivot_root(".", "."): the old root ends up stacked under the new one and is detached.
        step!(plan, 8, pivot_root(".", "."));
        step!(plan, 9, umount2(".", MntFlags::MNT_DETACH));
        step!(plan, 8, chdir("/"));
        if root.readonly {
            step!(
                plan,
                7,
                mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
                    None::<&str>
                )
            );
        }
    }
    if let Some(name) = &plan.hostname {
        step!(plan, 10, sethostname(name));
    }
    step!(plan, 11, setsid().map(drop));
    match &plan.stdio {
        ChildStdio::Fds(fds) => {
            for (target, fd) in fds.iter().enumerate() {
                step!(plan, 12, dup_onto(fd.as_raw_fd(), target as RawFd));
            }
        }
        ChildStdio::Tty(slave) => {
            // SAFETY: TIOCSCTTY takes an int argument, no memory; slave is a valid tty fd.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
            step!(plan, 12, Errno::result(rc).map(drop));
            for target in 0..3 {
                step!(plan, 12, dup_onto(slave.as_raw_fd(), target));
            }
        }
    }
    for cap in &plan.cap_drop {
        // SAFETY: PR_CAPBSET_DROP takes integer arguments only.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(*cap), 0, 0, 0) };
        step!(plan, 13, Errno::result(rc).map(drop));
    }
    // Raw syscalls: glibc's wrappers broadcast credential changes to all threads it believes
    // exist, and in a cloned child of a multi-threaded parent those threads are gone (deadlock).
    let (uid, gid) = (
        libc::c_long::from(plan.uid.as_raw()),
        libc::c_long::from(plan.gid.as_raw()),
    );
    // SAFETY: setgroups reads `len` gid_t values from a pointer into the plan's live Vec.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::syscall(libc::SYS_setgroups, plan.groups.len(), plan.groups.as_ptr()) };
    step!(plan, 14, Errno::result(rc).map(drop));
    // SAFETY: integer arguments only.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) };
    step!(plan, 14, Errno::result(rc).map(drop));
    // SAFETY: integer arguments only.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
    step!(plan, 14, Errno::result(rc).map(drop));
    step!(plan, 15, chdir(plan.cwd.as_c_str()));
    // Rust's runtime ignores SIGPIPE in this process, and an ignored disposition survives
    // execve: the container's processes must get the default, or a writer into a closed pipe
    // (`yes | head`) spins on EPIPE forever instead of dying.
    // SAFETY: sigaction with a constant disposition is async-signal-safe; no memory is passed.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL)
    };
    let mut last = Errno::ENOENT;
    for path in &plan.exec_candidates {
        // nix's execve allocates its pointer arrays, which could deadlock on a malloc lock held
        // by another thread of the parent at clone time; the arrays are prebuilt instead.
        // SAFETY: all three pointers point to NUL-terminated arrays of pointers to C strings
        // owned by `plan`, which lives until exec or return.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::execve(
                path.as_ptr(),
                plan.argv_ptrs.as_ptr(),
                plan.env_ptrs.as_ptr(),
            )
        };
        match Errno::result(rc) {
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => {}
            Err(e) => last = e,
            Ok(_) => {}
        }
    }
    report(plan.err_write.as_raw_fd(), 16, last)
}

fn dup_onto(fd: RawFd, target: RawFd) -> nix::Result<()> {
    if fd == target {
        // Already in place; just make sure it survives exec.
        return nix::fcntl::fcntl(
            borrow(fd),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .map(drop);
    }
    // SAFETY: dup2 onto a stdio number; the target fd is intentionally replaced.
    #[allow(unsafe_code)]
    let r = unsafe { dup2_raw(borrow(fd), target) };
    r.map(std::mem::forget)
}

/// Intermediate child of `exec`: joins the namespaces, then clones the real process with
/// `CLONE_PARENT` (so it is the runtime's own child), reports its host PID and exits.
pub(crate) fn run_via_intermediate(plan: &mut ChildPlan, stack: &mut [u8]) -> isize {
    for (fd, kind) in &plan.join_ns {
        step!(plan, 1, setns(fd, *kind));
    }
    plan.join_ns.clear();
    let pid_fd = plan.pid_write.as_ref().map(|f| f.as_raw_fd());
    let plan_ref: &ChildPlan = plan;
    let cb = Box::new(|| run(plan_ref));
    // SAFETY: the callback only performs async-signal-safe calls (see module docs); the stack
    // is a buffer owned by this (single-threaded) process that outlives the clone call.
    #[allow(unsafe_code)]
    let child =
        unsafe { nix::sched::clone(cb, stack, CloneFlags::CLONE_PARENT, Some(libc::SIGCHLD)) };
    match child {
        Ok(pid) => {
            if let Some(fd) = pid_fd {
                let _ = write(borrow(fd), &pid.as_raw().to_ne_bytes());
            }
            0
        }
        Err(e) => report(plan_ref.err_write.as_raw_fd(), 1, e),
    }
}

/// Null-terminated array of pointers into `strings` (which must outlive it).
pub(crate) fn pointer_array(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Decodes what the child wrote to the error pipe: nothing means `execve` succeeded.
pub(crate) fn decode_report(buf: &[u8]) -> Result<()> {
    if buf.len() < 8 {
        return Ok(());
    }
    let stage = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let errno = Errno::from_raw(i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]));
    Err(Error::Setup {
        stage: STAGES.get(stage).copied().unwrap_or("unknown"),
        errno,
    })
}

/// Unused-PID guard for the type checker in callers.
pub(crate) fn pid_from_bytes(buf: &[u8]) -> Option<Pid> {
    let arr: [u8; 4] = buf.get(..4)?.try_into().ok()?;
    Some(Pid::from_raw(i32::from_ne_bytes(arr)))
}
