//! When an ended container runs again: `restartPolicy` and the kubelet's restart backoff.

use std::time::Duration;

/// How long an instance must have run for its container's restart backoff to start over
/// (the kubelet's 10 minutes).
pub const BACKOFF_RESET: Duration = Duration::from_secs(600);

/// `spec.restartPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Restart app containers whenever they end (the default).
    Always,
    /// Restart containers that failed.
    OnFailure,
    /// Never restart.
    Never,
}

impl RestartPolicy {
    /// The policy a spec names (unknown or unset: `Always`).
    pub fn of(spec: Option<&str>) -> Self {
        match spec {
            Some("Never") => Self::Never,
            Some("OnFailure") => Self::OnFailure,
            _ => Self::Always,
        }
    }

    /// Whether an ended instance is followed by another. Init containers run to success, so
    /// under `Always` they restart only when they failed.
    pub(super) fn restarts(self, init: bool, failed: bool) -> bool {
        match self {
            Self::Never => false,
            Self::OnFailure => failed,
            Self::Always => !init || failed,
        }
    }
}

/// CrashLoopBackOff delays (kubelet: 10 s doubling up to 5 min).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
}

impl Backoff {
    /// The next delay after `step` (the previous delay, `None` at the start of a sequence):
    /// `first` to begin with, then `initial` doubling up to `max`.
    pub(super) fn next(&self, step: &mut Option<Duration>, first: Duration) -> Duration {
        let delay = match *step {
            None => first,
            Some(d) if d.is_zero() => self.initial,
            Some(d) => (d * 2).min(self.max),
        };
        *step = Some(delay);
        delay
    }
}
