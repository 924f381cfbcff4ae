//! Service routes through the agent: `PUT /v1/services` installs the table with Debian's
//! `nft` in a real pod's network namespace, a pod created after the table finds its rules as
//! its first container starts, and the version in force shows in `GET /v1/services` and the
//! status long-poll. As root with busybox, like the other agent tests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::Command;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use updraft_cell_agent::Nft;
use updraft_cell_api::services::{Protocol, ServiceRoute, ServiceRoutes};
use updraft_cell_api::{CellClient, LogOptions, PodInterface, PodStatusResponse};

/// The "cell" side of the pod network: a namespace of the test's own with bridge `br0` at
/// `10.251.0.1/24`, the pod's gateway. The Service IP `10.96.0.50` is an address there too,
/// with nothing listening: a call that the pod's rules do not translate is refused at once
/// (were it dropped, a SYN retransmitted after rules installed late would still be
/// translated, and a late install would go unnoticed). Deleted on drop.
struct CellNetns(String);

impl CellNetns {
    fn create() -> Self {
        let name = format!("updraft-svc-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let cell = Self(name);
        ip(&["-n", &cell.0, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &cell.0, "addr", "add", "10.251.0.1/24", "dev", "br0"]);
        ip(&["-n", &cell.0, "addr", "add", "10.96.0.50/32", "dev", "br0"]);
        ip(&["-n", &cell.0, "link", "set", "br0", "up"]);
        cell
    }

    /// A TCP listener on `addr` inside the namespace (a socket stays in the namespace it was
    /// made in), answering every connection with `reply`; it ends with the returned task.
    fn serve(&self, addr: &str, reply: &'static [u8]) -> tokio::task::JoinHandle<()> {
        let ns = File::open(format!("/run/netns/{}", self.0)).unwrap();
        let addr = addr.to_owned();
        let listener = std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            std::net::TcpListener::bind(addr).unwrap()
        })
        .join()
        .unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let _ = conn.write_all(reply).await;
            }
        })
    }
}

impl Drop for CellNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn route(cluster_ip: [u8; 4], endpoints: &[([u8; 4], u16)]) -> ServiceRoute {
    ServiceRoute {
        service: "default/web:http".into(),
        cluster_ip: Ipv4Addr::from(cluster_ip),
        protocol: Protocol::Tcp,
        port: 80,
        endpoints: endpoints
            .iter()
            .map(|(ip, port)| SocketAddrV4::new(Ipv4Addr::from(*ip), *port))
            .collect(),
        affinity_timeout_seconds: None,
    }
}

/// `nft list table ip updraft-proxy` in the pod's network namespace.
async fn pod_rules(t: &TestAgent) -> String {
    let pod = t.agent.pod().await.unwrap();
    proxy_rules(pod.sandbox().netns_name().unwrap())
}

/// Long-polls the pod status until its `servicesVersion` is `version` (60 s bound).
async fn wait_services_version(client: &CellClient, version: u64) -> PodStatusResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut resp = client.pod_status(None, Duration::ZERO).await.unwrap();
    while resp.services_version != version {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for servicesVersion {version}; last: {}",
            resp.services_version
        );
        resp = client
            .pod_status(Some(resp.version), Duration::from_secs(5))
            .await
            .unwrap();
    }
    resp
}

/// Follows a container's log until a whole line containing `marker` arrives (60 s bound).
async fn wait_log_line(client: &CellClient, container: &str, marker: &str) -> String {
    let options = LogOptions {
        follow: true,
        ..Default::default()
    };
    let mut stream = Box::pin(client.logs(container, &options).await.unwrap());
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(chunk) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if let Some(line) = text.lines().find(|l| l.contains(marker)) {
                return line.to_owned();
            }
        }
        panic!("the log ended without {marker:?}: {text:?}")
    })
    .await
    .unwrap_or_else(|_| panic!("no {marker:?} in the log of {container} within 60 s"))
}

const APP: &str = r#"
metadata: {name: caller, namespace: default}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: busybox
    command: [sh, -c, 'if nc -w 5 10.96.0.50 80 </dev/null | grep -q via-service; then echo first-call routed; else echo first-call not-routed; fi; exec sleep 1000']
"#;

// Several worker threads, as in the agent binary: the lifecycle task can start the container
// while the sandbox is still being set up, so rules installed late would miss the first call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_table_routes_the_pod_from_its_first_start_and_newer_tables_replace_it() {
    let t = start_agent(None).await;
    let c = &t.client;
    let cell = CellNetns::create();
    let server = cell.serve("10.251.0.1:8080", b"via-service\n");

    // The table comes before the pod: kept, nothing in force yet.
    let v3 = ServiceRoutes {
        version: 3,
        routes: vec![route([10, 96, 0, 50], &[([10, 251, 0, 1], 8080)])],
    };
    let answer = c.put_services(&v3).await.unwrap();
    assert_eq!(
        (answer.applied_version, answer.problems.len()),
        (0, 0),
        "{answer:?}"
    );

    let mut req = pod(APP);
    req.network.interface = Some(PodInterface {
        host_netns: Some(cell.0.clone()),
        bridge: "br0".into(),
        host_veth: "vsvc0".into(),
        address: Ipv4Addr::new(10, 251, 0, 2),
        prefix_len: 24,
        gateway: Some(Ipv4Addr::new(10, 251, 0, 1)),
    });
    c.apply_pod(&req).await.unwrap();
    // The container's one call at its start went through the Service IP.
    let first = wait_log_line(c, "app", "first-call").await;
    assert_eq!(first, "first-call routed");
    let status = c.services().await.unwrap();
    assert_eq!(
        (status.applied_version, status.problems.len()),
        (3, 0),
        "{status:?}"
    );
    wait_services_version(c, 3).await;
    let rules = pod_rules(&t).await;
    assert!(
        rules.contains("10.96.0.50 . tcp . 80") && rules.contains("dnat to 10.251.0.1:8080"),
        "{rules}"
    );
    let (out, err, code) = exec(c, "app", &["sh", "-c", "nc 10.96.0.50 80 </dev/null"]).await;
    assert_eq!((out.as_str(), code), ("via-service\n", 0), "{err}");

    // An older table is ignored: the answer is what is in force, the rules stay.
    let v2 = ServiceRoutes {
        version: 2,
        routes: vec![route([10, 96, 0, 51], &[([10, 251, 0, 1], 8080)])],
    };
    assert_eq!(c.put_services(&v2).await.unwrap().applied_version, 3);
    let rules = pod_rules(&t).await;
    assert!(
        rules.contains("10.96.0.50") && !rules.contains("10.96.0.51"),
        "{rules}"
    );

    // A newer table replaces everything: the Service without endpoints refuses at once.
    let v4 = ServiceRoutes {
        version: 4,
        routes: vec![route([10, 96, 0, 50], &[])],
    };
    assert_eq!(c.put_services(&v4).await.unwrap().applied_version, 4);
    wait_services_version(c, 4).await;
    let (_, err, code) = exec(c, "app", &["sh", "-c", "nc 10.96.0.50 80 </dev/null"]).await;
    assert_ne!(code, 0, "refused: {err}");
    assert!(err.contains("refused"), "{err}");

    // An empty table leaves no route.
    let v5 = ServiceRoutes {
        version: 5,
        routes: vec![],
    };
    assert_eq!(c.put_services(&v5).await.unwrap().applied_version, 5);
    wait_services_version(c, 5).await;
    let rules = pod_rules(&t).await;
    assert!(!rules.contains("10.96.0.50"), "{rules}");

    // A body that is not a table is a 400 naming the type; the table in force stays.
    let body = b"{not json";
    let mut request = format!(
        "PUT /v1/services HTTP/1.1\r\nHost: updraft-cell\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let (got, body) = raw_request(&t, &request).await;
    assert!(got == 400 && body.contains("ServiceRoutes"), "{got} {body}");
    assert_eq!(c.services().await.unwrap().applied_version, 5);

    // No pod, nothing in force; the table is still held for the next pod.
    c.delete_pod(None).await.unwrap();
    assert_eq!(c.services().await.unwrap().applied_version, 0);
    assert_eq!(t.agent.services().table().unwrap().version, 5);
    server.abort();
    t.finish().await;
}

#[tokio::test]
async fn without_nft_a_table_is_kept_with_a_problem_naming_the_package_and_the_agent_serves_on() {
    let t = start_agent_with_nft(Nft::new("/nonexistent/nft")).await;
    let c = &t.client;
    c.apply_pod(&pod(r#"
metadata: {name: no-nft}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {name: app, image: busybox, command: [sh, -c, 'exec sleep 1000']}
"#))
        .await
        .unwrap();
    wait_status(c, "running", |s| running(s, "app")).await;
    let table = ServiceRoutes {
        version: 1,
        routes: vec![route([10, 96, 0, 50], &[([10, 251, 0, 1], 8080)])],
    };
    let answer = c.put_services(&table).await.unwrap();
    assert_eq!(answer.applied_version, 0);
    assert!(
        answer.problems.len() == 1 && answer.problems[0].contains("nftables"),
        "{answer:?}"
    );
    assert_eq!(c.services().await.unwrap(), answer);
    let status = c.pod_status(None, Duration::ZERO).await.unwrap();
    assert_eq!(status.services_version, 0);
    c.ping().await.unwrap();
    assert_eq!(t.agent.services().table().unwrap().version, 1);
    t.finish().await;
}
