//! The pod controller: every pod bound to the node, reconciled through the provider.
//!
//! One kube-runtime controller watches pods with `spec.nodeName=<node>` (a single watch, no
//! per-pod polling) and reconciles each pod when it changes: create it in the provider,
//! update it when its spec changed, delete it (honouring the grace period) when the pod is
//! being deleted, and leave terminal pods alone. Status flows the other way through the
//! provider's status stream, and is written only when it differs from what the API has.
//! A sweep once the pods are listed, then every `orphan_sweep_interval` (a minute), deletes
//! provider pods that no longer exist in the API (force-deleted while Updraft was down, for
//! instance).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash as _, Hasher as _};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{HostIP, Pod, PodIP, PodStatus};
use kube::Resource as _;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::watcher;
use tokio::sync::watch;
use updraft_common::error_chain;
use updraft_provider::{PodRef, PodStatusUpdate, Provider, ProviderError};

use crate::NodeConfig;
use crate::cache::{CachedPod, PodCache};
use crate::metrics::PodMetrics;
use crate::references::ReferenceWatches;
use crate::resolve::{ResolveError, Resolver};
use crate::services::Services;
use updraft_common::sync::lock;

/// Why one reconciliation of a pod failed; it is retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The provider failed transiently.
    #[error("provider: {}", error_chain(.0))]
    Provider(#[from] ProviderError),
    /// The pod's references could not be resolved yet.
    #[error("resolving the pod: {0}")]
    Resolve(#[from] ResolveError),
    /// An API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

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

struct Context<P> {
    client: kube::Client,
    provider: Arc<P>,
    config: NodeConfig,
    recorder: Recorder,
    metrics: PodMetrics,
    /// Watches of the ConfigMaps and Secrets the pods reference.
    references: ReferenceWatches,
    /// The cluster's Services, for the containers' service variables.
    services: Services,
    /// What the node has handed the provider, per pod: one entry per pod, dropped when
    /// the pod is gone. Rebuilt after a restart by adopting what the provider runs.
    handed: Mutex<HashMap<PodRef, Handed>>,
    /// Whether the provider pushes status; if not, status is read after each call and
    /// reconciliation repeats every minute.
    streams_status: bool,
}

/// What the node knows of one pod it has handed (or tried to hand) to the provider.
#[derive(Debug, Default)]
struct Handed {
    /// Hash of the spec the provider last received: an update is sent only when the spec
    /// really changed.
    spec: Option<u64>,
    /// Hash of the env and files it last received, so a referenced object's change causes
    /// an update only when the pod's inputs really changed.
    inputs: Option<u64>,
    /// When the pod's projected service-account tokens must be requested again.
    tokens_due: Option<std::time::Instant>,
    /// Consecutive failed reconciliations, for exponential backoff.
    failures: u32,
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

fn spec_hash(pod: &Pod) -> u64 {
    let mut hasher = DefaultHasher::new();
    serde_json::to_string(&pod.spec)
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

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

async fn reconcile<P: Provider>(
    pod: Arc<Pod>,
    context: Arc<Context<P>>,
) -> Result<Action, ReconcileError> {
    let pod_ref = PodRef::of(&pod);
    let provider = &context.provider;

    if pod.metadata.deletion_timestamp.is_some() {
        let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30);
        if let Err(err) = provider.delete_pod(&pod_ref, grace).await
            && !matches!(err, ProviderError::NotFound { .. })
        {
            context.metrics.provider_error("delete", &err);
            publish(
                &context,
                &pod,
                EventType::Warning,
                "ProviderDeleteFailed",
                error_chain(&err),
            )
            .await;
            return Err(err.into());
        }
        forget(&context, &pod_ref);
        // The provider has stopped the pod: now the API object may go, but only this
        // incarnation of it (a pod re-created under the same name keeps running).
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(pod_ref.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match Api::<Pod>::namespaced(context.client.clone(), &pod_ref.namespace)
            .delete(&pod_ref.name, &params)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
            Err(err) => return Err(err.into()),
        }
        return Ok(Action::await_change());
    }
    if is_terminal(&pod) {
        forget(&context, &pod_ref);
        return Ok(Action::await_change());
    }

    let spec = spec_hash(&pod);
    let (applied, tokens_due) = lock(&context.handed)
        .get(&pod_ref)
        .map_or((None, None), |h| (h.spec, h.tokens_due));
    let running = match applied {
        Some(_) => true,
        None => provider
            .pod_status(&pod_ref)
            .await
            .inspect_err(|err| context.metrics.provider_error("status", err))?
            .is_some(),
    };
    let tokens_due = tokens_due.is_some_and(|due| due <= std::time::Instant::now());
    let inputs_changed = context
        .references
        .take_resolve_again(&pod_ref.namespace, &pod_ref.name)
        || tokens_due;
    if running && applied == Some(spec) && !inputs_changed {
        return Ok(next_action(&context, &pod_ref));
    }
    if running && applied.is_none() && !inputs_changed {
        // Running from before a restart: adopt it without touching it, but watch what it
        // references from now on.
        lock(&context.handed)
            .entry(pod_ref.clone())
            .or_default()
            .spec = Some(spec);
        if let Ok(resolution) = Resolver::resolve(
            context.client.clone(),
            &pod,
            &service_env(&context, &pod).await,
        )
        .await
        {
            context
                .references
                .track(&pod_ref.namespace, &pod_ref.name, resolution.references);
            if resolution.token_lifetime.is_some() {
                // How old its tokens are is unknown: give it fresh ones at once.
                lock(&context.handed)
                    .entry(pod_ref.clone())
                    .or_default()
                    .tokens_due = Some(std::time::Instant::now());
            }
        }
        return Ok(next_action(&context, &pod_ref));
    }

    let mut resolution = match Resolver::resolve(
        context.client.clone(),
        &pod,
        &service_env(&context, &pod).await,
    )
    .await
    {
        Ok(resolution) => resolution,
        Err(err) => {
            publish(
                &context,
                &pod,
                EventType::Warning,
                err.event_reason(),
                error_chain(&err),
            )
            .await;
            return Err(err.into());
        }
    };
    context.references.track(
        &pod_ref.namespace,
        &pod_ref.name,
        resolution.references.clone(),
    );
    let inputs = inputs_hash(&resolution.pod);
    if running
        && applied == Some(spec)
        && lock(&context.handed).get(&pod_ref).and_then(|h| h.inputs) == Some(inputs)
    {
        // A referenced object changed, but nothing the provider receives did.
        return Ok(next_action(&context, &pod_ref));
    }
    for missing in &resolution.missing_optional {
        publish(
            &context,
            &pod,
            EventType::Warning,
            missing.reason,
            missing.message.clone(),
        )
        .await;
    }
    let (dns, dns_warnings) = crate::dns::pod_dns(&pod, &context.config.dns);
    resolution.pod.dns = Some(dns);
    for warning in dns_warnings {
        publish(
            &context,
            &pod,
            EventType::Warning,
            warning.reason,
            warning.message,
        )
        .await;
    }
    let (call, operation, failed_reason) = if running {
        (
            provider.update_pod(&resolution.pod).await,
            "update",
            "ProviderUpdateFailed",
        )
    } else {
        (
            provider.create_pod(&resolution.pod).await,
            "create",
            "ProviderCreateFailed",
        )
    };
    if let Err(err) = &call {
        context.metrics.provider_error(operation, err);
    }
    match call {
        Ok(()) => {
            let tokens_due = resolution.token_lifetime.map(|lifetime| {
                let fraction = context.config.token_refresh_fraction.clamp(0.0, 1.0);
                std::time::Instant::now() + lifetime.mul_f64(fraction)
            });
            lock(&context.handed).insert(
                pod_ref.clone(),
                Handed {
                    spec: Some(spec),
                    inputs: Some(inputs),
                    tokens_due,
                    failures: 0,
                },
            );
        }
        Err(err) => {
            publish(
                &context,
                &pod,
                EventType::Warning,
                failed_reason,
                error_chain(&err),
            )
            .await;
            if err.is_transient() {
                if running {
                    // Make the retry resolve and update again rather than take the pod as done.
                    context
                        .references
                        .resolve_again(&pod_ref.namespace, &pod_ref.name);
                }
                return Err(err.into());
            }
            // Retrying will not help: say why on the pod, as the Go virtual-kubelet does.
            write_provider_failure(&context, &pod, &err).await?;
            return Ok(Action::await_change());
        }
    }
    if !context.streams_status
        && let Some(status) = provider
            .pod_status(&pod_ref)
            .await
            .inspect_err(|err| context.metrics.provider_error("status", err))?
    {
        write_status(&context, &pod, status).await?;
    }
    Ok(next_action(&context, &pod_ref))
}

/// The service variables `pod`'s containers get, once the Services have been listed.
async fn service_env<P>(context: &Context<P>, pod: &Pod) -> Vec<updraft_provider::EnvVar> {
    context.services.ready().await;
    let links = pod
        .spec
        .as_ref()
        .and_then(|s| s.enable_service_links)
        .unwrap_or(true);
    context
        .services
        .env(pod.metadata.namespace.as_deref().unwrap_or_default(), links)
}

fn forget<P>(context: &Context<P>, pod_ref: &PodRef) {
    lock(&context.handed).remove(pod_ref);
    context.references.forget(&pod_ref.namespace, &pod_ref.name);
}

fn inputs_hash(resolved: &updraft_provider::ResolvedPod) -> u64 {
    let mut hasher = DefaultHasher::new();
    resolved.env.hash(&mut hasher);
    resolved.volumes.hash(&mut hasher);
    hasher.finish()
}

/// What to do after a pod is in the wanted state: wait for a change, but come back when its
/// tokens are due for refresh.
fn next_action<P>(context: &Context<P>, pod_ref: &PodRef) -> Action {
    let due = lock(&context.handed)
        .get(pod_ref)
        .and_then(|h| h.tokens_due);
    match due {
        Some(due) => {
            let wait = due
                .saturating_duration_since(std::time::Instant::now())
                .max(Duration::from_secs(1));
            if context.streams_status {
                Action::requeue(wait)
            } else {
                // Without a status stream the minute's resync still applies.
                Action::requeue(wait.min(Duration::from_secs(60)))
            }
        }
        None => resync(context),
    }
}

fn resync<P>(context: &Context<P>) -> Action {
    if context.streams_status {
        Action::await_change()
    } else {
        Action::requeue(Duration::from_secs(60))
    }
}

fn error_policy<P: Provider>(
    pod: Arc<CachedPod>,
    error: &ReconcileError,
    context: Arc<Context<P>>,
) -> Action {
    let pod_ref = pod.pod_ref();
    let attempt = {
        let mut handed = lock(&context.handed);
        let failures = &mut handed.entry(pod_ref.clone()).or_default().failures;
        *failures = failures.saturating_add(1);
        *failures
    };
    // 1 s, 2 s, 4 s … capped at 5 min, like the kubelet's back-off.
    let delay =
        Duration::from_secs(1u64 << attempt.min(9).saturating_sub(1)).min(Duration::from_secs(300));
    tracing::info!(pod = %pod_ref, attempt, ?delay, "reconciliation failed, retrying: {}", error_chain(error));
    Action::requeue(delay)
}

async fn publish<P>(context: &Context<P>, pod: &Pod, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(err) = context.recorder.publish(&event, &pod.object_ref(&())).await {
        tracing::debug!("publishing event {reason}: {err}");
    }
}

/// Marks a pod the provider refused: `Failed` if it would never be restarted, else `Pending`,
/// with reason `ProviderFailed` and the provider's message.
async fn write_provider_failure<P>(
    context: &Context<P>,
    pod: &Pod,
    err: &ProviderError,
) -> Result<(), kube::Error> {
    let never_restarts =
        pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) == Some("Never");
    let patch = serde_json::json!({"status": {
        "phase": if never_restarts { "Failed" } else { "Pending" },
        "reason": "ProviderFailed",
        "message": error_chain(err),
    }});
    let pod_ref = PodRef::of(pod);
    Api::<Pod>::namespaced(context.client.clone(), &pod_ref.namespace)
        .patch_status(
            &pod_ref.name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
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
    Api::<Pod>::namespaced(context.client.clone(), &pod_ref.namespace)
        .patch_status(
            &pod_ref.name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(true)
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
            forget(&context, &orphan.pod);
        }
    }
}
