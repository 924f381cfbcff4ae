//! One pod on the cell: what it holds (sandbox, volumes, logs, its directory) and its handle
//! for the API server. What its containers do is the lifecycle's ([`crate::lifecycle`]), how
//! they are run is [`crate::launch`]'s, and its status is derived in [`crate::status`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Container as K8sContainer;
use tokio::sync::watch;
use updraft_cell_api::{ApplyPodRequest, PodStatusResponse};
use updraft_cell_runtime::{
    CgroupDriver, DnsConfig, ExecTarget, PodNetwork, PodSandbox, Resources, SandboxSpec,
};
use updraft_common::sync::lock;

use crate::images::ImageSource;
use crate::launch::CellRuntime;
use crate::lifecycle::{Backoff, PodLifecycle, Stops};
use crate::logs::ContainerLog;
use crate::record::write_json;
use crate::services::Services;
use crate::status::StatusBoard;
use crate::volumes;

/// Errors of creating a pod.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The request is not a runnable pod; the message names the field.
    #[error("invalid pod: {0}")]
    Invalid(String),
    /// The sandbox could not be created.
    #[error("pod sandbox: {0}")]
    Sandbox(#[from] updraft_cell_runtime::Error),
    /// A volume could not be prepared.
    #[error(transparent)]
    Volume(#[from] volumes::VolumeError),
    /// A state file could not be written.
    #[error("agent state {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Settings shared by all pods of an agent.
#[derive(Clone)]
pub struct PodSettings {
    /// cgroup layout.
    pub driver: CgroupDriver,
    /// cgroup path under which the pod cgroup is created.
    pub cgroup_root: PathBuf,
    /// Root filesystems.
    pub images: Arc<dyn ImageSource>,
    /// First CrashLoopBackOff delay (kubelet: 10 s), doubled up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Largest CrashLoopBackOff delay (kubelet: 5 min).
    pub backoff_max: Duration,
    /// The agent's Service routes: each pod's sandbox is attached to them before its
    /// containers start.
    pub services: Arc<Services>,
}

/// A pod running on this cell.
pub struct Pod {
    /// Pod UID.
    pub uid: String,
    request: Arc<ApplyPodRequest>,
    dir: PathBuf,
    runtime: Arc<CellRuntime>,
    board: Arc<StatusBoard>,
    stops: Stops,
    /// The lifecycle task.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Pod {
    fn containers(&self) -> impl Iterator<Item = &K8sContainer> {
        let spec = self.request.pod.spec.as_ref();
        spec.and_then(|s| s.init_containers.as_ref())
            .into_iter()
            .flatten()
            .chain(spec.map(|s| s.containers.iter()).into_iter().flatten())
    }

    fn container(&self, name: &str) -> Option<&K8sContainer> {
        self.containers().find(|c| c.name == name)
    }

    /// The applied request.
    pub fn request(&self) -> &ApplyPodRequest {
        &self.request
    }

    /// The pod directory on the cell.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pod sandbox.
    pub fn sandbox(&self) -> &PodSandbox {
        self.runtime.sandbox()
    }

    /// Log of a container.
    pub fn log(&self, container: &str) -> Option<Arc<ContainerLog>> {
        self.runtime.log(container).cloned()
    }

    /// Where exec goes for a running container, with its environment.
    pub fn exec_target(&self, container: &str) -> Option<(ExecTarget, Vec<(String, String)>)> {
        let view = self.board.view(container)?;
        view.exec.map(|t| (t, view.env))
    }

    /// Whether `container` is a container of this pod.
    pub fn has_container(&self, container: &str) -> bool {
        self.runtime.log(container).is_some()
    }

    /// Path of the stdin FIFO of a container with `stdin: true`.
    pub fn stdin_fifo(&self, container: &str) -> Option<PathBuf> {
        self.container(container)
            .filter(|c| c.stdin == Some(true) && c.tty != Some(true))
            .map(|_| self.dir.join("fifo").join(format!("{container}.in")))
    }

    /// Names of the containers with a running instance.
    pub fn container_names(&self) -> Vec<String> {
        self.board
            .views()
            .into_iter()
            .filter(|(_, v)| v.exec.is_some())
            .map(|(n, _)| n)
            .collect()
    }

    /// Creates (or, with `adopt`, takes over) the sandbox and volumes, installs the Service
    /// routes in the sandbox's network namespace and starts the containers.
    pub fn start(
        request: ApplyPodRequest,
        dir: PathBuf,
        settings: PodSettings,
        status: watch::Sender<PodStatusResponse>,
        adopt: bool,
    ) -> Result<Arc<Self>, PodError> {
        let uid = request
            .pod
            .metadata
            .uid
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| PodError::Invalid("metadata.uid is required".into()))?;
        let spec = request
            .pod
            .spec
            .as_ref()
            .ok_or_else(|| PodError::Invalid("spec is required".into()))?;
        if spec.containers.is_empty() {
            return Err(PodError::Invalid("spec.containers is empty".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            if !valid_name(&c.name) || !seen.insert(c.name.clone()) {
                return Err(PodError::Invalid(format!(
                    "container name {:?} must be unique, 1-63 of [a-z0-9-]",
                    c.name
                )));
            }
            if c.image.as_deref().is_none_or(str::is_empty) {
                return Err(PodError::Invalid(format!(
                    "containers[{}].image is required",
                    c.name
                )));
            }
        }
        let state_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PodError::State { path, source }
        };
        for sub in ["containers", "fifo", "logs", "volumes", "termination"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(state_err(&d))?;
        }
        if !adopt {
            let path = dir.join("pod.json");
            write_json(&path, &request).map_err(state_err(&path))?;
        }
        let host_network = spec.host_network == Some(true);
        let hostname = spec
            .hostname
            .clone()
            .or_else(|| request.pod.metadata.name.clone())
            .unwrap_or_else(|| "pod".into());
        let mut hostname = hostname;
        hostname.truncate(63);
        let net = request.network.interface.as_ref().map(|i| PodNetwork {
            host_netns: i.host_netns.clone(),
            bridge: i.bridge.clone(),
            host_veth: i.host_veth.clone(),
            address: i.address,
            prefix_len: i.prefix_len,
            gateway: i.gateway,
        });
        let pod_ip = if host_network {
            None
        } else {
            net.as_ref().map(|n| n.address.to_string())
        };
        let sandbox_spec = SandboxSpec {
            id: uid_to_id(&uid),
            hostname,
            host_network,
            network: net,
            dns: DnsConfig {
                nameservers: request.network.dns.nameservers.clone(),
                searches: request.network.dns.searches.clone(),
                options: request.network.dns.options.clone(),
            },
            host_aliases: spec
                .host_aliases
                .iter()
                .flatten()
                .map(|a| (a.ip.clone(), a.hostnames.clone().unwrap_or_default()))
                .collect(),
            resources: Resources::default(),
            state_dir: dir.join("sandbox"),
            cgroup_root: settings.cgroup_root.clone(),
        };
        let sandbox = if adopt {
            PodSandbox::adopt(&settings.driver, sandbox_spec)?
        } else {
            PodSandbox::create(&settings.driver, sandbox_spec)?
        };
        // Volumes.
        for v in spec.volumes.iter().flatten() {
            let vdir = dir.join("volumes").join(&v.name);
            if let Some(e) = &v.empty_dir {
                let memory = e.medium.as_deref() == Some("Memory");
                let limit = e
                    .size_limit
                    .as_ref()
                    .and_then(|q| updraft_common::quantity::bytes(&q.0).ok());
                volumes::empty_dir(&v.name, &vdir, memory, limit)?;
            } else if v.host_path.is_some() {
                // Bound directly at start.
            } else if let Some(content) = request.volumes.get(&v.name) {
                if !adopt {
                    volumes::write_atomic(&v.name, &vdir, content)?;
                }
            } else if v.config_map.is_some()
                || v.secret.is_some()
                || v.downward_api.is_some()
                || v.projected.is_some()
            {
                // Optional sources may resolve to nothing: an empty volume.
                volumes::write_atomic(&v.name, &vdir, &Default::default())?;
            }
        }
        let mut logs = BTreeMap::new();
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            let log = ContainerLog::new(dir.join("logs").join(&c.name))
                .map_err(state_err(&dir.join("logs")))?;
            logs.insert(c.name.clone(), Arc::new(log));
        }
        let board = Arc::new(StatusBoard::for_pod(
            uid.clone(),
            spec,
            crate::now(),
            pod_ip,
            status,
        ));
        let stops = Stops::default();
        let request = Arc::new(request);
        let runtime = Arc::new(CellRuntime::new(
            sandbox,
            request.clone(),
            dir.clone(),
            settings.images.clone(),
            logs,
            stops.clone(),
        ));
        let lifecycle = PodLifecycle::new(
            &request.pod,
            runtime.clone(),
            board.clone(),
            Backoff {
                initial: settings.backoff_initial,
                max: settings.backoff_max,
            },
            stops.clone(),
            dir.join("initialized"),
        );
        let pod = Arc::new(Self {
            uid,
            request,
            dir,
            runtime,
            board,
            stops,
            tasks: Mutex::new(Vec::new()),
        });
        pod.publish();
        // After everything that can fail (the agent detaches the routes from the pods it
        // stops; a pod that failed to start is never stopped) and before the containers start
        // (one calling a Service as it starts finds the rules).
        settings
            .services
            .attach(pod.sandbox().netns(), host_network);
        lock(&pod.tasks).push(tokio::spawn(lifecycle.run()));
        Ok(pod)
    }

    /// Derives the PodStatus and publishes it when it changed.
    pub fn publish(&self) {
        self.board.publish();
    }

    /// Waits for the lifecycle and the log pumps to end (after a stop or detach).
    async fn join(&self) {
        let handles: Vec<_> = lock(&self.tasks).drain(..).collect();
        for h in handles {
            let _ = h.await;
        }
        self.runtime.pumps_ended().await;
    }

    /// Stops every container (preStop, SIGTERM, grace, SIGKILL), removes rootfs, volumes, the
    /// sandbox and the pod directory.
    pub async fn stop(self: Arc<Self>) {
        self.stops.stop.cancel();
        self.join().await;
        for (name, view) in self.board.views() {
            self.runtime.remove_rootfs(&name, view.restarts);
        }
        if let Ok(entries) = std::fs::read_dir(self.dir.join("volumes")) {
            for e in entries.flatten() {
                volumes::unmount(&e.path());
            }
        }
        self.publish();
    }

    /// Leaves the containers running (agent exit); a later agent adopts them.
    pub async fn detach(self: Arc<Self>) {
        self.stops.detach.cancel();
        self.join().await;
    }

    /// Marks the sandbox to survive the drop of this pod (agent exit).
    pub fn into_detached(self: Arc<Self>) {
        if let Ok(pod) = Arc::try_unwrap(self)
            && let Ok(runtime) = Arc::try_unwrap(pod.runtime)
        {
            runtime.into_sandbox().detach();
        }
    }

    /// Removes what is left on disk after [`Pod::stop`] (consumes the last handle).
    pub fn remove(self: Arc<Self>) {
        let dir = self.dir.clone();
        // When a request still holds the pod, the sandbox's Drop tears it down later.
        if let Ok(pod) = Arc::try_unwrap(self)
            && let Ok(runtime) = Arc::try_unwrap(pod.runtime)
            && let Err(e) = runtime.into_sandbox().teardown()
        {
            tracing::warn!(error = %e, "sandbox teardown failed");
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A sandbox id (≤ 40 of `[a-z0-9-]`) from a pod UID.
pub fn uid_to_id(uid: &str) -> String {
    let mut id: String = uid
        .to_ascii_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    id.truncate(24);
    if id.is_empty() {
        id.push_str("pod");
    }
    id
}

/// Pod-level stats helpers.
pub fn read_net_dev(pid: i32) -> Vec<updraft_cell_api::InterfaceStats> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap_or_default();
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let n: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            Some(updraft_cell_api::InterfaceStats {
                name: name.trim().to_owned(),
                rx_bytes: *n.first()?,
                rx_errors: *n.get(2)?,
                tx_bytes: *n.get(8)?,
                tx_errors: *n.get(10)?,
            })
        })
        .collect()
}
