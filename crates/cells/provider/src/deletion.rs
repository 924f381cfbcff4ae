//! Deleting a pod: not a state of its supervisor but its end. The node's delete cancels the
//! pod's `deleting` token (every wait of the supervisor ends at once), waits until the task
//! has ended, so that nothing starts or replaces a cell meanwhile, then stops the pod on its
//! agent and terminates every cell of the pod. A delete that fails (the backend does not
//! answer) leaves the pod tracked; the node's retry does the rest.

use std::sync::Arc;
use std::time::Duration;

use updraft_cells_backend::CellId;
use updraft_provider::{PodRef, ProviderError};

use crate::shared::Shared;

/// How long a delete waits for the agent to stop a pod it never ran.
const UNAPPLIED_STOP_PATIENCE: Duration = Duration::from_secs(3);
/// What a delete waits for the agent beyond the pod's grace period.
const STOP_PATIENCE_BEYOND_GRACE: Duration = Duration::from_secs(30);

/// Deletes pod `pod`: its supervisor is stopped (a boot in progress stops waiting at once),
/// the agent stops the containers (preStop, SIGTERM, grace, SIGKILL) before the cell goes,
/// and every cell of the pod is terminated, also ones the backend lists that this run never
/// tracked. An unreachable agent does not keep the cell alive, and a cell that never got the
/// pod (still booting) is not waited for.
pub(crate) async fn delete(
    shared: &Arc<Shared>,
    pod: &PodRef,
    grace_period_seconds: i64,
) -> Result<(), ProviderError> {
    let tracked = shared.tracked(&pod.uid);
    let mut cells: Vec<CellId> = Vec::new();
    if let Some(tracked) = &tracked {
        tracked.deleting.cancel();
        tracked.stopped.cancelled().await;
        let (cell, applied) = {
            let record = tracked.record();
            (record.cell.clone(), record.applied)
        };
        if let Some(cell) = cell {
            if let Some(agent) = shared.cells.agent(&cell) {
                let grace = Duration::from_secs(u64::try_from(grace_period_seconds).unwrap_or(0));
                let patience = if applied {
                    grace + STOP_PATIENCE_BEYOND_GRACE
                } else {
                    UNAPPLIED_STOP_PATIENCE
                };
                match tokio::time::timeout(patience, agent.delete_pod(grace)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::info!(pod = %pod, "stopping the pod on its cell: {e}"),
                    Err(_) => tracing::info!(pod = %pod, "stopping the pod on its cell timed out"),
                }
            }
            cells.push(cell.id);
        }
    }
    for cell in shared.cells.listed_for(&pod.uid).await? {
        if !cells.contains(&cell.id) {
            cells.push(cell.id);
        }
    }
    for id in &cells {
        tracing::info!(pod = %pod, cell = %id, "terminating the pod's cell");
        shared.cells.terminate(id).await?;
    }
    if let Some(tracked) = &tracked {
        shared.forget(tracked);
    }
    shared.refresh_metrics();
    Ok(())
}
