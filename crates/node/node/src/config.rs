//! What the virtual node says about itself.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Taint;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The node's identity, advertised resources and timings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The Node's name.
    pub name: String,
    /// The provider's name, used in the default taint's value.
    pub provider: String,
    /// Labels added to the defaults (they win over defaults with the same key).
    pub labels: BTreeMap<String, String>,
    /// The taint that keeps ordinary pods off the node; `None` disables it.
    pub taint: Option<Taint>,
    /// Capacity (and allocatable): `cpu`, `memory`, `pods`, `ephemeral-storage`,
    /// extended resources such as `nvidia.com/gpu`.
    pub capacity: BTreeMap<String, Quantity>,
    /// The address the API server reaches the kubelet API at (`InternalIP`).
    pub internal_ip: String,
    /// The kubelet API port (`daemonEndpoints.kubeletEndpoint.port`).
    pub kubelet_port: u16,
    /// `kubernetes.io/os` and `nodeInfo.operatingSystem`.
    pub operating_system: String,
    /// `kubernetes.io/arch` and `nodeInfo.architecture`.
    pub architecture: String,
    /// `nodeInfo.kubeletVersion`.
    pub kubelet_version: String,
    /// Lease duration (40 s, like the kubelet).
    pub lease_duration: Duration,
    /// How often the Lease is renewed (10 s).
    pub lease_renew_interval: Duration,
    /// How often node status is written when nothing changed (1 min).
    pub status_interval: Duration,
    /// Concurrent pod reconciliations.
    pub pod_workers: u16,
    /// How often provider pods without an API pod (force-deleted while Updraft was down)
    /// are looked for and deleted.
    pub orphan_sweep_interval: Duration,
    /// The fraction of a projected service-account token's lifetime after which it is
    /// requested again and the pod updated (0.8, like the kubelet).
    pub token_refresh_fraction: f64,
    /// `status.declaredFeatures`: what the node's kubelet API supports that API servers (1.36+)
    /// act on. By default [`EXTEND_WEBSOCKETS_TO_KUBELET`], as the kubelet declares it: the
    /// API server then passes kubectl's WebSocket exec, attach and port-forward through to
    /// the node instead of translating them to SPDY.
    pub declared_features: BTreeSet<String>,
    /// How pods' resolver files are formed (the kubelet's `--cluster-dns`,
    /// `--cluster-domain`, `--resolv-conf`).
    pub dns: crate::dns::DnsSettings,
}

/// The node feature that makes API servers pass exec, attach and port-forward WebSockets
/// through to the node (the kubelet's beta feature gate of the same name, on by default).
pub const EXTEND_WEBSOCKETS_TO_KUBELET: &str = "ExtendWebSocketsToKubelet";

impl NodeConfig {
    /// The defaults for a node called `name` run by provider `provider`.
    pub fn new(name: impl Into<String>, provider: impl Into<String>) -> Self {
        let provider = provider.into();
        let capacity = [
            ("cpu", "20"),
            ("memory", "100Gi"),
            ("pods", "110"),
            ("ephemeral-storage", "100Gi"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), Quantity(v.to_owned())))
        .collect();
        Self {
            name: name.into(),
            taint: Some(Taint {
                key: "virtual-kubelet.io/provider".into(),
                value: Some(provider.clone()),
                effect: "NoSchedule".into(),
                time_added: None,
            }),
            provider,
            labels: BTreeMap::new(),
            capacity,
            internal_ip: "127.0.0.1".into(),
            kubelet_port: 10250,
            operating_system: "linux".into(),
            architecture: "amd64".into(),
            kubelet_version: format!("v1.37.0-updraft-{}", env!("CARGO_PKG_VERSION")),
            lease_duration: Duration::from_secs(40),
            lease_renew_interval: Duration::from_secs(10),
            status_interval: Duration::from_secs(60),
            pod_workers: 10,
            orphan_sweep_interval: Duration::from_secs(60),
            token_refresh_fraction: 0.8,
            declared_features: BTreeSet::from([EXTEND_WEBSOCKETS_TO_KUBELET.to_owned()]),
            dns: crate::dns::DnsSettings::default(),
        }
    }

    /// The labels the node carries: the virtual-kubelet defaults, then `labels`.
    pub fn all_labels(&self) -> BTreeMap<String, String> {
        let mut labels: BTreeMap<String, String> = [
            ("type", "virtual-kubelet"),
            ("kubernetes.io/role", "agent"),
            ("kubernetes.io/hostname", self.name.as_str()),
            ("kubernetes.io/os", self.operating_system.as_str()),
            ("kubernetes.io/arch", self.architecture.as_str()),
            (
                "node.kubernetes.io/exclude-from-external-load-balancers",
                "true",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        labels.extend(self.labels.clone());
        labels
    }
}
