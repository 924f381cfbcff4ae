//! Every transition of the container lifecycle on the fake runtime and tokio's paused clock:
//! times below are the paused clock's, so they are exact.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodStatus};
use k8s_openapi::jiff::Timestamp;
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;
use updraft_cell_api::PodStatusResponse;

use super::*;
use crate::runtime::fake::{FakeRuntime, Script, record};

const BACKOFF: Backoff = Backoff {
    initial: Duration::from_secs(10),
    max: Duration::from_secs(300),
};

const SEC: Duration = Duration::from_secs(1);

/// A pod run by the lifecycle on a fake runtime.
struct Harness {
    rt: FakeRuntime,
    status: watch::Receiver<PodStatusResponse>,
    stops: Stops,
    task: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

fn container(name: &str, extra: Value) -> Value {
    let mut c = json!({"name": name, "image": "busybox:1"});
    if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}

fn pod(spec: Value) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": "web", "uid": "u1"}, "spec": spec})).unwrap()
}

/// Starts the lifecycle of `spec` on `rt`.
fn run(spec: Value, rt: &FakeRuntime) -> Harness {
    run_in(spec, rt, tempfile::tempdir().unwrap())
}

fn run_in(spec: Value, rt: &FakeRuntime, dir: tempfile::TempDir) -> Harness {
    let pod = pod(spec);
    let (tx, status) = watch::channel(PodStatusResponse::default());
    let board = Arc::new(StatusBoard::for_pod(
        "u1".into(),
        pod.spec.as_ref().unwrap(),
        Timestamp::UNIX_EPOCH,
        None,
        tx,
    ));
    let stops = Stops::default();
    let lifecycle = PodLifecycle::new(
        &pod,
        Arc::new(rt.clone()),
        board.clone(),
        BACKOFF,
        stops.clone(),
        dir.path().join("initialized"),
    );
    board.publish();
    Harness {
        rt: rt.clone(),
        status,
        stops,
        task: tokio::spawn(lifecycle.run()),
        dir,
    }
}

impl Harness {
    /// Waits until the pod status satisfies `pred` (a day of paused time at most).
    async fn until(&mut self, what: &str, pred: impl Fn(&PodStatus) -> bool) -> PodStatus {
        let waited = tokio::time::timeout(
            Duration::from_secs(86_400),
            self.status.wait_for(|s| pred(&s.status)),
        )
        .await
        .map(|r| r.is_ok());
        let last = self.status.borrow().status.clone();
        assert_eq!(waited, Ok(true), "never {what}; last status: {last:#?}");
        last
    }

    /// Waits for the lifecycle to end.
    async fn ended(self) -> (PodStatus, FakeRuntime) {
        tokio::time::timeout(Duration::from_secs(86_400), self.task)
            .await
            .expect("the lifecycle ends")
            .unwrap();
        (self.status.borrow().status.clone(), self.rt)
    }

    fn start_times(&self, name: &str) -> Vec<Instant> {
        self.rt
            .seen(|s| s.launches_of(name).iter().map(|l| l.at).collect())
    }
}

fn status<'a>(s: &'a PodStatus, name: &str) -> &'a ContainerStatus {
    s.container_statuses
        .iter()
        .flatten()
        .chain(s.init_container_statuses.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no status of {name}: {s:#?}"))
}

fn waiting(s: &PodStatus, name: &str) -> Option<(String, String)> {
    let w = status(s, name).state.as_ref()?.waiting.as_ref()?;
    Some((w.reason.clone()?, w.message.clone().unwrap_or_default()))
}

fn running(s: &PodStatus, name: &str) -> bool {
    status(s, name)
        .state
        .as_ref()
        .is_some_and(|st| st.running.is_some())
}

fn terminated(s: &PodStatus, name: &str) -> Option<(i32, String)> {
    let t = status(s, name).state.as_ref()?.terminated.as_ref()?;
    Some((t.exit_code, t.reason.clone()?))
}

fn last_terminated(s: &PodStatus, name: &str) -> Option<(i32, String)> {
    let t = status(s, name).last_state.as_ref()?.terminated.as_ref()?;
    Some((t.exit_code, t.reason.clone()?))
}

fn restarts(s: &PodStatus, name: &str) -> i32 {
    status(s, name).restart_count
}

fn condition(s: &PodStatus, type_: &str) -> bool {
    s.conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == type_ && c.status == "True")
}

fn gaps(times: &[Instant]) -> Vec<u64> {
    times.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect()
}

#[tokio::test(start_paused = true)]
async fn init_containers_run_in_order_a_failed_one_restarts_and_then_the_apps_start() {
    let rt = FakeRuntime::new();
    rt.script(
        "setup",
        [Script::exits_after(SEC, 1), Script::exits_after(SEC, 0)],
    );
    rt.script("second", [Script::exits_after(SEC, 0)]);
    let mut pod = run(
        json!({
            "initContainers": [container("setup", json!({})), container("second", json!({}))],
            "containers": [container("app", json!({}))],
        }),
        &rt,
    );
    let s = pod
        .until("Pending while initializing", |s| running(s, "setup"))
        .await;
    assert_eq!(s.phase.as_deref(), Some("Pending"));
    assert!(!condition(&s, "Initialized"));
    assert_eq!(waiting(&s, "app").unwrap().0, "ContainerCreating");
    assert_eq!(waiting(&s, "second").unwrap().0, "PodInitializing");

    let s = pod.until("app running", |s| running(s, "app")).await;
    assert_eq!(s.phase.as_deref(), Some("Running"));
    assert!(condition(&s, "Initialized") && condition(&s, "Ready"));
    assert_eq!(
        restarts(&s, "setup"),
        1,
        "the failed init container ran again"
    );
    assert_eq!(terminated(&s, "setup"), Some((0, "Completed".into())));
    assert_eq!(last_terminated(&s, "setup"), Some((1, "Error".into())));
    assert_eq!(terminated(&s, "second"), Some((0, "Completed".into())));
    let t0 = pod.start_times("setup")[0];
    let at = |name: &str| -> Vec<u64> {
        pod.start_times(name)
            .iter()
            .map(|t| (*t - t0).as_secs())
            .collect()
    };
    // The first restart is immediate; each init container waits for the one before.
    assert_eq!(at("setup"), [0, 1]);
    assert_eq!(at("second"), [2]);
    assert_eq!(at("app"), [3]);
    assert!(pod.dir.path().join("initialized").exists());
}

#[tokio::test(start_paused = true)]
async fn init_containers_that_an_earlier_agent_completed_do_not_run_again() {
    let rt = FakeRuntime::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("initialized"), b"").unwrap();
    let mut pod = run_in(
        json!({
            "initContainers": [container("setup", json!({}))],
            "containers": [container("app", json!({}))],
        }),
        &rt,
        dir,
    );
    let s = pod.until("app running", |s| running(s, "app")).await;
    assert_eq!(terminated(&s, "setup"), Some((0, "Completed".into())));
    assert!(rt.seen(|s| s.launches_of("setup").is_empty()));
}

#[tokio::test(start_paused = true)]
async fn a_failed_init_container_under_never_fails_the_pod_and_no_app_starts() {
    let rt = FakeRuntime::new();
    rt.script("setup", [Script::exits(3)]);
    let pod = run(
        json!({
            "restartPolicy": "Never",
            "initContainers": [container("setup", json!({}))],
            "containers": [container("app", json!({}))],
        }),
        &rt,
    );
    let (s, rt) = pod.ended().await;
    assert_eq!(s.phase.as_deref(), Some("Failed"));
    assert_eq!(terminated(&s, "setup"), Some((3, "Error".into())));
    assert_eq!(waiting(&s, "app").unwrap().0, "ContainerCreating");
    assert!(rt.seen(|s| s.launches_of("app").is_empty()));
}

#[tokio::test(start_paused = true)]
async fn restart_backoff_doubles_up_to_its_cap_and_starts_over_after_ten_minutes_running() {
    let rt = FakeRuntime::new();
    let mut scripts = vec![Script::exits(1); 9];
    scripts.push(Script::exits_after(BACKOFF_RESET, 1));
    scripts.push(Script::exits(1));
    scripts.push(Script::FOREVER);
    rt.script("app", scripts);
    let mut pod = run(json!({"containers": [container("app", json!({}))]}), &rt);
    let s = pod
        .until("backing off 40 s", |s| {
            waiting(s, "app").is_some_and(|(_, m)| m.starts_with("back-off 40s"))
        })
        .await;
    let (reason, message) = waiting(&s, "app").unwrap();
    assert_eq!(reason, "CrashLoopBackOff");
    assert_eq!(
        message,
        "back-off 40s restarting failed container=app pod=web"
    );
    assert_eq!(last_terminated(&s, "app"), Some((1, "Error".into())));
    assert_eq!(
        s.phase.as_deref(),
        Some("Running"),
        "a restarting container keeps the pod Running"
    );

    let s = pod
        .until("the 12th instance", |s| {
            running(s, "app") && restarts(s, "app") == 11
        })
        .await;
    assert_eq!(last_terminated(&s, "app"), Some((1, "Error".into())));
    let times = pod.start_times("app");
    assert_eq!(
        gaps(&times),
        // 9 quick exits: at once, then 10 s doubling to 300 s; the 10th instance ran 600 s:
        // the 11th starts at once and the sequence begins anew.
        [0, 10, 20, 40, 80, 160, 300, 300, 300, 600, 10]
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_start_after_an_immediate_restart_waits_the_initial_backoff() {
    let rt = FakeRuntime::new();
    rt.script("app", [Script::exits(1), Script::FOREVER]);
    rt.set(|s| {
        let failure = StartFailure {
            reason: "ErrImagePull".into(),
            message: "registry down".into(),
        };
        s.pulls
            .insert("app".into(), [None, Some(failure)].into_iter().collect());
    });
    let mut pod = run(json!({"containers": [container("app", json!({}))]}), &rt);
    let s = pod
        .until("the second instance", |s| {
            running(s, "app") && restarts(s, "app") == 1
        })
        .await;
    assert_eq!(last_terminated(&s, "app"), Some((1, "Error".into())));
    // Not a hot loop of pulls: the pull after the immediate restart failed, the next waited.
    assert_eq!(gaps(&pod.start_times("app")), [10]);
    assert_eq!(rt.seen(|s| s.pulled["app"]), 3);
}

#[tokio::test(start_paused = true)]
async fn image_pull_failures_wait_as_err_image_pull_then_image_pull_back_off() {
    let rt = FakeRuntime::new();
    rt.set(|s| {
        let failure = StartFailure {
            reason: "ErrImagePull".into(),
            message: "busybox:1: not found".into(),
        };
        let results = [Some(failure.clone()), Some(failure.clone()), Some(failure)];
        s.pulls.insert("app".into(), results.into_iter().collect());
    });
    let mut pod = run(json!({"containers": [container("app", json!({}))]}), &rt);
    let s = pod
        .until("ErrImagePull", |s| {
            waiting(s, "app").is_some_and(|(r, _)| r == "ErrImagePull")
        })
        .await;
    assert_eq!(waiting(&s, "app").unwrap().1, "busybox:1: not found");
    assert_eq!(s.phase.as_deref(), Some("Pending"));
    let t0 = Instant::now();
    pod.until("ImagePullBackOff", |s| {
        waiting(s, "app").is_some_and(|(r, _)| r == "ImagePullBackOff")
    })
    .await;
    assert_eq!(Instant::now() - t0, Duration::from_secs(10));
    let s = pod.until("running", |s| running(s, "app")).await;
    assert_eq!(restarts(&s, "app"), 0, "failed pulls are not restarts");
    // Retries after 10 s, 20 s, 40 s.
    assert_eq!(Instant::now() - t0, Duration::from_secs(70));
}

#[tokio::test(start_paused = true)]
async fn a_failing_liveness_probe_restarts_the_container_through_sigterm() {
    let rt = FakeRuntime::new();
    rt.probe_result("app", ProbeKind::Liveness, false);
    let live = json!({"livenessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 10}});
    let mut pod = run(json!({"containers": [container("app", live)]}), &rt);
    let s = pod
        .until("restarted", |s| {
            running(s, "app") && restarts(s, "app") == 1
        })
        .await;
    assert_eq!(last_terminated(&s, "app"), Some((143, "Error".into())));
    let first = rt.seen(|s| s.launches_of("app")[0].clone());
    // Failures at 0, 10 and 20 s (failureThreshold 3), then SIGTERM at once.
    assert_eq!(first.signals.len(), 1);
    assert_eq!(first.signals[0].0, Signal::SIGTERM);
    assert_eq!(first.signals[0].1 - first.at, Duration::from_secs(20));
    assert!(first.released);
}

#[tokio::test(start_paused = true)]
async fn a_liveness_failure_under_never_ends_the_container_as_failed() {
    let rt = FakeRuntime::new();
    rt.probe_result("app", ProbeKind::Liveness, false);
    let live = json!({"livenessProbe": {"exec": {"command": ["true"]}, "failureThreshold": 1}});
    let pod = run(
        json!({"restartPolicy": "Never", "containers": [container("app", live)]}),
        &rt,
    );
    let (s, _) = pod.ended().await;
    assert_eq!(s.phase.as_deref(), Some("Failed"));
    assert_eq!(terminated(&s, "app"), Some((143, "Error".into())));
}

#[tokio::test(start_paused = true)]
async fn readiness_follows_its_probe_with_its_thresholds() {
    let rt = FakeRuntime::new();
    let probe = json!({"readinessProbe": {
        "exec": {"command": ["true"]}, "periodSeconds": 5,
        "successThreshold": 2, "failureThreshold": 2
    }});
    let mut pod = run(json!({"containers": [container("app", probe)]}), &rt);
    let s = pod.until("running", |s| running(s, "app")).await;
    assert!(!condition(&s, "Ready"), "one success of two is not ready");
    let t0 = Instant::now();
    pod.until("ready", |s| condition(s, "Ready")).await;
    assert_eq!(Instant::now() - t0, Duration::from_secs(5));
    assert!(status(&pod.status.borrow().status, "app").ready);

    rt.probe_result("app", ProbeKind::Readiness, false);
    let t1 = Instant::now();
    let s = pod.until("not ready", |s| !condition(s, "Ready")).await;
    assert_eq!(
        Instant::now() - t1,
        Duration::from_secs(10),
        "two failures, 5 s apart"
    );
    assert!(running(&s, "app") && !status(&s, "app").ready);
    assert_eq!(restarts(&s, "app"), 0, "readiness never restarts");

    rt.probe_result("app", ProbeKind::Readiness, true);
    pod.until("ready again", |s| condition(s, "Ready")).await;
}

#[tokio::test(start_paused = true)]
async fn the_startup_probe_holds_back_liveness_and_readiness_until_it_passes() {
    let rt = FakeRuntime::new();
    rt.probe_result("app", ProbeKind::Startup, false);
    rt.probe_result("app", ProbeKind::Liveness, false);
    let probes = json!({
        "startupProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1, "failureThreshold": 100},
        "livenessProbe": {"exec": {"command": ["true"]}, "failureThreshold": 1},
        "readinessProbe": {"exec": {"command": ["true"]}},
    });
    let mut pod = run(json!({"containers": [container("app", probes)]}), &rt);
    rt.until("startup probed 20 times", |s| {
        s.probed.get(&("app".into(), ProbeKind::Startup)) >= Some(&20)
    })
    .await;
    let s = pod.status.borrow().status.clone();
    assert!(running(&s, "app"));
    assert_eq!(status(&s, "app").started, Some(false));
    assert!(!condition(&s, "Ready"));
    assert_eq!(s.phase.as_deref(), Some("Pending"), "not started yet");
    rt.seen(|s| {
        assert!(!s.probed.contains_key(&("app".into(), ProbeKind::Liveness)));
        assert!(!s.probed.contains_key(&("app".into(), ProbeKind::Readiness)));
    });

    rt.probe_result("app", ProbeKind::Startup, true);
    // Started: now liveness runs, fails once (threshold 1) and restarts the container.
    let s = pod
        .until("restarted by liveness", |s| restarts(s, "app") == 1)
        .await;
    assert_eq!(last_terminated(&s, "app"), Some((143, "Error".into())));
}

#[tokio::test(start_paused = true)]
async fn a_startup_probe_that_keeps_failing_restarts_the_container() {
    let rt = FakeRuntime::new();
    rt.probe_result("app", ProbeKind::Startup, false);
    let probe = json!({"startupProbe": {"exec": {"command": ["true"]}, "periodSeconds": 2, "failureThreshold": 3}});
    let mut pod = run(json!({"containers": [container("app", probe)]}), &rt);
    pod.until("restarted", |s| restarts(s, "app") == 1).await;
    let first = rt.seen(|s| s.launches_of("app")[0].clone());
    assert_eq!(first.signals[0].1 - first.at, Duration::from_secs(4));
}

#[tokio::test(start_paused = true)]
async fn a_delete_during_the_image_pull_starts_nothing() {
    let rt = FakeRuntime::new();
    rt.set(|s| s.pull_time = Duration::from_secs(60));
    let pod = run(json!({"containers": [container("app", json!({}))]}), &rt);
    rt.until("a pull", |s| s.pulled.contains_key("app")).await;
    pod.stops.stop.cancel();
    let (s, rt) = pod.ended().await;
    assert!(rt.seen(|s| s.launches.is_empty()));
    assert_eq!(waiting(&s, "app").unwrap().0, "ContainerCreating");
}

#[tokio::test(start_paused = true)]
async fn a_delete_during_crash_loop_backoff_ends_at_once() {
    let rt = FakeRuntime::new();
    rt.script("app", [Script::exits(1)]);
    let mut pod = run(json!({"containers": [container("app", json!({}))]}), &rt);
    pod.until("backing off 20 s", |s| {
        waiting(s, "app").is_some_and(|(_, m)| m.starts_with("back-off 20s"))
    })
    .await;
    let t0 = Instant::now();
    let launched = rt.seen(|s| s.launches.len());
    pod.stops.stop.cancel();
    let (s, rt) = pod.ended().await;
    assert_eq!(Instant::now(), t0, "the backoff is not waited out");
    assert_eq!(rt.seen(|s| s.launches.len()), launched);
    assert_eq!(waiting(&s, "app").unwrap().0, "CrashLoopBackOff");
}

#[tokio::test(start_paused = true)]
async fn a_delete_runs_prestop_then_sigterm_and_sigkill_when_the_grace_period_is_over() {
    let rt = FakeRuntime::new();
    rt.script(
        "stubborn",
        [Script {
            ignores_sigterm: true,
            ..Script::FOREVER
        }],
    );
    rt.set(|s| {
        let key = ("stubborn".to_owned(), ProbeKind::PreStop);
        s.probe_time.insert(key, Duration::from_secs(20));
    });
    let pre_stop = json!({"lifecycle": {"preStop": {"exec": {"command": ["sleep", "20"]}}}});
    let mut pod = run(
        json!({
            "terminationGracePeriodSeconds": 30,
            "containers": [container("stubborn", pre_stop), container("polite", json!({}))],
        }),
        &rt,
    );
    pod.until("both running", |s| {
        running(s, "stubborn") && running(s, "polite")
    })
    .await;
    let t0 = Instant::now();
    pod.stops.stop.cancel();
    let (s, rt) = pod.ended().await;
    let stubborn = rt.seen(|s| s.launches_of("stubborn")[0].clone());
    let after: Vec<(Signal, u64)> = stubborn
        .signals
        .iter()
        .map(|(sig, at)| (*sig, (*at - t0).as_secs()))
        .collect();
    // preStop took 20 s of the 30 s grace period: SIGTERM at 20 s, SIGKILL at 30 s.
    assert_eq!(after, [(Signal::SIGTERM, 20), (Signal::SIGKILL, 30)]);
    assert_eq!(terminated(&s, "stubborn"), Some((137, "Error".into())));
    let polite = rt.seen(|s| s.launches_of("polite")[0].clone());
    assert_eq!(polite.signals, [(Signal::SIGTERM, t0)]);
    assert_eq!(terminated(&s, "polite"), Some((143, "Error".into())));
    assert_eq!(
        rt.seen(|s| s.launches.len()),
        2,
        "a deleted pod restarts nothing"
    );
    assert!(rt.seen(|s| s.launches.iter().all(|l| l.released)));
}

#[tokio::test(start_paused = true)]
async fn a_delete_during_the_post_start_hook_stops_the_instance() {
    let rt = FakeRuntime::new();
    rt.set(|s| {
        s.probe_time.insert(
            ("app".into(), ProbeKind::PostStart),
            Duration::from_secs(3600),
        );
    });
    let post_start = json!({"lifecycle": {"postStart": {"exec": {"command": ["sleep", "3600"]}}}});
    let mut pod = run(json!({"containers": [container("app", post_start)]}), &rt);
    pod.until("running", |s| running(s, "app")).await;
    let t0 = Instant::now();
    pod.stops.stop.cancel();
    let (s, rt) = pod.ended().await;
    assert_eq!(Instant::now(), t0);
    assert_eq!(terminated(&s, "app"), Some((143, "Error".into())));
    let hook_completed = rt.seen(|s| s.probed.contains_key(&("app".into(), ProbeKind::PostStart)));
    assert!(!hook_completed, "the hook was abandoned, not waited for");
}

#[tokio::test(start_paused = true)]
async fn never_runs_each_container_once() {
    let rt = FakeRuntime::new();
    rt.script("ok", [Script::exits(0)]);
    rt.script("bad", [Script::exits(2)]);
    let spec = json!({
        "restartPolicy": "Never",
        "containers": [container("ok", json!({})), container("bad", json!({}))],
    });
    let (s, rt) = run(spec, &rt).ended().await;
    assert_eq!(s.phase.as_deref(), Some("Failed"));
    assert_eq!(terminated(&s, "ok"), Some((0, "Completed".into())));
    assert_eq!(terminated(&s, "bad"), Some((2, "Error".into())));
    assert_eq!(rt.seen(|s| s.launches.len()), 2);
}

#[tokio::test(start_paused = true)]
async fn on_failure_restarts_only_failed_containers_until_they_succeed() {
    let rt = FakeRuntime::new();
    rt.script("ok", [Script::exits(0)]);
    rt.script(
        "flaky",
        [Script::exits(1), Script::exits(1), Script::exits(0)],
    );
    let spec = json!({
        "restartPolicy": "OnFailure",
        "containers": [container("ok", json!({})), container("flaky", json!({}))],
    });
    let pod = run(spec, &rt);
    let (s, rt) = pod.ended().await;
    assert_eq!(s.phase.as_deref(), Some("Succeeded"));
    assert_eq!(restarts(&s, "ok"), 0);
    assert_eq!(restarts(&s, "flaky"), 2);
    assert_eq!(terminated(&s, "flaky"), Some((0, "Completed".into())));
    assert_eq!(last_terminated(&s, "flaky"), Some((1, "Error".into())));
    let flaky: Vec<Instant> = rt.seen(|s| s.launches_of("flaky").iter().map(|l| l.at).collect());
    assert_eq!(gaps(&flaky), [0, 10]);
}

#[tokio::test(start_paused = true)]
async fn always_restarts_containers_that_succeeded_too() {
    let rt = FakeRuntime::new();
    rt.script("ok", [Script::exits(0)]);
    let mut pod = run(json!({"containers": [container("ok", json!({}))]}), &rt);
    let s = pod
        .until("restarted twice", |s| restarts(s, "ok") >= 2)
        .await;
    assert_eq!(last_terminated(&s, "ok"), Some((0, "Completed".into())));
    assert_eq!(s.phase.as_deref(), Some("Running"));
}

#[tokio::test(start_paused = true)]
async fn a_recorded_instance_still_running_is_adopted_without_its_post_start_hook() {
    let rt = FakeRuntime::new();
    let last = Terminated {
        exit_code: 1,
        reason: "Error".into(),
        ..Terminated::default()
    };
    rt.set(|s| {
        s.records
            .insert("app".into(), (record(3, Some(last)), true));
    });
    let post_start = json!({"lifecycle": {"postStart": {"exec": {"command": ["true"]}}}});
    let mut pod = run(json!({"containers": [container("app", post_start)]}), &rt);
    let s = pod
        .until("running", |s| running(s, "app") && condition(s, "Ready"))
        .await;
    assert_eq!(restarts(&s, "app"), 3);
    assert_eq!(last_terminated(&s, "app"), Some((1, "Error".into())));
    assert_eq!(status(&s, "app").started, Some(true));
    rt.seen(|s| {
        assert!(s.launches[0].adopted);
        assert!(!s.probed.contains_key(&("app".into(), ProbeKind::PostStart)));
    });
}

#[tokio::test(start_paused = true)]
async fn a_recorded_instance_that_ended_meanwhile_is_reported_and_started_again() {
    let rt = FakeRuntime::new();
    rt.set(|s| {
        s.records.insert("app".into(), (record(3, None), false));
    });
    let mut pod = run(json!({"containers": [container("app", json!({}))]}), &rt);
    let s = pod
        .until("ContainerStatusUnknown", |s| {
            waiting(s, "app").is_some_and(|(r, _)| r == "ContainerStatusUnknown")
        })
        .await;
    assert_eq!(waiting(&s, "app").unwrap().0, "ContainerStatusUnknown");
    assert_eq!(
        last_terminated(&s, "app"),
        Some((137, "ContainerStatusUnknown".into()))
    );
    assert_eq!(restarts(&s, "app"), 4);
    let t0 = Instant::now();
    let s = pod.until("running", |s| running(s, "app")).await;
    assert_eq!(Instant::now() - t0, Duration::from_secs(10));
    assert_eq!(
        rt.seen(|s| s.launches[0].restarts),
        4,
        "a new instance, not the lost one"
    );
    assert_eq!(restarts(&s, "app"), 4);
}

#[tokio::test(start_paused = true)]
async fn an_exiting_agent_leaves_running_instances_alone() {
    let rt = FakeRuntime::new();
    let live = json!({"livenessProbe": {"exec": {"command": ["true"]}}});
    let mut pod = run(json!({"containers": [container("app", live)]}), &rt);
    pod.until("running", |s| running(s, "app")).await;
    pod.stops.detach.cancel();
    let (_, rt) = pod.ended().await;
    let launch = rt.seen(|s| s.launches[0].clone());
    assert!(launch.detached && launch.signals.is_empty() && !launch.released);
}

#[test]
fn restart_policies_and_backoff_steps() {
    assert_eq!(RestartPolicy::of(None), RestartPolicy::Always);
    assert_eq!(
        RestartPolicy::of(Some("OnFailure")),
        RestartPolicy::OnFailure
    );
    assert_eq!(RestartPolicy::of(Some("Never")), RestartPolicy::Never);
    assert!(
        !RestartPolicy::Always.restarts(true, false),
        "a succeeded init container is done"
    );
    assert!(RestartPolicy::Always.restarts(false, false));
    assert!(!RestartPolicy::OnFailure.restarts(false, false));
    assert!(RestartPolicy::OnFailure.restarts(true, true));
    assert!(!RestartPolicy::Never.restarts(false, true));
    let mut step = None;
    let delays: Vec<u64> = (0..9)
        .map(|_| BACKOFF.next(&mut step, Duration::ZERO).as_secs())
        .collect();
    assert_eq!(delays, [0, 10, 20, 40, 80, 160, 300, 300, 300]);
    let mut step = None;
    assert_eq!(BACKOFF.next(&mut step, BACKOFF.initial), BACKOFF.initial);
}

#[tokio::test(start_paused = true)]
async fn an_instance_ending_by_itself_is_released_and_judged_by_its_exit_code() {
    let rt = FakeRuntime::new();
    let mut pod = run(
        json!({"restartPolicy": "OnFailure", "containers": [container("app", json!({}))]}),
        &rt,
    );
    pod.until("running", |s| running(s, "app")).await;
    rt.exit("app", 0);
    let (s, rt) = pod.ended().await;
    assert_eq!(s.phase.as_deref(), Some("Succeeded"));
    assert_eq!(terminated(&s, "app"), Some((0, "Completed".into())));
    let launch = rt.seen(|s| s.launches[0].clone());
    assert!(launch.released && launch.signals.is_empty());
}
