//! The settings the provider runs with: the config's timings and cell settings, plus what only
//! the set-up knows (the node's name, the backend's pod interfaces, the user-data limit).

use std::time::Duration;

use updraft_cells_backend::LaunchType;
use updraft_cells_backend::cloud_init::EC2_USER_DATA_LIMIT;

use crate::config::{AgentSettings, BackendKind, CellsConfig, PodNetworkSettings};
use crate::pod_interface::PodInterfaceSource;

/// How long pods must be quiet before the standby pool refills: longer than the gaps between
/// the claims and deliveries of one burst on a busy host, short against how long a pool takes
/// to be used up again.
pub const REFILL_QUIET_PERIOD: Duration = Duration::from_secs(5);

/// The settings the provider runs with, derived from [`CellsConfig`].
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    /// The node's name (stamped on cells; only cells of this node are adopted).
    pub node_name: String,
    /// The controller id.
    pub controller_id: String,
    /// Name prefix of cells.
    pub name_tag: String,
    /// Boot timeout.
    pub boot_timeout: Duration,
    /// Health timeout.
    pub health_timeout: Duration,
    /// GC grace period.
    pub gc_grace_period: Duration,
    /// GC interval.
    pub gc_interval: Duration,
    /// How long finished pods keep their cell.
    pub finished_pod_retention: Duration,
    /// The agent.
    pub agent: AgentSettings,
    /// Extra security groups for every cell.
    pub extra_security_groups: Vec<String>,
    /// The pod's interface.
    pub pod_network: Option<PodNetworkSettings>,
    /// Default launch type.
    pub default_launch_type: LaunchType,
    /// User-data size limit.
    pub user_data_limit: usize,
    /// How long one long-poll waits at the agent.
    pub status_wait: Duration,
    /// Pause between attempts while an agent does not answer.
    pub retry_interval: Duration,
    /// Where the pod's interface on each cell comes from.
    pub pod_interfaces: PodInterfaceSource,
    /// Whether the bootstrap passes `--listen 0.0.0.0:<port>` (the local backend gives the
    /// agent its management address itself).
    pub agent_listen_flag: bool,
    /// How long no pod must have asked for a cell or been delivered to one before the standby
    /// pool's refill starts cells (see the `standby` module).
    pub refill_quiet_period: Duration,
}

impl ProviderSettings {
    /// The settings of `config` for node `node_name`.
    pub fn from_config(config: &CellsConfig, node_name: &str) -> ProviderSettings {
        ProviderSettings {
            node_name: node_name.to_owned(),
            controller_id: config.controller_id.clone(),
            name_tag: config.name_tag().to_owned(),
            boot_timeout: config.boot_timeout.0,
            health_timeout: config.health_timeout.0,
            gc_grace_period: config.gc_grace_period.0,
            gc_interval: config.gc_interval.0,
            finished_pod_retention: config.finished_pod_retention.0,
            agent: config.agent.clone(),
            extra_security_groups: config.extra_security_groups.clone(),
            pod_network: config.pod_network.clone(),
            default_launch_type: config.default_launch_type(),
            user_data_limit: match config.backend {
                BackendKind::Aws => EC2_USER_DATA_LIMIT,
                BackendKind::Local => 1 << 20,
            },
            status_wait: Duration::from_secs(30),
            retry_interval: Duration::from_secs(2),
            pod_interfaces: PodInterfaceSource::none(),
            agent_listen_flag: config.backend != BackendKind::Local,
            refill_quiet_period: REFILL_QUIET_PERIOD,
        }
    }
}
