//! Watches the ConfigMaps and Secrets that the node's pods reference, one object at a time,
//! so that updates reach the provider (the Go virtual-kubelet never propagates them).
//!
//! Each referenced object gets a watch with `fieldSelector=metadata.name=<name>` in its
//! namespace, as the kubelet does; the Node authorizer allows exactly these. Nothing is
//! cached but the object's `resourceVersion`. When an object changes, appears or goes away,
//! the pods that reference it are marked "resolve again" and handed to the pod controller.
//!
//! The mark is a trigger and nothing more: it says that the pod's inputs must be resolved
//! before the controller can tell whether the provider needs them, not that it does (an
//! object may change in a key the pod does not use). That is decided in one place, the pod
//! controller's decision, by comparing the hash of the resolved inputs with what was
//! handed. Without the mark the controller does not resolve a pod whose spec is unchanged:
//! resolving reads every referenced object and requests tokens, too much for every status
//! write and resync. The pod controller also sets the mark itself when an update failed,
//! so that its retry resolves again.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt as _, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::cache::CachedPod;
use updraft_common::sync::lock;

/// Which kind of object a pod references.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReferencedKind {
    /// A `ConfigMap`.
    ConfigMap,
    /// A `Secret`.
    Secret,
}

/// One ConfigMap or Secret a pod references.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Referenced {
    /// ConfigMap or Secret.
    pub kind: ReferencedKind,
    /// Its namespace (the pod's).
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl Referenced {
    /// The ConfigMap `name` in `namespace`.
    pub fn config_map(namespace: &str, name: &str) -> Self {
        Self {
            kind: ReferencedKind::ConfigMap,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The Secret `name` in `namespace`.
    pub fn secret(namespace: &str, name: &str) -> Self {
        Self {
            kind: ReferencedKind::Secret,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

type PodKey = (String, String);

#[derive(Default)]
struct State {
    /// Who references what, and the watch of each referenced object.
    watched: HashMap<Referenced, (HashSet<PodKey>, JoinHandle<()>)>,
    /// What each pod references.
    by_pod: HashMap<PodKey, Vec<Referenced>>,
    /// Pods to resolve again at their next reconciliation (a referenced object changed, or
    /// their update is to be retried).
    resolve_again: HashSet<PodKey>,
}

/// The watches of referenced objects, shared by the pod controller's reconciliations.
pub struct ReferenceWatches {
    client: kube::Client,
    state: std::sync::Arc<Mutex<State>>,
    trigger: mpsc::UnboundedSender<ObjectRef<CachedPod>>,
}

impl ReferenceWatches {
    /// Watches that hand pods to reconcile again to `trigger`.
    pub fn new(client: kube::Client, trigger: mpsc::UnboundedSender<ObjectRef<CachedPod>>) -> Self {
        Self {
            client,
            state: std::sync::Arc::new(Mutex::new(State::default())),
            trigger,
        }
    }

    /// Records that pod `namespace/name` references exactly `references`: watches start for
    /// new objects and stop for objects no pod references any more.
    pub fn track(&self, namespace: &str, name: &str, references: Vec<Referenced>) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut state = lock(&self.state);
        let previous = state.by_pod.remove(&key).unwrap_or_default();
        for old in previous.iter().filter(|r| !references.contains(r)) {
            release(&mut state, old, &key);
        }
        for new in &references {
            if let Some((pods, _)) = state.watched.get_mut(new) {
                pods.insert(key.clone());
            } else {
                let task = self.spawn_watch(new.clone());
                state
                    .watched
                    .insert(new.clone(), (HashSet::from([key.clone()]), task));
            }
        }
        if !references.is_empty() {
            state.by_pod.insert(key, references);
        }
    }

    /// The pod is gone (or terminal): its references no longer matter.
    pub fn forget(&self, namespace: &str, name: &str) {
        self.track(namespace, name, Vec::new());
        lock(&self.state)
            .resolve_again
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// Whether the pod is to be resolved again (clears the mark): an object it references
    /// changed, or [`ReferenceWatches::resolve_again`] was called, since the last call.
    pub fn take_resolve_again(&self, namespace: &str, name: &str) -> bool {
        lock(&self.state)
            .resolve_again
            .remove(&(namespace.to_owned(), name.to_owned()))
    }

    /// Marks the pod to be resolved again at its next reconciliation (without triggering
    /// one: the caller's retry does).
    pub fn resolve_again(&self, namespace: &str, name: &str) {
        lock(&self.state)
            .resolve_again
            .insert((namespace.to_owned(), name.to_owned()));
    }

    /// How many objects are watched.
    pub fn watched(&self) -> usize {
        lock(&self.state).watched.len()
    }

    fn spawn_watch(&self, object: Referenced) -> JoinHandle<()> {
        let state = self.state.clone();
        let trigger = self.trigger.clone();
        let client = self.client.clone();
        match object.kind {
            ReferencedKind::ConfigMap => tokio::spawn(watch_object::<ConfigMap>(
                Api::namespaced(client, &object.namespace),
                object,
                state,
                trigger,
            )),
            ReferencedKind::Secret => tokio::spawn(watch_object::<Secret>(
                Api::namespaced(client, &object.namespace),
                object,
                state,
                trigger,
            )),
        }
    }
}

impl Drop for ReferenceWatches {
    fn drop(&mut self) {
        for (_, (_, task)) in lock(&self.state).watched.drain() {
            task.abort();
        }
    }
}

fn release(state: &mut State, object: &Referenced, pod: &PodKey) {
    let unused = match state.watched.get_mut(object) {
        Some((pods, _)) => {
            pods.remove(pod);
            pods.is_empty()
        }
        None => false,
    };
    if unused && let Some((_, task)) = state.watched.remove(object) {
        task.abort();
    }
}

/// Watches one object; marks its pods "resolve again" and triggers them whenever its
/// `resourceVersion` (or its existence) changes after the first listing, including across
/// watch restarts.
async fn watch_object<K>(
    api: Api<K>,
    object: Referenced,
    state: std::sync::Arc<Mutex<State>>,
    trigger: mpsc::UnboundedSender<ObjectRef<CachedPod>>,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={}", object.name));
    // Backoff: a forbidden or failing watch must not spin against the API server.
    let mut events = watcher(api, config).default_backoff().boxed();
    // None: not listed yet; Some(None): absent; Some(Some(rv)): present at that version.
    let mut known: Option<Option<String>> = None;
    let mut listing: Option<String> = None;
    while let Some(event) = events.next().await {
        let now = match event {
            Ok(watcher::Event::Init) => {
                listing = None;
                continue;
            }
            Ok(watcher::Event::InitApply(found)) => {
                listing = found.meta().resource_version.clone();
                continue;
            }
            Ok(watcher::Event::InitDone) => listing.take(),
            Ok(watcher::Event::Apply(found)) => found.meta().resource_version.clone(),
            Ok(watcher::Event::Delete(_)) => None,
            Err(err) => {
                tracing::debug!(?object, "watching a referenced object: {err}");
                continue;
            }
        };
        let first = known.is_none();
        let changed = known.as_ref() != Some(&now);
        known = Some(now);
        if first || !changed {
            continue;
        }
        let pods: Vec<PodKey> = {
            let mut state = lock(&state);
            let pods: Vec<PodKey> = state
                .watched
                .get(&object)
                .map(|(pods, _)| pods.iter().cloned().collect())
                .unwrap_or_default();
            state.resolve_again.extend(pods.iter().cloned());
            pods
        };
        tracing::debug!(?object, pods = pods.len(), "a referenced object changed");
        for (namespace, name) in pods {
            let _ = trigger.send(ObjectRef::new(&name).within(&namespace));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::fakes::FakeApi;

    #[tokio::test]
    async fn the_resolve_again_mark_is_taken_once_and_dropped_with_the_pod() {
        let api = FakeApi::default();
        let (trigger, _triggered) = mpsc::unbounded_channel();
        let watches = ReferenceWatches::new(api.client(), trigger);
        let shared = Referenced::config_map("ns", "shared");
        watches.track(
            "ns",
            "p",
            vec![shared.clone(), Referenced::secret("ns", "own")],
        );
        watches.track("ns", "q", vec![shared]);
        assert_eq!(watches.watched(), 2);

        assert!(
            !watches.take_resolve_again("ns", "p"),
            "tracking marks nothing"
        );
        watches.resolve_again("ns", "p");
        assert!(
            !watches.take_resolve_again("ns", "q"),
            "only the pod marked"
        );
        assert!(watches.take_resolve_again("ns", "p"));
        assert!(!watches.take_resolve_again("ns", "p"), "taken once");

        watches.resolve_again("ns", "p");
        watches.forget("ns", "p");
        assert!(
            !watches.take_resolve_again("ns", "p"),
            "dropped with the pod"
        );
        assert_eq!(watches.watched(), 1, "q still references the shared one");
        watches.track("ns", "q", Vec::new());
        assert_eq!(watches.watched(), 0);
    }
}
