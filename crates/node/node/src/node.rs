//! The Node object and its heartbeat.
//!
//! Two beats: every 10 s the Node is read and the Lease renewed (the heartbeat the node
//! lifecycle controller reads) — a Node found deleted is registered again; the status
//! (capacity, addresses, conditions) is applied when the provider's health changes and at
//! least every minute. Everything is written with server-side apply under
//! the field manager `updraft`, so fields other components own — conditions they set, taints
//! the node lifecycle controller adds — are never overwritten.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::watch;
use updraft_provider::Provider;

use crate::{Error, NodeConfig};

/// The field manager of everything Updraft writes.
pub const FIELD_MANAGER: &str = "updraft";
const LEASE_NAMESPACE: &str = "kube-node-lease";

/// Registers the node and keeps its status and Lease current.
pub struct NodeController<P> {
    config: NodeConfig,
    provider: Arc<P>,
    nodes: Api<Node>,
    leases: Api<Lease>,
    client: kube::Client,
}

impl<P: Provider> NodeController<P> {
    /// A controller for the node `config` describes.
    pub fn new(client: kube::Client, config: NodeConfig, provider: Arc<P>) -> Self {
        Self {
            nodes: Api::all(client.clone()),
            leases: Api::namespaced(client.clone(), LEASE_NAMESPACE),
            client,
            config,
            provider,
        }
    }

    fn apply_params() -> PatchParams {
        PatchParams::apply(FIELD_MANAGER).force()
    }

    /// The labels to write: all of them, except that under the node identity the
    /// `NodeRestriction` admission plugin only lets a node set `kubernetes.io`/`k8s.io` labels
    /// from its allow-list — those are dropped with a warning rather than failing registration.
    async fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.config.all_labels();
        if self.runs_as_node_identity().await {
            let refused: Vec<String> = labels
                .keys()
                .filter(|k| !node_may_set_label(k))
                .cloned()
                .collect();
            if !refused.is_empty() {
                tracing::warn!(
                    labels = ?refused,
                    "running as system:node:{}; NodeRestriction forbids a node to set these labels, so they are left out (set them with an admin identity if you need them)",
                    self.config.name
                );
            }
            labels.retain(|k, _| node_may_set_label(k));
        }
        labels
    }

    async fn runs_as_node_identity(&self) -> bool {
        let review: SelfSubjectReview = SelfSubjectReview::default();
        match Api::<SelfSubjectReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
        {
            Ok(review) => review
                .status
                .and_then(|s| s.user_info)
                .and_then(|u| u.username)
                .is_some_and(|name| name.starts_with("system:node:")),
            Err(err) => {
                tracing::debug!(
                    "SelfSubjectReview failed ({err}); assuming an identity that may set any label"
                );
                false
            }
        }
    }

    /// Creates the Node or reconciles an existing one (labels, taint, status), then applies
    /// the Lease. Returns the Node as registered.
    pub async fn register(&self) -> Result<Node, Error> {
        let name = &self.config.name;
        let labels = self.labels().await;
        let existing = self.nodes.get_opt(name).await?;
        if existing.is_none() {
            let node: Node = serde_json::from_value(json!({
                "metadata": { "name": name, "labels": labels },
                "spec": { "taints": self.config.taint.iter().collect::<Vec<_>>() }
            }))
            .map_err(|e| Error::Config(format!("node object: {e}")))?;
            match self
                .nodes
                .create(
                    &PostParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &node,
                )
                .await
            {
                Ok(_) => tracing::info!(node = %name, "registered the node"),
                // Someone (a previous run) created it meanwhile: reconcile it below.
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(err) => return Err(err.into()),
            }
        }
        let metadata = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": name, "labels": labels }
        });
        self.nodes
            .patch(name, &Self::apply_params(), &Patch::Apply(&metadata))
            .await?;
        self.ensure_taint().await?;
        let node = self.write_status(&Ok(())).await?;
        self.renew_lease(&node).await?;
        Ok(node)
    }

    /// Adds the configured taint if it is missing, keeping every other taint. Taints are an
    /// atomic list, so this is a read-modify-write guarded by the resourceVersion.
    async fn ensure_taint(&self) -> Result<(), Error> {
        let Some(taint) = &self.config.taint else {
            return Ok(());
        };
        for _ in 0..5 {
            let node = self.nodes.get(&self.config.name).await?;
            let taints = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default();
            if taints.iter().any(|t| same_taint(t, taint)) {
                return Ok(());
            }
            let mut desired: Vec<Taint> =
                taints.into_iter().filter(|t| t.key != taint.key).collect();
            desired.push(taint.clone());
            let patch = json!({
                "metadata": { "resourceVersion": node.metadata.resource_version },
                "spec": { "taints": desired }
            });
            match self
                .nodes
                .patch(
                    &self.config.name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }

    /// Applies the node's status. Conditions keep their `lastTransitionTime` while their
    /// status is unchanged.
    async fn write_status(&self, health: &Result<(), String>) -> Result<Node, Error> {
        let config = &self.config;
        let current = self.nodes.get_opt(&config.name).await?;
        let now = serde_json::to_value(updraft_provider::now()).unwrap_or_default();
        let previous_transition = |type_: &str, status: &str| {
            current
                .as_ref()
                .and_then(|n| n.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == type_ && c.status == status))
                .and_then(|c| c.last_transition_time.as_ref())
                .and_then(|t| serde_json::to_value(t).ok())
                .unwrap_or_else(|| now.clone())
        };
        let condition = |type_: &str, status: &str, reason: &str, message: &str| {
            json!({
                "type": type_, "status": status, "reason": reason, "message": message,
                "lastHeartbeatTime": now, "lastTransitionTime": previous_transition(type_, status)
            })
        };
        let ready = match health {
            Ok(()) => condition("Ready", "True", "KubeletReady", "Updraft is ready"),
            Err(problem) => condition("Ready", "False", "ProviderUnhealthy", problem),
        };
        let status = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": config.name },
            "status": {
                "capacity": config.capacity,
                "allocatable": config.capacity,
                "addresses": [
                    { "type": "InternalIP", "address": config.internal_ip },
                    { "type": "Hostname", "address": config.name }
                ],
                "daemonEndpoints": { "kubeletEndpoint": { "Port": config.kubelet_port } },
                "nodeInfo": {
                    "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "",
                    "osImage": format!("Updraft ({} provider)", config.provider),
                    "containerRuntimeVersion": format!("updraft://{}", env!("CARGO_PKG_VERSION")),
                    "kubeletVersion": config.kubelet_version,
                    "kubeProxyVersion": "",
                    "operatingSystem": config.operating_system,
                    "architecture": config.architecture
                },
                // Sorted and unique (a BTreeSet), as validation requires.
                "declaredFeatures": config.declared_features,
                "conditions": [
                    ready,
                    condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "the provider manages memory"),
                    condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "the provider manages disk"),
                    condition("PIDPressure", "False", "KubeletHasSufficientPID", "the provider manages processes")
                ]
            }
        });
        Ok(self
            .nodes
            .patch_status(&config.name, &Self::apply_params(), &Patch::Apply(&status))
            .await?)
    }

    /// Creates or renews the Lease (owned by the Node, so it goes when the Node goes).
    async fn renew_lease(&self, node: &Node) -> Result<(), Error> {
        let name = &self.config.name;
        let renew_time =
            serde_json::to_value(MicroTime(updraft_provider::now().0)).unwrap_or_default();
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {
                "name": name, "namespace": LEASE_NAMESPACE,
                "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": name,
                    "uid": node.metadata.uid
                }]
            },
            "spec": {
                "holderIdentity": name,
                "leaseDurationSeconds": self.config.lease_duration.as_secs(),
                "renewTime": renew_time
            }
        });
        self.leases
            .patch(name, &Self::apply_params(), &Patch::Apply(&lease))
            .await?;
        Ok(())
    }

    async fn health(&self) -> Result<(), String> {
        match self.provider.node_health() {
            Some(health) => health.check().await.map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// The Node as the API has it now (`None` if it was deleted), read at heartbeat pace:
    /// the lease needs the Node's current UID for its owner reference anyway.
    async fn current_node(&self) -> Result<Option<Node>, Error> {
        Ok(self.nodes.get_opt(&self.config.name).await?)
    }

    /// Heartbeats, status and re-registration until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut lease_tick = tokio::time::interval(self.config.lease_renew_interval);
        let mut status_tick = tokio::time::interval(self.config.status_interval);
        let mut health: Result<(), String> = Ok(());
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = lease_tick.tick() => {
                    // The provider's health is checked at heartbeat pace; a change is written
                    // at once instead of waiting for the status interval.
                    let now_health = self.health().await;
                    if now_health != health {
                        health = now_health;
                        status_tick.reset_immediately();
                    }
                    let node = match self.current_node().await {
                        Ok(Some(node)) => node,
                        Ok(None) => {
                            tracing::warn!(node = %self.config.name, "the Node was deleted; registering it again");
                            match self.register().await {
                                Ok(node) => node,
                                Err(err) => {
                                    tracing::warn!("re-registering the node: {err}");
                                    continue;
                                }
                            }
                        }
                        Err(err) => {
                            tracing::warn!("reading the Node: {err}");
                            continue;
                        }
                    };
                    if let Err(err) = self.renew_lease(&node).await {
                        tracing::warn!("renewing the node lease: {err}");
                    }
                }
                _ = status_tick.tick() => {
                    if let Err(err) = self.write_status(&health).await {
                        tracing::warn!("writing node status: {err}");
                    }
                }
            }
        }
    }
}

fn same_taint(a: &Taint, b: &Taint) -> bool {
    a.key == b.key && a.value == b.value && a.effect == b.effect
}

/// Whether `NodeRestriction` lets a node set label `key` on its own Node: labels outside the
/// `kubernetes.io`/`k8s.io` namespaces, and the kubelet's allow-list inside them.
pub fn node_may_set_label(key: &str) -> bool {
    let (prefix, _) = key.split_once('/').unwrap_or(("", key));
    let restricted = prefix == "kubernetes.io"
        || prefix.ends_with(".kubernetes.io")
        || prefix == "k8s.io"
        || prefix.ends_with(".k8s.io");
    if !restricted {
        return true;
    }
    const ALLOWED: [&str; 10] = [
        "kubernetes.io/hostname",
        "kubernetes.io/arch",
        "kubernetes.io/os",
        "beta.kubernetes.io/arch",
        "beta.kubernetes.io/os",
        "beta.kubernetes.io/instance-type",
        "node.kubernetes.io/instance-type",
        "failure-domain.beta.kubernetes.io/region",
        "failure-domain.beta.kubernetes.io/zone",
        "topology.kubernetes.io/region",
    ];
    ALLOWED.contains(&key)
        || key == "topology.kubernetes.io/zone"
        || prefix == "kubelet.kubernetes.io"
        || prefix.ends_with(".kubelet.kubernetes.io")
        || prefix == "node.kubernetes.io"
        || prefix.ends_with(".node.kubernetes.io")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_restriction_label_rules() {
        assert!(node_may_set_label("type"));
        assert!(node_may_set_label("example.com/team"));
        assert!(node_may_set_label("kubernetes.io/hostname"));
        assert!(node_may_set_label(
            "node.kubernetes.io/exclude-from-external-load-balancers"
        ));
        assert!(!node_may_set_label("kubernetes.io/role"));
        assert!(!node_may_set_label("node-role.kubernetes.io/agent"));
        assert!(!node_may_set_label("node-restriction.kubernetes.io/x"));
    }
}
