//! One pod the provider tracks ([`TrackedPod`]): what the rest of the provider may read of it
//! (its cell, status, whether an agent runs it, the supervisor's [`Stage`]) and the one way to
//! ask its supervisor for something ([`TrackedPod::create`], [`TrackedPod::update`],
//! [`TrackedPod::retire`], and the `deleting` token).
//!
//! The supervisor (`lifecycle`) is the only writer of the record, except for `resolved`: the
//! node's create and update set it before they ask the supervisor, so that a listing right
//! after a create already counts the pod as claimed.

use std::sync::{Mutex, MutexGuard};

use k8s_openapi::api::core::v1::PodStatus;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use updraft_cells_backend::CellId;
use updraft_provider::{PodRef, ProviderError, ResolvedPod};

use crate::cells::CellView;
use updraft_common::sync::lock;

/// Where a pod's supervisor is, for readers (see `lifecycle` for the states themselves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// No cell; waiting for the node's create.
    Unstarted,
    /// Getting a cell (listed, standby or new).
    Starting,
    /// Waiting for the cell's agent.
    Booting,
    /// Handing the pod to the agent.
    Delivering,
    /// Following the agent's status.
    Watching,
    /// Giving up a cell that failed to boot or was lost.
    Lost,
    /// Waiting before the next attempt.
    Backoff,
    /// The pod failed for good (its cell lost, no replacement).
    Failed,
    /// The pod finished and its cell was terminated.
    Retired,
    /// The supervisor has ended (deletion or shutdown).
    Stopped,
}

/// What the provider knows of a pod, published by its supervisor.
#[derive(Debug, Default)]
pub(crate) struct PodRecord {
    /// The pod's cell (the one its supervisor drives), if any.
    pub(crate) cell: Option<CellView>,
    /// What the node last handed us; unknown for pods adopted after a restart.
    pub(crate) resolved: Option<ResolvedPod>,
    /// Whether an agent runs (or has run) this pod: only then is it "running" to the node.
    pub(crate) applied: bool,
    /// The last status published.
    pub(crate) status: Option<PodStatus>,
    /// Since when the status is final (for `finishedPodRetention`).
    pub(crate) finished_since: Option<Instant>,
}

/// A request to a pod's supervisor.
pub(crate) enum Command {
    /// The node asks for the pod (its resolved inputs are in the record): answered once the
    /// pod has a cell, or with why it cannot get one.
    Create(oneshot::Sender<Result<(), ProviderError>>),
    /// The node changed the pod (the record has the new inputs): answered once the agent has
    /// them, or once they are recorded for a delivery still to come.
    Update(oneshot::Sender<Result<(), ProviderError>>),
    /// The garbage collector retires the pod's cell `cell` (the pod finished long ago).
    Retire(CellId, oneshot::Sender<()>),
}

/// One pod and the handle on its supervisor.
#[derive(Debug)]
pub(crate) struct TrackedPod {
    pub(crate) pod: PodRef,
    /// Set when this run found the pod's cell in the backend's listing rather than being asked
    /// for the pod by the node: until the node asks (`resolved` is set), the cell belongs to no
    /// pod this run knows, and it is reported to the node's orphan sweep only once it has been
    /// so for `gcGracePeriod`.
    pub(crate) adopted_at: Option<Instant>,
    /// Cancelled when the pod is being deleted: its supervisor stops at once.
    pub(crate) deleting: CancellationToken,
    /// Cancelled when the supervisor has ended: nothing drives the pod's cells any more.
    pub(crate) stopped: CancellationToken,
    record: Mutex<PodRecord>,
    stage: watch::Sender<Stage>,
    commands: mpsc::UnboundedSender<Command>,
}

impl TrackedPod {
    /// A pod with `record`, and the receiver its supervisor takes commands from.
    pub(crate) fn new(
        pod: PodRef,
        adopted_at: Option<Instant>,
        record: PodRecord,
        stage: Stage,
    ) -> (TrackedPod, mpsc::UnboundedReceiver<Command>) {
        let (commands, receiver) = mpsc::unbounded_channel();
        let tracked = TrackedPod {
            pod,
            adopted_at,
            deleting: CancellationToken::new(),
            stopped: CancellationToken::new(),
            record: Mutex::new(record),
            stage: watch::Sender::new(stage),
            commands,
        };
        (tracked, receiver)
    }

    /// The pod's record.
    pub(crate) fn record(&self) -> MutexGuard<'_, PodRecord> {
        lock(&self.record)
    }

    /// The supervisor's stage.
    pub(crate) fn stage(&self) -> Stage {
        *self.stage.borrow()
    }

    /// Follows the supervisor's stage (tests wait on it).
    #[cfg(test)]
    pub(crate) fn stages(&self) -> watch::Receiver<Stage> {
        self.stage.subscribe()
    }

    pub(crate) fn set_stage(&self, stage: Stage) {
        self.stage.send_replace(stage);
    }

    /// Whether the node has asked for this pod in this run.
    pub(crate) fn claimed(&self) -> bool {
        self.record().resolved.is_some()
    }

    /// The node asks for the pod: answered once it has a cell.
    pub(crate) async fn create(&self, resolved: &ResolvedPod) -> Result<(), ProviderError> {
        self.record().resolved = Some(resolved.clone());
        self.ask(Command::Create).await
    }

    /// The node changed the pod.
    pub(crate) async fn update(&self, resolved: &ResolvedPod) -> Result<(), ProviderError> {
        self.record().resolved = Some(resolved.clone());
        self.ask(Command::Update).await
    }

    /// Retires the pod's cell `cell` (a no-op when the pod has another cell by now).
    pub(crate) async fn retire(&self, cell: CellId) {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Retire(cell, reply)).is_ok() {
            let _ = answer.await;
        }
    }

    async fn ask(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<(), ProviderError>>) -> Command,
    ) -> Result<(), ProviderError> {
        let stopped = || {
            ProviderError::transient(if self.deleting.is_cancelled() {
                format!("pod {} is being deleted", self.pod)
            } else {
                "the cells provider is shutting down".to_owned()
            })
        };
        if self.stopped.is_cancelled() || self.deleting.is_cancelled() {
            return Err(stopped());
        }
        let (reply, answer) = oneshot::channel();
        self.commands.send(command(reply)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}
