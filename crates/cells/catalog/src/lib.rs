//! The cost engine of the cells provider: which instance type a pod's cell gets, and what it
//! costs.
//!
//! - [`Catalog`]: instance types of one region (vCPUs, memory, GPUs, architecture, burstable
//!   baseline, on-demand and spot price per hour). Two are built in:
//!   - `aws-us-east-1` (`data/aws-us-east-1.json`, 139 types of the t3, t4g, m5, m6i, m6g, m7g,
//!     c5, c5a, c6i, c6g, c7g, r5, r6i, r6g, g4dn, g5, g5g and p3 families). **Where the numbers
//!     come from:** on-demand prices are the AWS public EC2 list prices for Linux, shared
//!     tenancy, us-east-1, as the authors knew them in 2026; spot prices are an *illustrative*
//!     snapshot (a per-family fraction of on-demand typical of spot history), not quotes. Both
//!     are approximate: real deployments should override the catalog with their own file
//!     ([`Catalog::from_path`], the provider's `catalogFile`).
//!   - `local` (`data/local.json`): a few synthetic sizes for the local backend with nominal
//!     prices proportional to size, so the smallest fitting cell wins.
//! - [`PodRequest::from_pod_spec`]: the pod's effective request as Kubernetes computes it.
//! - [`CellAnnotations::parse`]: `cells.updraft.dev/…` (and Kip's `pod.elotl.co/…`) annotations.
//! - [`Selector::select`]: the cheapest fitting type, a [`Decision`] with the reason and the
//!   runners-up, or a [`SelectionError`] that names what no type offers.
//!
//! ```
//! use updraft_cells_catalog::{Catalog, Demand, PodRequest, SelectionPolicy, Selector};
//!
//! let selector = Selector::new(Catalog::aws_us_east_1()?, SelectionPolicy::new("t3.small"))?;
//! let demand = Demand {
//!     request: PodRequest { cpu_millis: 8000, memory_bytes: 15 << 30, ..Default::default() },
//!     ..Default::default()
//! };
//! let decision = selector.select(&demand)?;
//! assert_eq!(decision.chosen.instance_type.name, "c5a.2xlarge");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod annotations;
mod catalog;
mod request;
mod select;

pub use annotations::{
    AnnotationError, CellAnnotations, InstanceTypePattern, KIP_PREFIX, LaunchType, PREFIX, names,
};
pub use catalog::{Arch, BUILTIN_CATALOGS, Catalog, CatalogError, InstanceType};
pub use request::{ARCH_LABEL, GPU_RESOURCE, PodRequest, RequestError, format_bytes, format_cpu};
pub use select::{
    BURST_SURCHARGE_PER_VCPU_HOUR, Candidate, Decision, Demand, RUNNERS_UP, SelectionError,
    SelectionPolicy, Selector,
};
/// Kubernetes quantities, the one parser of the workspace (the cells provider's config reads
/// its capacity through this path).
pub use updraft_common::quantity;

/// Everything that can keep a pod from getting an instance type, for callers that handle them
/// alike (a pod condition and an Event carrying the message).
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    /// A cell annotation is malformed.
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    /// The pod's resources cannot be read.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// No instance type satisfies the pod.
    #[error(transparent)]
    Selection(#[from] SelectionError),
}

/// The whole cost decision for a pod: annotations parsed, effective request computed, type
/// selected. `default_launch_type` applies when the pod has no launch-type annotation.
pub fn decide(
    selector: &Selector,
    pod_spec: &k8s_openapi::api::core::v1::PodSpec,
    annotations: &std::collections::BTreeMap<String, String>,
    default_launch_type: LaunchType,
) -> Result<(Decision, CellAnnotations), CostError> {
    let cell_annotations = CellAnnotations::parse(annotations)?;
    let request = PodRequest::from_pod_spec(pod_spec)?;
    let demand = Demand {
        request,
        instance_type: cell_annotations.instance_type.clone(),
        launch_type: cell_annotations.launch_type.unwrap_or(default_launch_type),
    };
    let decision = selector.select(&demand)?;
    Ok((decision, cell_annotations))
}
