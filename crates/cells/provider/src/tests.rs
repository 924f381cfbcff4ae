//! Unit tests of selection, restart recovery, deletion and garbage collection against an
//! in-memory backend (no agent answers: cells never get past booting here; the integration
//! test runs real agents on local cells).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use updraft_cells_backend::{
    BackendError, Cell, CellBackend, CellId, CellIdentity, CellSpec, CellState, LaunchType,
    StartedCell,
};
use updraft_cells_catalog::{Catalog, SelectionPolicy, Selector};
use updraft_provider::{PodRef, Provider, ProviderError, ResolvedPod};

use crate::config::AgentSettings;
use crate::pki::CellsPki;
use crate::provider::{CellsProvider, ProviderSettings};

/// Cells in memory; `address` is given to every started cell (none: they stay without one).
#[derive(Default)]
struct FakeBackend {
    cells: Mutex<Vec<Cell>>,
    started: Mutex<Vec<CellSpec>>,
    terminated: Mutex<Vec<CellId>>,
    address: Option<IpAddr>,
    /// How many `describe` calls were answered (the watchers' and boots' checks).
    describes: std::sync::atomic::AtomicUsize,
}

impl FakeBackend {
    fn add(&self, id: &str, controller: &str, node: &str, uid: &str, age: Duration) {
        self.cells.lock().unwrap().push(Cell {
            id: CellId(id.into()),
            name: id.into(),
            state: CellState::Running,
            instance_type: "local.small".into(),
            launch_type: LaunchType::OnDemand,
            management_ip: self.address,
            pod_ip: None,
            public_ip: None,
            launch_time: Some(SystemTime::now() - age),
            identity: Some(CellIdentity {
                controller_id: controller.into(),
                node: node.into(),
                namespace: "ns".into(),
                pod_name: format!("pod-{uid}"),
                pod_uid: uid.into(),
                pod_labels: BTreeMap::new(),
            }),
            tags: BTreeMap::new(),
        });
    }

    fn live(&self) -> Vec<String> {
        self.cells
            .lock()
            .unwrap()
            .iter()
            .filter(|c| !c.state.is_ending())
            .map(|c| c.id.0.clone())
            .collect()
    }
}

#[async_trait::async_trait]
impl CellBackend for FakeBackend {
    fn kind(&self) -> &'static str {
        "fake"
    }

    async fn start(&self, spec: &CellSpec) -> Result<StartedCell, BackendError> {
        let mut started = self.started.lock().unwrap();
        // Idempotency: the same token names the same cell.
        if let Some(index) = started
            .iter()
            .position(|s| s.idempotency_token == spec.idempotency_token)
        {
            return Ok(StartedCell {
                id: CellId(format!("cell-{index}")),
                launch_type: spec.launch_type,
            });
        }
        let id = CellId(format!("cell-{}", started.len()));
        started.push(spec.clone());
        self.cells.lock().unwrap().push(Cell {
            id: id.clone(),
            name: spec.name.clone(),
            state: CellState::Running,
            instance_type: spec.instance_type.clone(),
            launch_type: spec.launch_type,
            management_ip: self.address,
            pod_ip: None,
            public_ip: None,
            launch_time: Some(SystemTime::now()),
            identity: Some(spec.identity.clone()),
            tags: BTreeMap::new(),
        });
        Ok(StartedCell {
            id,
            launch_type: spec.launch_type,
        })
    }

    async fn describe(&self, id: &CellId) -> Result<Cell, BackendError> {
        self.describes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.cells
            .lock()
            .unwrap()
            .iter()
            .find(|c| &c.id == id)
            .cloned()
            .ok_or(BackendError::NotFound { id: id.0.clone() })
    }

    async fn list(&self, controller_id: &str) -> Result<Vec<Cell>, BackendError> {
        Ok(self
            .cells
            .lock()
            .unwrap()
            .iter()
            .filter(|c| {
                !c.state.is_ending()
                    && c.identity
                        .as_ref()
                        .is_some_and(|i| i.controller_id == controller_id)
            })
            .cloned()
            .collect())
    }

    async fn terminate(&self, id: &CellId) -> Result<(), BackendError> {
        let mut cells = self.cells.lock().unwrap();
        let cell = cells
            .iter_mut()
            .find(|c| &c.id == id)
            .ok_or(BackendError::NotFound { id: id.0.clone() })?;
        cell.state = CellState::Terminated;
        self.terminated.lock().unwrap().push(id.clone());
        Ok(())
    }
}

fn settings(node: &str) -> ProviderSettings {
    ProviderSettings {
        node_name: node.into(),
        controller_id: "ctl".into(),
        name_tag: "updraft".into(),
        boot_timeout: Duration::from_millis(300),
        health_timeout: Duration::from_secs(60),
        // Adopted cells are listed at once (most tests have no node to claim them).
        gc_grace_period: Duration::ZERO,
        gc_interval: Duration::from_secs(3600),
        finished_pod_retention: Duration::from_secs(300),
        agent: AgentSettings::default(),
        extra_security_groups: vec!["sg-extra".into()],
        pod_network: None,
        default_launch_type: LaunchType::OnDemand,
        user_data_limit: 1 << 20,
        status_wait: Duration::from_secs(1),
        retry_interval: Duration::from_millis(50),
        pod_wiring: crate::backends::PodWiring::none(),
        agent_listen_flag: true,
        refill_quiet_period: crate::provider::REFILL_QUIET_PERIOD,
    }
}

async fn provider(backend: Arc<FakeBackend>, pki_dir: &std::path::Path) -> CellsProvider {
    provider_with(backend, pki_dir, settings("node-a")).await
}

async fn provider_with(
    backend: Arc<FakeBackend>,
    pki_dir: &std::path::Path,
    settings: ProviderSettings,
) -> CellsProvider {
    let selector = Selector::new(
        Catalog::local().unwrap(),
        SelectionPolicy::new("local.small"),
    )
    .unwrap();
    CellsProvider::with_parts(
        settings,
        backend,
        selector,
        None,
        CellsPki::open(pki_dir).unwrap(),
    )
    .await
    .unwrap()
}

fn pod(uid: &str, yaml_extra: &str) -> ResolvedPod {
    ResolvedPod::unresolved(api_pod(uid, yaml_extra))
}

fn api_pod(uid: &str, yaml_extra: &str) -> Pod {
    let yaml = format!(
        "metadata: {{name: web, namespace: ns, uid: {uid}{yaml_extra}}}\nspec:\n  containers:\n  - name: app\n    image: busybox\n    resources: {{requests: {{cpu: 1500m, memory: 1Gi}}}}\n"
    );
    serde_yaml::from_str::<Pod>(&yaml).unwrap()
}

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
    let backend = Arc::new(FakeBackend {
        // Nothing listens there: the agent never answers.
        address: Some("127.0.0.1".parse().unwrap()),
        ..FakeBackend::default()
    });
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
fn silent_address() -> Option<IpAddr> {
    Some("127.0.0.1".parse().unwrap())
}

/// Waits until `condition` holds (bounded, for a hang only).
async fn until(what: &str, condition: impl Fn() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(120), async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "gave up waiting for {what}");
}

#[tokio::test]
async fn a_cell_adopted_while_booting_keeps_its_boot_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend {
        address: silent_address(),
        ..FakeBackend::default()
    });
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
    let backend = Arc::new(FakeBackend {
        address: silent_address(),
        ..FakeBackend::default()
    });
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
    let backend = Arc::new(FakeBackend {
        address: silent_address(),
        ..FakeBackend::default()
    });
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
