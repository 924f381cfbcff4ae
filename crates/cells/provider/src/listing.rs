//! What `updraft cells list/describe` show: the backend's cells of a controller with their pod,
//! type and price.

use updraft_cells_backend::{BackendError, Cell, CellBackend, LaunchType};
use updraft_cells_catalog::Catalog;

/// One cell as an operator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct CellRow {
    /// The cell as the backend describes it (id, name, state, IPs, launch time, tags).
    pub cell: Cell,
    /// `namespace/name` of the pod it runs, from its identity (`None` for a standby cell).
    pub pod: Option<String>,
    /// The pod's UID.
    pub pod_uid: Option<String>,
    /// The node that started it.
    pub node: Option<String>,
    /// Hourly price from the catalog for its type and launch type, if known.
    pub price_per_hour: Option<f64>,
    /// The catalog's currency.
    pub currency: String,
}

/// Every cell `backend` lists for `controller_id` (sorted by name), priced from `catalog`.
pub async fn list_cells(
    backend: &dyn CellBackend,
    catalog: &Catalog,
    controller_id: &str,
) -> Result<Vec<CellRow>, BackendError> {
    let mut cells = backend.list(controller_id).await?;
    cells.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    Ok(cells
        .into_iter()
        .map(|cell| {
            let price_per_hour =
                catalog
                    .get(&cell.instance_type)
                    .and_then(|t| match cell.launch_type {
                        LaunchType::Spot => t.spot_per_hour,
                        LaunchType::OnDemand => Some(t.on_demand_per_hour),
                    });
            // A standby cell runs no pod yet.
            let identity = cell.identity.clone();
            let pod_identity = identity.as_ref().filter(|i| !i.is_standby());
            CellRow {
                pod: pod_identity.map(|i| format!("{}/{}", i.namespace, i.pod_name)),
                pod_uid: pod_identity.map(|i| i.pod_uid.clone()),
                node: identity.map(|i| i.node),
                price_per_hour,
                currency: catalog.currency.clone(),
                cell,
            }
        })
        .collect())
}
