//! Container runtime of the Updraft cell agent.
//!
//! A [`PodSandbox`] holds what a pod's containers share (network namespace, cgroup parent,
//! `/etc/hosts`, `/etc/resolv.conf`, `/etc/hostname`); a [`Container`] is a process tree in its
//! own mount/PID/UTS/IPC namespaces, `pivot_root`ed into a prepared rootfs, limited by a cgroup
//! (v1 or v2, see [`CgroupDriver`]), supervised through a pidfd. Requires root.
#![deny(unsafe_code)]

pub mod caps;
pub mod cgroup;
mod child;
pub mod container;
pub mod error;
pub mod process;
pub mod sandbox;

pub use cgroup::{Cgroup, CgroupDriver, CgroupStats, Resources};
pub use container::{
    BindMount, Container, ContainerExit, ContainerSpec, ExecProcess, ExecSpec, ExecTarget,
    ExitReason, Pty, Stdio, StdioMode, ensure_fifo,
};
pub use error::{Error, Result};
pub use process::ExitStatus;
pub use sandbox::{DnsConfig, PodNetwork, PodSandbox, SandboxSpec};
