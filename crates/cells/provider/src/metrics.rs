//! The provider's metrics: cells by instance type and launch type, and the hourly spend.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::cell_summary::CellSummary;

/// Labels of the per-type gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CellTypeLabels {
    /// Instance type.
    pub instance_type: String,
    /// `on-demand` or `spot`.
    pub launch_type: String,
}

/// The gauges, shared with the registry they are registered in.
#[derive(Clone, Debug, Default)]
pub struct CellsMetrics {
    /// Cells that exist, by type.
    pub cells: Family<CellTypeLabels, Gauge>,
    /// Hourly price of the cells that exist, by type (catalog currency).
    pub spend_per_hour: Family<CellTypeLabels, Gauge<f64, AtomicU64>>,
    /// Hourly price of all cells.
    pub total_spend_per_hour: Gauge<f64, AtomicU64>,
}

impl CellsMetrics {
    /// Registers the gauges (names get the registry's prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "cells",
            "Cells running pods of this node, by instance type and launch type",
            self.cells.clone(),
        );
        registry.register(
            "cells_spend_per_hour",
            "Hourly price of this node's cells by instance type and launch type (catalog prices)",
            self.spend_per_hour.clone(),
        );
        registry.register(
            "cells_total_spend_per_hour",
            "Hourly price of all of this node's cells (catalog prices)",
            self.total_spend_per_hour.clone(),
        );
    }

    /// Sets the gauges from the cells that exist now.
    pub fn set(&self, cells: &[CellSummary]) {
        self.cells.clear();
        self.spend_per_hour.clear();
        let mut total = 0.0;
        for cell in cells {
            let labels = CellTypeLabels {
                instance_type: cell.instance_type.clone(),
                launch_type: cell.launch_type.clone(),
            };
            self.cells.get_or_create(&labels).inc();
            let price = cell.price_per_hour.unwrap_or(0.0);
            self.spend_per_hour.get_or_create(&labels).inc_by(price);
            total += price;
        }
        self.total_spend_per_hour.set(total);
    }
}
