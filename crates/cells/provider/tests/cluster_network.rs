//! Pods on cells as members of the cluster network, with real local cells, the real control
//! plane (its controller manager's EndpointSlices, its CoreDNS), real nftables in each cell's
//! pod network namespace and real kubectl:
//!
//! - a pod on one cell reaches a ClusterIP Service in front of a pod on another cell by its
//!   short name, its FQDN and its cluster IP (names through the cluster DNS: a UDP Service);
//!   the target port is named; its `/etc/resolv.conf` is what the kubelet writes;
//! - a Service without endpoints refuses connections at once (no timeout);
//! - the pod calls the API server at `https://kubernetes.default.svc` with its projected token,
//!   verifying TLS with its `ca.crt`;
//! - scaled to zero endpoints and back, the Service follows;
//! - the API server proxies to the node at its `InternalIP` (`--node-ip` on the host
//!   address), so `kubectl get --raw /api/v1/nodes/<node>/proxy/stats/summary` works.
//!
//! Runs the real `updraft` binary with the kubelet's `--cluster-dns`, `--cluster-domain` and
//! `--node-ip`. Needs root, the control plane and the `updraft` and `updraft-cell` binaries
//! (see `common`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, PostParams};
use updraft_devcluster::coredns::{CLUSTER_DNS_IP, CLUSTER_DOMAIN};
use updraft_testing::{eventually, wait_for, wait_for_deletion};

use common::{
    Cells, ConfigOptions, Setup, TIMEOUT, UpdraftProcess, delete_node, describe_output, free_port,
    run_kubectl, running_and_ready, sleeping_pod, wait_node_ready,
};

/// A pod on `node` labelled `app: web` serving `hello from <its name>` over HTTP on its
/// container port `http` (8080), ready once it listens.
fn web_pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "web",
                "image": "busybox",
                "command": ["/bin/sh", "-c",
                    "mkdir -p /www && echo \"hello from $(hostname)\" > /www/index.html && exec httpd -f -p 8080 -h /www"],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1}
            }]
        }
    }))
    .unwrap()
}

/// A ClusterIP Service `name` on port 80 to the named port `http` of the pods labelled
/// `app: <app>`.
fn service(name: &str, app: &str) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "selector": {"app": app},
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}]
        }
    }))
    .unwrap()
}

/// `kubectl exec <pod> -- <command>` in `namespace`.
async fn exec(
    cluster: &updraft_testing::TestCluster,
    namespace: &str,
    pod: &str,
    command: &[&str],
) -> std::process::Output {
    let mut args = vec!["exec", "-n", namespace, pod, "--"];
    args.extend_from_slice(command);
    run_kubectl(cluster, &args).await
}

/// `curl` from `pod` to `url`: its body, or the failure with curl's message.
async fn fetch(
    cluster: &updraft_testing::TestCluster,
    namespace: &str,
    pod: &str,
    url: &str,
) -> Result<String, String> {
    let output = exec(
        cluster,
        namespace,
        pod,
        &["curl", "-sS", "--max-time", "10", url],
    )
    .await;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(describe_output(&output))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_on_a_cell_reaches_services_by_name_and_the_api_server_with_its_token() {
    let Setup {
        cluster,
        namespace,
        node,
        tmp,
    } = Setup::new("cells-net").await;
    let mut options = ConfigOptions::new(21);
    options.curl_image = true;
    let Cells {
        config, cleanup, ..
    } = Cells::new(tmp.path(), options);
    // The real binary, with the kubelet's flags: --node-ip on the host address,
    // --cluster-dns and --cluster-domain (see `UpdraftProcess`).
    let updraft = UpdraftProcess::start(&cluster, &node, free_port(), &config);
    wait_node_ready(&cluster, &node).await;
    let ns = namespace.name();
    let pods = Api::<Pod>::namespaced(cluster.client(), ns);
    let services = Api::<Service>::namespaced(cluster.client(), ns);
    let post = PostParams::default();
    let web = services
        .create(&post, &service("web", "web"))
        .await
        .unwrap();
    let web_ip = web.spec.unwrap().cluster_ip.unwrap();
    services
        .create(&post, &service("nobody", "nobody"))
        .await
        .unwrap();
    pods.create(&post, &web_pod("web-0", &node)).await.unwrap();
    let mut client = sleeping_pod("client", &node, "curl");
    client.spec.as_mut().unwrap().containers[0].command =
        Some(vec!["/bin/sleep".into(), "3600".into()]);
    pods.create(&post, &client).await.unwrap();
    for name in ["web-0", "client"] {
        wait_for(&pods, name, "the pod to run", TIMEOUT, running_and_ready).await;
    }

    // The resolver file the kubelet writes for a ClusterFirst pod.
    let resolv = exec(&cluster, ns, "client", &["cat", "/etc/resolv.conf"]).await;
    let resolv = String::from_utf8_lossy(&resolv.stdout).into_owned();
    assert!(
        resolv.contains(&format!("nameserver {CLUSTER_DNS_IP}"))
            && resolv.contains(&format!(
                "search {ns}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}"
            ))
            && resolv.contains("options ndots:5"),
        "{resolv}"
    );

    // From the client's cell to the web pod's cell through the Service: by short name, by
    // FQDN (both resolved by CoreDNS through the kube-dns Service, UDP) and by cluster IP.
    for url in [
        "http://web".to_owned(),
        format!("http://web.{ns}.svc.{CLUSTER_DOMAIN}"),
        format!("http://{web_ip}"),
    ] {
        let body = eventually(TIMEOUT, || fetch(&cluster, ns, "client", &url)).await;
        assert_eq!(body.trim(), "hello from web-0", "{url}");
    }

    // No endpoint: refused at once (curl's exit code 7, "couldn't connect"), not a timeout
    // (its exit code 28).
    let refused = fetch(&cluster, ns, "client", "http://nobody")
        .await
        .unwrap_err();
    assert!(refused.contains("exit Some(7)"), "{refused}");

    // The API server, with the pod's own token and CA.
    let call = "curl -sS --max-time 10 --cacert /var/run/secrets/kubernetes.io/serviceaccount/ca.crt \
        -H \"Authorization: Bearer $(cat /var/run/secrets/kubernetes.io/serviceaccount/token)\" \
        https://kubernetes.default.svc/api";
    let output = exec(&cluster, ns, "client", &["sh", "-c", call]).await;
    let body = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && body.contains("APIVersions"),
        "{}",
        describe_output(&output)
    );
    let env = exec(&cluster, ns, "client", &["env"]).await;
    let env = String::from_utf8_lossy(&env.stdout).into_owned();
    assert!(env.contains("KUBERNETES_SERVICE_HOST=10.96.0.1"), "{env}");

    // Its only endpoint gone, the Service refuses; a new one is routed to.
    pods.delete("web-0", &DeleteParams::default())
        .await
        .unwrap();
    wait_for_deletion(&pods, "web-0", TIMEOUT).await;
    eventually(TIMEOUT, || async {
        match fetch(&cluster, ns, "client", "http://web").await {
            Err(refused) if refused.contains("exit Some(7)") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    pods.create(&post, &web_pod("web-1", &node)).await.unwrap();
    let body = eventually(TIMEOUT, || fetch(&cluster, ns, "client", "http://web")).await;
    assert_eq!(body.trim(), "hello from web-1");

    // The API server proxies to the node at its InternalIP (it refuses loopback).
    let summary = run_kubectl(
        &cluster,
        &[
            "get",
            "--raw",
            &format!("/api/v1/nodes/{node}/proxy/stats/summary"),
        ],
    )
    .await;
    assert!(
        summary.status.success() && String::from_utf8_lossy(&summary.stdout).contains("\"pods\""),
        "{}",
        describe_output(&summary)
    );

    pods.delete("client", &DeleteParams::default())
        .await
        .unwrap();
    pods.delete("web-1", &DeleteParams::default())
        .await
        .unwrap();
    for name in ["client", "web-1"] {
        wait_for_deletion(&pods, name, TIMEOUT).await;
    }
    updraft.kill();
    delete_node(&node);
    drop(cleanup);
}
