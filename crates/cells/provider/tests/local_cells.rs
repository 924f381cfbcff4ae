//! The cells provider against the real control plane with real local cells: a pod gets its
//! own cell (a network namespace running the real `updraft-cell` agent), becomes Running,
//! `kubectl logs` and `kubectl exec` reach it through the kubelet API, and deleting it
//! terminates the cell; a restarted provider adopts the running cell and starts no second one.
//!
//! Needs root, the control plane (`cargo xtask cluster up`) and the agent binary next to this
//! test's (`cargo build -p updraft-cell-agent` with the same target directory).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use updraft_cells_backend::CellBackend;

use common::{
    Cells, ConfigOptions, Setup, TIMEOUT, cell_of, delete_node, run_kubectl, running_and_ready,
    sleeping_pod, start_node,
};
use updraft_testing::{eventually, wait_for, wait_for_deletion};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_runs_on_its_own_local_cell_and_deleting_it_terminates_the_cell() {
    let Setup {
        cluster,
        namespace,
        node: node_name,
        tmp,
    } = Setup::new("cells").await;
    let Cells {
        config: test_config,
        cleanup,
        backend,
        controller: controller_id,
    } = Cells::new(tmp.path(), ConfigOptions::new(0));
    let config = test_config.config;
    let cells_of_controller = || async {
        backend
            .list(&controller_id)
            .await
            .unwrap()
            .into_iter()
            .filter(|c| !c.state.is_ending())
            .count()
    };
    assert_eq!(cells_of_controller().await, 0);

    let (provider, stop) = start_node(&cluster, &node_name, &config).await;

    // A pod with the toleration, pinned to the node.
    let pods = Api::<Pod>::namespaced(cluster.client(), namespace.name());
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "hello"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node_name},
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "app",
                "image": "busybox",
                "command": ["/bin/sh", "-c", "echo hello-from-a-cell; exec /bin/sleep 3600"],
                "env": [{"name": "PATH", "value": "/bin"}],
                "resources": {"requests": {"cpu": "1500m", "memory": "512Mi"}}
            }]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let running = wait_for(&pods, "hello", "the pod to run on its cell", TIMEOUT, |p| {
        p.status.as_ref().is_some_and(|s| {
            s.phase.as_deref() == Some("Running")
                && s.container_statuses
                    .as_ref()
                    .is_some_and(|cs| cs.iter().all(|c| c.ready))
        })
    })
    .await;
    let status = running.status.unwrap();
    let cell_condition = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "cells.updraft.dev/Cell")
        .expect("the cell condition");
    let message = cell_condition.message.clone().unwrap_or_default();
    // 1.5 CPU / 512 MiB: the cheapest fitting local type is local.medium.
    assert!(
        message.contains("local.medium") && message.contains("USD/h"),
        "{message}"
    );
    let pod_ip = status.pod_ip.expect("a pod IP");
    assert!(pod_ip.starts_with("10.216."), "pod IP {pod_ip}");
    assert_eq!(cells_of_controller().await, 1, "one cell for the pod");

    // kubectl logs and exec go API server → kubelet API → provider → the cell's agent.
    let logs = eventually(TIMEOUT, || async {
        let output = run_kubectl(&cluster, &["logs", "-n", namespace.name(), "hello"]).await;
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        if text.contains("hello-from-a-cell") {
            Ok(text)
        } else {
            Err(format!(
                "logs {text:?}, stderr {:?}",
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    })
    .await;
    assert!(logs.contains("hello-from-a-cell"), "{logs}");
    let exec = run_kubectl(
        &cluster,
        &[
            "exec",
            "-n",
            namespace.name(),
            "hello",
            "--",
            "/bin/sh",
            "-c",
            "echo exec-on-$(hostname); exit 3",
        ],
    )
    .await;
    let stdout = String::from_utf8_lossy(&exec.stdout);
    assert!(
        stdout.contains("exec-on-"),
        "stdout {stdout:?}, stderr {:?}",
        String::from_utf8_lossy(&exec.stderr)
    );
    assert_eq!(exec.status.code(), Some(3), "the exit code comes through");

    // Updraft restarts: a new provider over the same state adopts the cell (its agent still
    // runs the pod) and starts nothing twice.
    let _ = stop.send(true);
    provider.shutdown();
    drop(provider);
    let (provider, stop) = start_node(&cluster, &node_name, &config).await;
    let pod_ref = updraft_provider::PodRef::of(&pods.get("hello").await.unwrap());
    eventually(TIMEOUT, || async {
        use updraft_provider::Provider as _;
        match provider.pod_status(&pod_ref).await {
            Ok(Some(status)) if status.phase.as_deref() == Some("Running") => Ok(()),
            other => Err(format!("the restarted provider reports {other:?}")),
        }
    })
    .await;
    assert_eq!(
        cells_of_controller().await,
        1,
        "the restarted provider started no second cell"
    );

    // Deleting the pod terminates its cell.
    pods.delete("hello", &DeleteParams::default())
        .await
        .unwrap();
    wait_for_deletion(&pods, "hello", TIMEOUT).await;
    eventually(TIMEOUT, || async {
        match cells_of_controller().await {
            0 => Ok(()),
            n => Err(format!("{n} cells left")),
        }
    })
    .await;

    let _ = stop.send(true);
    provider.shutdown();
    delete_node(&node_name);
    drop(cleanup);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cell_killed_from_outside_is_replaced_per_restart_policy() {
    let Setup {
        cluster,
        namespace,
        node: node_name,
        tmp,
    } = Setup::new("cells-lost").await;
    let Cells {
        config: test_config,
        cleanup,
        backend,
        ..
    } = Cells::new(tmp.path(), ConfigOptions::new(1));
    let config = test_config.config;
    let (provider, stop) = start_node(&cluster, &node_name, &config).await;
    let pods = Api::<Pod>::namespaced(cluster.client(), namespace.name());
    let pod = sleeping_pod("survivor", &node_name, "busybox");
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let first = wait_for(&pods, "survivor", "the pod to run", TIMEOUT, |p| {
        running_and_ready(p) && cell_of(p).is_some()
    })
    .await;
    let first_cell = cell_of(&first).unwrap();
    // Killed from outside (an operator, a spot interruption).
    backend
        .terminate(&updraft_cells_backend::CellId(first_cell.clone()))
        .await
        .unwrap();
    let second = wait_for(
        &pods,
        "survivor",
        "the pod to run again on a new cell",
        TIMEOUT,
        |p| running_and_ready(p) && cell_of(p).is_some_and(|c| c != first_cell),
    )
    .await;
    assert_eq!(
        second.metadata.uid, first.metadata.uid,
        "the same pod, restarted on a new cell"
    );
    let live: Vec<_> = backend
        .list(&config.controller_id)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| !c.state.is_ending())
        .collect();
    assert_eq!(live.len(), 1, "exactly the replacement cell: {live:?}");
    pods.delete("survivor", &DeleteParams::default())
        .await
        .unwrap();
    wait_for_deletion(&pods, "survivor", TIMEOUT).await;
    let _ = stop.send(true);
    provider.shutdown();
    delete_node(&node_name);
    drop(cleanup);
}
