//! Unit tests against in-memory fakes: a backend ([`FakeBackend`]) and agents
//! ([`FakeAgents`]). `provider`: selection, restart recovery, deletion and garbage collection
//! through the `Provider` API (with the real agent client against silent addresses);
//! `lifecycle`: every transition of a pod's supervisor on tokio's paused clock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod lifecycle;
mod provider;
mod standby;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use tokio::sync::watch;
use updraft_cell_api::{ApplyPodRequest, ClientError, PodStatusResponse};
use updraft_cells_backend::{
    BackendError, Cell, CellBackend, CellId, CellIdentity, CellSpec, CellState, LaunchType,
    StartedCell,
};
use updraft_cells_catalog::{Catalog, SelectionPolicy, Selector};
use updraft_provider::ResolvedPod;

use crate::agent::{AgentConnector, CellAgent};
use crate::config::AgentSettings;
use crate::pki::CellsPki;
use crate::pod_interface::PodInterfaceSource;
use crate::provider::CellsProvider;
use crate::settings::ProviderSettings;

/// How a fake backend addresses its cells.
#[derive(Default, Clone, Copy)]
enum Addresses {
    /// No address: the cells stay without one.
    #[default]
    None,
    /// Every cell at this address.
    Shared(IpAddr),
    /// Cell `n` at `10.0.0.<n+1>`: each its own agent.
    PerCell,
}

/// Cells in memory.
#[derive(Default)]
struct FakeBackend {
    cells: Mutex<Vec<Cell>>,
    started: Mutex<Vec<CellSpec>>,
    /// The cell each of `started` made.
    started_ids: Mutex<Vec<CellId>>,
    terminated: Mutex<Vec<CellId>>,
    addresses: Addresses,
    /// How many `describe` calls were answered (the supervisors' checks).
    describes: AtomicUsize,
    /// Listings leave out the cells of starts from this one on (a lagging listing).
    hide_started_from: Mutex<Option<usize>>,
    /// The answers of the next starts, before they start anything.
    start_errors: Mutex<VecDeque<BackendError>>,
}

impl FakeBackend {
    fn with_addresses(addresses: Addresses) -> FakeBackend {
        FakeBackend {
            addresses,
            ..FakeBackend::default()
        }
    }

    fn address(&self, index: usize) -> Option<IpAddr> {
        match self.addresses {
            Addresses::None => None,
            Addresses::Shared(ip) => Some(ip),
            Addresses::PerCell => Some(IpAddr::from([10, 0, 0, u8::try_from(index + 1).unwrap()])),
        }
    }

    fn add(&self, id: &str, controller: &str, node: &str, uid: &str, age: Duration) {
        self.add_cell(id, Some(identity(controller, node, uid)), age);
    }

    fn add_cell(&self, id: &str, identity: Option<CellIdentity>, age: Duration) {
        let mut cells = self.cells.lock().unwrap();
        let management_ip = self.address(cells.len());
        cells.push(Cell {
            id: CellId(id.into()),
            name: id.into(),
            state: CellState::Running,
            instance_type: "local.small".into(),
            launch_type: LaunchType::OnDemand,
            management_ip,
            pod_ip: None,
            public_ip: None,
            launch_time: Some(SystemTime::now() - age),
            identity,
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

    fn live_cells(&self) -> Vec<Cell> {
        let cells = self.cells.lock().unwrap();
        cells
            .iter()
            .filter(|c| !c.state.is_ending())
            .cloned()
            .collect()
    }

    /// The idle standby cells.
    fn standby(&self) -> Vec<Cell> {
        self.live_cells()
            .into_iter()
            .filter(|c| c.identity.as_ref().is_some_and(CellIdentity::is_standby))
            .collect()
    }

    fn cell(&self, id: &str) -> Cell {
        self.cells
            .lock()
            .unwrap()
            .iter()
            .find(|c| c.id.0 == id)
            .cloned()
            .unwrap()
    }

    /// Sets the state of cell `id` (as the cloud would).
    fn set_state(&self, id: &str, state: CellState) {
        let mut cells = self.cells.lock().unwrap();
        cells.iter_mut().find(|c| c.id.0 == id).unwrap().state = state;
    }

    /// Gives cell `id` an address.
    fn set_address(&self, id: &str, ip: IpAddr) {
        let mut cells = self.cells.lock().unwrap();
        cells
            .iter_mut()
            .find(|c| c.id.0 == id)
            .unwrap()
            .management_ip = Some(ip);
    }

    fn starts(&self) -> usize {
        self.started.lock().unwrap().len()
    }

    fn tokens(&self) -> Vec<String> {
        self.started
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.idempotency_token.clone())
            .collect()
    }

    fn was_terminated(&self, id: &str) -> bool {
        self.terminated.lock().unwrap().contains(&CellId(id.into()))
    }
}

fn identity(controller: &str, node: &str, uid: &str) -> CellIdentity {
    CellIdentity {
        controller_id: controller.into(),
        node: node.into(),
        namespace: "ns".into(),
        pod_name: format!("pod-{uid}"),
        pod_uid: uid.into(),
        pod_labels: BTreeMap::new(),
    }
}

#[async_trait::async_trait]
impl CellBackend for FakeBackend {
    fn kind(&self) -> &'static str {
        "fake"
    }

    async fn start(&self, spec: &CellSpec) -> Result<StartedCell, BackendError> {
        if let Some(error) = self.start_errors.lock().unwrap().pop_front() {
            return Err(error);
        }
        let mut started = self.started.lock().unwrap();
        // Idempotency: the same token names the same cell.
        if let Some(index) = started
            .iter()
            .position(|s| s.idempotency_token == spec.idempotency_token)
        {
            return Ok(StartedCell {
                id: self.started_ids.lock().unwrap()[index].clone(),
                launch_type: spec.launch_type,
            });
        }
        started.push(spec.clone());
        let mut cells = self.cells.lock().unwrap();
        // Named and addressed by its place among all cells (added ones too).
        let id = CellId(format!("cell-{}", cells.len()));
        self.started_ids.lock().unwrap().push(id.clone());
        let management_ip = self.address(cells.len());
        cells.push(Cell {
            id: id.clone(),
            name: spec.name.clone(),
            state: CellState::Running,
            instance_type: spec.instance_type.clone(),
            launch_type: spec.launch_type,
            management_ip,
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
        self.describes.fetch_add(1, Ordering::SeqCst);
        self.cells
            .lock()
            .unwrap()
            .iter()
            .find(|c| &c.id == id)
            .cloned()
            .ok_or(BackendError::NotFound { id: id.0.clone() })
    }

    async fn list(&self, controller_id: &str) -> Result<Vec<Cell>, BackendError> {
        let hidden: Vec<CellId> = match *self.hide_started_from.lock().unwrap() {
            Some(from) => self
                .started_ids
                .lock()
                .unwrap()
                .iter()
                .skip(from)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        Ok(self
            .live_cells()
            .into_iter()
            .filter(|c| {
                !hidden.contains(&c.id)
                    && c.identity
                        .as_ref()
                        .is_some_and(|i| i.controller_id == controller_id)
            })
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

    async fn assign(
        &self,
        id: &CellId,
        name: &str,
        identity: &CellIdentity,
    ) -> Result<(), BackendError> {
        // Yield between check and write: concurrent claims interleave here if the provider
        // does not serialize them.
        tokio::task::yield_now().await;
        let mut cells = self.cells.lock().unwrap();
        let cell = cells
            .iter_mut()
            .find(|c| &c.id == id && !c.state.is_ending())
            .ok_or(BackendError::NotFound { id: id.0.clone() })?;
        if !cell.identity.as_ref().is_some_and(CellIdentity::is_standby) {
            return Err(BackendError::InvalidRequest {
                detail: format!("{id} is not standby"),
            });
        }
        cell.identity = Some(identity.clone());
        cell.name = name.to_owned();
        Ok(())
    }
}

/// What a fake agent's pod is.
#[derive(Clone, Default)]
struct AgentPod {
    version: u64,
    uid: Option<String>,
    status: PodStatus,
}

/// One in-memory agent: down (every call refused) until [`FakeAgent::up`].
#[derive(Default)]
struct FakeAgent {
    up: std::sync::atomic::AtomicBool,
    /// Refuse this many applies (a transient error each).
    refuse_applies: AtomicUsize,
    pod: Mutex<Option<watch::Sender<AgentPod>>>,
    pings: AtomicUsize,
    /// Every apply call, taken or refused.
    apply_calls: AtomicUsize,
    applies: Mutex<Vec<ApplyPodRequest>>,
    deletes: AtomicUsize,
}

impl FakeAgent {
    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
    }

    fn pod(&self) -> watch::Sender<AgentPod> {
        self.pod
            .lock()
            .unwrap()
            .get_or_insert_with(|| watch::Sender::new(AgentPod::default()))
            .clone()
    }

    /// The agent's pod reports `phase` (a new status version).
    fn report(&self, phase: &str) {
        self.pod().send_modify(|pod| {
            pod.version += 1;
            pod.status.phase = Some(phase.into());
        });
    }

    /// The agent runs pod `uid` already (a cell from an earlier run).
    fn runs(&self, uid: &str, phase: &str) {
        self.pod().send_modify(|pod| {
            pod.version += 1;
            pod.uid = Some(uid.into());
            pod.status.phase = Some(phase.into());
        });
    }

    fn applied(&self) -> usize {
        self.applies.lock().unwrap().len()
    }

    fn refused(&self, address: SocketAddr) -> Result<(), ClientError> {
        if self.up.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(ClientError::Connect {
                addr: address,
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            })
        }
    }
}

/// The fake agents by address.
#[derive(Default)]
struct FakeAgents {
    agents: Mutex<HashMap<SocketAddr, Arc<FakeAgent>>>,
}

impl FakeAgents {
    /// The agent at `ip` (the default agent port).
    fn at(&self, ip: IpAddr) -> Arc<FakeAgent> {
        let address = SocketAddr::new(ip, AgentSettings::default().port);
        self.agents
            .lock()
            .unwrap()
            .entry(address)
            .or_default()
            .clone()
    }
}

struct FakeAgentAt {
    address: SocketAddr,
    agent: Arc<FakeAgent>,
}

impl AgentConnector for FakeAgents {
    fn agent(&self, address: SocketAddr) -> Arc<dyn CellAgent> {
        Arc::new(FakeAgentAt {
            address,
            agent: self.at(address.ip()),
        })
    }
}

#[async_trait::async_trait]
impl CellAgent for FakeAgentAt {
    async fn ping(&self) -> Result<(), ClientError> {
        self.agent.pings.fetch_add(1, Ordering::SeqCst);
        self.agent.refused(self.address)
    }

    async fn apply_pod(&self, request: &ApplyPodRequest) -> Result<(), ClientError> {
        self.agent.apply_calls.fetch_add(1, Ordering::SeqCst);
        self.agent.refused(self.address)?;
        let refuse = self
            .agent
            .refuse_applies
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refuse {
            return Err(ClientError::Timeout(self.address));
        }
        self.agent.applies.lock().unwrap().push(request.clone());
        let uid = request.pod.metadata.uid.clone();
        self.agent.pod().send_modify(|pod| {
            pod.version += 1;
            pod.uid = uid;
            pod.status.phase = Some("Pending".into());
        });
        Ok(())
    }

    async fn pod_status(
        &self,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<PodStatusResponse, ClientError> {
        self.agent.refused(self.address)?;
        let mut pod = self.agent.pod().subscribe();
        let past = |p: &AgentPod| after.is_none_or(|v| p.version > v);
        // A long-poll: answers once the version is past `after`, or after `wait`.
        let _ = tokio::time::timeout(wait, pod.wait_for(past)).await;
        self.agent.refused(self.address)?;
        let now = pod.borrow().clone();
        Ok(PodStatusResponse {
            version: now.version,
            uid: now.uid,
            status: now.status,
            ..PodStatusResponse::default()
        })
    }

    async fn delete_pod(&self, _grace: Duration) -> Result<(), ClientError> {
        self.agent.deletes.fetch_add(1, Ordering::SeqCst);
        self.agent.refused(self.address)
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
        pod_interfaces: PodInterfaceSource::none(),
        agent_listen_flag: true,
        refill_quiet_period: crate::settings::REFILL_QUIET_PERIOD,
    }
}

fn selector() -> Selector {
    Selector::new(
        Catalog::local().unwrap(),
        SelectionPolicy::new("local.small"),
    )
    .unwrap()
}

async fn provider(backend: Arc<FakeBackend>, pki_dir: &std::path::Path) -> CellsProvider {
    provider_with(backend, pki_dir, settings("node-a")).await
}

async fn provider_with(
    backend: Arc<FakeBackend>,
    pki_dir: &std::path::Path,
    settings: ProviderSettings,
) -> CellsProvider {
    CellsProvider::with_parts(
        settings,
        backend,
        selector(),
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
