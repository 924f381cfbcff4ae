//! The standby pool with real local cells and the real control plane: the configured idle cell
//! boots before any pod exists; a pod whose selected type is pooled runs on that very cell; the
//! pool refills with a new cell; deleting the pod terminates only its cell; a restarted Updraft
//! finds the pool in the backend's listing and starts nothing twice. A burst as large as the
//! pool runs entirely on the pool's cells, and the pool is refilled to its size afterwards.
//!
//! Needs root, the control plane (`cargo xtask cluster up`) and the agent binary next to this
//! test's (`cargo build -p updraft-cell-agent` with the same target directory).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use updraft_cells_backend::Cell;
use updraft_cells_local::LocalBackend;
use updraft_testing::{eventually, wait_for, wait_for_deletion};

use common::{
    Cells, ConfigOptions, Setup, TIMEOUT, cell_of, delete_node, live_cells, running_and_ready,
    sleeping_pod, start_node,
};

/// The idle standby cells of `controller_id`.
async fn standby_cells(backend: &LocalBackend, controller_id: &str) -> Vec<Cell> {
    live_cells(backend, controller_id)
        .await
        .into_iter()
        .filter(|c| c.identity.as_ref().is_some_and(|i| i.is_standby()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_takes_a_standby_cell_and_the_pool_refills() {
    let Setup {
        cluster,
        namespace,
        node: node_name,
        tmp,
    } = Setup::new("cells-standby").await;
    let mut options = ConfigOptions::new(5);
    options.extra = "standbyPool:\n- {instanceType: local.small, count: 1}\n".to_owned();
    let Cells {
        config: test_config,
        cleanup,
        backend,
        controller: controller_id,
    } = Cells::new(tmp.path(), options);
    let config = test_config.config.clone();

    let (provider, stop) = start_node(&cluster, &node_name, &config).await;
    // The pool's cell starts with no pod around (pods claim running standby cells only).
    let pooled = eventually(TIMEOUT, || async {
        match standby_cells(&backend, &controller_id).await.as_slice() {
            [cell] if cell.state == updraft_cells_backend::CellState::Running => Ok(cell.clone()),
            other => Err(format!("{} standby cells", other.len())),
        }
    })
    .await;
    assert_eq!(pooled.instance_type, "local.small");
    assert_eq!(live_cells(&backend, &controller_id).await.len(), 1);

    // A pod that requests nothing gets the default type, local.small: the standby cell.
    let pods = Api::<Pod>::namespaced(cluster.client(), namespace.name());
    let mut pod = sleeping_pod("quick", &node_name, "busybox");
    pod.metadata.labels = Some([("app".to_owned(), "quick".to_owned())].into());
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    let running = wait_for(&pods, "quick", "the pod to run", TIMEOUT, |p| {
        running_and_ready(p) && cell_of(p).is_some()
    })
    .await;
    assert_eq!(
        cell_of(&running).as_deref(),
        Some(pooled.id.0.as_str()),
        "the pod runs on the standby cell"
    );
    let claimed = backend_describe(&backend, &pooled).await;
    let identity = claimed.identity.unwrap();
    assert_eq!(identity.pod_uid, created.metadata.uid.unwrap());
    assert_eq!(identity.pod_labels["app"], "quick");

    // The pool refills with a new cell; the pod's cell is not part of it any more.
    let refill = eventually(TIMEOUT, || async {
        match standby_cells(&backend, &controller_id).await.as_slice() {
            [cell] if cell.id != pooled.id => Ok(cell.clone()),
            other => Err(format!("standby cells: {other:?}")),
        }
    })
    .await;
    assert_eq!(live_cells(&backend, &controller_id).await.len(), 2);

    // Updraft restarts: the pod keeps its cell, the pool is found, nothing starts twice.
    let _ = stop.send(true);
    provider.shutdown();
    drop(provider);
    let (provider, stop) = start_node(&cluster, &node_name, &config).await;
    provider.reconcile_standby_pool().await;
    let standby: Vec<_> = standby_cells(&backend, &controller_id)
        .await
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(standby, vec![refill.id.clone()]);
    assert_eq!(live_cells(&backend, &controller_id).await.len(), 2);

    // Deleting the pod terminates its cell only; the standby cell stays.
    pods.delete("quick", &DeleteParams::default())
        .await
        .unwrap();
    wait_for_deletion(&pods, "quick", TIMEOUT).await;
    eventually(TIMEOUT, || async {
        let live: Vec<_> = live_cells(&backend, &controller_id)
            .await
            .into_iter()
            .map(|c| c.id)
            .collect();
        if live == vec![refill.id.clone()] {
            Ok(())
        } else {
            Err(format!("live cells {live:?}"))
        }
    })
    .await;
    provider.collect_garbage().await;
    assert_eq!(
        standby_cells(&backend, &controller_id).await.len(),
        1,
        "the garbage collector leaves the pool alone"
    );

    let _ = stop.send(true);
    provider.shutdown();
    delete_node(&node_name);
    drop(cleanup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_runs_on_the_pool_and_the_pool_is_refilled_to_its_size() {
    let Setup {
        cluster,
        namespace,
        node: node_name,
        tmp,
    } = Setup::new("cells-standby-burst").await;
    let mut options = ConfigOptions::new(6);
    options.extra = "standbyPool:\n- {instanceType: local.small, count: 4}\n".to_owned();
    let Cells {
        config: test_config,
        cleanup,
        backend,
        controller: controller_id,
    } = Cells::new(tmp.path(), options);
    let config = test_config.config.clone();

    let (provider, stop) = start_node(&cluster, &node_name, &config).await;
    let pooled: Vec<String> = eventually(TIMEOUT, || async {
        let cells = standby_cells(&backend, &controller_id).await;
        if cells.len() == 4
            && cells
                .iter()
                .all(|c| c.state == updraft_cells_backend::CellState::Running)
        {
            Ok(cells.into_iter().map(|c| c.id.0).collect())
        } else {
            Err(format!("standby cells: {cells:?}"))
        }
    })
    .await;

    // Four pods at once, each of the pooled type: each runs on one of the pool's cells.
    let pods = Api::<Pod>::namespaced(cluster.client(), namespace.name());
    let names: Vec<String> = (0..4).map(|i| format!("burst-{i}")).collect();
    futures::future::join_all(names.iter().map(|name| {
        let pods = pods.clone();
        let pod = sleeping_pod(name, &node_name, "busybox");
        async move { pods.create(&PostParams::default(), &pod).await.unwrap() }
    }))
    .await;
    let mut used = Vec::new();
    for name in &names {
        let running = wait_for(&pods, name, "the pod to run", TIMEOUT, |p| {
            running_and_ready(p) && cell_of(p).is_some()
        })
        .await;
        used.push(cell_of(&running).unwrap());
    }
    used.sort();
    used.dedup();
    assert_eq!(used.len(), 4, "four pods, four cells: {used:?}");
    assert!(
        used.iter().all(|cell| pooled.contains(cell)),
        "every pod of the burst runs on a standby cell: {used:?}, pool {pooled:?}"
    );

    // Once the burst is over the pool is back to its size, with new cells.
    eventually(TIMEOUT, || async {
        let cells = standby_cells(&backend, &controller_id).await;
        let fresh = cells.iter().filter(|c| !pooled.contains(&c.id.0)).count();
        if cells.len() == 4 && fresh == 4 {
            Ok(())
        } else {
            Err(format!("standby cells: {cells:?}"))
        }
    })
    .await;
    assert_eq!(live_cells(&backend, &controller_id).await.len(), 8);

    let _ = stop.send(true);
    provider.shutdown();
    delete_node(&node_name);
    drop(cleanup);
}

async fn backend_describe(backend: &LocalBackend, cell: &Cell) -> Cell {
    use updraft_cells_backend::CellBackend as _;
    backend.describe(&cell.id).await.unwrap()
}
