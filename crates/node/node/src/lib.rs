//! The virtual node: what the API server and the scheduler see as a kubelet.
//!
//! - [`node`]: registers the Node, keeps its status and its Lease (the heartbeat) current,
//!   re-creates it if it is deleted;
//! - [`pods`]: watches the pods bound to the node and reconciles each through the
//!   [`Provider`](updraft_provider::Provider), writing status back;
//! - [`resolve`]: turns a pod's env and volume references into values and files, so that
//!   providers never read Secrets or ConfigMaps;
//! - [`dns`]: a pod's resolver file, formed as the kubelet forms it;
//! - [`services`]: the service variables (`enableServiceLinks`) containers get;
//! - [`service_routes`]: the Service routes of pods that run where no kube-proxy does;
//! - [`cache`]: the node's compact watch cache of its pods, which the kubelet API reads.
//!
//! [`VirtualNode`] runs all of it until shutdown.
#![forbid(unsafe_code)]

pub mod cache;
pub mod config;
pub mod dns;
pub mod metrics;
pub mod network_policy;
pub mod node;
pub mod pods;
pub mod references;
pub mod resolve;
pub mod service_routes;
pub mod services;

pub use cache::{CachedPod, PodCache};
pub use config::NodeConfig;
pub use metrics::PodMetrics;

use std::future::Future;
use std::sync::Arc;

use updraft_provider::Provider;

/// Everything the node can fail with at start-up; while running, errors are retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
}

/// A virtual node with its provider.
pub struct VirtualNode<P> {
    client: kube::Client,
    config: NodeConfig,
    provider: Arc<P>,
    pods: pods::PodController<P>,
}

impl<P: Provider> VirtualNode<P> {
    /// A node named by `config` that talks to the API server through `client` and runs pods
    /// on `provider`.
    pub fn new(client: kube::Client, config: NodeConfig, provider: Arc<P>) -> Self {
        let pods = pods::PodController::new(client.clone(), config.clone(), provider.clone());
        Self {
            client,
            config,
            provider,
            pods,
        }
    }

    /// Reports the pod controller's metrics into `metrics` (which the caller registers and
    /// serves).
    pub fn with_metrics(mut self, metrics: PodMetrics) -> Self {
        self.pods = self.pods.with_metrics(metrics);
        self
    }

    /// The pods bound to this node, from the node's own watch (no request per lookup):
    /// ready once [`VirtualNode::run`] has listed them, current while it runs. For the
    /// kubelet API, which must serve only this node's pods.
    pub fn pods(&self) -> cache::PodCache {
        self.pods.pods()
    }

    /// Registers the node, then runs the node and pod controllers until `shutdown`
    /// completes. On shutdown, in-flight reconciliations finish and pods keep running in the
    /// provider; the Node is left in place (its Lease expires, as with a stopped kubelet).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let node = node::NodeController::new(
            self.client.clone(),
            self.config.clone(),
            self.provider.clone(),
        );
        node.register().await?;
        tracing::debug!(node = %self.config.name, "registered; starting the controllers");
        let node_task = tokio::spawn(node.run(stop_rx.clone()));
        let pods_task = tokio::spawn(self.pods.run(stop_rx));
        shutdown.await;
        tracing::info!(
            "shutting down: finishing in-flight work; pods keep running in the provider"
        );
        let _ = stop_tx.send(true);
        let _ = pods_task.await;
        let _ = node_task.await;
        Ok(())
    }
}
