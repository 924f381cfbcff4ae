//! The reconcile steps against the fake provider and the fake API server (`pods::fakes`):
//! no control plane, no root, paused clock where time matters.

use http::Method;
use kube::runtime::events::Reporter;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::*;
use crate::pods::fakes::{FakeApi, FakeProvider};

const NS: &str = "ns";
const CONFIG: &str = "/api/v1/namespaces/ns/configmaps/settings";

/// A reconcile context over the fakes.
struct Harness {
    api: FakeApi,
    provider: Arc<FakeProvider>,
    context: Arc<Context<FakeProvider>>,
    services: JoinHandle<()>,
    /// What the reference watches trigger (kept open; the tests mark pods themselves).
    _triggered: mpsc::UnboundedReceiver<kube::runtime::reflector::ObjectRef<CachedPod>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.services.abort();
    }
}

impl Harness {
    fn new(streams_status: bool) -> Self {
        Self::with_config(streams_status, NodeConfig::new("vn", "fake"))
    }

    fn with_config(streams_status: bool, config: NodeConfig) -> Self {
        let api = FakeApi::default();
        let client = api.client();
        let provider = Arc::new(FakeProvider::default());
        let (trigger, triggered) = mpsc::unbounded_channel();
        let (services, watch_services) = Services::watch(client.clone());
        let context = Arc::new(Context {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "updraft".into(),
                    instance: Some("vn".into()),
                },
            ),
            references: ReferenceWatches::new(client.clone(), trigger),
            client,
            provider: provider.clone(),
            config,
            metrics: PodMetrics::default(),
            services,
            handed: Mutex::default(),
            streams_status,
        });
        Self {
            api,
            provider,
            context,
            services: tokio::spawn(watch_services),
            _triggered: triggered,
        }
    }

    /// Stores `pod` in the API (status patches and deletes find it) and returns it.
    fn add(&self, pod: Pod) -> Pod {
        self.api
            .put(&pod_path(&pod), serde_json::to_value(&pod).unwrap());
        pod
    }

    async fn reconcile(&self, pod: &Pod) -> Result<Action, ReconcileError> {
        reconcile(Arc::new(pod.clone()), self.context.clone()).await
    }

    fn handed(&self, pod: &Pod) -> Option<Handed> {
        self.context.handed(&PodRef::of(pod))
    }

    /// Marks the pod as the references watch does when an object it references changes.
    fn reference_changed(&self, pod: &Pod) {
        let pod_ref = PodRef::of(pod);
        self.context
            .references
            .resolve_again(&pod_ref.namespace, &pod_ref.name);
    }

    /// How often the resolver read the ConfigMap `settings` by name.
    fn config_reads(&self) -> usize {
        self.api.sent(&Method::GET, CONFIG).len()
    }

    /// The env of container `c` the provider was last handed.
    fn env(&self, pod: &Pod) -> Vec<(String, String)> {
        let pod_ref = PodRef::of(pod);
        let handed = self
            .provider
            .handed(&pod_ref.namespace, &pod_ref.name)
            .unwrap();
        handed.env["c"]
            .iter()
            .map(|v| (v.name.clone(), v.value.clone()))
            .collect()
    }

    /// The token file the provider was last handed.
    fn token(&self, pod: &Pod) -> String {
        let pod_ref = PodRef::of(pod);
        let handed = self
            .provider
            .handed(&pod_ref.namespace, &pod_ref.name)
            .unwrap();
        String::from_utf8(handed.volumes["token"]["token"].data.clone()).unwrap()
    }
}

fn pod_path(pod: &Pod) -> String {
    let pod_ref = PodRef::of(pod);
    format!(
        "/api/v1/namespaces/{}/pods/{}",
        pod_ref.namespace, pod_ref.name
    )
}

/// A pod `name` in `ns` with one container `c` and `spec` merged into its spec.
fn pod(name: &str, spec: Value) -> Pod {
    let mut value = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}")},
        "spec": {"nodeName": "vn", "containers": [{"name": "c", "image": "busybox"}]},
    });
    for (key, field) in spec.as_object().cloned().unwrap_or_default() {
        value["spec"][key] = field;
    }
    serde_json::from_value(value).unwrap()
}

/// A pod whose container's `A` comes from key `a` of the ConfigMap `settings`.
fn referencing(name: &str) -> Pod {
    pod(
        name,
        json!({"containers": [{"name": "c", "image": "busybox", "env": [
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "a"}}}
        ]}]}),
    )
}

/// A pod with a projected service-account token volume `token` living `seconds`.
fn tokened(name: &str, seconds: i64) -> Pod {
    pod(
        name,
        json!({"volumes": [{"name": "token", "projected": {"sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": seconds}}
        ]}}]}),
    )
}

fn settings(a: &str, b: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "settings", "namespace": NS},
        "data": {"a": a, "b": b},
    })
}

/// The same pod with another image (a spec change).
fn with_image(pod: &Pod, image: &str) -> Pod {
    let mut pod = pod.clone();
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers[0].image = Some(image.into());
    }
    pod
}

fn deleting(pod: &Pod, grace: i64) -> Pod {
    let mut value = serde_json::to_value(pod).unwrap();
    value["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
    value["metadata"]["deletionGracePeriodSeconds"] = grace.into();
    serde_json::from_value(value).unwrap()
}

fn with_phase(pod: &Pod, phase: &str) -> Pod {
    let mut value = serde_json::to_value(pod).unwrap();
    value["status"] = json!({"phase": phase});
    serde_json::from_value(value).unwrap()
}

#[tokio::test]
async fn a_new_pod_is_created_with_its_inputs_and_resolver_settings() {
    let h = Harness::new(true);
    h.api.put(CONFIG, settings("one", "x"));
    let pod = h.add(referencing("p"));

    let action = h.reconcile(&pod).await.unwrap();

    assert_eq!(action, Action::await_change());
    assert_eq!(h.provider.take_calls(), ["status ns/p", "create ns/p"]);
    assert_eq!(h.env(&pod), [("A".to_owned(), "one".to_owned())]);
    let handed = h.provider.handed(NS, "p").unwrap();
    assert!(handed.dns.is_some(), "the node forms the resolver file");
    // The node has no cluster DNS configured: the kubelet's warning.
    assert_eq!(h.api.events(), ["MissingClusterDNS"]);
    let record = h.handed(&pod).unwrap();
    assert!(record.spec.is_some() && record.inputs.is_some());
    assert_eq!(record.tokens_due, None);
    // What it references is watched from now on.
    assert_eq!(h.context.references.watched(), 1);
}

#[tokio::test]
async fn an_unchanged_pod_is_neither_resolved_nor_handed_again() {
    let h = Harness::new(true);
    h.api.put(CONFIG, settings("one", "x"));
    let pod = h.add(referencing("p"));
    h.reconcile(&pod).await.unwrap();
    h.provider.take_calls();

    // A change of the ConfigMap that no watch reported: nothing asks to resolve again.
    h.api.put(CONFIG, settings("two", "x"));
    let action = h.reconcile(&pod).await.unwrap();

    assert_eq!(action, Action::await_change());
    assert!(
        h.provider.take_calls().is_empty(),
        "not even asked for status"
    );
    assert_eq!(h.config_reads(), 1, "resolved once, at the create");
}

#[tokio::test]
async fn a_changed_spec_is_an_update() {
    let h = Harness::new(true);
    let pod = h.add(pod("p", json!({})));
    h.reconcile(&pod).await.unwrap();
    h.provider.take_calls();

    let changed = with_image(&pod, "busybox:2");
    h.reconcile(&changed).await.unwrap();

    assert_eq!(h.provider.take_calls(), ["update ns/p"]);
    let handed = h.provider.handed(NS, "p").unwrap();
    let image = handed.pod.spec.as_ref().unwrap().containers[0]
        .image
        .clone();
    assert_eq!(image.as_deref(), Some("busybox:2"));
}

#[tokio::test]
async fn a_changed_reference_updates_the_pod_only_when_its_inputs_changed() {
    let h = Harness::new(true);
    h.api.put(CONFIG, settings("one", "x"));
    let pod = h.add(referencing("p"));
    h.reconcile(&pod).await.unwrap();
    h.provider.take_calls();
    let events = h.api.events().len();

    // A key the pod does not use: resolved again, but the provider is not called.
    h.api.put(CONFIG, settings("one", "y"));
    h.reference_changed(&pod);
    assert_eq!(h.reconcile(&pod).await.unwrap(), Action::await_change());
    assert_eq!(h.config_reads(), 2);
    assert!(h.provider.take_calls().is_empty());
    assert_eq!(h.api.events().len(), events, "nothing published");

    // The key it uses: an update with the new value.
    h.api.put(CONFIG, settings("two", "y"));
    h.reference_changed(&pod);
    h.reconcile(&pod).await.unwrap();
    assert_eq!(h.config_reads(), 3);
    assert_eq!(h.provider.take_calls(), ["update ns/p"]);
    assert_eq!(h.env(&pod), [("A".to_owned(), "two".to_owned())]);

    // The mark was taken: the next reconciliation resolves nothing.
    h.reconcile(&pod).await.unwrap();
    assert_eq!(h.config_reads(), 3);
    assert!(h.provider.take_calls().is_empty());
}

#[tokio::test]
async fn a_resolve_that_fails_after_a_reference_changed_is_resolved_again_on_the_retry() {
    let h = Harness::new(true);
    h.api.put(CONFIG, settings("one", "x"));
    let pod = h.add(referencing("p"));
    h.reconcile(&pod).await.unwrap();
    h.provider.take_calls();

    // The change's trigger is taken by a resolve the API server fails.
    h.api.put(CONFIG, settings("two", "x"));
    h.reference_changed(&pod);
    h.api.refuse_next(http::Method::GET, CONFIG, 500);
    h.reconcile(&pod).await.unwrap_err();
    assert!(h.provider.take_calls().is_empty());

    // The retry resolves again and updates the pod.
    h.reconcile(&pod).await.unwrap();
    assert_eq!(h.provider.take_calls(), ["update ns/p"]);
    assert_eq!(h.env(&pod), [("A".to_owned(), "two".to_owned())]);
}

#[tokio::test(start_paused = true)]
async fn projected_tokens_are_refreshed_when_due() {
    let h = Harness::new(true);
    let pod = h.add(tokened("p", 3600));

    let action = h.reconcile(&pod).await.unwrap();

    // 80 % of the hour.
    let refresh = Duration::from_secs(2880);
    assert_eq!(action, Action::requeue(refresh));
    assert_eq!(h.provider.take_calls(), ["status ns/p", "create ns/p"]);
    assert_eq!(h.token(&pod), "token-1");

    tokio::time::advance(refresh - Duration::from_secs(1)).await;
    assert_eq!(
        h.reconcile(&pod).await.unwrap(),
        Action::requeue(Duration::from_secs(1))
    );
    assert!(h.provider.take_calls().is_empty(), "not due yet");

    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(h.reconcile(&pod).await.unwrap(), Action::requeue(refresh));
    assert_eq!(h.provider.take_calls(), ["update ns/p"]);
    assert_eq!(h.token(&pod), "token-2");
}

#[tokio::test(start_paused = true)]
async fn without_a_status_stream_status_is_written_and_the_pod_resynced() {
    let h = Harness::new(false);
    let tokened = h.add(tokened("p", 3600));

    let action = h.reconcile(&tokened).await.unwrap();

    // Due in 48 minutes, but the minute's resync comes first.
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    assert_eq!(
        h.provider.take_calls(),
        ["status ns/p", "create ns/p", "status ns/p"]
    );
    let patches = h
        .api
        .sent(&Method::PATCH, &format!("{}/status", pod_path(&tokened)));
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0]["status"]["phase"], "Running");
    assert_eq!(patches[0]["metadata"]["uid"], "uid-p");

    // Nothing changed at the resync: no call but the check that it is handed.
    let plain = h.add(pod("q", json!({})));
    h.provider.take_calls();
    h.reconcile(&plain).await.unwrap();
    h.provider.take_calls();
    assert_eq!(
        h.reconcile(&plain).await.unwrap(),
        Action::requeue(Duration::from_secs(60))
    );
    assert!(h.provider.take_calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_pod_running_from_before_a_restart_is_adopted_untouched_and_given_fresh_tokens() {
    let h = Harness::new(true);
    h.api.put(CONFIG, settings("one", "x"));
    let mut value = serde_json::to_value(tokened("p", 3600)).unwrap();
    value["spec"]["containers"] =
        serde_json::to_value(referencing("p").spec.unwrap().containers).unwrap();
    let pod = h.add(serde_json::from_value(value).unwrap());
    h.provider.runs(&pod);

    let action = h.reconcile(&pod).await.unwrap();

    // Asked whether it runs, and nothing else; nothing published.
    assert_eq!(h.provider.take_calls(), ["status ns/p"]);
    assert!(h.api.events().is_empty());
    assert!(
        h.api
            .sent(&Method::PATCH, &format!("{}/status", pod_path(&pod)))
            .is_empty()
    );
    let record = h.handed(&pod).unwrap();
    assert!(record.spec.is_some());
    assert_eq!(record.inputs, None, "what it received is unknown");
    assert_eq!(
        record.tokens_due,
        Some(Instant::now()),
        "its tokens' age is unknown"
    );
    assert_eq!(
        h.context.references.watched(),
        1,
        "its references are watched"
    );
    // Tokens due at once: back in a second.
    assert_eq!(action, Action::requeue(Duration::from_secs(1)));

    tokio::time::advance(Duration::from_secs(1)).await;
    h.reconcile(&pod).await.unwrap();
    assert_eq!(h.provider.take_calls(), ["update ns/p"]);
    // The adoption's resolve asked for token-1; the update hands a fresh one.
    assert_eq!(h.token(&pod), "token-2");
    assert_eq!(h.env(&pod), [("A".to_owned(), "one".to_owned())]);
}

#[tokio::test]
async fn an_adopted_pod_is_updated_once_a_reference_changes() {
    let h = Harness::new(true);
    h.api.put(CONFIG, settings("one", "x"));
    let pod = h.add(referencing("p"));
    h.provider.runs(&pod);
    h.reconcile(&pod).await.unwrap();
    assert_eq!(h.provider.take_calls(), ["status ns/p"]);

    // Still untouched while nothing changes.
    h.reconcile(&pod).await.unwrap();
    assert!(h.provider.take_calls().is_empty());

    // Even with the same inputs: what the provider has is unknown.
    h.reference_changed(&pod);
    h.reconcile(&pod).await.unwrap();
    assert_eq!(h.provider.take_calls(), ["update ns/p"]);
    assert_eq!(h.env(&pod), [("A".to_owned(), "one".to_owned())]);
    assert!(h.handed(&pod).unwrap().inputs.is_some());
}

#[tokio::test]
async fn a_transient_update_failure_is_retried_with_a_fresh_resolve() {
    let h = Harness::new(true);
    h.api.put(CONFIG, settings("one", "x"));
    let pod = h.add(referencing("p"));
    h.reconcile(&pod).await.unwrap();
    h.provider.take_calls();
    let handed_before = h.handed(&pod);

    h.api.put(CONFIG, settings("two", "x"));
    h.reference_changed(&pod);
    h.provider
        .fail_next("update", ProviderError::transient("the backend is busy"));
    let error = h.reconcile(&pod).await.unwrap_err();

    assert!(matches!(error, ReconcileError::Provider(_)), "{error}");
    assert_eq!(h.provider.take_calls(), ["update ns/p"]);
    assert_eq!(
        h.api.events().last().map(String::as_str),
        Some("ProviderUpdateFailed")
    );
    assert_eq!(h.handed(&pod), handed_before, "nothing recorded as handed");

    // The retry (the controller's backoff) resolves and updates again by itself.
    h.reconcile(&pod).await.unwrap();
    assert_eq!(h.provider.take_calls(), ["update ns/p"]);
    assert_eq!(h.env(&pod), [("A".to_owned(), "two".to_owned())]);
}

#[tokio::test]
async fn a_transient_create_failure_is_retried() {
    let h = Harness::new(true);
    let pod = h.add(pod("p", json!({})));
    h.provider
        .fail_next("create", ProviderError::transient("no capacity yet"));

    let error = h.reconcile(&pod).await.unwrap_err();

    assert!(matches!(error, ReconcileError::Provider(_)), "{error}");
    assert_eq!(
        h.api.events(),
        ["MissingClusterDNS", "ProviderCreateFailed"]
    );
    assert!(h.handed(&pod).is_none());
    assert!(
        h.api
            .sent(&Method::PATCH, &format!("{}/status", pod_path(&pod)))
            .is_empty()
    );

    h.reconcile(&pod).await.unwrap();
    assert_eq!(
        h.provider.take_calls(),
        ["status ns/p", "create ns/p", "status ns/p", "create ns/p"]
    );
}

#[tokio::test]
async fn a_permanent_failure_is_written_to_the_pod() {
    for (policy, phase) in [("Never", "Failed"), ("Always", "Pending")] {
        let h = Harness::new(true);
        let pod = h.add(pod("p", json!({"restartPolicy": policy})));
        h.provider
            .fail_next("create", ProviderError::permanent("no such instance type"));

        let action = h.reconcile(&pod).await.unwrap();

        assert_eq!(action, Action::await_change(), "not retried");
        assert_eq!(
            h.api.events().last().map(String::as_str),
            Some("ProviderCreateFailed")
        );
        let patches = h
            .api
            .sent(&Method::PATCH, &format!("{}/status", pod_path(&pod)));
        assert_eq!(patches.len(), 1);
        assert_eq!(patches[0]["status"]["phase"], phase);
        assert_eq!(patches[0]["status"]["reason"], "ProviderFailed");
        let message = patches[0]["status"]["message"].as_str().unwrap();
        assert!(message.contains("no such instance type"), "{message}");
    }
}

#[tokio::test]
async fn missing_optional_references_are_published_and_the_pod_created() {
    let h = Harness::new(true);
    let pod = h.add(pod(
        "p",
        json!({"containers": [{"name": "c", "image": "busybox", "env": [
            {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "a", "optional": true}}}
        ]}]}),
    ));

    h.reconcile(&pod).await.unwrap();

    assert_eq!(h.provider.take_calls(), ["status ns/p", "create ns/p"]);
    assert_eq!(
        h.api.events(),
        ["OptionalConfigMapNotFound", "MissingClusterDNS"]
    );
    assert!(h.env(&pod).is_empty());
}

#[tokio::test]
async fn a_missing_mandatory_reference_holds_the_pod() {
    let h = Harness::new(true);
    let pod = h.add(referencing("p"));

    let error = h.reconcile(&pod).await.unwrap_err();

    assert!(matches!(error, ReconcileError::Resolve(_)), "{error}");
    assert_eq!(h.api.events(), ["MandatoryConfigMapNotFound"]);
    assert_eq!(h.provider.take_calls(), ["status ns/p"], "not created");

    h.api.put(CONFIG, settings("one", "x"));
    h.reconcile(&pod).await.unwrap();
    assert_eq!(h.provider.take_calls(), ["status ns/p", "create ns/p"]);
}

#[tokio::test]
async fn the_dns_settings_reach_the_provider_without_warnings_when_complete() {
    let mut config = NodeConfig::new("vn", "fake");
    config.dns.cluster_dns = vec!["10.96.0.10".parse().unwrap()];
    config.dns.cluster_domain = "cluster.local".into();
    let h = Harness::with_config(true, config);
    let pod = h.add(pod("p", json!({})));

    h.reconcile(&pod).await.unwrap();

    assert!(h.api.events().is_empty());
    let dns = h.provider.handed(NS, "p").unwrap().dns.unwrap();
    assert_eq!(dns.nameservers, ["10.96.0.10"]);
    assert_eq!(dns.searches[0], "ns.svc.cluster.local");
}

#[tokio::test]
async fn a_deleting_pod_is_stopped_forgotten_and_its_incarnation_deleted() {
    let h = Harness::new(true);
    h.api.put(CONFIG, settings("one", "x"));
    let pod = h.add(referencing("p"));
    h.reconcile(&pod).await.unwrap();
    h.provider.take_calls();

    let action = h.reconcile(&deleting(&pod, 5)).await.unwrap();

    assert_eq!(action, Action::await_change());
    assert_eq!(h.provider.take_calls(), ["delete ns/p 5"]);
    assert!(h.handed(&pod).is_none());
    assert_eq!(h.context.references.watched(), 0);
    let deletes = h.api.sent(&Method::DELETE, &pod_path(&pod));
    assert_eq!(deletes.len(), 1);
    assert_eq!(deletes[0]["gracePeriodSeconds"], 0);
    assert_eq!(deletes[0]["preconditions"]["uid"], "uid-p");
    assert!(h.api.get(&pod_path(&pod)).is_none());
}

#[tokio::test]
async fn deleting_tolerates_a_pod_the_provider_or_the_api_no_longer_has() {
    let h = Harness::new(true);
    let pod = h.add(pod("p", json!({})));
    h.provider
        .fail_next("delete", ProviderError::not_found("no such pod"));
    // Re-created under the same name: the UID precondition fails.
    h.api.refuse_next(Method::DELETE, &pod_path(&pod), 409);

    let action = h.reconcile(&deleting(&pod, 30)).await.unwrap();

    assert_eq!(action, Action::await_change());
    assert_eq!(h.provider.take_calls(), ["delete ns/p 30"]);
    assert!(h.api.events().is_empty());
    // And once the API object is gone.
    h.api.refuse_next(Method::DELETE, &pod_path(&pod), 404);
    h.reconcile(&deleting(&pod, 30)).await.unwrap();
}

#[tokio::test]
async fn a_failed_provider_delete_keeps_the_api_object_and_is_retried() {
    let h = Harness::new(true);
    let pod = h.add(pod("p", json!({})));
    h.reconcile(&pod).await.unwrap();
    h.provider
        .fail_next("delete", ProviderError::transient("the backend is busy"));

    let error = h.reconcile(&deleting(&pod, 30)).await.unwrap_err();

    assert!(matches!(error, ReconcileError::Provider(_)), "{error}");
    assert_eq!(
        h.api.events().last().map(String::as_str),
        Some("ProviderDeleteFailed")
    );
    assert!(h.api.sent(&Method::DELETE, &pod_path(&pod)).is_empty());
    assert!(h.handed(&pod).is_some(), "still handed");
}

#[tokio::test]
async fn a_terminal_pod_is_forgotten_and_left_alone() {
    let h = Harness::new(true);
    h.api.put(CONFIG, settings("one", "x"));
    let pod = h.add(referencing("p"));
    h.reconcile(&pod).await.unwrap();
    h.provider.take_calls();

    for phase in ["Succeeded", "Failed"] {
        let action = h.reconcile(&with_phase(&pod, phase)).await.unwrap();
        assert_eq!(action, Action::await_change());
    }

    assert!(
        h.provider.take_calls().is_empty(),
        "the provider keeps it until deleted"
    );
    assert!(h.handed(&pod).is_none());
    assert_eq!(h.context.references.watched(), 0);
}

#[tokio::test]
async fn a_failing_status_check_is_an_error_before_anything_is_taken() {
    let h = Harness::new(true);
    let pod = h.add(pod("p", json!({})));
    h.provider
        .fail_next("status", ProviderError::transient("unreachable"));
    h.reference_changed(&pod);

    let error = h.reconcile(&pod).await.unwrap_err();

    assert!(matches!(error, ReconcileError::Provider(_)), "{error}");
    // The mark is still there for the retry.
    assert!(h.context.references.take_resolve_again(NS, "p"));
}

#[tokio::test]
async fn failures_back_off_exponentially_and_reset_once_handed() {
    let h = Harness::new(true);
    let pod = h.add(pod("p", json!({})));
    let cached = Arc::new(CachedPod::new(pod.clone()));
    let error = ReconcileError::Provider(ProviderError::transient("busy"));
    let delays: Vec<Action> = (0..3)
        .map(|_| error_policy(cached.clone(), &error, h.context.clone()))
        .collect();
    assert_eq!(
        delays,
        [1, 2, 4].map(|s| Action::requeue(Duration::from_secs(s)))
    );
    assert_eq!(h.handed(&pod).unwrap().failures, 3);
    assert_eq!(backoff(9), Duration::from_secs(256));
    assert_eq!(backoff(10), Duration::from_secs(300));
    assert_eq!(backoff(30), Duration::from_secs(300));

    h.reconcile(&pod).await.unwrap();
    assert_eq!(h.handed(&pod).unwrap().failures, 0);
}
