//! The `updraft` binary killed with SIGKILL and started again: no pod in the API is lost or
//! duplicated, what changed while it was down is reconciled, and the provider runs exactly
//! the pods the API binds to the node (read from the kubelet API's `/runningpods/`).
//!
//! The mock provider keeps its pods in memory, so here the restarted process re-creates
//! them; that pods keep running in a provider that outlives the process is the cells
//! provider's test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use updraft_devcluster::cluster::{NodeFiles, node_files};
use updraft_testing::{TestCluster, eventually, unique_name, wait_for, wait_for_deletion};

const TIMEOUT: Duration = Duration::from_secs(90);

/// The `updraft` process and its log file; SIGKILLed when dropped, its log printed when the
/// test is failing.
struct NodeProcess(Child, std::path::PathBuf);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.1).unwrap_or_default();
            eprintln!("--- {} ---\n{log}", self.1.display());
        }
    }
}

fn start(files: &NodeFiles, node: &str, port: u16) -> NodeProcess {
    let log_path = files.dir.join("updraft.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_updraft"))
        .args(["run", "--provider", "mock", "--nodename", node])
        .arg("--kubeconfig")
        .arg(&files.kubeconfig)
        .arg("--tls-cert-file")
        .arg(&files.serving.0)
        .arg("--tls-key-file")
        .arg(&files.serving.1)
        .arg("--client-ca-file")
        .arg(&files.client_ca)
        .args(["--kubelet-port", &port.to_string()])
        .env("RUST_LOG", "info,updraft_node=debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    NodeProcess(child, log_path)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn pod(node: &str, name: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists"}],
            "containers": [{"name": "main", "image": "busybox"}]
        }
    }))
    .unwrap()
}

fn running(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// What the provider runs in `namespace`, as the kubelet API's `/runningpods/` reports it,
/// asked with the API server's kubelet-client certificate.
async fn running_pods(
    cluster: &TestCluster,
    port: u16,
    namespace: &str,
) -> Result<Vec<String>, String> {
    let pki = cluster.layout().pki();
    let read = |name: &str| std::fs::read(pki.join(name)).unwrap();
    let mut identity = read("apiserver-kubelet-client.crt");
    identity.extend(read("apiserver-kubelet-client.key"));
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&read("ca.crt")).unwrap())
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let list: serde_json::Value = client
        .get(format!("https://127.0.0.1:{port}/runningpods/"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let mut names: Vec<String> = list["items"]
        .as_array()
        .ok_or_else(|| format!("not a list: {list}"))?
        .iter()
        .filter(|p| p["metadata"]["namespace"] == namespace)
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    Ok(names)
}

#[tokio::test]
async fn a_killed_node_loses_and_duplicates_nothing() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("sigkill").await;
    let node = unique_name("killed");
    let _node_object = NodeObject(node.clone());
    let files = node_files(cluster.layout(), &node).unwrap();
    let port = free_port();
    let process = start(&files, &node, port);

    let pods = Api::<Pod>::namespaced(cluster.client(), ns.name());
    let names = ["p0", "p1", "p2", "p3", "p4"];
    for name in names {
        pods.create(&PostParams::default(), &pod(&node, name))
            .await
            .unwrap();
    }
    for name in names {
        wait_for(&pods, name, "the pod to run", TIMEOUT, running).await;
    }
    let uids: Vec<Option<String>> = pods
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.metadata.uid)
        .collect();
    assert_eq!(uids.len(), 5);

    // SIGKILL: no shutdown path runs. Meanwhile one pod is deleted and one created.
    drop(process);
    pods.delete("p0", &DeleteParams::default()).await.unwrap();
    pods.create(&PostParams::default(), &pod(&node, "p5"))
        .await
        .unwrap();
    let _process = start(&files, &node, port);

    wait_for(
        &pods,
        "p5",
        "the pod created while the node was down to run",
        TIMEOUT,
        running,
    )
    .await;
    wait_for_deletion(&pods, "p0", TIMEOUT).await;
    let expected = ["p1", "p2", "p3", "p4", "p5"];
    for name in expected {
        wait_for(&pods, name, "the pod to run", TIMEOUT, running).await;
    }
    let ns_name = ns.name().to_owned();
    let runs = eventually(TIMEOUT, || {
        let (cluster, ns_name) = (&cluster, ns_name.clone());
        async move {
            let runs = running_pods(cluster, port, &ns_name).await?;
            if runs == expected {
                Ok(runs)
            } else {
                Err(format!("the provider runs {runs:?}"))
            }
        }
    })
    .await;
    assert_eq!(
        runs.iter().collect::<BTreeSet<_>>().len(),
        runs.len(),
        "no duplicates"
    );
    // The surviving pods are the same API objects: nothing was re-created under them.
    let after: BTreeSet<Option<String>> = pods
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.name.as_deref() != Some("p5"))
        .map(|p| p.metadata.uid)
        .collect();
    assert!(
        after.iter().all(|uid| uids.contains(uid)),
        "{after:?} ⊄ {uids:?}"
    );
    assert_eq!(after.len(), 4);
}

/// Deletes the Node object when the test ends.
struct NodeObject(String);

impl Drop for NodeObject {
    fn drop(&mut self) {
        updraft_testing::delete_node(&self.0);
    }
}
