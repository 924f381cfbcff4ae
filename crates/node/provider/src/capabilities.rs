//! Optional capabilities a provider may offer.

use std::time::SystemTime;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::{PodRef, Result};

/// Health of the backend behind the node.
#[async_trait::async_trait]
pub trait NodeHealth: Send + Sync {
    /// `Ok` while the backend can run pods; the error's text becomes the `Ready=False`
    /// condition's message.
    async fn check(&self) -> Result<()>;
}

/// What `kubectl logs` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Keep streaming until the container ends or the client goes away.
    pub follow: bool,
    /// Only the last N lines.
    pub tail_lines: Option<u64>,
    /// Stop after this many bytes.
    pub limit_bytes: Option<u64>,
    /// Prefix each line with its RFC 3339 timestamp.
    pub timestamps: bool,
    /// Only lines written at or after this time.
    pub since: Option<SystemTime>,
    /// The previous, terminated instance of the container.
    pub previous: bool,
}

/// A log stream: bytes as `kubectl logs` prints them.
pub type LogStream = Box<dyn AsyncRead + Send + Unpin>;

/// Container logs.
#[async_trait::async_trait]
pub trait ContainerLogs: Send + Sync {
    /// The logs of `container` in `pod`.
    async fn logs(&self, pod: &PodRef, container: &str, options: LogOptions) -> Result<LogStream>;
}

/// A terminal's size, for TTY sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalSize {
    /// Columns.
    pub width: u16,
    /// Rows.
    pub height: u16,
}

/// The client's side of an exec or attach session. Absent streams were not requested.
pub struct StreamIo {
    /// What the client types.
    pub stdin: Option<Box<dyn AsyncRead + Send + Unpin>>,
    /// Where the process's stdout goes.
    pub stdout: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    /// Where the process's stderr goes (absent with a TTY: it is merged into stdout).
    pub stderr: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    /// Whether to allocate a terminal.
    pub tty: bool,
    /// Terminal size changes, for TTY sessions.
    pub resize: Option<mpsc::Receiver<TerminalSize>>,
}

impl std::fmt::Debug for StreamIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamIo")
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .field("tty", &self.tty)
            .finish()
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// A command to run in a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// The pod.
    pub pod: PodRef,
    /// The container.
    pub container: String,
    /// The command and its arguments.
    pub command: Vec<String>,
}

/// Running commands in containers.
#[async_trait::async_trait]
pub trait ContainerExec: Send + Sync {
    /// Runs `request` with `io` until it exits; dropping the future kills it.
    async fn exec(&self, request: ExecRequest, io: StreamIo) -> Result<ExitStatus>;
}

/// Attaching to a container's main process.
#[async_trait::async_trait]
pub trait ContainerAttach: Send + Sync {
    /// Connects `io` to the container's main process until the client detaches (the future
    /// is dropped) or the process exits.
    async fn attach(&self, pod: &PodRef, container: &str, io: StreamIo) -> Result<ExitStatus>;
}

/// A bidirectional byte stream.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// Forwarding connections to a pod's ports.
#[async_trait::async_trait]
pub trait PortForward: Send + Sync {
    /// Connects `stream` to `port` in the pod's network and copies both ways until both
    /// directions are done (each side's end of data is passed on as a half-close) or either
    /// side fails; dropping the future closes the pod-side connection.
    ///
    /// Returns an error only when the connection cannot be made (no such pod, nothing
    /// listening on the port): the client sees that message. Once connected, a side that
    /// breaks off (a client that resets its stream when it is done) ends forwarding with
    /// `Ok`, as the kubelet's runtimes do.
    async fn port_forward(&self, pod: &PodRef, port: u16, stream: Box<dyn Duplex>) -> Result<()>;
}

/// Resource usage of one container, as sampled at [`PodStats::time`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerStats {
    /// The container's name.
    pub name: String,
    /// When the container (this instance of it) started.
    pub start_time: SystemTime,
    /// Cumulative CPU time, core-nanoseconds.
    pub cpu_usage_core_nanoseconds: u64,
    /// Current CPU usage in nanocores (billionths of a core), if the backend measures a rate.
    pub cpu_usage_nano_cores: Option<u64>,
    /// Memory working set (what the kubelet evicts on and `kubectl top` shows), bytes.
    pub memory_working_set_bytes: u64,
    /// All memory in use, bytes, if known.
    pub memory_usage_bytes: Option<u64>,
}

/// Resource usage of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodStats {
    /// Which pod.
    pub pod: PodRef,
    /// When the pod started running in the provider.
    pub start_time: SystemTime,
    /// When these numbers were sampled.
    pub time: SystemTime,
    /// Cumulative CPU time of the whole pod (containers and overhead), core-nanoseconds.
    pub cpu_usage_core_nanoseconds: u64,
    /// Current CPU usage of the whole pod in nanocores, if the backend measures a rate.
    pub cpu_usage_nano_cores: Option<u64>,
    /// Memory working set of the whole pod, bytes.
    pub memory_working_set_bytes: u64,
    /// Per running container.
    pub containers: Vec<ContainerStats>,
}

/// Resource usage of the pods the provider runs.
#[async_trait::async_trait]
pub trait ProviderStats: Send + Sync {
    /// Usage of every running pod.
    async fn pod_stats(&self) -> Result<Vec<PodStats>>;
}

/// Routing to ClusterIP Services, for a provider whose pods run where no kube-proxy does.
///
/// The node watches Services and EndpointSlices once and hands the provider the whole
/// table on every change ([`ServiceRoutes::version`] grows); the provider installs it where
/// its pods run. Every table is complete, so a provider may drop intermediate ones and apply
/// only the latest: one that was behind catches up in one step.
pub trait ServiceRouting: Send + Sync {
    /// The current table; called from the node's routing task, must not block.
    fn routes_changed(&self, routes: std::sync::Arc<ServiceRoutes>);
}

use updraft_common::services::ServiceRoutes;
