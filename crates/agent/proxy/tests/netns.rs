//! The rules against the real kernel: a network namespace of the test's own, `nft` from
//! Debian's nftables, connections through ClusterIPs to listeners inside the namespace.
//! Needs root; skipped (with a message) without it or without `nft`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use updraft_cell_proxy::{Nft, Protocol, ServiceRoute, render};

/// A network namespace with loopback up, `10.250.0.2` and `10.250.0.3` on it and a default
/// route, so that Service IPs route before the rules translate them. Deleted on drop.
struct Namespace {
    name: String,
    file: File,
}

impl Namespace {
    fn new(tag: &str) -> Option<Namespace> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (network namespaces)");
            return None;
        }
        if Command::new("nft").arg("--version").output().is_err() {
            eprintln!("skipped: no nft (Debian package nftables)");
            return None;
        }
        let name = format!("updraft-proxy-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        ip(&["netns", "add", &name]);
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", "10.250.0.2/32", "dev", "lo"],
            vec!["addr", "add", "10.250.0.3/32", "dev", "lo"],
            vec!["route", "add", "default", "dev", "lo"],
        ] {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend(args);
            ip(&all);
        }
        let file = File::open(format!("/run/netns/{name}")).unwrap();
        Some(Namespace { name, file })
    }

    /// Runs `f` on a thread inside the namespace.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = self.file.try_clone().unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    fn apply(&self, routes: &[ServiceRoute]) {
        let rules = render(routes);
        assert!(rules.problems.is_empty(), "{:?}", rules.problems);
        Nft::default()
            .apply(Some(&self.file), &rules.script)
            .unwrap();
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().unwrap();
    assert!(status.success(), "ip {args:?}: {status}");
}

fn route(ip: [u8; 4], port: u16, protocol: Protocol, endpoints: &[([u8; 4], u16)]) -> ServiceRoute {
    ServiceRoute {
        service: format!("test/svc:{port}"),
        cluster_ip: Ipv4Addr::from(ip),
        protocol,
        port,
        endpoints: endpoints
            .iter()
            .map(|(ip, port)| SocketAddrV4::new(Ipv4Addr::from(*ip), *port))
            .collect(),
        affinity_timeout_seconds: None,
    }
}

/// A TCP server in the namespace answering every connection with `reply`; runs until the
/// namespace's test ends (its thread is detached).
fn tcp_server(ns: &Namespace, at: &str, reply: &'static str) {
    let listener = ns.run({
        let at = at.to_owned();
        move || TcpListener::bind(at).unwrap()
    });
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = stream.write_all(reply.as_bytes());
        }
    });
}

/// Connects from inside the namespace and reads the whole answer.
fn fetch(ns: &Namespace, to: &'static str) -> std::io::Result<String> {
    ns.run(move || {
        let mut stream = TcpStream::connect_timeout(&to.parse().unwrap(), Duration::from_secs(10))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })
}

#[test]
fn tcp_through_a_cluster_ip_reaches_the_endpoint_and_an_empty_service_is_refused_at_once() {
    let Some(ns) = Namespace::new("tcp") else {
        return;
    };
    tcp_server(&ns, "10.250.0.2:8080", "web");
    ns.apply(&[
        route(
            [10, 96, 0, 20],
            80,
            Protocol::Tcp,
            &[([10, 250, 0, 2], 8080)],
        ),
        route([10, 96, 0, 21], 80, Protocol::Tcp, &[]),
    ]);
    assert_eq!(fetch(&ns, "10.96.0.20:80").unwrap(), "web");
    let refused = fetch(&ns, "10.96.0.21:80").unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
}

#[test]
fn a_replaced_table_sends_new_connections_to_the_new_endpoints_and_removal_leaves_nothing() {
    let Some(ns) = Namespace::new("replace") else {
        return;
    };
    tcp_server(&ns, "10.250.0.2:8080", "old");
    tcp_server(&ns, "10.250.0.3:8080", "new");
    ns.apply(&[route(
        [10, 96, 0, 30],
        80,
        Protocol::Tcp,
        &[([10, 250, 0, 2], 8080)],
    )]);
    assert_eq!(fetch(&ns, "10.96.0.30:80").unwrap(), "old");
    ns.apply(&[route(
        [10, 96, 0, 30],
        80,
        Protocol::Tcp,
        &[([10, 250, 0, 3], 8080)],
    )]);
    for _ in 0..5 {
        assert_eq!(fetch(&ns, "10.96.0.30:80").unwrap(), "new");
    }
    Nft::default().remove(Some(&ns.file)).unwrap();
    let listing = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft", "list", "tables"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&listing.stdout).contains("updraft-proxy"),
        "{listing:?}"
    );
    // Removing twice is fine.
    Nft::default().remove(Some(&ns.file)).unwrap();
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_endpoint() {
    let Some(ns) = Namespace::new("affinity") else {
        return;
    };
    tcp_server(&ns, "10.250.0.2:8080", "a");
    tcp_server(&ns, "10.250.0.3:8080", "b");
    let mut sticky = route(
        [10, 96, 0, 40],
        80,
        Protocol::Tcp,
        &[([10, 250, 0, 2], 8080), ([10, 250, 0, 3], 8080)],
    );
    sticky.affinity_timeout_seconds = Some(600);
    ns.apply(&[sticky]);
    let first = fetch(&ns, "10.96.0.40:80").unwrap();
    for _ in 0..20 {
        assert_eq!(fetch(&ns, "10.96.0.40:80").unwrap(), first);
    }
}

#[test]
fn without_affinity_both_endpoints_get_connections() {
    let Some(ns) = Namespace::new("spread") else {
        return;
    };
    tcp_server(&ns, "10.250.0.2:8080", "a");
    tcp_server(&ns, "10.250.0.3:8080", "b");
    ns.apply(&[route(
        [10, 96, 0, 41],
        80,
        Protocol::Tcp,
        &[([10, 250, 0, 2], 8080), ([10, 250, 0, 3], 8080)],
    )]);
    // Random choice: the chance that 64 connections all pick one endpoint is 2^-63.
    let answers: std::collections::HashSet<String> = (0..64)
        .map(|_| fetch(&ns, "10.96.0.41:80").unwrap())
        .collect();
    assert_eq!(answers.len(), 2, "{answers:?}");
}

#[test]
fn udp_through_a_cluster_ip() {
    let Some(ns) = Namespace::new("udp") else {
        return;
    };
    let server = ns.run(|| UdpSocket::bind("10.250.0.2:5353").unwrap());
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            let _ = server.send_to(&buf[..n], from);
        }
    });
    ns.apply(&[
        route(
            [10, 96, 0, 10],
            53,
            Protocol::Udp,
            &[([10, 250, 0, 2], 5353)],
        ),
        route([10, 96, 0, 11], 53, Protocol::Udp, &[]),
    ]);
    let (echo, refused) = ns.run(|| {
        let client = UdpSocket::bind("0.0.0.0:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.connect("10.96.0.10:53").unwrap();
        client.send(b"query").unwrap();
        let mut buf = [0u8; 16];
        let n = client.recv(&mut buf).unwrap();
        let echo = String::from_utf8_lossy(&buf[..n]).into_owned();
        let empty = UdpSocket::bind("0.0.0.0:0").unwrap();
        empty
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        empty.connect("10.96.0.11:53").unwrap();
        // The reject happens on the way out: the send itself fails (EPERM), or the ICMP
        // answer fails the next receive; either way at once, not after a timeout.
        let refused = match empty.send(b"query") {
            Err(e) => e.kind(),
            Ok(_) => empty.recv(&mut buf).unwrap_err().kind(),
        };
        (echo, refused)
    });
    assert_eq!(echo, "query");
    assert!(
        matches!(
            refused,
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ConnectionRefused
        ),
        "{refused:?}"
    );
}
