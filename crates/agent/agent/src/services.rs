//! The pod's Service routes on the agent's side: the newest table the provider sent
//! (`PUT /v1/services`) and its installation as nftables rules (crate `updraft-cell-proxy`) in
//! the network namespace of the current pod.
//!
//! # Invariants
//! - The agent holds one table, the newest it was sent, in memory only. A table with a lower
//!   version than the held one is ignored; tables are whole, so a newer one replaces
//!   everything, and one of the same version is installed again (idempotent).
//! - Tables are installed only in the target: the network namespace of the current pod (the
//!   cell's own for a hostNetwork pod), set by [`Services::attach`] when the pod's sandbox is
//!   created or adopted, before its containers start, and cleared by [`Services::detach`]
//!   once the pod is stopped. Every install is of the newest table and happens under one
//!   lock, so the rules never go back to an older table.
//! - `applied_version` is the version of the table this agent installed in the target (0: none,
//!   or no pod). `nft -f` is one transaction, so a failed install leaves the previous rules and
//!   their version in force. A restarted agent holds no table and reports 0 although the rules
//!   an earlier agent installed are still there; the provider sends the table again, and the
//!   install replaces them atomically.
//! - The version in force is also the pod status's `services_version`; each change of it is a
//!   new status version, so the provider's long-poll sees it.
//! - The target's namespace handle is dropped by [`Services::detach`], which runs before the
//!   sandbox is torn down: an open handle keeps the namespace, and its veth, alive.
//!
//! Installing runs the `nft` command and blocks until it is done (milliseconds); callers on
//! the async runtime run [`Services::put`] and [`Services::status`] on a blocking thread.

use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use updraft_cell_api::PodStatusResponse;
use updraft_cell_api::services::{ServiceRoutes, ServiceRoutesStatus};
use updraft_cell_proxy::render;

pub use updraft_cell_proxy::Nft;

/// Where the rules go.
enum Target {
    /// The pod's own network namespace.
    Pod(File),
    /// The cell's namespace, which a hostNetwork pod shares: the agent's own (its threads
    /// never change namespace).
    Cell,
}

#[derive(Default)]
struct State {
    /// The newest table; `None` until the first since the agent started.
    table: Option<Arc<ServiceRoutes>>,
    /// The current pod's namespace; `None` without a pod.
    target: Option<Target>,
    /// Version of the table installed in `target` (0: none).
    applied: u64,
    /// The routes of `table` that cannot be rendered.
    render_problems: Vec<String>,
    /// Why the latest install of `table` into `target` failed.
    install_error: Option<String>,
}

impl State {
    fn status(&self) -> ServiceRoutesStatus {
        ServiceRoutesStatus {
            applied_version: self.applied,
            problems: self
                .render_problems
                .iter()
                .cloned()
                .chain(self.install_error.clone())
                .collect(),
        }
    }
}

/// The agent's Service routes: the newest table and where it is installed.
pub struct Services {
    nft: Nft,
    status: watch::Sender<PodStatusResponse>,
    state: Mutex<State>,
}

impl Services {
    /// Installs with `nft`; publishes the version in force on `status` (the agent's pod
    /// status channel).
    pub fn new(nft: Nft, status: watch::Sender<PodStatusResponse>) -> Self {
        Self {
            nft,
            status,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest table (`None` before the first).
    pub fn table(&self) -> Option<Arc<ServiceRoutes>> {
        self.lock().table.clone()
    }

    /// What is in force (waits for an install under way).
    pub fn status(&self) -> ServiceRoutesStatus {
        self.lock().status()
    }

    /// Keeps `table` unless the held one is newer, installs it in the current pod's namespace
    /// (if there is a pod) and answers what is in force.
    pub fn put(&self, table: ServiceRoutes) -> ServiceRoutesStatus {
        let mut state = self.lock();
        if let Some(held) = state.table.as_ref()
            && table.version < held.version
        {
            tracing::info!(
                version = table.version,
                held = held.version,
                "ignoring an older Service routes table"
            );
            return state.status();
        }
        state.table = Some(Arc::new(table));
        self.install(&mut state);
        state.status()
    }

    /// A pod sandbox with namespace `netns` was created or adopted: it becomes the target, and
    /// the held table (if any) is installed in it. Call before the pod's containers start.
    pub fn attach(&self, netns: &File, host_network: bool) {
        let mut state = self.lock();
        state.install_error = None;
        self.set_applied(&mut state, 0);
        state.target = if host_network {
            Some(Target::Cell)
        } else {
            match netns.try_clone() {
                Ok(file) => Some(Target::Pod(file)),
                Err(e) => {
                    state.install_error = Some(format!(
                        "Service rules cannot be installed in this pod: opening its network namespace: {e}"
                    ));
                    None
                }
            }
        };
        self.install(&mut state);
    }

    /// The pod is stopped: no target any more, nothing in force. A hostNetwork pod's rules
    /// are removed from the cell's namespace (a pod's own namespace goes with its sandbox).
    pub fn detach(&self) {
        let mut state = self.lock();
        if let Some(Target::Cell) = state.target.take()
            && state.table.is_some()
            && let Err(e) = self.nft.remove(None)
        {
            tracing::warn!(
                error = %chain(&e),
                "removing the Service rules of a hostNetwork pod from the cell"
            );
        }
        state.install_error = None;
        self.set_applied(&mut state, 0);
    }

    /// Installs the held table in the target; without a target only its problems are known.
    fn install(&self, state: &mut State) {
        let Some(table) = state.table.clone() else {
            return;
        };
        let rules = render(&table.routes);
        state.render_problems = rules.problems;
        let netns = match &state.target {
            None => return,
            Some(Target::Pod(file)) => Some(file),
            Some(Target::Cell) => None,
        };
        match self.nft.apply(netns, &rules.script) {
            Ok(()) => {
                tracing::info!(
                    version = table.version,
                    routes = table.routes.len(),
                    "Service routes installed"
                );
                state.install_error = None;
                self.set_applied(state, table.version);
            }
            Err(e) => {
                let message = format!(
                    "Service routes version {} not installed (version {} stays in force): {}",
                    table.version,
                    state.applied,
                    chain(&e)
                );
                tracing::warn!("{message}");
                state.install_error = Some(message);
            }
        }
    }

    /// Records the version in force and makes a change of it a new pod status version.
    fn set_applied(&self, state: &mut State, version: u64) {
        state.applied = version;
        self.status.send_if_modified(|s| {
            if s.services_version == version {
                return false;
            }
            s.services_version = version;
            s.version += 1;
            true
        });
    }
}

/// An error and its sources, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::net::{Ipv4Addr, SocketAddrV4};

    use updraft_cell_api::services::{Protocol, ServiceRoute};

    use super::*;

    fn route(service: &str, ip: [u8; 4]) -> ServiceRoute {
        ServiceRoute {
            service: service.into(),
            cluster_ip: Ipv4Addr::from(ip),
            protocol: Protocol::Tcp,
            port: 80,
            endpoints: vec![SocketAddrV4::new(Ipv4Addr::new(10, 251, 0, 1), 8080)],
            affinity_timeout_seconds: None,
        }
    }

    fn table(version: u64, routes: Vec<ServiceRoute>) -> ServiceRoutes {
        ServiceRoutes { version, routes }
    }

    /// No pod: nothing is installed, so no `nft` runs (the program does not exist).
    fn services() -> (Services, watch::Receiver<PodStatusResponse>) {
        let (tx, rx) = watch::channel(PodStatusResponse::default());
        (Services::new(Nft::new("/nonexistent/nft"), tx), rx)
    }

    #[test]
    fn the_newest_table_is_kept_an_older_one_ignored_and_the_same_version_taken_again() {
        let (s, _) = services();
        assert_eq!(s.status(), ServiceRoutesStatus::default());
        let answer = s.put(table(5, vec![route("a/web:80", [10, 96, 0, 1])]));
        assert_eq!(
            answer,
            ServiceRoutesStatus::default(),
            "no pod: nothing in force"
        );
        s.put(table(3, vec![]));
        assert_eq!(s.table().unwrap().version, 5);
        assert_eq!(
            s.table().unwrap().routes.len(),
            1,
            "the older table is ignored"
        );
        s.put(table(5, vec![]));
        assert!(s.table().unwrap().routes.is_empty(), "same version: taken");
        s.put(table(6, vec![route("a/db:80", [10, 96, 0, 2])]));
        assert_eq!(s.table().unwrap().routes[0].service, "a/db:80");
    }

    #[test]
    fn routes_that_cannot_be_rendered_are_reported_without_a_pod() {
        let (s, _) = services();
        let answer = s.put(table(
            1,
            vec![
                route("a/one:80", [10, 96, 0, 1]),
                route("a/two:80", [10, 96, 0, 1]),
            ],
        ));
        assert_eq!(answer.applied_version, 0);
        assert_eq!(answer.problems.len(), 1, "{:?}", answer.problems);
        assert!(
            answer.problems[0].contains("a/two:80"),
            "{:?}",
            answer.problems
        );
        // A newer table without the clash has no problems.
        assert!(s.put(table(2, vec![])).problems.is_empty());
    }

    #[test]
    fn without_nft_the_table_is_kept_and_the_problem_names_what_to_install() {
        let (s, mut rx) = services();
        let netns = File::open("/proc/self/ns/net").unwrap();
        // hostNetwork: the cell's namespace, so no namespace is joined.
        s.attach(&netns, true);
        let answer = s.put(table(2, vec![route("a/web:80", [10, 96, 0, 1])]));
        assert_eq!(answer.applied_version, 0);
        assert_eq!(answer.problems.len(), 1, "{:?}", answer.problems);
        let problem = &answer.problems[0];
        assert!(
            problem.contains("version 2 not installed") && problem.contains("nftables"),
            "{problem}"
        );
        assert_eq!(s.table().unwrap().version, 2, "kept for the next pod");
        assert!(
            !rx.has_changed().unwrap(),
            "nothing in force: no new status"
        );
        // The next pod tries again; the pod gone, nothing is in force and nothing failed.
        s.attach(&netns, true);
        assert_eq!(s.status().problems.len(), 1);
        s.detach();
        assert_eq!(s.status(), ServiceRoutesStatus::default());
        assert!(!rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().services_version, 0);
    }
}
