//! Adoption after a restart and garbage collection.
//!
//! - **Adoption**: a cell of this node that the backend lists for a pod this run does not
//!   track is adopted: the pod is tracked with that cell (its supervisor starts `Booting`, see
//!   `lifecycle`), and no second cell is started for it when the node asks for the pod. Until
//!   the node asks, the pod is listed to the node's orphan sweep only once its `gcGracePeriod`
//!   is over.
//! - **Collection**, every `gcInterval`: a second live cell of one pod (a start another process
//!   retried) is terminated once it is older than `gcGracePeriod`; the cell of a pod finished
//!   for `finishedPodRetention` is retired through the pod's supervisor; a retired pod's cell
//!   whose termination failed is terminated again. The pass also records whether the backend
//!   answers (the node's health check).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use updraft_cells_backend::Cell;
use updraft_provider::PodRef;

use crate::lifecycle;
use crate::pods::Stage;
use crate::shared::Shared;
use updraft_common::sync::lock;

/// Tracks the cells in `cells` (of this node, for a pod) whose pod is not tracked yet.
/// Returns how many were adopted.
pub(crate) fn adopt_untracked(shared: &Arc<Shared>, cells: &[Cell]) -> usize {
    let settings = &shared.cells.settings;
    let mut adopted = 0;
    for cell in cells {
        let Some(identity) = &cell.identity else {
            continue;
        };
        if identity.node != settings.node_name
            || identity.pod_uid.is_empty()
            || cell.state.is_ending()
            || shared.tracked(&identity.pod_uid).is_some()
        {
            continue;
        }
        let pod = PodRef {
            namespace: identity.namespace.clone(),
            name: identity.pod_name.clone(),
            uid: identity.pod_uid.clone(),
        };
        let Some(tracked) = lifecycle::adopt(shared, pod, shared.cells.view(cell, None)) else {
            continue;
        };
        tracing::info!(
            pod = %tracked.pod,
            cell = %cell.id,
            state = %cell.state,
            grace_period_seconds = settings.gc_grace_period.as_secs(),
            "adopting a cell found in the backend's listing (if no pod of this node claims it, it is garbage-collected after the grace period)"
        );
        adopted += 1;
    }
    adopted
}

/// One pass of the garbage collector.
pub(crate) async fn collect_garbage(shared: &Arc<Shared>) {
    let settings = &shared.cells.settings;
    let cells = match shared.cells.backend.list(&settings.controller_id).await {
        Ok(cells) => {
            *lock(&shared.backend_healthy) = Ok(());
            cells
        }
        Err(e) => {
            tracing::warn!("garbage collection: listing cells: {e}");
            *lock(&shared.backend_healthy) = Err(format!("the cells backend does not answer: {e}"));
            return;
        }
    };
    adopt_untracked(shared, &cells);
    let grace = settings.gc_grace_period;
    for cell in &cells {
        let Some(identity) = &cell.identity else {
            continue;
        };
        if identity.node != settings.node_name || cell.state.is_ending() {
            continue;
        }
        let Some(tracked) = shared.tracked(&identity.pod_uid) else {
            continue;
        };
        let old_enough = cell
            .launch_time
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age >= grace);
        let (current, finished_for) = {
            let record = tracked.record();
            (
                record.cell.as_ref().map(|c| c.id.clone()),
                record.finished_since.map(|t| t.elapsed()),
            )
        };
        let duplicate = current.as_ref().is_some_and(|id| id != &cell.id);
        if duplicate && old_enough {
            tracing::warn!(pod = %tracked.pod, cell = %cell.id, "terminating a second cell of one pod");
            if let Err(e) = shared.cells.terminate(&cell.id).await {
                tracing::warn!(cell = %cell.id, "{e}");
            }
            continue;
        }
        let finished_long_ago = finished_for.is_some_and(|d| d >= settings.finished_pod_retention);
        if finished_long_ago && current.as_ref() == Some(&cell.id) {
            tracked.retire(cell.id.clone()).await;
        } else if tracked.stage() == Stage::Retired && current.is_none() {
            // A retired pod whose termination failed earlier.
            let _ = shared.cells.terminate(&cell.id).await;
        }
    }
    shared.refresh_metrics();
}

/// Runs [`collect_garbage`] every `interval` until `shutdown` (or the provider is dropped).
pub(crate) fn spawn_collector(shared: &Arc<Shared>, interval: Duration) {
    let weak = Arc::downgrade(shared);
    let shutdown: CancellationToken = shared.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            let Some(shared) = weak.upgrade() else { return };
            collect_garbage(&shared).await;
        }
    });
}
