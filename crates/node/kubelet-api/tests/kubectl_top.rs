//! `kubectl top pod` and `kubectl top node`, run as a user runs them: plain kubectl against
//! the API server, whose aggregation layer forwards `metrics.k8s.io` to the real
//! metrics-server, which scrapes the node's `/metrics/resource` the way it scrapes any
//! kubelet (the node's InternalIP and status port, the serving certificate verified against
//! the cluster CA, the API server's kubelet client certificate as its credentials,
//! authorized by the node through SubjectAccessReview).
//!
//! What this proves beyond the node's endpoint: the dev control plane's front proxy works
//! end to end. metrics-server trusts the API server only through what the API server
//! publishes in `kube-system/extension-apiserver-authentication` (the front-proxy CA and the
//! `X-Remote-*` header names); the `v1beta1.metrics.k8s.io` APIService (with `caBundle`, so
//! the API server verifies metrics-server's certificate for `<service>.<namespace>.svc`)
//! becomes Available; and kubectl's request arrives with the admin's identity, which
//! metrics-server authorizes through the API server.
//!
//! Reaching a process on loopback: there is no kube-proxy, so a ClusterIP leads nowhere, and
//! Endpoints may not hold loopback addresses; but the aggregator's default service resolver
//! (`ResolveCluster` in k8s.io/apiserver's `util/proxy`) turns an `ExternalName` Service
//! into `https://<externalName>:<APIService port>`, so the Service is
//! `ExternalName: localhost`.
//!
//! The APIService is cluster-wide and its name is fixed by the group and version, so one
//! run at a time holds it: the test waits for another live run's to go, removes one left by
//! a run whose namespace is gone, and deletes its own when it ends, pass or fail (a leftover
//! pointing at a stopped metrics-server would make `metrics.k8s.io` unavailable in every
//! later discovery).
//!
//! metrics-server is built once per machine from its Go module (`go install
//! sigs.k8s.io/metrics-server/cmd/metrics-server@v0.9.0`, through the Go module proxy) into
//! `~/.cache/updraft/metrics-server-v0.9.0/bin`, like the control plane's binaries.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

#[path = "port_forward_support/mod.rs"]
mod support;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::{
    APIService, APIServiceSpec, ServiceReference,
};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams, Preconditions};
use updraft_devcluster::pki::{CertificateAuthority, Identity};
use updraft_testing::{TestCluster, cleanup_as_admin, eventually, scratch_dir, wait_for};

use support::{TIMEOUT, running_pod, start_loopback_node};

const METRICS_SERVER_VERSION: &str = "0.9.0";
/// The APIService kubectl's `top` needs; its name is `<version>.<group>`, fixed.
const METRICS_API: &str = "v1beta1.metrics.k8s.io";
/// The Service in the test's namespace that the APIService points at.
const SERVICE: &str = "metrics-server";

/// The metrics-server binary, built from its Go module on first use.
fn metrics_server() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let root = home
        .join(".cache/updraft")
        .join(format!("metrics-server-v{METRICS_SERVER_VERSION}"));
    let binary = root.join("bin/metrics-server");
    if binary.exists() {
        return binary;
    }
    // Built into a directory of its own and renamed, so a concurrent or interrupted build
    // never leaves a half-written binary at the final path.
    let partial = root.join(format!("bin.partial-{}", std::process::id()));
    std::fs::create_dir_all(&partial).unwrap();
    eprintln!(
        "building metrics-server v{METRICS_SERVER_VERSION} from its Go module (once per machine)"
    );
    let output = Command::new("go")
        .args(["install", "-trimpath", "-ldflags", "-s -w"])
        .arg(format!(
            "sigs.k8s.io/metrics-server/cmd/metrics-server@v{METRICS_SERVER_VERSION}"
        ))
        .env("GOBIN", &partial)
        .env("GOFLAGS", "")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap_or_else(|e| {
            panic!("kubectl top needs the Go toolchain (`go` on PATH) to build metrics-server: {e}")
        });
    assert!(
        output.status.success(),
        "go install metrics-server failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::rename(&partial, root.join("bin"));
    let _ = std::fs::remove_dir_all(&partial);
    assert!(binary.exists(), "{} after the build", binary.display());
    binary
}

fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Deletes this run's APIService when dropped, pass or panic, and only this run's (the
/// deletion is conditional on its UID).
struct RegisteredMetricsApi {
    uid: String,
}

impl Drop for RegisteredMetricsApi {
    fn drop(&mut self) {
        let uid = self.uid.clone();
        cleanup_as_admin(move |client| async move {
            let only_ours = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            let _ = Api::<APIService>::all(client)
                .delete(METRICS_API, &only_ours)
                .await;
        });
    }
}

/// Registers `metrics.k8s.io/v1beta1` as served by `<namespace>/SERVICE` on `port`, its
/// certificate verified against `ca_pem`. Waits while another live test run holds the
/// APIService; removes one whose run is gone (its namespace deleted).
async fn register_metrics_api(
    cluster: &TestCluster,
    namespace: &str,
    port: u16,
    ca_pem: &str,
) -> RegisteredMetricsApi {
    let api = Api::<APIService>::all(cluster.client());
    let namespaces = Api::<Namespace>::all(cluster.client());
    let wanted = APIService {
        metadata: ObjectMeta {
            name: Some(METRICS_API.into()),
            labels: Some([("updraft.dev/test".to_owned(), "true".to_owned())].into()),
            ..ObjectMeta::default()
        },
        spec: Some(APIServiceSpec {
            group: Some("metrics.k8s.io".into()),
            version: Some("v1beta1".into()),
            group_priority_minimum: 100,
            version_priority: 100,
            service: Some(ServiceReference {
                name: Some(SERVICE.into()),
                namespace: Some(namespace.into()),
                port: Some(i32::from(port)),
            }),
            ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
            insecure_skip_tls_verify: None,
        }),
        status: None,
    };
    let uid = eventually(TIMEOUT, || async {
        let error = match api.create(&PostParams::default(), &wanted).await {
            Ok(created) => return Ok(created.metadata.uid.unwrap_or_default()),
            Err(error) => error,
        };
        let existing = api.get_opt(METRICS_API).await.map_err(|e| e.to_string())?;
        let Some(existing) = existing else {
            return Err(format!("creating {METRICS_API}: {error}"));
        };
        let test_owned = existing
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key("updraft.dev/test"));
        let owner = existing
            .spec
            .as_ref()
            .and_then(|s| s.service.as_ref())
            .and_then(|s| s.namespace.clone())
            .unwrap_or_default();
        let owner_alive = namespaces
            .get_opt(&owner)
            .await
            .map_err(|e| e.to_string())?
            .is_some_and(|ns| ns.metadata.deletion_timestamp.is_none());
        if test_owned && !owner_alive {
            let stale = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: existing.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            let _ = api.delete(METRICS_API, &stale).await;
            return Err(format!(
                "removed {METRICS_API} left by a finished run in {owner}"
            ));
        }
        Err(format!(
            "{METRICS_API} is held by {} (namespace {owner}); waiting for it to go",
            if test_owned {
                "another test run"
            } else {
                "something other than a test"
            }
        ))
    })
    .await;
    RegisteredMetricsApi { uid }
}

/// The last lines of the log at `path`, for failure messages.
fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Runs `kubectl top <args>` as the admin, through the API server; `Ok` is its output once it
/// shows `name`.
fn kubectl_top(
    cluster: &TestCluster,
    args: &[&str],
    name: &str,
    log: &Path,
) -> Result<String, String> {
    let output = cluster
        .kubectl()
        .arg("top")
        .args(args)
        .arg("--no-headers")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() && stdout.split_whitespace().next() == Some(name) {
        return Ok(stdout);
    }
    Err(format!(
        "kubectl top {}: {stdout}{}\nmetrics-server log ({}):\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr),
        log.display(),
        log_tail(log)
    ))
}

fn millicores(column: Option<&str>, line: &str) -> u32 {
    column
        .and_then(|c| c.strip_suffix('m'))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("CPU column in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kubectl_top_reads_through_the_aggregation_layer_what_metrics_server_scraped_from_the_node()
{
    let binary = metrics_server();
    let cluster = TestCluster::connect().await;
    // The API server publishes its front proxy for extension servers; without it (started by
    // an older checkout) the APIService could never become Available.
    let authentication = Api::<ConfigMap>::namespaced(cluster.client(), "kube-system")
        .get("extension-apiserver-authentication")
        .await
        .unwrap();
    assert!(
        authentication
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key("requestheader-client-ca-file")),
        "the API server runs without the aggregation layer's front proxy (no requestheader CA in \
         kube-system/extension-apiserver-authentication); `cargo xtask cluster up` restarts it \
         with the current flags"
    );
    let ns = cluster.namespace("top").await;
    let node = start_loopback_node(&cluster).await;
    running_pod(
        &cluster,
        ns.name(),
        &node.name,
        "busy",
        serde_json::json!([
            {"name": "app", "image": "busybox", "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}}
        ]),
    )
    .await;

    let pki = cluster.layout().pki();
    let scratch = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::load(&pki).unwrap();
    // The aggregator verifies the server as `<service>.<namespace>.svc`, whatever address
    // the Service resolved to.
    let serving = ca
        .issue(&Identity::loopback_server(
            "metrics-server",
            &[&format!("{SERVICE}.{}.svc", ns.name()), "localhost"],
        ))
        .unwrap();
    let (cert, key) = (
        scratch.path().join("serving.crt"),
        scratch.path().join("serving.key"),
    );
    std::fs::write(&cert, &serving.cert_pem).unwrap();
    std::fs::write(&key, &serving.key_pem).unwrap();
    let ca_file = scratch.path().join("ca.crt");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let admin = cluster.layout().admin_kubeconfig();
    let port = free_loopback_port();
    // Outside the scratch directory, so that it is still there after a failure.
    std::fs::create_dir_all(scratch_dir()).unwrap();
    let log_path = scratch_dir().join(format!("metrics-server-{}.log", ns.name()));
    let log = std::fs::File::create(&log_path).unwrap();
    let path_arg = |flag: &str, path: &std::path::Path| format!("{flag}={}", path.display());
    // Authentication and authorization delegated to the API server: metrics-server reads the
    // front-proxy CA and header names from extension-apiserver-authentication.
    let mut server = tokio::process::Command::new(&binary)
        .arg(format!("--secure-port={port}"))
        .arg("--bind-address=127.0.0.1")
        .arg(path_arg("--tls-cert-file", &cert))
        .arg(path_arg("--tls-private-key-file", &key))
        .arg(path_arg("--kubeconfig", &admin))
        .arg(path_arg("--authentication-kubeconfig", &admin))
        .arg(path_arg("--authorization-kubeconfig", &admin))
        .arg("--kubelet-preferred-address-types=InternalIP")
        .arg("--kubelet-use-node-status-port")
        .arg(path_arg("--kubelet-certificate-authority", &ca_file))
        .arg(path_arg(
            "--kubelet-client-certificate",
            &pki.join("apiserver-kubelet-client.crt"),
        ))
        .arg(path_arg(
            "--kubelet-client-key",
            &pki.join("apiserver-kubelet-client.key"),
        ))
        // Only this test's node: the shared cluster has other tests' nodes.
        .arg(format!(
            "--node-selector=kubernetes.io/hostname={}",
            node.name
        ))
        .arg("--metric-resolution=10s")
        .arg("--kubelet-request-timeout=5s")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": { "name": SERVICE },
        "spec": {
            "type": "ExternalName",
            "externalName": "localhost",
            "ports": [{ "name": "https", "port": port, "protocol": "TCP" }]
        }
    }))
    .unwrap();
    Api::<Service>::namespaced(cluster.client(), ns.name())
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    let registered = register_metrics_api(&cluster, ns.name(), port, ca.cert_pem()).await;

    // Available: the API server reached metrics-server through the ExternalName Service,
    // verified its certificate and was answered.
    let apiservices = Api::<APIService>::all(cluster.client());
    tokio::select! {
        _ = wait_for(&apiservices, METRICS_API, "the metrics APIService to be Available", TIMEOUT, |a| {
            a.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Available" && c.status == "True"))
        }) => {}
        status = server.wait() => panic!(
            "metrics-server exited ({status:?}):\n{}",
            log_tail(&log_path)
        ),
    }

    // metrics-server needs two scrapes (10 s apart) before it has a CPU rate.
    let line = eventually(TIMEOUT, || async {
        kubectl_top(
            &cluster,
            &["pod", "-n", ns.name(), "busy"],
            "busy",
            &log_path,
        )
    })
    .await;
    // "busy   250m   64Mi": the mock uses what the container requests.
    let columns: Vec<&str> = line.split_whitespace().collect();
    let cpu = millicores(columns.get(1).copied(), &line);
    assert!((240..=260).contains(&cpu), "CPU {cpu}m in {line:?}");
    assert_eq!(columns.get(2), Some(&"64Mi"), "{line}");

    // The node's numbers are its pods' sum: "<node>  250m  <%>  64Mi  <%>".
    let line = eventually(TIMEOUT, || async {
        kubectl_top(&cluster, &["node", &node.name], &node.name, &log_path)
    })
    .await;
    let columns: Vec<&str> = line.split_whitespace().collect();
    let cpu = millicores(columns.get(1).copied(), &line);
    assert!((240..=260).contains(&cpu), "node CPU {cpu}m in {line:?}");
    assert_eq!(columns.get(3), Some(&"64Mi"), "{line}");

    drop(registered);
    let _ = server.start_kill();
    let _ = std::fs::remove_file(&log_path);
    drop(node);
}
