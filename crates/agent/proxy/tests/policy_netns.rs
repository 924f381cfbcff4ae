//! The policy table against the real kernel: two network namespaces of the test's own, a
//! "server" pod (`10.250.1.1` on `eth0`) and a "client" pod (`10.250.1.2` and `10.250.1.3` on
//! `eth0`), joined by a veth pair; `nft` from Debian's nftables; TCP connections between them.
//! Needs root; skipped (with a message) without it or without `nft`.
//!
//! A denied connection is dropped, so the client's connect can only fail by timing out: the
//! tests give it a short one, then wait for the table's drop counter to show that the policy
//! (not anything else) dropped it. Allowed connections get long timeouts, so a slow machine
//! cannot fail them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};
use nix::sys::time::{TimeVal, TimeValLike as _};
use updraft_cell_proxy::policy::{
    EGRESS_DENIED, INGRESS_DENIED, POLICY_TABLE, Peer, PolicyRules, PortRule, Protocol, Rule,
    remove_policy, render_policy,
};
use updraft_cell_proxy::{Nft, ServiceRoute, render};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 250, 1, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 250, 1, 2);
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 250, 1, 3);
/// How long a connection the policy drops is tried.
const DENIED_WAIT: Duration = Duration::from_secs(1);
/// How long an allowed connection may take, and a counter to show a drop.
const ALLOWED_WAIT: Duration = Duration::from_secs(20);

/// A network namespace, deleted on drop.
struct Namespace {
    name: String,
    file: File,
}

impl Namespace {
    fn new(name: String) -> Namespace {
        // Left over from a run that was killed, if any.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let file = File::open(format!("/run/netns/{name}")).unwrap();
        Namespace { name, file }
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

    /// Installs `rules` (with `cell` as the cell's addresses) as the namespace's policy.
    fn apply(&self, rules: &PolicyRules, cell: &[Ipv4Addr]) {
        let rendered = render_policy(rules, cell);
        assert!(rendered.problems.is_empty(), "{:?}", rendered.problems);
        Nft::default()
            .apply(Some(&self.file), &rendered.script)
            .unwrap_or_else(|e| panic!("{e}\n{}", rendered.script));
    }

    /// The packets the named counter of the policy table has counted.
    fn counted(&self, counter: &str) -> u64 {
        let (family, table) = POLICY_TABLE.split_once(' ').unwrap();
        let output = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "list", "counter"])
            .args([family, table, counter])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let text = String::from_utf8_lossy(&output.stdout);
        let packets = text
            .split_whitespace()
            .skip_while(|word| *word != "packets")
            .nth(1)
            .unwrap_or_else(|| panic!("no packets in {text}"));
        packets.parse().unwrap()
    }

    /// Waits until the named counter has counted more than `before` packets.
    fn wait_for_drop(&self, counter: &str, before: u64) {
        let deadline = Instant::now() + ALLOWED_WAIT;
        loop {
            let now = self.counted(counter);
            if now > before {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{counter} in {} stayed at {now}",
                self.name
            );
            std::thread::yield_now();
        }
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

/// The two pods, with TCP servers on the server's 8080 (`web`) and 8081 (`admin`) and the
/// client's 9090 (`client`), each answering every connection with its name.
struct Pods {
    server: Namespace,
    client: Namespace,
}

impl Pods {
    fn new(tag: &str) -> Option<Pods> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (network namespaces)");
            return None;
        }
        if Command::new("nft").arg("--version").output().is_err() {
            eprintln!("skipped: no nft (Debian package nftables)");
            return None;
        }
        let prefix = format!("updraft-policy-{tag}-{}", std::process::id());
        let server = Namespace::new(format!("{prefix}-s"));
        let client = Namespace::new(format!("{prefix}-c"));
        // Created inside the server's namespace with its peer in the client's: no interface
        // name in the host's namespace, so tests running at once cannot collide.
        ip(&[
            "-n",
            &server.name,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &client.name,
        ]);
        for (ns, addresses) in [
            (&server, &[SERVER][..]),
            (&client, &[CLIENT, OTHER_CLIENT][..]),
        ] {
            for address in addresses {
                ip(&[
                    "-n",
                    &ns.name,
                    "addr",
                    "add",
                    &format!("{address}/24"),
                    "dev",
                    "eth0",
                ]);
            }
            ip(&["-n", &ns.name, "link", "set", "eth0", "up"]);
        }
        tcp_server(&server, SocketAddrV4::new(SERVER, 8080), "web");
        tcp_server(&server, SocketAddrV4::new(SERVER, 8081), "admin");
        tcp_server(&client, SocketAddrV4::new(CLIENT, 9090), "client");
        let pods = Pods { server, client };
        // The link is up once both ends are; the first connection proves it.
        assert_eq!(fetch(&pods.client, CLIENT, SERVER, 8080).unwrap(), "web");
        Some(pods)
    }
}

/// A TCP server in `ns` answering every connection with `reply`; runs until the test
/// process ends (its thread is detached).
fn tcp_server(ns: &Namespace, at: SocketAddrV4, reply: &'static str) {
    let listener = ns.run(move || TcpListener::bind(at).unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = stream.write_all(reply.as_bytes());
        }
    });
}

/// Connects from `source` inside `ns` to `to:port` and reads the whole answer, trying for
/// `wait` (a connect that runs out of time is `TimedOut`).
fn fetch_within(
    ns: &Namespace,
    source: Ipv4Addr,
    to: Ipv4Addr,
    port: u16,
    wait: Duration,
) -> std::io::Result<String> {
    ns.run(move || {
        let fd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        // A blocking connect gives up after the send timeout (with EINPROGRESS).
        let millis = i64::try_from(wait.as_millis()).unwrap();
        socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::milliseconds(millis))?;
        socket::bind(
            fd.as_raw_fd(),
            &SockaddrIn::from(SocketAddrV4::new(source, 0)),
        )?;
        match socket::connect(
            fd.as_raw_fd(),
            &SockaddrIn::from(SocketAddrV4::new(to, port)),
        ) {
            Ok(()) => {}
            Err(nix::errno::Errno::EINPROGRESS) => return Err(ErrorKind::TimedOut.into()),
            Err(e) => return Err(e.into()),
        }
        let mut stream = TcpStream::from(fd);
        stream.set_read_timeout(Some(ALLOWED_WAIT))?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })
}

/// [`fetch_within`] for a connection that should be allowed.
fn fetch(ns: &Namespace, source: Ipv4Addr, to: Ipv4Addr, port: u16) -> std::io::Result<String> {
    fetch_within(ns, source, to, port, ALLOWED_WAIT)
}

/// Asserts that the connection from `source` in `from` to `to:port` is dropped by the policy
/// of `enforcer`, counted in its `counter`.
fn assert_denied(
    from: &Namespace,
    source: Ipv4Addr,
    to: Ipv4Addr,
    port: u16,
    enforcer: &Namespace,
    counter: &str,
) {
    let before = enforcer.counted(counter);
    let result = fetch_within(from, source, to, port, DENIED_WAIT);
    let error = result.expect_err("the connection should have been dropped");
    assert_eq!(error.kind(), ErrorKind::TimedOut, "{error}");
    enforcer.wait_for_drop(counter, before);
}

fn tcp(port: u16) -> PortRule {
    PortRule {
        protocol: Protocol::Tcp,
        port: Some(port),
        end_port: None,
    }
}

fn rule(peers: Option<Vec<Peer>>, ports: Option<Vec<PortRule>>) -> Rule {
    Rule {
        policy: "test/policy".into(),
        peers,
        ports,
    }
}

#[test]
fn default_deny_ingress_blocks_and_an_allow_rule_for_the_client_and_port_lets_it_through() {
    let Some(pods) = Pods::new("ingress") else {
        return;
    };
    let (server, client) = (&pods.server, &pods.client);
    server.apply(
        &PolicyRules {
            ingress: Some(vec![]),
            egress: None,
        },
        &[],
    );
    assert_denied(client, CLIENT, SERVER, 8080, server, INGRESS_DENIED);

    server.apply(
        &PolicyRules {
            ingress: Some(vec![rule(
                Some(vec![Peer::host(CLIENT)]),
                Some(vec![tcp(8080)]),
            )]),
            egress: None,
        },
        &[],
    );
    assert_eq!(fetch(client, CLIENT, SERVER, 8080).unwrap(), "web");
    // Only that port, and only from that address.
    assert_denied(client, CLIENT, SERVER, 8081, server, INGRESS_DENIED);
    assert_denied(client, OTHER_CLIENT, SERVER, 8080, server, INGRESS_DENIED);
    // The server's own egress is not isolated: it still reaches the client.
    assert_eq!(fetch(server, SERVER, CLIENT, 9090).unwrap(), "client");
}

#[test]
fn default_deny_egress_blocks_and_an_allow_rule_for_the_server_and_port_lets_it_through() {
    let Some(pods) = Pods::new("egress") else {
        return;
    };
    let (server, client) = (&pods.server, &pods.client);
    client.apply(
        &PolicyRules {
            ingress: None,
            egress: Some(vec![]),
        },
        &[],
    );
    assert_denied(client, CLIENT, SERVER, 8080, client, EGRESS_DENIED);

    client.apply(
        &PolicyRules {
            ingress: None,
            egress: Some(vec![rule(
                Some(vec![Peer::host(SERVER)]),
                Some(vec![tcp(8080)]),
            )]),
        },
        &[],
    );
    assert_eq!(fetch(client, CLIENT, SERVER, 8080).unwrap(), "web");
    assert_denied(client, CLIENT, SERVER, 8081, client, EGRESS_DENIED);
    // Ingress is not isolated: the server still reaches the client's listener, and the
    // replies pass the isolated egress as part of an accepted connection.
    assert_eq!(fetch(server, SERVER, CLIENT, 9090).unwrap(), "client");
}

#[test]
fn both_directions_isolated_allow_exactly_their_rules_and_the_pod_itself() {
    let Some(pods) = Pods::new("both") else {
        return;
    };
    let (server, client) = (&pods.server, &pods.client);
    // The server takes 8080 from the client and may send nothing on its own.
    server.apply(
        &PolicyRules {
            ingress: Some(vec![rule(
                Some(vec![Peer::host(CLIENT)]),
                Some(vec![tcp(8080)]),
            )]),
            egress: Some(vec![]),
        },
        &[],
    );
    // The client may send to the server's 8080 only and takes nothing.
    client.apply(
        &PolicyRules {
            ingress: Some(vec![]),
            egress: Some(vec![rule(
                Some(vec![Peer::host(SERVER)]),
                Some(vec![tcp(8080)]),
            )]),
        },
        &[],
    );
    // Allowed by both ends; the replies pass both isolated directions back.
    assert_eq!(fetch(client, CLIENT, SERVER, 8080).unwrap(), "web");
    assert_denied(client, CLIENT, SERVER, 8081, client, EGRESS_DENIED);
    assert_denied(server, SERVER, CLIENT, 9090, server, EGRESS_DENIED);
    // A pod cannot block itself: its own address goes over loopback.
    assert_eq!(fetch(server, SERVER, SERVER, 8081).unwrap(), "admin");
    assert_eq!(fetch(client, CLIENT, CLIENT, 9090).unwrap(), "client");
}

#[test]
fn an_ip_block_except_and_the_cell_address() {
    let Some(pods) = Pods::new("block") else {
        return;
    };
    let (server, client) = (&pods.server, &pods.client);
    server.apply(
        &PolicyRules {
            ingress: Some(vec![rule(
                Some(vec![Peer {
                    cidr: "10.250.1.0/24".parse().unwrap(),
                    except: vec!["10.250.1.2/32".parse().unwrap()],
                }]),
                None,
            )]),
            egress: None,
        },
        &[],
    );
    assert_eq!(fetch(client, OTHER_CLIENT, SERVER, 8081).unwrap(), "admin");
    assert_denied(client, CLIENT, SERVER, 8081, server, INGRESS_DENIED);

    // Default deny, but the client's first address is the cell's (the pod's node): allowed.
    server.apply(
        &PolicyRules {
            ingress: Some(vec![]),
            egress: None,
        },
        &[CLIENT],
    );
    assert_eq!(fetch(client, CLIENT, SERVER, 8080).unwrap(), "web");
    assert_denied(client, OTHER_CLIENT, SERVER, 8080, server, INGRESS_DENIED);
}

#[test]
fn egress_rules_see_the_service_endpoint_not_the_cluster_ip() {
    let Some(pods) = Pods::new("service") else {
        return;
    };
    let client = &pods.client;
    // The client reaches the server's 8080 as the Service 10.96.0.50:80 (a route makes the
    // Service IP leave through eth0 before the translation, as a default route would).
    ip(&[
        "-n",
        &client.name,
        "route",
        "add",
        "10.96.0.0/12",
        "dev",
        "eth0",
    ]);
    let routes = render(&[ServiceRoute {
        service: "test/web:80".into(),
        cluster_ip: Ipv4Addr::new(10, 96, 0, 50),
        protocol: Protocol::Tcp,
        port: 80,
        endpoints: vec![SocketAddrV4::new(SERVER, 8080)],
        affinity_timeout_seconds: None,
    }]);
    Nft::default()
        .apply(Some(&client.file), &routes.script)
        .unwrap();
    let service = Ipv4Addr::new(10, 96, 0, 50);
    assert_eq!(fetch(client, CLIENT, service, 80).unwrap(), "web");

    // Allowing the endpoint allows the Service.
    client.apply(
        &PolicyRules {
            ingress: None,
            egress: Some(vec![rule(
                Some(vec![Peer::host(SERVER)]),
                Some(vec![tcp(8080)]),
            )]),
        },
        &[],
    );
    assert_eq!(fetch(client, CLIENT, service, 80).unwrap(), "web");
    // Allowing the Service IP and port allows nothing: the filter sees the endpoint.
    client.apply(
        &PolicyRules {
            ingress: None,
            egress: Some(vec![rule(
                Some(vec![Peer::host(service)]),
                Some(vec![tcp(80)]),
            )]),
        },
        &[],
    );
    assert_denied(client, CLIENT, service, 80, client, EGRESS_DENIED);
}

#[test]
fn every_kind_of_rule_is_accepted_by_nft_and_removal_leaves_nothing() {
    let Some(pods) = Pods::new("syntax") else {
        return;
    };
    let server = &pods.server;
    let everything = PolicyRules {
        ingress: Some(vec![
            rule(None, None),
            rule(
                None,
                Some(vec![
                    tcp(80),
                    PortRule {
                        protocol: Protocol::Tcp,
                        port: Some(8000),
                        end_port: Some(8100),
                    },
                    PortRule {
                        protocol: Protocol::Udp,
                        port: Some(53),
                        end_port: None,
                    },
                    PortRule {
                        protocol: Protocol::Sctp,
                        port: None,
                        end_port: None,
                    },
                ]),
            ),
            rule(
                Some(vec![
                    Peer {
                        cidr: "0.0.0.0/0".parse().unwrap(),
                        except: vec!["10.0.0.0/8".parse().unwrap()],
                    },
                    Peer::host(CLIENT),
                ]),
                Some(vec![tcp(443)]),
            ),
        ]),
        egress: Some(vec![rule(Some(vec![Peer::host(SERVER)]), None)]),
    };
    server.apply(&everything, &[CLIENT, OTHER_CLIENT]);
    // Applying again replaces the table in place.
    server.apply(&everything, &[CLIENT, OTHER_CLIENT]);
    let listing = |ns: &Namespace| {
        let output = Command::new("ip")
            .args(["netns", "exec", &ns.name, "nft", "list", "ruleset"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let listed = listing(server);
    assert!(listed.contains("set ingress-2"), "{listed}");
    assert!(listed.contains("set egress-0"), "{listed}");
    Nft::default()
        .apply(Some(&server.file), &remove_policy())
        .unwrap();
    assert!(!listing(server).contains("updraft-policy"));
    // Removing twice is fine.
    Nft::default()
        .apply(Some(&server.file), &remove_policy())
        .unwrap();
}
