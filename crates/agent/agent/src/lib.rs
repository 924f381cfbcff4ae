//! The Updraft cell agent (`updraft-cell`): runs ONE pod on a cell, like a small kubelet plus
//! container runtime, behind the HTTPS API with mutual TLS described in `updraft-cell-api`.
//!
//! State lives in the agent directory: `pod/pod.json` (the applied request),
//! `pod/containers/<name>.json` (PID and start time of each running instance), logs, FIFOs,
//! volumes. A restarted agent re-adopts the running containers from these records (same PID
//! and start time) or reports them as lost and restarts them per policy; nothing runs twice.
//!
//! The pod's Service routes ([`services`]) are kept in memory only: they are installed in each
//! pod sandbox before its containers start, and a restarted agent reports none in force until
//! the provider sends them again.
#![forbid(unsafe_code)]

pub mod images;
mod launch;
mod lifecycle;
pub mod logs;
pub mod netns;
pub mod pod;
pub mod probe;
mod record;
mod runtime;
pub mod server;
pub mod services;
pub mod spec;
mod status;
pub mod tls;
pub mod volumes;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use updraft_cell_api::{ApplyPodRequest, PodStatusResponse};
use updraft_cell_runtime::CgroupDriver;

pub use pod::{Pod, PodError, PodSettings};
pub use services::{Nft, Services};

/// Errors of the agent outside a single request.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No usable cgroups.
    #[error("cgroups: {0}")]
    Cgroups(#[from] updraft_cell_runtime::Error),
    /// The state directory is unusable.
    #[error("agent directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The pod recorded by an earlier agent could not be taken over.
    #[error("taking over the recorded pod: {0}")]
    Adopt(#[from] PodError),
}

/// The agent: at most one pod, its status channel and its settings.
pub struct Agent {
    dir: PathBuf,
    settings: PodSettings,
    pod: Mutex<Option<Arc<Pod>>>,
    status: watch::Sender<PodStatusResponse>,
}

impl Agent {
    /// An agent keeping its state in `dir`; takes over a pod an earlier agent left running.
    /// Service routes are installed with `nft`.
    pub async fn open(
        dir: PathBuf,
        images: Arc<dyn images::ImageSource>,
        cgroup_root: PathBuf,
        nft: Nft,
    ) -> Result<Arc<Self>, AgentError> {
        std::fs::create_dir_all(&dir).map_err(|source| AgentError::Dir {
            path: dir.clone(),
            source,
        })?;
        let status = watch::channel(PodStatusResponse::default()).0;
        let settings = PodSettings {
            driver: CgroupDriver::detect()?,
            cgroup_root,
            images,
            backoff_initial: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            services: Arc::new(Services::new(nft, status.clone())),
        };
        let agent = Arc::new(Self {
            dir,
            settings,
            pod: Mutex::new(None),
            status,
        });
        let recorded = agent.pod_dir().join("pod.json");
        if let Ok(bytes) = std::fs::read(&recorded) {
            match serde_json::from_slice::<ApplyPodRequest>(&bytes) {
                Ok(request) => {
                    let pod = Pod::start(
                        request,
                        agent.pod_dir(),
                        agent.settings.clone(),
                        agent.status.clone(),
                        true,
                    )?;
                    *agent.pod.lock().await = Some(pod);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring an unreadable pod record");
                }
            }
        }
        Ok(agent)
    }

    /// Changes the CrashLoopBackOff delays (tests).
    pub fn set_backoff(self: &mut Arc<Self>, initial: Duration, max: Duration) {
        if let Some(a) = Arc::get_mut(self) {
            a.settings.backoff_initial = initial;
            a.settings.backoff_max = max;
        }
    }

    fn pod_dir(&self) -> PathBuf {
        self.dir.join("pod")
    }

    /// The cgroup layout in use.
    pub fn cgroup_version(&self) -> &'static str {
        match self.settings.driver {
            CgroupDriver::V1 { .. } => "v1",
            CgroupDriver::V2 { .. } => "v2",
        }
    }

    /// The current pod.
    pub async fn pod(&self) -> Option<Arc<Pod>> {
        self.pod.lock().await.clone()
    }

    /// Status updates.
    pub fn status(&self) -> watch::Receiver<PodStatusResponse> {
        self.status.subscribe()
    }

    /// The pod's Service routes.
    pub fn services(&self) -> &Arc<Services> {
        &self.settings.services
    }

    /// Makes `request` the desired pod: same UID → file volumes updated; other UID → the old
    /// pod is stopped and the new one started.
    pub async fn apply(&self, request: ApplyPodRequest) -> Result<(String, u64), PodError> {
        let mut current = self.pod.lock().await;
        let uid = request.pod.metadata.uid.clone().unwrap_or_default();
        if let Some(pod) = current.as_ref()
            && pod.uid == uid
        {
            for (name, content) in &request.volumes {
                if pod.request().volumes.get(name) != Some(content) {
                    volumes::write_atomic(name, &pod.dir().join("volumes").join(name), content)?;
                }
            }
            let version = self.status.borrow().version;
            return Ok((uid, version));
        }
        if let Some(old) = current.take() {
            old.clone().stop().await;
            self.settings.services.detach();
            old.remove();
        }
        let _ = std::fs::remove_dir_all(self.pod_dir());
        let pod = Pod::start(
            request,
            self.pod_dir(),
            self.settings.clone(),
            self.status.clone(),
            false,
        )?;
        let uid = pod.uid.clone();
        *current = Some(pod);
        Ok((uid, self.status.borrow().version))
    }

    /// Stops and removes the pod; false when there was none.
    pub async fn delete(&self, grace: Option<Duration>) -> bool {
        let _ = grace;
        let Some(pod) = self.pod.lock().await.take() else {
            return false;
        };
        pod.clone().stop().await;
        self.settings.services.detach();
        pod.remove();
        self.status.send_modify(|s| {
            s.version += 1;
            s.uid = None;
            s.status = Default::default();
        });
        true
    }

    /// Exits without stopping the pod: a later agent adopts it.
    pub async fn detach(&self) {
        if let Some(pod) = self.pod.lock().await.take() {
            pod.clone().detach().await;
            pod.into_detached();
        }
    }
}

/// The current time as a `jiff` timestamp (k8s-openapi's time type).
pub fn now() -> k8s_openapi::jiff::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    k8s_openapi::jiff::Timestamp::new(d.as_secs() as i64, d.subsec_nanos() as i32)
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}
