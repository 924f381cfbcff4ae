//! `cargo xtask demo`: the control plane, the loopback registry with a busybox image, Updraft
//! as the virtual node `updraft-demo` with the cells provider's **local** backend, and a
//! Deployment whose two replicas each run on their own cell behind a Service, which one
//! replica reaches by name from its cell (as it reaches the API server). `cargo xtask demo --down`
//! deletes it again and terminates every cell (no namespaces, veths, mounts or cgroups left).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::TryStreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::watcher;
use updraft_devcluster::{Layout, cluster};

use crate::demo_registry;
use crate::node_process::{node_files, wait_node_ready};

const NODE: &str = "updraft-demo";
const DEPLOYMENT: &str = "hello-cells";
const REPLICAS: usize = 2;
/// The pod of the earlier mock-provider demo, removed if an old run left it.
const OLD_DEMO_POD: &str = "hello-updraft";
/// How long the cells may take to boot and pull on a busy two-core machine.
const POD_TIMEOUT: Duration = Duration::from_secs(300);

/// The demo's cells config and the paths derived from it.
struct DemoFiles {
    /// `cells.yaml`.
    config: PathBuf,
    /// The Deployment manifest.
    deployment: PathBuf,
}

fn demo_files(layout: &Layout) -> DemoFiles {
    let dir = demo_registry::dir(layout);
    DemoFiles {
        config: dir.join("cells.yaml"),
        deployment: dir.join("hello-cells.yaml"),
    }
}

/// The local-cells provider config of the demo. Its own CIDR, bridge and cgroup parent, so it
/// never meets the tests' cells.
fn cells_config(layout: &Layout, agent: &Path) -> String {
    let dir = demo_registry::dir(layout);
    format!(
        r#"# The cells provider of the demo node {NODE}: local cells (a network namespace, mount
# namespace and cgroup per pod on this host) running the agent updraft-cell.
backend: local
controllerId: {NODE}
certificateDir: {dir}/cells-pki
defaultInstanceType: local.small
bootTimeout: 2m
healthTimeout: 30s
# Gives every cell the loopback registry at 127.0.0.1:{port} (see registry-cloud-init.yaml).
cloudInitFile: {cloud_init}
capacity: {{cpu: "32", memory: 64Gi, pods: "20"}}
agent:
  dir: /var/lib/updraft-cell
local:
  stateDir: {dir}/cells
  cidr: 10.212.0.0/24
  bridge: updraft-demo0
  agentBinary: {agent}
  cgroupParent: updraft-demo-cells
  privateDirs: [/var/lib/updraft-cell]
"#,
        dir = dir.display(),
        port = demo_registry::PORT,
        cloud_init = demo_registry::cloud_init(layout).display(),
        agent = agent.display(),
    )
}

fn deployment_manifest(image: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {DEPLOYMENT}
  namespace: default
spec:
  replicas: {REPLICAS}
  selector:
    matchLabels: {{app: {DEPLOYMENT}}}
  template:
    metadata:
      labels: {{app: {DEPLOYMENT}}}
    spec:
      nodeSelector: {{kubernetes.io/hostname: {NODE}}}
      tolerations:
        - {{key: virtual-kubelet.io/provider, operator: Exists, effect: NoSchedule}}
      terminationGracePeriodSeconds: 5
      containers:
        - name: hello
          image: {image}
          # Logs a line every 5 s and serves the last one over HTTP (busybox httpd).
          command: [sh, -c, 'mkdir -p /www && httpd -p 8080 -h /www && while true; do echo "hello from $(hostname) at $(date)" | tee /www/index.html; sleep 5; done']
          ports:
            - {{name: http, containerPort: 8080}}
          readinessProbe:
            httpGet: {{path: /, port: http}}
            periodSeconds: 2
          resources:
            requests: {{cpu: 500m, memory: 256Mi}}
---
apiVersion: v1
kind: Service
metadata:
  name: {DEPLOYMENT}
  namespace: default
spec:
  selector: {{app: {DEPLOYMENT}}}
  ports:
    - {{name: http, port: 80, targetPort: http}}
"#
    )
}

/// Builds `updraft` and the agent `updraft-cell`; returns their paths.
fn build_binaries() -> anyhow::Result<(PathBuf, PathBuf)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    println!("building updraft and updraft-cell …");
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--package",
            "updraft",
            "--package",
            "updraft-cell-agent",
        ])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --package updraft --package updraft-cell-agent failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| updraft_devcluster::workspace_root().join("target"))
        .join("debug");
    Ok((target.join("updraft"), target.join("updraft-cell")))
}

fn kubectl(layout: &Layout) -> Command {
    let mut command = Command::new(layout.kubectl());
    command.env("KUBECONFIG", layout.admin_kubeconfig());
    command
}

/// Prints `$ <shown>` and runs `command` with its output going to the terminal.
fn show(shown: &str, command: &mut Command) -> anyhow::Result<()> {
    println!("\n$ {shown}");
    let status = command
        .status()
        .with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Runs the demo.
pub async fn run(layout: &Layout) -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the demo runs local cells (network namespaces, mounts, cgroups): run it as root");
    }
    cluster::up(layout).await?;
    println!(
        "control plane ready on https://127.0.0.1:{}",
        cluster::APISERVER_PORT
    );
    let (updraft, agent) = build_binaries()?;

    let image = demo_registry::start(layout).await?;
    println!(
        "registry ready on 127.0.0.1:{} with {image}",
        demo_registry::PORT
    );

    let files = demo_files(layout);
    std::fs::write(&files.config, cells_config(layout, &agent))
        .with_context(|| format!("writing {}", files.config.display()))?;
    std::fs::write(&files.deployment, deployment_manifest(&image))
        .with_context(|| format!("writing {}", files.deployment.display()))?;

    let node = node_files(layout, NODE)?;
    let path = |p: &Path| p.display().to_string();
    // Restarted, so it runs this build; its cells outlive it and are adopted.
    cluster::down_extra(layout, NODE)?;
    cluster::start_extra(
        layout,
        NODE,
        &updraft,
        &[
            "run".into(),
            "--nodename".into(),
            NODE.into(),
            "--provider".into(),
            "cells".into(),
            "--provider-config".into(),
            path(&files.config),
            "--kubeconfig".into(),
            path(&node.kubeconfig),
            "--tls-cert-file".into(),
            path(&node.serving.0),
            "--tls-key-file".into(),
            path(&node.serving.1),
            "--client-ca-file".into(),
            path(&node.client_ca),
        ]
        .into_iter()
        .chain(cluster::node_network_args())
        .collect::<Vec<_>>(),
    )?;
    println!(
        "started Updraft as node {NODE} with local cells; log: {}",
        layout.log(NODE).display()
    );
    let client = cluster::admin_client(layout).await?;
    wait_node_ready(client.clone(), NODE).await?;

    let pods = Api::<Pod>::namespaced(client.clone(), "default");
    if pods.get_opt(OLD_DEMO_POD).await?.is_some() {
        pods.delete(OLD_DEMO_POD, &DeleteParams::default()).await?;
    }
    show(
        &format!("kubectl apply -f {}", files.deployment.display()),
        kubectl(layout)
            .arg("apply")
            .arg("-f")
            .arg(&files.deployment),
    )?;
    println!("waiting until both replicas run, each on its own cell …");
    let running = wait_replicas_on_own_cells(&pods).await?;

    show(
        "kubectl get nodes,pods -o wide",
        kubectl(layout).args(["get", "nodes,pods", "-o", "wide"]),
    )?;
    show(
        &format!(
            "updraft cells list --provider-config {}",
            files.config.display()
        ),
        Command::new(&updraft)
            .args(["cells", "list", "--provider-config"])
            .arg(&files.config),
    )?;
    let first = running.first().map(String::as_str).unwrap_or(DEPLOYMENT);
    wait_for_log_line(layout, first).await?;
    show(
        &format!("kubectl logs {first} --tail 1"),
        kubectl(layout).args(["logs", first, "--tail", "1"]),
    )?;
    let exec_script = "echo \"exec in $(hostname) as $(id -un), pid 1 is $(cat /proc/1/comm)\"";
    show(
        &format!("kubectl exec {first} -- sh -c '{exec_script}'"),
        kubectl(layout).args(["exec", first, "--", "sh", "-c", exec_script]),
    )?;
    // From the other replica's cell: the Service's name through the cluster DNS, then the
    // Service by its cluster IP. (The image's static busybox crashes in `wget`'s name and
    // port lookups; its `nslookup` and `nc` do their own.)
    let other = running.last().map(String::as_str).unwrap_or(first);
    let fqdn = format!("{DEPLOYMENT}.default.svc.cluster.local");
    let cluster_ip = service_ip(&client).await?;
    let fetch = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {cluster_ip} 80 | tail -1");
    wait_for_service(layout, other, &fetch).await?;
    show(
        &format!("kubectl exec {other} -- nslookup {fqdn}"),
        kubectl(layout).args(["exec", other, "--", "nslookup", &fqdn]),
    )?;
    show(
        &format!("kubectl exec {other} -- sh -c \"{fetch}\""),
        kubectl(layout).args(["exec", other, "--", "sh", "-c", &fetch]),
    )?;
    show(
        &format!(
            "updraft cells select -f {} --provider-config {}",
            files.deployment.display(),
            files.config.display()
        ),
        Command::new(&updraft)
            .args(["cells", "select", "-f"])
            .arg(&files.deployment)
            .arg("--provider-config")
            .arg(&files.config),
    )?;

    println!(
        "\nEach replica of {DEPLOYMENT} runs on its own local cell of the virtual node {NODE}. Try:"
    );
    println!("  eval \"$(cargo xtask cluster env)\"");
    println!("  kubectl describe pod -l app={DEPLOYMENT}       # the cell, its type and price");
    println!("  kubectl logs -f {first}");
    println!("  kubectl exec -it {first} -- sh");
    println!("  kubectl scale deployment {DEPLOYMENT} --replicas 3   # a new cell for the new pod");
    println!(
        "  {} cells list --provider-config {}",
        updraft.display(),
        files.config.display()
    );
    println!(
        "  {} cells describe {first} --provider-config {}",
        updraft.display(),
        files.config.display()
    );
    println!(
        "Tear it down (deletes the Deployment, terminates every cell, stops Updraft and the registry):"
    );
    println!("  cargo xtask demo --down");
    println!("then, if you want the control plane gone too: cargo xtask cluster down");
    Ok(())
}

/// The message of the pod's `cells.updraft.dev/Cell` condition, once it is true.
fn cell_of(pod: &Pod) -> Option<String> {
    let message = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "cells.updraft.dev/Cell" && c.status == "True")?
        .message
        .clone()?;
    Some(message.strip_prefix("cell ")?.split(' ').next()?.to_owned())
}

fn running_and_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().is_some_and(|s| {
            s.phase.as_deref() == Some("Running")
                && s.container_statuses
                    .as_ref()
                    .is_some_and(|cs| !cs.is_empty() && cs.iter().all(|c| c.ready))
        })
}

/// Watches the Deployment's pods until [`REPLICAS`] of them are Running and Ready, each on a
/// cell of its own; returns their names.
async fn wait_replicas_on_own_cells(pods: &Api<Pod>) -> anyhow::Result<Vec<String>> {
    let config = watcher::Config::default().labels(&format!("app={DEPLOYMENT}"));
    let mut seen: BTreeMap<String, Pod> = BTreeMap::new();
    let mut last_state = String::new();
    let wait = async {
        let mut events = std::pin::pin!(watcher(pods.clone(), config));
        let mut init: BTreeMap<String, Pod> = BTreeMap::new();
        while let Some(event) = events.try_next().await? {
            match event {
                watcher::Event::Apply(pod) => {
                    seen.insert(pod.metadata.name.clone().unwrap_or_default(), pod);
                }
                watcher::Event::Delete(pod) => {
                    seen.remove(pod.metadata.name.as_deref().unwrap_or_default());
                }
                watcher::Event::Init => init.clear(),
                watcher::Event::InitApply(pod) => {
                    init.insert(pod.metadata.name.clone().unwrap_or_default(), pod);
                }
                watcher::Event::InitDone => seen = std::mem::take(&mut init),
            }
            let ready: BTreeMap<&str, String> = seen
                .iter()
                .filter(|(_, p)| running_and_ready(p))
                .filter_map(|(name, p)| Some((name.as_str(), cell_of(p)?)))
                .collect();
            let cells: std::collections::BTreeSet<&String> = ready.values().collect();
            let state = format!(
                "{} of {REPLICAS} replicas running on their own cells",
                cells.len()
            );
            if state != last_state {
                println!("  {state}");
                last_state = state;
            }
            if ready.len() >= REPLICAS && cells.len() >= REPLICAS {
                return Ok::<_, anyhow::Error>(
                    ready
                        .keys()
                        .take(REPLICAS)
                        .map(|s| (*s).to_owned())
                        .collect(),
                );
            }
        }
        bail!("the pod watch ended")
    };
    match tokio::time::timeout(POD_TIMEOUT, wait).await {
        Ok(result) => result,
        Err(_) => bail!(
            "the replicas were not running on their own cells within {POD_TIMEOUT:?}; see `kubectl describe pod -l app={DEPLOYMENT}` and the log target/updraft-cluster/logs/{NODE}.log"
        ),
    }
}

/// Waits until the pod has written a log line (its first line comes right after start).
async fn wait_for_log_line(layout: &Layout, pod: &str) -> anyhow::Result<()> {
    for _ in 0..30 {
        let output = kubectl(layout)
            .args(["logs", pod, "--tail", "1"])
            .output()
            .context("running kubectl logs")?;
        if output.status.success() && !output.stdout.is_empty() {
            return Ok(());
        }
        // The container writes every 5 s; a log line is at most that far away.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bail!("pod {pod} wrote no log line within 30 s")
}

/// The demo Service's cluster IP.
async fn service_ip(client: &kube::Client) -> anyhow::Result<String> {
    let service = Api::<Service>::namespaced(client.clone(), "default")
        .get(DEPLOYMENT)
        .await?;
    service
        .spec
        .and_then(|s| s.cluster_ip)
        .context("the demo Service has no cluster IP")
}

/// Waits until `fetch` run in `pod` gets a replica's answer through the Service: its cell has
/// the Service routes (the endpoints follow the replicas' readiness).
async fn wait_for_service(layout: &Layout, pod: &str, fetch: &str) -> anyhow::Result<()> {
    let mut last = String::new();
    for _ in 0..60 {
        let output = kubectl(layout)
            .args(["exec", pod, "--", "sh", "-c", fetch])
            .output()
            .context("running kubectl exec")?;
        if String::from_utf8_lossy(&output.stdout).contains("hello from") {
            return Ok(());
        }
        last = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bail!("pod {pod} could not reach the {DEPLOYMENT} Service within a minute: {last}")
}

/// `cargo xtask demo --down`: deletes the Deployment (Updraft terminates its cells) and its
/// Service, stops
/// Updraft, terminates any cell left (also when Updraft or the control plane is gone), removes
/// the bridge and cgroups, stops the registry, and deletes the demo node. The control plane
/// stays up (`cargo xtask cluster down` stops it).
pub async fn down(layout: &Layout) -> anyhow::Result<()> {
    let files = demo_files(layout);
    if cluster::readyz(layout).await.is_ok() {
        let client = cluster::admin_client(layout).await?;
        let deployments = Api::<Deployment>::namespaced(client.clone(), "default");
        if deployments.get_opt(DEPLOYMENT).await?.is_some() {
            deployments
                .delete(DEPLOYMENT, &DeleteParams::foreground())
                .await?;
            println!("deleted deployment {DEPLOYMENT}; waiting for its pods to go …");
            let pods = Api::<Pod>::namespaced(client.clone(), "default");
            wait_pods_gone(&pods).await;
        }
        let services = Api::<Service>::namespaced(client.clone(), "default");
        if services.get_opt(DEPLOYMENT).await?.is_some() {
            services
                .delete(DEPLOYMENT, &DeleteParams::default())
                .await?;
            println!("deleted service {DEPLOYMENT}");
        }
    } else {
        println!("the control plane is not running: terminating the cells directly");
    }
    if cluster::down_extra(layout, NODE)? {
        println!("stopped Updraft ({NODE})");
    }
    if files.config.exists() {
        match terminate_cells(&files.config)? {
            0 => println!("every cell is terminated; bridge and cgroups removed"),
            n => println!("terminated {n} cells Updraft had left; bridge and cgroups removed"),
        }
    }
    for name in demo_registry::stop(layout)? {
        println!("stopped {name}");
    }
    if cluster::readyz(layout).await.is_ok() {
        let client = cluster::admin_client(layout).await?;
        let nodes = Api::<Node>::all(client);
        if nodes.get_opt(NODE).await?.is_some() {
            nodes.delete(NODE, &DeleteParams::default()).await?;
            println!("deleted node {NODE}");
        }
    }
    println!("demo down; the control plane still runs (cargo xtask cluster down stops it)");
    Ok(())
}

/// Watches until the Deployment's pods are gone (bounded: the cells are terminated directly
/// afterwards in any case).
async fn wait_pods_gone(pods: &Api<Pod>) {
    let selector = format!("app={DEPLOYMENT}");
    let gone = async {
        loop {
            let left = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .map(|l| l.items.len())
                .unwrap_or(0);
            if left == 0 {
                return;
            }
            let config = watcher::Config::default().labels(&selector);
            let mut events = std::pin::pin!(watcher(pods.clone(), config));
            // Any change: count again.
            while let Ok(Some(event)) = events.try_next().await {
                if matches!(event, watcher::Event::Delete(_) | watcher::Event::InitDone) {
                    break;
                }
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(120), gone)
        .await
        .is_err()
    {
        println!("the pods are still there after 120 s; terminating their cells directly");
    }
}

/// Terminates every cell in the demo backend's state, removes its bridge and cgroup parent;
/// returns how many cells were terminated.
fn terminate_cells(config_path: &Path) -> anyhow::Result<usize> {
    let config = updraft_provider_cells::CellsConfig::load(config_path)?;
    let backend = updraft_provider_cells::local_backend(&config)?;
    let scan = backend.scan()?;
    let mut terminated = 0;
    for cell in scan.cells {
        backend
            .terminate_blocking(&cell.id)
            .with_context(|| format!("terminating cell {}", cell.id))?;
        if !cell.state.is_ending() {
            terminated += 1;
        }
    }
    backend.remove_bridge_if_unused()?;
    let parent = &backend.config().cgroup_parent;
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for hierarchy in hierarchies.flatten() {
            let _ = std::fs::remove_dir(hierarchy.path().join(parent));
        }
    }
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(parent));
    Ok(terminated)
}
