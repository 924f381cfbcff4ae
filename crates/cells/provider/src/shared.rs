//! What the provider's parts share: the cells, the standby pool, the tracked pods, the status
//! broadcast, the Service routes and the metrics. The `Provider` impl, the supervisors and the garbage collector
//! all hold it; none of them holds another's state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::PodStatus;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use updraft_cell_api::services::ServiceRoutes;
use updraft_provider::PodStatusUpdate;

use crate::cell_summary::CellSummary;
use crate::cells::Cells;
use crate::metrics::CellsMetrics;
use crate::pod_status::is_finished;
use crate::pods::TrackedPod;
use crate::standby::StandbyPool;
use updraft_common::sync::lock;

/// The provider's shared state.
pub(crate) struct Shared {
    pub(crate) cells: Cells,
    pub(crate) standby: StandbyPool,
    /// The tracked pods by UID: one [`TrackedPod`] (and so one supervisor) per pod.
    pods: Mutex<HashMap<String, Arc<TrackedPod>>>,
    updates: broadcast::Sender<PodStatusUpdate>,
    pub(crate) metrics: CellsMetrics,
    /// The node's latest Service routes, the one copy every supervisor pushes to its cell
    /// (version 0: none yet).
    pub(crate) routes: watch::Sender<Arc<ServiceRoutes>>,
    /// The outcome of the garbage collector's last listing (the node's health check).
    pub(crate) backend_healthy: Mutex<Result<(), String>>,
    /// Stops the supervisors and loops; cells keep running (a later provider adopts them).
    pub(crate) shutdown: CancellationToken,
}

impl Shared {
    pub(crate) fn new(cells: Cells) -> Shared {
        let (updates, _) = broadcast::channel(4096);
        Shared {
            cells,
            standby: StandbyPool::default(),
            pods: Mutex::new(HashMap::new()),
            updates,
            metrics: CellsMetrics::default(),
            routes: watch::Sender::new(Arc::new(ServiceRoutes::default())),
            backend_healthy: Mutex::new(Ok(())),
            shutdown: CancellationToken::new(),
        }
    }

    pub(crate) fn tracked(&self, uid: &str) -> Option<Arc<TrackedPod>> {
        lock(&self.pods).get(uid).cloned()
    }

    /// Every tracked pod.
    pub(crate) fn all(&self) -> Vec<Arc<TrackedPod>> {
        lock(&self.pods).values().cloned().collect()
    }

    /// The pod of `uid`, or the one `make` makes (tracked from now on); `true` when it is new.
    pub(crate) fn track(
        &self,
        uid: &str,
        make: impl FnOnce() -> Arc<TrackedPod>,
    ) -> (Arc<TrackedPod>, bool) {
        let mut pods = lock(&self.pods);
        if let Some(tracked) = pods.get(uid) {
            return (tracked.clone(), false);
        }
        let tracked = make();
        pods.insert(uid.to_owned(), tracked.clone());
        (tracked, true)
    }

    /// Forgets `tracked` (not a newer pod of the same UID).
    pub(crate) fn forget(&self, tracked: &Arc<TrackedPod>) {
        let mut pods = lock(&self.pods);
        if pods
            .get(&tracked.pod.uid)
            .is_some_and(|t| Arc::ptr_eq(t, tracked))
        {
            pods.remove(&tracked.pod.uid);
        }
    }

    /// A receiver of every status published from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<PodStatusUpdate> {
        self.updates.subscribe()
    }

    /// Records `status` as the pod's and publishes it, only when it changed.
    pub(crate) fn set_status(&self, tracked: &TrackedPod, status: PodStatus) {
        {
            let mut record = tracked.record();
            if record.status.as_ref() == Some(&status) {
                return;
            }
            if is_finished(&status) {
                record.finished_since.get_or_insert_with(Instant::now);
            } else {
                record.finished_since = None;
            }
            record.status = Some(status.clone());
        }
        // No receiver yet (the node subscribes once it runs) is fine: pod_status answers.
        let _ = self.updates.send(PodStatusUpdate {
            pod: tracked.pod.clone(),
            status,
        });
    }

    /// Sets the gauges from the pods' cells and the idle standby cells (which cost the same).
    pub(crate) fn refresh_metrics(&self) {
        let mut cells: Vec<CellSummary> = self
            .all()
            .iter()
            .filter_map(|t| t.record().cell.as_ref().map(|c| c.summary.clone()))
            .collect();
        cells.extend(lock(&self.standby.summaries).iter().cloned());
        self.metrics.set(&cells);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
