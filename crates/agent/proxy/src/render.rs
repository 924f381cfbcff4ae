//! Service routes → the text of one nftables transaction (see the crate docs for the rules).

use std::collections::HashSet;
use std::fmt::Write as _;

use updraft_common::services::{Protocol, ServiceRoute};

use crate::apply::TABLE;

/// The longest ClientIP affinity Kubernetes allows (`sessionAffinityConfig.clientIP.timeoutSeconds`).
const MAX_AFFINITY_SECONDS: u32 = 86_400;

/// A rendered table: the `nft -f` script and the routes it had to leave out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    /// The transaction: creates the table if missing, deletes it, and declares it anew.
    pub script: String,
    /// One line per route left out, naming the route and why.
    pub problems: Vec<String>,
}

/// The nftables transaction that makes the pod's namespace route exactly `routes`.
///
/// The output depends only on `routes` and their order, so the same table renders to the
/// same text. A route whose Service IP, protocol and port an earlier route already claims is
/// left out (one destination can have one route), and said so in [`Ruleset::problems`].
pub fn render(routes: &[ServiceRoute]) -> Ruleset {
    let mut problems = Vec::new();
    let mut seen = HashSet::new();
    let mut routed = Vec::new();
    let mut refused = Vec::new();
    for route in routes {
        if !seen.insert((route.cluster_ip, route.protocol, route.port)) {
            problems.push(format!(
                "{}: {} {}:{} is already routed for another Service port; this one is left out",
                route.service,
                protocol_name(route.protocol),
                route.cluster_ip,
                route.port
            ));
            continue;
        }
        if route.endpoints.is_empty() {
            refused.push(route);
        } else {
            routed.push(route);
        }
    }

    let mut s = String::new();
    // Adding first makes the delete valid when the table does not exist yet; all three run
    // as one transaction.
    let _ = writeln!(s, "add table {TABLE}");
    let _ = writeln!(s, "delete table {TABLE}");
    let _ = writeln!(s, "table {TABLE} {{");

    let _ = writeln!(s, "  map service-ips {{");
    let _ = writeln!(
        s,
        "    type ipv4_addr . inet_proto . inet_service : verdict"
    );
    if !routed.is_empty() {
        let elements: Vec<String> = routed
            .iter()
            .enumerate()
            .map(|(n, r)| format!("{} : goto svc-{n}", destination(r)))
            .collect();
        let _ = writeln!(s, "    elements = {{ {} }}", elements.join(", "));
    }
    let _ = writeln!(s, "  }}");

    let _ = writeln!(s, "  set no-endpoint-services {{");
    let _ = writeln!(s, "    type ipv4_addr . inet_proto . inet_service");
    if !refused.is_empty() {
        let elements: Vec<String> = refused.iter().map(|r| destination(r)).collect();
        let _ = writeln!(s, "    elements = {{ {} }}", elements.join(", "));
    }
    let _ = writeln!(s, "  }}");

    for (n, route) in routed.iter().enumerate() {
        if let Some(seconds) = route.affinity_timeout_seconds {
            let seconds = seconds.clamp(1, MAX_AFFINITY_SECONDS);
            for m in 0..route.endpoints.len() {
                let _ = writeln!(
                    s,
                    "  set aff-{n}-{m} {{ type ipv4_addr; flags dynamic,timeout; timeout {seconds}s; }}"
                );
            }
        }
    }

    let _ = writeln!(s, "  chain nat-output {{");
    // dstnat priority for the output hook (the `dstnat` keyword is prerouting's only).
    let _ = writeln!(s, "    type nat hook output priority -100; policy accept;");
    let _ = writeln!(
        s,
        "    ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(s, "  }}");

    let _ = writeln!(s, "  chain filter-output {{");
    let _ = writeln!(
        s,
        "    type filter hook output priority filter; policy accept;"
    );
    let _ = writeln!(
        s,
        "    ip daddr . meta l4proto . th dport @no-endpoint-services meta l4proto tcp reject with tcp reset"
    );
    let _ = writeln!(
        s,
        "    ip daddr . meta l4proto . th dport @no-endpoint-services reject"
    );
    let _ = writeln!(s, "  }}");

    for (n, route) in routed.iter().enumerate() {
        let _ = writeln!(s, "  chain svc-{n} {{");
        let _ = writeln!(s, "    comment \"{}\"", comment(&route.service));
        let sticky = route.affinity_timeout_seconds.is_some();
        if sticky {
            for m in 0..route.endpoints.len() {
                let _ = writeln!(s, "    ip saddr @aff-{n}-{m} goto ep-{n}-{m}");
            }
        }
        let choices: Vec<String> = (0..route.endpoints.len())
            .map(|m| format!("{m} : goto ep-{n}-{m}"))
            .collect();
        let _ = writeln!(
            s,
            "    numgen random mod {} vmap {{ {} }}",
            route.endpoints.len(),
            choices.join(", ")
        );
        let _ = writeln!(s, "  }}");
        for (m, endpoint) in route.endpoints.iter().enumerate() {
            let _ = writeln!(s, "  chain ep-{n}-{m} {{");
            if sticky {
                let _ = writeln!(s, "    update @aff-{n}-{m} {{ ip saddr }}");
            }
            let _ = writeln!(
                s,
                "    meta l4proto {} dnat to {endpoint}",
                protocol_name(route.protocol)
            );
            let _ = writeln!(s, "  }}");
        }
    }
    let _ = writeln!(s, "}}");
    Ruleset {
        script: s,
        problems,
    }
}

/// `ip . proto . port`, the key of `service-ips` and `no-endpoint-services`.
fn destination(route: &ServiceRoute) -> String {
    format!(
        "{} . {} . {}",
        route.cluster_ip,
        protocol_name(route.protocol),
        route.port
    )
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// A Service name as a rule comment: the characters Kubernetes names and port names use,
/// nothing that could end the quoted string.
fn comment(service: &str) -> String {
    service
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | ':' | '.' | '-'))
        .take(120)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;

    fn route(service: &str, ip: [u8; 4], port: u16, endpoints: &[([u8; 4], u16)]) -> ServiceRoute {
        ServiceRoute {
            service: service.into(),
            cluster_ip: Ipv4Addr::from(ip),
            protocol: Protocol::Tcp,
            port,
            endpoints: endpoints
                .iter()
                .map(|(ip, port)| SocketAddrV4::new(Ipv4Addr::from(*ip), *port))
                .collect(),
            affinity_timeout_seconds: None,
        }
    }

    #[test]
    fn a_service_port_load_balances_over_its_endpoints() {
        let rules = render(&[route(
            "default/web:http",
            [10, 96, 0, 20],
            80,
            &[([10, 212, 0, 5], 8080), ([10, 212, 0, 6], 8080)],
        )]);
        assert!(rules.problems.is_empty());
        let s = &rules.script;
        assert!(s.starts_with("add table ip updraft-proxy\ndelete table ip updraft-proxy\n"));
        assert!(
            s.contains("elements = { 10.96.0.20 . tcp . 80 : goto svc-0 }"),
            "{s}"
        );
        assert!(s.contains("comment \"default/web:http\""), "{s}");
        assert!(
            s.contains("numgen random mod 2 vmap { 0 : goto ep-0-0, 1 : goto ep-0-1 }"),
            "{s}"
        );
        assert!(
            s.contains("meta l4proto tcp dnat to 10.212.0.5:8080"),
            "{s}"
        );
        assert!(
            s.contains("meta l4proto tcp dnat to 10.212.0.6:8080"),
            "{s}"
        );
        assert!(
            !s.contains("aff-"),
            "no affinity sets without ClientIP affinity: {s}"
        );
    }

    #[test]
    fn a_service_port_without_endpoints_is_refused_not_routed() {
        let s = render(&[route("default/empty:80", [10, 96, 0, 21], 80, &[])]).script;
        assert!(s.contains("set no-endpoint-services {"), "{s}");
        assert!(s.contains("elements = { 10.96.0.21 . tcp . 80 }"), "{s}");
        assert!(!s.contains("chain svc-"), "{s}");
        assert!(s.contains("reject with tcp reset"), "{s}");
    }

    #[test]
    fn client_ip_affinity_checks_and_records_the_client_per_endpoint() {
        let mut sticky = route(
            "default/sticky:80",
            [10, 96, 0, 22],
            80,
            &[([10, 212, 0, 7], 80)],
        );
        sticky.affinity_timeout_seconds = Some(10_800);
        let s = render(&[sticky]).script;
        assert!(
            s.contains("set aff-0-0 { type ipv4_addr; flags dynamic,timeout; timeout 10800s; }"),
            "{s}"
        );
        assert!(s.contains("ip saddr @aff-0-0 goto ep-0-0"), "{s}");
        assert!(s.contains("update @aff-0-0 { ip saddr }"), "{s}");
    }

    #[test]
    fn an_affinity_timeout_is_kept_within_what_kubernetes_allows() {
        let mut zero = route("a/b:1", [10, 96, 0, 23], 1, &[([10, 212, 0, 8], 1)]);
        zero.affinity_timeout_seconds = Some(0);
        assert!(render(&[zero.clone()]).script.contains("timeout 1s;"));
        zero.affinity_timeout_seconds = Some(u32::MAX);
        assert!(render(&[zero]).script.contains("timeout 86400s;"));
    }

    #[test]
    fn udp_routes_dnat_udp() {
        let mut dns = route(
            "kube-system/kube-dns:dns",
            [10, 96, 0, 10],
            53,
            &[([10, 212, 0, 9], 53)],
        );
        dns.protocol = Protocol::Udp;
        let s = render(&[dns]).script;
        assert!(s.contains("10.96.0.10 . udp . 53 : goto svc-0"), "{s}");
        assert!(s.contains("meta l4proto udp dnat to 10.212.0.9:53"), "{s}");
    }

    #[test]
    fn a_second_route_for_one_destination_is_left_out_and_named() {
        let rules = render(&[
            route(
                "default/a:80",
                [10, 96, 0, 24],
                80,
                &[([10, 212, 0, 10], 80)],
            ),
            route(
                "default/b:80",
                [10, 96, 0, 24],
                80,
                &[([10, 212, 0, 11], 80)],
            ),
        ]);
        assert_eq!(rules.problems.len(), 1);
        assert!(
            rules.problems[0].contains("default/b:80"),
            "{:?}",
            rules.problems
        );
        assert!(!rules.script.contains("10.212.0.11"), "{}", rules.script);
    }

    #[test]
    fn no_routes_render_an_empty_table_that_still_replaces_the_old_one() {
        let s = render(&[]).script;
        assert!(s.contains("delete table ip updraft-proxy"));
        assert!(!s.contains("elements"), "{s}");
        assert!(s.contains("chain nat-output"), "{s}");
    }

    #[test]
    fn comments_keep_only_name_characters() {
        assert_eq!(comment("default/web:http"), "default/web:http");
        assert_eq!(comment("a\"; flush ruleset; \"b"), "aflushrulesetb");
    }

    #[test]
    fn the_same_routes_render_the_same_text() {
        let routes = [route(
            "default/web:80",
            [10, 96, 0, 25],
            80,
            &[([10, 212, 0, 12], 80)],
        )];
        assert_eq!(render(&routes), render(&routes));
    }
}
