//! The probes of one running instance. Worker tasks run each probe on its schedule (after
//! `initialDelaySeconds`, every `periodSeconds`) and only report results; [`Probes::count`]
//! turns results into decisions with the probe's thresholds, so the decisions are made by the
//! lifecycle's step and can be tested without timing. Liveness and readiness begin once the
//! startup probe passed (or there is none).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container as K8sContainer, Probe};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};

use crate::runtime::{ContainerRuntime, ProbeKind, ProbeTarget};

/// What a probe result decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changes.
    Nothing,
    /// The startup probe passed; liveness and readiness began (`ready`: there is no
    /// readiness probe, so the instance is ready now).
    Started {
        /// Ready without a readiness probe.
        ready: bool,
    },
    /// The readiness probe decided the instance's readiness.
    Ready(bool),
    /// Liveness or startup failed `failureThreshold` times in a row: restart the instance.
    Unhealthy,
}

/// The probe workers of one instance and the counts their results add up to.
pub struct Probes {
    runtime: Arc<dyn ContainerRuntime>,
    target: ProbeTarget,
    startup: Option<Probe>,
    liveness: Option<Probe>,
    readiness: Option<Probe>,
    results: mpsc::Receiver<(ProbeKind, bool)>,
    sender: mpsc::Sender<(ProbeKind, bool)>,
    workers: JoinSet<()>,
    /// The startup worker while the startup probe has not passed.
    startup_worker: Option<AbortHandle>,
    startup_failures: i32,
    readiness_successes: i32,
    readiness_failures: i32,
    liveness_failures: i32,
}

impl Probes {
    /// The probes of container `c` at `target`; none runs before [`Probes::begin`].
    pub fn new(runtime: Arc<dyn ContainerRuntime>, c: &K8sContainer, target: ProbeTarget) -> Self {
        let (sender, results) = mpsc::channel(8);
        Self {
            runtime,
            target,
            startup: c.startup_probe.clone(),
            liveness: c.liveness_probe.clone(),
            readiness: c.readiness_probe.clone(),
            results,
            sender,
            workers: JoinSet::new(),
            startup_worker: None,
            startup_failures: 0,
            readiness_successes: 0,
            readiness_failures: 0,
            liveness_failures: 0,
        }
    }

    /// Starts probing: the startup probe unless the instance `started` already, else liveness
    /// and readiness. True when the instance is ready now (no readiness probe).
    pub fn begin(&mut self, started: bool) -> bool {
        match self.startup.clone() {
            Some(startup) if !started => {
                self.startup_worker = Some(self.spawn(ProbeKind::Startup, startup));
                false
            }
            _ => self.watch_health(),
        }
    }

    /// The next probe result (never, when no probe runs).
    pub async fn next(&mut self) -> Option<(ProbeKind, bool)> {
        self.results.recv().await
    }

    /// Counts a probe result.
    pub fn count(&mut self, kind: ProbeKind, ok: bool) -> Verdict {
        let failures =
            |p: &Option<Probe>| p.as_ref().and_then(|p| p.failure_threshold).unwrap_or(3);
        match kind {
            ProbeKind::Startup if self.startup_worker.is_some() => {
                if ok {
                    if let Some(worker) = self.startup_worker.take() {
                        worker.abort();
                    }
                    return Verdict::Started {
                        ready: self.watch_health(),
                    };
                }
                self.startup_failures += 1;
                if self.startup_failures >= failures(&self.startup) {
                    return Verdict::Unhealthy;
                }
            }
            ProbeKind::Readiness => {
                if ok {
                    self.readiness_successes += 1;
                    self.readiness_failures = 0;
                    let successes = self.readiness.as_ref().and_then(|p| p.success_threshold);
                    if self.readiness_successes >= successes.unwrap_or(1) {
                        return Verdict::Ready(true);
                    }
                } else {
                    self.readiness_failures += 1;
                    self.readiness_successes = 0;
                    if self.readiness_failures >= failures(&self.readiness) {
                        return Verdict::Ready(false);
                    }
                }
            }
            ProbeKind::Liveness => {
                if ok {
                    self.liveness_failures = 0;
                } else {
                    self.liveness_failures += 1;
                    if self.liveness_failures >= failures(&self.liveness) {
                        return Verdict::Unhealthy;
                    }
                }
            }
            // A startup result that was under way when the probe passed.
            _ => {}
        }
        Verdict::Nothing
    }

    /// Stops the workers and waits until they are gone (they hold the runtime).
    pub async fn shutdown(mut self) {
        self.workers.shutdown().await;
    }

    /// Starts the liveness and readiness probes; true when there is no readiness probe.
    fn watch_health(&mut self) -> bool {
        if let Some(p) = self.liveness.clone() {
            self.spawn(ProbeKind::Liveness, p);
        }
        match self.readiness.clone() {
            Some(p) => {
                self.spawn(ProbeKind::Readiness, p);
                false
            }
            None => true,
        }
    }

    /// A worker running `probe` after its initial delay and then every period, reporting
    /// each result.
    fn spawn(&mut self, kind: ProbeKind, probe: Probe) -> AbortHandle {
        let runtime = self.runtime.clone();
        let target = ProbeTarget {
            kind,
            ..self.target.clone()
        };
        let results = self.sender.clone();
        self.workers.spawn(async move {
            tokio::time::sleep(seconds(probe.initial_delay_seconds, 0)).await;
            loop {
                let ok = runtime.probe(&target, &probe).await;
                if results.send((kind, ok)).await.is_err() {
                    return;
                }
                tokio::time::sleep(seconds(probe.period_seconds, 10).max(Duration::from_secs(1)))
                    .await;
            }
        })
    }
}

/// A probe's seconds field (`default` when unset, never negative).
fn seconds(value: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(value.unwrap_or(default).max(0) as u64)
}
