//! An in-memory [`ContainerRuntime`] for unit tests of the lifecycle: instances are entries in
//! a table that exit when their script says so (on tokio's clock, so paused time drives them)
//! or when signalled; pulls, starts and probes answer what the test set up. Everything it saw
//! is kept in a `watch` channel, so a test waits on a condition instead of sleeping.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container as K8sContainer, Probe};
use k8s_openapi::jiff::Timestamp;
use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::time::Instant;
use updraft_cell_runtime::{ContainerExit, ExitReason, ExitStatus};

use super::{ContainerRuntime, Instance, ProbeKind, ProbeTarget, StartFailure, Started};
use crate::images::PreparedImage;
use crate::record::InstanceRecord;
use crate::status::Terminated;

/// What one instance does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Script {
    /// Exits by itself after this long (`None`: runs until signalled).
    pub runs_for: Option<Duration>,
    /// Exit code when it exits by itself.
    pub exit_code: i32,
    /// Ignores SIGTERM (only SIGKILL ends it).
    pub ignores_sigterm: bool,
}

impl Script {
    /// Runs until signalled.
    pub const FOREVER: Self = Self {
        runs_for: None,
        exit_code: 0,
        ignores_sigterm: false,
    };

    /// Exits with `code` right after starting.
    pub fn exits(code: i32) -> Self {
        Self::exits_after(Duration::ZERO, code)
    }

    /// Exits with `code` after `after`.
    pub fn exits_after(after: Duration, code: i32) -> Self {
        Self {
            runs_for: Some(after),
            exit_code: code,
            ignores_sigterm: false,
        }
    }
}

/// One started (or adopted) instance as the fake saw it.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The container.
    pub container: String,
    /// Its restart index.
    pub restarts: u32,
    /// When it started (tokio's clock).
    pub at: Instant,
    /// Adopted from a record rather than started.
    pub adopted: bool,
    /// What it does.
    pub script: Script,
    /// Signals it got, with when.
    pub signals: Vec<(Signal, Instant)>,
    /// How it exited.
    pub exit: Option<ContainerExit>,
    /// Left running for a later agent.
    pub detached: bool,
    /// Released by the lifecycle after its exit.
    pub released: bool,
}

/// Everything the fake was told and saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Scripts of the next instances per container; the last one repeats.
    pub scripts: BTreeMap<String, VecDeque<Script>>,
    /// Results of the next pulls per container (`None`: success); then successes.
    pub pulls: BTreeMap<String, VecDeque<Option<StartFailure>>>,
    /// How long a pull takes.
    pub pull_time: Duration,
    /// Pulls per container.
    pub pulled: BTreeMap<String, usize>,
    /// Probe and hook results per container and kind (default: success).
    pub probe_results: BTreeMap<(String, ProbeKind), bool>,
    /// How long a probe or hook takes per container and kind (default: no time).
    pub probe_time: BTreeMap<(String, ProbeKind), Duration>,
    /// Probes and hooks run per container and kind.
    pub probed: BTreeMap<(String, ProbeKind), usize>,
    /// Recorded instances per container, and whether their process is still alive.
    pub records: BTreeMap<String, (InstanceRecord, bool)>,
    /// All instances in start order.
    pub launches: Vec<Launch>,
}

impl Seen {
    /// The instances of `container` in start order.
    pub fn launches_of(&self, container: &str) -> Vec<&Launch> {
        self.launches
            .iter()
            .filter(|l| l.container == container)
            .collect()
    }

    fn next_script(&mut self, container: &str) -> Script {
        let Some(scripts) = self.scripts.get_mut(container) else {
            return Script::FOREVER;
        };
        match scripts.len() {
            0 => Script::FOREVER,
            1 => scripts[0],
            _ => scripts.pop_front().unwrap_or(Script::FOREVER),
        }
    }

    fn launch(&mut self, container: &str, restarts: u32, adopted: bool) -> usize {
        let script = self.next_script(container);
        self.launches.push(Launch {
            container: container.to_owned(),
            restarts,
            at: Instant::now(),
            adopted,
            script,
            signals: Vec::new(),
            exit: None,
            detached: false,
            released: false,
        });
        self.launches.len() - 1
    }
}

/// The fake runtime; clones share their state.
#[derive(Clone, Default)]
pub struct FakeRuntime {
    seen: Arc<watch::Sender<Seen>>,
}

impl FakeRuntime {
    /// A runtime whose instances run until signalled and whose pulls and probes succeed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Changes what the fake does.
    pub fn set(&self, f: impl FnOnce(&mut Seen)) {
        self.seen.send_modify(f);
    }

    /// Scripts the next instances of `container` (the last one repeats).
    pub fn script(&self, container: &str, scripts: impl IntoIterator<Item = Script>) {
        self.set(|s| {
            s.scripts
                .insert(container.to_owned(), scripts.into_iter().collect());
        });
    }

    /// The result of `container`'s `kind` probe from now on.
    pub fn probe_result(&self, container: &str, kind: ProbeKind, ok: bool) {
        self.set(|s| {
            s.probe_results.insert((container.to_owned(), kind), ok);
        });
    }

    /// Reads what the fake saw.
    pub fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.borrow())
    }

    /// Waits until `pred` holds of what the fake saw (a day of paused time at most).
    pub async fn until(&self, what: &str, pred: impl Fn(&Seen) -> bool) {
        let mut rx = self.seen.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(86_400), rx.wait_for(pred))
            .await
            .map(|r| r.is_ok());
        assert!(
            waited == Ok(true),
            "the fake never saw {what}: {:#?}",
            *rx.borrow()
        );
    }

    /// Makes the latest instance of `container` exit with `code` now.
    pub fn exit(&self, container: &str, code: i32) {
        self.set(|s| {
            if let Some(l) = s
                .launches
                .iter_mut()
                .rev()
                .find(|l| l.container == container)
            {
                l.exit.get_or_insert(exit(ExitStatus::Exited(code)));
            }
        });
    }

    fn instance(&self, index: usize) -> Box<dyn Instance> {
        Box::new(FakeInstance {
            seen: self.seen.clone(),
            index,
        })
    }

    fn started(&self, c: &K8sContainer, index: usize, restarts: u32) -> Started {
        Started {
            instance: self.instance(index),
            started_at: Timestamp::UNIX_EPOCH,
            container_id: format!("updraft://fake-{}-{restarts}", c.name),
            image_id: "sha256:fake".into(),
            env: Vec::new(),
            exec: None,
        }
    }
}

/// A recorded instance of an earlier agent.
pub fn record(restarts: u32, last: Option<Terminated>) -> InstanceRecord {
    InstanceRecord {
        pid: 0,
        start_ticks: 0,
        restarts,
        started_at: Timestamp::UNIX_EPOCH,
        container_id: format!("updraft://recorded-{restarts}"),
        image_id: "sha256:recorded".into(),
        env: Vec::new(),
        last,
    }
}

fn exit(status: ExitStatus) -> ContainerExit {
    ContainerExit {
        status,
        reason: if status == ExitStatus::Exited(0) {
            ExitReason::Completed
        } else {
            ExitReason::Error
        },
    }
}

#[async_trait::async_trait]
impl ContainerRuntime for FakeRuntime {
    async fn pull(&self, c: &K8sContainer, _restarts: u32) -> Result<PreparedImage, StartFailure> {
        let pull_time = self.seen.borrow().pull_time;
        self.set(|s| *s.pulled.entry(c.name.clone()).or_default() += 1);
        tokio::time::sleep(pull_time).await;
        let mut result = None;
        self.set(|s| {
            result = s
                .pulls
                .get_mut(&c.name)
                .and_then(VecDeque::pop_front)
                .flatten();
        });
        match result {
            Some(failure) => Err(failure),
            None => Ok(PreparedImage::default()),
        }
    }

    fn start(
        &self,
        c: &K8sContainer,
        _image: PreparedImage,
        restarts: u32,
        _last: Option<&Terminated>,
    ) -> Result<Started, StartFailure> {
        let mut index = 0;
        self.set(|s| index = s.launch(&c.name, restarts, false));
        Ok(self.started(c, index, restarts))
    }

    fn recorded(&self, c: &K8sContainer) -> Option<InstanceRecord> {
        self.seen
            .borrow()
            .records
            .get(&c.name)
            .map(|(r, _)| r.clone())
    }

    fn adopt(&self, c: &K8sContainer, record: &InstanceRecord) -> Option<Started> {
        let mut adopted = None;
        self.set(|s| {
            if let Some((_, alive)) = s.records.remove(&c.name) {
                adopted = alive.then(|| s.launch(&c.name, record.restarts, true));
            }
        });
        Some(self.started(c, adopted?, record.restarts))
    }

    async fn probe(&self, target: &ProbeTarget, _probe: &Probe) -> bool {
        let key = (target.container.clone(), target.kind);
        let time = self.seen.borrow().probe_time.get(&key).copied();
        tokio::time::sleep(time.unwrap_or_default()).await;
        let mut ok = true;
        self.set(|s| {
            *s.probed.entry(key.clone()).or_default() += 1;
            ok = s.probe_results.get(&key).copied().unwrap_or(true);
        });
        ok
    }
}

/// A fake instance: an index into the fake's launches.
struct FakeInstance {
    seen: Arc<watch::Sender<Seen>>,
    index: usize,
}

impl FakeInstance {
    fn update(&self, f: impl FnOnce(&mut Launch)) {
        self.seen.send_modify(|s| {
            if let Some(l) = s.launches.get_mut(self.index) {
                f(l);
            }
        });
    }
}

#[async_trait::async_trait]
impl Instance for FakeInstance {
    async fn wait(&mut self) -> Option<ContainerExit> {
        let (script, at) = {
            let seen = self.seen.borrow();
            let launch = seen.launches.get(self.index)?;
            (launch.script, launch.at)
        };
        let mut rx = self.seen.subscribe();
        let exited = rx.wait_for(|s| s.launches.get(self.index).is_some_and(|l| l.exit.is_some()));
        let by_itself = async {
            match script.runs_for {
                Some(d) => tokio::time::sleep_until(at + d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = exited => {}
            () = by_itself => self.update(|l| {
                l.exit.get_or_insert(exit(ExitStatus::Exited(script.exit_code)));
            }),
        }
        self.seen.borrow().launches.get(self.index)?.exit
    }

    fn signal(&self, signal: Signal) {
        self.update(|l| {
            if l.exit.is_some() {
                return;
            }
            l.signals.push((signal, Instant::now()));
            if signal == Signal::SIGKILL || !l.script.ignores_sigterm {
                l.exit = Some(exit(ExitStatus::Signaled(signal as i32)));
            }
        });
    }

    fn detach(self: Box<Self>) {
        self.update(|l| l.detached = true);
    }

    async fn release(self: Box<Self>, _exit_code: i32) -> Option<String> {
        self.update(|l| l.released = true);
        None
    }
}
