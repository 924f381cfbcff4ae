//! One supervisor task per pod, driving the pod's [`State`] one [`Supervisor::step`] at a
//! time (the shape of kube-runtime's watcher): the supervisor is the only one that starts,
//! replaces, retires or gives up the pod's cells, so there is never a second live cell for a
//! pod, and the node's calls, the garbage collector and the standby pool reach the pod only
//! through its [`TrackedPod`] (commands, the `deleting` token, the published record).
//!
//! # States and transitions
//!
//! | from | on | to |
//! |---|---|---|
//! | `Unstarted` (new pod) | the node's create | `Starting` (answering the create) |
//! | `Starting` | a cell: one the backend lists for the pod, else an idle standby cell, else a new one | `Booting` (the create returns now) |
//! | `Starting` for a create | a transient error (the attempt counts) / any other error | `Unstarted` (the node retries) / untracked, task ends |
//! | `Starting` for a replacement | a transient error / any other error | `Backoff` → `Starting` / `Failed` ("no replacement cell") |
//! | `Booting` | the agent answers a ping | `Delivering` (the node asked for the pod) or `Watching` (adopted, not asked for yet) |
//! | `Booting` | the boot deadline passes; a cell without an address ends | `BootFailed` |
//! | `Booting` (adopted) | the backend says the cell ended or is gone; it is stopped and silent for `healthTimeout` | `Lost` |
//! | `Delivering` | the agent takes the pod | `Watching` |
//! | `Delivering` | the agent refuses or does not answer / the backend says the cell ended | `Backoff` → `Booting` (same deadline) / `BootFailed` |
//! | `Watching` | a status (published when it changed) | `Watching` (the next long-poll) |
//! | `Watching` | the backend says the cell ended or is gone; no answer for `healthTimeout` | `Lost` |
//! | `Watching` (not delivered) | the node's create or update | `Delivering` |
//! | `BootFailed` | the node asked for the pod / not | cell terminated, Pending `CellBootTimeout` or `CellLost`, `Backoff` → `Starting` (a new attempt) / as `Lost` |
//! | `Lost` | the node asked for the pod and its `restartPolicy` is not `Never` | cell terminated, Pending `CellLost`, `Starting` (a new attempt) |
//! | `Lost` | `restartPolicy: Never`, or adopted and never asked for (its inputs are unknown) | cell terminated, `Failed` (its controller replaces it) |
//! | `Watching` and any state with that cell | the garbage collector retires it (finished for `finishedPodRetention`) | cell terminated, `Retired` |
//! | `Unstarted`, `Failed`, `Retired`, `Backoff` before a start | the node's create | `Starting` |
//! | every state but `Starting` | `deleting` or shutdown | the task ends |
//!
//! `Starting` lets its backend call finish (a start cut off could leave a cell no listing
//! shows yet); the deletion or shutdown is seen at the next wait. Deleting is not a state: the
//! node's delete cancels `deleting`, waits for the task to end ([`TrackedPod::stopped`]), then
//! stops the pod on the agent and terminates every cell of the pod (`deletion`). On shutdown
//! the cells keep running: the next run adopts them (`gc`), in `Booting` with the cell's own
//! boot deadline (counted from its launch, so a restart does not extend it).
//!
//! The node's update is delivered at once while `Watching` (its answer is the agent's); in a
//! state that delivers later it is only recorded (the delivery takes the latest inputs), and
//! without a cell it is refused as transient.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use updraft_cell_api::services::ServiceRoutes;
use updraft_cells_backend::{BackendError, CellId, CellState};
use updraft_provider::{PodRef, ProviderError, ResolvedPod};

use crate::apply_request::apply_request;
use crate::cells::CellView;
use crate::errors::client_error;
use crate::pod_status::{
    REASON_CELL_BOOT_TIMEOUT, REASON_CELL_LOST, lost_status, running_status, starting_status,
};
use crate::pods::{Command, PodRecord, Stage, TrackedPod};
use crate::shared::Shared;

/// The first pause after a failed attempt; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest pause between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Why waiting for a cell's agent ended without an answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BootError {
    /// The agent did not answer by the cell's boot deadline.
    #[error(
        "the agent on cell {cell} did not answer within the boot timeout (bootTimeout: {timeout:?}): {last_error}. Check that the cell's image starts the agent (updraft-cell) and that Updraft reaches it on port {port}; if the cells only boot slowly, raise bootTimeout in the provider config"
    )]
    TimedOut {
        /// The cell.
        cell: CellId,
        /// The configured `bootTimeout`.
        timeout: Duration,
        /// The agent's port.
        port: u16,
        /// The last answer of the backend or the agent.
        last_error: String,
    },
    /// The cell ended before its agent took the pod.
    #[error("{0}")]
    Ended(String),
}

impl BootError {
    /// The pod status reason of a failed boot.
    fn reason(&self) -> &'static str {
        match self {
            BootError::TimedOut { .. } => REASON_CELL_BOOT_TIMEOUT,
            BootError::Ended(_) => REASON_CELL_LOST,
        }
    }
}

/// Where the create that asked for a start waits for its answer.
type Reply = oneshot::Sender<Result<(), ProviderError>>;

/// A pod's state (the module doc has every transition).
enum State {
    /// No cell; waits for the node's create.
    Unstarted,
    /// Getting a cell. `reply`: the create that asked (none for a replacement); `replacing`:
    /// the cell being replaced, never taken again from a lagging listing.
    Starting {
        reply: Option<Reply>,
        replacing: Option<CellId>,
    },
    /// Waiting for the cell's agent.
    Booting(Boot),
    /// Handing the pod to the agent; `deadline`: the boot deadline, kept when it is retried.
    Delivering { cell: CellView, deadline: Instant },
    /// Following the agent's status.
    Watching(Watch),
    /// The cell never took the pod: replaced by a new attempt.
    BootFailed { cell: CellView, error: BootError },
    /// The cell of a pod was lost: replaced, or the pod fails.
    Lost {
        cell: CellView,
        reason: &'static str,
        why: String,
    },
    /// Waiting before `next`.
    Backoff { until: Instant, next: Box<State> },
    /// The pod failed for good; waits for its deletion (or a create).
    Failed,
    /// The pod finished and its cell is terminated; waits for its deletion.
    Retired,
}

/// The booting state.
struct Boot {
    cell: CellView,
    deadline: Instant,
    /// Found in the backend's listing at start-up: it may have stopped or ended meanwhile, so
    /// the backend is asked after every unanswered ping (a cell this run started is asked only
    /// until it has an address).
    adopted: bool,
    /// When the wait began.
    since: Instant,
    /// The last answer of the backend or the agent, for the timeout's message.
    last_error: String,
    /// Whether the log said this adopted cell is still awaited past `healthTimeout`.
    said_waiting: bool,
}

impl Boot {
    fn new(
        cell: CellView,
        deadline: Instant,
        adopted: bool,
        last_error: impl Into<String>,
    ) -> Self {
        Self {
            cell,
            deadline,
            adopted,
            since: Instant::now(),
            last_error: last_error.into(),
            said_waiting: false,
        }
    }
}

/// The watching state.
struct Watch {
    cell: CellView,
    /// The status version last seen (the long-poll answers past it).
    after: Option<u64>,
    /// When the agent last answered.
    last_ok: Instant,
    /// Whether this cell's agent has been given the pod by this run.
    delivered: bool,
    /// The version of the Service routes the agent last said it applied (0: none).
    services_version: u64,
}

impl Watch {
    fn new(cell: CellView, delivered: bool) -> Self {
        Self {
            cell,
            after: None,
            last_ok: Instant::now(),
            delivered,
            services_version: 0,
        }
    }
}

impl State {
    fn cell(&self) -> Option<&CellView> {
        match self {
            State::Booting(boot) => Some(&boot.cell),
            State::Watching(watch) => Some(&watch.cell),
            State::Delivering { cell, .. }
            | State::BootFailed { cell, .. }
            | State::Lost { cell, .. } => Some(cell),
            State::Backoff { next, .. } => next.cell(),
            State::Unstarted | State::Starting { .. } | State::Failed | State::Retired => None,
        }
    }

    fn stage(&self) -> Stage {
        match self {
            State::Unstarted => Stage::Unstarted,
            State::Starting { .. } => Stage::Starting,
            State::Booting(_) => Stage::Booting,
            State::BootFailed { .. } | State::Lost { .. } => Stage::Lost,
            State::Delivering { .. } => Stage::Delivering,
            State::Watching(_) => Stage::Watching,
            State::Backoff { .. } => Stage::Backoff,
            State::Failed => Stage::Failed,
            State::Retired => Stage::Retired,
        }
    }
}

/// What ended a wait.
enum Wake<T> {
    Done(T),
    Command(Command),
    Stop,
}

/// Tracks pod `pod` for the node's create (its supervisor waits in `Unstarted`), or returns
/// the pod tracked already.
pub(crate) fn track_for_node(shared: &Arc<Shared>, pod: PodRef) -> Arc<TrackedPod> {
    track(shared, pod, None).0
}

/// Tracks the pod of a cell found in the backend's listing (its supervisor starts `Booting`
/// with the cell's own boot deadline); `None` when the pod is tracked already.
pub(crate) fn adopt(shared: &Arc<Shared>, pod: PodRef, cell: CellView) -> Option<Arc<TrackedPod>> {
    let (tracked, new) = track(shared, pod, Some(cell));
    new.then_some(tracked)
}

fn track(shared: &Arc<Shared>, pod: PodRef, adopted: Option<CellView>) -> (Arc<TrackedPod>, bool) {
    let uid = pod.uid.clone();
    let mut made = None;
    let (tracked, new) = shared.track(&uid, || {
        let now = Instant::now();
        let (state, stage, record, adopted_at) = match adopted {
            Some(cell) => {
                let deadline = shared.cells.adopted_boot_deadline(&cell);
                let boot = Boot::new(cell.clone(), deadline, true, "no answer yet");
                let record = PodRecord {
                    cell: Some(cell),
                    ..PodRecord::default()
                };
                (State::Booting(boot), Stage::Booting, record, Some(now))
            }
            None => (
                State::Unstarted,
                Stage::Unstarted,
                PodRecord::default(),
                None,
            ),
        };
        let (tracked, commands) = TrackedPod::new(pod, adopted_at, record, stage);
        let tracked = Arc::new(tracked);
        made = Some((state, commands));
        tracked
    });
    if let Some((state, commands)) = made.filter(|_| new) {
        let supervisor = Supervisor {
            shared: shared.clone(),
            tracked: tracked.clone(),
            commands,
            routes: shared.routes.subscribe(),
            attempt: 0,
            delay: FIRST_BACKOFF,
        };
        tokio::spawn(supervisor.run(state));
    }
    (tracked, new)
}

/// The task that drives one pod.
struct Supervisor {
    shared: Arc<Shared>,
    tracked: Arc<TrackedPod>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// The node's Service routes: the latest table goes to the cell whenever its agent
    /// reports another version.
    routes: watch::Receiver<Arc<ServiceRoutes>>,
    /// Start attempts: part of the idempotency token, so a replacement is a new start.
    attempt: u32,
    /// The next pause after a failure.
    delay: Duration,
}

impl Supervisor {
    async fn run(mut self, mut state: State) {
        // Also when the task panics: a delete waiting for it goes on.
        let _stopped = self.tracked.stopped.clone().drop_guard();
        loop {
            self.publish(&state);
            match self.step(state).await {
                Some(next) => state = next,
                None => break,
            }
        }
        self.tracked.set_stage(Stage::Stopped);
    }

    /// Makes `state`'s cell and stage the pod's record, the one place they are written.
    fn publish(&self, state: &State) {
        let cell = state.cell().cloned();
        let changed = {
            let mut record = self.tracked.record();
            let changed = record.cell.as_ref().map(|c| &c.id) != cell.as_ref().map(|c| &c.id);
            record.cell = cell;
            changed
        };
        self.tracked.set_stage(state.stage());
        if changed {
            self.shared.refresh_metrics();
        }
    }

    /// One transition; `None` ends the task.
    async fn step(&mut self, state: State) -> Option<State> {
        match state {
            State::Unstarted | State::Failed | State::Retired => {
                match self.wait(std::future::pending::<()>()).await {
                    Wake::Command(command) => Some(self.on_command(state, command).await),
                    Wake::Done(()) | Wake::Stop => None,
                }
            }
            State::Starting { reply, replacing } => self.start(reply, replacing).await,
            State::Booting(boot) => self.boot(boot).await,
            State::Delivering { cell, deadline } => self.deliver(cell, deadline).await,
            State::Watching(watch) => self.watch(watch).await,
            State::BootFailed { cell, error } => self.boot_failed(cell, error).await,
            State::Lost { cell, reason, why } => self.lost(cell, reason, why).await,
            State::Backoff { until, next } => {
                match self.wait(tokio::time::sleep_until(until)).await {
                    Wake::Done(()) => Some(*next),
                    Wake::Command(command) => Some(
                        self.on_command(State::Backoff { until, next }, command)
                            .await,
                    ),
                    Wake::Stop => None,
                }
            }
        }
    }

    /// Waits for `work`, a command, or the pod's deletion or shutdown, whichever comes first.
    async fn wait<T>(&mut self, work: impl Future<Output = T>) -> Wake<T> {
        tokio::select! {
            biased;
            () = self.tracked.deleting.cancelled() => Wake::Stop,
            () = self.shared.shutdown.cancelled() => Wake::Stop,
            Some(command) = self.commands.recv() => Wake::Command(command),
            done = work => Wake::Done(done),
        }
    }

    fn stopping(&self) -> bool {
        self.tracked.deleting.is_cancelled() || self.shared.shutdown.is_cancelled()
    }

    fn resolved(&self) -> Option<ResolvedPod> {
        self.tracked.record().resolved.clone()
    }

    /// `next` after the current pause; the next pause is twice as long.
    fn backoff(&mut self, next: State) -> State {
        let delay = self.delay;
        self.delay = (delay * 2).min(MAX_BACKOFF);
        State::Backoff {
            until: Instant::now() + delay,
            next: Box::new(next),
        }
    }

    async fn on_command(&mut self, state: State, command: Command) -> State {
        match command {
            Command::Create(reply) => match state {
                State::Unstarted | State::Failed | State::Retired => State::Starting {
                    reply: Some(reply),
                    replacing: None,
                },
                State::Backoff { next, .. } if matches!(*next, State::Starting { .. }) => {
                    let replacing = match *next {
                        State::Starting { replacing, .. } => replacing,
                        _ => None,
                    };
                    State::Starting {
                        reply: Some(reply),
                        replacing,
                    }
                }
                State::Watching(watch) if !watch.delivered => {
                    let _ = reply.send(Ok(()));
                    self.deliver_next(watch.cell)
                }
                state => {
                    let _ = reply.send(Ok(()));
                    state
                }
            },
            Command::Update(reply) => match state {
                State::Watching(watch) if watch.delivered => {
                    let _ = reply.send(self.apply(&watch.cell).await);
                    State::Watching(watch)
                }
                State::Watching(watch) => {
                    let _ = reply.send(Ok(()));
                    self.deliver_next(watch.cell)
                }
                state if state.cell().is_some() => {
                    // Delivered with the pod.
                    let _ = reply.send(Ok(()));
                    state
                }
                state => {
                    let _ = reply.send(Err(ProviderError::transient(format!(
                        "pod {}: its cell is not reachable yet",
                        self.tracked.pod
                    ))));
                    state
                }
            },
            Command::Retire(id, reply) => {
                let next = match state.cell() {
                    Some(cell) if cell.id == id => {
                        tracing::info!(pod = %self.tracked.pod, cell = %id, "the pod finished: terminating its cell");
                        if let Err(e) = self.shared.cells.terminate(&id).await {
                            tracing::warn!(cell = %id, "{e}");
                        }
                        State::Retired
                    }
                    _ => state,
                };
                let _ = reply.send(());
                next
            }
        }
    }

    /// `Delivering` to `cell`, within the deadline a new wait would have.
    fn deliver_next(&self, cell: CellView) -> State {
        State::Delivering {
            deadline: self.shared.cells.boot_deadline(&cell),
            cell,
        }
    }

    /// The pod's latest inputs to the agent of `cell` now (the node's update).
    async fn apply(&self, cell: &CellView) -> Result<(), ProviderError> {
        let (Some(resolved), Some(agent)) = (self.resolved(), self.shared.cells.agent(cell)) else {
            return Err(ProviderError::transient(format!(
                "pod {}: its cell is not reachable yet",
                self.tracked.pod
            )));
        };
        let request = apply_request(
            &resolved,
            cell.interface.clone(),
            self.shared.cells.settings.pod_network.as_ref(),
        );
        agent
            .apply_pod(&request)
            .await
            .map_err(|e| client_error("updating the pod on its cell", e))
    }

    async fn start(&mut self, reply: Option<Reply>, replacing: Option<CellId>) -> Option<State> {
        if self.stopping() {
            if let Some(reply) = reply {
                let _ = reply.send(Err(ProviderError::transient(format!(
                    "pod {} is being deleted",
                    self.tracked.pod
                ))));
            }
            return None;
        }
        match self.get_cell(replacing.as_ref()).await {
            Ok((cell, listed)) => {
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(()));
                }
                self.delay = FIRST_BACKOFF;
                let deadline = self.shared.cells.boot_deadline(&cell);
                Some(State::Booting(Boot::new(
                    cell,
                    deadline,
                    listed,
                    "no answer yet",
                )))
            }
            Err(error) => match reply {
                Some(reply) if error.is_transient() => {
                    let _ = reply.send(Err(error));
                    Some(State::Unstarted)
                }
                Some(reply) => {
                    // Nothing was started (the type could not be chosen, the bootstrap is
                    // invalid): forget the pod, so that it is not listed as running.
                    self.shared.forget(&self.tracked);
                    let _ = reply.send(Err(error));
                    None
                }
                None if error.is_transient() => {
                    tracing::warn!(pod = %self.tracked.pod, "starting a replacement cell: {error}; retrying in {}s", self.delay.as_secs());
                    Some(self.backoff(State::Starting {
                        reply: None,
                        replacing,
                    }))
                }
                None => {
                    let last = self.tracked.record().status.clone();
                    self.shared.set_status(
                        &self.tracked,
                        lost_status(
                            last.as_ref(),
                            true,
                            REASON_CELL_LOST,
                            format!("no replacement cell: {error}"),
                        ),
                    );
                    Some(State::Failed)
                }
            },
        }
    }

    /// A cell for the pod: one the backend lists for it (`true`: from an earlier run), an
    /// idle standby cell, or a new one.
    async fn get_cell(
        &mut self,
        replacing: Option<&CellId>,
    ) -> Result<(CellView, bool), ProviderError> {
        let Some(resolved) = self.resolved() else {
            return Err(ProviderError::transient(format!(
                "pod {}: the node has not asked for it",
                self.tracked.pod
            )));
        };
        let cells = &self.shared.cells;
        // The standby pool's refill waits while pods ask for cells.
        self.shared.standby.demand();
        let listed = cells.listed_for(&self.tracked.pod.uid).await?;
        if let Some(cell) = listed.iter().find(|c| Some(&c.id) != replacing) {
            return Ok((cells.view(cell, None), true));
        }
        let view = match self.shared.standby.take(cells, &resolved).await {
            Some(view) => view,
            None => match cells.start(&resolved, self.attempt).await {
                Ok(view) => view,
                Err(e) => {
                    if e.is_transient() {
                        self.attempt += 1;
                    }
                    return Err(e);
                }
            },
        };
        self.shared
            .set_status(&self.tracked, starting_status(&view.summary));
        Ok((view, false))
    }

    async fn boot(&mut self, mut boot: Boot) -> Option<State> {
        let shared = self.shared.clone();
        let cells = &shared.cells;
        if boot.cell.agent_address.is_none() {
            match cells.backend.describe(&boot.cell.id).await {
                Ok(cell) if cell.state.is_ending() => {
                    let error = BootError::Ended(format!(
                        "cell {} ended while booting ({})",
                        boot.cell.id, cell.state
                    ));
                    return Some(State::BootFailed {
                        cell: boot.cell,
                        error,
                    });
                }
                Ok(cell) if cell.management_ip.is_some() => {
                    boot.cell = cells.refreshed(&boot.cell, &cell);
                    self.publish_cell(&boot.cell);
                }
                Ok(cell) => {
                    boot.last_error = format!("the cell is {} without an address", cell.state)
                }
                Err(e) => boot.last_error = e.to_string(),
            }
        }
        if let Some(agent) = cells.agent(&boot.cell) {
            match self.wait(agent.ping()).await {
                Wake::Done(Ok(())) => {
                    tracing::debug!(pod = %self.tracked.pod, cell = %boot.cell.id, "the cell's agent answers");
                    return Some(if self.tracked.claimed() {
                        State::Delivering {
                            cell: boot.cell,
                            deadline: boot.deadline,
                        }
                    } else {
                        State::Watching(Watch::new(boot.cell, false))
                    });
                }
                Wake::Done(Err(e)) => boot.last_error = e.to_string(),
                Wake::Command(command) => {
                    return Some(self.on_command(State::Booting(boot), command).await);
                }
                Wake::Stop => return None,
            }
            if boot.adopted {
                let silent = boot.since.elapsed();
                match cells.backend.describe(&boot.cell.id).await {
                    Ok(cell) if cell.state.is_ending() => {
                        return Some(State::Lost {
                            cell: boot.cell,
                            reason: REASON_CELL_LOST,
                            why: format!("the backend reports it {}", cell.state),
                        });
                    }
                    Err(BackendError::NotFound { .. }) => {
                        return Some(State::Lost {
                            cell: boot.cell,
                            reason: REASON_CELL_LOST,
                            why: "the backend no longer knows it".to_owned(),
                        });
                    }
                    // A stopped cell is not booting: its agent process is gone.
                    Ok(cell)
                        if matches!(cell.state, CellState::Stopped | CellState::Stopping)
                            && silent >= cells.settings.health_timeout =>
                    {
                        return Some(State::Lost {
                            cell: boot.cell,
                            reason: REASON_CELL_LOST,
                            why: format!("its agent did not answer for {}s", silent.as_secs()),
                        });
                    }
                    // Still booting past `healthTimeout`: a booting cell is judged by its
                    // boot deadline, not by its silence.
                    _ if silent >= cells.settings.health_timeout && !boot.said_waiting => {
                        boot.said_waiting = true;
                        tracing::debug!(
                            pod = %self.tracked.pod,
                            cell = %boot.cell.id,
                            silent_for = silent.as_secs(),
                            "the cell's agent has not answered yet: waiting for it to boot"
                        );
                    }
                    _ => {}
                }
            }
        }
        if Instant::now() >= boot.deadline {
            let error = BootError::TimedOut {
                cell: boot.cell.id.clone(),
                timeout: cells.settings.boot_timeout,
                port: cells.settings.agent.port,
                last_error: boot.last_error,
            };
            return Some(State::BootFailed {
                cell: boot.cell,
                error,
            });
        }
        let pause = cells.settings.retry_interval.min(Duration::from_secs(1));
        match self.wait(tokio::time::sleep(pause)).await {
            Wake::Done(()) => Some(State::Booting(boot)),
            Wake::Command(command) => Some(self.on_command(State::Booting(boot), command).await),
            Wake::Stop => None,
        }
    }

    /// Records what a wait learnt of the cell (its address) before the step ends.
    fn publish_cell(&self, cell: &CellView) {
        let mut record = self.tracked.record();
        if record.cell.as_ref().map(|c| &c.id) == Some(&cell.id) {
            record.cell = Some(cell.clone());
        }
    }

    async fn deliver(&mut self, cell: CellView, deadline: Instant) -> Option<State> {
        let shared = self.shared.clone();
        let cells = &shared.cells;
        let (Some(resolved), Some(agent)) = (self.resolved(), cells.agent(&cell)) else {
            return Some(State::Watching(Watch::new(cell, false)));
        };
        let request = apply_request(
            &resolved,
            cell.interface.clone(),
            cells.settings.pod_network.as_ref(),
        );
        // The routes first: the agent installs them as it creates the pod's network, so the
        // containers start with the cluster's Services reachable.
        let routes = self.routes.borrow().clone();
        let mut services_version = 0;
        if routes.version != 0 {
            match self.wait(agent.put_services(&routes)).await {
                Wake::Done(Ok(status)) => {
                    services_version = status.applied_version;
                    log_route_problems(&self.tracked.pod, &status.problems);
                }
                // The watch sends them again.
                Wake::Done(Err(error)) => {
                    tracing::debug!(pod = %self.tracked.pod, cell = %cell.id, "service routes before the pod: {error}");
                }
                Wake::Command(command) => {
                    return Some(
                        self.on_command(State::Delivering { cell, deadline }, command)
                            .await,
                    );
                }
                Wake::Stop => return None,
            }
        }
        let error = match self.wait(agent.apply_pod(&request)).await {
            Wake::Done(Ok(())) => {
                tracing::debug!(pod = %self.tracked.pod, cell = %cell.id, "delivered the pod to its cell");
                self.shared.standby.demand();
                self.tracked.record().applied = true;
                self.delay = FIRST_BACKOFF;
                let mut watch = Watch::new(cell, true);
                watch.services_version = services_version;
                return Some(State::Watching(watch));
            }
            Wake::Done(Err(e)) => {
                client_error(&format!("delivering the pod to cell {}", cell.id), e)
            }
            Wake::Command(command) => {
                return Some(
                    self.on_command(State::Delivering { cell, deadline }, command)
                        .await,
                );
            }
            Wake::Stop => return None,
        };
        // A cell that ended meanwhile is not waited for until its boot deadline.
        let ended = match cells.backend.describe(&cell.id).await {
            Ok(described) if described.state.is_ending() => Some(described.state.to_string()),
            Err(BackendError::NotFound { .. }) => Some("unknown to the backend".to_owned()),
            _ => None,
        };
        if let Some(how) = ended {
            let error = BootError::Ended(format!(
                "cell {} ended before its agent took the pod ({how})",
                cell.id
            ));
            return Some(State::BootFailed { cell, error });
        }
        tracing::warn!(pod = %self.tracked.pod, "starting the pod on a cell: {error}; retrying in {}s", self.delay.as_secs());
        let boot = Boot::new(cell, deadline, false, error.to_string());
        Some(self.backoff(State::Booting(boot)))
    }

    async fn watch(&mut self, mut watch: Watch) -> Option<State> {
        let shared = self.shared.clone();
        let cells = &shared.cells;
        let Some(agent) = cells.agent(&watch.cell) else {
            let deadline = cells.boot_deadline(&watch.cell);
            let boot = Boot::new(watch.cell, deadline, true, "no address");
            return Some(State::Booting(boot));
        };
        let routes = self.routes.borrow_and_update().clone();
        if routes.version != 0 && routes.version != watch.services_version {
            match self.wait(agent.put_services(&routes)).await {
                Wake::Done(Ok(status)) => {
                    watch.last_ok = Instant::now();
                    watch.services_version = status.applied_version;
                    log_route_problems(&self.tracked.pod, &status.problems);
                }
                Wake::Done(Err(error)) => {
                    tracing::debug!(pod = %self.tracked.pod, cell = %watch.cell.id, "service routes: {error}");
                }
                Wake::Command(command) => {
                    return Some(self.on_command(State::Watching(watch), command).await);
                }
                Wake::Stop => return None,
            }
        }
        // The long-poll ends early when the node has new routes for the cell.
        let mut new_routes = self.routes.clone();
        let poll = async {
            tokio::select! {
                answer = agent.pod_status(watch.after, cells.settings.status_wait) => Some(answer),
                _ = new_routes.changed() => None,
            }
        };
        match self.wait(poll).await {
            Wake::Done(None) => return Some(State::Watching(watch)),
            Wake::Done(Some(Ok(response))) => {
                watch.last_ok = Instant::now();
                watch.after = Some(response.version);
                watch.services_version = response.services_version;
                if response.uid.as_deref() == Some(self.tracked.pod.uid.as_str()) {
                    tracing::debug!(
                        pod = %self.tracked.pod,
                        cell = %watch.cell.id,
                        phase = response.status.phase.as_deref().unwrap_or_default(),
                        version = response.version,
                        "the agent reports the pod's status"
                    );
                    let host_network = {
                        let mut record = self.tracked.record();
                        record.applied = true;
                        record
                            .resolved
                            .as_ref()
                            .and_then(|r| r.pod.spec.as_ref())
                            .is_some_and(|spec| spec.host_network == Some(true))
                    };
                    let status =
                        running_status(&response.status, &watch.cell.summary, host_network);
                    self.shared.set_status(&self.tracked, status);
                }
                return Some(State::Watching(watch));
            }
            Wake::Done(Some(Err(error))) => {
                tracing::debug!(pod = %self.tracked.pod, cell = %watch.cell.id, "agent status: {error}");
            }
            Wake::Command(command) => {
                return Some(self.on_command(State::Watching(watch), command).await);
            }
            Wake::Stop => return None,
        }
        // No answer: ask the backend whether the cell still exists.
        let gone = match cells.backend.describe(&watch.cell.id).await {
            Ok(described) if described.state.is_ending() => {
                Some(format!("the backend reports it {}", described.state))
            }
            Err(BackendError::NotFound { .. }) => Some("the backend no longer knows it".to_owned()),
            _ => None,
        };
        let silent = watch.last_ok.elapsed();
        let why = gone.or_else(|| {
            (silent >= cells.settings.health_timeout)
                .then(|| format!("its agent did not answer for {}s", silent.as_secs()))
        });
        if let Some(why) = why {
            return Some(State::Lost {
                cell: watch.cell,
                reason: REASON_CELL_LOST,
                why,
            });
        }
        match self
            .wait(tokio::time::sleep(cells.settings.retry_interval))
            .await
        {
            Wake::Done(()) => Some(State::Watching(watch)),
            Wake::Command(command) => Some(self.on_command(State::Watching(watch), command).await),
            Wake::Stop => None,
        }
    }

    /// A boot that failed: the cell is terminated and the next start is a new attempt (after
    /// the backoff). A cell no pod asked for yet is lost instead (nothing to start it with).
    async fn boot_failed(&mut self, cell: CellView, error: BootError) -> Option<State> {
        if self.stopping() {
            // Updraft stops (the next run adopts the cell) or the pod's delete terminates it.
            return None;
        }
        if !self.tracked.claimed() {
            return self.lost(cell, error.reason(), error.to_string()).await;
        }
        tracing::warn!(pod = %self.tracked.pod, cell = %cell.id, "{error}; terminating the cell");
        if let Err(e) = self.shared.cells.terminate(&cell.id).await {
            tracing::warn!(cell = %cell.id, "{e}; the garbage collector retries");
        }
        self.attempt += 1;
        let last = self.tracked.record().status.clone();
        self.shared.set_status(
            &self.tracked,
            lost_status(
                last.as_ref(),
                false,
                error.reason(),
                format!("{error}; starting a new cell"),
            ),
        );
        Some(self.backoff(State::Starting {
            reply: None,
            replacing: Some(cell.id),
        }))
    }

    /// A lost cell: says so in the status (with `reason`), terminates it, and restarts the pod
    /// on a new cell or fails it.
    async fn lost(&mut self, cell: CellView, reason: &'static str, why: String) -> Option<State> {
        if self.stopping() {
            return None;
        }
        let (resolved, last) = {
            let record = self.tracked.record();
            (record.resolved.clone(), record.status.clone())
        };
        let restart_never = resolved
            .as_ref()
            .and_then(|r| r.pod.spec.as_ref())
            .is_some_and(|spec| spec.restart_policy.as_deref() == Some("Never"));
        let replace = resolved.is_some() && !restart_never;
        let message = if replace {
            format!(
                "cell {} was lost ({why}); starting a replacement cell",
                cell.id
            )
        } else if restart_never {
            format!(
                "cell {} was lost ({why}); restartPolicy Never: the pod failed",
                cell.id
            )
        } else {
            format!(
                "cell {} was lost ({why}); the pod was adopted after a restart, so its inputs are unknown here: the pod failed and its controller replaces it",
                cell.id
            )
        };
        tracing::warn!(pod = %self.tracked.pod, "{message}");
        self.shared.set_status(
            &self.tracked,
            lost_status(last.as_ref(), !replace, reason, message),
        );
        if let Err(e) = self.shared.cells.terminate(&cell.id).await {
            tracing::warn!(cell = %cell.id, "terminating a lost cell: {e}; the garbage collector retries");
        }
        if !replace {
            return Some(State::Failed);
        }
        self.attempt += 1;
        Some(State::Starting {
            reply: None,
            replacing: Some(cell.id),
        })
    }
}

/// Logs the routes an agent could not install (at warn: a Service the pod may need is
/// unreachable from its cell).
fn log_route_problems(pod: &PodRef, problems: &[String]) {
    for problem in problems {
        tracing::warn!(%pod, "service routes on the pod's cell: {problem}");
    }
}
