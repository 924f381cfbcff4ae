//! The real `updraft` binary SIGKILLed in the middle of a burst of pods on local cells and
//! started again: every pod runs (none lost, the same API objects), each on exactly one live
//! cell, no pod ever got a second cell, neither those that ran at the kill nor those whose
//! cells were booting or being created (terminated cells stay listed by the backend, so a cell
//! started twice and cleaned up later would still show), no container restarted; deleting the
//! pods leaves no cell.
//!
//! Needs root, socat, docker-registry, the control plane and the `updraft` and `updraft-cell`
//! binaries (see `common`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use updraft_cells_backend::Cell;

use common::{
    Cells, ConfigOptions, Images, LoopbackRegistry, Setup, TIMEOUT, UpdraftProcess, cell_of,
    delete_node, every_cell, free_port, live_cells, running_and_ready, wait_node_ready,
};
use updraft_testing::eventually;

const PODS: usize = 6;

fn pod(name: &str, node: &str, image: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"burst": "yes"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": image,
                "command": ["/bin/sh", "-c", "echo started; exec /bin/sleep 3600"],
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}
            }]
        }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn updraft_killed_mid_burst_loses_no_pod_starts_none_twice_and_leaks_no_cell() {
    let Setup {
        cluster,
        namespace,
        node,
        tmp,
    } = Setup::new("cells-burst").await;
    let ns = namespace.name().to_owned();
    let registry = LoopbackRegistry::start(tmp.path()).await;
    let mut options = ConfigOptions::new(2);
    options.images = Images::Registry(&registry);
    let Cells {
        config,
        cleanup,
        backend,
        controller,
    } = Cells::new(tmp.path(), options);
    assert!(every_cell(&backend, &controller).is_empty());

    let port = free_port();
    let updraft = UpdraftProcess::start(&cluster, &node, port, &config);
    wait_node_ready(&cluster, &node).await;
    let pods = Api::<Pod>::namespaced(cluster.client(), &ns);
    let names: Vec<String> = (0..PODS).map(|i| format!("burst-{i}")).collect();
    for name in &names {
        pods.create(&PostParams::default(), &pod(name, &node, &registry.image))
            .await
            .unwrap();
    }
    let uids: BTreeMap<String, String> = pods
        .list(&ListParams::default().labels("burst=yes"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| (p.metadata.name.unwrap(), p.metadata.uid.unwrap()))
        .collect();
    assert_eq!(uids.len(), PODS);

    // Mid-burst: as soon as the first pod runs (the others' cells are still being started),
    // SIGKILL (no shutdown path runs).
    eventually(TIMEOUT, || async {
        let pods = pods
            .list(&ListParams::default().labels("burst=yes"))
            .await
            .map_err(|e| e.to_string())?;
        if pods.items.iter().any(running_and_ready) {
            Ok(())
        } else {
            Err("no pod runs yet".to_owned())
        }
    })
    .await;
    updraft.kill();
    let running_at_kill: BTreeSet<String> = pods
        .list(&ListParams::default().labels("burst=yes"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(running_and_ready)
        .filter_map(|p| p.metadata.uid)
        .collect();
    eprintln!(
        "killed updraft with {} cells started and {} of {PODS} pods Running",
        every_cell(&backend, &controller).len(),
        running_at_kill.len()
    );
    let updraft = UpdraftProcess::start(&cluster, &node, port, &config);

    let ready = eventually(TIMEOUT, || async {
        let all = pods
            .list(&ListParams::default().labels("burst=yes"))
            .await
            .map_err(|e| e.to_string())?
            .items;
        let not_ready: Vec<String> = all
            .iter()
            .filter(|p| !(running_and_ready(p) && cell_of(p).is_some()))
            .map(|p| {
                let s = p.status.clone().unwrap_or_default();
                format!(
                    "{}: {:?} {:?} {:?}",
                    p.metadata.name.clone().unwrap_or_default(),
                    s.phase,
                    s.reason,
                    s.message
                )
            })
            .collect();
        if all.len() == PODS && not_ready.is_empty() {
            Ok(all)
        } else {
            Err(format!("{} pods, not ready: {not_ready:?}", all.len()))
        }
    })
    .await;

    // None lost: the same API objects run (nothing was re-created under them).
    let after: BTreeMap<String, String> = ready
        .iter()
        .map(|p| {
            (
                p.metadata.name.clone().unwrap(),
                p.metadata.uid.clone().unwrap(),
            )
        })
        .collect();
    assert_eq!(after, uids, "the same pods run");
    // None started twice: every pod runs on exactly one cell, the one its condition names. The
    // backend lists terminated cells too, so a pod that ever had a second cell shows here.
    // That holds for the cells the kill caught booting (adopted) and for those whose creation
    // it cut short (finished under the same id by the restarted Updraft).
    let started = every_cell(&backend, &controller);
    let mut cells_per_pod: BTreeMap<String, Vec<&Cell>> = BTreeMap::new();
    for cell in &started {
        let uid = cell.identity.as_ref().unwrap().pod_uid.clone();
        cells_per_pod.entry(uid).or_default().push(cell);
    }
    assert_eq!(cells_per_pod.len(), PODS, "cells by pod: {started:?}");
    for pod in &ready {
        let uid = pod.metadata.uid.clone().unwrap();
        let cells = &cells_per_pod[&uid];
        let live: Vec<&&Cell> = cells.iter().filter(|c| !c.state.is_ending()).collect();
        assert_eq!(
            live.iter().map(|c| c.id.0.clone()).collect::<Vec<_>>(),
            [cell_of(pod).unwrap()],
            "{:?} runs on exactly the cell its condition names: {cells:?}",
            pod.metadata.name
        );
        let replaced: Vec<&&Cell> = cells.iter().filter(|c| c.state.is_ending()).collect();
        assert!(
            replaced.is_empty(),
            "{:?} got a second cell (it was {} when updraft was killed): {cells:?}",
            pod.metadata.name,
            if running_at_kill.contains(&uid) {
                "running"
            } else {
                "starting"
            }
        );
    }
    for pod in &ready {
        let restarts: i32 = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|cs| cs.iter().map(|c| c.restart_count).sum())
            .unwrap_or(0);
        assert_eq!(
            restarts, 0,
            "{:?} restarted its container",
            pod.metadata.name
        );
    }

    // Deleting the pods leaves no cell behind.
    pods.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("burst=yes"),
    )
    .await
    .unwrap();
    eventually(TIMEOUT, || async {
        let left = pods
            .list(&ListParams::default().labels("burst=yes"))
            .await
            .unwrap()
            .items
            .len();
        let live = live_cells(&backend, &controller).await.len();
        if left == 0 && live == 0 {
            Ok(())
        } else {
            Err(format!("{left} pods and {live} cells left"))
        }
    })
    .await;
    let uids_seen: BTreeSet<String> = every_cell(&backend, &controller)
        .iter()
        .filter_map(|c| c.identity.as_ref().map(|i| i.pod_uid.clone()))
        .collect();
    assert_eq!(
        uids_seen,
        uids.values().cloned().collect(),
        "the backend started cells for exactly the burst's pods"
    );
    updraft.kill();
    delete_node(&node);
    drop(cleanup);
}
