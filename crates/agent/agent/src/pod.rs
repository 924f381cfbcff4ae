//! One pod on the cell: sandbox, volumes, init then app containers, restarts with backoff,
//! probes, hooks, and the status derived from it all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container as K8sContainer, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, LifecycleHandler, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use updraft_cell_api::{ApplyPodRequest, PodStatusResponse};
use updraft_cell_runtime::{
    BindMount, CgroupDriver, Container, ContainerExit, ContainerSpec, DnsConfig, ExecTarget,
    ExitReason, PodNetwork, PodSandbox, Resources, SandboxSpec, StdioMode,
};

use crate::images::{ImageSource, PreparedImage};
use crate::logs::{ContainerLog, LogStream};
use crate::{probe, spec, volumes};

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
}

/// Terminated state kept for `lastState`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Terminated {
    exit_code: i32,
    reason: String,
    message: Option<String>,
    started_at: Option<Timestamp>,
    finished_at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated(Terminated),
}

#[derive(Debug)]
struct Slot {
    init: bool,
    image: String,
    image_id: String,
    container_id: String,
    state: State,
    last: Option<Terminated>,
    restarts: u32,
    ready: bool,
    started: bool,
    exec: Option<ExecTarget>,
    env: Vec<(String, String)>,
    /// Will not run again (policy says no more restarts).
    done: bool,
}

/// What is on disk about a running container instance, to find it again after a restart.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct InstanceRecord {
    pid: i32,
    /// Field 22 of /proc/<pid>/stat: with the PID it names the process uniquely.
    start_ticks: u64,
    restarts: u32,
    started_at: Timestamp,
    container_id: String,
    image_id: String,
    env: Vec<(String, String)>,
    last: Option<Terminated>,
}

/// A pod running on this cell.
pub struct Pod {
    /// Pod UID.
    pub uid: String,
    request: ApplyPodRequest,
    dir: PathBuf,
    sandbox: PodSandbox,
    settings: PodSettings,
    slots: Mutex<BTreeMap<String, Slot>>,
    logs: BTreeMap<String, Arc<ContainerLog>>,
    stop: CancellationToken,
    detach: CancellationToken,
    status: watch::Sender<PodStatusResponse>,
    initialized: AtomicBool,
    start_time: Timestamp,
    pod_ip: Option<String>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pumped: Mutex<std::collections::BTreeSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Start time of a process (field 22 of /proc/<pid>/stat).
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), PodError> {
    let err = |source| PodError::State {
        path: path.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec(value).map_err(|e| err(std::io::Error::other(e)))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

impl Pod {
    fn containers(&self) -> impl Iterator<Item = (&K8sContainer, bool)> {
        let spec = self.request.pod.spec.as_ref();
        spec.and_then(|s| s.init_containers.as_ref())
            .into_iter()
            .flatten()
            .map(|c| (c, true))
            .chain(
                spec.map(|s| s.containers.iter())
                    .into_iter()
                    .flatten()
                    .map(|c| (c, false)),
            )
    }

    fn container(&self, name: &str) -> Option<&K8sContainer> {
        self.containers()
            .find(|(c, _)| c.name == name)
            .map(|(c, _)| c)
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
        &self.sandbox
    }

    /// Log of a container.
    pub fn log(&self, container: &str) -> Option<Arc<ContainerLog>> {
        self.logs.get(container).cloned()
    }

    /// Where exec goes for a running container, with its environment.
    pub fn exec_target(&self, container: &str) -> Option<(ExecTarget, Vec<(String, String)>)> {
        let slots = lock(&self.slots);
        let slot = slots.get(container)?;
        slot.exec.clone().map(|t| (t, slot.env.clone()))
    }

    /// Whether `container` is a container of this pod.
    pub fn has_container(&self, container: &str) -> bool {
        self.logs.contains_key(container)
    }

    /// Path of the stdin FIFO of a container with `stdin: true`.
    pub fn stdin_fifo(&self, container: &str) -> Option<PathBuf> {
        self.container(container)
            .filter(|c| c.stdin == Some(true) && c.tty != Some(true))
            .map(|_| self.dir.join("fifo").join(format!("{container}.in")))
    }

    /// Stats of the running containers' cgroups (name, stats).
    pub fn container_names(&self) -> Vec<String> {
        lock(&self.slots)
            .iter()
            .filter(|(_, s)| s.exec.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Creates (or, with `adopt`, takes over) the sandbox and volumes and starts the
    /// containers.
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
            write_json(&dir.join("pod.json"), &request)?;
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
                    .and_then(|q| spec::quantity(&q.0, 1.0));
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
        let mut slots = BTreeMap::new();
        let all: Vec<(K8sContainer, bool)> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| (c.clone(), true))
            .chain(spec.containers.iter().map(|c| (c.clone(), false)))
            .collect();
        for (c, init) in &all {
            let log = ContainerLog::new(dir.join("logs").join(&c.name))
                .map_err(state_err(&dir.join("logs")))?;
            logs.insert(c.name.clone(), Arc::new(log));
            slots.insert(
                c.name.clone(),
                Slot {
                    init: *init,
                    image: c.image.clone().unwrap_or_default(),
                    image_id: String::new(),
                    container_id: String::new(),
                    state: State::Waiting {
                        reason: if *init {
                            "PodInitializing"
                        } else {
                            "ContainerCreating"
                        }
                        .into(),
                        message: None,
                    },
                    last: None,
                    restarts: 0,
                    ready: false,
                    started: false,
                    exec: None,
                    env: Vec::new(),
                    done: false,
                },
            );
        }
        let pod = Arc::new(Self {
            uid,
            request,
            dir,
            sandbox,
            settings,
            slots: Mutex::new(slots),
            logs,
            stop: CancellationToken::new(),
            detach: CancellationToken::new(),
            status,
            initialized: AtomicBool::new(false),
            start_time: crate::now(),
            pod_ip,
            tasks: Mutex::new(Vec::new()),
            pumped: Mutex::new(std::collections::BTreeSet::new()),
        });
        pod.publish();
        let p = pod.clone();
        let handle = tokio::spawn(async move { p.run(all).await });
        lock(&pod.tasks).push(handle);
        Ok(pod)
    }

    /// Init containers in order, then the app containers.
    async fn run(self: Arc<Self>, all: Vec<(K8sContainer, bool)>) {
        let init_marker = self.dir.join("initialized");
        if !init_marker.exists() {
            for (c, _) in all.iter().filter(|(_, init)| *init) {
                if !self.clone().run_container(c.clone(), true).await {
                    // Failed for good (restartPolicy Never) or the pod is stopping.
                    self.publish();
                    return;
                }
            }
            let _ = std::fs::write(&init_marker, b"");
        } else {
            let mut slots = lock(&self.slots);
            for s in slots.values_mut().filter(|s| s.init) {
                s.done = true;
                s.state = State::Terminated(Terminated {
                    exit_code: 0,
                    reason: "Completed".into(),
                    ..Terminated::default()
                });
            }
        }
        self.initialized.store(true, Ordering::SeqCst);
        self.publish();
        let mut set = tokio::task::JoinSet::new();
        for (c, _) in all.into_iter().filter(|(_, init)| !*init) {
            let p = self.clone();
            set.spawn(async move {
                p.run_container(c, false).await;
            });
        }
        while set.join_next().await.is_some() {}
        self.publish();
    }

    fn set(&self, name: &str, f: impl FnOnce(&mut Slot)) {
        if let Some(s) = lock(&self.slots).get_mut(name) {
            f(s);
        }
        self.publish();
    }

    fn restart_policy(&self) -> &str {
        self.request
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always")
    }

    fn grace(&self) -> Duration {
        Duration::from_secs(
            self.request
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
                .unwrap_or(30)
                .max(0) as u64,
        )
    }

    /// Runs one container until the policy says it is done; true = it succeeded (init).
    async fn run_container(self: Arc<Self>, c: K8sContainer, init: bool) -> bool {
        let name = c.name.clone();
        let mut backoff: Option<Duration> = None;
        let record_path = self.dir.join("containers").join(format!("{name}.json"));
        let mut adopted = std::fs::read(&record_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<InstanceRecord>(&b).ok());
        loop {
            if self.stop.is_cancelled() || self.detach.is_cancelled() {
                return false;
            }
            let instance = match adopted.take() {
                Some(rec) => self.adopt_instance(&c, rec),
                None => self.start_instance(&c, &record_path).await,
            };
            let (mut container, rootfs_msg_path, started_at) = match instance {
                Ok(i) => i,
                Err(failure) => {
                    let (mut reason, message) = failure;
                    if reason == "ErrImagePull" && backoff.is_some() {
                        // Failed before: the kubelet shows the wait as ImagePullBackOff.
                        reason = "ImagePullBackOff".into();
                    }
                    self.set(&name, |s| {
                        s.state = State::Waiting {
                            reason: reason.clone(),
                            message: Some(message.clone()),
                        };
                    });
                    let delay = backoff.map_or(self.settings.backoff_initial, |d| {
                        (d * 2).min(self.settings.backoff_max)
                    });
                    backoff = Some(delay);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = self.stop.cancelled() => return false,
                        () = self.detach.cancelled() => return false,
                    }
                }
            };
            let run_start = Instant::now();
            let target = container.exec_target();
            let probes_cancel = CancellationToken::new();
            let (liveness_tx, mut liveness_rx) = tokio::sync::mpsc::channel::<()>(1);
            if !init {
                let p = self.clone();
                let c2 = c.clone();
                let cancel = probes_cancel.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = p.probes(c2, target, liveness_tx) => {}
                        () = cancel.cancelled() => {}
                    }
                });
            }
            if let Some(h) = c.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()) {
                self.clone().hook(&name, h).await;
            }
            enum Why {
                Exited,
                Stop,
                Detach,
                Liveness,
            }
            let why = tokio::select! {
                _ = container.wait() => Why::Exited,
                () = self.stop.cancelled() => Why::Stop,
                () = self.detach.cancelled() => Why::Detach,
                Some(()) = liveness_rx.recv() => Why::Liveness,
            };
            probes_cancel.cancel();
            if matches!(why, Why::Detach) {
                container.detach();
                return false;
            }
            if matches!(why, Why::Stop | Why::Liveness) {
                let grace = self.grace();
                let deadline = Instant::now() + grace;
                if let Some(h) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()) {
                    let _ = tokio::time::timeout(grace, self.clone().hook(&name, h)).await;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                // stop consumes the container; wait() result is cached inside.
                let exit = container.stop(left).await;
                self.finish(&c, exit.ok(), &rootfs_msg_path, started_at, &record_path);
            } else {
                let exit = container.wait().await.ok();
                let _ = container.stop(Duration::ZERO).await;
                self.finish(&c, exit, &rootfs_msg_path, started_at, &record_path);
            }
            if self.stop.is_cancelled() {
                self.set(&name, |s| s.done = true);
                return false;
            }
            let failed = lock(&self.slots)
                .get(&name)
                .is_none_or(|s| !matches!(&s.state, State::Terminated(t) if t.exit_code == 0))
                || matches!(why, Why::Liveness);
            let restart = match self.restart_policy() {
                "Never" => false,
                "OnFailure" => failed,
                _ => !init || failed,
            };
            if !restart {
                self.set(&name, |s| s.done = true);
                return !failed;
            }
            if run_start.elapsed() >= Duration::from_secs(600) {
                backoff = None;
            }
            let delay = match backoff {
                // The first restart is immediate, as the kubelet does it.
                None => Duration::ZERO,
                Some(d) if d.is_zero() => self.settings.backoff_initial,
                Some(d) => (d * 2).min(self.settings.backoff_max),
            };
            backoff = Some(delay);
            if !delay.is_zero() {
                let pod_name = self.request.pod.metadata.name.clone().unwrap_or_default();
                self.set(&name, |s| {
                    if let State::Terminated(t) = &s.state {
                        s.last = Some(t.clone());
                    }
                    s.state = State::Waiting {
                        reason: "CrashLoopBackOff".into(),
                        message: Some(format!(
                            "back-off {}s restarting failed container={name} pod={pod_name}",
                            delay.as_secs()
                        )),
                    };
                });
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = self.stop.cancelled() => return false,
                    () = self.detach.cancelled() => return false,
                }
            }
            self.set(&name, |s| {
                if let State::Terminated(t) = &s.state {
                    s.last = Some(t.clone());
                }
                s.restarts += 1;
            });
        }
    }

    /// Records the end of an instance: exit code, reason, termination message.
    fn finish(
        &self,
        c: &K8sContainer,
        exit: Option<ContainerExit>,
        msg_path: &Path,
        started_at: Timestamp,
        record_path: &Path,
    ) {
        let _ = std::fs::remove_file(record_path);
        if let Some(log) = self.logs.get(&c.name) {
            // Output still in the pipes belongs to this instance, not to the next one; the
            // pumps cannot be between a read and its write while this drains.
            let _reading = log.reading();
            for (suffix, stream) in [("out", LogStream::Stdout), ("err", LogStream::Stderr)] {
                let path = self.dir.join("fifo").join(format!("{}.{suffix}", c.name));
                drain_fifo(&path, |data| log.write(stream, data));
            }
            log.end();
        }
        let (code, reason) = match exit {
            Some(e) => (
                e.status.code(),
                match e.reason {
                    ExitReason::Completed => "Completed",
                    ExitReason::Error => "Error",
                    ExitReason::OomKilled => "OOMKilled",
                    ExitReason::Unknown => "ContainerStatusUnknown",
                },
            ),
            None => (137, "ContainerStatusUnknown"),
        };
        let mut message = std::fs::read(msg_path)
            .ok()
            .map(|mut b| {
                b.truncate(4096);
                String::from_utf8_lossy(&b).into_owned()
            })
            .filter(|m| !m.is_empty());
        if message.is_none()
            && code != 0
            && c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
            && let Some(log) = self.logs.get(&c.name)
        {
            let raw = log.read_instance(log.instance());
            let text = crate::logs::render(
                &raw,
                &updraft_cell_api::LogOptions {
                    tail_lines: Some(80),
                    ..Default::default()
                },
                None,
            );
            let start = text.len().saturating_sub(2048);
            message = Some(String::from_utf8_lossy(&text[start..]).into_owned());
        }
        if reason == "ContainerStatusUnknown" && message.is_none() {
            message = Some(
                "the container ended while the agent was restarting; its exit status is unknown"
                    .into(),
            );
        }
        self.set(&c.name, |s| {
            s.exec = None;
            s.ready = false;
            s.state = State::Terminated(Terminated {
                exit_code: code,
                reason: reason.into(),
                message,
                started_at: Some(started_at),
                finished_at: Some(crate::now()),
            });
        });
    }

    /// Takes over a container instance of an earlier agent, if its process still exists.
    fn adopt_instance(
        self: &Arc<Self>,
        c: &K8sContainer,
        rec: InstanceRecord,
    ) -> Result<(Container, PathBuf, Timestamp), (String, String)> {
        let name = &c.name;
        let alive = start_ticks(rec.pid) == Some(rec.start_ticks);
        let msg_path = self.dir.join("termination").join(name);
        let restore = |s: &mut Slot| {
            s.restarts = rec.restarts;
            s.last = rec.last.clone();
            s.container_id = rec.container_id.clone();
            s.image_id = rec.image_id.clone();
            s.env = rec.env.clone();
        };
        if alive
            && let Ok(container) =
                Container::adopt(&self.sandbox, name, nix::unistd::Pid::from_raw(rec.pid))
        {
            if let Some(log) = self.logs.get(name) {
                let _ = log.begin(rec.restarts);
            }
            self.spawn_pumps(c);
            let target = container.exec_target();
            self.set(name, |s| {
                restore(s);
                s.exec = Some(target);
                s.started = true;
                s.state = State::Running {
                    started_at: rec.started_at,
                };
            });
            return Ok((container, msg_path, rec.started_at));
        }
        // Lost while the agent was down: report it and let the policy decide.
        self.set(name, |s| {
            restore(s);
            s.state = State::Terminated(Terminated {
                exit_code: 137,
                reason: "ContainerStatusUnknown".into(),
                message: Some(
                    "the container could not be found again after an agent restart".into(),
                ),
                started_at: Some(rec.started_at),
                finished_at: Some(crate::now()),
            });
            s.last = Some(match &s.state {
                State::Terminated(t) => t.clone(),
                _ => Terminated::default(),
            });
            s.restarts += 1;
        });
        let _ = std::fs::remove_file(self.dir.join("containers").join(format!("{name}.json")));
        Err((
            "ContainerStatusUnknown".into(),
            "lost across an agent restart; starting it again".into(),
        ))
    }

    /// Reads the container's FIFOs into its log for as long as the pod lives (one reader per
    /// container name, kept across restarts).
    fn spawn_pumps(self: &Arc<Self>, c: &K8sContainer) {
        if c.tty == Some(true) {
            return;
        }
        let Some(log) = self.logs.get(&c.name).cloned() else {
            return;
        };
        for (suffix, stream) in [("out", LogStream::Stdout), ("err", LogStream::Stderr)] {
            let path = self.dir.join("fifo").join(format!("{}.{suffix}", c.name));
            if updraft_cell_runtime::ensure_fifo(&path).is_err() {
                continue;
            }
            let log = log.clone();
            let (stop, detach) = (self.stop.clone(), self.detach.clone());
            if !lock(&self.pumped).insert(format!("{}.{suffix}", c.name)) {
                continue;
            }
            // Opened here, before the container starts, not in the task: a container that
            // writes and exits before a reader holds the FIFO would take its output with it
            // (the pipe's buffer goes with its last open descriptor).
            let Ok(rx) = tokio::net::unix::pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(&path)
            else {
                lock(&self.pumped).remove(&format!("{}.{suffix}", c.name));
                continue;
            };
            let handle = tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    tokio::select! {
                        r = rx.readable() => if r.is_err() { return },
                        () = stop.cancelled() => return,
                        () = detach.cancelled() => return,
                    }
                    // Read and write under the log's reading guard, so an instance's end
                    // (which drains the pipe under the same guard) never splits them.
                    let _reading = log.reading();
                    loop {
                        match rx.try_read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) => log.write(stream, &buf[..n]),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(_) => return,
                        }
                    }
                }
            });
            lock(&self.tasks).push(handle);
        }
    }

    /// Prepares the image and starts a new instance.
    async fn start_instance(
        self: &Arc<Self>,
        c: &K8sContainer,
        record_path: &Path,
    ) -> Result<(Container, PathBuf, Timestamp), (String, String)> {
        let name = &c.name;
        let restarts = lock(&self.slots).get(name).map_or(0, |s| s.restarts);
        let container_id = format!("{}-{name}-{restarts}", uid_to_id(&self.uid));
        let image_name = c.image.clone().unwrap_or_default();
        let policy = c.image_pull_policy.clone().unwrap_or_else(|| {
            if image_name.ends_with(":latest") || !image_name.contains(':') {
                "Always".into()
            } else {
                "IfNotPresent".into()
            }
        });
        // The previous instance's rootfs goes; each instance starts from the image.
        if restarts > 0 {
            self.settings.images.remove(&format!(
                "{}-{name}-{}",
                uid_to_id(&self.uid),
                restarts - 1
            ));
        }
        let image: PreparedImage = self
            .settings
            .images
            .prepare(
                &image_name,
                &policy,
                &self.request.pull_secrets,
                &container_id,
            )
            .await
            .map_err(|f| (f.reason, f.message))?;
        let resolved: Vec<(String, String)> = self
            .request
            .env
            .get(name)
            .into_iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        let env = spec::env(&image, &resolved);
        let pod_sc = self
            .request
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref());
        let sc = c.security_context.as_ref();
        let uid = sc
            .and_then(|s| s.run_as_user)
            .or(pod_sc.and_then(|s| s.run_as_user))
            .unwrap_or(0);
        let gid = sc
            .and_then(|s| s.run_as_group)
            .or(pod_sc.and_then(|s| s.run_as_group))
            .unwrap_or(0);
        let caps = sc.and_then(|s| s.capabilities.as_ref());
        let mut mounts = Vec::new();
        let vols = self
            .request
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        for m in c.volume_mounts.iter().flatten() {
            let Some(v) = vols.iter().find(|v| v.name == m.name) else {
                return Err((
                    "CreateContainerConfigError".into(),
                    format!("volumeMount {:?} names no volume of the pod", m.name),
                ));
            };
            let mut source = match &v.host_path {
                Some(hp) => {
                    let p = PathBuf::from(&hp.path);
                    if matches!(hp.type_.as_deref(), Some("DirectoryOrCreate")) {
                        let _ = std::fs::create_dir_all(&p);
                    }
                    p
                }
                None => self.dir.join("volumes").join(&v.name),
            };
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                if sub.contains("..") || sub.starts_with('/') {
                    return Err((
                        "CreateContainerConfigError".into(),
                        format!("subPath {sub:?} must be relative without '..'"),
                    ));
                }
                source = source.join(sub);
                let _ = std::fs::create_dir_all(&source);
            }
            mounts.push(BindMount {
                source,
                destination: PathBuf::from(&m.mount_path),
                read_only: m.read_only == Some(true),
            });
        }
        let msg_path = self.dir.join("termination").join(name);
        let _ = std::fs::write(&msg_path, b"");
        mounts.push(BindMount {
            source: msg_path.clone(),
            destination: PathBuf::from(
                c.termination_message_path
                    .clone()
                    .unwrap_or_else(|| "/dev/termination-log".into()),
            ),
            read_only: false,
        });
        let fifo = |s: &str| self.dir.join("fifo").join(format!("{name}.{s}"));
        let stdio = if c.tty == Some(true) {
            StdioMode::Tty { rows: 24, cols: 80 }
        } else {
            StdioMode::Fifos {
                stdin: (c.stdin == Some(true)).then(|| fifo("in")),
                stdout: fifo("out"),
                stderr: fifo("err"),
            }
        };
        let spec = ContainerSpec {
            name: name.clone(),
            rootfs: image.rootfs.clone(),
            argv: spec::argv(c, &image),
            env: env.clone(),
            working_dir: c.working_dir.clone().or(image.working_dir.clone()),
            uid: uid.max(0) as u32,
            gid: gid.max(0) as u32,
            supplementary_groups: pod_sc
                .and_then(|s| s.supplemental_groups.clone())
                .unwrap_or_default()
                .into_iter()
                .map(|g| g.max(0) as u32)
                .collect(),
            capabilities_add: caps.and_then(|c| c.add.clone()).unwrap_or_default(),
            capabilities_drop: caps.and_then(|c| c.drop.clone()).unwrap_or_default(),
            read_only_rootfs: sc.and_then(|s| s.read_only_root_filesystem) == Some(true),
            mounts,
            resources: spec::resources(c),
            stdio,
        };
        if let Some(log) = self.logs.get(name) {
            let _ = log.begin(restarts);
        }
        self.spawn_pumps(c);
        let (container, stdio) = Container::start(&self.sandbox, spec).map_err(|e| {
            let reason = if matches!(e, updraft_cell_runtime::Error::Setup { .. }) {
                "StartError"
            } else {
                "CreateContainerError"
            };
            (reason.to_owned(), e.to_string())
        })?;
        if let updraft_cell_runtime::Stdio::Tty(pty) = stdio
            && let Some(log) = self.logs.get(name).cloned()
            && let Ok(mut master) = pty.master().try_clone()
        {
            // The terminal's output is the log; the reader ends with EIO when the container
            // (the last slave holder) exits.
            std::thread::spawn(move || {
                let _keep = pty;
                let mut buf = vec![0u8; 16 << 10];
                while let Ok(n) = std::io::Read::read(&mut master, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.write(LogStream::Stdout, &buf[..n]);
                }
            });
        }
        let started_at = crate::now();
        let pid = container.pid().as_raw();
        let record = InstanceRecord {
            pid,
            start_ticks: start_ticks(pid).unwrap_or(0),
            restarts,
            started_at,
            container_id: format!("updraft://{container_id}"),
            image_id: image.image_id.clone(),
            env: env.clone(),
            last: lock(&self.slots).get(name).and_then(|s| s.last.clone()),
        };
        if let Err(e) = write_json(record_path, &record) {
            tracing::warn!(container = %name, error = %e, "could not record the container for agent restarts");
        }
        let target = container.exec_target();
        self.set(name, |s| {
            s.exec = Some(target);
            s.env = env;
            s.started = c.startup_probe.is_none();
            s.ready = false;
            s.container_id = record.container_id.clone();
            s.image_id = image.image_id.clone();
            s.state = State::Running { started_at };
        });
        Ok((container, msg_path, started_at))
    }

    /// Runs an exec lifecycle hook (httpGet hooks are run like probes).
    async fn hook(self: Arc<Self>, name: &str, h: &LifecycleHandler) {
        let Some((target, env)) = self.exec_target(name) else {
            return;
        };
        let probe = k8s_openapi::api::core::v1::Probe {
            exec: h.exec.clone(),
            http_get: h.http_get.clone(),
            tcp_socket: h.tcp_socket.clone(),
            timeout_seconds: Some(self.grace().as_secs().max(1) as i32),
            ..Default::default()
        };
        if !probe::run_once(&probe, &target, self.sandbox.netns(), &env, &[]).await {
            tracing::warn!(container = %name, "lifecycle hook failed");
        }
    }

    /// Startup, then liveness and readiness probes of one running instance.
    async fn probes(
        self: Arc<Self>,
        c: K8sContainer,
        target: ExecTarget,
        liveness_failed: tokio::sync::mpsc::Sender<()>,
    ) {
        let env = self
            .exec_target(&c.name)
            .map(|(_, e)| e)
            .unwrap_or_default();
        let ports: Vec<(String, u16)> = c
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?)))
            .collect();
        let netns = self.sandbox.netns();
        let period = |p: &k8s_openapi::api::core::v1::Probe| {
            Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64)
        };
        if let Some(sp) = &c.startup_probe {
            tokio::time::sleep(Duration::from_secs(
                sp.initial_delay_seconds.unwrap_or(0).max(0) as u64,
            ))
            .await;
            let mut failures = 0;
            loop {
                if probe::run_once(sp, &target, netns, &env, &ports).await {
                    break;
                }
                failures += 1;
                if failures >= sp.failure_threshold.unwrap_or(3) {
                    let _ = liveness_failed.send(()).await;
                    return;
                }
                tokio::time::sleep(period(sp)).await;
            }
            self.set(&c.name, |s| s.started = true);
        }
        if c.readiness_probe.is_none() {
            self.set(&c.name, |s| s.ready = true);
        }
        let readiness = async {
            let Some(rp) = &c.readiness_probe else {
                return std::future::pending::<()>().await;
            };
            tokio::time::sleep(Duration::from_secs(
                rp.initial_delay_seconds.unwrap_or(0).max(0) as u64,
            ))
            .await;
            let (mut ok_run, mut fail_run) = (0, 0);
            loop {
                if probe::run_once(rp, &target, netns, &env, &ports).await {
                    ok_run += 1;
                    fail_run = 0;
                    if ok_run >= rp.success_threshold.unwrap_or(1) {
                        self.set(&c.name, |s| s.ready = true);
                    }
                } else {
                    fail_run += 1;
                    ok_run = 0;
                    if fail_run >= rp.failure_threshold.unwrap_or(3) {
                        self.set(&c.name, |s| s.ready = false);
                    }
                }
                tokio::time::sleep(period(rp)).await;
            }
        };
        let liveness = async {
            let Some(lp) = &c.liveness_probe else {
                return std::future::pending::<()>().await;
            };
            tokio::time::sleep(Duration::from_secs(
                lp.initial_delay_seconds.unwrap_or(0).max(0) as u64,
            ))
            .await;
            let mut fail_run = 0;
            loop {
                if probe::run_once(lp, &target, netns, &env, &ports).await {
                    fail_run = 0;
                } else {
                    fail_run += 1;
                    if fail_run >= lp.failure_threshold.unwrap_or(3) {
                        let _ = liveness_failed.send(()).await;
                        return;
                    }
                }
                tokio::time::sleep(period(lp)).await;
            }
        };
        tokio::join!(readiness, liveness);
    }

    /// Derives the PodStatus and publishes it when it changed.
    pub fn publish(&self) {
        let status = self.compute_status();
        self.status.send_if_modified(|cur| {
            if cur.status == status && cur.uid.as_deref() == Some(self.uid.as_str()) {
                return false;
            }
            cur.version += 1;
            cur.uid = Some(self.uid.clone());
            cur.status = status;
            true
        });
    }

    fn compute_status(&self) -> PodStatus {
        let slots = lock(&self.slots);
        let to_status = |name: &str, s: &Slot| {
            let term = |t: &Terminated| ContainerStateTerminated {
                exit_code: t.exit_code,
                reason: Some(t.reason.clone()),
                message: t.message.clone(),
                started_at: t.started_at.map(Time),
                finished_at: t.finished_at.map(Time),
                container_id: Some(s.container_id.clone()).filter(|c| !c.is_empty()),
                ..Default::default()
            };
            let state = match &s.state {
                State::Waiting { reason, message } => ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.clone()),
                        message: message.clone(),
                    }),
                    ..Default::default()
                },
                State::Running { started_at } => ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(Time(*started_at)),
                    }),
                    ..Default::default()
                },
                State::Terminated(t) => ContainerState {
                    terminated: Some(term(t)),
                    ..Default::default()
                },
            };
            ContainerStatus {
                name: name.to_owned(),
                image: s.image.clone(),
                image_id: s.image_id.clone(),
                container_id: Some(s.container_id.clone()).filter(|c| !c.is_empty()),
                ready: s.ready && matches!(s.state, State::Running { .. }),
                started: Some(s.started && matches!(s.state, State::Running { .. })),
                restart_count: s.restarts as i32,
                state: Some(state),
                last_state: s.last.as_ref().map(|t| ContainerState {
                    terminated: Some(term(t)),
                    ..Default::default()
                }),
                ..Default::default()
            }
        };
        let order: Vec<&str> = self.containers().map(|(c, _)| c.name.as_str()).collect();
        let mut init_statuses = Vec::new();
        let mut app_statuses = Vec::new();
        for name in order {
            if let Some(s) = slots.get(name) {
                if s.init {
                    init_statuses.push(to_status(name, s));
                } else {
                    app_statuses.push(to_status(name, s));
                }
            }
        }
        let initialized = self.initialized.load(Ordering::SeqCst);
        let apps: Vec<&Slot> = slots.values().filter(|s| !s.init).collect();
        let init_failed = slots.values().any(|s| {
            s.init && s.done && !matches!(&s.state, State::Terminated(t) if t.exit_code == 0)
        });
        let all_done = apps.iter().all(|s| s.done);
        let any_failed = apps
            .iter()
            .any(|s| matches!(&s.state, State::Terminated(t) if t.exit_code != 0));
        let phase = if init_failed {
            "Failed"
        } else if !initialized {
            "Pending"
        } else if all_done && !apps.is_empty() {
            if any_failed { "Failed" } else { "Succeeded" }
        } else if apps.iter().all(|s| s.started || s.restarts > 0 || s.done) {
            "Running"
        } else {
            "Pending"
        };
        let ready = initialized
            && apps
                .iter()
                .all(|s| s.ready && matches!(s.state, State::Running { .. }));
        let cond = |t: &str, ok: bool| PodCondition {
            type_: t.into(),
            status: if ok { "True" } else { "False" }.into(),
            ..Default::default()
        };
        PodStatus {
            phase: Some(phase.into()),
            conditions: Some(vec![
                cond("PodReadyToStartContainers", true),
                cond("Initialized", initialized),
                cond("Ready", ready),
                cond("ContainersReady", ready),
                cond("PodScheduled", true),
            ]),
            container_statuses: Some(app_statuses),
            init_container_statuses: Some(init_statuses).filter(|v| !v.is_empty()),
            pod_ip: self.pod_ip.clone(),
            pod_ips: self.pod_ip.clone().map(|ip| vec![PodIP { ip }]),
            start_time: Some(Time(self.start_time)),
            ..Default::default()
        }
    }

    /// Stops every container (preStop, SIGTERM, grace, SIGKILL), removes rootfs, volumes, the
    /// sandbox and the pod directory.
    pub async fn stop(self: Arc<Self>) {
        self.stop.cancel();
        let handles: Vec<_> = lock(&self.tasks).drain(..).collect();
        for h in handles {
            let _ = h.await;
        }
        for (name, slot) in lock(&self.slots).iter() {
            for i in 0..=slot.restarts {
                self.settings
                    .images
                    .remove(&format!("{}-{name}-{i}", uid_to_id(&self.uid)));
            }
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
        self.detach.cancel();
        let handles: Vec<_> = lock(&self.tasks).drain(..).collect();
        for h in handles {
            let _ = h.await;
        }
    }

    /// Marks the sandbox to survive the drop of this pod (agent exit).
    pub fn into_detached(self: Arc<Self>) {
        if let Ok(pod) = Arc::try_unwrap(self) {
            pod.sandbox.detach();
        }
    }

    /// Removes what is left on disk after [`Pod::stop`] (consumes the last handle).
    pub fn remove(self: Arc<Self>) {
        let dir = self.dir.clone();
        // When a request still holds the pod, the sandbox's Drop tears it down later.
        if let Ok(pod) = Arc::try_unwrap(self)
            && let Err(e) = pod.sandbox.teardown()
        {
            tracing::warn!(error = %e, "sandbox teardown failed");
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Reads what is buffered in a FIFO without blocking.
fn drain_fifo(path: &Path, mut sink: impl FnMut(&[u8])) {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    else {
        return;
    };
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = std::io::Read::read(&mut f, &mut buf) {
        if n == 0 {
            break;
        }
        sink(&buf[..n]);
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
