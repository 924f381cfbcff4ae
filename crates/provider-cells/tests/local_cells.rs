//! The cells provider against the real control plane with real local cells: a pod gets its
//! own cell (a network namespace running the real `updraft-cell` agent), becomes Running,
//! `kubectl logs` and `kubectl exec` reach it through the kubelet API, and deleting it
//! terminates the cell; a restarted provider adopts the running cell and starts no second one.
//!
//! Needs root, the control plane (`cargo xtask cluster up`) and the agent binary next to this
//! test's (`cargo build -p updraft-cell-agent` with the same target directory).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use updraft_cells_backend::CellBackend;
use updraft_devcluster::pki::{CertificateAuthority, Identity};
use updraft_kubelet_api::auth::{Auth, AuthConfig};
use updraft_kubelet_api::routes::{KubeletState, routes};
use updraft_kubelet_api::server::{protect, serve};
use updraft_kubelet_api::tls::{ServingCertificate, server_config};
use updraft_node::{NodeConfig, VirtualNode};
use updraft_provider_cells::{CellsConfig, CellsProvider, local_backend};
use updraft_testing::{TestCluster, eventually, unique_name, wait_for, wait_for_deletion};

const TIMEOUT: Duration = Duration::from_secs(180);

fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("updraft-cell"))
        .unwrap();
    assert!(
        path.is_file(),
        "the agent binary {} is missing: build it first with `cargo build -p updraft-cell-agent` (same CARGO_TARGET_DIR)",
        path.display()
    );
    path
}

fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    let list = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
}

/// Terminates every cell of the test's backend and removes its bridge, also when the test
/// fails: nothing leaks.
struct CellsCleanup(updraft_cells_local::LocalBackend);

impl Drop for CellsCleanup {
    fn drop(&mut self) {
        if let Ok(scan) = self.0.scan() {
            for cell in scan.cells {
                let _ = self.0.terminate_blocking(&cell.id);
            }
        }
        let _ = self.0.remove_bridge_if_unused();
    }
}

async fn run_kubectl(cluster: &TestCluster, args: &[&str]) -> std::process::Output {
    let mut command = tokio::process::Command::from(cluster.kubectl());
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish within {TIMEOUT:?}"))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_runs_on_its_own_local_cell_and_deleting_it_terminates_the_cell() {
    assert!(
        nix_is_root(),
        "this test must run as root (network namespaces, cgroups, mounts)"
    );
    if let Ok(filter) = std::env::var("UPDRAFT_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let cluster = TestCluster::connect().await;
    let namespace = cluster.namespace("cells").await;
    let node_name = unique_name("cells-node");
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), 0);
    let cleanup = CellsCleanup(local_backend(&config).unwrap());
    let backend = cleanup.0.clone();
    let controller_id = config.controller_id.clone();
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
    updraft_testing::cleanup_as_admin({
        let name = node_name.clone();
        move |client| async move {
            let _ = Api::<Node>::all(client)
                .delete(&name, &DeleteParams::default())
                .await;
        }
    });
    drop(cleanup);
}

/// A cells config for a test: its own state, CIDR, bridge, cgroup and controller id.
fn write_config(dir: &Path, n: u32) -> CellsConfig {
    let rootfs = dir.join("busybox-image");
    busybox_rootfs(&rootfs);
    let pid = std::process::id();
    let config_text = format!(
        r#"backend: local
controllerId: test-{pid}-{n}
certificateDir: {dir}/pki
bootTimeout: 60s
healthTimeout: 30s
agent:
  dir: {dir}/agent
  tlsDir: {dir}/tls
  extraArgs: ["--image-dir", "busybox={rootfs}"]
local:
  stateDir: {dir}/state
  cidr: 10.216.{third}.0/24
  bridge: upc{short}x{n}
  agentBinary: {agent}
  cgroupParent: updraft-provider-cells-test-{pid}-{n}
  privateDirs: [{dir}/agent]
capacity: {{cpu: "16", memory: 64Gi, pods: "20"}}
"#,
        dir = dir.display(),
        rootfs = rootfs.display(),
        third = (pid * 2 + n) % 250 + 1,
        short = pid % 100_000,
        agent = agent_binary().display(),
    );
    let config_path = dir.join("cells.yaml");
    std::fs::write(&config_path, &config_text).unwrap();
    CellsConfig::load(&config_path).unwrap()
}

/// The cell id in a pod's `cells.updraft.dev/Cell` condition (`cell <id> (…): …`).
fn cell_of(pod: &Pod) -> Option<String> {
    let condition = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "cells.updraft.dev/Cell" && c.status == "True")?;
    let message = condition.message.as_deref()?;
    Some(message.strip_prefix("cell ")?.split(' ').next()?.to_owned())
}

fn running_and_ready(pod: &Pod) -> bool {
    pod.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Running")
            && s.container_statuses
                .as_ref()
                .is_some_and(|cs| cs.iter().all(|c| c.ready))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cell_killed_from_outside_is_replaced_per_restart_policy() {
    assert!(nix_is_root(), "this test must run as root");
    let cluster = TestCluster::connect().await;
    let namespace = cluster.namespace("cells-lost").await;
    let node_name = unique_name("cells-lost");
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), 1);
    let cleanup = CellsCleanup(local_backend(&config).unwrap());
    let backend = cleanup.0.clone();
    let (provider, stop) = start_node(&cluster, &node_name, &config).await;
    let pods = Api::<Pod>::namespaced(cluster.client(), namespace.name());
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "survivor"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node_name},
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": "busybox",
                "command": ["/bin/sleep", "3600"],
            }]
        }
    }))
    .unwrap();
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
    updraft_testing::cleanup_as_admin({
        let name = node_name.clone();
        move |client| async move {
            let _ = Api::<Node>::all(client)
                .delete(&name, &DeleteParams::default())
                .await;
        }
    });
    drop(cleanup);
}

/// Starts the node (and its kubelet API on a loopback port) with a cells provider from
/// `config`; the sender stops both.
async fn start_node(
    cluster: &TestCluster,
    node_name: &str,
    config: &CellsConfig,
) -> (Arc<CellsProvider>, tokio::sync::watch::Sender<bool>) {
    let node_name = node_name.to_owned();
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let local = listener.local_addr().unwrap();
    let ca = CertificateAuthority::load(&cluster.layout().pki()).unwrap();
    let serving = ca
        .issue(&Identity {
            common_name: node_name.clone(),
            dns_names: vec![node_name.clone()],
            ip_addresses: vec![local.ip()],
            server: true,
            ..Identity::default()
        })
        .unwrap();
    let serving =
        ServingCertificate::from_pem(serving.cert_pem.as_bytes(), serving.key_pem.as_bytes())
            .unwrap();
    let tls = server_config(serving, Some(ca.cert_pem().as_bytes())).unwrap();
    let client = cluster.node_client(&node_name).await;
    let provider = Arc::new(
        CellsProvider::from_config(config, &node_name)
            .await
            .unwrap(),
    );
    let auth = Arc::new(Auth::new(client.clone(), AuthConfig::new(&node_name)));
    let app = protect(
        routes(KubeletState {
            provider: provider.clone(),
            client: client.clone(),
            node_name: node_name.clone(),
            metrics: Arc::new(String::new),
        }),
        auth,
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::spawn(serve(listener, tls, app, until_stopped(stopped.clone())));
    let mut node_config = NodeConfig::new(&node_name, "cells");
    node_config.internal_ip = local.ip().to_string();
    node_config.kubelet_port = local.port();
    let node = VirtualNode::new(client, node_config, provider.clone());
    tokio::spawn(node.run(until_stopped(stopped)));
    (provider, stop)
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}
