//! The provider's side of a cell's agent, as the pod's supervisor uses it: answer a ping, take
//! the pod and the Service routes, report its status (a long-poll), stop it. A trait so that the lifecycle's tests run
//! against an in-memory agent on tokio's paused clock; [`TlsAgents`] is the real one (the
//! agent's HTTPS API with the provider's client certificate).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use updraft_cell_api::services::{ServiceRoutes, ServiceRoutesStatus};
use updraft_cell_api::{ApplyPodRequest, CellClient, ClientError, ClientTls, PodStatusResponse};

/// One cell's agent.
#[async_trait::async_trait]
pub(crate) trait CellAgent: Send + Sync {
    /// Whether the agent is up and accepts this provider (a short probe).
    async fn ping(&self) -> Result<(), ClientError>;
    /// Makes `request` the cell's pod (idempotent).
    async fn apply_pod(&self, request: &ApplyPodRequest) -> Result<(), ClientError>;
    /// The pod's status; with `after`, once its version is past `after` (at most `wait`).
    async fn pod_status(
        &self,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<PodStatusResponse, ClientError>;
    /// Stops the pod's containers (preStop, SIGTERM, `grace`, SIGKILL) and removes it.
    async fn delete_pod(&self, grace: Duration) -> Result<(), ClientError>;
    /// Makes `routes` the cell's Service routes (a whole table; an older one is ignored).
    async fn put_services(
        &self,
        routes: &ServiceRoutes,
    ) -> Result<ServiceRoutesStatus, ClientError>;
}

/// Makes the agent of the cell at an address.
pub(crate) trait AgentConnector: Send + Sync {
    /// The agent listening at `address`.
    fn agent(&self, address: SocketAddr) -> Arc<dyn CellAgent>;
}

/// How long a boot probe waits: a booting cell's address may swallow packets.
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// The deadline of the supervisor's other calls (a long-poll adds its wait).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The agents' HTTPS API, verified against the provider's CA.
pub(crate) struct TlsAgents {
    tls: ClientTls,
}

impl TlsAgents {
    /// Agents reached with `tls`.
    pub(crate) fn new(tls: ClientTls) -> TlsAgents {
        TlsAgents { tls }
    }

    /// A client of the agent at `address`, for the capabilities (logs, exec, …).
    pub(crate) fn client(&self, address: SocketAddr) -> CellClient {
        CellClient::new(address, self.tls.clone()).with_timeout(CALL_TIMEOUT)
    }
}

impl AgentConnector for TlsAgents {
    fn agent(&self, address: SocketAddr) -> Arc<dyn CellAgent> {
        Arc::new(self.client(address))
    }
}

#[async_trait::async_trait]
impl CellAgent for CellClient {
    async fn ping(&self) -> Result<(), ClientError> {
        self.clone().with_timeout(PING_TIMEOUT).ping().await
    }

    async fn apply_pod(&self, request: &ApplyPodRequest) -> Result<(), ClientError> {
        CellClient::apply_pod(self, request).await.map(drop)
    }

    async fn pod_status(
        &self,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<PodStatusResponse, ClientError> {
        CellClient::pod_status(self, after, wait).await
    }

    async fn delete_pod(&self, grace: Duration) -> Result<(), ClientError> {
        CellClient::delete_pod(self, Some(grace)).await
    }

    async fn put_services(
        &self,
        routes: &ServiceRoutes,
    ) -> Result<ServiceRoutesStatus, ClientError> {
        CellClient::put_services(self, routes).await
    }
}
