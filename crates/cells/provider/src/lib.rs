//! The cells provider of Updraft: every pod bound to the virtual node gets its own *cell* (an
//! instance sized for it by the cost engine) through a [`CellBackend`](updraft_cells_backend::CellBackend),
//! and the cell agent `updraft-cell` runs it behind mutual TLS.
//!
//! - [`CellsConfig`]: the provider's YAML config ([`CellsConfig::load`]).
//! - [`connect_backend`]: the configured backend (`local` or `aws`).
//! - [`CellsProvider`]: the [`Provider`](updraft_provider::Provider) with every capability
//!   (status stream, health, logs, exec, attach, port-forward, stats).
//! - [`list_cells`]: the cells of a controller with pod, type and price, for `updraft cells`.
//! - [`selector`]: the instance selector of a config, for `updraft cells select`.
//!
//! # Layout
//! Set-up and the `Provider` impl in `provider`; per pod one supervisor task with an explicit
//! state machine in `lifecycle` (the pod's record and commands in `pods`, its deletion in
//! `deletion`); adoption after a restart and garbage collection in `gc`; the standby pool in
//! `standby`; what a cell is made from and single backend calls in `cells`; the agent seam in
//! `agent`; the translations in `pod_status`, `apply_request`, `bootstrap` and
//! `cell_summary`.
//!
//! # What the pod shows
//! The chosen instance type and hourly price are written to the pod as the status condition
//! `cells.updraft.dev/Cell` (the [`Provider`](updraft_provider::Provider) trait can change only
//! a pod's status, not its annotations): `kubectl describe pod` shows e.g. `cell i-0123
//! (10.0.0.5): t3.small on-demand, 0.0208 USD/h`. The same numbers are metrics
//! (`updraft_cells`, `updraft_cells_spend_per_hour`, `updraft_cells_total_spend_per_hour`).
#![forbid(unsafe_code)]

mod agent;
mod apply_request;
mod backends;
mod bootstrap;
mod cell_summary;
mod cells;
pub mod config;
mod deletion;
mod errors;
mod gc;
mod lifecycle;
mod listing;
mod metrics;
pub mod pki;
mod pod_interface;
mod pod_status;
mod pods;
mod provider;
mod settings;
mod shared;
mod standby;
mod streams;

pub use backends::{BackendSetupError, aws_config, connect_backend, local as local_backend};
pub use cell_summary::CellSummary;
pub use config::{BackendKind, CellsConfig, ConfigError, StandbySettings, load_catalog};
pub use listing::{CellRow, list_cells};
pub use metrics::{CellTypeLabels, CellsMetrics};
pub use pod_interface::PodInterfaceSource;
pub use pod_status::{
    CELL_CONDITION, REASON_CELL_BOOT_TIMEOUT, REASON_CELL_LOST, REASON_CELL_RUNNING,
    REASON_CELL_STARTING,
};
pub use provider::{CellsProvider, SetupError, selector};
pub use settings::{ProviderSettings, REFILL_QUIET_PERIOD};
pub use standby::StandbyEntry;

#[cfg(test)]
mod tests;
