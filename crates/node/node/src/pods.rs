//! The pod controller: every pod bound to the node, reconciled through the provider.
//!
//! One kube-runtime controller watches pods with `spec.nodeName=<node>` (a single watch, no
//! per-pod polling) and reconciles each pod when it changes: create it in the provider,
//! update it when its spec or its inputs changed, delete it (honouring the grace period)
//! when the pod is being deleted, and leave terminal pods alone. Status flows the other way
//! through the provider's status stream, and is written only when it differs from what the
//! API has. A sweep once the pods are listed, then every `orphan_sweep_interval` (a minute),
//! deletes provider pods that no longer exist in the API (force-deleted while Updraft was
//! down, for instance).
//!
//! This module wires the controller: the pod watch and its cache, the triggers (pod
//! changes, and the references watch's "resolve again"), the status stream and the orphan
//! sweep. What one reconciliation does is in `reconcile` (small named steps), and what a
//! pod needs from the provider is decided in one place, `decision`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{HostIP, Pod, PodIP, PodStatus};
use kube::Resource as _;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::watcher;
use tokio::sync::watch;
use updraft_provider::{PodRef, PodStatusUpdate, Provider};

use crate::NodeConfig;
use crate::cache::{CachedPod, PodCache};
use crate::metrics::PodMetrics;
use crate::references::ReferenceWatches;
use crate::services::Services;

mod decision;
#[cfg(test)]
pub(crate) mod fakes;
mod reconcile;

pub use reconcile::ReconcileError;
use reconcile::{Context, error_policy, reconcile};

/// Reconciles the pods bound to the node.
pub struct PodController<P> {
    client: kube::Client,
    config: NodeConfig,
    provider: Arc<P>,
    metrics: PodMetrics,
    /// The watch cache of the node's pods, filled by [`PodController::run`].
    cache: reflector::store::Writer<CachedPod>,
    /// Set once the cache has its first list.
    listed: watch::Sender<bool>,
    /// The cache as others read it.
    pods: PodCache,
}

impl<P: Provider> PodController<P> {
    /// A controller for the pods of the node `config` names.
    pub fn new(client: kube::Client, config: NodeConfig, provider: Arc<P>) -> Self {
        let cache = reflector::store::Writer::default();
        let (listed, is_listed) = watch::channel(false);
        let pods = PodCache::new(cache.as_reader(), is_listed);
        Self {
            client,
            config,
            provider,
            metrics: PodMetrics::default(),
            cache,
            listed,
            pods,
        }
    }

    /// The pods bound to the node as the controller's watch sees them (filled and kept
    /// current while [`PodController::run`] runs; listed once the first list is in).
    pub fn pods(&self) -> PodCache {
        self.pods.clone()
    }

    /// Reports into `metrics` (registered by the caller) instead of unregistered ones.
    pub fn with_metrics(mut self, metrics: PodMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Runs until `stop` turns true; in-flight reconciliations finish first.
    pub async fn run(self, stop: watch::Receiver<bool>) {
        let pods = Api::<CachedPod>::all(self.client.clone());
        let selector =
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.config.name));
        let status_updates = self.provider.status_updates();
        let recorder = Recorder::new(
            self.client.clone(),
            Reporter {
                controller: "updraft".into(),
                instance: Some(self.config.name.clone()),
            },
        );
        let (trigger, triggered) = tokio::sync::mpsc::unbounded_channel();
        let (services, watch_services) = Services::watch(self.client.clone());
        let context = Arc::new(Context {
            services,
            references: ReferenceWatches::new(self.client.clone(), trigger.clone()),
            handed: Mutex::new(HashMap::new()),
            client: self.client.clone(),
            provider: self.provider.clone(),
            config: self.config.clone(),
            recorder,
            metrics: self.metrics.clone(),
            streams_status: status_updates.is_some(),
        });
        // The cache keeps pods compact (see `cache`): metadata plus encoded spec and status.
        let writer = self.cache;
        let cache = self.pods.clone();
        let store = cache.store().clone();
        let watch = watcher::watcher(pods, selector).default_backoff();
        // Both inputs end when shutdown is requested: the controller then finishes the
        // reconciliations in flight and returns (it waits for its inputs to end).
        let stopped = || {
            let mut stop = stop.clone();
            async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            }
        };
        // The reflector runs in a task of its own, so the cache fills (and becomes ready)
        // whether or not the controller is currently asking for work. It hands the controller
        // references, not pods: while every worker is busy (a burst) the queue holds names,
        // and the reconcile reads the pod from the store.
        let mut background = tokio::task::JoinSet::new();
        background.spawn(watch_services);
        if self.provider.service_routing().is_some() {
            let provider = self.provider.clone();
            background.spawn(crate::service_routes::run(
                self.client.clone(),
                context.services.clone(),
                self.config.name.clone(),
                move |routes| {
                    if let Some(routing) = provider.service_routing() {
                        routing.routes_changed(routes);
                    }
                },
            ));
        }
        background.spawn(forward_pod_changes(
            reflector(writer, watch),
            trigger,
            self.listed,
        ));
        let changes =
            tokio_stream::wrappers::UnboundedReceiverStream::new(triggered).take_until(stopped());
        let controller = Controller::for_stream(
            futures::stream::pending::<Result<CachedPod, watcher::Error>>().take_until(stopped()),
            store,
        )
        .with_config(controller::Config::default().concurrency(self.config.pod_workers))
        .reconcile_on(changes);
        self.metrics.observe_pods(cache.clone());
        if let Some(updates) = status_updates {
            background.spawn(write_status_updates(
                updates,
                cache.clone(),
                context.clone(),
            ));
        }
        background.spawn(sweep_orphans(cache, context.clone()));
        let mut stop_signal = stop.clone();
        controller
            .graceful_shutdown_on(async move {
                let _ = stop_signal.wait_for(|stopped| *stopped).await;
            })
            .run(timed_reconcile, error_policy, context)
            .for_each(|result| async move {
                if let Err(err) = result {
                    tracing::debug!("pod reconciliation: {err}");
                }
            })
            .await;
        background.abort_all();
    }
}

/// Hands the controller every pod the reflector has stored, once it is in the store.
///
/// The pods of a (re)list arrive as `InitApply` events, but the reflector's store only shows
/// them at `InitDone`; a reconcile triggered earlier finds nothing in the store and is dropped
/// (kube-runtime's "not found in local store"). So the pods of a list are sent at `InitDone`:
/// after a restart every pod already bound to the node is reconciled. The first `InitDone`
/// also marks the cache as listed.
async fn forward_pod_changes(
    events: impl futures::Stream<Item = Result<watcher::Event<CachedPod>, watcher::Error>>,
    trigger: tokio::sync::mpsc::UnboundedSender<ObjectRef<CachedPod>>,
    listed: watch::Sender<bool>,
) {
    let listed_once = listed;
    let mut events = std::pin::pin!(events);
    let mut listed = Vec::new();
    while let Some(event) = events.next().await {
        let ready = match event {
            Ok(watcher::Event::Apply(pod)) => vec![ObjectRef::from_obj(&pod)],
            Ok(watcher::Event::Init) => {
                listed.clear();
                continue;
            }
            // Only the reference is kept: the reflector already holds the listed pod.
            Ok(watcher::Event::InitApply(pod)) => {
                listed.push(ObjectRef::from_obj(&pod));
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                listed_once.send_replace(true);
                std::mem::take(&mut listed)
            }
            // A deleted pod is gone from the API: the orphan sweep ends it in the provider.
            Ok(watcher::Event::Delete(_)) => continue,
            Err(err) => {
                tracing::warn!("watching the node's pods (retrying with backoff): {err}");
                continue;
            }
        };
        for pod in ready {
            if trigger.send(pod).is_err() {
                return;
            }
        }
    }
}

/// One reconciliation, timed for the metrics.
async fn timed_reconcile<P: Provider>(
    cached: Arc<CachedPod>,
    context: Arc<Context<P>>,
) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    let result = reconcile(Arc::new(cached.pod()), context.clone()).await;
    context
        .metrics
        .observe_reconcile(started.elapsed(), result.is_ok());
    result
}

/// The status to write: the provider's, with what the API already knows and the provider
/// does not say (conditions of other types such as `PodScheduled`, the QoS class) kept.
pub fn merge_status(api_pod: &Pod, provider: PodStatus, host_ip: &str) -> PodStatus {
    let current = api_pod.status.clone().unwrap_or_default();
    let mut status = provider;
    let mut conditions = status.conditions.take().unwrap_or_default();
    let provided: HashSet<String> = conditions.iter().map(|c| c.type_.clone()).collect();
    for condition in current.conditions.iter().flatten() {
        if !provided.contains(&condition.type_) {
            conditions.push(condition.clone());
        }
    }
    // Keep each condition's transition time while its status is unchanged, so rewriting the
    // same state does not look like a change.
    for condition in &mut conditions {
        if let Some(old) = current
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == condition.type_ && c.status == condition.status)
        {
            condition.last_transition_time = old.last_transition_time.clone();
        }
    }
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    status.conditions = Some(conditions);
    if status.host_ip.is_none() {
        status.host_ip = Some(host_ip.to_owned());
    }
    if status.host_ips.is_none() {
        status.host_ips = status.host_ip.clone().map(|ip| vec![HostIP { ip }]);
    }
    if status.pod_ips.is_none() {
        status.pod_ips = status.pod_ip.clone().map(|ip| vec![PodIP { ip }]);
    }
    if status.qos_class.is_none() {
        status.qos_class = current.qos_class.clone();
    }
    if status.start_time.is_none() {
        status.start_time = current.start_time.clone();
    }
    status
}

fn comparable(status: &PodStatus) -> serde_json::Value {
    let mut status = status.clone();
    if let Some(conditions) = status.conditions.as_mut() {
        conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    }
    serde_json::to_value(status).unwrap_or_default()
}

/// Writes `provider_status` to the pod if it changes anything. Returns whether it wrote.
async fn write_status<P>(
    context: &Context<P>,
    pod: &Pod,
    provider_status: PodStatus,
) -> Result<bool, kube::Error> {
    let desired = merge_status(pod, provider_status, &context.config.internal_ip);
    let current = pod.status.clone().unwrap_or_default();
    if comparable(&desired) == comparable(&current) {
        return Ok(false);
    }
    let pod_ref = PodRef::of(pod);
    let patch = serde_json::json!({
        "metadata": { "uid": pod_ref.uid },
        "status": desired
    });
    patch_status(&context.client, &pod_ref, &patch).await?;
    Ok(true)
}

/// Merge-patches the status of the pod `pod_ref` names with `patch`.
async fn patch_status(
    client: &kube::Client,
    pod_ref: &PodRef,
    patch: &serde_json::Value,
) -> Result<(), kube::Error> {
    Api::<Pod>::namespaced(client.clone(), &pod_ref.namespace)
        .patch_status(&pod_ref.name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    Ok(())
}

async fn write_status_updates<P: Provider>(
    mut updates: BoxStream<'static, PodStatusUpdate>,
    cache: PodCache,
    context: Arc<Context<P>>,
) {
    while let Some(update) = updates.next().await {
        let Some(cached) = cache.get(&update.pod.namespace, &update.pod.name) else {
            continue;
        };
        if cached.meta().uid.as_deref() != Some(update.pod.uid.as_str())
            || cached.meta().deletion_timestamp.is_some()
        {
            continue;
        }
        if let Err(err) = write_status(&context, &cached.pod(), update.status).await {
            tracing::warn!(pod = %update.pod, "writing pod status: {err}");
        }
    }
}

/// Deletes provider pods that have no pod in the API (by UID), once the cache has its first
/// list and then every `orphan_sweep_interval`. The provider is listed *before* the cache is
/// read: a pod reaches the provider only after it was in the cache, so a pod created in
/// between is never mistaken for an orphan.
async fn sweep_orphans<P: Provider>(cache: PodCache, context: Arc<Context<P>>) {
    if !cache.listed().await {
        return;
    }
    let mut tick = tokio::time::interval(context.config.orphan_sweep_interval);
    loop {
        tick.tick().await;
        let running = match context.provider.list_pods().await {
            Ok(running) => running,
            Err(err) => {
                context.metrics.provider_error("list", &err);
                tracing::warn!("listing provider pods: {err}");
                continue;
            }
        };
        if running.is_empty() {
            continue;
        }
        let known: HashSet<String> = cache
            .all()
            .iter()
            .filter_map(|pod| pod.meta().uid.clone())
            .collect();
        for orphan in running.into_iter().filter(|p| !known.contains(&p.pod.uid)) {
            tracing::info!(pod = %orphan.pod, "deleting a provider pod that no longer exists in the API");
            if let Err(err) = context.provider.delete_pod(&orphan.pod, 0).await {
                context.metrics.provider_error("delete", &err);
                tracing::warn!(pod = %orphan.pod, "deleting an orphaned pod: {err}");
            }
            context.forget(&orphan.pod);
        }
    }
}
