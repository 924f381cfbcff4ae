//! Where the pod's interface on each cell comes from (the agent's `PodNetworkConfig.interface`):
//! the local backend knows the bridge and address it gave the cell; other backends use the
//! config's `podNetwork` section and the cell's pod IP; without either the pod has loopback
//! only (unless it uses the host network).

use std::sync::Arc;

use updraft_cell_api::PodInterface;
use updraft_cells_backend::Cell;
use updraft_cells_local::LocalBackend;

use crate::config::CellsConfig;

/// Computes a pod interface from a cell.
type InterfaceFn = dyn Fn(&Cell) -> Option<PodInterface> + Send + Sync;

/// The rule that gives the pod's interface on a cell, derived from the cell.
#[derive(Clone)]
pub struct PodInterfaceSource(Option<Arc<InterfaceFn>>);

impl PodInterfaceSource {
    /// Interfaces computed by `f`.
    pub fn new(
        f: impl Fn(&Cell) -> Option<PodInterface> + Send + Sync + 'static,
    ) -> PodInterfaceSource {
        PodInterfaceSource(Some(Arc::new(f)))
    }

    /// No pod interface: the pod has loopback only (unless it uses the host network).
    pub fn none() -> PodInterfaceSource {
        PodInterfaceSource(None)
    }

    /// The interfaces the local backend wires for its cells.
    pub fn local(local: LocalBackend) -> PodInterfaceSource {
        PodInterfaceSource::new(move |cell: &Cell| {
            local.pod_network(cell).map(|w| PodInterface {
                host_netns: None,
                bridge: w.bridge,
                host_veth: w.host_veth,
                address: w.address,
                prefix_len: w.prefix_len,
                gateway: Some(w.gateway),
            })
        })
    }

    /// The config's `podNetwork` section applied to each cell's pod IP (none without the
    /// section).
    pub fn from_config(config: &CellsConfig) -> PodInterfaceSource {
        let Some(settings) = config.pod_network.clone() else {
            return PodInterfaceSource::none();
        };
        PodInterfaceSource::new(move |cell: &Cell| match cell.pod_ip {
            Some(std::net::IpAddr::V4(address)) => Some(PodInterface {
                host_netns: settings.host_netns.clone(),
                bridge: settings.bridge.clone(),
                host_veth: settings.host_veth.clone(),
                address,
                prefix_len: settings.prefix_len,
                gateway: settings.gateway,
            }),
            _ => None,
        })
    }

    /// The interface for `cell`.
    pub fn interface(&self, cell: &Cell) -> Option<PodInterface> {
        self.0.as_ref().and_then(|f| f(cell))
    }
}

impl std::fmt::Debug for PodInterfaceSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "PodInterfaceSource(..)"
        } else {
            "PodInterfaceSource(none)"
        })
    }
}
