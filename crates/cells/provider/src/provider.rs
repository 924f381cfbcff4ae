//! The cells provider: one cell per pod. This file sets it up (backend, catalog, CA,
//! cloud-init, adoption of the cells an earlier run left, the garbage collector and the
//! standby pool's loop) and implements [`Provider`] by handing each call to the pod's
//! supervisor (`lifecycle`) or reading what it published.
//!
//! State lives in the backend and on the cells, not here: the pods are rebuilt from
//! [`CellBackend::list`] (cells carry the pod's identity, `gc`) and from each agent's answers.
//!
//! **A lost cell** (the backend says it is gone, or its agent stays unreachable past
//! `healthTimeout`): the pod's status says `CellLost`. With `restartPolicy: Never` (or when
//! the pod's resolved inputs are unknown because the cell was adopted after a restart) the
//! pod becomes `Failed` and its controller (ReplicaSet, Job) replaces it; otherwise the
//! provider starts a replacement cell for the same pod (a new idempotency token), and the
//! pod goes `Pending` → `Running` again.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::PodStatus;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::{CancellationToken, DropGuard};
use updraft_cell_api::CellClient;
use updraft_cells_backend::cloud_init::CloudConfig;
use updraft_cells_backend::{BackendError, CellBackend, LaunchType};
use updraft_cells_catalog::{SelectionPolicy, Selector};
use updraft_provider::{
    PodRef, PodStatusUpdate, Provider, ProviderError, ProviderPod, ResolvedPod,
};

use crate::agent::AgentConnector;
use crate::backends::{BackendSetupError, provider_backend};
use crate::cells::Cells;
use crate::config::{CellsConfig, load_catalog};
use crate::deletion;
use crate::errors::backend_error;
use crate::gc::{adopt_untracked, collect_garbage, spawn_collector};
use crate::lifecycle;
use crate::pki::{CellsPki, PkiError};
use crate::pod_interface::PodInterfaceSource;
use crate::settings::ProviderSettings;
use crate::shared::Shared;
use crate::standby::StandbyEntry;
use updraft_common::sync::lock;

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
    Pki(#[from] PkiError),
    /// The backend could not be set up.
    #[error(transparent)]
    Backend(#[from] BackendSetupError),
    /// A standby pool entry cannot work with the catalog.
    #[error("cells provider config: {field}: {message}")]
    Standby {
        /// The field, e.g. `standbyPool[0].instanceType`.
        field: String,
        /// What is wrong and what to write instead.
        message: String,
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

/// The instance selector of `config` (what `updraft cells select` uses too).
pub fn selector(config: &CellsConfig) -> Result<Selector, SetupError> {
    let catalog = load_catalog(config)?;
    Ok(Selector::new(
        catalog,
        SelectionPolicy::new(config.default_instance_type()),
    )?)
}

/// The cells provider. Cloning shares it; dropping the last clone stops its tasks (as
/// [`CellsProvider::shutdown`]).
#[derive(Clone)]
pub struct CellsProvider {
    pub(crate) inner: Arc<Shared>,
    /// The supervisors hold the shared state too: the last handle's drop stops them.
    _stop_on_drop: Arc<DropGuard>,
}

impl CellsProvider {
    /// The provider of `config` for node `node_name`: connects the configured backend, then
    /// [`CellsProvider::start`].
    pub async fn from_config(
        config: &CellsConfig,
        node_name: &str,
    ) -> Result<CellsProvider, SetupError> {
        let (backend, interfaces) = provider_backend(config).await?;
        Self::start_with_interfaces(config, node_name, backend, interfaces).await
    }

    /// Loads the CA, the catalog and the cloud-init file, adopts the cells `backend` already
    /// runs for this controller and node, and starts the garbage collector.
    pub async fn start(
        config: &CellsConfig,
        node_name: &str,
        backend: Arc<dyn CellBackend>,
    ) -> Result<CellsProvider, SetupError> {
        let interfaces = PodInterfaceSource::from_config(config);
        Self::start_with_interfaces(config, node_name, backend, interfaces).await
    }

    async fn start_with_interfaces(
        config: &CellsConfig,
        node_name: &str,
        backend: Arc<dyn CellBackend>,
        interfaces: PodInterfaceSource,
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
        settings.pod_interfaces = interfaces;
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
        Self::with_agents(settings, backend, selector, cloud_init, pki, None).await
    }

    /// [`CellsProvider::with_parts`] whose supervisors reach the agents through `agents`
    /// (the real API when `None`; the lifecycle's tests use in-memory agents).
    pub(crate) async fn with_agents(
        settings: ProviderSettings,
        backend: Arc<dyn CellBackend>,
        selector: Selector,
        cloud_init: Option<CloudConfig>,
        pki: CellsPki,
        agents: Option<Arc<dyn AgentConnector>>,
    ) -> Result<CellsProvider, SetupError> {
        let gc_interval = settings.gc_interval;
        let cells = Cells::new(settings, backend, selector, cloud_init, pki, agents);
        let shared = Arc::new(Shared::new(cells));
        let provider = CellsProvider {
            _stop_on_drop: Arc::new(shared.shutdown.clone().drop_guard()),
            inner: shared,
        };
        let shared = &provider.inner;
        let controller_id = &shared.cells.settings.controller_id;
        let cells = shared
            .cells
            .backend
            .list(controller_id)
            .await
            .map_err(|source| SetupError::List {
                controller_id: controller_id.clone(),
                source,
            })?;
        let adopted = adopt_untracked(shared, &cells);
        if adopted > 0 {
            tracing::info!(cells = adopted, "adopted the cells of an earlier run");
        }
        shared.refresh_metrics();
        spawn_collector(shared, gc_interval);
        Ok(provider)
    }

    /// The selector in use.
    pub fn selector(&self) -> &Selector {
        &self.inner.cells.selector
    }

    /// The backend in use.
    pub fn backend(&self) -> Arc<dyn CellBackend> {
        self.inner.cells.backend.clone()
    }

    /// Registers the provider's metrics (cells by type, spend per hour) in `registry`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.inner.metrics.register(registry);
    }

    /// Keeps the standby pool at `entries` (idle pre-started cells per instance type) from now
    /// on: checks them against the catalog, then starts the pool's reconcile loop, or only
    /// changes its entries when it runs already.
    pub fn start_standby_pool(&self, entries: Vec<StandbyEntry>) -> Result<(), SetupError> {
        let catalog = self.inner.cells.selector.catalog();
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
        let pool = &self.inner.standby;
        *lock(&pool.entries) = entries;
        pool.wake.notify_one();
        if !pool.running.swap(true, std::sync::atomic::Ordering::SeqCst) {
            tokio::spawn(run_standby_pool(
                Arc::downgrade(&self.inner),
                self.inner.shutdown.clone(),
                self.inner.cells.settings.gc_interval,
                pool.wake.clone(),
            ));
        }
        Ok(())
    }

    /// Runs one pass of the standby pool's reconcile loop now.
    pub async fn reconcile_standby_pool(&self) {
        reconcile_standby(&self.inner).await;
    }

    /// Runs one garbage-collection pass now (the loop runs every `gcInterval`).
    pub async fn collect_garbage(&self) {
        collect_garbage(&self.inner).await;
    }

    /// Stops the background tasks; cells keep running (a later provider adopts them).
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }
}

async fn reconcile_standby(shared: &Shared) {
    shared
        .standby
        .reconcile(&shared.cells, &shared.shutdown)
        .await;
    shared.refresh_metrics();
}

/// The standby pool's reconcile loop: a pass every `gcInterval`, and after pod demand once
/// pods have been quiet for the quiet period (see `standby`).
async fn run_standby_pool(
    shared: Weak<Shared>,
    shutdown: CancellationToken,
    interval: Duration,
    wake: Arc<Notify>,
) {
    loop {
        let next_pass = {
            let Some(this) = shared.upgrade() else { return };
            match this
                .standby
                .quiet_remaining(this.cells.settings.refill_quiet_period)
            {
                Some(quiet_remaining) => quiet_remaining,
                None => {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = reconcile_standby(&this) => {}
                    }
                    interval
                }
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = wake.notified() => {}
            () = tokio::time::sleep(next_pass) => {}
        }
    }
}

#[async_trait::async_trait]
impl Provider for CellsProvider {
    async fn create_pod(&self, pod: &ResolvedPod) -> updraft_provider::Result<()> {
        let pod_ref = PodRef::of(&pod.pod);
        if pod_ref.uid.is_empty() {
            return Err(ProviderError::invalid_input("the pod has no UID"));
        }
        // Returns once the pod has a cell; its supervisor waits for the boot.
        lifecycle::track_for_node(&self.inner, pod_ref)
            .create(pod)
            .await
    }

    async fn update_pod(&self, pod: &ResolvedPod) -> updraft_provider::Result<()> {
        let pod_ref = PodRef::of(&pod.pod);
        let Some(tracked) = self.inner.tracked(&pod_ref.uid) else {
            return Err(ProviderError::not_found(format!(
                "pod {pod_ref} has no cell"
            )));
        };
        tracked.update(pod).await
    }

    async fn delete_pod(
        &self,
        pod: &PodRef,
        grace_period_seconds: i64,
    ) -> updraft_provider::Result<()> {
        deletion::delete(&self.inner, pod, grace_period_seconds).await
    }

    async fn pod_status(&self, pod: &PodRef) -> updraft_provider::Result<Option<PodStatus>> {
        let Some(tracked) = self.inner.tracked(&pod.uid) else {
            return Ok(None);
        };
        let record = tracked.record();
        if !record.applied {
            return Ok(None);
        }
        Ok(Some(record.status.clone().unwrap_or_default()))
    }

    async fn list_pods(&self) -> updraft_provider::Result<Vec<ProviderPod>> {
        let shared = &self.inner;
        let cells = shared
            .cells
            .backend
            .list(&shared.cells.settings.controller_id)
            .await
            .map_err(|e| backend_error("listing cells", e))?;
        adopt_untracked(shared, &cells);
        let grace = shared.cells.settings.gc_grace_period;
        Ok(shared
            .all()
            .into_iter()
            // The node deletes listed pods it does not know (its orphan sweep): a cell found in
            // the listing that no pod has asked for is listed only after the grace period.
            .filter(|tracked| {
                tracked.adopted_at.is_none_or(|at| at.elapsed() >= grace) || tracked.claimed()
            })
            .map(|tracked| ProviderPod {
                status: tracked.record().status.clone().unwrap_or_default(),
                pod: tracked.pod.clone(),
            })
            .collect())
    }

    fn status_updates(&self) -> Option<BoxStream<'static, PodStatusUpdate>> {
        let receiver = self.inner.subscribe();
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
                            let shared = weak.upgrade()?;
                            backlog = shared
                                .all()
                                .iter()
                                .filter_map(|t| {
                                    let status = t.record().status.clone()?;
                                    Some(PodStatusUpdate {
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
    fn service_routing(&self) -> Option<&dyn updraft_provider::ServiceRouting> {
        Some(self)
    }
}

/// Every pod's supervisor pushes the latest table to its cell (see `lifecycle`).
impl updraft_provider::ServiceRouting for CellsProvider {
    fn routes_changed(&self, routes: Arc<updraft_cell_api::services::ServiceRoutes>) {
        self.inner.routes.send_replace(routes);
    }
}

impl CellsProvider {
    /// The agent client of a pod's cell, for the capabilities.
    pub(crate) fn client_of(&self, pod: &PodRef) -> updraft_provider::Result<CellClient> {
        let tracked = self
            .inner
            .tracked(&pod.uid)
            .ok_or_else(|| ProviderError::not_found(format!("pod {pod} runs on no cell")))?;
        let record = tracked.record();
        record
            .cell
            .as_ref()
            .and_then(|c| self.inner.cells.client(c))
            .ok_or_else(|| ProviderError::not_found(format!("pod {pod}: its cell is not running")))
    }

    /// The pods with a reachable cell, with their last status.
    pub(crate) fn running_pods(&self) -> Vec<(PodRef, CellClient, Option<PodStatus>)> {
        self.inner
            .all()
            .iter()
            .filter_map(|t| {
                let record = t.record();
                let client = self.inner.cells.client(record.cell.as_ref()?)?;
                record
                    .applied
                    .then(|| (t.pod.clone(), client, record.status.clone()))
            })
            .collect()
    }
}
