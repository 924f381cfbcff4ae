//! The pod's status as the agent reports it, built from one view per container.
//!
//! Each container's lifecycle (the `lifecycle` module) derives a [`ContainerView`] from its state
//! after every step and hands it to the [`StatusBoard`]; the board derives the `PodStatus`
//! (phase, conditions, container statuses) from all views and publishes it on the agent's
//! status channel when it changed. Nothing here is decided twice: the views are the only input,
//! and the pod status is recomputed, not patched.
//!
//! Views are kept in a `watch` channel rather than behind a mutex: writers replace a view and
//! readers (the API server's exec, stats) borrow it, and a panicking writer cannot poison it.
//! The pod status is computed inside the status channel's update, so two containers publishing
//! at once cannot send their statuses out of order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use updraft_cell_api::PodStatusResponse;
use updraft_cell_runtime::ExecTarget;

/// How an instance ended, as `state.terminated` and `lastState.terminated` show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Terminated {
    /// Exit code (128 + signal when killed).
    pub exit_code: i32,
    /// `Completed`, `Error`, `OOMKilled`, `ContainerStatusUnknown`.
    pub reason: String,
    /// The termination message.
    pub message: Option<String>,
    /// When the instance started.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
}

/// A container's `state` as the status reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Reported {
    /// Not running: why (`ContainerCreating`, `CrashLoopBackOff`, `ErrImagePull`, …).
    Waiting {
        /// The kubelet's reason.
        reason: String,
        /// Details.
        message: Option<String>,
    },
    /// An instance runs.
    Running {
        /// Since when.
        started_at: Timestamp,
    },
    /// The last instance ended.
    Terminated(Terminated),
}

impl Reported {
    /// What a container shows before its first start.
    pub fn not_started(init: bool) -> Self {
        Self::Waiting {
            reason: if init {
                "PodInitializing"
            } else {
                "ContainerCreating"
            }
            .into(),
            message: None,
        }
    }
}

/// What one container's lifecycle reports about it.
#[derive(Debug, Clone)]
pub struct ContainerView {
    /// An init container.
    pub init: bool,
    /// The image as the spec names it.
    pub image: String,
    /// Digest of the image of the latest instance.
    pub image_id: String,
    /// `updraft://<instance>` of the latest instance; empty before the first.
    pub container_id: String,
    /// Current state.
    pub state: Reported,
    /// How the instance before the current one ended.
    pub last: Option<Terminated>,
    /// Instances started after the first.
    pub restarts: u32,
    /// Readiness of the running instance.
    pub ready: bool,
    /// The latest instance passed its startup probe (or has none); kept after it ends.
    pub started: bool,
    /// Where exec goes while an instance runs.
    pub exec: Option<ExecTarget>,
    /// The running instance's environment (for exec).
    pub env: Vec<(String, String)>,
    /// Will not run again.
    pub done: bool,
}

impl ContainerView {
    /// A container before its first start.
    pub fn not_started(init: bool, image: &str) -> Self {
        Self {
            init,
            image: image.to_owned(),
            image_id: String::new(),
            container_id: String::new(),
            state: Reported::not_started(init),
            last: None,
            restarts: 0,
            ready: false,
            started: false,
            exec: None,
            env: Vec::new(),
            done: false,
        }
    }

    fn running(&self) -> bool {
        matches!(self.state, Reported::Running { .. })
    }

    fn succeeded(&self) -> bool {
        matches!(&self.state, Reported::Terminated(t) if t.exit_code == 0)
    }

    fn to_status(&self, name: &str) -> ContainerStatus {
        let container_id = Some(self.container_id.clone()).filter(|c| !c.is_empty());
        let terminated = |t: &Terminated| ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: t.exit_code,
                reason: Some(t.reason.clone()),
                message: t.message.clone(),
                started_at: t.started_at.map(Time),
                finished_at: t.finished_at.map(Time),
                container_id: container_id.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let state = match &self.state {
            Reported::Waiting { reason, message } => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: message.clone(),
                }),
                ..Default::default()
            },
            Reported::Running { started_at } => ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(*started_at)),
                }),
                ..Default::default()
            },
            Reported::Terminated(t) => terminated(t),
        };
        ContainerStatus {
            name: name.to_owned(),
            image: self.image.clone(),
            image_id: self.image_id.clone(),
            container_id: container_id.clone(),
            ready: self.ready && self.running(),
            started: Some(self.started && self.running()),
            restart_count: self.restarts as i32,
            state: Some(state),
            last_state: self.last.as_ref().map(terminated),
            ..Default::default()
        }
    }
}

/// The views of a pod's containers and the status derived from them.
pub struct StatusBoard {
    uid: String,
    /// Container names in spec order, init containers first.
    order: Vec<String>,
    views: watch::Sender<BTreeMap<String, ContainerView>>,
    initialized: AtomicBool,
    start_time: Timestamp,
    pod_ip: Option<String>,
    status: watch::Sender<PodStatusResponse>,
}

impl StatusBoard {
    /// A board for pod `uid` whose containers (spec order, init first) start as `views`;
    /// statuses go out on `status`.
    pub fn new(
        uid: String,
        views: Vec<(String, ContainerView)>,
        start_time: Timestamp,
        pod_ip: Option<String>,
        status: watch::Sender<PodStatusResponse>,
    ) -> Self {
        Self {
            uid,
            order: views.iter().map(|(n, _)| n.clone()).collect(),
            views: watch::Sender::new(views.into_iter().collect()),
            initialized: AtomicBool::new(false),
            start_time,
            pod_ip,
            status,
        }
    }

    /// A board for `pod` whose containers have not started yet.
    pub fn for_pod(
        uid: String,
        pod: &k8s_openapi::api::core::v1::PodSpec,
        start_time: Timestamp,
        pod_ip: Option<String>,
        status: watch::Sender<PodStatusResponse>,
    ) -> Self {
        let init = pod.init_containers.iter().flatten().map(|c| (c, true));
        let apps = pod.containers.iter().map(|c| (c, false));
        let views = init
            .chain(apps)
            .map(|(c, init)| {
                let image = c.image.as_deref().unwrap_or_default();
                (c.name.clone(), ContainerView::not_started(init, image))
            })
            .collect();
        Self::new(uid, views, start_time, pod_ip, status)
    }

    /// Replaces the view of `name` and publishes.
    pub fn set(&self, name: &str, view: ContainerView) {
        self.views.send_modify(|views| {
            views.insert(name.to_owned(), view);
        });
        self.publish();
    }

    /// Marks the init containers done (the `Initialized` condition) and publishes.
    pub fn set_initialized(&self) {
        self.initialized.store(true, Ordering::SeqCst);
        self.publish();
    }

    /// A copy of the view of `name`.
    pub fn view(&self, name: &str) -> Option<ContainerView> {
        self.views.borrow().get(name).cloned()
    }

    /// Copies of all views by name.
    pub fn views(&self) -> BTreeMap<String, ContainerView> {
        self.views.borrow().clone()
    }

    /// Derives the pod status and sends it when it changed.
    pub fn publish(&self) {
        self.status.send_if_modified(|current| {
            let status = self.pod_status();
            if current.status == status && current.uid.as_deref() == Some(self.uid.as_str()) {
                return false;
            }
            current.version += 1;
            current.uid = Some(self.uid.clone());
            current.status = status;
            true
        });
    }

    /// The pod status the views add up to.
    pub fn pod_status(&self) -> PodStatus {
        let views = self.views.borrow();
        let mut init_statuses = Vec::new();
        let mut app_statuses = Vec::new();
        for name in &self.order {
            if let Some(v) = views.get(name) {
                if v.init {
                    init_statuses.push(v.to_status(name));
                } else {
                    app_statuses.push(v.to_status(name));
                }
            }
        }
        let initialized = self.initialized.load(Ordering::SeqCst);
        let apps: Vec<&ContainerView> = views.values().filter(|v| !v.init).collect();
        let init_failed = views.values().any(|v| v.init && v.done && !v.succeeded());
        let all_done = apps.iter().all(|v| v.done);
        let any_failed = apps
            .iter()
            .any(|v| matches!(&v.state, Reported::Terminated(t) if t.exit_code != 0));
        let phase = if init_failed {
            "Failed"
        } else if !initialized {
            "Pending"
        } else if all_done && !apps.is_empty() {
            if any_failed { "Failed" } else { "Succeeded" }
        } else if apps.iter().all(|v| v.started || v.restarts > 0 || v.done) {
            "Running"
        } else {
            "Pending"
        };
        let ready = initialized && apps.iter().all(|v| v.ready && v.running());
        let condition = |type_: &str, ok: bool| PodCondition {
            type_: type_.into(),
            status: if ok { "True" } else { "False" }.into(),
            ..Default::default()
        };
        PodStatus {
            phase: Some(phase.into()),
            conditions: Some(vec![
                condition("PodReadyToStartContainers", true),
                condition("Initialized", initialized),
                condition("Ready", ready),
                condition("ContainersReady", ready),
                condition("PodScheduled", true),
            ]),
            container_statuses: Some(app_statuses),
            init_container_statuses: Some(init_statuses).filter(|v| !v.is_empty()),
            pod_ip: self.pod_ip.clone(),
            pod_ips: self.pod_ip.clone().map(|ip| vec![PodIP { ip }]),
            start_time: Some(Time(self.start_time)),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(
        views: Vec<(&str, ContainerView)>,
    ) -> (StatusBoard, watch::Receiver<PodStatusResponse>) {
        let (tx, rx) = watch::channel(PodStatusResponse::default());
        let views = views.into_iter().map(|(n, v)| (n.to_owned(), v)).collect();
        let board = StatusBoard::new(
            "uid-1".into(),
            views,
            Timestamp::UNIX_EPOCH,
            Some("10.0.0.2".into()),
            tx,
        );
        (board, rx)
    }

    fn condition(s: &PodStatus, type_: &str) -> String {
        s.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == type_)
            .map(|c| c.status.clone())
            .unwrap_or_default()
    }

    #[test]
    fn phase_follows_init_then_apps_and_publishing_skips_unchanged_statuses() {
        let (board, rx) = board(vec![
            ("setup", ContainerView::not_started(true, "busybox")),
            ("app", ContainerView::not_started(false, "busybox")),
        ]);
        board.publish();
        let first = rx.borrow().clone();
        assert_eq!(first.uid.as_deref(), Some("uid-1"));
        assert_eq!(first.status.phase.as_deref(), Some("Pending"));
        assert_eq!(condition(&first.status, "Initialized"), "False");
        let names: Vec<_> = first
            .status
            .init_container_statuses
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names, ["setup"]);
        board.publish();
        assert_eq!(
            rx.borrow().version,
            first.version,
            "an unchanged status is not sent again"
        );

        let mut setup = ContainerView::not_started(true, "busybox");
        setup.done = true;
        setup.state = Reported::Terminated(Terminated {
            exit_code: 0,
            reason: "Completed".into(),
            ..Terminated::default()
        });
        board.set("setup", setup);
        board.set_initialized();
        let mut app = ContainerView::not_started(false, "busybox");
        app.state = Reported::Running {
            started_at: Timestamp::UNIX_EPOCH,
        };
        app.started = true;
        app.ready = true;
        board.set("app", app.clone());
        let running = rx.borrow().status.clone();
        assert_eq!(running.phase.as_deref(), Some("Running"));
        assert_eq!(condition(&running, "Ready"), "True");
        assert_eq!(running.pod_ip.as_deref(), Some("10.0.0.2"));

        app.done = true;
        app.ready = true;
        app.state = Reported::Terminated(Terminated {
            exit_code: 2,
            reason: "Error".into(),
            ..Terminated::default()
        });
        board.set("app", app);
        let failed = rx.borrow().status.clone();
        assert_eq!(failed.phase.as_deref(), Some("Failed"));
        assert_eq!(
            condition(&failed, "Ready"),
            "False",
            "ready only counts while running"
        );
        let app = &failed.container_statuses.as_ref().unwrap()[0];
        assert_eq!(app.started, Some(false));
        assert_eq!(
            app.state
                .as_ref()
                .unwrap()
                .terminated
                .as_ref()
                .unwrap()
                .exit_code,
            2
        );
    }

    #[test]
    fn a_failed_init_container_fails_the_pod() {
        let mut setup = ContainerView::not_started(true, "busybox");
        setup.done = true;
        setup.state = Reported::Terminated(Terminated {
            exit_code: 1,
            reason: "Error".into(),
            ..Terminated::default()
        });
        let (board, rx) = board(vec![
            ("setup", setup),
            ("app", ContainerView::not_started(false, "busybox")),
        ]);
        board.publish();
        assert_eq!(rx.borrow().status.phase.as_deref(), Some("Failed"));
    }
}
