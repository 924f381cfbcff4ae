//! The node's watch cache of its pods, kept compact.
//!
//! A k8s-openapi `Pod` is large in memory even when sparse: every `Volume` carries all of its
//! thirty-odd sources inline (3.3 KB), every `Container` all of its probes and hooks (2.3 KB),
//! so a typical pod takes 12–16 KB as a struct while its JSON is 2–3 KB. The cache therefore
//! keeps each pod as its metadata (which lookups, references and the controller's queue use)
//! plus its spec and status as JSON, and decodes a full [`Pod`] only when one is needed: a
//! reconciliation, a status comparison, a `/pods` listing. `managedFields` and kubectl's
//! last-applied annotation are dropped on the way in.

use std::borrow::Cow;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use updraft_provider::PodRef;

/// The annotation `kubectl apply` stores a copy of the whole object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// One pod of the node as the cache holds it: metadata, phase, and spec and status encoded.
#[derive(Clone, Debug)]
pub struct CachedPod {
    metadata: ObjectMeta,
    /// `status.phase`, kept apart because the metrics count pods by it on every scrape.
    phase: Option<String>,
    /// `{"spec": …, "status": …}` as JSON.
    encoded: Box<[u8]>,
}

/// The parts of a pod that are kept encoded.
#[derive(Serialize, Deserialize)]
struct Body<S, T> {
    #[serde(skip_serializing_if = "Option::is_none")]
    spec: Option<S>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<T>,
}

impl CachedPod {
    /// The compact form of `pod`, without its managed fields and last-applied annotation.
    pub fn new(pod: Pod) -> Self {
        let Pod {
            mut metadata,
            spec,
            status,
        } = pod;
        metadata.managed_fields = None;
        if let Some(annotations) = metadata.annotations.as_mut() {
            annotations.remove(LAST_APPLIED);
        }
        let phase = status.as_ref().and_then(|s| s.phase.clone());
        let body = Body { spec, status };
        // Serializing a k8s-openapi struct into memory cannot fail (no maps with non-string
        // keys, no I/O); an empty body would decode as a pod without spec or status.
        let encoded = serde_json::to_vec(&body).unwrap_or_default();
        Self {
            metadata,
            phase,
            encoded: encoded.into_boxed_slice(),
        }
    }

    /// The full pod.
    pub fn pod(&self) -> Pod {
        let body: Body<PodSpec, PodStatus> =
            serde_json::from_slice(&self.encoded).unwrap_or(Body {
                spec: None,
                status: None,
            });
        Pod {
            metadata: self.metadata.clone(),
            spec: body.spec,
            status: body.status,
        }
    }

    /// The pod's reference (namespace, name, UID).
    pub fn pod_ref(&self) -> PodRef {
        PodRef {
            namespace: self.metadata.namespace.clone().unwrap_or_default(),
            name: self.metadata.name.clone().unwrap_or_default(),
            uid: self.metadata.uid.clone().unwrap_or_default(),
        }
    }

    /// `status.phase`, if the pod has one.
    pub fn phase(&self) -> Option<&str> {
        self.phase.as_deref()
    }
}

impl<'de> Deserialize<'de> for CachedPod {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Pod::deserialize(deserializer).map(Self::new)
    }
}

impl Resource for CachedPod {
    type DynamicType = ();
    type Scope = <Pod as Resource>::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        Pod::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        Pod::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        Pod::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        Pod::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The pods bound to the node, as the pod controller's watch sees them.
///
/// Filled and kept current while the controller runs; [`PodCache::listed`] tells when the
/// first list is in (before that, every pod would look missing).
#[derive(Clone, Debug)]
pub struct PodCache {
    store: Store<CachedPod>,
    /// Turns true once the watch has applied its first list to the store. Not
    /// `Store::wait_until_ready`: kube-runtime's readiness wakes only the last of several
    /// concurrent waiters, and the controller itself is one of them, so any second waiter
    /// could leave the controller (or a request) waiting forever.
    listed: watch::Receiver<bool>,
}

impl PodCache {
    /// The cache read from `store`, listed once `listed` turns true.
    pub(crate) fn new(store: Store<CachedPod>, listed: watch::Receiver<bool>) -> Self {
        Self { store, listed }
    }

    /// Waits until the first list is in; false if the watch ended before that.
    pub async fn listed(&self) -> bool {
        self.listed.clone().wait_for(|listed| *listed).await.is_ok()
    }

    /// The pod `namespace/name`, if it is bound to the node.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<CachedPod>> {
        self.store.get(&ObjectRef::new(name).within(namespace))
    }

    /// Every pod bound to the node, in no particular order.
    pub fn all(&self) -> Vec<Arc<CachedPod>> {
        self.store.state()
    }

    /// The underlying store, for the controller.
    pub(crate) fn store(&self) -> &Store<CachedPod> {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn sample() -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "p", "namespace": "ns", "uid": "u1",
                "annotations": {LAST_APPLIED: "{…}", "keep": "me"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
            },
            "spec": {
                "containers": [{"name": "main", "image": "busybox", "args": ["a", "b"]}],
                "volumes": [{"name": "data", "emptyDir": {"medium": "Memory"}}]
            },
            "status": {"phase": "Running", "podIP": "10.0.0.7"}
        }))
        .unwrap()
    }

    #[test]
    fn a_cached_pod_decodes_to_the_pod_without_managed_fields_or_last_applied() {
        let mut expected = sample();
        let cached = CachedPod::new(sample());
        expected.metadata.managed_fields = None;
        expected
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(LAST_APPLIED);
        assert_eq!(cached.pod(), expected);
        assert_eq!(cached.phase(), Some("Running"));
        assert_eq!(cached.pod_ref().to_string(), "ns/p");
    }

    /// Everyone waiting for the first list (requests, the orphan sweep) proceeds once it is
    /// in, however many wait at once.
    #[tokio::test]
    async fn concurrent_waiters_all_see_the_first_list() {
        let writer = kube::runtime::reflector::store::Writer::<CachedPod>::default();
        let (listed, is_listed) = watch::channel(false);
        let cache = PodCache::new(writer.as_reader(), is_listed);
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.listed().await })
            })
            .collect();
        tokio::task::yield_now().await;
        listed.send_replace(true);
        for waiter in waiters {
            let listed = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
                .await
                .expect("a waiter was never woken")
                .unwrap();
            assert!(listed);
        }
    }

    #[test]
    fn a_cached_pod_deserializes_from_the_api_json() {
        let json = serde_json::to_string(&sample()).unwrap();
        let cached: CachedPod = serde_json::from_str(&json).unwrap();
        assert_eq!(cached.pod().spec, sample().spec);
        assert!(cached.encoded.len() < json.len());
    }
}
