//! The cells provider: one cell per pod.
//!
//! State lives in the backend and on the cells, not here: the in-memory map of pods is
//! rebuilt from [`CellBackend::list`] (cells carry the pod's identity) and from each agent's
//! answers. Per cell one task follows the agent's long-poll status (a watch: the agent answers
//! when the status version changes) and feeds [`Provider::status_updates`]. One garbage
//! collector loop adopts cells it did not know, terminates duplicates and retires the cells
//! of finished pods.
//!
//! **A lost cell** (the backend says it is gone, or its agent stays unreachable past
//! `healthTimeout`): the pod's status says `CellLost`. With `restartPolicy: Never` (or when
//! the pod's resolved inputs are unknown because the cell was adopted after a restart) the
//! pod becomes `Failed` and its controller (ReplicaSet, Job) replaces it; otherwise the
//! provider starts a replacement cell for the same pod (a new idempotency token), and the
//! pod goes `Pending` → `Running` again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::PodStatus;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use updraft_cell_api::{CellClient, ClientError, PodInterface};
use updraft_cells_backend::cloud_init::{CloudConfig, EC2_USER_DATA_LIMIT};
use updraft_cells_backend::{
    BackendError, Cell, CellBackend, CellId, CellIdentity, CellSpec, CellState, LaunchType,
};
use updraft_cells_catalog::{Catalog, CostError, SelectionPolicy, Selector, decide};
use updraft_provider::{
    PodRef, PodStatusUpdate, Provider, ProviderError, ProviderPod, ResolvedPod,
};

mod standby;

pub use standby::StandbyEntry;

use crate::config::{BackendKind, CellsConfig, PodNetworkSettings};
use crate::metrics::CellsMetrics;
use crate::pki::CellsPki;
use crate::translate::{
    CellSummary, REASON_CELL_BOOT_TIMEOUT, REASON_CELL_LOST, apply_request, lost_status,
    running_status, starting_status,
};

/// The provider could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The catalog could not be loaded.
    #[error(transparent)]
    Catalog(#[from] updraft_cells_catalog::CatalogError),
    /// The default instance type is not in the catalog.
    #[error(transparent)]
    Selection(#[from] updraft_cells_catalog::SelectionError),
    /// The cloud-init file is unusable.
    #[error(transparent)]
    CloudInit(#[from] updraft_cells_backend::cloud_init::CloudInitError),
    /// The cloud-init file could not be read.
    #[error("reading cloudInitFile {path}: {source}")]
    ReadCloudInit {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The CA could not be loaded or created.
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    /// The backend could not be set up.
    #[error(transparent)]
    Backend(#[from] crate::backends::BackendSetupError),
    /// A standby pool entry cannot work with the catalog.
    #[error("cells provider config: {field}: {message}")]
    Standby {
        /// The field, e.g. `standbyPool[0].instanceType`.
        field: String,
        /// What is wrong and what to write instead.
        message: String,
    },
    /// The AWS backend refused its configuration at start-up (an image or subnet that does
    /// not exist).
    #[error("the aws backend cannot start cells with this config: {source}")]
    Prepare {
        /// The backend's error, naming the setting.
        #[source]
        source: BackendError,
    },
    /// The backend's listing failed at start-up.
    #[error("listing the cells of controller {controller_id}: {source}")]
    List {
        /// The controller id.
        controller_id: String,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
}

/// How long pods must be quiet before the standby pool refills: longer than the gaps between
/// the claims and deliveries of one burst on a busy host (claims came about 0.05–0.5 s apart in
/// `cargo xtask bench cells`), short against how long a pool takes to be used up again.
pub const REFILL_QUIET_PERIOD: Duration = Duration::from_secs(5);

/// Why waiting for a cell's agent ended without an answer.
#[derive(Debug, thiserror::Error)]
enum BootError {
    /// The agent did not answer by the cell's boot deadline.
    #[error(
        "the agent on cell {cell} did not answer within the boot timeout (bootTimeout: {timeout:?}): {last_error}. Check that the cell's image starts the agent (updraft-cell) and that Updraft reaches it on port {port}; if the cells only boot slowly, raise bootTimeout in the provider config"
    )]
    TimedOut {
        /// The cell.
        cell: CellId,
        /// The configured `bootTimeout`.
        timeout: Duration,
        /// The agent's port.
        port: u16,
        /// The last answer of the backend or the agent.
        last_error: String,
    },
    /// The wait stopped early: the cell ended or was replaced, the pod is being deleted, or
    /// Updraft stops.
    #[error("{0}")]
    Stopped(String),
}

impl BootError {
    /// The pod status reason of a failed boot.
    fn reason(&self) -> &'static str {
        match self {
            BootError::TimedOut { .. } => REASON_CELL_BOOT_TIMEOUT,
            BootError::Stopped(_) => REASON_CELL_LOST,
        }
    }
}

impl From<BootError> for ProviderError {
    fn from(error: BootError) -> ProviderError {
        ProviderError::transient(error.to_string())
    }
}

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
    pub agent: crate::config::AgentSettings,
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
    /// The pod's interface on each cell.
    pub pod_wiring: crate::backends::PodWiring,
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
            pod_wiring: crate::backends::PodWiring::none(),
            agent_listen_flag: config.backend != BackendKind::Local,
            refill_quiet_period: REFILL_QUIET_PERIOD,
        }
    }
}

/// The catalog the config names (its file, or the built-in one of its region).
pub fn load_catalog(config: &CellsConfig) -> Result<Catalog, updraft_cells_catalog::CatalogError> {
    match &config.catalog_file {
        Some(path) => Catalog::from_path(path),
        None => Catalog::builtin(&match config.backend {
            BackendKind::Local => "local".to_owned(),
            BackendKind::Aws => format!("aws-{}", config.region()),
        }),
    }
}

/// The instance selector of `config` (what `updraft cells select` uses too).
pub fn selector(config: &CellsConfig) -> Result<Selector, SetupError> {
    let catalog = load_catalog(config)?;
    Ok(Selector::new(
        catalog,
        SelectionPolicy::new(config.default_instance_type()),
    )?)
}

/// One cell as the provider uses it.
#[derive(Debug, Clone)]
struct CellView {
    summary: CellSummary,
    id: CellId,
    interface: Option<PodInterface>,
    client: Option<CellClient>,
    /// When the backend launched the cell: a cell whose agent has not answered yet may boot
    /// until `launched + bootTimeout`, also when this run only adopted it.
    launched: Option<SystemTime>,
    /// Until when this run waits for the agent (see [`Inner::boot_deadline`]), fixed by the
    /// first wait so that later create calls do not extend it.
    boot_deadline: Option<Instant>,
}

#[derive(Debug, Default)]
struct PodState {
    cell: Option<CellView>,
    /// What the node last handed us; unknown for pods adopted after a restart.
    resolved: Option<ResolvedPod>,
    /// Whether the agent runs (or has run) this pod: only then is it "running" to the node.
    applied: bool,
    status: Option<PodStatus>,
    /// Start attempts: part of the idempotency token, so a replacement is a new start.
    attempt: u32,
    finished_since: Option<Instant>,
    /// The cell of a finished pod was terminated on purpose.
    retired: bool,
    /// Cancels the status watcher of the current cell.
    watcher: Option<CancellationToken>,
    /// Whether the pod's boot task runs ([`Inner::spawn_boot`]).
    booting: bool,
}

#[derive(Debug)]
struct TrackedPod {
    pod: PodRef,
    host_network: bool,
    restart_never: bool,
    /// Set when this run found the pod's cell in the backend's listing rather than being asked
    /// for the pod by the node: until the node asks (`resolved` is set), the cell belongs to no
    /// pod this run knows, and it is reported to the node's orphan sweep only once it has been
    /// so for `gcGracePeriod`.
    adopted_at: Option<Instant>,
    /// Cancelled when the pod is being deleted: a boot in progress stops waiting at once.
    deleting: CancellationToken,
    state: Mutex<PodState>,
}

impl TrackedPod {
    fn new(pod: PodRef, host_network: bool, restart_never: bool, state: PodState) -> TrackedPod {
        TrackedPod {
            pod,
            host_network,
            restart_never,
            adopted_at: None,
            deleting: CancellationToken::new(),
            state: Mutex::new(state),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct Inner {
    pub(crate) settings: ProviderSettings,
    pub(crate) backend: Arc<dyn CellBackend>,
    selector: Selector,
    cloud_init: Option<CloudConfig>,
    pki: CellsPki,
    pods: Mutex<HashMap<String, Arc<TrackedPod>>>,
    pod_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    updates: broadcast::Sender<PodStatusUpdate>,
    pub(crate) metrics: CellsMetrics,
    pub(crate) backend_healthy: Mutex<Result<(), String>>,
    shutdown: CancellationToken,
    standby: standby::StandbyPool,
}

/// The cells provider. Cloning shares it.
#[derive(Clone)]
pub struct CellsProvider {
    pub(crate) inner: Arc<Inner>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The provider error of a failed backend call: the message says what failed and why (the
/// node shows it in the pod's status as it is), the backend's error stays its typed source.
fn backend_error(context: &str, error: BackendError) -> ProviderError {
    let context = &format!("{context}: {error}");
    let kind = if error.is_retryable() {
        ProviderError::transient(context)
    } else {
        match error {
            BackendError::InvalidRequest { .. } => ProviderError::permanent(context),
            // Quotas and credentials can be fixed by the operator: keep retrying.
            _ => ProviderError::transient(context),
        }
    };
    kind.caused_by(error)
}

/// The provider error of a failed agent call, like [`backend_error`].
pub(crate) fn client_error(context: &str, error: ClientError) -> ProviderError {
    let context = &format!("{context}: {error}");
    let kind = match &error {
        ClientError::Api { status, .. } if status.as_u16() == 404 => {
            ProviderError::not_found(context)
        }
        ClientError::Api { status, .. } if matches!(status.as_u16(), 400 | 409) => {
            ProviderError::invalid_input(context)
        }
        _ => ProviderError::transient(context),
    };
    kind.caused_by(error)
}

fn cost_error(error: CostError) -> ProviderError {
    match error {
        CostError::Selection(e) => ProviderError::permanent(e.to_string()),
        other => ProviderError::invalid_input(other.to_string()),
    }
}

fn is_finished(status: &PodStatus) -> bool {
    matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
}

/// Cell names: `<nameTag>-<namespace>-<pod>`, lower-case, at most 63 characters.
fn cell_name(prefix: &str, pod: &PodRef) -> String {
    let mut name: String = format!("{prefix}-{}-{}", pod.namespace, pod.name)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(63);
    name
}

impl CellsProvider {
    /// The provider of `config` for node `node_name`: connects the configured backend, then
    /// [`CellsProvider::start`].
    pub async fn from_config(
        config: &CellsConfig,
        node_name: &str,
    ) -> Result<CellsProvider, SetupError> {
        let (backend, wiring): (Arc<dyn CellBackend>, _) = match config.backend {
            BackendKind::Local => {
                let local = crate::backends::local(config)?;
                // Cells whose creation a killed run cut short are launched again under their
                // ids before the listing, so they are adopted as their pods' booting cells.
                let resumer = local.clone();
                match tokio::task::spawn_blocking(move || resumer.resume_abandoned_starts()).await {
                    Ok(Ok(resumed)) => {
                        for (cell, result) in resumed {
                            match result {
                                Ok(()) => {
                                    tracing::info!(%cell, "resumed a start a killed run left")
                                }
                                Err(e) => {
                                    tracing::warn!(%cell, "resuming a start a killed run left: {e}")
                                }
                            }
                        }
                    }
                    Ok(Err(e)) => tracing::warn!("looking for starts a killed run left: {e}"),
                    Err(e) => tracing::warn!("looking for starts a killed run left: {e}"),
                }
                let wiring = crate::backends::pod_wiring(config, Some(local.clone()));
                (Arc::new(local), wiring)
            }
            BackendKind::Aws => {
                let aws = crate::backends::aws_backend(config).await?;
                // What only EC2 can tell (does the image exist, the subnet) stops the start
                // here instead of failing every pod; EC2 out of reach for a moment does not.
                match aws.prepare().await {
                    Ok(()) => {}
                    Err(source @ BackendError::InvalidRequest { .. }) => {
                        return Err(SetupError::Prepare { source });
                    }
                    Err(e) => {
                        tracing::warn!("preparing the aws backend, again at the first pod: {e}")
                    }
                }
                (Arc::new(aws), crate::backends::pod_wiring(config, None))
            }
        };
        Self::start_with_wiring(config, node_name, backend, wiring).await
    }

    /// Loads the CA, the catalog and the cloud-init file, adopts the cells `backend` already
    /// runs for this controller and node, and starts the garbage collector.
    pub async fn start(
        config: &CellsConfig,
        node_name: &str,
        backend: Arc<dyn CellBackend>,
    ) -> Result<CellsProvider, SetupError> {
        let wiring = crate::backends::pod_wiring(config, None);
        Self::start_with_wiring(config, node_name, backend, wiring).await
    }

    async fn start_with_wiring(
        config: &CellsConfig,
        node_name: &str,
        backend: Arc<dyn CellBackend>,
        wiring: crate::backends::PodWiring,
    ) -> Result<CellsProvider, SetupError> {
        let selector = selector(config)?;
        let cloud_init = match &config.cloud_init_file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| SetupError::ReadCloudInit {
                        path: path.clone(),
                        source,
                    })?;
                Some(CloudConfig::parse(&text, &path.display().to_string())?)
            }
            None => None,
        };
        let pki = CellsPki::open(&config.certificate_dir)?;
        let mut settings = ProviderSettings::from_config(config, node_name);
        settings.pod_wiring = wiring;
        let provider = Self::with_parts(settings, backend, selector, cloud_init, pki).await?;
        // Also without entries: the loop drains standby cells an earlier config left.
        provider.start_standby_pool(StandbyEntry::from_config(&config.standby_pool))?;
        Ok(provider)
    }

    /// A provider from prepared parts (tests use a fake backend and short timings).
    pub async fn with_parts(
        settings: ProviderSettings,
        backend: Arc<dyn CellBackend>,
        selector: Selector,
        cloud_init: Option<CloudConfig>,
        pki: CellsPki,
    ) -> Result<CellsProvider, SetupError> {
        let (updates, _) = broadcast::channel(4096);
        let provider = CellsProvider {
            inner: Arc::new(Inner {
                settings,
                backend,
                selector,
                cloud_init,
                pki,
                pods: Mutex::new(HashMap::new()),
                pod_locks: Mutex::new(HashMap::new()),
                updates,
                metrics: CellsMetrics::default(),
                backend_healthy: Mutex::new(Ok(())),
                shutdown: CancellationToken::new(),
                standby: standby::StandbyPool::default(),
            }),
        };
        let cells = provider
            .inner
            .backend
            .list(&provider.inner.settings.controller_id)
            .await
            .map_err(|source| SetupError::List {
                controller_id: provider.inner.settings.controller_id.clone(),
                source,
            })?;
        let adopted = provider.inner.adopt_untracked(&cells);
        if adopted > 0 {
            tracing::info!(cells = adopted, "adopted the cells of an earlier run");
        }
        provider.inner.refresh_metrics();
        let weak = Arc::downgrade(&provider.inner);
        let shutdown = provider.inner.shutdown.clone();
        let interval = provider.inner.settings.gc_interval;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(interval) => {}
                }
                let Some(inner) = weak.upgrade() else { return };
                inner.collect_garbage().await;
            }
        });
        Ok(provider)
    }

    /// The selector in use.
    pub fn selector(&self) -> &Selector {
        &self.inner.selector
    }

    /// The backend in use.
    pub fn backend(&self) -> Arc<dyn CellBackend> {
        self.inner.backend.clone()
    }

    /// Registers the provider's metrics (cells by type, spend per hour) in `registry`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.metrics.register(registry);
    }

    /// Keeps the standby pool at `entries` (idle pre-started cells per instance type) from now
    /// on: checks them against the catalog, then starts the pool's reconcile loop, or only
    /// changes its entries when it runs already.
    pub fn start_standby_pool(&self, entries: Vec<StandbyEntry>) -> Result<(), SetupError> {
        let catalog = self.inner.selector.catalog();
        for (index, entry) in entries.iter().enumerate() {
            let Some(instance_type) = catalog.get(&entry.instance_type) else {
                return Err(SetupError::Standby {
                    field: format!("standbyPool[{index}].instanceType"),
                    message: format!(
                        "{:?} is not in the instance catalog; pick one of `updraft cells select`'s types",
                        entry.instance_type
                    ),
                });
            };
            if entry.launch_type == LaunchType::Spot && instance_type.spot_per_hour.is_none() {
                return Err(SetupError::Standby {
                    field: format!("standbyPool[{index}].launchType"),
                    message: format!(
                        "the catalog has no spot price for {}: use on-demand",
                        entry.instance_type
                    ),
                });
            }
        }
        standby::start_pool(&self.inner, entries);
        Ok(())
    }

    /// Runs one pass of the standby pool's reconcile loop now.
    pub async fn reconcile_standby_pool(&self) {
        self.inner.reconcile_standby().await;
    }

    /// Runs one garbage-collection pass now (the loop runs every `gcInterval`).
    pub async fn collect_garbage(&self) {
        self.inner.collect_garbage().await;
    }

    /// Stops the background tasks; cells keep running (a later provider adopts them).
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }
}

impl Inner {
    fn tracked(&self, uid: &str) -> Option<Arc<TrackedPod>> {
        lock(&self.pods).get(uid).cloned()
    }

    async fn lock_pod(&self, uid: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let mutex = lock(&self.pod_locks)
            .entry(uid.to_owned())
            .or_default()
            .clone();
        mutex.lock_owned().await
    }

    fn summary(&self, cell: &Cell, price: Option<f64>) -> CellSummary {
        let catalog = self.selector.catalog();
        let price = price.or_else(|| {
            catalog
                .get(&cell.instance_type)
                .and_then(|t| match cell.launch_type {
                    LaunchType::Spot => t.spot_per_hour,
                    LaunchType::OnDemand => Some(t.on_demand_per_hour),
                })
        });
        CellSummary {
            id: cell.id.to_string(),
            instance_type: cell.instance_type.clone(),
            launch_type: cell.launch_type.as_str().to_owned(),
            price_per_hour: price,
            currency: catalog.currency.clone(),
            management_ip: cell.management_ip,
        }
    }

    fn view(&self, cell: &Cell, price: Option<f64>) -> CellView {
        let client = cell.management_ip.map(|ip| {
            CellClient::new(
                SocketAddr::new(ip, self.settings.agent.port),
                self.pki.client_tls(),
            )
            .with_timeout(Duration::from_secs(10))
        });
        CellView {
            summary: self.summary(cell, price),
            id: cell.id.clone(),
            interface: self.settings.pod_wiring.interface(cell),
            client,
            launched: cell.launch_time,
            boot_deadline: None,
        }
    }

    fn publish(&self, pod: &PodRef, status: PodStatus) {
        // No receiver yet (the node subscribes once it runs) is fine: pod_status answers.
        let _ = self.updates.send(PodStatusUpdate {
            pod: pod.clone(),
            status,
        });
    }

    fn set_status(&self, tracked: &TrackedPod, status: PodStatus) {
        let changed = {
            let mut state = lock(&tracked.state);
            if state.status.as_ref() == Some(&status) {
                false
            } else {
                if is_finished(&status) {
                    state.finished_since.get_or_insert_with(Instant::now);
                } else {
                    state.finished_since = None;
                }
                state.status = Some(status.clone());
                true
            }
        };
        if changed {
            self.publish(&tracked.pod, status);
        }
    }

    /// Tracks the cells in `cells` (of this node) that are not tracked yet and starts their
    /// watchers. Returns how many were adopted.
    fn adopt_untracked(self: &Arc<Self>, cells: &[Cell]) -> usize {
        let mut adopted = 0;
        for cell in cells {
            let Some(identity) = &cell.identity else {
                continue;
            };
            if identity.node != self.settings.node_name
                || identity.pod_uid.is_empty()
                || cell.state.is_ending()
            {
                continue;
            }
            let tracked = {
                let mut pods = lock(&self.pods);
                if pods.contains_key(&identity.pod_uid) {
                    continue;
                }
                let mut tracked = TrackedPod::new(
                    PodRef {
                        namespace: identity.namespace.clone(),
                        name: identity.pod_name.clone(),
                        uid: identity.pod_uid.clone(),
                    },
                    false,
                    false,
                    PodState {
                        cell: Some(self.view(cell, None)),
                        ..PodState::default()
                    },
                );
                tracked.adopted_at = Some(Instant::now());
                let tracked = Arc::new(tracked);
                pods.insert(identity.pod_uid.clone(), tracked.clone());
                tracked
            };
            tracing::info!(
                pod = %tracked.pod,
                cell = %cell.id,
                state = %cell.state,
                grace_period_seconds = self.settings.gc_grace_period.as_secs(),
                "adopting a cell found in the backend's listing (if no pod of this node claims it, it is garbage-collected after the grace period)"
            );
            self.spawn_watcher(&tracked);
            adopted += 1;
        }
        adopted
    }

    fn identity(&self, pod: &ResolvedPod) -> CellIdentity {
        let pod_ref = PodRef::of(&pod.pod);
        CellIdentity {
            controller_id: self.settings.controller_id.clone(),
            node: self.settings.node_name.clone(),
            namespace: pod_ref.namespace,
            pod_name: pod_ref.name,
            pod_uid: pod_ref.uid,
            pod_labels: pod.pod.metadata.labels.clone().unwrap_or_default(),
        }
    }

    /// The cells the backend lists for `uid` (not ending).
    async fn listed_cells(&self, uid: &str) -> Result<Vec<Cell>, ProviderError> {
        let cells = self
            .backend
            .list(&self.settings.controller_id)
            .await
            .map_err(|e| backend_error("listing cells", e))?;
        Ok(cells
            .into_iter()
            .filter(|c| {
                !c.state.is_ending()
                    && c.identity
                        .as_ref()
                        .is_some_and(|i| i.pod_uid == uid && i.node == self.settings.node_name)
            })
            .collect())
    }

    /// Starts a new cell for `resolved`, attempt `attempt`.
    async fn start_cell(
        &self,
        resolved: &ResolvedPod,
        attempt: u32,
    ) -> Result<CellView, ProviderError> {
        let pod_ref = PodRef::of(&resolved.pod);
        let spec = resolved.pod.spec.clone().unwrap_or_default();
        let annotations = resolved
            .pod
            .metadata
            .annotations
            .clone()
            .unwrap_or_default();
        let (decision, cell_annotations) = decide(
            &self.selector,
            &spec,
            &annotations,
            self.settings.default_launch_type,
        )
        .map_err(cost_error)?;
        let user_data = self.cell_user_data()?;
        let mut security_groups = self.settings.extra_security_groups.clone();
        security_groups.extend(cell_annotations.security_groups.iter().cloned());
        let cell_spec = CellSpec {
            name: cell_name(&self.settings.name_tag, &pod_ref),
            instance_type: decision.chosen.instance_type.name.clone(),
            launch_type: decision.launch_type,
            image: None,
            user_data,
            identity: self.identity(resolved),
            security_groups,
            private_ip_only: cell_annotations.private_ip_only.unwrap_or(false),
            root_volume_bytes: cell_annotations.volume_size_bytes,
            instance_profile: cell_annotations.instance_profile.clone(),
            idempotency_token: format!("{}-{attempt}", pod_ref.uid),
        };
        tracing::info!(
            pod = %pod_ref,
            instance_type = %cell_spec.instance_type,
            launch_type = %decision.launch_type.as_str(),
            price = decision.chosen.price_per_hour,
            reason = %decision.reason,
            "starting a cell"
        );
        let started = self
            .backend
            .start(&cell_spec)
            .await
            .map_err(|e| backend_error("starting a cell", e))?;
        let cell = match self.backend.describe(&started.id).await {
            Ok(cell) => cell,
            Err(_) => Cell {
                id: started.id.clone(),
                name: cell_spec.name.clone(),
                state: CellState::Pending,
                instance_type: cell_spec.instance_type.clone(),
                launch_type: started.launch_type,
                management_ip: None,
                pod_ip: None,
                public_ip: None,
                launch_time: Some(std::time::SystemTime::now()),
                identity: Some(cell_spec.identity.clone()),
                tags: Default::default(),
            },
        };
        // Spot may have fallen back to on-demand: price what was bought.
        let price =
            (started.launch_type == decision.launch_type).then_some(decision.chosen.price_per_hour);
        let mut view = self.view(&cell, price);
        view.summary.launch_type = started.launch_type.as_str().to_owned();
        if cell.state.is_ending() {
            // An idempotency token that names a cell which has ended since: a new attempt.
            return Err(ProviderError::transient(format!(
                "cell {} for this start attempt has ended; retrying with a new cell",
                cell.id
            )));
        }
        Ok(view)
    }

    /// Until when a cell whose agent has not answered yet may stay silent: `bootTimeout` after
    /// its launch (a cell adopted while booting keeps its deadline across a restart), but at
    /// least `healthTimeout` from now (a standby cell taken long after its launch).
    fn boot_deadline(&self, view: &CellView) -> Instant {
        let now = Instant::now();
        let floor = now + self.settings.health_timeout.min(self.settings.boot_timeout);
        self.launch_deadline(view)
            .map_or(now + self.settings.boot_timeout, |d| d.max(floor))
    }

    /// `bootTimeout` after the cell's launch, when the backend knows it.
    fn launch_deadline(&self, view: &CellView) -> Option<Instant> {
        let booting_for = view.launched?.elapsed().unwrap_or_default();
        Some(Instant::now() + self.settings.boot_timeout.saturating_sub(booting_for))
    }

    /// Waits until the cell has an address and its agent answers (see [`Inner::boot_deadline`]).
    /// Stops early when the pod is being deleted or the cell was declared lost meanwhile.
    async fn wait_ready(
        &self,
        tracked: &TrackedPod,
        view: &mut CellView,
    ) -> Result<CellClient, BootError> {
        let deadline = match view.boot_deadline {
            Some(deadline) => deadline,
            None => self.boot_deadline(view),
        };
        view.boot_deadline = Some(deadline);
        let mut last_error = String::from("no answer yet");
        loop {
            if tracked.deleting.is_cancelled() {
                return Err(BootError::Stopped(format!(
                    "pod {} is being deleted: stopped waiting for cell {}",
                    tracked.pod, view.id
                )));
            }
            let current = lock(&tracked.state).cell.as_ref().map(|c| c.id.clone());
            if current.as_ref() != Some(&view.id) {
                return Err(BootError::Stopped(format!(
                    "cell {} was lost while booting",
                    view.id
                )));
            }
            if view.client.is_none() {
                match self.backend.describe(&view.id).await {
                    Ok(cell) if cell.state.is_ending() => {
                        return Err(BootError::Stopped(format!(
                            "cell {} ended while booting ({})",
                            view.id, cell.state
                        )));
                    }
                    Ok(cell) if cell.management_ip.is_some() => {
                        let price = view.summary.price_per_hour;
                        let launch_type = view.summary.launch_type.clone();
                        *view = self.view(&cell, price);
                        view.summary.launch_type = launch_type;
                        view.boot_deadline = Some(deadline);
                    }
                    Ok(cell) => {
                        last_error = format!("the cell is {} without an address", cell.state)
                    }
                    Err(e) => last_error = e.to_string(),
                }
            }
            if let Some(client) = &view.client {
                let probe = client.clone().with_timeout(Duration::from_secs(3));
                match probe.ping().await {
                    Ok(()) => return Ok(client.clone()),
                    Err(e) => last_error = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(BootError::TimedOut {
                    cell: view.id.clone(),
                    timeout: self.settings.boot_timeout,
                    port: self.settings.agent.port,
                    last_error,
                });
            }
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    return Err(BootError::Stopped("the provider is shutting down".into()));
                }
                () = tracked.deleting.cancelled() => {}
                () = tokio::time::sleep(self.settings.retry_interval.min(Duration::from_secs(1))) => {}
            }
        }
    }

    async fn terminate(&self, id: &CellId) -> Result<(), ProviderError> {
        match self.backend.terminate(id).await {
            Ok(()) | Err(BackendError::NotFound { .. }) => Ok(()),
            Err(e) => Err(backend_error(&format!("terminating cell {id}"), e)),
        }
    }

    /// Makes sure `tracked` has a cell for `resolved`: the current one, a listed one, a standby
    /// cell, or a new one. Records `resolved` and the cell in the pod's state.
    async fn ensure_cell(
        self: &Arc<Self>,
        tracked: &Arc<TrackedPod>,
        resolved: &ResolvedPod,
    ) -> Result<CellView, ProviderError> {
        let uid = tracked.pod.uid.clone();
        if tracked.deleting.is_cancelled() {
            return Err(ProviderError::transient(format!(
                "pod {} is being deleted",
                tracked.pod
            )));
        }
        let current = {
            let mut state = lock(&tracked.state);
            state.resolved = Some(resolved.clone());
            state.cell.clone()
        };
        let view = match current {
            Some(view) => view,
            None => {
                // The standby pool's refill waits while pods ask for cells.
                self.standby.demand();
                let listed = self.listed_cells(&uid).await?;
                match listed.first() {
                    Some(cell) => self.view(cell, None),
                    None => match self.take_standby(resolved).await {
                        Some(view) => {
                            self.set_status(tracked, starting_status(&view.summary));
                            view
                        }
                        None => {
                            let attempt = lock(&tracked.state).attempt;
                            let view = match self.start_cell(resolved, attempt).await {
                                Ok(view) => view,
                                Err(e) => {
                                    if e.is_transient() {
                                        lock(&tracked.state).attempt += 1;
                                    }
                                    return Err(e);
                                }
                            };
                            self.set_status(tracked, starting_status(&view.summary));
                            view
                        }
                    },
                }
            }
        };
        lock(&tracked.state).cell = Some(view.clone());
        self.refresh_metrics();
        Ok(view)
    }

    /// Waits for the agent of `view` (see [`Inner::wait_ready`]) and keeps what the view
    /// learnt (address, boot deadline) in the pod's state.
    async fn wait_for_agent(
        &self,
        tracked: &TrackedPod,
        view: &mut CellView,
    ) -> Result<CellClient, BootError> {
        let boot = self.wait_ready(tracked, view).await;
        let mut state = lock(&tracked.state);
        if state.cell.as_ref().map(|c| &c.id) == Some(&view.id) {
            state.cell = Some(view.clone());
        }
        boot
    }

    /// A boot that failed (timeout, the cell ended or was lost): the cell is terminated and
    /// the next start is a new attempt. Not when Updraft stops (the next run adopts the cell)
    /// or the pod is being deleted (the delete terminates it).
    async fn boot_failed(&self, tracked: &TrackedPod, view: &CellView, error: &BootError) {
        if self.shutdown.is_cancelled() || tracked.deleting.is_cancelled() {
            return;
        }
        tracing::warn!(pod = %tracked.pod, cell = %view.id, "{error}; terminating the cell");
        if let Err(e) = self.terminate(&view.id).await {
            tracing::warn!(cell = %view.id, "{e}; the garbage collector retries");
        }
        let mut state = lock(&tracked.state);
        if state.cell.as_ref().map(|c| &c.id) == Some(&view.id) {
            state.cell = None;
        }
        state.attempt += 1;
        drop(state);
        self.refresh_metrics();
    }

    /// Hands `resolved` to the agent behind `client` and starts the status watcher.
    async fn deliver(
        self: &Arc<Self>,
        tracked: &Arc<TrackedPod>,
        resolved: &ResolvedPod,
        view: &CellView,
        client: &CellClient,
    ) -> Result<(), ProviderError> {
        let request = apply_request(
            resolved,
            view.interface.clone(),
            self.settings.pod_network.as_ref(),
        );
        client
            .apply_pod(&request)
            .await
            .map_err(|e| client_error(&format!("delivering the pod to cell {}", view.id), e))?;
        tracing::debug!(pod = %tracked.pod, cell = %view.id, "delivered the pod to its cell");
        self.standby.demand();
        let watching = {
            let mut state = lock(&tracked.state);
            state.applied = true;
            state.retired = false;
            state.watcher.is_some()
        };
        if !watching {
            self.spawn_watcher(tracked);
        }
        Ok(())
    }

    /// Makes sure `tracked` has a cell whose agent runs `resolved`, waiting for the boot
    /// (the replacement of a lost cell, which runs under the pod's lock in its own task).
    async fn ensure_running(
        self: &Arc<Self>,
        tracked: &Arc<TrackedPod>,
        resolved: &ResolvedPod,
    ) -> Result<(), ProviderError> {
        let mut view = self.ensure_cell(tracked, resolved).await?;
        let client = match self.wait_for_agent(tracked, &mut view).await {
            Ok(client) => client,
            Err(e) => {
                self.boot_failed(tracked, &view, &e).await;
                return Err(e.into());
            }
        };
        self.deliver(tracked, resolved, &view, &client).await
    }

    /// The pod's boot, in a task of its own so that the node's create returns once the cell is
    /// started (the node handles a pod's events one at a time: a create that waited for the
    /// boot would hold the pod's delete back as long). It waits for the agent without the
    /// pod's lock, delivers the pod under it, and after a failed boot starts a new cell, with
    /// backoff, until the pod runs, is deleted, or Updraft stops. One per pod at a time.
    fn spawn_boot(self: &Arc<Self>, tracked: &Arc<TrackedPod>) {
        {
            let mut state = lock(&tracked.state);
            if state.booting {
                return;
            }
            state.booting = true;
        }
        let inner = self.clone();
        let tracked = tracked.clone();
        tokio::spawn(async move {
            inner.boot(&tracked).await;
            lock(&tracked.state).booting = false;
        });
    }

    async fn boot(self: &Arc<Self>, tracked: &Arc<TrackedPod>) {
        let mut delay = Duration::from_secs(1);
        loop {
            if self.shutdown.is_cancelled() || tracked.deleting.is_cancelled() {
                return;
            }
            let current = lock(&tracked.state).cell.clone();
            let outcome = match current {
                Some(mut view) => match self.wait_for_agent(tracked, &mut view).await {
                    Ok(client) => {
                        tracing::debug!(pod = %tracked.pod, cell = %view.id, "the cell's agent answers");
                        let _guard = self.lock_pod(&tracked.pod.uid).await;
                        let (resolved, same_cell) = {
                            let state = lock(&tracked.state);
                            let same = state.cell.as_ref().map(|c| &c.id) == Some(&view.id);
                            (state.resolved.clone(), same)
                        };
                        match resolved {
                            _ if tracked.deleting.is_cancelled() => return,
                            Some(resolved) if same_cell => {
                                match self.deliver(tracked, &resolved, &view, &client).await {
                                    Ok(()) => return,
                                    Err(e) => Err(e),
                                }
                            }
                            // The cell changed meanwhile: follow the new one.
                            _ => Ok(()),
                        }
                    }
                    Err(e) => {
                        let _guard = self.lock_pod(&tracked.pod.uid).await;
                        self.boot_failed(tracked, &view, &e).await;
                        if self.shutdown.is_cancelled() || tracked.deleting.is_cancelled() {
                            return;
                        }
                        let last = lock(&tracked.state).status.clone();
                        self.set_status(
                            tracked,
                            lost_status(
                                last.as_ref(),
                                false,
                                e.reason(),
                                format!("{e}; starting a new cell"),
                            ),
                        );
                        Err(e.into())
                    }
                },
                None => {
                    let _guard = self.lock_pod(&tracked.pod.uid).await;
                    let resolved = lock(&tracked.state).resolved.clone();
                    match resolved {
                        _ if tracked.deleting.is_cancelled() => return,
                        Some(resolved) => match self.ensure_cell(tracked, &resolved).await {
                            Ok(_) => Ok(()),
                            Err(e) if e.is_transient() => Err(e),
                            Err(e) => {
                                let last = lock(&tracked.state).status.clone();
                                self.set_status(
                                    tracked,
                                    lost_status(
                                        last.as_ref(),
                                        true,
                                        REASON_CELL_LOST,
                                        format!("no new cell: {e}"),
                                    ),
                                );
                                return;
                            }
                        },
                        None => return,
                    }
                }
            };
            match outcome {
                Ok(()) => delay = Duration::from_secs(1),
                Err(e) => {
                    tracing::warn!(pod = %tracked.pod, "starting the pod on a cell: {e}; retrying in {}s", delay.as_secs());
                    tokio::select! {
                        () = self.shutdown.cancelled() => return,
                        () = tracked.deleting.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    fn spawn_watcher(self: &Arc<Self>, tracked: &Arc<TrackedPod>) {
        let token = self.shutdown.child_token();
        {
            let mut state = lock(&tracked.state);
            if let Some(old) = state.watcher.replace(token.clone()) {
                old.cancel();
            }
        }
        let inner = Arc::downgrade(self);
        let tracked = tracked.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = watch_cell(inner, tracked, token.clone()) => {}
            }
        });
    }

    /// Handles a lost cell: says so in the status (with `reason`), terminates it, and restarts
    /// the pod on a new cell or fails it.
    async fn cell_lost(
        self: &Arc<Self>,
        tracked: &Arc<TrackedPod>,
        cell: &CellView,
        reason: &'static str,
        why: String,
    ) {
        let (resolved, last) = {
            let mut state = lock(&tracked.state);
            if state.cell.as_ref().map(|c| &c.id) != Some(&cell.id) {
                return;
            }
            state.cell = None;
            state.watcher = None;
            (state.resolved.clone(), state.status.clone())
        };
        let replace = !tracked.restart_never && resolved.is_some();
        let message = if replace {
            format!(
                "cell {} was lost ({why}); starting a replacement cell",
                cell.id
            )
        } else if tracked.restart_never {
            format!(
                "cell {} was lost ({why}); restartPolicy Never: the pod failed",
                cell.id
            )
        } else {
            format!(
                "cell {} was lost ({why}); the pod was adopted after a restart, so its inputs are unknown here: the pod failed and its controller replaces it",
                cell.id
            )
        };
        tracing::warn!(pod = %tracked.pod, "{message}");
        self.set_status(
            tracked,
            lost_status(last.as_ref(), !replace, reason, message),
        );
        if let Err(e) = self.terminate(&cell.id).await {
            tracing::warn!(cell = %cell.id, "terminating a lost cell: {e}; the garbage collector retries");
        }
        self.refresh_metrics();
        let Some(resolved) = resolved.filter(|_| replace) else {
            return;
        };
        lock(&tracked.state).attempt += 1;
        let inner = self.clone();
        let tracked = tracked.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_secs(1);
            loop {
                let guard = inner.lock_pod(&tracked.pod.uid).await;
                if inner.tracked(&tracked.pod.uid).is_none() || tracked.deleting.is_cancelled() {
                    return; // deleted meanwhile
                }
                let result = inner.ensure_running(&tracked, &resolved).await;
                drop(guard);
                match result {
                    Ok(()) => return,
                    Err(e) if e.is_transient() => {
                        tracing::warn!(pod = %tracked.pod, "starting a replacement cell: {e}");
                    }
                    Err(e) => {
                        let last = lock(&tracked.state).status.clone();
                        inner.set_status(
                            &tracked,
                            lost_status(
                                last.as_ref(),
                                true,
                                REASON_CELL_LOST,
                                format!("no replacement cell: {e}"),
                            ),
                        );
                        return;
                    }
                }
                tokio::select! {
                    () = inner.shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        });
    }

    pub(crate) fn refresh_metrics(&self) {
        let mut cells: Vec<CellSummary> = lock(&self.pods)
            .values()
            .filter_map(|t| lock(&t.state).cell.as_ref().map(|c| c.summary.clone()))
            .collect();
        // Idle standby cells cost the same.
        cells.extend(lock(&self.standby.summaries).iter().cloned());
        self.metrics.set(&cells);
    }

    /// One pass of the garbage collector.
    async fn collect_garbage(self: &Arc<Self>) {
        let cells = match self.backend.list(&self.settings.controller_id).await {
            Ok(cells) => {
                *lock(&self.backend_healthy) = Ok(());
                cells
            }
            Err(e) => {
                tracing::warn!("garbage collection: listing cells: {e}");
                *lock(&self.backend_healthy) =
                    Err(format!("the cells backend does not answer: {e}"));
                return;
            }
        };
        self.adopt_untracked(&cells);
        let grace = self.settings.gc_grace_period;
        for cell in &cells {
            let Some(identity) = &cell.identity else {
                continue;
            };
            if identity.node != self.settings.node_name || cell.state.is_ending() {
                continue;
            }
            let Some(tracked) = self.tracked(&identity.pod_uid) else {
                continue;
            };
            let old_enough = cell
                .launch_time
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age >= grace);
            let (current, finished_for, retired) = {
                let state = lock(&tracked.state);
                (
                    state.cell.as_ref().map(|c| c.id.clone()),
                    state.finished_since.map(|t| t.elapsed()),
                    state.retired,
                )
            };
            let duplicate = current.as_ref().is_some_and(|id| id != &cell.id);
            if duplicate && old_enough {
                tracing::warn!(pod = %tracked.pod, cell = %cell.id, "terminating a second cell of one pod");
                if let Err(e) = self.terminate(&cell.id).await {
                    tracing::warn!(cell = %cell.id, "{e}");
                }
                continue;
            }
            let finished_long_ago =
                finished_for.is_some_and(|d| d >= self.settings.finished_pod_retention);
            if (finished_long_ago || retired) && current.as_ref() == Some(&cell.id) {
                let _guard = self.lock_pod(&identity.pod_uid).await;
                {
                    let mut state = lock(&tracked.state);
                    state.retired = true;
                    state.cell = None;
                    if let Some(w) = state.watcher.take() {
                        w.cancel();
                    }
                }
                tracing::info!(pod = %tracked.pod, cell = %cell.id, "the pod finished: terminating its cell");
                if let Err(e) = self.terminate(&cell.id).await {
                    tracing::warn!(cell = %cell.id, "{e}");
                }
            } else if retired && current.is_none() {
                // A retired pod whose termination failed earlier.
                let _ = self.terminate(&cell.id).await;
            }
        }
        self.refresh_metrics();
    }
}

/// Follows one cell's agent with long-polls until cancelled or the cell is lost.
async fn watch_cell(
    inner: std::sync::Weak<Inner>,
    tracked: Arc<TrackedPod>,
    token: CancellationToken,
) {
    let mut after: Option<u64> = None;
    let mut last_ok = Instant::now();
    // Whether the cell's agent answered this watcher: until then the cell may be booting
    // (adopted after a restart while it booted) and is given its boot deadline.
    let mut answered = false;
    let watching_since = Instant::now();
    loop {
        let Some(this) = inner.upgrade() else { return };
        let Some(cell) = lock(&tracked.state).cell.clone() else {
            return;
        };
        let wait = this.settings.status_wait;
        let retry = this.settings.retry_interval;
        let answer = match &cell.client {
            Some(client) => Some(client.pod_status(after, wait).await),
            None => None,
        };
        match answer {
            Some(Ok(response)) => {
                last_ok = Instant::now();
                answered = true;
                after = Some(response.version);
                if response.uid.as_deref() == Some(tracked.pod.uid.as_str()) {
                    tracing::debug!(
                        pod = %tracked.pod,
                        cell = %cell.id,
                        phase = response.status.phase.as_deref().unwrap_or_default(),
                        version = response.version,
                        "the agent reports the pod's status"
                    );
                    lock(&tracked.state).applied = true;
                    let status =
                        running_status(&response.status, &cell.summary, tracked.host_network);
                    this.set_status(&tracked, status);
                }
                continue;
            }
            Some(Err(error)) => {
                if token.is_cancelled() {
                    return;
                }
                tracing::debug!(pod = %tracked.pod, cell = %cell.id, "agent status: {error}");
            }
            None => {}
        }
        // No answer: ask the backend whether the cell still exists.
        let mut stopped = false;
        let gone = match this.backend.describe(&cell.id).await {
            Ok(described) if described.state.is_ending() => {
                Some(format!("the backend reports it {}", described.state))
            }
            Ok(described) => {
                stopped = matches!(described.state, CellState::Stopped | CellState::Stopping);
                if cell.client.is_none() && described.management_ip.is_some() {
                    let view = this.view(&described, cell.summary.price_per_hour);
                    let mut state = lock(&tracked.state);
                    if state.cell.as_ref().map(|c| &c.id) == Some(&cell.id) {
                        state.cell = Some(view);
                    }
                }
                None
            }
            Err(BackendError::NotFound { .. }) => Some("the backend no longer knows it".to_owned()),
            Err(_) => None,
        };
        let unreachable_for = last_ok.elapsed();
        let boot_deadline = this
            .launch_deadline(&cell)
            .unwrap_or(watching_since + this.settings.boot_timeout);
        // A stopped cell is not booting (its agent process is gone). A cell whose agent never
        // answered is judged by the pod's create, which waits for it until its boot deadline,
        // once the node has asked for the pod; until then, by that deadline here.
        let claimed = lock(&tracked.state).resolved.is_some();
        let booting = !answered && !stopped && (claimed || Instant::now() < boot_deadline);
        if booting && unreachable_for >= this.settings.health_timeout {
            tracing::debug!(
                pod = %tracked.pod,
                cell = %cell.id,
                silent_for = unreachable_for.as_secs(),
                "the cell's agent has not answered yet: waiting for it to boot"
            );
        }
        let lost = gone.map(|why| (REASON_CELL_LOST, why)).or_else(|| {
            (unreachable_for >= this.settings.health_timeout && !booting).then(|| {
                if answered || stopped {
                    (
                        REASON_CELL_LOST,
                        format!(
                            "its agent did not answer for {}s",
                            unreachable_for.as_secs()
                        ),
                    )
                } else {
                    // The same failure as the pod's create waiting for the cell: one message.
                    let timed_out = BootError::TimedOut {
                        cell: cell.id.clone(),
                        timeout: this.settings.boot_timeout,
                        port: this.settings.agent.port,
                        last_error: format!("no answer for {}s", unreachable_for.as_secs()),
                    };
                    (timed_out.reason(), timed_out.to_string())
                }
            })
        });
        if let Some((reason, why)) = lost {
            if token.is_cancelled() || lock(&tracked.state).retired {
                return;
            }
            this.cell_lost(&tracked, &cell, reason, why).await;
            return;
        }
        drop(this);
        tokio::time::sleep(retry).await;
    }
}

#[async_trait::async_trait]
impl Provider for CellsProvider {
    async fn create_pod(&self, pod: &ResolvedPod) -> updraft_provider::Result<()> {
        let pod_ref = PodRef::of(&pod.pod);
        if pod_ref.uid.is_empty() {
            return Err(ProviderError::invalid_input("the pod has no UID"));
        }
        let inner = &self.inner;
        let _guard = inner.lock_pod(&pod_ref.uid).await;
        let spec = pod.pod.spec.clone().unwrap_or_default();
        let tracked = {
            let mut pods = lock(&inner.pods);
            pods.entry(pod_ref.uid.clone())
                .or_insert_with(|| {
                    Arc::new(TrackedPod::new(
                        pod_ref.clone(),
                        spec.host_network == Some(true),
                        spec.restart_policy.as_deref() == Some("Never"),
                        PodState::default(),
                    ))
                })
                .clone()
        };
        let result = inner.ensure_cell(&tracked, pod).await.map(|_| ());
        if result.is_ok() {
            inner.spawn_boot(&tracked);
        }
        if let Err(e) = &result
            && !e.is_transient()
        {
            // Nothing was started (the type could not be chosen, the bootstrap is invalid):
            // forget the pod so that it is not listed as running.
            let has_cell = lock(&tracked.state).cell.is_some();
            if !has_cell {
                lock(&inner.pods).remove(&pod_ref.uid);
            }
        }
        result
    }

    async fn update_pod(&self, pod: &ResolvedPod) -> updraft_provider::Result<()> {
        let pod_ref = PodRef::of(&pod.pod);
        let inner = &self.inner;
        let _guard = inner.lock_pod(&pod_ref.uid).await;
        let Some(tracked) = inner.tracked(&pod_ref.uid) else {
            return Err(ProviderError::not_found(format!(
                "pod {pod_ref} has no cell"
            )));
        };
        let cell = {
            let mut state = lock(&tracked.state);
            state.resolved = Some(pod.clone());
            state.cell.clone()
        };
        let Some(client) = cell.as_ref().and_then(|c| c.client.clone()) else {
            return Err(ProviderError::transient(format!(
                "pod {pod_ref}: its cell is not reachable yet"
            )));
        };
        let request = apply_request(
            pod,
            cell.as_ref().and_then(|c| c.interface.clone()),
            inner.settings.pod_network.as_ref(),
        );
        client
            .apply_pod(&request)
            .await
            .map_err(|e| client_error("updating the pod on its cell", e))?;
        Ok(())
    }

    async fn delete_pod(
        &self,
        pod: &PodRef,
        grace_period_seconds: i64,
    ) -> updraft_provider::Result<()> {
        let inner = &self.inner;
        // A create still waiting for the cell's agent holds the pod's lock: tell it to stop
        // waiting, so a booting cell is terminated now rather than after its boot timeout.
        if let Some(tracked) = inner.tracked(&pod.uid) {
            tracked.deleting.cancel();
        }
        let _guard = inner.lock_pod(&pod.uid).await;
        let tracked = inner.tracked(&pod.uid);
        let mut cells: Vec<CellId> = Vec::new();
        if let Some(tracked) = &tracked {
            let (cell, applied) = {
                let mut state = lock(&tracked.state);
                if let Some(w) = state.watcher.take() {
                    w.cancel();
                }
                (state.cell.clone(), state.applied)
            };
            if let Some(cell) = cell {
                if let Some(client) = &cell.client {
                    let grace =
                        Duration::from_secs(u64::try_from(grace_period_seconds).unwrap_or(0));
                    // The agent stops the containers (preStop, SIGTERM, grace, SIGKILL) before
                    // the cell goes; an unreachable agent does not keep the cell alive, and a
                    // cell that never got the pod (still booting) is not waited for.
                    let patience = if applied {
                        grace + Duration::from_secs(30)
                    } else {
                        Duration::from_secs(3)
                    };
                    let stop = tokio::time::timeout(
                        patience,
                        client
                            .clone()
                            .with_timeout(patience)
                            .delete_pod(Some(grace)),
                    )
                    .await;
                    match stop {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::info!(pod = %pod, "stopping the pod on its cell: {e}")
                        }
                        Err(_) => {
                            tracing::info!(pod = %pod, "stopping the pod on its cell timed out")
                        }
                    }
                }
                cells.push(cell.id.clone());
            }
        }
        for cell in inner.listed_cells(&pod.uid).await? {
            if !cells.contains(&cell.id) {
                cells.push(cell.id);
            }
        }
        for id in &cells {
            tracing::info!(pod = %pod, cell = %id, "terminating the pod's cell");
            inner.terminate(id).await?;
        }
        lock(&inner.pods).remove(&pod.uid);
        lock(&inner.pod_locks).remove(&pod.uid);
        inner.refresh_metrics();
        Ok(())
    }

    async fn pod_status(&self, pod: &PodRef) -> updraft_provider::Result<Option<PodStatus>> {
        let Some(tracked) = self.inner.tracked(&pod.uid) else {
            return Ok(None);
        };
        let state = lock(&tracked.state);
        if !state.applied {
            return Ok(None);
        }
        Ok(Some(state.status.clone().unwrap_or_default()))
    }

    async fn list_pods(&self) -> updraft_provider::Result<Vec<ProviderPod>> {
        let cells = self
            .inner
            .backend
            .list(&self.inner.settings.controller_id)
            .await
            .map_err(|e| backend_error("listing cells", e))?;
        self.inner.adopt_untracked(&cells);
        let pods = lock(&self.inner.pods).values().cloned().collect::<Vec<_>>();
        let grace = self.inner.settings.gc_grace_period;
        Ok(pods
            .into_iter()
            // The node deletes listed pods it does not know (its orphan sweep): a cell found in
            // the listing that no pod has asked for is listed only after the grace period.
            .filter(|tracked| {
                tracked.adopted_at.is_none_or(|at| at.elapsed() >= grace)
                    || lock(&tracked.state).resolved.is_some()
            })
            .map(|tracked| {
                let status = lock(&tracked.state).status.clone().unwrap_or_default();
                ProviderPod {
                    pod: tracked.pod.clone(),
                    status,
                }
            })
            .collect())
    }

    fn status_updates(&self) -> Option<BoxStream<'static, PodStatusUpdate>> {
        let receiver = self.inner.updates.subscribe();
        let weak = Arc::downgrade(&self.inner);
        let stream = futures::stream::unfold(
            (receiver, weak, Vec::<PodStatusUpdate>::new()),
            |(mut receiver, weak, mut backlog)| async move {
                loop {
                    if let Some(update) = backlog.pop() {
                        return Some((update, (receiver, weak, backlog)));
                    }
                    match receiver.recv().await {
                        Ok(update) => return Some((update, (receiver, weak, backlog))),
                        Err(broadcast::error::RecvError::Closed) => return None,
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            // Updates were dropped: send every pod's current status instead.
                            let inner = weak.upgrade()?;
                            backlog = lock(&inner.pods)
                                .values()
                                .filter_map(|t| {
                                    lock(&t.state).status.clone().map(|status| PodStatusUpdate {
                                        pod: t.pod.clone(),
                                        status,
                                    })
                                })
                                .collect();
                        }
                    }
                }
            },
        );
        Some(Box::pin(stream))
    }

    fn node_health(&self) -> Option<&dyn updraft_provider::NodeHealth> {
        Some(self)
    }
    fn logs(&self) -> Option<&dyn updraft_provider::ContainerLogs> {
        Some(self)
    }
    fn exec(&self) -> Option<&dyn updraft_provider::ContainerExec> {
        Some(self)
    }
    fn attach(&self) -> Option<&dyn updraft_provider::ContainerAttach> {
        Some(self)
    }
    fn port_forward(&self) -> Option<&dyn updraft_provider::PortForward> {
        Some(self)
    }
    fn stats(&self) -> Option<&dyn updraft_provider::ProviderStats> {
        Some(self)
    }
}

impl CellsProvider {
    /// The agent client of a pod's cell, for the capabilities.
    pub(crate) fn client_of(&self, pod: &PodRef) -> updraft_provider::Result<CellClient> {
        let tracked = self
            .inner
            .tracked(&pod.uid)
            .ok_or_else(|| ProviderError::not_found(format!("pod {pod} runs on no cell")))?;
        let state = lock(&tracked.state);
        state
            .cell
            .as_ref()
            .and_then(|c| c.client.clone())
            .ok_or_else(|| ProviderError::not_found(format!("pod {pod}: its cell is not running")))
    }

    /// The pods with a reachable cell, with their last status.
    pub(crate) fn running_pods(&self) -> Vec<(PodRef, CellClient, Option<PodStatus>)> {
        lock(&self.inner.pods)
            .values()
            .filter_map(|t| {
                let state = lock(&t.state);
                let client = state.cell.as_ref()?.client.clone()?;
                state
                    .applied
                    .then(|| (t.pod.clone(), client, state.status.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn cell_names_are_dns_friendly() {
        let pod = PodRef {
            namespace: "Team_A".into(),
            name: "web.0".into(),
            uid: "u".into(),
        };
        assert_eq!(cell_name("updraft", &pod), "updraft-team-a-web-0");
        let long = PodRef {
            namespace: "n".repeat(60),
            name: "p".into(),
            uid: "u".into(),
        };
        assert_eq!(cell_name("updraft", &long).len(), 63);
    }
}
