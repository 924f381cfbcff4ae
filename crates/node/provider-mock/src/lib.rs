//! An in-process provider for tests and benchmarks.
//!
//! Pods are "running" as soon as they are created, with a pod IP; nothing is executed. What a
//! pod does is chosen by annotations, so tests can drive every path of the node:
//!
//! | annotation | value | effect |
//! | --- | --- | --- |
//! | `mock.updraft.dev/fail-create` | `permanent`, `invalid` or `transient:N` | creation fails (always, or the first N times) |
//! | `mock.updraft.dev/start-delay-ms` | milliseconds | the pod stays `Pending` that long |
//! | `mock.updraft.dev/exit-after-ms` | milliseconds | every container exits after that long … |
//! | `mock.updraft.dev/exit-code` | integer (default 0) | … with this code; restarts per `restartPolicy` |
//! | `mock.updraft.dev/run` | `true` or `false` (default) | containers run as real host processes (below) |
//!
//! A malformed value fails creation with `InvalidInput` naming the annotation.
//!
//! With `mock.updraft.dev/run: "true"` (module `sandbox`) the pod gets a scratch directory under
//! [`MockConfig::scratch_dir`] and each container's `command` + `args` runs there as a host
//! process (`sleep infinity` without a command), with the container's resolved environment,
//! restarted per `restartPolicy`; its status follows the process. Its output is logged in the
//! CRI format (module `cri_log`) for `kubectl logs` (follow, tail, since, timestamps,
//! previous); `kubectl exec` runs the command in the scratch directory, with a pseudo-terminal
//! for `-t` (module `exec`); `kubectl attach` connects to the main process's stdin and output.
//! Such a pod cannot also use `start-delay-ms`, `exit-after-ms` or `exit-code`. Pods without
//! the annotation execute nothing, and logs/exec/attach on them answer "not implemented".
//!
//! Port-forwarding connects to the host's loopback (module `forward`); resource
//! usage is derived from the containers' requests (module `stats`).
#![forbid(unsafe_code)]

mod cri_log;
mod exec;
mod forward;
mod sandbox;
mod stats;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use tokio::sync::mpsc;
use updraft_common::sync::lock;
use updraft_provider::{
    ContainerAttach, ContainerExec, ContainerLogs, ExecRequest, ExitStatus, LogOptions, LogStream,
    NodeHealth, PodRef, PodStatusUpdate, Provider, ProviderError, ProviderPod, ResolvedPod, Result,
    StreamIo,
};

use crate::sandbox::{ContainerEvent, Sandbox};

const ANNOTATION_PREFIX: &str = "mock.updraft.dev/";

/// Settings of the mock provider.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// The node's address, reported as each pod's `hostIP`.
    pub host_ip: String,
    /// Pod IPs are allocated sequentially from this base (reported only; never routed).
    pub pod_ip_base: Ipv4Addr,
    /// Where pods with `mock.updraft.dev/run: "true"` get their scratch directories.
    pub scratch_dir: PathBuf,
    /// Whether each pod's resolved env and files are kept for [`MockProvider::resolved`]
    /// (tests read them back). `updraft run` turns it off: a real provider hands them on to
    /// where the pod runs instead of holding them, and the benchmarks, which run this
    /// provider, should measure the node, not the mock's test records.
    pub keep_inputs: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            host_ip: "127.0.0.1".into(),
            pod_ip_base: Ipv4Addr::new(10, 244, 0, 0),
            scratch_dir: std::env::temp_dir().join("updraft-mock"),
            keep_inputs: true,
        }
    }
}

/// How a mock pod behaves, parsed from its annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Behaviour {
    fail_create: Option<Failure>,
    start_delay: Option<Duration>,
    exit_after: Option<Duration>,
    exit_code: i32,
    run: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    Permanent,
    Invalid,
    Transient(u32),
}

impl Behaviour {
    fn of(pod: &Pod) -> Result<Self> {
        let mut behaviour = Self::default();
        let Some(annotations) = pod.metadata.annotations.as_ref() else {
            return Ok(behaviour);
        };
        for (key, value) in annotations {
            let Some(name) = key.strip_prefix(ANNOTATION_PREFIX) else {
                continue;
            };
            let bad = |expected: &str| {
                ProviderError::invalid_input(format!(
                    "annotation {key}={value:?} is malformed: expected {expected}"
                ))
            };
            let millis = |v: &str| v.parse::<u64>().map(Duration::from_millis);
            match name {
                "fail-create" => {
                    behaviour.fail_create = Some(match value.as_str() {
                        "permanent" => Failure::Permanent,
                        "invalid" => Failure::Invalid,
                        other => other
                            .strip_prefix("transient:")
                            .and_then(|n| n.parse().ok())
                            .map(Failure::Transient)
                            .ok_or_else(|| bad("permanent, invalid or transient:N"))?,
                    })
                }
                "start-delay-ms" => {
                    behaviour.start_delay = Some(millis(value).map_err(|_| bad("milliseconds"))?)
                }
                "exit-after-ms" => {
                    behaviour.exit_after = Some(millis(value).map_err(|_| bad("milliseconds"))?)
                }
                "exit-code" => {
                    behaviour.exit_code = value.parse().map_err(|_| bad("an integer"))?
                }
                "run" => behaviour.run = value.parse().map_err(|_| bad("true or false"))?,
                _ => {
                    return Err(bad(
                        "one of fail-create, start-delay-ms, exit-after-ms, exit-code, run",
                    ));
                }
            }
        }
        if behaviour.run
            && (behaviour.start_delay.is_some()
                || behaviour.exit_after.is_some()
                || behaviour.exit_code != 0)
        {
            return Err(ProviderError::invalid_input(format!(
                "annotation {ANNOTATION_PREFIX}run=true runs real processes: remove \
                 {ANNOTATION_PREFIX}start-delay-ms, exit-after-ms and exit-code (the process decides)"
            )));
        }
        Ok(behaviour)
    }
}

#[derive(Debug)]
struct MockPod {
    pod: PodRef,
    /// What the mock keeps of the pod the node gave it last (see [`kept`]), JSON-encoded: a
    /// k8s-openapi `Pod` takes several KB in memory however sparse, and the mock needs it
    /// only at a start, an exit or a container change.
    spec: Box<[u8]>,
    /// The resolved env and files the node gave it last, if `MockConfig::keep_inputs`.
    inputs: Option<Inputs>,
    status: PodStatus,
    /// The pod's timer (start delay or exit), aborted when the pod is deleted.
    timer: Option<tokio::task::JoinHandle<()>>,
    /// The pod's processes, with `mock.updraft.dev/run: "true"`; dropping kills them.
    sandbox: Option<Sandbox>,
}

/// A pod's resolved env (per container) and volume files (per volume).
type Inputs = (
    BTreeMap<String, Vec<updraft_provider::EnvVar>>,
    BTreeMap<String, updraft_provider::VolumeFiles>,
    Option<updraft_provider::PodDns>,
);

impl MockPod {
    /// The slim pod [`kept`] encoded.
    fn slim_pod(&self) -> Pod {
        serde_json::from_slice(&self.spec).unwrap_or_default()
    }

    /// The pod's `restartPolicy` (the API's default, `Always`, when unset).
    fn restart_policy(&self) -> String {
        self.slim_pod()
            .spec
            .and_then(|s| s.restart_policy)
            .unwrap_or_else(|| "Always".into())
    }
}

#[derive(Debug, Default)]
struct State {
    pods: HashMap<(String, String), MockPod>,
    /// Transient failures already returned, per pod UID.
    failures: HashMap<String, u32>,
    next_ip: u32,
}

/// The mock provider. Cheap: a map entry per pod and, only for pods with a delay or an exit
/// annotation, one timer.
#[derive(Debug, Clone)]
pub struct MockProvider {
    config: MockConfig,
    state: Arc<Mutex<State>>,
    updates_tx: mpsc::UnboundedSender<PodStatusUpdate>,
    updates_rx: Arc<Mutex<Option<mpsc::UnboundedReceiver<PodStatusUpdate>>>>,
    /// Why the backend is unhealthy, if it is (see [`MockProvider::set_unhealthy`]).
    unhealthy: Arc<Mutex<Option<String>>>,
}

impl MockProvider {
    /// A mock provider with `config`.
    pub fn new(config: MockConfig) -> Self {
        let (updates_tx, updates_rx) = mpsc::unbounded_channel();
        Self {
            config,
            state: Arc::new(Mutex::new(State::default())),
            updates_tx,
            updates_rx: Arc::new(Mutex::new(Some(updates_rx))),
            unhealthy: Arc::new(Mutex::new(None)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// What the node last gave the provider for `pod`, if it runs: the pod as the mock keeps
    /// it (identity, annotations, restart policy, containers' names, images and resources)
    /// and, with `MockConfig::keep_inputs`, its env, volume files and resolver settings.
    pub fn resolved(&self, namespace: &str, name: &str) -> Option<ResolvedPod> {
        self.lock()
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|p| {
                let (env, volumes, dns) = p.inputs.clone().unwrap_or_default();
                ResolvedPod {
                    pod: Arc::new(p.slim_pod()),
                    env,
                    volumes,
                    dns,
                }
            })
    }

    /// Makes the backend report itself unhealthy with `problem` (`None`: healthy again), as
    /// a cloud whose API went away would; the node turns `Ready=False` with that message.
    pub fn set_unhealthy(&self, problem: Option<String>) {
        *lock(&self.unhealthy) = problem;
    }

    /// How many pods the provider runs (for tests and benchmarks).
    pub fn pod_count(&self) -> usize {
        self.lock().pods.len()
    }

    fn publish(&self, pod: &MockPod) {
        let _ = self.updates_tx.send(PodStatusUpdate {
            pod: pod.pod.clone(),
            status: pod.status.clone(),
        });
    }

    /// Moves the pod to running (again) and arms its exit timer.
    fn start(&self, key: &(String, String), behaviour: &Behaviour) {
        let mut state = self.lock();
        let Some(entry) = state.pods.get_mut(key) else {
            return;
        };
        let restarts = entry
            .status
            .container_statuses
            .as_ref()
            .and_then(|c| c.first())
            .map_or(0, |c| {
                c.restart_count + i32::from(matches!(&c.state, Some(s) if s.terminated.is_some()))
            });
        let now = updraft_provider::now();
        entry.status.phase = Some("Running".into());
        entry.status.conditions = Some(conditions(true, &now));
        entry.status.container_statuses = Some(container_statuses(
            &entry.slim_pod(),
            &entry.pod,
            restarts,
            |_| ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(now.clone()),
                }),
                ..Default::default()
            },
        ));
        if let Some(after) = behaviour.exit_after {
            let this = self.clone();
            let key = key.clone();
            let behaviour = behaviour.clone();
            entry.timer = Some(tokio::spawn(async move {
                tokio::time::sleep(after).await;
                this.exit(&key, &behaviour);
            }));
        }
        self.publish(entry);
    }

    fn exit(&self, key: &(String, String), behaviour: &Behaviour) {
        let code = behaviour.exit_code;
        let restart = {
            let mut state = self.lock();
            let Some(entry) = state.pods.get_mut(key) else {
                return;
            };
            let policy = entry.restart_policy();
            let restart = policy == "Always" || (policy == "OnFailure" && code != 0);
            let now = updraft_provider::now();
            let restarts = entry
                .status
                .container_statuses
                .as_ref()
                .and_then(|c| c.first())
                .map_or(0, |c| c.restart_count);
            let reason = if code == 0 { "Completed" } else { "Error" };
            entry.status.container_statuses = Some(container_statuses(
                &entry.slim_pod(),
                &entry.pod,
                restarts,
                |_| ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: code,
                        reason: Some(reason.into()),
                        finished_at: Some(now.clone()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ));
            entry.status.conditions = Some(conditions(false, &now));
            if !restart {
                entry.status.phase = Some(if code == 0 { "Succeeded" } else { "Failed" }.into());
            }
            self.publish(entry);
            restart
        };
        if restart {
            self.start(key, behaviour);
        }
    }

    /// Starts the processes of a `run` pod; its status follows them from here on.
    async fn start_processes(&self, key: (String, String), resolved: &ResolvedPod) -> Result<()> {
        let uid = resolved.pod.metadata.uid.clone().unwrap_or_default();
        let this = self.clone();
        let (report_key, report_uid) = (key.clone(), uid.clone());
        let report: sandbox::Reporter =
            Arc::new(move |event| this.container_changed(&report_key, &report_uid, event));
        let sandbox = match Sandbox::start(&self.config.scratch_dir, resolved, report).await {
            Ok(sandbox) => sandbox,
            Err(err) => {
                self.lock().pods.remove(&key);
                return Err(err);
            }
        };
        if let Some(entry) = self.lock().pods.get_mut(&key)
            && entry.pod.uid == uid
        {
            entry.sandbox = Some(sandbox);
        }
        Ok(())
    }

    /// Folds a container's change into the pod's status and publishes it.
    fn container_changed(&self, key: &(String, String), uid: &str, event: ContainerEvent) {
        let mut state = self.lock();
        let Some(entry) = state.pods.get_mut(key).filter(|p| p.pod.uid == uid) else {
            return;
        };
        let name = match &event {
            ContainerEvent::Running { name, .. } | ContainerEvent::Terminated { name, .. } => {
                name.clone()
            }
        };
        let statuses = entry.status.container_statuses.get_or_insert_with(Vec::new);
        if let Some(status) = statuses.iter_mut().find(|c| c.name == name) {
            match event {
                ContainerEvent::Running {
                    restart_count,
                    started_at,
                    ..
                } => {
                    if restart_count > 0 {
                        status.last_state = status.state.take();
                    }
                    status.restart_count = restart_count;
                    status.state = Some(ContainerState {
                        running: Some(ContainerStateRunning {
                            started_at: Some(started_at),
                        }),
                        ..Default::default()
                    });
                    status.ready = true;
                    status.started = Some(true);
                }
                ContainerEvent::Terminated {
                    restart_count,
                    exit_code,
                    started_at,
                    finished_at,
                    ..
                } => {
                    status.restart_count = restart_count;
                    status.state = Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code,
                            reason: Some(if exit_code == 0 { "Completed" } else { "Error" }.into()),
                            started_at: Some(started_at),
                            finished_at: Some(finished_at),
                            container_id: status.container_id.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    });
                    status.ready = false;
                    status.started = Some(false);
                }
            }
        }
        let policy = entry.restart_policy();
        let statuses = entry.status.container_statuses.get_or_insert_with(Vec::new);
        let exit_codes: Option<Vec<i32>> = statuses
            .iter()
            .map(|c| c.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code))
            .collect();
        let all_ready = statuses.iter().all(|c| c.ready);
        entry.status.phase = Some(
            match exit_codes {
                Some(codes)
                    if policy == "Never"
                        || (policy == "OnFailure" && codes.iter().all(|c| *c == 0)) =>
                {
                    if codes.iter().all(|c| *c == 0) {
                        "Succeeded"
                    } else {
                        "Failed"
                    }
                }
                _ => "Running",
            }
            .into(),
        );
        entry.status.conditions = Some(conditions(all_ready, &updraft_provider::now()));
        self.publish(entry);
    }

    /// Calls `f` with the sandbox of a running `run` pod.
    fn with_sandbox<T>(&self, pod: &PodRef, f: impl FnOnce(&Sandbox) -> Result<T>) -> Result<T> {
        let state = self.lock();
        let entry = state
            .pods
            .get(&(pod.namespace.clone(), pod.name.clone()))
            .filter(|p| pod.uid.is_empty() || p.pod.uid == pod.uid)
            .ok_or_else(|| ProviderError::not_found(format!("pod {pod} does not run here")))?;
        match &entry.sandbox {
            Some(sandbox) => f(sandbox),
            None => Err(ProviderError::Unsupported(
                "logs, exec and attach on mock pods without the annotation mock.updraft.dev/run: \"true\"",
            )),
        }
    }

    fn allocate_ip(&self, state: &mut State) -> String {
        state.next_ip = state.next_ip.wrapping_add(1);
        Ipv4Addr::from(u32::from(self.config.pod_ip_base).wrapping_add(state.next_ip)).to_string()
    }
}

fn conditions(ready: bool, now: &Time) -> Vec<PodCondition> {
    let status = |ok: bool| if ok { "True" } else { "False" }.to_owned();
    [
        "PodReadyToStartContainers",
        "Initialized",
        "ContainersReady",
        "Ready",
    ]
    .iter()
    .map(|type_| PodCondition {
        type_: (*type_).into(),
        status: status(ready || matches!(*type_, "PodReadyToStartContainers" | "Initialized")),
        last_transition_time: Some(now.clone()),
        ..Default::default()
    })
    .collect()
}

/// What the mock keeps of a pod it is handed, encoded: identity, annotations, restart policy
/// and the containers' names, images and resources (its statuses and stats are built from
/// those). Not the whole pod: the node's cache holds that, and a second full copy per pod
/// would double the node's memory in the benchmarks, which run on this provider.
fn kept(pod: &Pod) -> Box<[u8]> {
    let slim = Pod {
        metadata: ObjectMeta {
            name: pod.metadata.name.clone(),
            namespace: pod.metadata.namespace.clone(),
            uid: pod.metadata.uid.clone(),
            annotations: pod.metadata.annotations.clone(),
            ..Default::default()
        },
        spec: pod.spec.as_ref().map(|spec| PodSpec {
            containers: spec
                .containers
                .iter()
                .map(|c| Container {
                    name: c.name.clone(),
                    image: c.image.clone(),
                    resources: c.resources.clone(),
                    ..Default::default()
                })
                .collect(),
            restart_policy: spec.restart_policy.clone(),
            ..Default::default()
        }),
        status: None,
    };
    // Encoding a k8s-openapi struct into memory cannot fail; an empty record would decode
    // as a pod without containers.
    serde_json::to_vec(&slim)
        .unwrap_or_default()
        .into_boxed_slice()
}

impl MockProvider {
    fn inputs(&self, resolved: &ResolvedPod) -> Option<Inputs> {
        self.config.keep_inputs.then(|| {
            (
                resolved.env.clone(),
                resolved.volumes.clone(),
                resolved.dns.clone(),
            )
        })
    }
}

fn container_statuses(
    pod: &Pod,
    pod_ref: &PodRef,
    restart_count: i32,
    state: impl Fn(&str) -> ContainerState,
) -> Vec<ContainerStatus> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| {
            let state = state(&c.name);
            let running = state.running.is_some();
            ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                image_id: format!("mock://{}", c.image.clone().unwrap_or_default()),
                container_id: Some(format!("mock://{}/{}", pod_ref.uid, c.name)),
                ready: running,
                started: Some(running),
                restart_count,
                state: Some(state),
                ..Default::default()
            }
        })
        .collect()
}

#[async_trait::async_trait]
impl Provider for MockProvider {
    async fn create_pod(&self, resolved: &ResolvedPod) -> Result<()> {
        let pod_ref = PodRef::of(&resolved.pod);
        let behaviour = Behaviour::of(&resolved.pod)?;
        let key = (pod_ref.namespace.clone(), pod_ref.name.clone());
        {
            let mut state = self.lock();
            if state
                .pods
                .get(&key)
                .is_some_and(|p| p.pod.uid == pod_ref.uid)
            {
                return Ok(());
            }
            match behaviour.fail_create {
                Some(Failure::Permanent) => {
                    return Err(ProviderError::permanent("mock: told to fail creation"));
                }
                Some(Failure::Invalid) => {
                    return Err(ProviderError::invalid_input("mock: told to reject the pod"));
                }
                Some(Failure::Transient(times)) => {
                    let failed = state.failures.entry(pod_ref.uid.clone()).or_default();
                    if *failed < times {
                        *failed += 1;
                        return Err(ProviderError::transient(format!(
                            "mock: transient failure {failed} of {times}"
                        )));
                    }
                }
                None => {}
            }
            let ip = self.allocate_ip(&mut state);
            let now = updraft_provider::now();
            let status = PodStatus {
                phase: Some("Pending".into()),
                host_ip: Some(self.config.host_ip.clone()),
                pod_ip: Some(ip.clone()),
                pod_ips: Some(vec![PodIP { ip }]),
                start_time: Some(now.clone()),
                conditions: Some(conditions(false, &now)),
                container_statuses: Some(container_statuses(&resolved.pod, &pod_ref, 0, |_| {
                    ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some("ContainerCreating".into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }
                })),
                ..Default::default()
            };
            let previous = state.pods.insert(
                key.clone(),
                MockPod {
                    pod: pod_ref,
                    spec: kept(&resolved.pod),
                    inputs: self.inputs(resolved),
                    status,
                    timer: None,
                    sandbox: None,
                },
            );
            if let Some(timer) = previous.and_then(|p| p.timer) {
                timer.abort();
            }
        }
        if behaviour.run {
            return self.start_processes(key, resolved).await;
        }
        match behaviour.start_delay {
            Some(delay) => {
                let this = self.clone();
                let timer_key = key.clone();
                let timer = tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    this.start(&timer_key, &behaviour);
                });
                if let Some(entry) = self.lock().pods.get_mut(&key) {
                    entry.timer = Some(timer);
                    self.publish(entry);
                }
            }
            None => self.start(&key, &behaviour),
        }
        Ok(())
    }

    async fn update_pod(&self, resolved: &ResolvedPod) -> Result<()> {
        let pod_ref = PodRef::of(&resolved.pod);
        let mut state = self.lock();
        match state
            .pods
            .get_mut(&(pod_ref.namespace.clone(), pod_ref.name.clone()))
        {
            Some(entry) if entry.pod.uid == pod_ref.uid => {
                entry.spec = kept(&resolved.pod);
                entry.inputs = self.inputs(resolved);
                Ok(())
            }
            _ => Err(ProviderError::not_found(format!("pod {pod_ref}"))),
        }
    }

    async fn delete_pod(&self, pod: &PodRef, _grace_period_seconds: i64) -> Result<()> {
        let mut state = self.lock();
        let key = (pod.namespace.clone(), pod.name.clone());
        let same_pod = |p: &MockPod| p.pod.uid == pod.uid || pod.uid.is_empty();
        if state.pods.get(&key).is_some_and(same_pod)
            && let Some(timer) = state.pods.remove(&key).and_then(|p| p.timer)
        {
            timer.abort();
        }
        state.failures.remove(&pod.uid);
        Ok(())
    }

    async fn pod_status(&self, pod: &PodRef) -> Result<Option<PodStatus>> {
        let state = self.lock();
        Ok(state
            .pods
            .get(&(pod.namespace.clone(), pod.name.clone()))
            .filter(|p| p.pod.uid == pod.uid)
            .map(|p| p.status.clone()))
    }

    async fn list_pods(&self) -> Result<Vec<ProviderPod>> {
        let state = self.lock();
        Ok(state
            .pods
            .values()
            .map(|p| ProviderPod {
                pod: p.pod.clone(),
                status: p.status.clone(),
            })
            .collect())
    }

    fn node_health(&self) -> Option<&dyn NodeHealth> {
        Some(self)
    }

    fn logs(&self) -> Option<&dyn ContainerLogs> {
        Some(self)
    }

    fn exec(&self) -> Option<&dyn ContainerExec> {
        Some(self)
    }

    fn attach(&self) -> Option<&dyn ContainerAttach> {
        Some(self)
    }

    fn port_forward(&self) -> Option<&dyn updraft_provider::PortForward> {
        Some(self)
    }

    fn stats(&self) -> Option<&dyn updraft_provider::ProviderStats> {
        Some(self)
    }

    fn status_updates(&self) -> Option<BoxStream<'static, PodStatusUpdate>> {
        let receiver = lock(&self.updates_rx).take()?;
        Some(tokio_stream::wrappers::UnboundedReceiverStream::new(receiver).boxed())
    }
}

#[async_trait::async_trait]
impl ContainerLogs for MockProvider {
    async fn logs(&self, pod: &PodRef, container: &str, options: LogOptions) -> Result<LogStream> {
        let instance = self.with_sandbox(pod, |s| s.instance(container, options.previous))?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            if let Err(err) = cri_log::read(instance.log, options, tx.clone()).await {
                let _ = tx.send(Err(err)).await;
            }
        });
        Ok(Box::new(tokio_util::io::StreamReader::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[async_trait::async_trait]
impl ContainerExec for MockProvider {
    async fn exec(&self, request: ExecRequest, io: StreamIo) -> Result<ExitStatus> {
        let (dir, env) = self.with_sandbox(&request.pod, |s| {
            let env = s.environment(&request.container).ok_or_else(|| {
                ProviderError::not_found(format!(
                    "container {:?} is not in pod {}",
                    request.container, request.pod
                ))
            })?;
            Ok((s.dir().to_owned(), env.to_vec()))
        })?;
        exec::exec(&dir, &env, &request.command, io).await
    }
}

#[async_trait::async_trait]
impl ContainerAttach for MockProvider {
    async fn attach(&self, pod: &PodRef, container: &str, io: StreamIo) -> Result<ExitStatus> {
        let (instance, stdin_once) = self.with_sandbox(pod, |s| {
            Ok((s.instance(container, false)?, s.stdin_once(container)))
        })?;
        sandbox::attach(instance, stdin_once, io).await
    }
}

#[async_trait::async_trait]
impl NodeHealth for MockProvider {
    async fn check(&self) -> Result<()> {
        match lock(&self.unhealthy).clone() {
            Some(problem) => Err(ProviderError::transient(problem)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: &[(&str, &str)], restart_policy: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "namespace": "ns", "name": "p", "uid": "u1",
                "annotations": annotations.iter().map(|(k, v)| (format!("{ANNOTATION_PREFIX}{k}"), v.to_string())).collect::<HashMap<_, _>>()
            },
            "spec": {"restartPolicy": restart_policy, "containers": [{"name": "c", "image": "busybox"}]}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn a_pod_runs_at_once_with_an_ip() {
        let mock = MockProvider::new(MockConfig::default());
        let p = pod(&[], "Always");
        mock.create_pod(&ResolvedPod::unresolved(p.clone()))
            .await
            .unwrap();
        let status = mock.pod_status(&PodRef::of(&p)).await.unwrap().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.244.0.1"));
        assert!(status.container_statuses.unwrap()[0].ready);
    }

    #[tokio::test]
    async fn malformed_annotations_name_themselves() {
        let mock = MockProvider::new(MockConfig::default());
        let err = mock
            .create_pod(&ResolvedPod::unresolved(pod(
                &[("exit-after-ms", "soon")],
                "Never",
            )))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ProviderError::InvalidInput { message: m, .. } if m.contains("mock.updraft.dev/exit-after-ms")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn transient_failures_stop_after_n_attempts() {
        let mock = MockProvider::new(MockConfig::default());
        let p = ResolvedPod::unresolved(pod(&[("fail-create", "transient:2")], "Always"));
        assert!(mock.create_pod(&p).await.unwrap_err().is_transient());
        assert!(mock.create_pod(&p).await.unwrap_err().is_transient());
        mock.create_pod(&p).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn exits_follow_the_restart_policy() {
        let mock = MockProvider::new(MockConfig::default());
        let mut updates = mock.status_updates().unwrap();
        let never = pod(&[("exit-after-ms", "1000"), ("exit-code", "3")], "Never");
        mock.create_pod(&ResolvedPod::unresolved(never.clone()))
            .await
            .unwrap();
        let failed = loop {
            let update = updates.next().await.unwrap();
            if update.status.phase.as_deref() == Some("Failed") {
                break update.status;
            }
        };
        let terminated = failed.container_statuses.unwrap()[0]
            .state
            .clone()
            .unwrap()
            .terminated
            .unwrap();
        assert_eq!(
            (terminated.exit_code, terminated.reason.as_deref()),
            (3, Some("Error"))
        );
    }
}
