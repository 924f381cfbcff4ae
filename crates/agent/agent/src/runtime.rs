//! The seam between a container's lifecycle (the `lifecycle` module) and what runs it: pulling
//! an image, starting or adopting an instance, waiting for its exit, signalling it, running a
//! probe or hook in it.
//!
//! The lifecycle decides *when* (states, backoff, probe thresholds, grace periods); a
//! [`ContainerRuntime`] only does *what* it is told. The cell's implementation
//! (`launch::CellRuntime`) runs containers with `updraft-cell-runtime` in the pod's
//! sandbox and takes images from the agent's `ImageSource`; unit tests use an in-memory fake,
//! so every transition can be driven on tokio's paused clock without root.

use k8s_openapi::api::core::v1::{Container as K8sContainer, Probe};
use k8s_openapi::jiff::Timestamp;
use nix::sys::signal::Signal;
use updraft_cell_runtime::{ContainerExit, ExecTarget};

use crate::images::PreparedImage;
use crate::record::InstanceRecord;
use crate::status::Terminated;

#[cfg(test)]
pub mod fake;

/// Why an instance could not be started, as the status shows it while the container waits.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct StartFailure {
    /// The kubelet's reason (`ErrImagePull`, `CreateContainerConfigError`, `StartError`, …).
    pub reason: String,
    /// What failed, naming the image or field.
    pub message: String,
}

/// A started (or adopted) instance and what the status reports about it.
pub struct Started {
    /// The running instance.
    pub instance: Box<dyn Instance>,
    /// When it started.
    pub started_at: Timestamp,
    /// `updraft://<instance>`.
    pub container_id: String,
    /// Digest of its image.
    pub image_id: String,
    /// Its environment (for exec).
    pub env: Vec<(String, String)>,
    /// Where exec goes (none in fakes).
    pub exec: Option<ExecTarget>,
}

/// Which probe or hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbeKind {
    /// `startupProbe`.
    Startup,
    /// `livenessProbe`.
    Liveness,
    /// `readinessProbe`.
    Readiness,
    /// `lifecycle.postStart`.
    PostStart,
    /// `lifecycle.preStop`.
    PreStop,
}

/// Where a probe or hook runs: one instance of one container.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// The container.
    pub container: String,
    /// Which probe or hook.
    pub kind: ProbeKind,
    /// The instance's exec target.
    pub exec: Option<ExecTarget>,
    /// The instance's environment.
    pub env: Vec<(String, String)>,
    /// The container's named ports (for named probe ports).
    pub ports: Vec<(String, u16)>,
}

/// Runs the instances of a pod's containers.
#[async_trait::async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Makes the image of instance `restarts` of `c` ready (pulled per its pull policy, with a
    /// fresh root filesystem); the previous instance's root filesystem goes.
    async fn pull(&self, c: &K8sContainer, restarts: u32) -> Result<PreparedImage, StartFailure>;

    /// Starts instance `restarts` of `c` from `image`; `last` (how the previous instance
    /// ended) is recorded with it for a later agent.
    fn start(
        &self,
        c: &K8sContainer,
        image: PreparedImage,
        restarts: u32,
        last: Option<&Terminated>,
    ) -> Result<Started, StartFailure>;

    /// The instance of `c` an earlier agent recorded, if any.
    fn recorded(&self, c: &K8sContainer) -> Option<InstanceRecord>;

    /// Takes over the recorded instance when its process still exists; `None` (and the record
    /// forgotten) when it ended while no agent watched it.
    fn adopt(&self, c: &K8sContainer, record: &InstanceRecord) -> Option<Started>;

    /// Runs a probe or hook once in `target`; true = success.
    async fn probe(&self, target: &ProbeTarget, probe: &Probe) -> bool;
}

/// One running instance of a container.
#[async_trait::async_trait]
pub trait Instance: Send {
    /// Waits for the instance to exit; `None` when its exit cannot be known. Cancel-safe, and
    /// answers again (the same) once it has exited.
    async fn wait(&mut self) -> Option<ContainerExit>;

    /// Sends `signal` (SIGTERM, SIGKILL) to the instance unless it has exited.
    fn signal(&self, signal: Signal);

    /// Leaves the instance running for a later agent (this agent exits).
    fn detach(self: Box<Self>);

    /// After its exit: releases what the instance held, finishes its log and returns its
    /// termination message (the message file, or per `terminationMessagePolicy` the log's
    /// tail when `exit_code` is not 0).
    async fn release(self: Box<Self>, exit_code: i32) -> Option<String>;
}
