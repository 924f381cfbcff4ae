//! The life of a pod's containers as explicit state machines, one per container, in the model
//! of kube-runtime's watcher: a documented [`State`] and a step function that performs the one
//! wait the state names and returns the next state.
//!
//! ```text
//!            Created ──(recorded instance alive)──────────────────────────┐
//!               │ (none)         (recorded instance gone)                 │
//!               ▼                       │                                 ▼
//!   ┌──────▶ Starting ──(pull/start failed)──▶ StartBackoff ──▶ Starting  PostStart ─▶ Running
//!   │           │ (started)                                                   │   probes ⟲  │
//!   │           └──────────────────────────▶ PostStart ──▶ Running ◀──────────┘             │
//!   │                                                         │ exit     │ delete / unhealthy
//!   │                                                         │          ▼
//!   │                                                         │     PreStop ─▶ Terminating (SIGTERM)
//!   │                                                         │                 │ grace over
//!   │                                                         │                 ▼
//!   │                                                         │              Killed (SIGKILL)
//!   │                                                         ▼                 │
//!   │   CrashLoopBackOff ◀──(restart after delay)── Exited ◀──────────────────────┘
//!   └──────────┘    ▲    (restart at once)──▶ Starting
//!                   └──── (no restart per restartPolicy, or deleted) ──▶ Done
//! ```
//!
//! Any waiting state ends in `Done` when the pod is deleted and in `Detached` (instance left
//! running) when the agent exits. Invariants:
//! - The status is derived: after every step the machine reports [`ContainerView`] computed
//!   from its state and its [`History`]; nothing else writes a container's status.
//! - Backoff as the kubelet does it: the first restart after an exit is immediate, then
//!   `backoff.initial` doubling up to `backoff.max`; a failed start waits at least `initial`;
//!   an instance that ran [`BACKOFF_RESET`] starts the sequence over.
//! - Probes run in worker tasks that only report results; thresholds are counted in
//!   `probes` and acted on by the step.
//!   Liveness and readiness start once the startup probe passed (or there is none).
//! - Termination: preStop, then SIGTERM, then SIGKILL when the grace period (counted from the
//!   start of preStop) is over.
//! - A state holding an instance never outlives it: an instance leaves the machine through
//!   `Instance::release` (ended) or `Instance::detach` (agent exit); probe workers are shut
//!   down before either.
//!
//! The pod runs its init containers one after the other (each to success), then all app
//! containers at once ([`PodLifecycle::run`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container as K8sContainer, LifecycleHandler, Pod, Probe};
use nix::sys::signal::Signal;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use updraft_cell_runtime::{ContainerExit, ExecTarget, ExitReason};

use crate::runtime::{ContainerRuntime, Instance, ProbeKind, ProbeTarget, StartFailure, Started};
use crate::status::{ContainerView, Reported, StatusBoard, Terminated};

mod probes;
mod restart;
#[cfg(test)]
mod tests;

use probes::{Probes, Verdict};
pub use restart::{BACKOFF_RESET, Backoff, RestartPolicy};

/// How the pod is told to end: deleted (`stop`) or the agent exits (`detach`).
#[derive(Debug, Clone, Default)]
pub struct Stops {
    /// The pod is deleted: stop everything.
    pub stop: CancellationToken,
    /// The agent exits: leave everything running.
    pub detach: CancellationToken,
}

/// What a container's machine remembers across its instances.
#[derive(Debug, Default)]
pub struct History {
    /// Instances started after the first.
    restarts: u32,
    /// How the instance before the current one ended (`lastState`).
    last: Option<Terminated>,
    /// `updraft://<instance>` of the latest instance.
    container_id: String,
    /// Image digest of the latest instance.
    image_id: String,
    /// The latest instance passed its startup probe (or has none).
    started: bool,
    /// The last backoff delay; `None` at the start of a sequence.
    backoff: Option<Duration>,
}

/// Why an instance is ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// It exited by itself.
    Exited,
    /// The pod is deleted.
    Deleted,
    /// Its liveness or startup probe failed: restarted per policy as a failure.
    Unhealthy,
}

/// One running instance.
pub struct Run {
    instance: Box<dyn Instance>,
    started_at: k8s_openapi::jiff::Timestamp,
    /// When this agent saw it start (or adopted it): for [`BACKOFF_RESET`].
    since: Instant,
    exec: Option<ExecTarget>,
    env: Vec<(String, String)>,
    /// Readiness as the readiness probe last decided it.
    ready: bool,
}

/// Where one container is. Each variant names what the machine waits for in it.
pub enum State {
    /// Not yet run by this agent: take over the instance an earlier agent recorded, or start.
    Created,
    /// Pull the image and start an instance; the status still `shows` the previous state.
    Starting {
        /// What the status shows meanwhile.
        shows: Reported,
    },
    /// The last start failed: wait until `until`, then start again.
    StartBackoff {
        /// Why (the Waiting reason).
        reason: String,
        /// What failed.
        message: String,
        /// When to try again.
        until: Instant,
    },
    /// The postStart hook of a fresh instance runs.
    PostStart(Run, Probes),
    /// The instance runs: wait for its exit, a probe result, or the pod's end.
    Running(Run, Probes),
    /// Ending the instance: its preStop hook runs, bounded by `deadline`.
    PreStop {
        /// The instance.
        run: Run,
        /// Why it ends.
        why: End,
        /// End of the grace period.
        deadline: Instant,
    },
    /// SIGTERM sent: wait for the exit until `deadline`, then SIGKILL.
    Terminating {
        /// The instance.
        run: Run,
        /// Why it ends.
        why: End,
        /// End of the grace period.
        deadline: Instant,
    },
    /// SIGKILL sent: wait for the exit.
    Killed {
        /// The instance.
        run: Run,
        /// Why it ends.
        why: End,
    },
    /// An instance ended: the restart policy decides what follows.
    Exited {
        /// How it ended.
        ended: Terminated,
        /// How long it ran.
        ran: Duration,
        /// Why it ended.
        why: End,
    },
    /// Waiting out a restart delay.
    CrashLoopBackOff {
        /// The status message (names the delay).
        message: String,
        /// When to start the next instance.
        until: Instant,
    },
    /// Will not run again: no restart per policy, or the pod is deleted.
    Done {
        /// What the status shows.
        shows: Reported,
        /// The last instance succeeded (for init containers: go on).
        succeeded: bool,
    },
    /// The agent exits; a running instance is left to a later agent.
    Detached {
        /// What the status shows.
        shows: Reported,
    },
}

/// What the containers of a pod share.
struct Shared {
    runtime: Arc<dyn ContainerRuntime>,
    board: Arc<StatusBoard>,
    policy: RestartPolicy,
    grace: Duration,
    backoff: Backoff,
    pod_name: String,
    stops: Stops,
}

/// One container's machine: its spec, its history and the pod's shared parts.
pub struct ContainerLifecycle {
    spec: K8sContainer,
    init: bool,
    history: History,
    pod: Arc<Shared>,
}

/// The lifecycles of all containers of a pod.
pub struct PodLifecycle {
    init: Vec<ContainerLifecycle>,
    apps: Vec<ContainerLifecycle>,
    board: Arc<StatusBoard>,
    /// Exists once the init containers succeeded (a later agent does not run them again).
    init_marker: PathBuf,
}

impl PodLifecycle {
    /// The lifecycle of `pod` run by `runtime`, reporting to `board`.
    pub fn new(
        pod: &Pod,
        runtime: Arc<dyn ContainerRuntime>,
        board: Arc<StatusBoard>,
        backoff: Backoff,
        stops: Stops,
        init_marker: PathBuf,
    ) -> Self {
        let spec = pod.spec.as_ref();
        let shared = Arc::new(Shared {
            runtime,
            board: board.clone(),
            policy: RestartPolicy::of(spec.and_then(|s| s.restart_policy.as_deref())),
            grace: Duration::from_secs(
                spec.and_then(|s| s.termination_grace_period_seconds)
                    .unwrap_or(30)
                    .max(0) as u64,
            ),
            backoff,
            pod_name: pod.metadata.name.clone().unwrap_or_default(),
            stops,
        });
        let machine = |c: &K8sContainer, init: bool| ContainerLifecycle {
            spec: c.clone(),
            init,
            history: History::default(),
            pod: shared.clone(),
        };
        Self {
            init: spec
                .and_then(|s| s.init_containers.as_ref())
                .into_iter()
                .flatten()
                .map(|c| machine(c, true))
                .collect(),
            apps: spec
                .into_iter()
                .flat_map(|s| &s.containers)
                .map(|c| machine(c, false))
                .collect(),
            board,
            init_marker,
        }
    }

    /// Runs the init containers in order, each until it succeeded, then the app containers
    /// together; returns when all are done or the pod is deleted or detached.
    pub async fn run(self) {
        let Self {
            init,
            apps,
            board,
            init_marker,
        } = self;
        if init_marker.exists() {
            // An earlier agent ran them: they stay done.
            for c in init {
                let completed = Terminated {
                    exit_code: 0,
                    reason: "Completed".into(),
                    ..Terminated::default()
                };
                c.run(State::Done {
                    shows: Reported::Terminated(completed),
                    succeeded: true,
                })
                .await;
            }
        } else {
            for c in init {
                if !c.run(State::Created).await {
                    // Failed for good (no restart per policy), or the pod is ending.
                    return;
                }
            }
            if let Err(e) = std::fs::write(&init_marker, b"") {
                tracing::warn!(error = %e, "could not record that the init containers are done");
            }
        }
        board.set_initialized();
        let mut apps_running = JoinSet::new();
        for c in apps {
            apps_running.spawn(c.run(State::Created));
        }
        while apps_running.join_next().await.is_some() {}
    }
}

impl ContainerLifecycle {
    /// Steps from `state` until the machine is done or detached, reporting every state;
    /// true when it ended in success.
    async fn run(mut self, mut state: State) -> bool {
        loop {
            self.pod.board.set(&self.spec.name, self.view(&state));
            match state {
                State::Done { succeeded, .. } => return succeeded,
                State::Detached { .. } => return false,
                _ => state = self.step(state).await,
            }
        }
    }

    /// Performs the wait `state` names and returns the state it leads to.
    pub async fn step(&mut self, state: State) -> State {
        match state {
            State::Created => self.created(),
            State::Starting { shows } => self.start(shows).await,
            State::StartBackoff {
                reason,
                message,
                until,
            } => {
                let shows = Reported::Waiting {
                    reason,
                    message: Some(message),
                };
                self.wait_until(until, shows, |shows| State::Starting { shows })
                    .await
            }
            State::PostStart(run, probes) => self.post_start(run, probes).await,
            State::Running(run, probes) => self.running(run, probes).await,
            State::PreStop { run, why, deadline } => {
                if let Some(hook) = self.handler(|l| l.pre_stop.as_ref()) {
                    let hook = self.hook(self.target(&run, ProbeKind::PreStop), &hook);
                    if tokio::time::timeout_at(deadline, hook).await.is_err() {
                        tracing::warn!(container = %self.spec.name, "preStop hook outlived the grace period");
                    }
                }
                run.instance.signal(Signal::SIGTERM);
                State::Terminating { run, why, deadline }
            }
            State::Terminating {
                mut run,
                why,
                deadline,
            } => {
                let exited = tokio::select! {
                    exit = run.instance.wait() => Some(exit),
                    () = tokio::time::sleep_until(deadline) => None,
                };
                match exited {
                    Some(exit) => self.ended(run, exit, why).await,
                    None => {
                        run.instance.signal(Signal::SIGKILL);
                        State::Killed { run, why }
                    }
                }
            }
            State::Killed { mut run, why } => {
                let exit = run.instance.wait().await;
                self.ended(run, exit, why).await
            }
            State::Exited { ended, ran, why } => self.exited(ended, ran, why),
            State::CrashLoopBackOff { message, until } => {
                let shows = Reported::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: Some(message),
                };
                let next = self.wait_until(until, shows, |shows| State::Starting { shows });
                let next = next.await;
                if matches!(next, State::Starting { .. }) {
                    self.history.restarts += 1;
                }
                next
            }
            done @ (State::Done { .. } | State::Detached { .. }) => done,
        }
    }

    /// The status view of `state`.
    pub fn view(&self, state: &State) -> ContainerView {
        let (reported, run) = match state {
            State::Created => (Reported::not_started(self.init), None),
            State::Starting { shows } | State::Done { shows, .. } | State::Detached { shows } => {
                (shows.clone(), None)
            }
            State::StartBackoff {
                reason, message, ..
            } => (
                Reported::Waiting {
                    reason: reason.clone(),
                    message: Some(message.clone()),
                },
                None,
            ),
            State::PostStart(run, _)
            | State::Running(run, _)
            | State::PreStop { run, .. }
            | State::Terminating { run, .. }
            | State::Killed { run, .. } => (
                Reported::Running {
                    started_at: run.started_at,
                },
                Some(run),
            ),
            State::Exited { ended, .. } => (Reported::Terminated(ended.clone()), None),
            State::CrashLoopBackOff { message, .. } => (
                Reported::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: Some(message.clone()),
                },
                None,
            ),
        };
        let h = &self.history;
        ContainerView {
            init: self.init,
            image: self.spec.image.clone().unwrap_or_default(),
            image_id: h.image_id.clone(),
            container_id: h.container_id.clone(),
            state: reported,
            last: h.last.clone(),
            restarts: h.restarts,
            ready: run.is_some_and(|r| r.ready),
            started: h.started,
            exec: run.and_then(|r| r.exec.clone()),
            env: run.map(|r| r.env.clone()).unwrap_or_default(),
            done: matches!(state, State::Done { .. }),
        }
    }

    /// `Created`: adopt what an earlier agent recorded, or start.
    fn created(&mut self) -> State {
        let Some(record) = self.pod.runtime.recorded(&self.spec) else {
            return State::Starting {
                shows: Reported::not_started(self.init),
            };
        };
        self.history.restarts = record.restarts;
        self.history.last = record.last.clone();
        self.history.container_id = record.container_id.clone();
        self.history.image_id = record.image_id.clone();
        if let Some(started) = self.pod.runtime.adopt(&self.spec, &record) {
            return self.started(started, true);
        }
        // Ended while no agent watched it: report it and let the policy decide.
        self.history.last = Some(Terminated {
            exit_code: 137,
            reason: "ContainerStatusUnknown".into(),
            message: Some("the container could not be found again after an agent restart".into()),
            started_at: Some(record.started_at),
            finished_at: Some(crate::now()),
        });
        self.history.restarts += 1;
        self.start_failed(StartFailure {
            reason: "ContainerStatusUnknown".into(),
            message: "lost across an agent restart; starting it again".into(),
        })
    }

    /// `Starting`: pull, then start (unless the pod ended meanwhile).
    async fn start(&mut self, shows: Reported) -> State {
        if let Some(end) = self.pod_ended(&shows) {
            return end;
        }
        let runtime = self.pod.runtime.clone();
        let image = match runtime.pull(&self.spec, self.history.restarts).await {
            Ok(image) => image,
            Err(failure) => return self.start_failed(failure),
        };
        // A pull can take long; a pod deleted meanwhile starts nothing.
        if let Some(end) = self.pod_ended(&shows) {
            return end;
        }
        let h = &self.history;
        match runtime.start(&self.spec, image, h.restarts, h.last.as_ref()) {
            Ok(started) => self.started(started, false),
            Err(failure) => self.start_failed(failure),
        }
    }

    /// `Done` or `Detached` when the pod is deleted or the agent exits.
    fn pod_ended(&self, shows: &Reported) -> Option<State> {
        if self.pod.stops.stop.is_cancelled() {
            return Some(State::Done {
                shows: shows.clone(),
                succeeded: false,
            });
        }
        self.pod
            .stops
            .detach
            .is_cancelled()
            .then(|| State::Detached {
                shows: shows.clone(),
            })
    }

    /// Waits until `until` (then `next`), or until the pod ends.
    async fn wait_until(
        &self,
        until: Instant,
        shows: Reported,
        next: impl FnOnce(Reported) -> State,
    ) -> State {
        tokio::select! {
            () = tokio::time::sleep_until(until) => next(shows),
            () = self.pod.stops.stop.cancelled() => State::Done { shows, succeeded: false },
            () = self.pod.stops.detach.cancelled() => State::Detached { shows },
        }
    }

    /// A failed start: wait (the kubelet shows a repeated pull failure as ImagePullBackOff).
    fn start_failed(&mut self, failure: StartFailure) -> State {
        let StartFailure {
            mut reason,
            message,
        } = failure;
        if reason == "ErrImagePull" && self.history.backoff.is_some() {
            reason = "ImagePullBackOff".into();
        }
        let backoff = self.pod.backoff;
        let delay = backoff.next(&mut self.history.backoff, backoff.initial);
        State::StartBackoff {
            reason,
            message,
            until: Instant::now() + delay,
        }
    }

    /// A started or adopted instance: its probes begin; a fresh one runs its postStart hook.
    fn started(&mut self, started: Started, adopted: bool) -> State {
        self.history.container_id = started.container_id;
        self.history.image_id = started.image_id;
        // An adopted instance was reported started by the agent that ran it.
        self.history.started = adopted || self.spec.startup_probe.is_none();
        let mut run = Run {
            instance: started.instance,
            started_at: started.started_at,
            since: Instant::now(),
            exec: started.exec,
            env: started.env,
            ready: false,
        };
        let target = self.target(&run, ProbeKind::Startup);
        let mut probes = Probes::new(self.pod.runtime.clone(), &self.spec, target);
        if !self.init && probes.begin(self.history.started) {
            run.ready = true;
        }
        match self.handler(|l| l.post_start.as_ref()) {
            Some(_) if !adopted => State::PostStart(run, probes),
            _ => State::Running(run, probes),
        }
    }

    /// `PostStart`: the hook, unless the pod ends first.
    async fn post_start(&mut self, run: Run, probes: Probes) -> State {
        let Some(hook) = self.handler(|l| l.post_start.as_ref()) else {
            return State::Running(run, probes);
        };
        enum Event {
            Done,
            Delete,
            Detach,
        }
        let target = self.target(&run, ProbeKind::PostStart);
        let stops = &self.pod.stops;
        let event = tokio::select! {
            () = self.hook(target, &hook) => Event::Done,
            () = stops.stop.cancelled() => Event::Delete,
            () = stops.detach.cancelled() => Event::Detach,
        };
        match event {
            Event::Done => State::Running(run, probes),
            Event::Delete => self.leave(run, probes, Some(End::Deleted)).await,
            Event::Detach => self.leave(run, probes, None).await,
        }
    }

    /// Leaves a state with probes: the workers go, then the instance is ended for `why` or,
    /// without a reason (the agent exits), detached.
    async fn leave(&self, run: Run, probes: Probes, why: Option<End>) -> State {
        probes.shutdown().await;
        match why {
            Some(why) => self.ending(run, why),
            None => Self::detached(run),
        }
    }

    /// `Running`: one event (exit, probe result, delete, agent exit).
    async fn running(&mut self, mut run: Run, mut probes: Probes) -> State {
        enum Event {
            Exit(Option<ContainerExit>),
            Probe(ProbeKind, bool),
            Delete,
            Detach,
        }
        let stops = &self.pod.stops;
        let event = tokio::select! {
            exit = run.instance.wait() => Event::Exit(exit),
            Some((kind, ok)) = probes.next() => Event::Probe(kind, ok),
            () = stops.stop.cancelled() => Event::Delete,
            () = stops.detach.cancelled() => Event::Detach,
        };
        match event {
            Event::Probe(kind, ok) => match probes.count(kind, ok) {
                Verdict::Nothing => State::Running(run, probes),
                Verdict::Started { ready } => {
                    self.history.started = true;
                    run.ready |= ready;
                    State::Running(run, probes)
                }
                Verdict::Ready(ready) => {
                    run.ready = ready;
                    State::Running(run, probes)
                }
                Verdict::Unhealthy => self.leave(run, probes, Some(End::Unhealthy)).await,
            },
            Event::Exit(exit) => {
                probes.shutdown().await;
                self.ended(run, exit, End::Exited).await
            }
            Event::Delete => self.leave(run, probes, Some(End::Deleted)).await,
            Event::Detach => self.leave(run, probes, None).await,
        }
    }

    /// Begins ending `run`: the grace period starts now.
    fn ending(&self, run: Run, why: End) -> State {
        State::PreStop {
            run,
            why,
            deadline: Instant::now() + self.pod.grace,
        }
    }

    /// Leaves `run` to a later agent.
    fn detached(run: Run) -> State {
        let shows = Reported::Running {
            started_at: run.started_at,
        };
        run.instance.detach();
        State::Detached { shows }
    }

    /// The instance exited (`exit` unknown: `None`): release it and record how it ended.
    async fn ended(&mut self, run: Run, exit: Option<ContainerExit>, why: End) -> State {
        let (exit_code, reason) = match exit {
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
        let ran = run.since.elapsed();
        let started_at = run.started_at;
        let mut message = run.instance.release(exit_code).await;
        if reason == "ContainerStatusUnknown" && message.is_none() {
            message = Some(
                "the container ended while the agent was restarting; its exit status is unknown"
                    .into(),
            );
        }
        State::Exited {
            ended: Terminated {
                exit_code,
                reason: reason.into(),
                message,
                started_at: Some(started_at),
                finished_at: Some(crate::now()),
            },
            ran,
            why,
        }
    }

    /// `Exited`: done, restart at once, or restart after a delay.
    fn exited(&mut self, ended: Terminated, ran: Duration, why: End) -> State {
        let failed = ended.exit_code != 0 || why == End::Unhealthy;
        let restart = self.pod.policy.restarts(self.init, failed);
        if self.pod.stops.stop.is_cancelled() || !restart {
            return State::Done {
                succeeded: !failed && !self.pod.stops.stop.is_cancelled(),
                shows: Reported::Terminated(ended),
            };
        }
        if ran >= BACKOFF_RESET {
            self.history.backoff = None;
        }
        let delay = self
            .pod
            .backoff
            .next(&mut self.history.backoff, Duration::ZERO);
        self.history.last = Some(ended.clone());
        if delay.is_zero() {
            self.history.restarts += 1;
            return State::Starting {
                shows: Reported::Terminated(ended),
            };
        }
        State::CrashLoopBackOff {
            message: format!(
                "back-off {}s restarting failed container={} pod={}",
                delay.as_secs(),
                self.spec.name,
                self.pod.pod_name
            ),
            until: Instant::now() + delay,
        }
    }

    /// A lifecycle handler of the spec.
    fn handler(
        &self,
        pick: impl FnOnce(&k8s_openapi::api::core::v1::Lifecycle) -> Option<&LifecycleHandler>,
    ) -> Option<LifecycleHandler> {
        self.spec.lifecycle.as_ref().and_then(pick).cloned()
    }

    /// Runs a lifecycle hook (exec, httpGet or tcpSocket, like a probe) in `run`.
    async fn hook(&self, target: ProbeTarget, h: &LifecycleHandler) {
        let probe = Probe {
            exec: h.exec.clone(),
            http_get: h.http_get.clone(),
            tcp_socket: h.tcp_socket.clone(),
            timeout_seconds: Some(self.pod.grace.as_secs().max(1) as i32),
            ..Default::default()
        };
        if !self.pod.runtime.probe(&target, &probe).await {
            tracing::warn!(container = %self.spec.name, hook = ?target.kind, "lifecycle hook failed");
        }
    }

    /// Where probes and hooks of `run` go.
    fn target(&self, run: &Run, kind: ProbeKind) -> ProbeTarget {
        ProbeTarget {
            container: self.spec.name.clone(),
            kind,
            exec: run.exec.clone(),
            env: run.env.clone(),
            ports: self
                .spec
                .ports
                .iter()
                .flatten()
                .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.container_port).ok()?)))
                .collect(),
        }
    }
}
