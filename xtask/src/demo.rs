//! `cargo xtask demo`: the control plane, an Updraft node, a pod running on it.

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use updraft_devcluster::{Layout, cluster};

use crate::node_process::{build_updraft, node_files, start_node, wait, wait_node_ready};

const NODE: &str = "updraft-demo";

/// Runs the demo.
pub async fn run(layout: &Layout) -> anyhow::Result<()> {
    cluster::up(layout).await?;
    println!(
        "control plane ready on https://127.0.0.1:{}",
        cluster::APISERVER_PORT
    );
    let updraft = build_updraft(false)?;
    let files = node_files(layout, NODE)?;
    // Restarted, so it runs this build.
    start_node(layout, &updraft, NODE, &files, &[])?;
    println!(
        "started the Updraft node {NODE}; log: {}",
        layout.log(NODE).display()
    );
    let client = cluster::admin_client(layout).await?;
    wait_node_ready(client.clone(), NODE).await?;

    let pods = Api::<Pod>::namespaced(client, "default");
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "hello-updraft", "namespace": "default",
            // The mock runs the container's command as a host process, so logs and exec
            // have something to show.
            "annotations": {"mock.updraft.dev/run": "true"}
        },
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{
                "name": "hello", "image": "busybox",
                "command": ["sh", "-c", "while true; do echo \"hello from $HOSTNAME at $(date)\"; sleep 5; done"],
                "env": [{"name": "HOSTNAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
            }]
        }
    });
    pods.patch(
        "hello-updraft",
        &PatchParams::apply("updraft-demo").force(),
        &Patch::Apply(&pod),
    )
    .await?;
    wait(
        &pods,
        "hello-updraft",
        "the demo pod running",
        Duration::from_secs(120),
        |pod: &Pod| pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"),
    )
    .await?;

    let kubectl = |args: &[&str]| {
        Command::new(layout.kubectl())
            .env("KUBECONFIG", layout.admin_kubeconfig())
            .args(args)
            .status()
    };
    kubectl(&["get", "nodes", "-o", "wide"])?;
    kubectl(&["get", "pods", "-o", "wide"])?;
    println!("\n$ kubectl logs hello-updraft --tail 1");
    kubectl(&["logs", "hello-updraft", "--tail", "1"])?;
    println!("$ kubectl exec hello-updraft -- sh -c 'echo exec works in $PWD'");
    kubectl(&[
        "exec",
        "hello-updraft",
        "--",
        "sh",
        "-c",
        "echo exec works in $PWD",
    ])?;
    println!(
        "\nThe pod runs on the virtual node {NODE} (mock provider until local cells land). Try:"
    );
    println!("  eval \"$(cargo xtask cluster env)\"");
    println!("  kubectl describe node {NODE}");
    println!("  kubectl logs -f hello-updraft");
    println!("  kubectl exec -it hello-updraft -- sh");
    println!("  kubectl get lease -n kube-node-lease {NODE}");
    println!("Stop everything with: cargo xtask cluster down");
    Ok(())
}
