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
//! # What the pod shows
//! The chosen instance type and hourly price are written to the pod as the status condition
//! `cells.updraft.dev/Cell` (the [`Provider`](updraft_provider::Provider) trait can change only
//! a pod's status, not its annotations): `kubectl describe pod` shows e.g. `cell i-0123
//! (10.0.0.5): t3.small on-demand, 0.0208 USD/h`. The same numbers are metrics
//! (`updraft_cells`, `updraft_cells_spend_per_hour`, `updraft_cells_total_spend_per_hour`).
#![forbid(unsafe_code)]

mod backends;
pub mod config;
mod listing;
mod metrics;
pub mod pki;
mod provider;
mod streams;
pub mod translate;

pub use backends::{
    BackendSetupError, PodWiring, aws_config, connect_backend, local as local_backend,
};
pub use config::{BackendKind, CellsConfig, ConfigError, StandbySettings};
pub use listing::{CellRow, list_cells};
pub use metrics::{CellTypeLabels, CellsMetrics};
pub use provider::{
    CellsProvider, ProviderSettings, SetupError, StandbyEntry, load_catalog, selector,
};

#[cfg(test)]
mod tests;
