//! One reconciliation of a pod, in small named steps.
//!
//! [`reconcile`] observes the pod ([`observe`]), asks [`needed`] what it needs, and runs the
//! step for the answer:
//!
//! | needed | step |
//! |---|---|
//! | `Delete` | [`delete_step`]: stop it in the provider (its grace period), forget it, delete this incarnation of the API object |
//! | `Forget` | [`Context::forget`]: a terminal pod is left to its owner |
//! | `Nothing` | [`next_action`] |
//! | `Adopt` | [`adopt`]: record it as handed, watch what it references, give it fresh tokens |
//! | `Resolve` | [`resolve`], then [`needed`] again with the inputs hash |
//! | `Create`, `Update` | [`resolve`] (unless just done), then [`hand_to_provider`]; a refusal goes to [`after_failure`] |
//!
//! Invariants, and why:
//! - The controller runs one reconciliation per pod at a time, so a pod's [`Handed`] record
//!   is read at the start and written by the step without a race.
//! - The record is written only when the provider accepted a create or an update (spec,
//!   inputs, token due time; failures reset), at adoption (spec; tokens due at once, since
//!   their age is unknown), by [`error_policy`] (failures) and when the pod is gone
//!   ([`Context::forget`]): what the provider has is never guessed from an attempt.
//! - The references watch's "resolve again" is taken at [`observe`]; a transient update
//!   failure puts it back, so the retry resolves and updates again instead of finding the
//!   same spec handed and taking the pod as done.
//! - An adopted pod is not touched: no create, no update, no events, until a change, a
//!   referenced object or its tokens call for an update.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Resource as _;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use tokio::time::Instant;
use updraft_common::error_chain;
use updraft_common::sync::lock;
use updraft_provider::{PodRef, Provider, ProviderError};

use super::decision::{
    Active, Handed, Needed, Seen, Why, inputs_hash, is_terminal, needed, spec_hash,
};
use crate::NodeConfig;
use crate::cache::CachedPod;
use crate::metrics::PodMetrics;
use crate::references::ReferenceWatches;
use crate::resolve::{Resolution, ResolveError, Resolver};
use crate::services::Services;

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

/// What every reconciliation shares.
pub(super) struct Context<P> {
    /// The node's client.
    pub client: kube::Client,
    /// Where the pods run.
    pub provider: Arc<P>,
    /// The node's settings (DNS, token refresh, address).
    pub config: NodeConfig,
    /// Publishes the pods' Events.
    pub recorder: Recorder,
    /// The pod controller's metrics.
    pub metrics: PodMetrics,
    /// Watches of the ConfigMaps and Secrets the pods reference.
    pub references: ReferenceWatches,
    /// The cluster's Services, for the containers' service variables.
    pub services: Services,
    /// What the node has handed the provider, per pod: one entry per pod, dropped when the
    /// pod is gone. Rebuilt after a restart by adopting what the provider runs.
    pub handed: Mutex<HashMap<PodRef, Handed>>,
    /// Whether the provider pushes status; if not, status is read after each call and
    /// reconciliation repeats every minute.
    pub streams_status: bool,
}

impl<P> Context<P> {
    /// A copy of what was handed for `pod`.
    fn handed(&self, pod: &PodRef) -> Option<Handed> {
        lock(&self.handed).get(pod).cloned()
    }

    /// The pod is gone or finished: drop what was handed and stop watching what it
    /// references.
    pub(super) fn forget(&self, pod: &PodRef) {
        lock(&self.handed).remove(pod);
        self.references.forget(&pod.namespace, &pod.name);
    }
}

/// A provider call that hands the pod over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    /// `create_pod`.
    Create,
    /// `update_pod`, and why.
    Update(Why),
}

impl Call {
    /// The operation's name in the metrics.
    fn operation(self) -> &'static str {
        match self {
            Call::Create => "create",
            Call::Update(_) => "update",
        }
    }

    /// The reason of the Warning Event when the provider refuses it.
    fn failed_reason(self) -> &'static str {
        match self {
            Call::Create => "ProviderCreateFailed",
            Call::Update(_) => "ProviderUpdateFailed",
        }
    }
}

/// Reconciles one pod: observe it, decide what it needs, run that step.
pub(super) async fn reconcile<P: Provider>(
    pod: Arc<Pod>,
    context: Arc<Context<P>>,
) -> Result<Action, ReconcileError> {
    let pod_ref = PodRef::of(&pod);
    let spec = spec_hash(&pod);
    let handed = context.handed(&pod_ref);
    let mut seen = observe(&context, &pod, &pod_ref, spec, handed.as_ref()).await?;
    let mut verdict = needed(handed.as_ref(), &seen, Instant::now());
    let mut resolution = None;
    if verdict == Needed::Resolve
        && let Seen::Active(active) = &mut seen
    {
        let resolved = resolve(&context, &pod, &pod_ref).await?;
        active.inputs = Some(inputs_hash(&resolved.pod));
        resolution = Some(resolved);
        verdict = needed(handed.as_ref(), &seen, Instant::now());
    }
    tracing::trace!(pod = %pod_ref, ?verdict, "reconciling");
    match verdict {
        Needed::Delete => delete_step(&context, &pod, &pod_ref).await,
        Needed::Forget => {
            context.forget(&pod_ref);
            Ok(Action::await_change())
        }
        // With the inputs known, `needed` never answers `Resolve` again.
        Needed::Nothing | Needed::Resolve => Ok(next_action(&context, &pod_ref)),
        Needed::Adopt => {
            adopt(&context, &pod, &pod_ref, spec).await;
            Ok(next_action(&context, &pod_ref))
        }
        Needed::Create => {
            hand_to_provider(&context, &pod, &pod_ref, spec, resolution, Call::Create).await
        }
        Needed::Update { why } => {
            hand_to_provider(
                &context,
                &pod,
                &pod_ref,
                spec,
                resolution,
                Call::Update(why),
            )
            .await
        }
    }
}

/// The pod as this reconciliation sees it. The provider is asked whether it runs the pod
/// only when nothing was handed (what was handed is taken as running); the references
/// watch's "resolve again" is taken here.
async fn observe<P: Provider>(
    context: &Context<P>,
    pod: &Pod,
    pod_ref: &PodRef,
    spec: u64,
    handed: Option<&Handed>,
) -> Result<Seen, ReconcileError> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Ok(Seen::Deleting);
    }
    if is_terminal(pod) {
        return Ok(Seen::Terminal);
    }
    let in_provider = match handed.and_then(|h| h.spec) {
        Some(_) => true,
        None => context
            .provider
            .pod_status(pod_ref)
            .await
            .inspect_err(|err| context.metrics.provider_error("status", err))?
            .is_some(),
    };
    Ok(Seen::Active(Active {
        spec,
        in_provider,
        resolve_again: context
            .references
            .take_resolve_again(&pod_ref.namespace, &pod_ref.name),
        inputs: None,
    }))
}

/// Stops a deleting pod in the provider (honouring its grace period), forgets it, then lets
/// the API object go: only this incarnation of it (a pod re-created under the same name
/// keeps running).
async fn delete_step<P: Provider>(
    context: &Context<P>,
    pod: &Pod,
    pod_ref: &PodRef,
) -> Result<Action, ReconcileError> {
    let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30);
    if let Err(err) = context.provider.delete_pod(pod_ref, grace).await
        && !matches!(err, ProviderError::NotFound { .. })
    {
        context.metrics.provider_error("delete", &err);
        publish(
            context,
            pod,
            EventType::Warning,
            "ProviderDeleteFailed",
            error_chain(&err),
        )
        .await;
        return Err(err.into());
    }
    context.forget(pod_ref);
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
        // Already gone, or another incarnation by now.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
        Err(err) => return Err(err.into()),
    }
    Ok(Action::await_change())
}

/// Takes a pod that runs from before a restart as handed, without touching it: its spec is
/// recorded, what it references is watched from now on, and if it has projected tokens
/// they are due at once (how old they are is unknown). A failed resolve leaves it adopted
/// and untracked; nothing is published.
async fn adopt<P: Provider>(context: &Context<P>, pod: &Arc<Pod>, pod_ref: &PodRef, spec: u64) {
    lock(&context.handed)
        .entry(pod_ref.clone())
        .or_default()
        .spec = Some(spec);
    let service_env = service_env(context, pod).await;
    match Resolver::resolve(context.client.clone(), pod, &service_env).await {
        Ok(resolution) => {
            context
                .references
                .track(&pod_ref.namespace, &pod_ref.name, resolution.references);
            if resolution.token_lifetime.is_some() {
                lock(&context.handed)
                    .entry(pod_ref.clone())
                    .or_default()
                    .tokens_due = Some(Instant::now());
            }
        }
        Err(err) => tracing::debug!(pod = %pod_ref, "resolving an adopted pod: {err}"),
    }
}

/// Resolves the pod's env and volumes for the provider, and watches what it references from
/// now on. A failure is published on the pod (kubelet-style reason) and retried.
async fn resolve<P>(
    context: &Context<P>,
    pod: &Arc<Pod>,
    pod_ref: &PodRef,
) -> Result<Resolution, ReconcileError> {
    let service_env = service_env(context, pod).await;
    match Resolver::resolve(context.client.clone(), pod, &service_env).await {
        Ok(resolution) => {
            context.references.track(
                &pod_ref.namespace,
                &pod_ref.name,
                resolution.references.clone(),
            );
            Ok(resolution)
        }
        Err(err) => {
            // The retry must resolve again, also when a referenced object's change brought
            // this resolve (its trigger is taken).
            context
                .references
                .resolve_again(&pod_ref.namespace, &pod_ref.name);
            publish(
                context,
                pod,
                EventType::Warning,
                err.event_reason(),
                error_chain(&err),
            )
            .await;
            Err(err.into())
        }
    }
}

/// Creates or updates the pod in the provider with its resolved inputs and resolver
/// settings, after publishing what was missing but optional and how its DNS was formed. On
/// success the call is recorded as handed and, without a status stream, the status written.
async fn hand_to_provider<P: Provider>(
    context: &Context<P>,
    pod: &Arc<Pod>,
    pod_ref: &PodRef,
    spec: u64,
    resolution: Option<Resolution>,
    call: Call,
) -> Result<Action, ReconcileError> {
    let mut resolution = match resolution {
        Some(resolution) => resolution,
        None => resolve(context, pod, pod_ref).await?,
    };
    let inputs = inputs_hash(&resolution.pod);
    for missing in &resolution.missing_optional {
        publish(
            context,
            pod,
            EventType::Warning,
            missing.reason,
            missing.message.clone(),
        )
        .await;
    }
    let (dns, dns_warnings) = crate::dns::pod_dns(pod, &context.config.dns);
    resolution.pod.dns = Some(dns);
    for warning in dns_warnings {
        publish(
            context,
            pod,
            EventType::Warning,
            warning.reason,
            warning.message,
        )
        .await;
    }
    tracing::debug!(pod = %pod_ref, ?call, "handing the pod to the provider");
    let result = match call {
        Call::Create => context.provider.create_pod(&resolution.pod).await,
        Call::Update(_) => context.provider.update_pod(&resolution.pod).await,
    };
    if let Err(err) = result {
        context.metrics.provider_error(call.operation(), &err);
        return after_failure(context, pod, pod_ref, call, err).await;
    }
    let tokens_due = resolution.token_lifetime.map(|lifetime| {
        let fraction = context.config.token_refresh_fraction.clamp(0.0, 1.0);
        Instant::now() + lifetime.mul_f64(fraction)
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
    if !context.streams_status
        && let Some(status) = context
            .provider
            .pod_status(pod_ref)
            .await
            .inspect_err(|err| context.metrics.provider_error("status", err))?
    {
        super::write_status(context, pod, status).await?;
    }
    Ok(next_action(context, pod_ref))
}

/// After the provider refused a create or an update: the refusal is published on the pod.
/// A transient one is retried with backoff (an update resolves again at the retry); any
/// other is written to the pod's status, since retrying will not help.
async fn after_failure<P>(
    context: &Context<P>,
    pod: &Pod,
    pod_ref: &PodRef,
    call: Call,
    err: ProviderError,
) -> Result<Action, ReconcileError> {
    publish(
        context,
        pod,
        EventType::Warning,
        call.failed_reason(),
        error_chain(&err),
    )
    .await;
    if err.is_transient() {
        if let Call::Update(_) = call {
            // What was handed is unchanged: without this the retry would find the same spec
            // and take the pod as done.
            context
                .references
                .resolve_again(&pod_ref.namespace, &pod_ref.name);
        }
        return Err(err.into());
    }
    // As the Go virtual-kubelet does: say why on the pod.
    write_provider_failure(context, pod, &err).await?;
    Ok(Action::await_change())
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

/// What to do after a pod is in the wanted state: wait for a change, but come back when its
/// tokens are due for refresh.
fn next_action<P>(context: &Context<P>, pod_ref: &PodRef) -> Action {
    let due = lock(&context.handed)
        .get(pod_ref)
        .and_then(|h| h.tokens_due);
    match due {
        Some(due) => {
            let wait = due
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1));
            if context.streams_status {
                Action::requeue(wait)
            } else {
                // Without a status stream the minute's resync still applies.
                Action::requeue(wait.min(RESYNC))
            }
        }
        None => resync(context),
    }
}

/// How often pods are reconciled when the provider does not stream status.
const RESYNC: Duration = Duration::from_secs(60);

fn resync<P>(context: &Context<P>) -> Action {
    if context.streams_status {
        Action::await_change()
    } else {
        Action::requeue(RESYNC)
    }
}

/// The controller's error policy: retry with exponential backoff, counted per pod.
pub(super) fn error_policy<P: Provider>(
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
    let delay = backoff(attempt);
    tracing::info!(pod = %pod_ref, attempt, ?delay, "reconciliation failed, retrying: {}", error_chain(error));
    Action::requeue(delay)
}

/// 1 s, 2 s, 4 s … capped at 5 min, like the kubelet's back-off.
fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(10).saturating_sub(1)).min(Duration::from_secs(300))
}

/// Publishes an Event on `pod`; a failure to publish is only logged.
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
    super::patch_status(&context.client, &PodRef::of(pod), &patch).await?;
    Ok(())
}

#[cfg(test)]
mod tests;
