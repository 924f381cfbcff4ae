//! Selection, restart recovery, deletion and garbage collection through the `Provider` API,
//! with the real agent client: no agent answers here (cells never get past booting; the
//! integration tests run real agents on local cells).

use std::sync::Arc;
use std::time::Duration;

use updraft_cells_backend::CellId;
use updraft_provider::{PodRef, Provider, ProviderError, ResolvedPod};

use super::{Addresses, FakeBackend, api_pod, pod, provider, provider_with, settings, until};

#[tokio::test]
async fn a_bad_annotation_or_an_impossible_request_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::default());
    let provider = provider(backend.clone(), dir.path()).await;

    let annotated = pod(
        "u1",
        ", annotations: {cells.updraft.dev/launch-type: reserved}",
    );
    let err = provider.create_pod(&annotated).await.unwrap_err();
    assert!(matches!(err, ProviderError::InvalidInput { .. }), "{err:?}");
    assert!(err.to_string().contains("launch-type"), "{err}");

    let mut huge = api_pod("u2", "");
    let spec = huge.spec.as_mut().unwrap();
    spec.containers[0].resources = serde_yaml::from_str("{requests: {cpu: '200'}}").unwrap();
    let huge = ResolvedPod::unresolved(huge);
    let err = provider.create_pod(&huge).await.unwrap_err();
    assert!(matches!(err, ProviderError::Permanent { .. }), "{err:?}");
    assert!(err.to_string().contains("vCPU"), "{err}");

    assert!(backend.started.lock().unwrap().is_empty());
    assert!(provider.list_pods().await.unwrap().is_empty());
    assert_eq!(
        provider.pod_status(&PodRef::of(&huge.pod)).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn a_cell_that_never_answers_is_terminated_and_the_retry_starts_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there: the agent never answers.
    let backend = Arc::new(FakeBackend::with_addresses(silent_address()));
    let provider = provider(backend.clone(), dir.path()).await;
    let web = pod("u1", "");
    let mut updates = provider.status_updates().unwrap();
    // The create returns once the cell is started; the boot goes on in the background.
    provider.create_pod(&web).await.unwrap();
    {
        let started = backend.started.lock().unwrap();
        assert_eq!(started.len(), 1);
        let spec = &started[0];
        // The cheapest type for 1.5 CPU / 1 GiB in the local catalog.
        assert_eq!(spec.instance_type, "local.medium");
        assert_eq!(spec.identity.pod_uid, "u1");
        assert_eq!(spec.identity.node, "node-a");
        assert_eq!(spec.identity.controller_id, "ctl");
        assert_eq!(spec.security_groups, vec!["sg-extra".to_string()]);
        assert_eq!(spec.idempotency_token, "u1-0");
        let text = String::from_utf8(spec.user_data.clone()).unwrap();
        assert!(
            text.contains("updraft-cell") && text.contains("--client-ca"),
            "{text}"
        );
    }
    // After the boot timeout the silent cell is terminated, the pod's status says why, and a
    // new cell (a new start attempt) is started.
    let said = tokio::time::timeout(Duration::from_secs(120), async {
        use futures::StreamExt as _;
        while let Some(update) = updates.next().await {
            if update
                .status
                .message
                .as_deref()
                .is_some_and(|m| m.contains("did not answer within the boot timeout"))
            {
                return update.status;
            }
        }
        panic!("the status stream ended");
    })
    .await
    .expect("a boot-timeout status");
    assert_eq!(said.phase.as_deref(), Some("Pending"));
    assert_eq!(said.reason.as_deref(), Some("CellBootTimeout"));
    let message = said.message.unwrap_or_default();
    assert!(
        message.contains("(bootTimeout: 300ms)")
            && message.contains("raise bootTimeout")
            && message.contains("starting a new cell"),
        "the message names the timeout and what to do: {message}"
    );
    until("a second start", || {
        backend.started.lock().unwrap().len() >= 2
    })
    .await;
    assert!(
        backend
            .terminated
            .lock()
            .unwrap()
            .contains(&CellId("cell-0".into()))
    );
    assert_eq!(backend.started.lock().unwrap()[1].idempotency_token, "u1-1");
    // Not running for the node until an agent runs it.
    assert_eq!(
        provider.pod_status(&PodRef::of(&web.pod)).await.unwrap(),
        None
    );
    provider.delete_pod(&PodRef::of(&web.pod), 0).await.unwrap();
    assert!(backend.live().is_empty());
}

#[tokio::test]
async fn after_a_restart_cells_are_adopted_and_never_started_twice() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::default());
    backend.add("old-1", "ctl", "node-a", "u1", Duration::from_secs(600));
    let mut settings = settings("node-a");
    settings.boot_timeout = Duration::from_secs(3600);
    backend.add(
        "other-controller",
        "ctl-b",
        "node-a",
        "u2",
        Duration::from_secs(600),
    );
    backend.add(
        "other-node",
        "ctl",
        "node-b",
        "u3",
        Duration::from_secs(600),
    );
    let provider = provider_with(backend.clone(), dir.path(), settings).await;
    let listed = provider.list_pods().await.unwrap();
    let uids: Vec<&str> = listed.iter().map(|p| p.pod.uid.as_str()).collect();
    assert_eq!(uids, vec!["u1"]);
    assert_eq!(listed[0].pod.name, "pod-u1");
    // The node asks to create the pod (its agent has not confirmed it yet): the adopted
    // cell is used, no second one is started.
    let mut api = api_pod("u1", "");
    api.metadata.name = Some("pod-u1".into());
    let web = ResolvedPod::unresolved(api);
    let _ = provider.create_pod(&web).await;
    assert!(backend.started.lock().unwrap().is_empty());
}

#[tokio::test]
async fn deleting_a_pod_terminates_every_cell_listed_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::default());
    backend.add("c1", "ctl", "node-a", "u1", Duration::from_secs(600));
    backend.add("c2", "ctl", "node-a", "u1", Duration::from_secs(600));
    backend.add("c3", "ctl", "node-a", "u2", Duration::from_secs(600));
    let provider = provider(backend.clone(), dir.path()).await;
    let pod_ref = PodRef {
        namespace: "ns".into(),
        name: "pod-u1".into(),
        uid: "u1".into(),
    };
    provider.delete_pod(&pod_ref, 0).await.unwrap();
    assert_eq!(backend.live(), vec!["c3".to_string()]);
    // Deleting again (a repeated call after a restart) succeeds.
    provider.delete_pod(&pod_ref, 0).await.unwrap();
    let uids: Vec<String> = provider
        .list_pods()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.pod.uid)
        .collect();
    assert_eq!(uids, vec!["u2".to_string()]);
}

#[tokio::test]
async fn garbage_collection_terminates_a_second_cell_of_one_pod_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::default());
    backend.add("first", "ctl", "node-a", "u1", Duration::from_secs(600));
    let mut settings = settings("node-a");
    settings.gc_grace_period = Duration::from_secs(60);
    let provider = provider_with(backend.clone(), dir.path(), settings).await;
    // A second cell appears for the same pod (a start another process retried): young ones
    // are left alone during the grace period, old ones go.
    backend.add("young", "ctl", "node-a", "u1", Duration::from_secs(1));
    backend.add("old", "ctl", "node-a", "u1", Duration::from_secs(600));
    provider.collect_garbage().await;
    let mut live = backend.live();
    live.sort();
    assert_eq!(live, vec!["first".to_string(), "young".to_string()]);
    // A cell that appears for an unknown pod is adopted, but reported to the node (whose
    // orphan sweep deletes pods the API does not know) only after the grace period.
    backend.add("stray", "ctl", "node-a", "u9", Duration::from_secs(600));
    provider.collect_garbage().await;
    let uids: Vec<String> = provider
        .list_pods()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.pod.uid)
        .collect();
    assert!(!uids.contains(&"u9".to_string()), "{uids:?}");
    assert!(backend.live().contains(&"stray".to_string()));
}

/// An address where no agent listens: the agent of such a cell never answers.
fn silent_address() -> Addresses {
    Addresses::Shared("127.0.0.1".parse().unwrap())
}

#[tokio::test]
async fn a_cell_adopted_while_booting_keeps_its_boot_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::with_addresses(silent_address()));
    // Launched a moment ago by a run that was killed before the agent answered.
    backend.add("booting", "ctl", "node-a", "u1", Duration::from_secs(1));
    let mut settings = settings("node-a");
    settings.health_timeout = Duration::from_millis(100);
    settings.boot_timeout = Duration::from_secs(3600);
    let provider = provider_with(backend.clone(), dir.path(), settings).await;
    // The watcher checks the silent cell with the backend after each unanswered status call:
    // wait for many checks, well past the health timeout.
    let checks_after = |n: usize| {
        let backend = backend.clone();
        move || backend.describes.load(std::sync::atomic::Ordering::SeqCst) >= n
    };
    until("the watcher's checks", checks_after(20)).await;
    assert_eq!(
        backend.live(),
        vec!["booting".to_string()],
        "a booting cell is not lost after healthTimeout"
    );
    // The node asks for the pod: it waits for that cell and starts no second one.
    let mut api = api_pod("u1", "");
    api.metadata.name = Some("pod-u1".into());
    provider
        .create_pod(&ResolvedPod::unresolved(api))
        .await
        .unwrap();
    until("more checks", checks_after(40)).await;
    assert!(backend.started.lock().unwrap().is_empty());
    assert_eq!(backend.live(), vec!["booting".to_string()]);
    // Deleting the pod stops the wait at once (the boot timeout is an hour) and terminates it.
    let pod_ref = PodRef {
        namespace: "ns".into(),
        name: "pod-u1".into(),
        uid: "u1".into(),
    };
    provider.delete_pod(&pod_ref, 30).await.unwrap();
    assert!(backend.live().is_empty());
    assert!(backend.started.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_cell_whose_boot_timed_out_before_the_restart_is_lost_after_the_health_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::with_addresses(silent_address()));
    backend.add("silent", "ctl", "node-a", "u1", Duration::from_secs(600));
    let mut settings = settings("node-a");
    settings.health_timeout = Duration::from_millis(100);
    settings.boot_timeout = Duration::from_secs(60);
    let _provider = provider_with(backend.clone(), dir.path(), settings).await;
    until("the silent cell to be terminated", || {
        backend.live().is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_cell_no_pod_claims_is_reported_to_the_orphan_sweep_only_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::default());
    backend.add("claimed", "ctl", "node-a", "u1", Duration::from_secs(600));
    backend.add("stray", "ctl", "node-a", "u9", Duration::from_secs(600));
    let mut long = settings("node-a");
    long.gc_grace_period = Duration::from_secs(3600);
    long.boot_timeout = Duration::from_secs(3600);
    let provider = provider_with(backend.clone(), dir.path(), long).await;
    // The node asks for u1 (its pod exists; the create waits for the agent); nobody asks for u9.
    let mut api = api_pod("u1", "");
    api.metadata.name = Some("pod-u1".into());
    let create = {
        let provider = provider.clone();
        tokio::spawn(async move { provider.create_pod(&ResolvedPod::unresolved(api)).await })
    };
    until("the create to wait for the agent", || {
        backend.describes.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    let uids = |pods: Vec<updraft_provider::ProviderPod>| {
        let mut uids: Vec<String> = pods.into_iter().map(|p| p.pod.uid).collect();
        uids.sort();
        uids
    };
    assert_eq!(uids(provider.list_pods().await.unwrap()), vec!["u1"]);
    provider.shutdown();
    let _ = create.await;
    drop(provider);
    // Once its grace period is over, the stray cell's pod is listed (the node's sweep deletes
    // pods the API does not know).
    let mut short = settings("node-a");
    short.gc_grace_period = Duration::ZERO;
    let provider = provider_with(backend.clone(), dir.path(), short).await;
    assert_eq!(uids(provider.list_pods().await.unwrap()), vec!["u1", "u9"]);
}

#[tokio::test]
async fn a_create_returns_once_the_cell_is_started_and_a_delete_ends_the_boot() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::with_addresses(silent_address()));
    let mut settings = settings("node-a");
    settings.boot_timeout = Duration::from_secs(3600);
    let provider = provider_with(backend.clone(), dir.path(), settings).await;
    let web = pod("u1", "");
    // The boot takes as long as it takes (an hour here): the create does not wait for it, so
    // the node is free to delete the pod meanwhile.
    provider.create_pod(&web).await.unwrap();
    provider.create_pod(&web).await.unwrap();
    assert_eq!(
        backend.started.lock().unwrap().len(),
        1,
        "one cell, waited for"
    );
    until("the boot to wait for the agent", || {
        backend.describes.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    assert_eq!(backend.live(), vec!["cell-0".to_string()]);
    provider
        .delete_pod(&PodRef::of(&web.pod), 30)
        .await
        .unwrap();
    assert!(backend.live().is_empty());
    assert_eq!(backend.started.lock().unwrap().len(), 1);
}
