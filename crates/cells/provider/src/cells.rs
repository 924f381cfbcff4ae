//! The cells as the provider makes and sees them: the backend plus what a cell is made from
//! (the settings, the selector, the cloud-init file, the CA), and [`CellView`], one cell as a
//! pod's supervisor and the capabilities use it.
//!
//! Nothing here knows about pods being tracked: starting, listing, describing and terminating
//! are single backend calls; which cell a pod has is decided by its supervisor (`lifecycle`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use updraft_cell_api::{CellClient, PodInterface};
use updraft_cells_backend::cloud_init::{CloudConfig, UserData};
use updraft_cells_backend::{
    BackendError, Cell, CellBackend, CellId, CellIdentity, CellSpec, CellState, LaunchType,
};
use updraft_cells_catalog::{CellAnnotations, CostError, Decision, Selector, decide};
use updraft_provider::{PodRef, ProviderError, ResolvedPod};

use crate::agent::{AgentConnector, CellAgent, TlsAgents};
use crate::bootstrap::bootstrap;
use crate::cell_summary::CellSummary;
use crate::errors::{backend_error, cost_error};
use crate::pki::CellsPki;
use crate::settings::ProviderSettings;

/// One cell as the provider uses it.
#[derive(Debug, Clone)]
pub(crate) struct CellView {
    /// What the pod's cell condition and the metrics say about it.
    pub(crate) summary: CellSummary,
    /// The backend's id.
    pub(crate) id: CellId,
    /// The pod's interface on the cell.
    pub(crate) interface: Option<PodInterface>,
    /// The agent's address, once the backend gave the cell one.
    pub(crate) agent_address: Option<SocketAddr>,
    /// When the backend launched the cell: a cell whose agent has not answered yet may boot
    /// until `launched + bootTimeout`, also when this run only adopted it.
    pub(crate) launched: Option<SystemTime>,
}

/// The backend and what cells are made from.
pub(crate) struct Cells {
    pub(crate) settings: ProviderSettings,
    pub(crate) backend: Arc<dyn CellBackend>,
    pub(crate) selector: Selector,
    cloud_init: Option<CloudConfig>,
    pki: CellsPki,
    /// The agents' API (the capabilities always use [`TlsAgents`]).
    tls_agents: TlsAgents,
    /// The agents the supervisors talk to (the same API, or a test's in-memory agents).
    agents: Arc<dyn AgentConnector>,
}

impl Cells {
    /// Cells of `backend`; supervisors reach agents through `agents` (the real API when
    /// `None`).
    pub(crate) fn new(
        settings: ProviderSettings,
        backend: Arc<dyn CellBackend>,
        selector: Selector,
        cloud_init: Option<CloudConfig>,
        pki: CellsPki,
        agents: Option<Arc<dyn AgentConnector>>,
    ) -> Cells {
        let agents = agents.unwrap_or_else(|| Arc::new(TlsAgents::new(pki.client_tls())));
        Cells {
            tls_agents: TlsAgents::new(pki.client_tls()),
            settings,
            backend,
            selector,
            cloud_init,
            pki,
            agents,
        }
    }

    /// The agent of `view`, once it has an address.
    pub(crate) fn agent(&self, view: &CellView) -> Option<Arc<dyn CellAgent>> {
        view.agent_address.map(|address| self.agents.agent(address))
    }

    /// A client of the agent of `view`, for the capabilities (logs, exec, stats …).
    pub(crate) fn client(&self, view: &CellView) -> Option<CellClient> {
        view.agent_address
            .map(|address| self.tls_agents.client(address))
    }

    /// What the cell condition says about `cell`; the catalog's price unless `price` is known.
    pub(crate) fn summary(&self, cell: &Cell, price: Option<f64>) -> CellSummary {
        let catalog = self.selector.catalog();
        let price = price.or_else(|| {
            catalog
                .get(&cell.instance_type)
                .and_then(|t| match cell.launch_type {
                    LaunchType::Spot => t.spot_per_hour,
                    LaunchType::OnDemand => Some(t.on_demand_per_hour),
                })
        });
        CellSummary {
            id: cell.id.to_string(),
            instance_type: cell.instance_type.clone(),
            launch_type: cell.launch_type.as_str().to_owned(),
            price_per_hour: price,
            currency: catalog.currency.clone(),
            management_ip: cell.management_ip,
        }
    }

    /// The view of `cell`.
    pub(crate) fn view(&self, cell: &Cell, price: Option<f64>) -> CellView {
        CellView {
            summary: self.summary(cell, price),
            id: cell.id.clone(),
            interface: self.settings.pod_interfaces.interface(cell),
            agent_address: cell
                .management_ip
                .map(|ip| SocketAddr::new(ip, self.settings.agent.port)),
            launched: cell.launch_time,
        }
    }

    /// `view` with what the backend now says of the cell (its address), keeping the price and
    /// launch type it was bought at.
    pub(crate) fn refreshed(&self, view: &CellView, cell: &Cell) -> CellView {
        let mut fresh = self.view(cell, view.summary.price_per_hour);
        fresh.summary.launch_type = view.summary.launch_type.clone();
        fresh
    }

    /// The identity stamped on the cell of `pod`.
    pub(crate) fn identity(&self, pod: &ResolvedPod) -> CellIdentity {
        let pod_ref = PodRef::of(&pod.pod);
        CellIdentity {
            controller_id: self.settings.controller_id.clone(),
            node: self.settings.node_name.clone(),
            namespace: pod_ref.namespace,
            pod_name: pod_ref.name,
            pod_uid: pod_ref.uid,
            pod_labels: pod.pod.metadata.labels.clone().unwrap_or_default(),
        }
    }

    /// The cells the backend lists for pod `uid` of this node (not ending).
    pub(crate) async fn listed_for(&self, uid: &str) -> Result<Vec<Cell>, ProviderError> {
        let cells = self
            .backend
            .list(&self.settings.controller_id)
            .await
            .map_err(|e| backend_error("listing cells", e))?;
        Ok(cells
            .into_iter()
            .filter(|c| {
                !c.state.is_ending()
                    && c.identity
                        .as_ref()
                        .is_some_and(|i| i.pod_uid == uid && i.node == self.settings.node_name)
            })
            .collect())
    }

    /// Fresh bootstrap user data: a new server certificate for the agent, the configured
    /// cloud-init, size-checked for the backend.
    pub(crate) fn user_data(&self) -> Result<Vec<u8>, ProviderError> {
        let server = self.pki.issue_server_certificate().map_err(|e| {
            ProviderError::transient(format!("issuing the agent's certificate: {e}")).caused_by(e)
        })?;
        let bootstrap = bootstrap(
            &self.settings.agent,
            self.settings.agent_listen_flag,
            self.pki.ca_pem(),
            &server,
        );
        let user_data = UserData::build(
            &bootstrap,
            self.cloud_init.as_ref(),
            self.settings.user_data_limit,
        )
        .map_err(|e| {
            ProviderError::permanent(format!("building the cell's user data: {e}")).caused_by(e)
        })?;
        Ok(user_data.bytes)
    }

    /// The cost engine's choice for `resolved`: the instance and launch type, and what its
    /// annotations ask of the cell.
    pub(crate) fn decide(
        &self,
        resolved: &ResolvedPod,
    ) -> Result<(Decision, CellAnnotations), CostError> {
        let spec = resolved.pod.spec.clone().unwrap_or_default();
        let annotations = resolved
            .pod
            .metadata
            .annotations
            .clone()
            .unwrap_or_default();
        decide(
            &self.selector,
            &spec,
            &annotations,
            self.settings.default_launch_type,
        )
    }

    /// Starts a new cell for `resolved`, attempt `attempt` (part of the idempotency token, so a
    /// replacement is a new start and a retried start is the same one).
    pub(crate) async fn start(
        &self,
        resolved: &ResolvedPod,
        attempt: u32,
    ) -> Result<CellView, ProviderError> {
        let pod_ref = PodRef::of(&resolved.pod);
        let (decision, cell_annotations) = self.decide(resolved).map_err(cost_error)?;
        let user_data = self.user_data()?;
        let mut security_groups = self.settings.extra_security_groups.clone();
        security_groups.extend(cell_annotations.security_groups.iter().cloned());
        let cell_spec = CellSpec {
            name: cell_name(&self.settings.name_tag, &pod_ref),
            instance_type: decision.chosen.instance_type.name.clone(),
            launch_type: decision.launch_type,
            image: None,
            user_data,
            identity: self.identity(resolved),
            security_groups,
            private_ip_only: cell_annotations.private_ip_only.unwrap_or(false),
            root_volume_bytes: cell_annotations.volume_size_bytes,
            instance_profile: cell_annotations.instance_profile.clone(),
            idempotency_token: format!("{}-{attempt}", pod_ref.uid),
        };
        tracing::info!(
            pod = %pod_ref,
            instance_type = %cell_spec.instance_type,
            launch_type = %decision.launch_type.as_str(),
            price = decision.chosen.price_per_hour,
            reason = %decision.reason,
            "starting a cell"
        );
        let started = self
            .backend
            .start(&cell_spec)
            .await
            .map_err(|e| backend_error("starting a cell", e))?;
        let cell = match self.backend.describe(&started.id).await {
            Ok(cell) => cell,
            Err(_) => Cell {
                id: started.id.clone(),
                name: cell_spec.name.clone(),
                state: CellState::Pending,
                instance_type: cell_spec.instance_type.clone(),
                launch_type: started.launch_type,
                management_ip: None,
                pod_ip: None,
                public_ip: None,
                launch_time: Some(SystemTime::now()),
                identity: Some(cell_spec.identity.clone()),
                tags: Default::default(),
            },
        };
        // Spot may have fallen back to on-demand: price what was bought.
        let price =
            (started.launch_type == decision.launch_type).then_some(decision.chosen.price_per_hour);
        let mut view = self.view(&cell, price);
        view.summary.launch_type = started.launch_type.as_str().to_owned();
        if cell.state.is_ending() {
            // An idempotency token that names a cell which has ended since: a new attempt.
            return Err(ProviderError::transient(format!(
                "cell {} for this start attempt has ended; retrying with a new cell",
                cell.id
            )));
        }
        Ok(view)
    }

    /// Terminates cell `id` (one the backend no longer knows is terminated already).
    pub(crate) async fn terminate(&self, id: &CellId) -> Result<(), ProviderError> {
        match self.backend.terminate(id).await {
            Ok(()) | Err(BackendError::NotFound { .. }) => Ok(()),
            Err(e) => Err(backend_error(&format!("terminating cell {id}"), e)),
        }
    }

    /// How long the backend says the cell has been booting, counted against `bootTimeout`.
    fn boot_time_left(&self, view: &CellView) -> Option<Duration> {
        let booting_for = view.launched?.elapsed().unwrap_or_default();
        Some(self.settings.boot_timeout.saturating_sub(booting_for))
    }

    /// Until when this run waits for the agent of a cell it started or found for a pod the
    /// node asked for: `bootTimeout` after the cell's launch (a cell from an earlier run keeps
    /// its deadline across the restart), but at least `min(healthTimeout, bootTimeout)` from
    /// now (a standby cell taken long after its launch).
    pub(crate) fn boot_deadline(&self, view: &CellView) -> Instant {
        let now = Instant::now();
        let floor = now + self.settings.health_timeout.min(self.settings.boot_timeout);
        self.boot_time_left(view)
            .map_or(now + self.settings.boot_timeout, |left| {
                (now + left).max(floor)
            })
    }

    /// Until when this run waits for the agent of a cell it adopted from the listing (no pod
    /// asked for it yet): `bootTimeout` after its launch, but never less than `healthTimeout`
    /// of silence from now (an adopted cell is given the time any cell is given to answer).
    pub(crate) fn adopted_boot_deadline(&self, view: &CellView) -> Instant {
        let now = Instant::now();
        let left = self
            .boot_time_left(view)
            .unwrap_or(self.settings.boot_timeout);
        (now + left).max(now + self.settings.health_timeout)
    }
}

/// Cell names: `<nameTag>-<namespace>-<pod>`, lower-case, at most 63 characters.
pub(crate) fn cell_name(prefix: &str, pod: &PodRef) -> String {
    let mut name: String = format!("{prefix}-{}-{}", pod.namespace, pod.name)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(63);
    name
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn cell_names_are_dns_friendly() {
        let pod = PodRef {
            namespace: "Team_A".into(),
            name: "web.0".into(),
            uid: "u".into(),
        };
        assert_eq!(cell_name("updraft", &pod), "updraft-team-a-web-0");
        let long = PodRef {
            namespace: "n".repeat(60),
            name: "p".into(),
            uid: "u".into(),
        };
        assert_eq!(cell_name("updraft", &long).len(), 63);
    }
}
