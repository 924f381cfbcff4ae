//! Cells whose agent has not answered yet, and cells that belong to no pod, with real local
//! cells, the real control plane and (for the kill) the real `updraft` binary:
//!
//! - `updraft` SIGKILLed while a pod's cell boots (its agent held back by a gate, as a cloud
//!   instance still booting): the restarted Updraft adopts that very cell, keeps waiting for it
//!   past `healthTimeout` (its `bootTimeout` counts from the launch), and the pod runs on it; no
//!   second cell is ever started for the pod.
//! - Deleting a pod whose cell still boots terminates the cell at once (`bootTimeout` is ten
//!   minutes here, longer than the test may take).
//! - A cell that belongs to no pod is terminated once its `gcGracePeriod` is over, not before;
//!   the cell of a live pod stays.
//!
//! Needs root, the control plane and the `updraft` and `updraft-cell` binaries (see `common`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use updraft_cells_backend::{Cell, CellBackend, CellIdentity, CellSpec, CellState, LaunchType};
use updraft_cells_local::LocalBackend;
use updraft_testing::{eventually, wait_for, wait_for_deletion};

use common::{
    Cells, ConfigOptions, GatedAgent, Setup, TIMEOUT, UpdraftProcess, cell_of, delete_node,
    every_cell, free_port, live_cells, running_and_ready, sleeping_pod, start_node,
    start_node_configured, wait_node_ready,
};

fn pod(name: &str, node: &str) -> Pod {
    sleeping_pod(name, node, "busybox")
}

/// The cells the backend ever started for pod `uid` (terminated ones included).
fn cells_of_pod(backend: &LocalBackend, controller: &str, uid: &str) -> Vec<Cell> {
    every_cell(backend, controller)
        .into_iter()
        .filter(|c| c.identity.as_ref().is_some_and(|i| i.pod_uid == uid))
        .collect()
}

/// Waits until pod `uid` has a cell whose agent process runs (behind the gate) and returns it.
async fn booting_cell(backend: &LocalBackend, controller: &str, uid: &str) -> Cell {
    eventually(TIMEOUT, || async {
        match cells_of_pod(backend, controller, uid).as_slice() {
            [cell] if cell.state == CellState::Running => Ok(cell.clone()),
            other => Err(format!("cells of the pod: {other:?}")),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cell_booting_when_updraft_is_killed_is_adopted_and_never_started_twice() {
    let Setup {
        cluster,
        namespace,
        node,
        tmp,
    } = Setup::new("cells-boot-kill").await;
    let gate = GatedAgent::new(tmp.path());
    let mut options = ConfigOptions::new(11);
    options.agent_binary = Some(gate.binary.clone());
    options.boot_timeout = Some("10m");
    options.health_timeout = Some("3s");
    let Cells {
        config,
        cleanup,
        backend,
        controller,
    } = Cells::new(tmp.path(), options);

    let port = free_port();
    let updraft = UpdraftProcess::start(&cluster, &node, port, &config);
    wait_node_ready(&cluster, &node).await;
    let pods = Api::<Pod>::namespaced(cluster.client(), namespace.name());
    let created = pods
        .create(&PostParams::default(), &pod("slow-boot", &node))
        .await
        .unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    let cell = booting_cell(&backend, &controller, &uid).await;

    // Killed while the cell boots (its agent has not answered), then started again.
    updraft.kill();
    let updraft = UpdraftProcess::start(&cluster, &node, port, &config);
    // The restarted Updraft finds the cell, and its watcher goes past healthTimeout (3s)
    // without an answer: the point where a booting cell used to be given up and replaced.
    eventually(TIMEOUT, || async {
        let log = updraft.log();
        let ended = backend
            .describe(&cell.id)
            .await
            .map(|c| c.state.is_ending())
            .unwrap_or(true);
        if ended || log.contains("waiting for it to boot") {
            Ok(())
        } else {
            Err("the restarted Updraft has not waited past healthTimeout yet".to_owned())
        }
    })
    .await;
    let now = backend.describe(&cell.id).await.unwrap();
    assert!(
        !now.state.is_ending(),
        "the booting cell was given up after the restart: {now:?}"
    );
    assert_eq!(cells_of_pod(&backend, &controller, &uid).len(), 1);

    // The agent comes up: the pod runs on that very cell, the only one it ever had.
    gate.open();
    let running = wait_for(&pods, "slow-boot", "the pod to run", TIMEOUT, |p| {
        running_and_ready(p) && cell_of(p).is_some()
    })
    .await;
    assert_eq!(cell_of(&running), Some(cell.id.0.clone()));
    let ever = cells_of_pod(&backend, &controller, &uid);
    assert_eq!(
        ever.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        vec![cell.id.clone()],
        "one cell for the pod, ever: {ever:?}"
    );

    pods.delete("slow-boot", &DeleteParams::default())
        .await
        .unwrap();
    wait_for_deletion(&pods, "slow-boot", TIMEOUT).await;
    eventually(TIMEOUT, || async {
        match live_cells(&backend, &controller).await.len() {
            0 => Ok(()),
            n => Err(format!("{n} cells left")),
        }
    })
    .await;
    updraft.kill();
    delete_node(&node);
    drop(cleanup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_pod_whose_cell_boots_terminates_the_cell_without_waiting_for_the_boot() {
    let Setup {
        cluster,
        namespace,
        node: node_name,
        tmp,
    } = Setup::new("cells-boot-delete").await;
    // The gate stays closed: the agent never answers.
    let gate = GatedAgent::new(tmp.path());
    let mut options = ConfigOptions::new(12);
    options.agent_binary = Some(gate.binary.clone());
    // Longer than TIMEOUT: a delete that waited for the boot would fail the test.
    options.boot_timeout = Some("10m");
    let Cells {
        config,
        cleanup,
        backend,
        controller,
    } = Cells::new(tmp.path(), options);

    let (_provider, stop) = start_node(&cluster, &node_name, &config.config).await;
    let pods = Api::<Pod>::namespaced(cluster.client(), namespace.name());
    let created = pods
        .create(&PostParams::default(), &pod("never-boots", &node_name))
        .await
        .unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    let cell = booting_cell(&backend, &controller, &uid).await;

    pods.delete("never-boots", &DeleteParams::default())
        .await
        .unwrap();
    wait_for_deletion(&pods, "never-boots", TIMEOUT).await;
    let gone = backend.describe(&cell.id).await.unwrap();
    assert!(
        gone.state.is_ending(),
        "the booting cell was terminated: {gone:?}"
    );
    assert!(live_cells(&backend, &controller).await.is_empty());
    assert_eq!(cells_of_pod(&backend, &controller, &uid).len(), 1);

    let _ = stop.send(true);
    delete_node(&node_name);
    drop(cleanup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cell_of_no_pod_is_collected_after_its_grace_period_and_a_live_pods_cell_stays() {
    let Setup {
        cluster,
        namespace,
        node: node_name,
        tmp,
    } = Setup::new("cells-orphan").await;
    let mut options = ConfigOptions::new(13);
    // A long boot timeout: the orphan (no agent) can only go by garbage collection here.
    options.boot_timeout = Some("10m");
    options.extra = "gcGracePeriod: 20s\ngcInterval: 2s\n".to_owned();
    let Cells {
        config,
        cleanup,
        backend,
        controller,
    } = Cells::new(tmp.path(), options);

    let (_provider, stop) = start_node_configured(&cluster, &node_name, &config.config, |node| {
        node.orphan_sweep_interval = std::time::Duration::from_secs(2);
    })
    .await;
    let pods = Api::<Pod>::namespaced(cluster.client(), namespace.name());
    pods.create(&PostParams::default(), &pod("alive", &node_name))
        .await
        .unwrap();
    let running = wait_for(&pods, "alive", "the pod to run", TIMEOUT, |p| {
        running_and_ready(p) && cell_of(p).is_some()
    })
    .await;
    let alive_cell = cell_of(&running).unwrap();

    // A cell of this controller and node for a pod the API does not have (a start another run
    // left behind, a pod force-deleted while Updraft was down).
    let orphan = backend
        .start(&CellSpec {
            name: "orphan".into(),
            instance_type: "local.nano".into(),
            launch_type: LaunchType::OnDemand,
            image: None,
            user_data: b"#cloud-config\nruncmd:\n  - [sleep, '3600']\n".to_vec(),
            identity: CellIdentity {
                controller_id: controller.clone(),
                node: node_name.clone(),
                namespace: namespace.name().to_owned(),
                pod_name: "ghost".into(),
                pod_uid: "00000000-0000-0000-0000-00000000dead".into(),
                pod_labels: Default::default(),
            },
            security_groups: vec![],
            private_ip_only: true,
            root_volume_bytes: None,
            instance_profile: None,
            idempotency_token: "orphan-0".into(),
        })
        .await
        .unwrap();
    eventually(TIMEOUT, || async {
        let state = backend
            .describe(&orphan.id)
            .await
            .map_err(|e| e.to_string())?
            .state;
        // Terminated, not just Terminating: the record's termination time is written when the
        // cell is gone.
        if state == CellState::Terminated {
            Ok(())
        } else {
            Err(format!("the orphan is still {state}"))
        }
    })
    .await;
    // Not before its grace period was over (counted from when Updraft found it, which is
    // after its launch).
    let record = backend.record(&orphan.id).unwrap();
    let lived_ms = record
        .terminated_time_ms
        .unwrap()
        .saturating_sub(record.launch_time_ms);
    assert!(
        lived_ms >= 20_000,
        "the orphan was terminated {lived_ms} ms after its launch, within its 20 s grace period"
    );
    // The live pod's cell was never touched.
    let live: Vec<String> = live_cells(&backend, &controller)
        .await
        .into_iter()
        .map(|c| c.id.0)
        .collect();
    assert_eq!(live, vec![alive_cell.clone()]);
    let still = pods.get("alive").await.unwrap();
    assert!(running_and_ready(&still));
    assert_eq!(cell_of(&still), Some(alive_cell));

    pods.delete("alive", &DeleteParams::default())
        .await
        .unwrap();
    wait_for_deletion(&pods, "alive", TIMEOUT).await;
    let _ = stop.send(true);
    delete_node(&node_name);
    drop(cleanup);
}
