//! `cargo xtask demo`: the control plane, an Updraft node, a pod running on it.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use updraft_devcluster::pki::{CertificateAuthority, Identity};
use updraft_devcluster::{Layout, cluster};

const NODE: &str = "updraft-demo";

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn build_updraft() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--package", "updraft"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --package updraft failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target.join("debug").join("updraft"))
}

/// Waits (watching, up to 2 minutes) until `check` holds for object `name`.
async fn wait<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    check: impl Fn(&K) -> bool,
) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let condition = move |object: Option<&K>| object.is_some_and(&check);
    match tokio::time::timeout(
        Duration::from_secs(120),
        await_condition(api.clone(), name, condition),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => bail!("waiting for {what}: {err}"),
        Err(_) => bail!(
            "{what} did not happen within 2 minutes; see the logs in target/updraft-cluster/logs/"
        ),
    }
}

/// Runs the demo.
pub async fn run(layout: &Layout) -> anyhow::Result<()> {
    cluster::up(layout).await?;
    println!(
        "control plane ready on https://127.0.0.1:{}",
        cluster::APISERVER_PORT
    );
    let updraft = build_updraft()?;

    // The node runs as the identity a kubelet has: system:node:updraft-demo, under the Node
    // authorizer and NodeRestriction. Its serving certificate comes from the cluster CA.
    let dir = layout.root().join("demo");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let kubeconfig = dir.join("node.kubeconfig");
    std::fs::write(&kubeconfig, cluster::node_kubeconfig(layout, NODE)?)?;
    let ca = CertificateAuthority::load(&layout.pki())?;
    let serving = ca.issue(&Identity::loopback_server(NODE, &[NODE, "localhost"]))?;
    let (cert, key) = (dir.join("serving.crt"), dir.join("serving.key"));
    std::fs::write(&cert, serving.cert_pem)?;
    std::fs::write(&key, serving.key_pem)?;

    // Restart the node so it runs this build.
    cluster::down_extra(layout, NODE)?;
    let args: Vec<String> = [
        "run",
        "--nodename",
        NODE,
        "--provider",
        "mock",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--tls-cert-file",
        &cert.display().to_string(),
        "--tls-key-file",
        &key.display().to_string(),
        "--client-ca-file",
        &CertificateAuthority::cert_path(&layout.pki())
            .display()
            .to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    cluster::start_extra(layout, NODE, &updraft, &args)?;
    println!(
        "started the Updraft node {NODE}; log: {}",
        layout.log(NODE).display()
    );

    let client = cluster::admin_client(layout).await?;
    wait(
        &Api::<Node>::all(client.clone()),
        NODE,
        "the node becoming Ready",
        |node: &Node| {
            node.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        },
    )
    .await?;

    let pods = Api::<Pod>::namespaced(client, "default");
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "hello-updraft", "namespace": "default"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "hello", "image": "busybox"}]
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
    println!(
        "\nThe pod runs on the virtual node {NODE} (mock provider until local cells land). Try:"
    );
    println!("  eval \"$(cargo xtask cluster env)\"");
    println!("  kubectl describe node {NODE}");
    println!("  kubectl get lease -n kube-node-lease {NODE}");
    println!("Stop everything with: cargo xtask cluster down");
    Ok(())
}
