//! The standby pool against the in-memory backend, whose `assign` refuses non-standby cells
//! like the real ones, and whose listing can lag behind its starts like EC2's.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use updraft_cells_backend::{CellBackend, CellId, LaunchType};
use updraft_provider::{Provider, ResolvedPod};

use super::{FakeBackend, provider_with};
use crate::cells::CellView;
use crate::provider::{CellsProvider, SetupError};
use crate::settings::ProviderSettings;
use crate::standby::StandbyEntry;
use updraft_common::sync::lock;

fn settings() -> ProviderSettings {
    let config = crate::config::CellsConfig::from_yaml_str(
        "backend: local\ncontrollerId: ctl\ncertificateDir: /nonexistent\ngcInterval: 1h\nbootTimeout: 1s\n",
        "test",
    )
    .unwrap();
    let mut settings = ProviderSettings::from_config(&config, "node-a");
    settings.retry_interval = Duration::from_millis(50);
    // Adopted cells are listed at once (no node here claims them).
    settings.gc_grace_period = Duration::ZERO;
    // The passes these tests run refill at once (one test below runs the quiet period).
    settings.refill_quiet_period = Duration::ZERO;
    settings
}

async fn provider(backend: Arc<FakeBackend>, dir: &std::path::Path) -> CellsProvider {
    provider_with(backend, dir, settings()).await
}

fn entry(instance_type: &str, count: u32) -> StandbyEntry {
    StandbyEntry {
        instance_type: instance_type.into(),
        launch_type: LaunchType::OnDemand,
        count,
    }
}

/// A pod that requests nothing (the default type, local.small) plus `extra` metadata YAML.
fn pod(uid: &str, extra: &str) -> ResolvedPod {
    let yaml = format!(
        "metadata: {{name: web-{uid}, namespace: ns, uid: {uid}{extra}}}\nspec:\n  containers:\n  - {{name: app, image: busybox}}\n"
    );
    ResolvedPod::unresolved(serde_yaml::from_str::<Pod>(&yaml).unwrap())
}

#[tokio::test]
async fn the_pool_fills_once_and_a_lagging_listing_starts_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::default());
    let provider = provider(backend.clone(), dir.path()).await;
    *lock(&provider.inner.standby.entries) = vec![entry("local.small", 2)];
    // The listing will not show what is started now.
    *backend.hide_started_from.lock().unwrap() = Some(0);
    provider.reconcile_standby_pool().await;
    assert_eq!(backend.standby().len(), 2);
    provider.reconcile_standby_pool().await;
    assert_eq!(backend.standby().len(), 2, "counted while unlisted");
    *backend.hide_started_from.lock().unwrap() = None;
    provider.reconcile_standby_pool().await;
    let standby = backend.standby();
    assert_eq!(standby.len(), 2);
    for cell in &standby {
        let identity = cell.identity.as_ref().unwrap();
        assert_eq!(identity.node, "node-a");
        assert_eq!(identity.controller_id, "ctl");
        assert_eq!(cell.instance_type, "local.small");
        assert_eq!(cell.name, "updraft-standby-local-small");
    }
    // Standby cells are nobody's pod: not listed, not collected.
    provider.collect_garbage().await;
    assert!(provider.list_pods().await.unwrap().is_empty());
    assert_eq!(backend.standby().len(), 2);
}

#[tokio::test]
async fn a_pod_of_a_pooled_type_takes_a_standby_cell_and_the_pool_refills() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::default());
    let provider = provider(backend.clone(), dir.path()).await;
    *lock(&provider.inner.standby.entries) = vec![entry("local.small", 1)];
    provider.reconcile_standby_pool().await;
    let standby_id = backend.standby()[0].id.clone();

    let web = pod("uid-1", ", labels: {app: web}");
    let view = provider
        .inner
        .standby
        .take(&provider.inner.cells, &web)
        .await
        .expect("a standby cell");
    assert_eq!(view.id, standby_id);
    let cell = backend.describe(&standby_id).await.unwrap();
    let identity = cell.identity.unwrap();
    assert_eq!(identity.pod_uid, "uid-1");
    assert_eq!(identity.pod_name, "web-uid-1");
    assert_eq!(identity.pod_labels["app"], "web");
    assert_eq!(cell.name, "updraft-ns-web-uid-1");
    assert!(view.summary.price_per_hour.is_some());

    // The pool is empty until the refill: the next pod gets no standby cell.
    assert!(
        provider
            .inner
            .standby
            .take(&provider.inner.cells, &pod("uid-2", ""))
            .await
            .is_none()
    );
    provider.reconcile_standby_pool().await;
    let standby = backend.standby();
    assert_eq!(standby.len(), 1, "refilled");
    assert_ne!(standby[0].id, standby_id);

    // Pods the pool cannot serve: another type, extra security groups, spot.
    let big = {
        let yaml = "metadata: {name: big, namespace: ns, uid: uid-3}\nspec:\n  containers:\n  - name: app\n    image: busybox\n    resources: {requests: {cpu: '3', memory: 6Gi}}\n";
        ResolvedPod::unresolved(serde_yaml::from_str::<Pod>(yaml).unwrap())
    };
    assert!(
        provider
            .inner
            .standby
            .take(&provider.inner.cells, &big)
            .await
            .is_none()
    );
    let groups = pod(
        "uid-4",
        ", annotations: {pod.elotl.co/security-groups: sg-1}",
    );
    assert!(
        provider
            .inner
            .standby
            .take(&provider.inner.cells, &groups)
            .await
            .is_none()
    );
    let spot = pod("uid-5", ", annotations: {pod.elotl.co/launch-type: spot}");
    assert!(
        provider
            .inner
            .standby
            .take(&provider.inner.cells, &spot)
            .await
            .is_none()
    );
    assert_eq!(backend.standby().len(), 1, "still there");
}

/// Time is tokio's paused clock: it advances only when every task waits, so the test
/// sees the loop's decisions, not the machine's speed.
#[tokio::test(start_paused = true)]
async fn the_refill_waits_until_pods_have_been_quiet_for_the_quiet_period() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::default());
    let mut settings = settings();
    settings.refill_quiet_period = Duration::from_secs(5);
    // The pods' cells never answer (the fake has no addresses): they stay booting.
    settings.boot_timeout = Duration::from_secs(3600);
    let provider = provider_with(backend.clone(), dir.path(), settings).await;
    provider
        .start_standby_pool(vec![entry("local.small", 3)])
        .unwrap();
    until_standby(&backend, 3).await;

    // A burst of pods takes the pool; while pods keep coming, nothing is refilled.
    for i in 0..3 {
        provider
            .create_pod(&pod(&format!("uid-{i}"), ""))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            backend.standby().len(),
            2 - i,
            "no refill while pods come (pod {i})"
        );
    }
    // A pod of a type the pool does not keep is demand too.
    let big = {
        let yaml = "metadata: {name: big, namespace: ns, uid: uid-big}\nspec:\n  containers:\n  - name: app\n    image: busybox\n    resources: {requests: {cpu: '3', memory: 6Gi}}\n";
        ResolvedPod::unresolved(serde_yaml::from_str::<Pod>(yaml).unwrap())
    };
    provider.create_pod(&big).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        backend.standby().is_empty(),
        "still within the quiet period"
    );

    // Quiet for the period: the pool is refilled to its size, with new cells.
    tokio::time::sleep(Duration::from_secs(2)).await;
    until_standby(&backend, 3).await;
    let owners = backend
        .live_cells()
        .iter()
        .filter(|c| !c.identity.as_ref().unwrap().is_standby())
        .count();
    assert_eq!(
        owners, 4,
        "three pods on standby cells, one on its own cell"
    );
    provider.shutdown();
}

/// Waits (on the paused clock) until the pool has `count` idle cells.
async fn until_standby(backend: &FakeBackend, count: usize) {
    for _ in 0..600 {
        if backend.standby().len() == count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("standby cells: {:?}", backend.standby());
}

#[tokio::test]
async fn two_pods_never_take_one_standby_cell() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::default());
    let provider = provider(backend.clone(), dir.path()).await;
    *lock(&provider.inner.standby.entries) = vec![entry("local.small", 1)];
    provider.reconcile_standby_pool().await;
    let pods: Vec<ResolvedPod> = (0..8).map(|i| pod(&format!("uid-{i}"), "")).collect();
    let claims = futures::future::join_all(pods.iter().map(|p| {
        let inner = provider.inner.clone();
        async move { inner.standby.take(&inner.cells, p).await }
    }))
    .await;
    let winners: Vec<&CellView> = claims.iter().flatten().collect();
    assert_eq!(winners.len(), 1, "exactly one pod took the one cell");
    let owners: Vec<String> = backend
        .live_cells()
        .iter()
        .filter_map(|c| c.identity.clone())
        .filter(|i| !i.is_standby())
        .map(|i| i.pod_uid)
        .collect();
    assert_eq!(owners.len(), 1);
}

#[tokio::test]
async fn concurrent_claims_each_take_their_own_standby_cell() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::default());
    let provider = provider(backend.clone(), dir.path()).await;
    *lock(&provider.inner.standby.entries) = vec![entry("local.small", 4)];
    provider.reconcile_standby_pool().await;
    assert_eq!(backend.standby().len(), 4);
    let pods: Vec<ResolvedPod> = (0..4).map(|i| pod(&format!("uid-{i}"), "")).collect();
    let claims = futures::future::join_all(pods.iter().map(|p| {
        let inner = provider.inner.clone();
        async move { inner.standby.take(&inner.cells, p).await }
    }))
    .await;
    let mut taken: Vec<CellId> = claims.iter().flatten().map(|v| v.id.clone()).collect();
    taken.sort();
    taken.dedup();
    assert_eq!(taken.len(), 4, "four pods, four distinct cells: {claims:?}");
    assert!(backend.standby().is_empty());
}

#[tokio::test]
async fn surplus_and_unconfigured_standby_cells_are_terminated() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::default());
    let provider = provider(backend.clone(), dir.path()).await;
    *lock(&provider.inner.standby.entries) =
        vec![entry("local.small", 3), entry("local.medium", 1)];
    provider.reconcile_standby_pool().await;
    assert_eq!(backend.standby().len(), 4);
    let oldest_small = backend.standby()[0].id.clone();
    *lock(&provider.inner.standby.entries) = vec![entry("local.small", 1)];
    provider.reconcile_standby_pool().await;
    let left = backend.standby();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].instance_type, "local.small");
    // Ties in launch time keep the first listed: the oldest stays.
    assert_eq!(left[0].id, oldest_small);
}

#[tokio::test]
async fn after_a_restart_claims_come_from_the_listing() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::default());
    let first = provider(backend.clone(), dir.path()).await;
    *lock(&first.inner.standby.entries) = vec![entry("local.small", 2)];
    first.reconcile_standby_pool().await;
    let taken = first
        .inner
        .standby
        .take(&first.inner.cells, &pod("uid-1", ""))
        .await
        .unwrap();
    first.shutdown();
    drop(first);
    let starts_before = backend.starts();

    let second = provider(backend.clone(), dir.path()).await;
    *lock(&second.inner.standby.entries) = vec![entry("local.small", 2)];
    // The claimed cell is the pod's: adopted, listed as its pod.
    let pods = second.list_pods().await.unwrap();
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0].pod.uid, "uid-1");
    // The one idle cell left is not taken twice and the pool tops up by one.
    second.reconcile_standby_pool().await;
    assert_eq!(backend.standby().len(), 2);
    assert_eq!(backend.starts(), starts_before + 1);
    let other = second
        .inner
        .standby
        .take(&second.inner.cells, &pod("uid-2", ""))
        .await
        .unwrap();
    assert_ne!(other.id, taken.id);
}

#[tokio::test]
async fn pool_entries_are_checked_against_the_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::default());
    let provider = provider(backend.clone(), dir.path()).await;
    let err = provider
        .start_standby_pool(vec![entry("local.small", 1), entry("m5.huge", 1)])
        .unwrap_err();
    assert!(matches!(err, SetupError::Standby { .. }));
    let text = err.to_string();
    assert!(
        text.contains("standbyPool[1].instanceType") && text.contains("m5.huge"),
        "{text}"
    );
    assert!(backend.live_cells().is_empty(), "nothing started");
}
