//! A child process watched through a pidfd, so exit is awaited without polling or SIGCHLD
//! handlers that could steal other children's statuses.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::error::{Error, Result, sys};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called exit with this code.
    Exited(i32),
    /// A signal (number) killed it.
    Signaled(i32),
    /// It ended but was not our child (adopted after an agent restart): no status.
    Unknown,
}

impl ExitStatus {
    /// The exit code as a shell reports it: the code, or 128 + signal number.
    pub fn code(&self) -> i32 {
        match *self {
            Self::Exited(c) => c,
            Self::Signaled(s) => 128 + s,
            // What the kubelet reports for a container whose status could not be found.
            Self::Unknown => 137,
        }
    }
}

/// A running (or exited but not yet awaited) child of this process.
#[derive(Debug)]
pub struct Process {
    pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
    /// Not our child: exit is seen on the pidfd, but it cannot be reaped.
    foreign: bool,
    /// Dropping leaves the process alone.
    forgotten: bool,
}

fn pidfd_open(pid: Pid) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    #[allow(unsafe_code)]
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(Error::Sys {
            call: "pidfd_open",
            errno: nix::errno::Errno::last(),
        });
    }
    let fd = i32::try_from(fd).map_err(|_| Error::Sys {
        call: "pidfd_open",
        errno: nix::errno::Errno::EBADF,
    })?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    #[allow(unsafe_code)]
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Process {
    /// Watches child `pid` (must be our child so we can reap it). Needs a tokio runtime.
    pub(crate) fn watch(pid: Pid) -> Result<Self> {
        Self::watch_inner(pid, false)
    }

    /// Watches a process that is not our child (adopted): exit is noticed, status is unknown.
    pub(crate) fn watch_foreign(pid: Pid) -> Result<Self> {
        Self::watch_inner(pid, true)
    }

    /// Dropping the handle will neither kill nor reap the process.
    pub(crate) fn forget(&mut self) {
        self.forgotten = true;
    }

    fn watch_inner(pid: Pid, foreign: bool) -> Result<Self> {
        let fd = pidfd_open(pid)?;
        // SAFETY: the OwnedFd is moved into the AsyncFd, so the fd stays open and refers to the
        // same pidfd for the AsyncFd's whole lifetime.
        #[allow(unsafe_code)]
        let registered = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) };
        let pidfd = registered.map_err(|e| Error::Io {
            action: "register pidfd",
            path: "pidfd".into(),
            source: e.into_parts().1,
        })?;
        Ok(Self {
            pid,
            pidfd,
            status: None,
            foreign,
            forgotten: false,
        })
    }

    /// Host PID.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Sends `signal` unless the process was already reaped.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        match kill(self.pid, signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(sys("kill")(e)),
        }
    }

    /// The exit status if the process has been reaped already.
    pub fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// Waits for exit and reaps. Cancel-safe: can be called again after a timeout.
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        loop {
            let mut guard = self.pidfd.readable().await.map_err(|e| Error::Io {
                action: "wait on pidfd",
                path: "pidfd".into(),
                source: e,
            })?;
            if self.foreign {
                // A pidfd becomes readable when the process exits; its status belongs to its
                // real parent.
                return Ok(*self.status.insert(ExitStatus::Unknown));
            }
            match waitid(
                Id::PIDFd(self.pidfd.get_ref().as_fd()),
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
            ) {
                Ok(WaitStatus::Exited(_, code)) => {
                    return Ok(*self.status.insert(ExitStatus::Exited(code)));
                }
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    return Ok(*self.status.insert(ExitStatus::Signaled(sig as i32)));
                }
                Ok(_) => guard.clear_ready(),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(sys("waitid")(e)),
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.forgotten {
            return;
        }
        if self.status.is_none() && self.foreign {
            let _ = kill(self.pid, Signal::SIGKILL);
        } else if self.status.is_none() {
            // Never leave a zombie or an orphan behind: kill and reap.
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = waitid(
                Id::PIDFd(self.pidfd.get_ref().as_fd()),
                WaitPidFlag::WEXITED,
            );
        }
    }
}
