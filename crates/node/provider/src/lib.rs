//! The provider traits of an Updraft node.
//!
//! A *provider* is the backend that actually runs the pods bound to the virtual node: local
//! cells, cloud instances, a mock. The node (crate `updraft-node`) watches the API server and
//! calls the provider; the provider reports status back. Only [`Provider`] is required; each
//! optional capability (status stream, node health, logs, exec, attach, port-forward, stats,
//! Service routing) is advertised by returning `Some` from its accessor, so a missing
//! capability is a clear "not implemented" answer at the kubelet API, never a panic.
//!
//! Providers never read Secrets or ConfigMaps: they receive a [`ResolvedPod`], with every
//! environment variable and volume file already resolved by the node.
#![forbid(unsafe_code)]

mod capabilities;
mod error;
mod resolved;

pub use capabilities::{
    ContainerAttach, ContainerExec, ContainerLogs, ContainerStats, Duplex, ExecRequest, ExitStatus,
    LogOptions, LogStream, NodeHealth, PodStats, PortForward, ProviderStats, ServiceRouting,
    StreamIo, TerminalSize,
};
pub use error::ProviderError;
pub use resolved::{EnvVar, PodDns, ResolvedPod, VolumeFile, VolumeFiles};
pub use updraft_common::services::{Protocol, ServiceRoute, ServiceRoutes};

use std::fmt;

use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Pod, PodStatus};

/// Identifies a pod: namespace, name and the UID of this incarnation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's UID: a pod re-created under the same name has a new one.
    pub uid: String,
}

impl PodRef {
    /// The reference of an API pod (empty strings for missing metadata).
    pub fn of(pod: &Pod) -> Self {
        Self {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A pod as the provider runs it.
#[derive(Debug, Clone)]
pub struct ProviderPod {
    /// Which pod.
    pub pod: PodRef,
    /// Its status as the provider sees it.
    pub status: PodStatus,
}

/// A change of a pod's status, pushed by the provider.
#[derive(Debug, Clone)]
pub struct PodStatusUpdate {
    /// Which pod.
    pub pod: PodRef,
    /// Its new status (phase, IPs, conditions the provider knows, container statuses).
    pub status: PodStatus,
}

/// Result of provider calls.
pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

/// The required trait: the lifecycle of pods in the backend.
///
/// Calls for one pod are never concurrent (the node serializes them per pod); calls for
/// different pods are. Every method must be idempotent: after a restart the node may repeat
/// a call whose outcome it did not see.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Starts running `pod`. Creating a pod that already runs with the same UID succeeds.
    async fn create_pod(&self, pod: &ResolvedPod) -> Result<()>;

    /// Applies a changed spec (or changed env/volume content) to a running pod.
    async fn update_pod(&self, pod: &ResolvedPod) -> Result<()>;

    /// Stops `pod` (honouring `grace_period_seconds`) and releases what it used. Deleting a
    /// pod that does not run succeeds.
    async fn delete_pod(&self, pod: &PodRef, grace_period_seconds: i64) -> Result<()>;

    /// The status of one pod, `None` if the provider does not run it.
    async fn pod_status(&self, pod: &PodRef) -> Result<Option<PodStatus>>;

    /// Every pod the provider runs for this node (used to reconcile after a restart).
    async fn list_pods(&self) -> Result<Vec<ProviderPod>>;

    /// Pushes status changes as they happen. Without it the node asks [`Provider::pod_status`]
    /// after each call it makes, and periodically.
    fn status_updates(&self) -> Option<BoxStream<'static, PodStatusUpdate>> {
        None
    }

    /// Health of the backend, reflected in the node's `Ready` condition.
    fn node_health(&self) -> Option<&dyn NodeHealth> {
        None
    }
    /// Container logs (`kubectl logs`).
    fn logs(&self) -> Option<&dyn ContainerLogs> {
        None
    }
    /// Running commands in containers (`kubectl exec`, `kubectl cp`).
    fn exec(&self) -> Option<&dyn ContainerExec> {
        None
    }
    /// Attaching to a container's main process (`kubectl attach`, `kubectl run -it`).
    fn attach(&self) -> Option<&dyn ContainerAttach> {
        None
    }
    /// Forwarding connections to a pod's ports (`kubectl port-forward`).
    fn port_forward(&self) -> Option<&dyn PortForward> {
        None
    }
    /// Resource usage (`/stats/summary`, `/metrics/resource`, `kubectl top`).
    fn stats(&self) -> Option<&dyn ProviderStats> {
        None
    }
    /// Routing the pods' connections to ClusterIP Services (the kube-proxy role), for pods
    /// that run off the cluster's network. The node then watches EndpointSlices.
    fn service_routing(&self) -> Option<&dyn ServiceRouting> {
        None
    }
}

/// The current time, as the API's `Time`.
pub fn now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    use k8s_openapi::jiff::Timestamp;
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = i64::try_from(since_epoch.as_secs()).unwrap_or(0);
    // API timestamps have second precision (RFC 3339 without fractions); keep them equal to
    // what a round trip through the API server returns, so status comparisons are stable.
    let now = Timestamp::new(seconds, 0).unwrap_or(Timestamp::UNIX_EPOCH);
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)
}
