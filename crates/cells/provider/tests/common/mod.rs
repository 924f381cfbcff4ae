//! What the cells provider's integration tests share: a per-test cells config (own state
//! directory, CIDR, bridge, cgroup parent and controller id), a cleanup that terminates every
//! cell and removes the bridge and cgroups even when the test fails, the loopback registry
//! made reachable from inside the cells, the node run in-process or as the real `updraft`
//! binary, and small readers of what a user sees (kubectl, the cell condition).
//!
//! Needs root, the control plane (`cargo xtask cluster up`), and the binaries `updraft-cell`
//! and `updraft` next to the test binary (`cargo build -p updraft-cell-agent -p updraft`
//! with the same target directory; `cargo test --workspace` builds them).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use updraft_cells_backend::{Cell, CellBackend};
use updraft_cells_local::LocalBackend;
use updraft_devcluster::pki::{CertificateAuthority, Identity};
use updraft_kubelet_api::auth::{Auth, AuthConfig};
use updraft_kubelet_api::routes::{KubeletState, routes};
use updraft_kubelet_api::server::{protect, serve};
use updraft_kubelet_api::tls::{ServingCertificate, server_config};
use updraft_node::{NodeConfig, VirtualNode};
use updraft_provider_cells::{CellsConfig, CellsProvider};
use updraft_testing::{TestCluster, TestNamespace, unique_name};

/// How long a user-visible change may take on this shared 2-core machine.
pub const TIMEOUT: Duration = Duration::from_secs(180);

/// The cell condition the provider writes (`cell <id> (<ip>): <type> <launch>, <price>`).
pub const CELL_CONDITION: &str = "cells.updraft.dev/Cell";

/// Fails the test unless it runs as root (namespaces, cgroups, mounts).
pub fn require_root() {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    assert!(
        root,
        "this test must run as root (network namespaces, cgroups, mounts)"
    );
}

/// Logs of the test process to the test's output when `UPDRAFT_TEST_LOG` names a filter.
pub fn init_logging() {
    if let Ok(filter) = std::env::var("UPDRAFT_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// A workspace binary next to this test's (`target/<profile>/<name>`).
fn workspace_binary(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .unwrap();
    assert!(
        path.is_file(),
        "the binary {} is missing: build it first with `cargo build -p {package}` (same CARGO_TARGET_DIR)",
        path.display()
    );
    path
}

/// The cell agent `updraft-cell`.
pub fn agent_binary() -> PathBuf {
    workspace_binary("updraft-cell", "updraft-cell-agent")
}

/// The `updraft` binary.
pub fn updraft_binary() -> PathBuf {
    workspace_binary("updraft", "updraft")
}

/// A busybox root filesystem at `dir` (for `--image-dir busybox=<dir>`).
pub fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
}

/// [`busybox_rootfs`] plus the host's `curl` and the shared libraries it loads (for
/// `--image-dir curl=<dir>`): a client that verifies TLS, for calls to the API server.
pub fn curl_rootfs(dir: &Path) {
    busybox_rootfs(dir);
    let curl = Path::new("/usr/bin/curl");
    let ldd = Command::new("ldd").arg(curl).output().unwrap();
    assert!(ldd.status.success(), "ldd /usr/bin/curl: {ldd:?}");
    let libraries = String::from_utf8_lossy(&ldd.stdout)
        .lines()
        // `libx.so => /lib/…/libx.so (0x…)` or `/lib64/ld-linux-x86-64.so.2 (0x…)`
        .filter_map(|line| {
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect::<Vec<_>>();
    for file in libraries.iter().map(PathBuf::as_path).chain([curl]) {
        let target = dir.join(file.strip_prefix("/").unwrap());
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        // Linked when on one filesystem (the image is only read), else copied.
        let file = std::fs::canonicalize(file).unwrap();
        if std::fs::hard_link(&file, &target).is_err() {
            std::fs::copy(&file, &target).unwrap();
        }
    }
}

/// Where the cells' agents get images from.
pub enum Images<'a> {
    /// `image: busybox` is a directory copy of the host's busybox (no registry); with
    /// [`ConfigOptions::curl_image`], `image: curl` the same with the host's curl.
    Directory,
    /// OCI images pulled from the loopback registry.
    Registry(&'a LoopbackRegistry),
}

/// A per-test cells config.
pub struct ConfigOptions<'a> {
    /// Distinguishes the configs of one test process (CIDR, bridge, cgroup, controller id).
    pub n: u32,
    /// Where images come from.
    pub images: Images<'a>,
    /// An instance catalog file instead of the built-in local one.
    pub catalog_file: Option<PathBuf>,
    /// The type for pods that request nothing (must be in the catalog).
    pub default_instance_type: Option<&'a str>,
    /// The node's capacity (`{cpu: "16", memory: 64Gi, pods: "20"}` when absent).
    pub capacity: Option<&'a str>,
    /// Config lines appended as they are (e.g. a standby pool).
    pub extra: String,
    /// `bootTimeout` (`60s` when absent).
    pub boot_timeout: Option<&'a str>,
    /// `healthTimeout` (`30s` when absent).
    pub health_timeout: Option<&'a str>,
    /// The agent binary the cells start (the real `updraft-cell` when absent), e.g. a
    /// [`GatedAgent`].
    pub agent_binary: Option<PathBuf>,
    /// Also `image: curl` (with directory images).
    pub curl_image: bool,
}

impl<'a> ConfigOptions<'a> {
    /// Defaults: directory images, the local catalog.
    pub fn new(n: u32) -> Self {
        ConfigOptions {
            n,
            images: Images::Directory,
            catalog_file: None,
            default_instance_type: None,
            capacity: None,
            extra: String::new(),
            boot_timeout: None,
            health_timeout: None,
            agent_binary: None,
            curl_image: false,
        }
    }
}

/// A test's cells config: written to `<dir>/cells.yaml` and loaded.
pub struct TestConfig {
    /// The loaded config.
    pub config: CellsConfig,
    /// The file (for `updraft run --provider-config`).
    pub path: PathBuf,
}

/// Writes and loads a cells config for a test under `dir`: its own state, CIDR, bridge,
/// cgroup parent and controller id.
pub fn write_config(dir: &Path, options: ConfigOptions<'_>) -> TestConfig {
    let n = options.n;
    let pid = std::process::id();
    let (extra_args, cloud_init) = match options.images {
        Images::Directory => {
            let rootfs = dir.join("busybox-image");
            busybox_rootfs(&rootfs);
            let mut args = format!(r#"["--image-dir", "busybox={}""#, rootfs.display());
            if options.curl_image {
                let curl = dir.join("curl-image");
                curl_rootfs(&curl);
                args.push_str(&format!(r#", "--image-dir", "curl={}""#, curl.display()));
            }
            args.push(']');
            (args, String::new())
        }
        Images::Registry(registry) => (
            "[]".to_owned(),
            format!("cloudInitFile: {}\n", registry.cloud_init.display()),
        ),
    };
    let mut text = format!(
        r#"backend: local
controllerId: test-{pid}-{n}
certificateDir: {dir}/pki
bootTimeout: {boot_timeout}
healthTimeout: {health_timeout}
agent:
  dir: {dir}/agent
  tlsDir: {dir}/tls
  extraArgs: {extra_args}
local:
  stateDir: {dir}/state
  cidr: 10.216.{third}.0/24
  bridge: upc{short}x{n}
  agentBinary: {agent}
  cgroupParent: {cgroup_parent}
  privateDirs: [{dir}/agent]
capacity: {capacity}
{cloud_init}"#,
        dir = dir.display(),
        third = (pid * 8 + n) % 250 + 1,
        short = pid % 100_000,
        agent = options
            .agent_binary
            .clone()
            .unwrap_or_else(agent_binary)
            .display(),
        boot_timeout = options.boot_timeout.unwrap_or("60s"),
        health_timeout = options.health_timeout.unwrap_or("30s"),
        cgroup_parent = cgroup_parent(n),
        capacity = options
            .capacity
            .unwrap_or(r#"{cpu: "16", memory: 64Gi, pods: "20"}"#),
    );
    if let Some(catalog) = &options.catalog_file {
        text.push_str(&format!("catalogFile: {}\n", catalog.display()));
    }
    if let Some(default) = options.default_instance_type {
        text.push_str(&format!("defaultInstanceType: {default}\n"));
    }
    text.push_str(&options.extra);
    let path = dir.join("cells.yaml");
    std::fs::write(&path, &text).unwrap();
    TestConfig {
        config: CellsConfig::load(&path).unwrap(),
        path,
    }
}

/// The real agent behind a gate: the cell's agent process starts (the backend reports the cell
/// Running) but execs `updraft-cell` only once the gate is opened, as a cloud instance whose
/// agent is still booting.
pub struct GatedAgent {
    /// The wrapper to configure as `local.agentBinary`.
    pub binary: PathBuf,
    gate: PathBuf,
}

impl GatedAgent {
    /// A closed gate under `dir`.
    pub fn new(dir: &Path) -> GatedAgent {
        use std::os::unix::fs::PermissionsExt;
        let binary = dir.join("gated-updraft-cell");
        let gate = dir.join("agent-gate-open");
        std::fs::write(
            &binary,
            format!(
                "#!/bin/sh\nwhile [ ! -e {gate} ]; do sleep 0.2; done\nexec {agent} \"$@\"\n",
                gate = gate.display(),
                agent = agent_binary().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        GatedAgent { binary, gate }
    }

    /// Lets every waiting (and later) agent start.
    pub fn open(&self) {
        std::fs::write(&self.gate, b"open").unwrap();
    }
}

/// The cgroup parent of config `n` of this test process.
fn cgroup_parent(n: u32) -> String {
    format!("updraft-provider-cells-test-{}-{n}", std::process::id())
}

/// Terminates every cell of the test's backend, removes its bridge and its cgroup parent,
/// also when the test fails: nothing leaks.
pub struct CellsCleanup {
    backend: LocalBackend,
    cgroup_parent: String,
}

impl CellsCleanup {
    /// The cleanup of `config`'s local backend.
    pub fn new(config: &TestConfig) -> CellsCleanup {
        let cgroup_parent = config
            .config
            .local
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap();
        CellsCleanup {
            backend: updraft_provider_cells::local_backend(&config.config).unwrap(),
            cgroup_parent,
        }
    }

    /// The backend (a second handle on the same state directory).
    pub fn backend(&self) -> LocalBackend {
        self.backend.clone()
    }
}

impl Drop for CellsCleanup {
    fn drop(&mut self) {
        if let Ok(scan) = self.backend.scan() {
            for cell in scan.cells {
                let _ = self.backend.terminate_blocking(&cell.id);
            }
        }
        let _ = self.backend.remove_bridge_if_unused();
        // Each cell's cgroups go with it; the parent is the test's.
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for hierarchy in hierarchies.flatten() {
                let _ = std::fs::remove_dir(hierarchy.path().join(&self.cgroup_parent));
            }
        }
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&self.cgroup_parent));
    }
}

/// The cells of `controller_id` that are not ending (what runs or boots).
pub async fn live_cells(backend: &LocalBackend, controller_id: &str) -> Vec<Cell> {
    backend
        .list(controller_id)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| !c.state.is_ending())
        .collect()
}

/// Every cell the backend has started for `controller_id`, terminated ones included (their
/// records stay an hour as tombstones): a cell started twice for one pod shows here even after
/// it was cleaned up.
pub fn every_cell(backend: &LocalBackend, controller_id: &str) -> Vec<Cell> {
    backend
        .scan()
        .unwrap()
        .cells
        .into_iter()
        .filter(|c| {
            c.identity
                .as_ref()
                .is_some_and(|i| i.controller_id == controller_id)
        })
        .collect()
}

/// Runs kubectl with `args` (bounded by [`TIMEOUT`]).
pub async fn run_kubectl(cluster: &TestCluster, args: &[&str]) -> std::process::Output {
    let mut command = tokio::process::Command::from(cluster.kubectl());
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    tokio::time::timeout(TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish within {TIMEOUT:?}"))
        .unwrap()
}

/// stdout and stderr of a kubectl run, for failure messages.
pub fn describe_output(output: &std::process::Output) -> String {
    format!(
        "exit {:?}, stdout {:?}, stderr {:?}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The message of a pod's true `cells.updraft.dev/Cell` condition.
pub fn cell_condition(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CELL_CONDITION && c.status == "True")?
        .message
        .clone()
}

/// The cell id in a pod's `cells.updraft.dev/Cell` condition (`cell <id> (…): …`).
pub fn cell_of(pod: &Pod) -> Option<String> {
    let message = cell_condition(pod)?;
    Some(message.strip_prefix("cell ")?.split(' ').next()?.to_owned())
}

/// Running with every container ready.
pub fn running_and_ready(pod: &Pod) -> bool {
    pod.status.as_ref().is_some_and(|s| {
        s.phase.as_deref() == Some("Running")
            && s.container_statuses
                .as_ref()
                .is_some_and(|cs| !cs.is_empty() && cs.iter().all(|c| c.ready))
    })
}

/// The start of every test here: root and logging checked, the shared control plane, a
/// namespace deleted when the test ends, a unique node name and a scratch directory.
pub struct Setup {
    /// The control plane.
    pub cluster: TestCluster,
    /// The test's namespace.
    pub namespace: TestNamespace,
    /// A node name no other test uses.
    pub node: String,
    /// Scratch space (the cells config, the registry, state).
    pub tmp: tempfile::TempDir,
}

impl Setup {
    /// The setup of test `name` (the namespace's and node's prefix).
    pub async fn new(name: &str) -> Setup {
        require_root();
        init_logging();
        let cluster = TestCluster::connect().await;
        let namespace = cluster.namespace(name).await;
        Setup {
            cluster,
            namespace,
            node: unique_name(name),
            tmp: tempfile::tempdir().unwrap(),
        }
    }
}

/// A test's local cells: the config of `options` written under `dir`, the cleanup that
/// removes its cells whatever happens, a handle on its backend and its controller id.
pub struct Cells {
    /// The config and its file.
    pub config: TestConfig,
    /// Terminates every cell of the config when dropped.
    pub cleanup: CellsCleanup,
    /// The config's local backend.
    pub backend: LocalBackend,
    /// The config's controller id.
    pub controller: String,
}

impl Cells {
    /// Writes the config of `options` under `dir` and prepares its cleanup.
    pub fn new(dir: &Path, options: ConfigOptions<'_>) -> Cells {
        let config = write_config(dir, options);
        let cleanup = CellsCleanup::new(&config);
        Cells {
            backend: cleanup.backend(),
            controller: config.config.controller_id.clone(),
            config,
            cleanup,
        }
    }
}

/// A pod for `node` (it tolerates the virtual node's taint and has 1 s to terminate) whose one
/// container `app` runs `image` with `/bin/sleep 3600`.
pub fn sleeping_pod(name: &str, node: &str, image: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": image, "command": ["/bin/sleep", "3600"]}]
        }
    }))
    .unwrap()
}

pub use updraft_testing::delete_node;

/// Starts the node (and its kubelet API on a loopback port) in this process with a cells
/// provider from `config`; the sender stops both.
pub async fn start_node(
    cluster: &TestCluster,
    node_name: &str,
    config: &CellsConfig,
) -> (Arc<CellsProvider>, tokio::sync::watch::Sender<bool>) {
    start_node_configured(cluster, node_name, config, |_| {}).await
}

/// [`start_node`] with the node's config changed by `configure` (e.g. a shorter orphan sweep).
pub async fn start_node_configured(
    cluster: &TestCluster,
    node_name: &str,
    config: &CellsConfig,
    configure: impl FnOnce(&mut NodeConfig),
) -> (Arc<CellsProvider>, tokio::sync::watch::Sender<bool>) {
    let running = run_node(cluster, node_name, config, configure).await;
    let (provider, stop) = (running.provider.clone(), running.stop.clone());
    running.detach();
    (provider, stop)
}

/// A node started by [`run_node`]. [`RunningNode::stop_and_delete`] stops its tasks, then
/// deletes its Node: a heartbeat still running would register the Node again (it does when it
/// finds it deleted). Dropped without that (a failing test), it stops the tasks and deletes the
/// Node best effort.
pub struct RunningNode {
    /// The node's provider.
    pub provider: Arc<CellsProvider>,
    /// The Node's name.
    pub name: String,
    stop: tokio::sync::watch::Sender<bool>,
    node: Option<tokio::task::JoinHandle<()>>,
}

impl RunningNode {
    /// Stops the node like [`start_node`]'s sender does (the provider keeps running: a restart
    /// test starts another node on the same cells) and waits until its tasks have ended.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(node) = self.node.take() {
            let _ = node.await;
        }
    }

    /// Stops the node and its provider, waits until the node's tasks have ended, then deletes
    /// the Node.
    pub async fn stop_and_delete(self) {
        let (provider, name) = (self.provider.clone(), self.name.clone());
        self.stop().await;
        provider.shutdown();
        delete_node(&name);
    }

    /// Leaves the node running unattended (until its sender is used or the test ends).
    fn detach(mut self) {
        self.node = None;
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            let _ = self.stop.send(true);
            node.abort();
            self.provider.shutdown();
            delete_node(&self.name);
        }
    }
}

/// Starts the node and its kubelet API like [`start_node_configured`], keeping the node's task.
pub async fn run_node(
    cluster: &TestCluster,
    node_name: &str,
    config: &CellsConfig,
    configure: impl FnOnce(&mut NodeConfig),
) -> RunningNode {
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
    configure(&mut node_config);
    let node = VirtualNode::new(client, node_config, provider.clone());
    let node = tokio::spawn(async move {
        let _ = node.run(until_stopped(stopped)).await;
    });
    RunningNode {
        provider,
        name: node_name,
        stop,
        node: Some(node),
    }
}

/// The real `updraft` binary running as a node with the cells provider; SIGKILLed when
/// dropped (cells outlive it, as they outlive a crash), its log printed when the test fails.
pub struct UpdraftProcess {
    child: Child,
    log: PathBuf,
}

impl UpdraftProcess {
    /// Starts `updraft run --provider cells` as node `node` on kubelet port `port`.
    pub fn start(cluster: &TestCluster, node: &str, port: u16, config: &TestConfig) -> Self {
        let files = updraft_devcluster::cluster::node_files(cluster.layout(), node).unwrap();
        let log = files.dir.join("updraft.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(updraft_binary())
            .args(["run", "--provider", "cells", "--nodename", node])
            .arg("--provider-config")
            .arg(&config.path)
            .arg("--kubeconfig")
            .arg(&files.kubeconfig)
            .arg("--tls-cert-file")
            .arg(&files.serving.0)
            .arg("--tls-key-file")
            .arg(&files.serving.1)
            .arg("--client-ca-file")
            .arg(&files.client_ca)
            .args(["--kubelet-port", &port.to_string()])
            .args(updraft_devcluster::cluster::node_network_args())
            .env(
                "RUST_LOG",
                "info,updraft_provider_cells=debug,updraft_node=debug",
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        UpdraftProcess { child, log }
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for UpdraftProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} ---\n{}", self.log.display(), self.log());
        }
    }
}

/// A free loopback port (free now; the caller binds it soon).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until node `name` is Ready.
pub async fn wait_node_ready(cluster: &TestCluster, name: &str) {
    let nodes = Api::<Node>::all(cluster.client());
    updraft_testing::wait_for(&nodes, name, "the node to be Ready", TIMEOUT, |node| {
        node.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    })
    .await;
}

/// The real Debian `docker-registry` on 127.0.0.1 with a busybox image, reachable from
/// inside every cell at the same `127.0.0.1:<port>`.
///
/// A cell is its own network namespace, so the host's loopback is not the cell's. Rather than
/// expose the registry on a non-loopback address, each cell's cloud-init (the operator's
/// `cloudInitFile`, merged into every cell's user data) runs `socat` on the cell's loopback,
/// which forwards to a Unix socket on the shared filesystem; this test process serves that
/// socket and connects to the registry on the host's loopback. The agent pulls
/// `127.0.0.1:<port>/busybox:1` over plain HTTP, as it does for loopback registries.
pub struct LoopbackRegistry {
    registry: updraft_cell_image::test_support::TestRegistry,
    /// `127.0.0.1:<port>/busybox:1`.
    pub image: String,
    /// The cloud-init file with the cell side of the forwarding.
    pub cloud_init: PathBuf,
    forwarder: tokio::task::JoinHandle<()>,
}

impl LoopbackRegistry {
    /// Starts the registry, pushes busybox and serves the socket under `dir`.
    pub async fn start(dir: &Path) -> LoopbackRegistry {
        assert!(
            Path::new("/usr/bin/socat").exists(),
            "socat is missing: apt-get install -y socat (listed in xtask/apt-packages.txt; `cargo xtask deps` installs it)"
        );
        let (registry, pushed) =
            updraft_cell_image::test_support::TestRegistry::start_with_busybox("busybox:1")
                .await
                .unwrap();
        let host = registry.host().to_owned();
        let port = host.rsplit(':').next().unwrap().to_owned();
        let socket = dir.join("registry.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let forwarder = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let host = host.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&host).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        let cloud_init = dir.join("registry-cloud-init.yaml");
        std::fs::write(
            &cloud_init,
            format!(
                "#cloud-config\nruncmd:\n  - [/usr/bin/socat, \"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr\", \"UNIX-CONNECT:{}\"]\n",
                socket.display()
            ),
        )
        .unwrap();
        LoopbackRegistry {
            registry,
            image: pushed.reference.to_string(),
            cloud_init,
            forwarder,
        }
    }

    /// The registry's log (its access log shows the cells' pulls).
    pub fn log(&self) -> String {
        self.registry.log()
    }
}

impl Drop for LoopbackRegistry {
    fn drop(&mut self) {
        self.forwarder.abort();
    }
}
