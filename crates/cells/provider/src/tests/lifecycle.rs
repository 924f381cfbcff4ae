//! Every transition of a pod's supervisor (see `lifecycle`), against the in-memory backend and
//! agents on tokio's paused clock: the tests wait on the supervisor's stage and on what the
//! fakes saw, never on the wall clock.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::PodStatus;
use updraft_cell_api::services::ServiceRoutes;
use updraft_cells_backend::{BackendError, CellIdentity, CellState};
use updraft_provider::{PodRef, Provider, ProviderError, ResolvedPod, ServiceRouting as _};

use super::{Addresses, FakeAgent, FakeAgents, FakeBackend, api_pod, pod, selector, settings};
use crate::pki::CellsPki;
use crate::pod_status::{REASON_CELL_BOOT_TIMEOUT, REASON_CELL_LOST};
use crate::pods::{Stage, TrackedPod};
use crate::provider::CellsProvider;
use crate::settings::ProviderSettings;
use crate::standby::StandbyEntry;

/// A provider on a backend that gives every cell its own fake agent.
struct World {
    backend: Arc<FakeBackend>,
    agents: Arc<FakeAgents>,
    provider: CellsProvider,
    _pki: tempfile::TempDir,
}

fn timings() -> ProviderSettings {
    let mut settings = settings("node-a");
    settings.boot_timeout = Duration::from_secs(60);
    settings.health_timeout = Duration::from_secs(30);
    settings.retry_interval = Duration::from_secs(2);
    settings.status_wait = Duration::from_secs(30);
    settings
}

impl World {
    async fn new() -> World {
        World::with(timings(), FakeBackend::with_addresses(Addresses::PerCell)).await
    }

    async fn with(settings: ProviderSettings, backend: FakeBackend) -> World {
        let pki = tempfile::tempdir().unwrap();
        let backend = Arc::new(backend);
        let agents = Arc::new(FakeAgents::default());
        let provider = CellsProvider::with_agents(
            settings,
            backend.clone(),
            selector(),
            None,
            CellsPki::open(pki.path()).unwrap(),
            Some(agents.clone()),
        )
        .await
        .unwrap();
        World {
            backend,
            agents,
            provider,
            _pki: pki,
        }
    }

    /// The agent of cell `id` (by its address).
    fn agent(&self, id: &str) -> Arc<FakeAgent> {
        self.agents.at(self.backend.cell(id).management_ip.unwrap())
    }

    /// The agent of the `n`th cell the backend hands out.
    fn agent_of_cell(&self, n: u8) -> Arc<FakeAgent> {
        self.agents.at(IpAddr::from([10, 0, 0, n + 1]))
    }

    fn tracked(&self, uid: &str) -> Arc<TrackedPod> {
        self.provider.inner.tracked(uid).unwrap()
    }

    /// Waits until pod `uid`'s supervisor is at `stage`.
    async fn at(&self, uid: &str, stage: Stage) {
        let mut stages = self.tracked(uid).stages();
        let reached =
            tokio::time::timeout(Duration::from_secs(3600), stages.wait_for(|s| *s == stage));
        assert!(
            matches!(reached.await, Ok(Ok(_))),
            "pod {uid} never reached {stage:?} (at {:?})",
            self.tracked(uid).stage()
        );
    }

    /// The pod's cell as its record says.
    fn cell_of(&self, uid: &str) -> Option<String> {
        self.tracked(uid)
            .record()
            .cell
            .as_ref()
            .map(|c| c.id.0.clone())
    }

    fn status(&self, uid: &str) -> PodStatus {
        self.tracked(uid)
            .record()
            .status
            .clone()
            .unwrap_or_default()
    }

    /// Cell `id` ends: the cloud terminated it, its agent is gone.
    fn lose(&self, id: &str) {
        self.agent(id).down();
        self.backend.set_state(id, CellState::Terminated);
    }

    /// Creates `pod` and waits until it runs on its cell.
    async fn running(&self, pod: &ResolvedPod, cell: u8) {
        self.agent_of_cell(cell).up();
        self.provider.create_pod(pod).await.unwrap();
        let uid = PodRef::of(&pod.pod).uid;
        self.at(&uid, Stage::Watching).await;
    }
}

/// The node hands the provider a table of Service routes of `version`.
fn routes(world: &World, version: u64) {
    world.provider.routes_changed(Arc::new(ServiceRoutes {
        version,
        routes: Vec::new(),
    }));
}

fn pod_ref(uid: &str) -> PodRef {
    PodRef {
        namespace: "ns".into(),
        name: "web".into(),
        uid: uid.into(),
    }
}

fn never() -> ResolvedPod {
    let mut api = api_pod("u1", "");
    api.spec.as_mut().unwrap().restart_policy = Some("Never".into());
    ResolvedPod::unresolved(api)
}

/// The next status published with reason `CellLost`.
async fn lost_update(
    updates: &mut futures::stream::BoxStream<'static, updraft_provider::PodStatusUpdate>,
) -> PodStatus {
    while let Some(update) = updates.next().await {
        if update.status.reason.as_deref() == Some(REASON_CELL_LOST) {
            return update.status;
        }
    }
    panic!("the status stream ended");
}

/// Waits (bounded) until `condition` holds, on the paused clock.
async fn until(what: &str, condition: impl Fn() -> bool) {
    super::until(what, condition).await;
}

#[tokio::test(start_paused = true)]
async fn a_created_pod_gets_a_cell_whose_agent_takes_it_and_reports_its_status() {
    let world = World::new().await;
    // Unstarted → Starting → Booting: the create returns once the cell is started.
    world.provider.create_pod(&pod("u1", "")).await.unwrap();
    assert_eq!(world.tracked("u1").stage(), Stage::Booting);
    assert_eq!(world.backend.tokens(), vec!["u1-0"]);
    assert_eq!(world.cell_of("u1").as_deref(), Some("cell-0"));
    let starting = world.status("u1");
    assert_eq!(starting.phase.as_deref(), Some("Pending"));
    // Not running for the node until an agent runs it.
    assert_eq!(
        world.provider.pod_status(&pod_ref("u1")).await.unwrap(),
        None
    );
    // Booting → Delivering → Watching once the agent answers.
    world.agent("cell-0").up();
    world.at("u1", Stage::Watching).await;
    assert_eq!(world.agent("cell-0").applied(), 1);
    world.agent("cell-0").report("Running");
    until("the agent's status", || {
        world.status("u1").phase.as_deref() == Some("Running")
    })
    .await;
    let status = world
        .provider
        .pod_status(&pod_ref("u1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.host_ip.as_deref(), Some("10.0.0.1"));
    assert_eq!(world.backend.starts(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_status_is_published_only_when_it_changes() {
    let world = World::new().await;
    world.running(&pod("u1", ""), 0).await;
    let shared = &world.provider.inner;
    let tracked = world.tracked("u1");
    let mut updates = world.provider.status_updates().unwrap();
    let status = |phase: &str| PodStatus {
        phase: Some(phase.into()),
        ..PodStatus::default()
    };
    shared.set_status(&tracked, status("Running"));
    shared.set_status(&tracked, status("Running"));
    shared.set_status(&tracked, status("Succeeded"));
    let first = updates.next().await.unwrap();
    let second = updates.next().await.unwrap();
    assert_eq!(first.status.phase.as_deref(), Some("Running"));
    assert_eq!(second.status.phase.as_deref(), Some("Succeeded"));
}

#[tokio::test(start_paused = true)]
async fn a_transient_start_error_goes_to_the_create_and_its_retry_is_a_new_attempt() {
    let world = World::new().await;
    world
        .backend
        .start_errors
        .lock()
        .unwrap()
        .push_back(BackendError::Transient {
            detail: "throttled".into(),
        });
    let err = world.provider.create_pod(&pod("u1", "")).await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    // Starting → Unstarted: the node retries.
    assert_eq!(world.tracked("u1").stage(), Stage::Unstarted);
    world.provider.create_pod(&pod("u1", "")).await.unwrap();
    assert_eq!(world.backend.tokens(), vec!["u1-1"]);
}

#[tokio::test(start_paused = true)]
async fn a_permanent_refusal_of_the_start_forgets_the_pod() {
    let world = World::new().await;
    world
        .backend
        .start_errors
        .lock()
        .unwrap()
        .push_back(BackendError::InvalidRequest {
            detail: "no such image".into(),
        });
    let err = world.provider.create_pod(&pod("u1", "")).await.unwrap_err();
    assert!(matches!(err, ProviderError::Permanent { .. }), "{err:?}");
    assert!(world.provider.inner.tracked("u1").is_none());
    assert!(world.provider.list_pods().await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_boot_timeout_terminates_the_cell_and_a_new_attempt_starts_after_a_backoff() {
    let world = World::new().await;
    world.provider.create_pod(&pod("u1", "")).await.unwrap();
    // The first cell's agent never answers: Booting → BootFailed → Backoff.
    world.at("u1", Stage::Backoff).await;
    assert!(world.backend.was_terminated("cell-0"));
    let status = world.status("u1");
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    assert_eq!(status.reason.as_deref(), Some(REASON_CELL_BOOT_TIMEOUT));
    assert!(
        status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("starting a new cell")),
        "{status:?}"
    );
    // Backoff → Starting → Booting on a new cell (a new attempt), whose agent answers.
    world.agent_of_cell(1).up();
    world.at("u1", Stage::Watching).await;
    assert_eq!(world.backend.tokens(), vec!["u1-0", "u1-1"]);
    assert_eq!(world.cell_of("u1").as_deref(), Some("cell-1"));
}

#[tokio::test(start_paused = true)]
async fn a_delete_during_the_boot_stops_the_wait_at_once() {
    let mut settings = timings();
    settings.boot_timeout = Duration::from_secs(3600);
    let world = World::with(settings, FakeBackend::with_addresses(Addresses::PerCell)).await;
    world.provider.create_pod(&pod("u1", "")).await.unwrap();
    until("pings", || {
        world.agent("cell-0").pings.load(Ordering::SeqCst) > 2
    })
    .await;
    let tracked = world.tracked("u1");
    // Bounded well below the hour-long boot timeout: the delete does not wait for it.
    tokio::time::timeout(
        Duration::from_secs(60),
        world.provider.delete_pod(&pod_ref("u1"), 30),
    )
    .await
    .expect("the delete ends the boot")
    .unwrap();
    assert_eq!(tracked.stage(), Stage::Stopped);
    assert!(world.backend.live().is_empty());
    assert_eq!(world.backend.starts(), 1);
    assert!(world.provider.inner.tracked("u1").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_delete_while_watching_stops_the_pod_on_its_agent_and_terminates_the_cell() {
    let world = World::new().await;
    world.running(&pod("u1", ""), 0).await;
    world.provider.delete_pod(&pod_ref("u1"), 5).await.unwrap();
    assert_eq!(world.agent("cell-0").deletes.load(Ordering::SeqCst), 1);
    assert!(world.backend.live().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_cell_the_backend_ends_while_watching_is_replaced() {
    let world = World::new().await;
    world.running(&pod("u1", ""), 0).await;
    let mut updates = world.provider.status_updates().unwrap();
    world.agent_of_cell(1).up();
    // Watching → Lost → Starting → Booting → Delivering → Watching on a replacement.
    world.lose("cell-0");
    until("the replacement", || {
        world.cell_of("u1").as_deref() == Some("cell-1")
    })
    .await;
    world.at("u1", Stage::Watching).await;
    assert_eq!(world.backend.tokens(), vec!["u1-0", "u1-1"]);
    assert_eq!(world.agent_of_cell(1).applied(), 1);
    // What the pod said meanwhile (the replacement's statuses follow).
    let lost = lost_update(&mut updates).await;
    assert_eq!(lost.phase.as_deref(), Some("Pending"));
    let message = lost.message.unwrap_or_default();
    assert!(
        message.contains("the backend reports it") && message.contains("replacement"),
        "{message}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_agent_is_lost_after_the_health_timeout() {
    let world = World::new().await;
    world.running(&pod("u1", ""), 0).await;
    world.agent("cell-0").down();
    // The cell stays Running in the backend: only the silence makes it lost.
    let mut updates = world.provider.status_updates().unwrap();
    until("the replacement start", || world.backend.starts() == 2).await;
    assert!(world.backend.was_terminated("cell-0"));
    let message = lost_update(&mut updates).await.message.unwrap_or_default();
    assert!(
        message.contains("its agent did not answer for"),
        "{message}"
    );
}

#[tokio::test(start_paused = true)]
async fn restart_policy_never_fails_the_pod_when_its_cell_is_lost() {
    let world = World::new().await;
    world.running(&never(), 0).await;
    world.lose("cell-0");
    // Watching → Lost → Failed: no replacement.
    world.at("u1", Stage::Failed).await;
    let status = world.status("u1");
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    assert!(
        status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("restartPolicy Never")),
        "{status:?}"
    );
    assert_eq!(world.backend.starts(), 1);
    assert_eq!(world.cell_of("u1"), None);
}

#[tokio::test(start_paused = true)]
async fn a_cell_lost_during_the_delivery_is_replaced_by_a_new_attempt() {
    let world = World::new().await;
    let first = world.agent_of_cell(0);
    first.up();
    first.refuse_applies.store(usize::MAX, Ordering::SeqCst);
    world.agent_of_cell(1).up();
    world.provider.create_pod(&never()).await.unwrap();
    // Delivering → Backoff → Booting → Delivering while the agent refuses the pod.
    until("two refused deliveries", || {
        first.apply_calls.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert_eq!(
        world.backend.starts(),
        1,
        "a refusal is retried on the same cell"
    );
    // The cell ends meanwhile: the next refusal finds it gone → BootFailed → a new attempt
    // (also with restartPolicy Never: the pod never ran on it).
    world.backend.set_state("cell-0", CellState::Terminated);
    until("the new cell", || {
        world.cell_of("u1").as_deref() == Some("cell-1")
    })
    .await;
    world.at("u1", Stage::Watching).await;
    assert_eq!(world.agent_of_cell(1).applied(), 1);
    assert_eq!(world.backend.tokens(), vec!["u1-0", "u1-1"]);
}

#[tokio::test(start_paused = true)]
async fn an_adopted_booting_cell_whose_agent_answers_later_gets_the_pod() {
    // A run was killed while the pod's cell booted: the restarted one adopts it.
    let backend = FakeBackend::with_addresses(Addresses::PerCell);
    backend.add("half", "ctl", "node-a", "u1", Duration::from_secs(5));
    let world = World::with(timings(), backend).await;
    assert_eq!(world.tracked("u1").stage(), Stage::Booting);
    let mut api = api_pod("u1", "");
    api.metadata.name = Some("pod-u1".into());
    world
        .provider
        .create_pod(&ResolvedPod::unresolved(api))
        .await
        .unwrap();
    until("pings", || {
        world.agent("half").pings.load(Ordering::SeqCst) > 3
    })
    .await;
    // Booting → Delivering → Watching on that very cell.
    world.agent("half").up();
    world.at("u1", Stage::Watching).await;
    assert_eq!(world.agent("half").applied(), 1);
    assert_eq!(world.backend.starts(), 0, "never a second cell");
}

#[tokio::test(start_paused = true)]
async fn an_adopted_booting_cell_whose_agent_never_answers_is_replaced_after_its_deadline() {
    let backend = FakeBackend::with_addresses(Addresses::PerCell);
    backend.add("half", "ctl", "node-a", "u1", Duration::from_secs(50));
    let world = World::with(timings(), backend).await;
    let mut api = api_pod("u1", "");
    api.metadata.name = Some("pod-u1".into());
    world
        .provider
        .create_pod(&ResolvedPod::unresolved(api))
        .await
        .unwrap();
    // The deadline counts from the launch, floored at healthTimeout of silence; then
    // BootFailed → Backoff → Starting a new attempt.
    world.agent_of_cell(1).up();
    until("the new cell", || {
        world.cell_of("u1").as_deref() == Some("cell-1")
    })
    .await;
    assert!(world.backend.was_terminated("half"));
    assert_eq!(world.backend.tokens(), vec!["u1-1"]);
    world.at("u1", Stage::Watching).await;
}

#[tokio::test(start_paused = true)]
async fn an_adopted_cell_no_pod_asks_for_fails_its_pod_when_it_never_answers() {
    let backend = FakeBackend::with_addresses(Addresses::PerCell);
    backend.add("half", "ctl", "node-a", "u1", Duration::from_secs(600));
    let world = World::with(timings(), backend).await;
    // Booting → BootFailed → (not asked for: nothing to start it with) Lost → Failed.
    world.at("u1", Stage::Failed).await;
    let status = world.status("u1");
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    assert_eq!(status.reason.as_deref(), Some(REASON_CELL_BOOT_TIMEOUT));
    assert!(world.backend.was_terminated("half"));
    assert_eq!(world.backend.starts(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_adopted_running_pod_is_watched_and_fails_when_lost_before_the_node_asks() {
    let backend = FakeBackend::with_addresses(Addresses::PerCell);
    backend.add("old", "ctl", "node-a", "u1", Duration::from_secs(600));
    let world = World::with(timings(), backend).await;
    let agent = world.agent("old");
    agent.runs("u1", "Running");
    agent.up();
    // Booting → Watching (not delivered: its inputs are unknown here).
    world.at("u1", Stage::Watching).await;
    until("the adopted status", || {
        world.status("u1").phase.as_deref() == Some("Running")
    })
    .await;
    assert!(
        world
            .provider
            .pod_status(&pod_ref("u1"))
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(agent.applied(), 0);
    // Watching → Lost → Failed.
    world.lose("old");
    world.at("u1", Stage::Failed).await;
    let message = world.status("u1").message.unwrap_or_default();
    assert!(message.contains("adopted after a restart"), "{message}");
    assert_eq!(world.backend.starts(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_adopted_stopped_cell_is_lost_after_the_health_timeout() {
    let mut settings = timings();
    settings.boot_timeout = Duration::from_secs(3600);
    let backend = FakeBackend::with_addresses(Addresses::PerCell);
    backend.add("stopped", "ctl", "node-a", "u1", Duration::from_secs(5));
    backend.set_state("stopped", CellState::Stopped);
    let world = World::with(settings, backend).await;
    // A stopped cell is not booting: lost once silent for healthTimeout, long before its
    // boot deadline.
    world.at("u1", Stage::Failed).await;
    assert!(world.backend.was_terminated("stopped"));
}

#[tokio::test(start_paused = true)]
async fn a_cell_without_an_address_gets_one_and_boots() {
    let world = World::with(timings(), FakeBackend::with_addresses(Addresses::None)).await;
    world.provider.create_pod(&pod("u1", "")).await.unwrap();
    let address: IpAddr = "10.9.9.9".parse().unwrap();
    world.agents.at(address).up();
    until("a describe", || {
        world.backend.describes.load(Ordering::SeqCst) > 2
    })
    .await;
    world.backend.set_address("cell-0", address);
    world.at("u1", Stage::Watching).await;
    assert_eq!(world.agents.at(address).applied(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_pod_of_a_pooled_type_claims_a_standby_cell() {
    let world = World::new().await;
    // The pod asks for 1.5 CPU / 1 GiB: local.medium.
    *updraft_common::sync::lock(&world.provider.inner.standby.entries) = vec![StandbyEntry {
        instance_type: "local.medium".into(),
        launch_type: updraft_cells_backend::LaunchType::OnDemand,
        count: 1,
    }];
    world.provider.reconcile_standby_pool().await;
    let standby = world.backend.cell("cell-0");
    assert!(
        standby
            .identity
            .as_ref()
            .is_some_and(CellIdentity::is_standby)
    );
    world.agent("cell-0").up();
    world.provider.create_pod(&pod("u1", "")).await.unwrap();
    assert_eq!(world.cell_of("u1").as_deref(), Some("cell-0"));
    world.at("u1", Stage::Watching).await;
    assert_eq!(
        world.backend.starts(),
        1,
        "only the standby cell was started"
    );
    assert_eq!(world.backend.cell("cell-0").identity.unwrap().pod_uid, "u1");
}

#[tokio::test(start_paused = true)]
async fn a_transient_error_of_a_replacement_start_is_retried_with_backoff() {
    let world = World::new().await;
    world.running(&pod("u1", ""), 0).await;
    for _ in 0..2 {
        world
            .backend
            .start_errors
            .lock()
            .unwrap()
            .push_back(BackendError::Capacity {
                detail: "none left".into(),
            });
    }
    world.agent_of_cell(1).up();
    world.lose("cell-0");
    // Lost → Starting → Backoff → Starting → Backoff → Starting → Booting.
    world.at("u1", Stage::Backoff).await;
    world.at("u1", Stage::Watching).await;
    assert_eq!(world.cell_of("u1").as_deref(), Some("cell-1"));
    assert_eq!(world.backend.tokens(), vec!["u1-0", "u1-3"]);
}

#[tokio::test(start_paused = true)]
async fn a_permanent_refusal_of_a_replacement_fails_the_pod() {
    let world = World::new().await;
    world.running(&pod("u1", ""), 0).await;
    world
        .backend
        .start_errors
        .lock()
        .unwrap()
        .push_back(BackendError::InvalidRequest {
            detail: "the image is gone".into(),
        });
    world.lose("cell-0");
    world.at("u1", Stage::Failed).await;
    let status = world.status("u1");
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    assert!(
        status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("no replacement cell")),
        "{status:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pod_finished_for_the_retention_is_retired_through_its_supervisor() {
    let world = World::new().await;
    world.running(&pod("u1", ""), 0).await;
    world.agent("cell-0").report("Succeeded");
    until("the final status", || {
        world.status("u1").phase.as_deref() == Some("Succeeded")
    })
    .await;
    world.provider.collect_garbage().await;
    assert_eq!(
        world.cell_of("u1").as_deref(),
        Some("cell-0"),
        "kept for the retention"
    );
    tokio::time::sleep(Duration::from_secs(301)).await;
    world.provider.collect_garbage().await;
    // Watching → Retired.
    world.at("u1", Stage::Retired).await;
    assert!(world.backend.was_terminated("cell-0"));
    assert_eq!(world.cell_of("u1"), None);
    assert_eq!(world.backend.starts(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_update_goes_to_the_agent_while_watching_and_with_the_delivery_while_booting() {
    let world = World::new().await;
    world.provider.create_pod(&pod("u1", "")).await.unwrap();
    // Booting: recorded, delivered with the pod.
    let labelled = pod("u1", ", labels: {v: '2'}");
    world.provider.update_pod(&labelled).await.unwrap();
    world.agent("cell-0").up();
    world.at("u1", Stage::Watching).await;
    let label = |n: usize| {
        world.agent("cell-0").applies.lock().unwrap()[n]
            .pod
            .metadata
            .labels
            .clone()
            .unwrap_or_default()
            .get("v")
            .cloned()
    };
    assert_eq!(label(0).as_deref(), Some("2"));
    // Watching: the agent gets it now.
    world
        .provider
        .update_pod(&pod("u1", ", labels: {v: '3'}"))
        .await
        .unwrap();
    assert_eq!(world.agent("cell-0").applied(), 2);
    assert_eq!(label(1).as_deref(), Some("3"));
    // A pod this provider does not know.
    let err = world.provider.update_pod(&pod("u9", "")).await.unwrap_err();
    assert!(matches!(err, ProviderError::NotFound { .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_every_supervisor_and_leaves_the_cells() {
    let world = World::new().await;
    world.running(&pod("u1", ""), 0).await;
    world.provider.create_pod(&pod("u2", "")).await.unwrap();
    world.provider.shutdown();
    world.at("u1", Stage::Stopped).await;
    world.at("u2", Stage::Stopped).await;
    assert_eq!(world.backend.live(), vec!["cell-0", "cell-1"]);
}

#[tokio::test(start_paused = true)]
async fn the_routes_reach_a_new_cell_before_its_pod_and_every_new_table_reaches_it_at_once() {
    let world = World::new().await;
    routes(&world, 5);
    world.running(&pod("u1", ""), 0).await;
    let agent = world.agent("cell-0");
    // Delivering: the table before the pod, so its containers start with the routes.
    assert_eq!(agent.routes.lock().unwrap().first().copied(), Some((5, 0)));
    // Watching: a new table interrupts the status long-poll (30 s) and goes out at once.
    let before = tokio::time::Instant::now();
    routes(&world, 6);
    until("table 6", || agent.routes_taken().last() == Some(&6)).await;
    assert!(before.elapsed() < Duration::from_secs(1));
    // The agent has it: nothing is sent again while the versions agree.
    let sent = agent.routes_taken().len();
    agent.report("Running");
    until("the status", || {
        world.status("u1").phase.as_deref() == Some("Running")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(agent.routes_taken().len(), sent);
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_missed_tables_or_forgot_them_gets_the_latest_when_it_answers() {
    let world = World::new().await;
    world.running(&pod("u1", ""), 0).await;
    let agent = world.agent("cell-0");
    // Down while three tables come (shorter than the health timeout): it gets only the last.
    agent.down();
    for version in [7, 8, 9] {
        routes(&world, version);
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    agent.up();
    until("table 9", || agent.routes_taken() == vec![9]).await;
    // Restarted (the status says it applied none): the table goes again.
    agent.forget_routes();
    until("table 9 again", || agent.routes_taken() == vec![9, 9]).await;
    assert_eq!(world.tracked("u1").stage(), Stage::Watching);
}
