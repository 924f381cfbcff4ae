//! An Updraft node run as its own process against the dev cluster, the way a kubelet runs:
//! the node identity `system:node:<name>`, a serving certificate from the cluster CA, client
//! certificates verified against it. Used by the demo and the benchmarks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::wait::await_condition;
use updraft_devcluster::cluster::NodeFiles;
pub use updraft_devcluster::cluster::node_files;
use updraft_devcluster::{Layout, cluster};

/// Builds the `updraft` binary (`release` for benchmarks) and returns its path; with
/// `UPDRAFT_BINARY` set, returns that path instead (to measure or profile another build).
pub fn build_updraft(release: bool) -> anyhow::Result<PathBuf> {
    if let Some(binary) = std::env::var_os("UPDRAFT_BINARY") {
        return Ok(PathBuf::from(binary));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "--package", "updraft"]);
    if release {
        build.arg("--release");
    }
    if !build.status().context("running cargo build")?.success() {
        bail!("cargo build --package updraft failed");
    }
    let root = updraft_devcluster::workspace_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target
        .join(if release { "release" } else { "debug" })
        .join("updraft"))
}

/// (Re)starts `binary` as node `node` with the mock provider and `extra_args`, detached; its
/// log is `logs/<node>.log` and `cargo xtask cluster down` stops it. Returns its PID.
pub fn start_node(
    layout: &Layout,
    binary: &Path,
    node: &str,
    files: &NodeFiles,
    extra_args: &[String],
) -> anyhow::Result<u32> {
    cluster::down_extra(layout, node)?;
    let path = |p: &Path| p.display().to_string();
    let mut args: Vec<String> = vec![
        "run".into(),
        "--nodename".into(),
        node.into(),
        "--provider".into(),
        "mock".into(),
        "--kubeconfig".into(),
        path(&files.kubeconfig),
        "--tls-cert-file".into(),
        path(&files.serving.0),
        "--tls-key-file".into(),
        path(&files.serving.1),
        "--client-ca-file".into(),
        path(&files.client_ca),
    ];
    args.extend_from_slice(extra_args);
    Ok(cluster::start_extra(layout, node, binary, &args)?)
}

/// Waits (watching, up to `timeout`) until `check` holds for object `name`.
pub async fn wait<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&K) -> bool,
) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let condition = move |object: Option<&K>| object.is_some_and(&check);
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, condition)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => bail!("waiting for {what}: {err}"),
        Err(_) => bail!(
            "{what} did not happen within {timeout:?}; see the logs in target/updraft-cluster/logs/"
        ),
    }
}

/// Waits until node `node` is Ready.
pub async fn wait_node_ready(client: kube::Client, node: &str) -> anyhow::Result<()> {
    wait(
        &Api::<Node>::all(client),
        node,
        "the node becoming Ready",
        Duration::from_secs(120),
        |node: &Node| {
            node.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        },
    )
    .await
}

/// Creates namespace `name` and waits until it has its `default` ServiceAccount: a real
/// namespace has it long before pods arrive, and pods created before the controller manager
/// adds it would measure the controller manager, not Updraft.
pub async fn create_bench_namespace(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .create(&kube::api::PostParams::default(), &ns)
        .await?;
    wait(
        &Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), name),
        "default",
        "the namespace's default ServiceAccount",
        Duration::from_secs(60),
        |_| true,
    )
    .await
}
