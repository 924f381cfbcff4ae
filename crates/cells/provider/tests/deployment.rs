//! A user's Deployment on the real `updraft` binary with the cells provider and local cells:
//! `kubectl apply` of a Deployment whose busybox image comes from the loopback registry; every
//! replica gets its own cell and becomes Running and Ready (an HTTP readiness probe);
//! `kubectl logs`, `kubectl exec` and `kubectl port-forward` reach the containers; the pods
//! talk to each other by pod IP across cells; `kubectl scale` down terminates the cells of the
//! removed replicas, and deleting the Deployment the rest.
//!
//! Needs root, socat, docker-registry, the control plane and the `updraft` and `updraft-cell`
//! binaries (see `common`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

use common::{
    Cells, ConfigOptions, Images, LoopbackRegistry, Setup, TIMEOUT, UpdraftProcess, cell_of,
    delete_node, describe_output, free_port, live_cells, run_kubectl, running_and_ready,
    wait_node_ready,
};
use updraft_testing::eventually;

/// The Deployment: `replicas` busybox httpd servers pinned to `node`.
fn deployment(node: &str, image: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      tolerations:
        - {{key: virtual-kubelet.io/provider, operator: Exists, effect: NoSchedule}}
      terminationGracePeriodSeconds: 2
      containers:
        - name: web
          image: {image}
          command:
            - /bin/sh
            - -c
            - mkdir -p /tmp/www && echo "hello from $(hostname)" > /tmp/www/index.html && echo serving-on-8080 && exec /bin/busybox httpd -f -p 8080 -h /tmp/www
          ports: [{{containerPort: 8080}}]
          readinessProbe:
            httpGet: {{path: /index.html, port: 8080}}
            periodSeconds: 2
          resources:
            requests: {{cpu: 250m, memory: 64Mi}}
"#
    )
}

async fn web_pods(pods: &Api<Pod>) -> Vec<Pod> {
    pods.list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// Waits until exactly `replicas` pods of the Deployment run, ready, each on a cell of its
/// own; returns them.
async fn wait_replicas_ready(pods: &Api<Pod>, replicas: usize) -> Vec<Pod> {
    eventually(TIMEOUT, || async {
        let all = web_pods(pods).await;
        let summary: Vec<String> = all
            .iter()
            .map(|p| {
                let status = p.status.clone().unwrap_or_default();
                format!(
                    "{}: {:?} {:?} {:?}",
                    p.metadata.name.clone().unwrap_or_default(),
                    status.phase,
                    status.message,
                    cell_of(p)
                )
            })
            .collect();
        if all.len() == replicas
            && all
                .iter()
                .all(|p| running_and_ready(p) && cell_of(p).is_some())
        {
            Ok(all)
        } else {
            Err(format!("pods: {summary:?}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deployment_runs_one_cell_per_replica_and_kubectl_reaches_it() {
    let Setup {
        cluster,
        namespace,
        node,
        tmp,
    } = Setup::new("cells-deploy").await;
    let ns = namespace.name().to_owned();
    let registry = LoopbackRegistry::start(tmp.path()).await;
    let mut options = ConfigOptions::new(0);
    options.images = Images::Registry(&registry);
    let Cells {
        config,
        cleanup,
        backend,
        controller,
    } = Cells::new(tmp.path(), options);
    assert!(live_cells(&backend, &controller).await.is_empty());

    let updraft = UpdraftProcess::start(&cluster, &node, free_port(), &config);
    wait_node_ready(&cluster, &node).await;

    let manifest = tmp.path().join("web.yaml");
    std::fs::write(&manifest, deployment(&node, &registry.image, 2)).unwrap();
    let manifest_arg = manifest.display().to_string();
    let apply = run_kubectl(&cluster, &["apply", "-n", &ns, "-f", &manifest_arg]).await;
    assert!(apply.status.success(), "{}", describe_output(&apply));

    let pods = Api::<Pod>::namespaced(cluster.client(), &ns);
    let ready = wait_replicas_ready(&pods, 2).await;
    let cells: BTreeSet<String> = ready.iter().filter_map(cell_of).collect();
    assert_eq!(cells.len(), 2, "each replica has a cell of its own");
    let live: BTreeSet<String> = live_cells(&backend, &controller)
        .await
        .into_iter()
        .map(|c| c.id.0)
        .collect();
    assert_eq!(live, cells, "the backend runs exactly the replicas' cells");
    assert!(
        registry.log().contains("/v2/busybox/manifests/1"),
        "the image was pulled from the loopback registry"
    );
    let names: Vec<String> = ready
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    let ips: Vec<String> = ready
        .iter()
        .map(|p| p.status.as_ref().unwrap().pod_ip.clone().unwrap())
        .collect();
    assert_ne!(ips[0], ips[1]);

    // kubectl logs: API server → kubelet API → provider → the cell's agent.
    let logs = run_kubectl(&cluster, &["logs", "-n", &ns, &names[0]]).await;
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("serving-on-8080"),
        "{}",
        describe_output(&logs)
    );

    // kubectl exec, and pod → pod by pod IP across two cells, both ways.
    for (from, to) in [(0, 1), (1, 0)] {
        // nc's stdin stays open until the server has answered and closed (busybox nc stops
        // at stdin EOF).
        let request = format!(
            "(printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n'; sleep 5) | nc {} 8080",
            ips[to]
        );
        let exec = run_kubectl(
            &cluster,
            &[
                "exec",
                "-n",
                &ns,
                &names[from],
                "--",
                "/bin/sh",
                "-c",
                &request,
            ],
        )
        .await;
        let body = String::from_utf8_lossy(&exec.stdout);
        assert!(
            body.contains("hello from"),
            "{} → {}: {}",
            names[from],
            ips[to],
            describe_output(&exec)
        );
    }
    let exec = run_kubectl(
        &cluster,
        &[
            "exec", "-n", &ns, &names[0], "--", "/bin/sh", "-c", "exit 7",
        ],
    )
    .await;
    assert_eq!(exec.status.code(), Some(7), "{}", describe_output(&exec));

    // kubectl port-forward to the container's server.
    let mut forward = tokio::process::Command::from(cluster.kubectl());
    forward
        .args(["port-forward", "-n", &ns, &names[1], ":8080"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut forward = forward.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(forward.stdout.take().unwrap()).lines();
    let local_port = tokio::time::timeout(TIMEOUT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // "Forwarding from 127.0.0.1:40123 -> 8080"
            if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
                return rest.split(' ').next().unwrap().parse::<u16>().unwrap();
            }
        }
        panic!("kubectl port-forward exited without forwarding");
    })
    .await
    .expect("kubectl port-forward to start forwarding");
    let response = eventually(TIMEOUT, || async move {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", local_port))
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"GET /index.html HTTP/1.0\r\nHost: web\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        if response.contains("hello from") {
            Ok(response)
        } else {
            Err(format!("response {response:?}"))
        }
    })
    .await;
    assert!(
        response.starts_with("HTTP/1.") && response.contains(" 200 "),
        "{response}"
    );
    forward.kill().await.unwrap();

    // Scale down: the removed replica's cell is terminated.
    let scale = run_kubectl(
        &cluster,
        &["scale", "-n", &ns, "deployment/web", "--replicas=1"],
    )
    .await;
    assert!(scale.status.success(), "{}", describe_output(&scale));
    let remaining = wait_replicas_ready(&pods, 1).await;
    let kept = cell_of(&remaining[0]).unwrap();
    eventually(TIMEOUT, || async {
        let live: Vec<String> = live_cells(&backend, &controller)
            .await
            .into_iter()
            .map(|c| c.id.0)
            .collect();
        if live == [kept.clone()] {
            Ok(())
        } else {
            Err(format!("cells {live:?}, expected only {kept}"))
        }
    })
    .await;

    // Deleting the Deployment terminates the last cell.
    let delete = run_kubectl(
        &cluster,
        &["delete", "-n", &ns, "deployment/web", "--wait=true"],
    )
    .await;
    assert!(delete.status.success(), "{}", describe_output(&delete));
    eventually(TIMEOUT, || async {
        let pods_left = web_pods(&pods).await.len()
            + pods
                .list(&ListParams::default().labels("app=web"))
                .await
                .unwrap()
                .items
                .len();
        let live = live_cells(&backend, &controller).await.len();
        if pods_left == 0 && live == 0 {
            Ok(())
        } else {
            Err(format!("{pods_left} pods and {live} cells left"))
        }
    })
    .await;

    updraft.kill();
    delete_node(&node);
    drop(cleanup);
}
