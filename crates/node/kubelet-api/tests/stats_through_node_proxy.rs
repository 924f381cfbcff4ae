//! `/stats/summary` and `/metrics/resource` read the way metrics-server and `kubectl get --raw`
//! read them: through the API server's node proxy (`/api/v1/nodes/<node>/proxy/...`).
//!
//! The node proxy refuses nodes whose address is not global unicast (loopback included), so
//! this test gives the node an address of its own: it creates a network namespace with a veth
//! pair (198.18.x.1 on the host end, 198.18.x.2 inside; 198.18.0.0/15 is reserved for
//! benchmarking and never routed off this machine), binds the kubelet port inside the
//! namespace, and registers 198.18.x.2 as the node's InternalIP. The API server reaches it
//! over the veth. Needs root (like the cell tests); everything is deleted afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

#[path = "port_forward_support/mod.rs"]
mod support;

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

use updraft_kubelet_api::stats::Summary;
use updraft_testing::TestCluster;

use support::{running_pod, start_node};

/// A network namespace joined to the host by a veth pair; deleted when dropped.
struct TestNetwork {
    namespace: String,
    host_interface: String,
    inside: Ipv4Addr,
}

fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl TestNetwork {
    fn create() -> Self {
        static NEXT: AtomicU8 = AtomicU8::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let namespace = format!("updraft-stats-{pid}-{n}");
        // Interface names have at most 15 bytes.
        let host_interface = format!("ush{}{n}", pid % 100_000);
        let inner_interface = format!("usn{}{n}", pid % 100_000);
        // A /30 per test process and network, from the pid, inside 198.18.0.0/15.
        let block = (pid % 16_000) * 4 + u32::from(n) * 4;
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (block % 131_072);
        let host = Ipv4Addr::from(base + 1);
        let inside = Ipv4Addr::from(base + 2);
        ip(&["netns", "add", &namespace]);
        let network = Self {
            namespace: namespace.clone(),
            host_interface: host_interface.clone(),
            inside,
        };
        ip(&[
            "link",
            "add",
            &host_interface,
            "type",
            "veth",
            "peer",
            "name",
            &inner_interface,
            "netns",
            &namespace,
        ]);
        ip(&["addr", "add", &format!("{host}/30"), "dev", &host_interface]);
        ip(&["link", "set", &host_interface, "up"]);
        ip(&[
            "-n",
            &namespace,
            "addr",
            "add",
            &format!("{inside}/30"),
            "dev",
            &inner_interface,
        ]);
        ip(&["-n", &namespace, "link", "set", &inner_interface, "up"]);
        ip(&["-n", &namespace, "link", "set", "lo", "up"]);
        network
    }

    /// A listener on the namespace's address (the socket stays in the namespace).
    fn listen(&self) -> tokio::net::TcpListener {
        let path = format!("/run/netns/{}", self.namespace);
        let address = self.inside;
        let listener = std::thread::spawn(move || {
            let namespace = std::fs::File::open(&path).expect("the namespace file");
            nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("entering the namespace");
            let listener = std::net::TcpListener::bind((address, 0)).expect("binding inside");
            listener.set_nonblocking(true).expect("non-blocking");
            listener
        })
        .join()
        .expect("the binding thread");
        tokio::net::TcpListener::from_std(listener).expect("a tokio listener")
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_interface])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.namespace])
            .output();
    }
}

fn kubectl_raw(cluster: &TestCluster, path: &str) -> String {
    let output = cluster
        .kubectl()
        .args(["get", "--raw", path])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl get --raw {path}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stats_summary_and_resource_metrics_through_the_node_proxy() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("stats").await;
    let network = TestNetwork::create();
    let node = start_node(&cluster, network.listen()).await;
    assert_eq!(node.address, std::net::IpAddr::V4(network.inside));
    let pod = running_pod(
        &cluster,
        ns.name(),
        &node.name,
        "busy",
        serde_json::json!([
            {"name": "app", "image": "busybox", "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}}},
            {"name": "sidecar", "image": "busybox"}
        ]),
    )
    .await;

    let text = kubectl_raw(
        &cluster,
        &format!("/api/v1/nodes/{}/proxy/stats/summary", node.name),
    );
    let summary: Summary = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(summary.node.node_name, node.name);
    let pod_stats = summary
        .pods
        .iter()
        .find(|p| p.pod_ref.name == "busy" && p.pod_ref.namespace == ns.name())
        .unwrap_or_else(|| panic!("no stats for the pod: {text}"));
    assert_eq!(Some(&pod_stats.pod_ref.uid), pod.metadata.uid.as_ref());
    let app = pod_stats
        .containers
        .iter()
        .find(|c| c.name == "app")
        .unwrap();
    let app_cpu = app.cpu.as_ref().unwrap();
    assert_eq!(
        app_cpu.usage_nano_cores,
        Some(250_000_000),
        "the mock uses its request"
    );
    assert!(app_cpu.usage_core_nano_seconds.unwrap() > 0);
    let app_memory = app.memory.as_ref().unwrap().working_set_bytes.unwrap();
    assert_eq!(app_memory, 64 << 20);
    let node_memory = summary
        .node
        .memory
        .as_ref()
        .unwrap()
        .working_set_bytes
        .unwrap();
    assert!(
        node_memory
            >= pod_stats
                .memory
                .as_ref()
                .unwrap()
                .working_set_bytes
                .unwrap()
    );

    let metrics = kubectl_raw(
        &cluster,
        &format!("/api/v1/nodes/{}/proxy/metrics/resource", node.name),
    );
    let sample = |prefix: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}… in:\n{metrics}"))
            .to_owned()
    };
    let app_labels = format!(
        "{{container=\"app\",namespace=\"{}\",pod=\"busy\"}}",
        ns.name()
    );
    let memory = sample(&format!("container_memory_working_set_bytes{app_labels} "));
    let fields: Vec<&str> = memory.split(' ').collect();
    assert_eq!(fields.len(), 3, "value and timestamp: {memory}");
    assert_eq!(fields[1], "67108864");
    assert!(
        fields[2].parse::<i64>().unwrap() > 1_700_000_000_000,
        "a millisecond timestamp: {memory}"
    );
    let cpu = sample(&format!("container_cpu_usage_seconds_total{app_labels} "));
    assert!(
        cpu.split(' ').nth(1).unwrap().parse::<f64>().unwrap() > 0.0,
        "{cpu}"
    );
    sample("node_cpu_usage_seconds_total ");
    sample("node_memory_working_set_bytes ");
    sample(&format!(
        "pod_memory_working_set_bytes{{namespace=\"{}\",pod=\"busy\"}} ",
        ns.name()
    ));
    assert_eq!(sample("resource_scrape_error "), "resource_scrape_error 0");
}
