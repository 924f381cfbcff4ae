//! Shared harness for Updraft's integration tests against the local control plane.
//!
//! ```no_run
//! # async fn example() {
//! use updraft_testing::TestCluster;
//! let cluster = TestCluster::connect().await;
//! let ns = cluster.namespace("my-test").await;
//! // … create objects in `ns.name()`, then wait for what a user would see:
//! // updraft_testing::wait_for(&api, "name", "pod to run", TIMEOUT, |pod| …).await;
//! # }
//! ```
//!
//! The control plane is started by `cargo xtask cluster up` (or `cargo xtask test`); when it is
//! not running, [`TestCluster::connect`] fails the test with a message that says so. Helpers in
//! this crate panic with a description of what was expected and what was last seen: that is
//! how a test reports failure.
#![forbid(unsafe_code)]
// This crate exists to fail tests with clear messages.
#![allow(clippy::panic, clippy::expect_used)]

mod wait;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use updraft_devcluster::{Layout, cluster};

pub use wait::{eventually, wait_for, wait_for_deletion};

/// A handle to the running dev control plane.
pub struct TestCluster {
    layout: Layout,
    client: kube::Client,
}

impl TestCluster {
    /// Connects as cluster admin; fails the test if no control plane is up.
    pub async fn connect() -> Self {
        let layout = Layout::for_workspace();
        if let Err(err) = cluster::readyz(&layout).await {
            panic!(
                "integration tests need the dev control plane: {err}\n\
                 (state dir {}; start it with `cargo xtask cluster up`, or run everything with `cargo xtask test`)",
                layout.root().display()
            );
        }
        let client = cluster::admin_client(&layout)
            .await
            .unwrap_or_else(|err| panic!("admin client: {err}"));
        Self { layout, client }
    }

    /// A cluster-admin client.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The cluster's state directory layout (kubeconfigs, PKI, logs).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Creates a namespace with a unique name starting with `prefix`; deleted on drop.
    pub async fn namespace(&self, prefix: &str) -> TestNamespace {
        let name = unique_name(prefix);
        let namespace: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "updraft.dev/test": "true" } }
        }))
        .expect("a namespace literal");
        Api::<Namespace>::all(self.client())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|err| panic!("creating namespace {name}: {err}"));
        // The ServiceAccount admission refuses pods until the controller manager has made
        // the namespace's `default` ServiceAccount.
        let accounts = Api::<ServiceAccount>::namespaced(self.client(), &name);
        let made = kube::runtime::wait::await_condition(
            accounts,
            "default",
            |sa: Option<&ServiceAccount>| sa.is_some(),
        );
        match tokio::time::timeout(std::time::Duration::from_secs(120), made).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => panic!("watching namespace {name}'s default ServiceAccount: {err}"),
            Err(_) => panic!(
                "namespace {name} got no default ServiceAccount within 120 s: is the controller manager running?"
            ),
        }
        TestNamespace { name }
    }

    /// Writes a kubeconfig for the node identity `system:node:<node>` and returns its path.
    /// The file lives as long as the returned guard.
    pub fn node_kubeconfig(&self, node: &str) -> tempfile::TempPath {
        let text = cluster::node_kubeconfig(&self.layout, node)
            .unwrap_or_else(|err| panic!("minting a kubeconfig for node {node}: {err}"));
        write_temp(&text)
    }

    /// A client authenticated as the node identity `system:node:<node>`.
    pub async fn node_client(&self, node: &str) -> kube::Client {
        let path = self.node_kubeconfig(node);
        cluster::client_for(&path)
            .await
            .unwrap_or_else(|err| panic!("client for node {node}: {err}"))
    }

    /// The pinned kubectl with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let kubectl = self.layout.kubectl();
        assert!(
            kubectl.exists(),
            "the pinned kubectl is missing at {}; run `cargo xtask cluster up`",
            kubectl.display()
        );
        let mut cmd = Command::new(kubectl);
        cmd.env("KUBECONFIG", self.layout.admin_kubeconfig());
        cmd
    }
}

fn write_temp(text: &str) -> tempfile::TempPath {
    use std::io::Write as _;
    let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
    file.write_all(text.as_bytes())
        .expect("writing a temporary kubeconfig");
    file.into_temp_path()
}

/// A name no other test (in this or a parallel test process) uses: `prefix-<pid>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// A namespace that is deleted when the test ends, pass or fail.
pub struct TestNamespace {
    name: String,
}

impl TestNamespace {
    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // It does not wait for the namespace to be finalized.
        let name = self.name.clone();
        cleanup_as_admin(move |client| async move {
            let _ = Api::<Namespace>::all(client)
                .delete(&name, &DeleteParams::background())
                .await;
        });
    }
}

/// Runs `cleanup` with a fresh cluster-admin client and waits for it, from code that cannot
/// be async (a `Drop`, possibly inside a test's runtime): it gets a thread and a runtime of
/// its own. Failures are ignored; cleanup is best effort.
pub fn cleanup_as_admin<F, Fut>(cleanup: F)
where
    F: FnOnce(kube::Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let layout = Layout::for_workspace();
    let worker = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            if let Ok(client) = cluster::admin_client(&layout).await {
                cleanup(client).await;
            }
        });
    });
    let _ = worker.join();
}

/// Deletes the Node `name` as cluster admin, best effort and from anywhere (a `Drop`, a failing
/// test): the nodes tests register are cluster-scoped and outlive their namespaces.
pub fn delete_node(name: &str) {
    let name = name.to_owned();
    cleanup_as_admin(move |client| async move {
        let _ = Api::<Node>::all(client)
            .delete(&name, &DeleteParams::default())
            .await;
    });
}

/// Where test binaries and fixtures may keep scratch files: `<cluster dir>/scratch`.
pub fn scratch_dir() -> PathBuf {
    Layout::for_workspace().root().join("scratch")
}
