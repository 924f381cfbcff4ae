//! The standby pool: pre-started idle cells per instance type (config `standbyPool`), so that a
//! pod whose selected type has one runs without waiting for a cell to boot.
//!
//! - A standby cell carries [`CellIdentity::standby`] (controller id and node, no pod). The
//!   garbage collector and the node's orphan sweep see no pod on it and leave it alone.
//! - **Claim**: a pod whose chosen instance type and launch type have a standby cell, and that
//!   asks for nothing a pre-started cell cannot have (extra security groups, a root volume size,
//!   an instance profile, private-IP-only), takes one. Claims run concurrently: each reserves a
//!   cell in this run's `claimed` set (so two claims of this run never try the same cell) and
//!   re-stamps it with the pod's identity through [`CellBackend::assign`], which refuses a cell
//!   that is no longer standby: two pods never get one cell, and after a restart the backend's
//!   listing says which cells were claimed (they are adopted like any pod's cell). The refill's
//!   terminations exclude claims (a read/write lock: claims share it, the refill's listing and
//!   terminations hold it alone).
//! - **Refill**: one reconcile loop compares the listing with the config: it starts the missing
//!   cells, and terminates surplus ones (a count lowered, a type removed from the config) and
//!   broken ones (stopped). Cells this run started that a listing does not show yet are
//!   counted, so nothing is started twice.
//! - **The refill yields to pods**: a pass runs only once no pod has asked for a cell or been
//!   delivered to one for the quiet period (`refill_quiet_period`, 5 s), and it starts one cell
//!   at a time, checking before each that pods are still quiet. During a burst the pods get
//!   the CPU, the host's state lock and the backend's API to themselves (local cells share the
//!   host with the pods starting: new idle cells made a burst slower than a cold one), and the
//!   pool is topped up once the burst is over. Pods that keep coming faster than the quiet period
//!   hold the refill back for as long; they are the demand the pool exists for.
//! - Shutdown leaves the pool running: the next run finds it in the listing and starts nothing
//!   that is already there.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use updraft_cells_backend::{BackendError, Cell, CellId, CellIdentity, CellSpec, CellState};
use updraft_cells_catalog::LaunchType;
use updraft_provider::{PodRef, ProviderError, ResolvedPod};

use crate::errors::backend_error;

use crate::cell_summary::CellSummary;
use crate::cells::{CellView, Cells, cell_name};
use crate::config::StandbySettings;
use updraft_common::sync::lock;

/// One pool entry as the provider runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyEntry {
    /// The instance type of the idle cells.
    pub instance_type: String,
    /// Their launch type; pods of another launch type do not take them.
    pub launch_type: LaunchType,
    /// How many to keep.
    pub count: u32,
}

impl StandbyEntry {
    /// The entries of the config's `standbyPool`.
    pub fn from_config(settings: &[StandbySettings]) -> Vec<StandbyEntry> {
        settings
            .iter()
            .map(|s| StandbyEntry {
                instance_type: s.instance_type.clone(),
                launch_type: s.launch_type(),
                count: s.count,
            })
            .collect()
    }

    fn matches(&self, cell: &Cell) -> bool {
        cell.instance_type == self.instance_type && cell.launch_type == self.launch_type
    }
}

/// The pool's state in the provider: the desired entries and what this run is doing; the cells
/// themselves are known only from the backend's listing.
#[derive(Default)]
pub(crate) struct StandbyPool {
    pub(crate) entries: Mutex<Vec<StandbyEntry>>,
    /// Claims hold it shared; the refill's listing and terminations hold it alone, so a cell
    /// being claimed is never terminated as surplus.
    claim_lock: tokio::sync::RwLock<()>,
    /// Cells handed to pods that a listing may still show as standby (a cloud's listing can lag
    /// behind its tag calls); dropped once a listing no longer does.
    claimed: Mutex<HashSet<CellId>>,
    /// Cells this run started (with the entry's type, launch type and when), counted until a
    /// listing shows them.
    started: Mutex<HashMap<CellId, (String, LaunchType, Instant)>>,
    /// Wakes the refill loop (after pod demand, so that it passes once the pods are quiet).
    pub(crate) wake: Arc<Notify>,
    /// When a pod last asked for a cell or was delivered to one (tokio's clock, so that tests
    /// can run it paused).
    last_demand: Mutex<Option<tokio::time::Instant>>,
    /// Whether the refill loop runs.
    pub(crate) running: AtomicBool,
    /// Numbers the standby cells' idempotency tokens within this run.
    starts: AtomicU64,
    /// The standby cells of the last listing, for the spend metrics.
    pub(crate) summaries: Mutex<Vec<CellSummary>>,
}

/// How long a started cell missing from the listings still counts as part of the pool.
const LISTING_LAG: Duration = Duration::from_secs(120);

impl StandbyPool {
    /// A pod asked for a cell or was delivered to one: the refill waits until pods are quiet.
    pub(crate) fn demand(&self) {
        *lock(&self.last_demand) = Some(tokio::time::Instant::now());
        self.wake.notify_one();
    }

    /// How much longer pods must stay quiet before the refill may start cells; `None` once
    /// they have been quiet for `quiet_period`.
    pub(crate) fn quiet_remaining(&self, quiet_period: Duration) -> Option<Duration> {
        let last = (*lock(&self.last_demand))?;
        let remaining = quiet_period.saturating_sub(last.elapsed());
        (!remaining.is_zero()).then_some(remaining)
    }
}

impl StandbyPool {
    /// The configured entries.
    pub(crate) fn entries(&self) -> Vec<StandbyEntry> {
        lock(&self.entries).clone()
    }

    /// The standby cells of this node in `cells` that no pod has claimed.
    fn idle<'a>(&self, node: &str, cells: &'a [Cell]) -> Vec<&'a Cell> {
        let claimed = lock(&self.claimed);
        cells
            .iter()
            .filter(|cell| {
                !cell.state.is_ending()
                    && !claimed.contains(&cell.id)
                    && cell
                        .identity
                        .as_ref()
                        .is_some_and(|identity| identity.is_standby() && identity.node == node)
            })
            .collect()
    }

    /// Takes an idle standby cell for `resolved` when the pool has one of the type (and launch
    /// type) chosen for it; `None` when the pod must get a new cell.
    pub(crate) async fn take(&self, cells: &Cells, resolved: &ResolvedPod) -> Option<CellView> {
        let entries = self.entries();
        if entries.is_empty() {
            return None;
        }
        let pod_ref = PodRef::of(&resolved.pod);
        // A pod the selector refuses gets its error from the normal start.
        let (decision, wanted) = cells.decide(resolved).ok()?;
        let fits_a_standby_cell = wanted.security_groups.is_empty()
            && wanted.volume_size_bytes.is_none()
            && wanted.instance_profile.is_none()
            && wanted.private_ip_only != Some(true);
        let instance_type = decision.chosen.instance_type.name.clone();
        let pooled = entries
            .iter()
            .any(|e| e.instance_type == instance_type && e.launch_type == decision.launch_type);
        if !fits_a_standby_cell || !pooled {
            return None;
        }
        let _claiming = self.claim_lock.read().await;
        let listed = match cells.backend.list(&cells.settings.controller_id).await {
            Ok(cells) => cells,
            Err(e) => {
                tracing::warn!(pod = %pod_ref, "listing standby cells: {e}; starting a new cell");
                return None;
            }
        };
        let mut candidates: Vec<&Cell> = self
            .idle(&cells.settings.node_name, &listed)
            .into_iter()
            .filter(|cell| {
                cell.instance_type == instance_type
                    && cell.launch_type == decision.launch_type
                    // A pending cell may still be inside the start call that creates it.
                    && cell.state == CellState::Running
            })
            .collect();
        // Oldest first: the likeliest to have an agent that answers.
        candidates.sort_by_key(|cell| cell.launch_time);
        let identity = cells.identity(resolved);
        let name = cell_name(&cells.settings.name_tag, &pod_ref);
        let mut taken = None;
        for cell in candidates {
            // Reserve it: a concurrent claim of this run skips it.
            if !lock(&self.claimed).insert(cell.id.clone()) {
                continue;
            }
            match cells.backend.assign(&cell.id, &name, &identity).await {
                Ok(()) => {
                    taken = Some(cell.clone());
                    break;
                }
                // Claimed or gone meanwhile: never take it (it stays reserved); try the next.
                Err(e @ (BackendError::InvalidRequest { .. } | BackendError::NotFound { .. })) => {
                    tracing::info!(pod = %pod_ref, cell = %cell.id, "standby cell not available: {e}");
                }
                Err(e) => {
                    lock(&self.claimed).remove(&cell.id);
                    tracing::warn!(pod = %pod_ref, cell = %cell.id, "taking a standby cell: {e}; starting a new cell");
                    break;
                }
            }
        }
        let mut cell = taken?;
        cell.identity = Some(identity);
        cell.name = name;
        tracing::info!(
            pod = %pod_ref,
            cell = %cell.id,
            instance_type = %cell.instance_type,
            "took a standby cell"
        );
        Some(cells.view(&cell, Some(decision.chosen.price_per_hour)))
    }

    /// One pass of the pool's reconcile loop: surplus and broken standby cells are terminated,
    /// missing ones started (not once `shutdown` is cancelled).
    pub(crate) async fn reconcile(&self, cells: &Cells, shutdown: &CancellationToken) {
        let entries = self.entries();
        let claiming = self.claim_lock.write().await;
        let listed = match cells.backend.list(&cells.settings.controller_id).await {
            Ok(cells) => cells,
            Err(e) => {
                tracing::warn!("standby pool: listing cells: {e}");
                return;
            }
        };
        let listed_standby: HashSet<&CellId> = listed
            .iter()
            .filter(|c| c.identity.as_ref().is_some_and(CellIdentity::is_standby))
            .map(|c| &c.id)
            .collect();
        lock(&self.claimed).retain(|id| listed_standby.contains(id));
        lock(&self.started).retain(|id, (_, _, at)| {
            !listed.iter().any(|c| &c.id == id) && at.elapsed() < LISTING_LAG
        });
        let idle = self.idle(&cells.settings.node_name, &listed);
        *lock(&self.summaries) = idle.iter().map(|c| cells.summary(c, None)).collect();

        let mut surplus: Vec<CellId> = idle
            .iter()
            .filter(|c| matches!(c.state, CellState::Stopped | CellState::Stopping))
            .map(|c| c.id.clone())
            .collect();
        let mut missing: Vec<(StandbyEntry, u32)> = Vec::new();
        for entry in &entries {
            let mut healthy: Vec<&Cell> = idle
                .iter()
                .copied()
                .filter(|c| entry.matches(c) && !surplus.contains(&c.id))
                .collect();
            let pending = lock(&self.started)
                .values()
                .filter(|(t, l, _)| *t == entry.instance_type && *l == entry.launch_type)
                .count();
            let have = u32::try_from(healthy.len() + pending).unwrap_or(u32::MAX);
            if have < entry.count {
                missing.push((entry.clone(), entry.count - have));
            } else if have > entry.count {
                // Keep the oldest (booted longest), drop the newest.
                healthy.sort_by_key(|c| c.launch_time);
                let extra = usize::try_from(have - entry.count).unwrap_or(usize::MAX);
                surplus.extend(healthy.iter().rev().take(extra).map(|c| c.id.clone()));
            }
        }
        // Types no entry names any more.
        surplus.extend(
            idle.iter()
                .filter(|c| !entries.iter().any(|e| e.matches(c)))
                .map(|c| c.id.clone()),
        );
        surplus.sort();
        surplus.dedup();
        for id in &surplus {
            tracing::info!(cell = %id, "standby pool: terminating a surplus or broken standby cell");
            if let Err(e) = cells.terminate(id).await {
                tracing::warn!(cell = %id, "standby pool: {e}");
            }
        }
        // Claims may go on while new cells boot.
        drop(claiming);
        'entries: for (entry, count) in missing {
            for _ in 0..count {
                // One start at a time, each only while pods are quiet: a pod that asks for a
                // cell meanwhile goes first (its demand wakes the loop for a later pass).
                if shutdown.is_cancelled()
                    || self
                        .quiet_remaining(cells.settings.refill_quiet_period)
                        .is_some()
                {
                    break 'entries;
                }
                if let Err(e) = self.start(cells, &entry).await {
                    tracing::warn!(
                        instance_type = %entry.instance_type,
                        "standby pool: starting a cell: {e}; retrying on the next pass"
                    );
                    break;
                }
            }
        }
    }

    /// Starts one standby cell of `entry`.
    async fn start(&self, cells: &Cells, entry: &StandbyEntry) -> Result<CellId, ProviderError> {
        let user_data = cells.user_data()?;
        let sequence = self.starts.fetch_add(1, Ordering::Relaxed);
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let spec = CellSpec {
            name: cell_name(
                &cells.settings.name_tag,
                &PodRef {
                    namespace: "standby".into(),
                    name: entry.instance_type.clone(),
                    uid: String::new(),
                },
            ),
            instance_type: entry.instance_type.clone(),
            launch_type: entry.launch_type,
            image: None,
            user_data,
            identity: CellIdentity::standby(
                &cells.settings.controller_id,
                &cells.settings.node_name,
            ),
            security_groups: cells.settings.extra_security_groups.clone(),
            private_ip_only: false,
            root_volume_bytes: None,
            instance_profile: None,
            // Unique per start: a retry is the next pass, which counts the listing first.
            idempotency_token: format!("standby-{run:x}-{sequence}"),
        };
        let started = cells
            .backend
            .start(&spec)
            .await
            .map_err(|e| backend_error("starting a standby cell", e))?;
        tracing::info!(
            cell = %started.id,
            instance_type = %entry.instance_type,
            "standby pool: started a standby cell"
        );
        lock(&self.started).insert(
            started.id.clone(),
            (
                entry.instance_type.clone(),
                entry.launch_type,
                Instant::now(),
            ),
        );
        Ok(started.id)
    }
}
