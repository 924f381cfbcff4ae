//! Starting, checking and stopping the control-plane processes.
//!
//! Each component runs detached (its own process group) with its output in
//! `<layout>/logs/<component>.log` and its PID in `<layout>/run/<component>.pid`. A PID file is
//! trusted only while `/proc/<pid>/exe` is still the binary we started, so a recycled PID is
//! never signalled.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, Patch, PatchParams, PostParams};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::coredns;
use crate::host_address::{self, HOST_ADDRESS};
use crate::kubeconfig::{self, Credentials};
use crate::pki::{self, CertificateAuthority, Identity};
use crate::toolchain::Toolchain;
use crate::{Error, Layout, Result, io_err};

/// The API server's secure port on 127.0.0.1.
pub const APISERVER_PORT: u16 = 6443;
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;
const CONTROLLER_MANAGER_PORT: u16 = 10257;
const SCHEDULER_PORT: u16 = 10259;
/// The Service network. Its addresses are virtual: only the Service rules on cells (and
/// kube-proxy on a real node) translate them.
const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The `kubernetes` Service's cluster IP: the first address of [`SERVICE_CIDR`].
pub const KUBERNETES_SERVICE_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 1);
/// The user name in the certificate the API server presents to kubelets (and so to Updraft).
pub const KUBELET_CLIENT_USER: &str = "kube-apiserver-kubelet-client";
/// The user name in the front-proxy client certificate: what the API server's aggregation
/// layer presents to extension API servers (metrics-server), which accept the user named in
/// its `X-Remote-User` header only from this name (`--requestheader-allowed-names`).
pub const FRONT_PROXY_CLIENT_USER: &str = "front-proxy-client";

/// One control-plane process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// The key-value store.
    Etcd,
    /// kube-apiserver.
    ApiServer,
    /// kube-controller-manager (node lifecycle, CSR signing, Deployments, Jobs …).
    ControllerManager,
    /// kube-scheduler.
    Scheduler,
    /// CoreDNS, the cluster DNS (only with the host address: see [`crate::coredns`]).
    CoreDns,
}

impl Component {
    /// All components in start order.
    pub const ALL: [Component; 5] = [
        Self::Etcd,
        Self::ApiServer,
        Self::ControllerManager,
        Self::Scheduler,
        Self::CoreDns,
    ];

    /// The component's name, as in its log and PID file names.
    pub fn name(self) -> &'static str {
        match self {
            Self::Etcd => "etcd",
            Self::ApiServer => "kube-apiserver",
            Self::ControllerManager => "kube-controller-manager",
            Self::Scheduler => "kube-scheduler",
            Self::CoreDns => "coredns",
        }
    }

    /// The port the component listens on.
    pub fn port(self) -> u16 {
        match self {
            Self::Etcd => ETCD_CLIENT_PORT,
            Self::ApiServer => APISERVER_PORT,
            Self::ControllerManager => CONTROLLER_MANAGER_PORT,
            Self::Scheduler => SCHEDULER_PORT,
            Self::CoreDns => coredns::READY_PORT,
        }
    }

    fn binary(self, toolchain: &Toolchain) -> PathBuf {
        match self {
            Self::Etcd => toolchain.etcd.clone(),
            Self::CoreDns => toolchain.coredns.clone(),
            other => toolchain.kubernetes(other.name()),
        }
    }

    fn startup_timeout(self) -> Duration {
        match self {
            Self::ApiServer => Duration::from_secs(180),
            _ => Duration::from_secs(60),
        }
    }

    fn args(self, layout: &Layout) -> Vec<String> {
        let pki = layout.pki();
        let p = |name: &str| pki.join(name).display().to_string();
        let ca = p("ca.crt");
        let mut args: Vec<String> = match self {
            Self::Etcd => vec![
                "--name=updraft-dev".into(),
                format!("--data-dir={}", layout.etcd_data().display()),
                format!("--listen-client-urls=https://127.0.0.1:{ETCD_CLIENT_PORT}"),
                format!("--advertise-client-urls=https://127.0.0.1:{ETCD_CLIENT_PORT}"),
                format!("--listen-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}"),
                format!("--initial-cluster=updraft-dev=http://127.0.0.1:{ETCD_PEER_PORT}"),
                format!("--cert-file={}", p("etcd-server.crt")),
                format!("--key-file={}", p("etcd-server.key")),
                format!("--trusted-ca-file={ca}"),
                "--client-cert-auth=true".into(),
                // A throw-away development store: durability across power loss is not worth
                // the fsync latency on a shared disk.
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
            Self::ApiServer => [
                // On the host address too, advertised, so that the `kubernetes` Service's
                // endpoints name an address pods on cells can reach (see `host_address`).
                if host_address::present() {
                    vec![
                        "--bind-address=0.0.0.0".to_owned(),
                        format!("--advertise-address={HOST_ADDRESS}"),
                    ]
                } else {
                    vec![
                        "--bind-address=127.0.0.1".to_owned(),
                        "--advertise-address=127.0.0.1".to_owned(),
                        // Loopback addresses are not valid Endpoints, so the `kubernetes`
                        // Service cannot point at this API server.
                        "--endpoint-reconciler-type=none".to_owned(),
                    ]
                },
                vec![
                    format!("--secure-port={APISERVER_PORT}"),
                    format!("--etcd-servers=https://127.0.0.1:{ETCD_CLIENT_PORT}"),
                    format!("--etcd-cafile={ca}"),
                    format!("--etcd-certfile={}", p("apiserver-etcd-client.crt")),
                    format!("--etcd-keyfile={}", p("apiserver-etcd-client.key")),
                    format!("--tls-cert-file={}", p("apiserver.crt")),
                    format!("--tls-private-key-file={}", p("apiserver.key")),
                    format!("--client-ca-file={ca}"),
                    "--anonymous-auth=false".into(),
                    "--authorization-mode=Node,RBAC".into(),
                    "--enable-admission-plugins=NodeRestriction".into(),
                    format!("--service-account-key-file={}", p("sa.pub")),
                    format!("--service-account-signing-key-file={}", p("sa.key")),
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                    format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                    format!(
                        "--kubelet-client-certificate={}",
                        p("apiserver-kubelet-client.crt")
                    ),
                    format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
                    // Kubelets (Updraft) must serve a certificate from the cluster CA, obtained
                    // through a kubelet-serving CSR or issued from it.
                    format!("--kubelet-certificate-authority={ca}"),
                    "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
                    // The aggregation layer's front proxy: requests for an APIService (e.g.
                    // metrics.k8s.io) go to its server with the front-proxy client certificate and
                    // the caller's identity in these headers; the API server publishes the CA and
                    // header names in kube-system/extension-apiserver-authentication, where
                    // extension servers read them. `--enable-aggregator-routing` stays off: the
                    // endpoint resolver it selects refuses ExternalName Services, the only kind
                    // that can lead to a loopback address here (no kube-proxy for ClusterIPs).
                    format!("--requestheader-client-ca-file={}", p("front-proxy-ca.crt")),
                    format!("--requestheader-allowed-names={FRONT_PROXY_CLIENT_USER}"),
                    "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
                    "--requestheader-group-headers=X-Remote-Group".into(),
                    "--requestheader-username-headers=X-Remote-User".into(),
                    format!("--proxy-client-cert-file={}", p("front-proxy-client.crt")),
                    format!("--proxy-client-key-file={}", p("front-proxy-client.key")),
                    "--allow-privileged=true".into(),
                    "--profiling=false".into(),
                ],
            ]
            .concat(),
            Self::ControllerManager => [
                "--use-service-account-credentials=true".into(),
                format!("--service-account-private-key-file={}", p("sa.key")),
                format!("--root-ca-file={ca}"),
                format!("--cluster-signing-cert-file={ca}"),
                format!("--cluster-signing-key-file={}", p("ca.key")),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            ]
            .into_iter()
            .chain(self.client_component_args(layout))
            .collect(),
            Self::Scheduler => self.client_component_args(layout).collect(),
            Self::CoreDns => vec![
                "-conf".into(),
                coredns::corefile_path(layout).display().to_string(),
            ],
        };
        if !matches!(self, Self::Etcd | Self::CoreDns) {
            args.push("--v=1".into());
        }
        args
    }

    /// What the controller manager and the scheduler share: their kubeconfig for the API and
    /// for delegated authentication/authorization, loopback serving, a single instance.
    fn client_component_args(self, layout: &Layout) -> impl Iterator<Item = String> {
        let kubeconfig = layout
            .component_kubeconfig(self.name())
            .display()
            .to_string();
        [
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", self.port()),
            "--leader-elect=false".into(),
            "--profiling=false".into(),
        ]
        .into_iter()
    }

    fn pid_file(self, layout: &Layout) -> PathBuf {
        layout.run().join(format!("{}.pid", self.name()))
    }
}

/// What `status` reports about one component.
#[derive(Debug, Clone)]
pub struct ComponentStatus {
    /// The component.
    pub component: Component,
    /// Its PID, if it runs.
    pub pid: Option<u32>,
    /// Its log file.
    pub log: PathBuf,
}

/// The PID of `component` if the process recorded for it still runs our binary.
fn running_pid(layout: &Layout, toolchain: &Toolchain, component: Component) -> Option<u32> {
    let text = std::fs::read_to_string(component.pid_file(layout)).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    let expected = component.binary(toolchain);
    let expected = std::fs::canonicalize(&expected).unwrap_or(expected);
    runs_program(pid, &expected).then_some(pid)
}

/// The arguments process `pid` runs with, without the program's name.
fn running_args(pid: u32) -> Option<Vec<String>> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline
        .strip_suffix(&[0])
        .unwrap_or(&cmdline)
        .split(|&byte| byte == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned());
    args.next()?;
    Some(args.collect())
}

/// Whether process `pid` runs `program` — also when the file has been replaced since it
/// started (a rebuilt binary: the kernel then reports the old path with " (deleted)").
fn runs_program(pid: u32, program: &Path) -> bool {
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    let exe = exe.to_string_lossy();
    let exe = exe.strip_suffix(" (deleted)").unwrap_or(&exe);
    Path::new(exe) == program
}

/// What runs now.
pub fn status(layout: &Layout) -> Vec<ComponentStatus> {
    let toolchain = Toolchain::in_cache();
    Component::ALL
        .iter()
        .map(|&component| ComponentStatus {
            component,
            pid: running_pid(layout, &toolchain, component),
            log: layout.log(component.name()),
        })
        .collect()
}

fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(io_err("creating", path))
}

/// Creates a directory only its owner may enter (etcd insists on that for its data).
fn create_private_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    create_dir(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("restricting permissions of", path))
}

/// Creates the PKI and the component kubeconfigs that do not exist yet.
fn ensure_pki(layout: &Layout) -> Result<()> {
    let dir = layout.pki();
    let ca = CertificateAuthority::load_or_create(&dir)?;
    pki::ensure_service_account_key(&dir)?;
    let apiserver_names = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ];
    // The host address and the `kubernetes` Service's cluster IP, for clients on cells and
    // in pods (`https://kubernetes.default.svc`); a certificate from before they were added
    // is issued again.
    let apiserver = Identity::loopback_server("kube-apiserver", &apiserver_names)
        .with_ip(HOST_ADDRESS.into())
        .with_ip(KUBERNETES_SERVICE_IP.into());
    let outdated = !pki::certificate_has_ip(&dir.join("apiserver.crt"), HOST_ADDRESS.into());
    ca.write_issued(&dir, "apiserver", &apiserver, outdated)?;
    let mut etcd = Identity::loopback_server("etcd", &["localhost"]);
    etcd.client = true;
    ca.issue_to_files(&dir, "etcd-server", &etcd)?;
    ca.issue_to_files(
        &dir,
        "apiserver-etcd-client",
        &Identity::client("kube-apiserver-etcd-client", &[]),
    )?;
    ca.issue_to_files(
        &dir,
        "apiserver-kubelet-client",
        &Identity::client(KUBELET_CLIENT_USER, &[]),
    )?;
    // Added after the first clusters were made: an existing state directory gets the
    // front-proxy files on its next `up`, its other certificates stay as they are.
    let (front_proxy_ca, new_ca) = CertificateAuthority::load_or_create_named(
        &dir,
        pki::FRONT_PROXY_CA,
        "updraft-dev-front-proxy-ca",
    )?;
    front_proxy_ca.write_issued(
        &dir,
        "front-proxy-client",
        &Identity::client(FRONT_PROXY_CLIENT_USER, &[]),
        new_ca,
    )?;

    let server = kubeconfig::server_url(APISERVER_PORT);
    let users = [
        (
            layout.admin_kubeconfig(),
            "updraft-admin",
            vec!["system:masters"],
        ),
        (
            layout.component_kubeconfig(Component::ControllerManager.name()),
            "system:kube-controller-manager",
            vec![],
        ),
        (
            layout.component_kubeconfig(Component::Scheduler.name()),
            "system:kube-scheduler",
            vec![],
        ),
        (
            coredns::kubeconfig_path(layout),
            coredns::COREDNS_USER,
            vec![],
        ),
    ];
    for (path, user, groups) in users {
        if path.is_file() {
            continue;
        }
        if let Some(parent) = path.parent() {
            create_dir(parent)?;
        }
        let cert = ca.issue(&Identity::client(user, &groups))?;
        let text = kubeconfig::render(
            &server,
            ca.cert_pem(),
            user,
            &Credentials::ClientCertificate(cert),
        );
        kubeconfig::write(&path, &text)?;
    }
    Ok(())
}

fn link_kubectl(layout: &Layout, toolchain: &Toolchain) -> Result<()> {
    let link = layout.kubectl();
    create_dir(&layout.bin())?;
    if std::fs::read_link(&link).is_ok_and(|target| target == toolchain.kubectl) {
        return Ok(());
    }
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&toolchain.kubectl, &link).map_err(io_err("linking", &link))
}

fn spawn(layout: &Layout, toolchain: &Toolchain, component: Component) -> Result<u32> {
    let log_path = layout.log(component.name());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io_err("opening", &log_path))?;
    let log_err = log.try_clone().map_err(io_err("opening", &log_path))?;
    let binary = component.binary(toolchain);
    let child = Command::new(&binary)
        .args(component.args(layout))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: a Ctrl-C in the terminal that ran `cluster up` must not
        // take the control plane down with it.
        .process_group(0)
        .spawn()
        .map_err(io_err("starting", &binary))?;
    let pid = child.id();
    let pid_file = component.pid_file(layout);
    std::fs::write(&pid_file, format!("{pid}\n")).map_err(io_err("writing", &pid_file))?;
    // The child is deliberately not waited for: it outlives this process.
    drop(child);
    Ok(pid)
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by us) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

async fn wait_ready(layout: &Layout, component: Component, pid: u32) -> Result<()> {
    let timeout = component.startup_timeout();
    let started = Instant::now();
    let mut last_seen = String::from("not checked yet");
    while started.elapsed() < timeout {
        if !alive(pid) {
            return Err(Error::Exited {
                component: component.name(),
                status: "exited".into(),
                log: layout.log(component.name()),
            });
        }
        match component {
            Component::ApiServer => match readyz(layout).await {
                Ok(()) => return Ok(()),
                Err(e) => last_seen = e.to_string(),
            },
            _ if port_open(component.port()) => return Ok(()),
            _ => last_seen = format!("port {} not listening", component.port()),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(Error::NotReady {
        what: component.name().into(),
        seconds: timeout.as_secs(),
        last_seen,
        log: layout.log(component.name()),
    })
}

/// Asks the API server's `/readyz` with the admin identity.
pub async fn readyz(layout: &Layout) -> Result<()> {
    ask_readyz(&admin_client(layout).await?).await
}

async fn ask_readyz(client: &kube::Client) -> Result<()> {
    let request = http::Request::get("/readyz")
        .body(Vec::new())
        .map_err(|e| Error::NotRunning {
            reason: format!("building the /readyz request: {e}"),
        })?;
    let body = client.request_text(request).await?;
    if body.trim() == "ok" {
        Ok(())
    } else {
        Err(Error::NotRunning {
            reason: format!("/readyz answered {body:?}"),
        })
    }
}

/// A client with the cluster-admin identity.
pub async fn admin_client(layout: &Layout) -> Result<kube::Client> {
    client_for(&layout.admin_kubeconfig()).await
}

/// A client for the kubeconfig at `path`.
pub async fn client_for(path: &Path) -> Result<kube::Client> {
    if !path.is_file() {
        return Err(Error::NotRunning {
            reason: format!("{} does not exist", path.display()),
        });
    }
    let kubeconfig =
        kube::config::Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
            path: path.to_owned(),
            source,
        })?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(|source| Error::Kubeconfig {
            path: path.to_owned(),
            source,
        })?;
    Ok(kube::Client::try_from(config)?)
}

/// Grants what a kubeadm cluster grants: the API server's kubelet-client identity the
/// kubelet API; and the nodes (Updraft's virtual nodes route their pods' Services, the
/// kube-proxy role) what kube-proxy gets, `system:node-proxier` (EndpointSlices).
async fn bootstrap_rbac(layout: &Layout) -> Result<()> {
    let client = admin_client(layout).await?;
    let bindings = [
        (
            "updraft-dev:apiserver-kubelet-client",
            "system:kubelet-api-admin",
            serde_json::json!({
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "User",
                "name": KUBELET_CLIENT_USER
            }),
        ),
        (
            "updraft-dev:node-proxier",
            "system:node-proxier",
            serde_json::json!({
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Group",
                "name": "system:nodes"
            }),
        ),
    ];
    for (name, role, subject) in bindings {
        let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": { "name": name },
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role
            },
            "subjects": [subject]
        }))
        .map_err(|e| Error::NotRunning {
            reason: format!("invalid built-in RBAC binding {name}: {e}"),
        })?;
        Api::<ClusterRoleBinding>::all(client.clone())
            .patch(
                name,
                &PatchParams::apply("updraft-devcluster").force(),
                &Patch::Apply(&binding),
            )
            .await?;
    }
    Ok(())
}

/// Starts whatever is not running yet (building the toolchain first if needed) and waits
/// until the API server is ready and the cluster bootstrap is applied. Idempotent; a
/// component that runs with other flags than this checkout gives it (started by an older
/// one) is restarted with the current ones.
pub async fn up(layout: &Layout) -> Result<()> {
    let toolchain = Toolchain::ensure()?;
    for dir in [layout.root().to_path_buf(), layout.logs(), layout.run()] {
        create_dir(&dir)?;
    }
    create_private_dir(&layout.etcd_data())?;
    let _only_up = lock_up(layout).await?;
    let on_host_address = host_address::ensure();
    ensure_pki(layout)?;
    let corefile = coredns::corefile_path(layout);
    std::fs::write(&corefile, coredns::corefile(layout)).map_err(io_err("writing", &corefile))?;
    link_kubectl(layout, &toolchain)?;
    for component in Component::ALL {
        // CoreDNS serves on the host address; without it no pod could reach it anyway.
        if component == Component::CoreDns && !on_host_address {
            continue;
        }
        if let Some(pid) = running_pid(layout, &toolchain, component) {
            if running_args(pid).is_none_or(|args| args == component.args(layout)) {
                continue;
            }
            // Started by an older checkout with other flags (say, before the API server had
            // its front proxy): what this checkout's tests rely on would be missing.
            eprintln!(
                "{} runs with other flags than this checkout starts it with; restarting it",
                component.name()
            );
            terminate(pid, Duration::from_secs(20));
        }
        if port_open(component.port()) {
            return Err(Error::PortInUse {
                port: component.port(),
                component: component.name(),
            });
        }
        let pid = spawn(layout, &toolchain, component)?;
        wait_ready(layout, component, pid).await?;
        if component == Component::ApiServer {
            bootstrap_rbac(layout).await?;
            coredns::bootstrap(&admin_client(layout).await?).await?;
        }
    }
    // Whatever was already running, the API server must answer now.
    readyz(layout).await
}

/// Waits for and takes the lock one `up` holds while it runs (released when the returned
/// file is dropped). Two at once (two test runs starting together) would each start what
/// they found missing; the second start then fails on the taken port, after writing its
/// PID over the first's, and the control plane looks stopped while it runs.
async fn lock_up(layout: &Layout) -> Result<Flock<std::fs::File>> {
    let path = layout.run().join("up.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("opening", &path))?;
    let lock = tokio::task::spawn_blocking(move || {
        Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_err("locking", path)(errno.into()))
    })
    .await
    .map_err(|e| Error::NotRunning {
        reason: format!("waiting for another `cluster up`: {e}"),
    })??;
    Ok(lock)
}

/// A second kube-apiserver on `port`, serving the same etcd with the same PKI, started like
/// an extra process under the name `kube-apiserver-<port>` (stop it with [`down_extra`]).
/// Tests point a node at it and restart it, to see a real API server go away and come back
/// without disturbing the shared one. Returns when it answers `/readyz`.
pub async fn start_apiserver_replica(layout: &Layout, port: u16) -> Result<u32> {
    let toolchain = Toolchain::in_cache();
    let binary = Component::ApiServer.binary(&toolchain);
    let mut args: Vec<String> = Component::ApiServer
        .args(layout)
        .into_iter()
        .filter(|arg| !arg.starts_with("--endpoint-reconciler-type="))
        .map(|arg| {
            if arg.starts_with("--secure-port=") {
                format!("--secure-port={port}")
            } else {
                arg
            }
        })
        .collect();
    // The `kubernetes` Service names the shared API server's port; a replica on another port
    // must not take it over.
    args.push("--endpoint-reconciler-type=none".into());
    let name = apiserver_replica_name(port);
    let pid = start_extra(layout, &name, &binary, &args)?;
    let kubeconfig = std::fs::read_to_string(layout.admin_kubeconfig())
        .map_err(io_err("reading", layout.admin_kubeconfig()))?;
    let kubeconfig = with_server_port(&kubeconfig, port);
    let started = Instant::now();
    let timeout = Component::ApiServer.startup_timeout();
    let mut last_seen = String::from("not checked yet");
    while started.elapsed() < timeout {
        if !alive(pid) {
            return Err(Error::Exited {
                component: "kube-apiserver replica",
                status: "exited".into(),
                log: layout.log(&name),
            });
        }
        match replica_ready(&kubeconfig).await {
            Ok(()) => return Ok(pid),
            Err(e) => last_seen = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(Error::NotReady {
        what: name.clone(),
        seconds: timeout.as_secs(),
        last_seen,
        log: layout.log(&name),
    })
}

/// The extra-process name of the API server replica on `port`.
pub fn apiserver_replica_name(port: u16) -> String {
    format!("kube-apiserver-{port}")
}

/// `kubeconfig` (as rendered by this crate) pointed at the API server listening on `port`.
pub fn with_server_port(kubeconfig: &str, port: u16) -> String {
    kubeconfig.replace(
        &kubeconfig::server_url(APISERVER_PORT),
        &kubeconfig::server_url(port),
    )
}

async fn replica_ready(kubeconfig: &str) -> Result<()> {
    let parsed =
        kube::config::Kubeconfig::from_yaml(kubeconfig).map_err(|e| Error::NotRunning {
            reason: format!("replica kubeconfig: {e}"),
        })?;
    let config = kube::Config::from_custom_kubeconfig(parsed, &Default::default())
        .await
        .map_err(|e| Error::NotRunning {
            reason: format!("replica kubeconfig: {e}"),
        })?;
    ask_readyz(&kube::Client::try_from(config)?).await
}

/// Starts `program` detached, like a component, under `name` (its log is
/// `logs/<name>.log`); `down` stops it before the control plane. Used for the demo's node.
pub fn start_extra(layout: &Layout, name: &str, program: &Path, args: &[String]) -> Result<u32> {
    for dir in [layout.logs(), layout.run()] {
        create_dir(&dir)?;
    }
    let log_path = layout.log(name);
    let log = std::fs::File::create(&log_path).map_err(io_err("creating", &log_path))?;
    let log_err = log.try_clone().map_err(io_err("opening", &log_path))?;
    let program = std::fs::canonicalize(program).map_err(io_err("finding", program))?;
    let child = Command::new(&program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .spawn()
        .map_err(io_err("starting", &program))?;
    let pid = child.id();
    drop(child);
    let pid_file = layout.run().join(format!("{name}.extra"));
    std::fs::write(&pid_file, format!("{pid}\n{}\n", program.display()))
        .map_err(io_err("writing", &pid_file))?;
    Ok(pid)
}

/// Stops the process [`start_extra`] started under `name`, if it runs.
pub fn down_extra(layout: &Layout, name: &str) -> Result<bool> {
    Ok(stop_extras_matching(layout, Some(name))?.contains(&name.to_owned()))
}

/// Stops the processes [`start_extra`] started; returns their names.
fn stop_extras(layout: &Layout) -> Result<Vec<String>> {
    stop_extras_matching(layout, None)
}

fn stop_extras_matching(layout: &Layout, only: Option<&str>) -> Result<Vec<String>> {
    let mut stopped = Vec::new();
    let Ok(entries) = std::fs::read_dir(layout.run()) else {
        return Ok(stopped);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.extension().is_none_or(|e| e != "extra") || only.is_some_and(|o| o != name) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lines = text.lines();
        let pid = lines.next().and_then(|p| p.trim().parse::<u32>().ok());
        let program = lines.next().map(PathBuf::from);
        if let (Some(pid), Some(program)) = (pid, program)
            && runs_program(pid, &program)
        {
            terminate(pid, Duration::from_secs(20));
            stopped.push(name);
        }
        std::fs::remove_file(&path).map_err(io_err("removing", &path))?;
    }
    Ok(stopped)
}

/// Stops every component this layout started (SIGTERM, then SIGKILL after a grace period),
/// newest first — processes started with [`start_extra`] before the control plane — and
/// removes their PID files. Returns the names of what was stopped.
pub fn down(layout: &Layout) -> Result<Vec<String>> {
    let mut stopped = stop_extras(layout)?;
    let toolchain = Toolchain::in_cache();
    for &component in Component::ALL.iter().rev() {
        if let Some(pid) = running_pid(layout, &toolchain, component) {
            terminate(pid, Duration::from_secs(20));
            stopped.push(component.name().to_owned());
        }
        let pid_file = component.pid_file(layout);
        if pid_file.exists() {
            std::fs::remove_file(&pid_file).map_err(io_err("removing", &pid_file))?;
        }
    }
    host_address::remove();
    Ok(stopped)
}

fn terminate(pid: u32, grace: Duration) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let target = Pid::from_raw(raw);
    if kill(target, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + grace;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if alive(pid) {
        let _ = kill(target, Signal::SIGKILL);
        while alive(pid) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A kubeconfig for the node identity `system:node:<node>` (group `system:nodes`), the
/// identity a kubelet has under the Node authorizer and `NodeRestriction`.
pub fn node_kubeconfig(layout: &Layout, node: &str) -> Result<String> {
    let ca = CertificateAuthority::load(&layout.pki())?;
    let user = format!("system:node:{node}");
    let cert = ca.issue(&Identity::client(&user, &["system:nodes"]))?;
    Ok(kubeconfig::render(
        &kubeconfig::server_url(APISERVER_PORT),
        ca.cert_pem(),
        &user,
        &Credentials::ClientCertificate(cert),
    ))
}

/// The credentials a node process runs with, kept in `<cluster dir>/<node>/`.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    /// The node identity's kubeconfig (`system:node:<node>`).
    pub kubeconfig: PathBuf,
    /// The kubelet API's serving certificate and key, issued by the cluster CA.
    pub serving: (PathBuf, PathBuf),
    /// The CA that signs the clients the kubelet API accepts (the API server's).
    pub client_ca: PathBuf,
    /// The directory, for further files (a provider config).
    pub dir: PathBuf,
}

/// The `updraft run` flags that make a node a member of this cluster's network as a kubelet
/// would be: its `InternalIP` on the host address (the API server proxies to it; it refuses
/// loopback) when the host has it, and the cluster DNS of `kube-dns`.
pub fn node_network_args() -> Vec<String> {
    let node_ip = if host_address::present() {
        HOST_ADDRESS.to_string()
    } else {
        "127.0.0.1".to_owned()
    };
    vec![
        "--node-ip".into(),
        node_ip,
        "--cluster-dns".into(),
        coredns::CLUSTER_DNS_IP.to_string(),
        "--cluster-domain".into(),
        coredns::CLUSTER_DOMAIN.into(),
    ]
}

/// Writes node `node`'s kubeconfig and serving certificate (for 127.0.0.1, the host address,
/// `localhost` and the node name).
pub fn node_files(layout: &Layout, node: &str) -> Result<NodeFiles> {
    let dir = layout.root().join(node);
    create_dir(&dir)?;
    let kubeconfig = dir.join("node.kubeconfig");
    kubeconfig::write(&kubeconfig, &node_kubeconfig(layout, node)?)?;
    let ca = CertificateAuthority::load(&layout.pki())?;
    let serving = ca.issue(
        &Identity::loopback_server(node, &[node, "localhost"]).with_ip(HOST_ADDRESS.into()),
    )?;
    let (cert, key) = (dir.join("serving.crt"), dir.join("serving.key"));
    std::fs::write(&cert, serving.cert_pem).map_err(io_err("writing", &cert))?;
    std::fs::write(&key, serving.key_pem).map_err(io_err("writing", &key))?;
    Ok(NodeFiles {
        kubeconfig,
        serving: (cert, key),
        client_ca: CertificateAuthority::cert_path(&layout.pki()),
        dir,
    })
}

/// A kubeconfig for the client certificate the API server uses towards kubelets.
pub fn kubelet_client_kubeconfig(layout: &Layout) -> Result<String> {
    let pki = layout.pki();
    let read = |name: &str| {
        let path = pki.join(name);
        std::fs::read_to_string(&path).map_err(io_err("reading", path))
    };
    let ca = read("ca.crt")?;
    let cert = pki::CertifiedKey {
        cert_pem: read("apiserver-kubelet-client.crt")?,
        key_pem: read("apiserver-kubelet-client.key")?,
    };
    Ok(kubeconfig::render(
        &kubeconfig::server_url(APISERVER_PORT),
        &ca,
        KUBELET_CLIENT_USER,
        &Credentials::ClientCertificate(cert),
    ))
}

/// A kubeconfig for service account `namespace/name`, with a token from the TokenRequest API
/// valid for `ttl_seconds`.
pub async fn service_account_kubeconfig(
    layout: &Layout,
    namespace: &str,
    name: &str,
    ttl_seconds: i64,
) -> Result<String> {
    let client = admin_client(layout).await?;
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![]),
            expiration_seconds: Some(ttl_seconds),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(client, namespace)
        .create_token_request(name, &PostParams::default(), &request)
        .await?
        .status
        .and_then(|s| s.token)
        .unwrap_or_default();
    let ca_path = CertificateAuthority::cert_path(&layout.pki());
    let ca = std::fs::read_to_string(&ca_path).map_err(io_err("reading", &ca_path))?;
    Ok(kubeconfig::render(
        &kubeconfig::server_url(APISERVER_PORT),
        &ca,
        &format!("system:serviceaccount:{namespace}:{name}"),
        &Credentials::Token(token),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_existing_pki_gets_the_front_proxy_files_and_keeps_its_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        ensure_pki(&layout).unwrap();
        let pki = layout.pki();
        let read = |name: &str| std::fs::read_to_string(pki.join(name)).unwrap();
        let admin = || std::fs::read_to_string(layout.admin_kubeconfig()).unwrap();
        let before = [read("ca.crt"), read("apiserver.crt"), admin()];
        // A state directory made before the front proxy existed.
        for name in [
            "front-proxy-ca.crt",
            "front-proxy-ca.key",
            "front-proxy-client.crt",
            "front-proxy-client.key",
        ] {
            std::fs::remove_file(pki.join(name)).unwrap();
        }
        ensure_pki(&layout).unwrap();
        assert_eq!(before, [read("ca.crt"), read("apiserver.crt"), admin()]);
        assert_ne!(read("front-proxy-ca.crt"), read("ca.crt"));
        let client = read("front-proxy-client.crt");

        // Idempotent; and a client certificate left over from a removed front-proxy CA is
        // replaced with one from the new CA.
        ensure_pki(&layout).unwrap();
        assert_eq!(read("front-proxy-client.crt"), client);
        std::fs::remove_file(pki.join("front-proxy-ca.key")).unwrap();
        ensure_pki(&layout).unwrap();
        assert_ne!(read("front-proxy-client.crt"), client);
    }

    #[test]
    fn an_api_server_certificate_without_the_host_address_is_issued_again() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        ensure_pki(&layout).unwrap();
        let cert = layout.pki().join("apiserver.crt");
        assert!(pki::certificate_has_ip(&cert, HOST_ADDRESS.into()));
        assert!(pki::certificate_has_ip(&cert, KUBERNETES_SERVICE_IP.into()));
        // One from before the host address: loopback only.
        let ca = CertificateAuthority::load(&layout.pki()).unwrap();
        ca.write_issued(
            &layout.pki(),
            "apiserver",
            &Identity::loopback_server("kube-apiserver", &["localhost"]),
            true,
        )
        .unwrap();
        assert!(!pki::certificate_has_ip(&cert, HOST_ADDRESS.into()));
        ensure_pki(&layout).unwrap();
        assert!(pki::certificate_has_ip(&cert, HOST_ADDRESS.into()));
        assert!(coredns::kubeconfig_path(&layout).is_file());
    }

    #[test]
    fn every_file_the_api_server_is_given_exists_after_ensure_pki() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        ensure_pki(&layout).unwrap();
        let args = Component::ApiServer.args(&layout);
        for flag in [
            "--requestheader-client-ca-file",
            "--proxy-client-cert-file",
            "--proxy-client-key-file",
            "--client-ca-file",
            "--tls-cert-file",
        ] {
            let prefix = format!("{flag}=");
            let path = args
                .iter()
                .find_map(|arg| arg.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("{flag} missing from {args:?}"));
            assert!(Path::new(path).is_file(), "{flag}={path}");
        }
    }

    #[test]
    fn running_args_are_read_back_without_the_program_name() {
        let expected: Vec<String> = std::env::args().skip(1).collect();
        assert_eq!(running_args(std::process::id()), Some(expected));
        assert_eq!(running_args(u32::MAX), None);
    }
}
