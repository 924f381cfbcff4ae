//! The backend trait of the cells provider: where cells (one instance per pod) are started,
//! found again and terminated.
//!
//! A backend knows nothing about pods or Kubernetes beyond the identity it stamps on each cell
//! ([`CellIdentity`]: controller id, node, namespace, pod name and UID, pod labels). The cells
//! provider keeps **no local database**: after a restart it calls [`CellBackend::list`] with its
//! controller id and matches the cells to pods by that identity, so every backend must store it
//! with the instance (tags, labels, metadata) and return it from `list` and `describe`.
//!
//! Implementations: `updraft-cells-aws` (EC2); the local backend (network namespaces) lives
//! with the provider. GCE, Azure or VM backends implement the same four calls.
//!
//! [`cloud_init`] builds the user data a cell boots with: the agent's bootstrap files and start
//! command merged with the operator's cloud-init, size-checked against the EC2 limit.
#![forbid(unsafe_code)]

pub mod cloud_init;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::SystemTime;

pub use updraft_cells_catalog::LaunchType;

/// The backend's identifier of a cell (an EC2 instance id, a netns name…).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CellId(pub String);

impl fmt::Display for CellId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who a cell belongs to; stored with the cell so that state can be rebuilt from the backend's
/// listing alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CellIdentity {
    /// The Updraft instance that owns the cell (config `controllerId`); listings filter on it.
    pub controller_id: String,
    /// The virtual node's name.
    pub node: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod_name: String,
    /// The pod's UID: the key that says which pod a cell runs (names are reused).
    pub pod_uid: String,
    /// The pod's labels; backends keep as many as the cloud allows and drop the rest.
    pub pod_labels: BTreeMap<String, String>,
}

impl CellIdentity {
    /// The identity of a **standby** cell: pre-started for this controller and node, owned by
    /// no pod yet (namespace, pod name, UID and labels empty). A pod takes it with
    /// [`CellBackend::assign`].
    pub fn standby(controller_id: &str, node: &str) -> CellIdentity {
        CellIdentity {
            controller_id: controller_id.to_owned(),
            node: node.to_owned(),
            ..CellIdentity::default()
        }
    }

    /// Whether this identity names no pod: a standby cell.
    pub fn is_standby(&self) -> bool {
        self.namespace.is_empty() && self.pod_name.is_empty() && self.pod_uid.is_empty()
    }
}

/// Everything needed to start one cell.
#[derive(Clone, PartialEq, Eq)]
pub struct CellSpec {
    /// A human-readable name (the `Name` tag on AWS), e.g. `<node>-<namespace>-<pod>`.
    pub name: String,
    /// The instance type chosen by the cost engine.
    pub instance_type: String,
    /// On-demand or spot.
    pub launch_type: LaunchType,
    /// A backend-specific boot image overriding the backend's configured one (an AMI id on AWS);
    /// `None` uses the configured image.
    pub image: Option<String>,
    /// The bootstrap user data (see [`cloud_init::UserData`]); holds the agent's key, so it is
    /// never printed by `Debug`.
    pub user_data: Vec<u8>,
    /// The owner identity stamped on the cell.
    pub identity: CellIdentity,
    /// Security groups (ids or names) in addition to the backend's managed group.
    pub security_groups: Vec<String>,
    /// No public address for the cell.
    pub private_ip_only: bool,
    /// Root volume size in bytes; `None` keeps the image's default.
    pub root_volume_bytes: Option<u64>,
    /// The instance profile (IAM role) name or ARN.
    pub instance_profile: Option<String>,
    /// A token that makes retries of the same start idempotent (EC2 `ClientToken`): use one per
    /// pod UID and attempt, so a start retried after a timeout never starts a second cell.
    pub idempotency_token: String,
}

impl fmt::Debug for CellSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CellSpec")
            .field("name", &self.name)
            .field("instance_type", &self.instance_type)
            .field("launch_type", &self.launch_type)
            .field("image", &self.image)
            .field(
                "user_data",
                &format_args!("<{} bytes, redacted>", self.user_data.len()),
            )
            .field("identity", &self.identity)
            .field("security_groups", &self.security_groups)
            .field("private_ip_only", &self.private_ip_only)
            .field("root_volume_bytes", &self.root_volume_bytes)
            .field("instance_profile", &self.instance_profile)
            .field("idempotency_token", &self.idempotency_token)
            .finish()
    }
}

/// The result of a start: the cell, and how it was bought (spot may fall back to on-demand).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedCell {
    /// The new cell's id.
    pub id: CellId,
    /// The launch type actually used.
    pub launch_type: LaunchType,
}

/// The lifecycle state of a cell as the backend reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CellState {
    /// Requested, booting.
    Pending,
    /// Up (the agent may still be starting).
    Running,
    /// Being stopped.
    Stopping,
    /// Stopped (not terminated).
    Stopped,
    /// Being terminated.
    Terminating,
    /// Gone.
    Terminated,
}

impl CellState {
    /// `Pending`, `Running`, … as `updraft cells list` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            CellState::Pending => "Pending",
            CellState::Running => "Running",
            CellState::Stopping => "Stopping",
            CellState::Stopped => "Stopped",
            CellState::Terminating => "Terminating",
            CellState::Terminated => "Terminated",
        }
    }

    /// Whether the cell is on its way out or gone.
    pub fn is_ending(self) -> bool {
        matches!(self, CellState::Terminating | CellState::Terminated)
    }
}

impl fmt::Display for CellState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A cell as the backend describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    /// The backend's id.
    pub id: CellId,
    /// The name given at start.
    pub name: String,
    /// Lifecycle state.
    pub state: CellState,
    /// Instance type.
    pub instance_type: String,
    /// How it was bought.
    pub launch_type: LaunchType,
    /// The management address the agent listens on (primary private IP on AWS).
    pub management_ip: Option<IpAddr>,
    /// The pod's address (secondary private IP on AWS).
    pub pod_ip: Option<IpAddr>,
    /// The public address, if any.
    pub public_ip: Option<IpAddr>,
    /// When the cell was launched.
    pub launch_time: Option<SystemTime>,
    /// The owner identity read back from the cell; `None` when the cell carries an incomplete
    /// identity (not started by Updraft, or tags edited by hand). A standby cell has an
    /// identity without pod ([`CellIdentity::is_standby`]).
    pub identity: Option<CellIdentity>,
    /// All tags/labels of the cell as stored by the cloud.
    pub tags: BTreeMap<String, String>,
}

/// What went wrong in a backend call, classified so the provider can decide: retry
/// ([`BackendError::is_retryable`]), try another type or launch type, or fail the pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// No cell with that id exists (or it is gone from the listing).
    #[error("cell {id} not found")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// The cloud has no capacity for this type (and launch type) right now.
    #[error("no capacity: {detail}")]
    Capacity {
        /// The cloud's explanation.
        detail: String,
    },
    /// An account limit (instances, vCPUs, spot requests, addresses) is reached.
    #[error("quota exceeded: {detail}")]
    Quota {
        /// The cloud's explanation.
        detail: String,
    },
    /// The request cannot succeed as made (unknown image, instance type, subnet, group…): fix
    /// the configuration or the pod.
    #[error("invalid request: {detail}")]
    InvalidRequest {
        /// What is wrong.
        detail: String,
    },
    /// Credentials are missing, expired or not allowed to do this.
    #[error("not authorized: {detail}")]
    Unauthorized {
        /// The cloud's explanation (never the credentials).
        detail: String,
    },
    /// A temporary failure (throttling, timeout, 5xx, network): retry with backoff.
    #[error("temporary failure: {detail}")]
    Transient {
        /// What failed.
        detail: String,
    },
}

impl BackendError {
    /// Whether the same call may succeed later without any change.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            BackendError::Transient { .. } | BackendError::Capacity { .. }
        )
    }
}

/// Where cells run. Implementations must be cheap to share (`Arc<dyn CellBackend>`).
#[async_trait::async_trait]
pub trait CellBackend: Send + Sync {
    /// The backend's name as configured (`aws`, `local`).
    fn kind(&self) -> &'static str;

    /// Starts a cell. Retrying with the same [`CellSpec::idempotency_token`] must not start a
    /// second one where the cloud supports idempotency.
    async fn start(&self, spec: &CellSpec) -> Result<StartedCell, BackendError>;

    /// Describes one cell; [`BackendError::NotFound`] when the backend has no such cell.
    async fn describe(&self, id: &CellId) -> Result<Cell, BackendError>;

    /// Every cell of this controller that is not yet terminated (pending, running, stopping,
    /// stopped, terminating): the source of truth after a restart and for garbage collection.
    async fn list(&self, controller_id: &str) -> Result<Vec<Cell>, BackendError>;

    /// Terminates a cell. Terminating a cell that is already terminating or gone succeeds;
    /// an id the backend never knew is [`BackendError::NotFound`].
    async fn terminate(&self, id: &CellId) -> Result<(), BackendError>;

    /// Hands the standby cell `id` to a pod: stamps `identity` (and the new `name`) on it in
    /// place of its standby identity, so that a listing after a restart shows it as the pod's.
    ///
    /// Must fail with [`BackendError::InvalidRequest`] when the cell is not a standby cell of
    /// `identity.controller_id` any more (already assigned to another pod, or gone), so that two
    /// pods never get one cell; assigning it again to the same pod UID succeeds. Backends that
    /// keep no standby cells need not implement it.
    async fn assign(
        &self,
        id: &CellId,
        name: &str,
        identity: &CellIdentity,
    ) -> Result<(), BackendError> {
        let _ = (id, name, identity);
        Err(BackendError::InvalidRequest {
            detail: format!(
                "the {} backend cannot hand standby cells to pods: remove standbyPool from the config",
                self.kind()
            ),
        })
    }
}
