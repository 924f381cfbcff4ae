//! The network plugin's role on a cell: a pod's NetworkPolicy as one nftables table in the
//! pod's own network namespace.
//!
//! On a kubelet node the network plugin (Calico, Cilium, kube-router, …) enforces the
//! NetworkPolicies; a cell has none, so the agent does it where the pod's traffic is: the
//! node derives the pod's whole table ([`PolicyRules`], resolved to addresses and port
//! numbers), [`render_policy`] turns it into one nftables table, and [`crate::Nft::apply`]
//! replaces the namespace's table with it in one `nft -f` transaction (the script adds,
//! deletes and declares the table, as [`crate::render`]'s does), so no packet ever sees half a
//! policy. [`remove_policy`] is the script that removes the table.
//!
//! # The rules
//! All in table [`POLICY_TABLE`] (`inet`, so that IPv6 is filtered too: the pod's veth has an
//! IPv6 link-local address even on the IPv4-only cell network, and an `ip` table would leave
//! it open). The pod's namespace has loopback and one interface to the outside (the pod's
//! veth), and nothing is forwarded through it, so:
//! - chain `ingress` (hook `input`) filters traffic to the pod, chain `egress` (hook
//!   `output`) traffic from it; a direction that is not isolated has no chain at all;
//! - an isolated direction always accepts loopback (a pod cannot block itself), packets of
//!   connections already accepted and related to them (replies, ICMP errors), and traffic to
//!   and from the cell's own addresses (the pod's node, which Kubernetes always allows; the
//!   agent's probes come from there);
//! - then one rule per protocol of each [`Rule`]: the rule's peers are a named interval set
//!   (`ingress-N`, `egress-N`: the union of their blocks without the `except` blocks) matched
//!   against the source (ingress) or destination (egress), the ports an anonymous set on
//!   `th dport`; a rule without peers matches any address (IPv6 too), one without ports any
//!   protocol and port;
//! - everything else is dropped and counted in the named counter `ingress-denied` or
//!   `egress-denied` (`nft list counters` in the pod's namespace).
//!
//! # Choices
//! - **Drop, not reject.** Calico, Cilium and Weave drop denied packets by default, and a
//!   denied peer learns nothing about the pod; its connection times out. (kube-router, which
//!   Kip used, rejects with ICMP port-unreachable instead, so clients fail at once; its
//!   maintainers kept that default for debuggability, cloudnativelabs/kube-router#801.) The
//!   counters say what was dropped.
//! - **Egress sees the endpoint, not the Service.** The Service DNAT of table
//!   `ip updraft-proxy` runs in `nat` `output` at priority -100, before this table's `filter`
//!   priority (0): egress rules see the translated destination, the endpoint pod, which is what
//!   NetworkPolicy means (policies are about pods, not Service IPs). A pod allowed to reach
//!   the pods behind a Service reaches them through its ClusterIP too.
//! - **No exception for DNS.** Kubernetes makes none: an isolated egress without a rule for
//!   the cluster DNS (its pods' addresses on port 53, UDP and TCP) blocks name resolution, as
//!   it does on any cluster.
//! - **Connections already open stay open** when the table is replaced (they are
//!   established in conntrack); a new table affects new connections, which Kubernetes leaves
//!   to the implementation.
//! - **Invalid ports are left out with their rule** ([`Ruleset::problems`]): leaving out only
//!   the port could widen the rule to every port.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

pub use updraft_common::network_policy::{
    Ipv4Cidr, Peer, PodPolicy, PodPolicyStatus, PolicyRules, PortRule, Protocol, Rule,
};

use crate::Ruleset;

/// The table the policy lives in (family and name).
pub const POLICY_TABLE: &str = "inet updraft-policy";

/// The named counter of packets an isolated ingress dropped.
pub const INGRESS_DENIED: &str = "ingress-denied";
/// The named counter of packets an isolated egress dropped.
pub const EGRESS_DENIED: &str = "egress-denied";

/// The nftables transaction that makes the pod's namespace enforce exactly `rules`, with
/// `cell` the addresses of the cell itself (the pod's node, always allowed both ways).
///
/// The output depends only on the arguments and their order, so the same table renders to
/// the same text. A rule with an invalid port (a zero port, `endPort` below `port` or without
/// it) is left out and named in [`Ruleset::problems`]; a rule that allows nothing (no peers
/// or no ports listed, or blocks wholly excepted) is left out silently.
pub fn render_policy(rules: &PolicyRules, cell: &[Ipv4Addr]) -> Ruleset {
    let mut problems = Vec::new();
    let mut sets = String::new();
    let mut chains = String::new();
    for (direction, table) in [
        (Direction::Ingress, &rules.ingress),
        (Direction::Egress, &rules.egress),
    ] {
        if let Some(table) = table {
            chain(
                direction,
                table,
                cell,
                &mut sets,
                &mut chains,
                &mut problems,
            );
        }
    }
    let mut s = String::new();
    // Adding first makes the delete valid when the table does not exist yet; all three run
    // as one transaction.
    let _ = writeln!(s, "add table {POLICY_TABLE}");
    let _ = writeln!(s, "delete table {POLICY_TABLE}");
    let _ = writeln!(s, "table {POLICY_TABLE} {{");
    let _ = writeln!(s, "  counter {INGRESS_DENIED} {{ }}");
    let _ = writeln!(s, "  counter {EGRESS_DENIED} {{ }}");
    s.push_str(&sets);
    s.push_str(&chains);
    let _ = writeln!(s, "}}");
    Ruleset {
        script: s,
        problems,
    }
}

/// The transaction that removes the policy table (nothing to do when it is not there); run
/// it with [`crate::Nft::apply`].
pub fn remove_policy() -> String {
    format!("add table {POLICY_TABLE}\ndelete table {POLICY_TABLE}\n")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// Appends the isolated `direction`'s sets to `sets` and its chain to `chains`.
fn chain(
    direction: Direction,
    table: &[Rule],
    cell: &[Ipv4Addr],
    sets: &mut String,
    chains: &mut String,
    problems: &mut Vec<String>,
) {
    let name = direction.name();
    let (hook, interface, address, counter) = match direction {
        Direction::Ingress => ("input", "iif", "ip saddr", INGRESS_DENIED),
        Direction::Egress => ("output", "oif", "ip daddr", EGRESS_DENIED),
    };
    let c = chains;
    let _ = writeln!(c, "  chain {name} {{");
    let _ = writeln!(
        c,
        "    type filter hook {hook} priority filter; policy drop;"
    );
    let _ = writeln!(c, "    {interface} \"lo\" accept");
    let _ = writeln!(c, "    ct state established,related accept");
    if !cell.is_empty() {
        let mut cell: Vec<String> = cell.iter().map(Ipv4Addr::to_string).collect();
        cell.sort();
        cell.dedup();
        let _ = writeln!(
            c,
            "    {address} {{ {} }} accept comment \"the cell\"",
            cell.join(", ")
        );
    }
    for (n, rule) in table.iter().enumerate() {
        let ports = match ports(rule) {
            Ok(Some(ports)) if ports.is_empty() => continue,
            Ok(ports) => ports,
            Err(why) => {
                problems.push(format!(
                    "{} ({name} rule {n}): {why}; the rule is left out",
                    rule.policy
                ));
                continue;
            }
        };
        let matched = match &rule.peers {
            None => String::new(),
            Some(peers) => {
                let elements = intervals(peers);
                if elements.is_empty() {
                    continue;
                }
                let set = format!("{name}-{n}");
                let _ = writeln!(sets, "  set {set} {{");
                let _ = writeln!(sets, "    type ipv4_addr; flags interval;");
                let _ = writeln!(sets, "    elements = {{ {} }}", elements.join(", "));
                let _ = writeln!(sets, "  }}");
                format!("{address} @{set} ")
            }
        };
        let note = comment(&rule.policy);
        match ports {
            None => {
                let _ = writeln!(c, "    {matched}accept comment \"{note}\"");
            }
            Some(by_protocol) => {
                for (protocol, ranges) in by_protocol {
                    let proto = protocol_name(protocol);
                    let dport = match ranges {
                        None => String::new(),
                        Some(ranges) => format!(" th dport {{ {} }}", ranges.join(", ")),
                    };
                    let _ = writeln!(
                        c,
                        "    {matched}meta l4proto {proto}{dport} accept comment \"{note}\""
                    );
                }
            }
        }
    }
    let _ = writeln!(c, "    counter name \"{counter}\" drop");
    let _ = writeln!(c, "  }}");
}

/// A rule's ports by protocol: the port ranges as nft elements, or `None` for every port.
type ByProtocol = BTreeMap<Protocol, Option<Vec<String>>>;

/// A rule's ports ([`ByProtocol`]); `None` when the rule allows any port; why when a port is
/// invalid.
fn ports(rule: &Rule) -> Result<Option<ByProtocol>, String> {
    let Some(ports) = &rule.ports else {
        return Ok(None);
    };
    let mut ranges: BTreeMap<Protocol, Option<Vec<(u64, u64)>>> = BTreeMap::new();
    for port in ports {
        let range = port_range(port)?;
        let entry = ranges
            .entry(port.protocol)
            .or_insert_with(|| Some(Vec::new()));
        match (range, entry.as_mut()) {
            (None, _) => *entry = None,
            (Some(range), Some(list)) => list.push(range),
            (Some(_), None) => {}
        }
    }
    Ok(Some(
        ranges
            .into_iter()
            .map(|(protocol, list)| {
                let elements = list.map(|list| {
                    merge(list)
                        .into_iter()
                        .map(|(first, last)| {
                            if first == last {
                                first.to_string()
                            } else {
                                format!("{first}-{last}")
                            }
                        })
                        .collect()
                });
                (protocol, elements)
            })
            .collect(),
    ))
}

/// The range of `port` (`None`: every port of its protocol), or why it is invalid.
fn port_range(port: &PortRule) -> Result<Option<(u64, u64)>, String> {
    let name = protocol_name(port.protocol);
    match (port.port, port.end_port) {
        (None, None) => Ok(None),
        (None, Some(end)) => Err(format!("{name} endPort {end} without a port")),
        (Some(0), _) => Err(format!("{name} port 0")),
        (Some(first), None) => Ok(Some((first.into(), first.into()))),
        (Some(first), Some(last)) if last >= first => Ok(Some((first.into(), last.into()))),
        (Some(first), Some(last)) => Err(format!("{name} endPort {last} below port {first}")),
    }
}

/// The addresses `peers` allow as disjoint, sorted nft interval elements.
fn intervals(peers: &[Peer]) -> Vec<String> {
    let mut pieces = Vec::new();
    for peer in peers {
        let (first, last) = peer.cidr.range();
        let (first, last) = (u64::from(u32::from(first)), u64::from(u32::from(last)));
        let mut excepts: Vec<(u64, u64)> = peer
            .except
            .iter()
            .map(|e| {
                let (a, b) = e.range();
                (u64::from(u32::from(a)), u64::from(u32::from(b)))
            })
            .collect();
        excepts.sort_unstable();
        let mut from = first;
        for (a, b) in excepts {
            if b < from || a > last {
                continue;
            }
            if a > from {
                pieces.push((from, a - 1));
            }
            from = from.max(b + 1);
        }
        if from <= last {
            pieces.push((from, last));
        }
    }
    merge(pieces)
        .into_iter()
        .map(|(a, b)| {
            let (a, b) = (address(a), address(b));
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect()
}

/// An address back from its `u64` form (always below 2^32 here).
fn address(value: u64) -> Ipv4Addr {
    Ipv4Addr::from(u32::try_from(value).unwrap_or(u32::MAX))
}

/// `ranges` sorted, with overlapping and adjacent ones joined (nft refuses overlapping
/// elements in an interval set).
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if a <= last.1 + 1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// A policy name as a rule comment: the characters Kubernetes names use, nothing that could
/// end the quoted string.
fn comment(policy: &str) -> String {
    policy
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '-'))
        .take(120)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Ipv4Cidr {
        text.parse().unwrap()
    }

    fn peer(block: &str, except: &[&str]) -> Peer {
        Peer {
            cidr: cidr(block),
            except: except.iter().map(|e| cidr(e)).collect(),
        }
    }

    fn port(protocol: Protocol, port: Option<u16>, end_port: Option<u16>) -> PortRule {
        PortRule {
            protocol,
            port,
            end_port,
        }
    }

    fn rule(peers: Option<Vec<Peer>>, ports: Option<Vec<PortRule>>) -> Rule {
        Rule {
            policy: "default/web".into(),
            peers,
            ports,
        }
    }

    fn ingress(rules: Vec<Rule>) -> PolicyRules {
        PolicyRules {
            ingress: Some(rules),
            egress: None,
        }
    }

    const CELL: [Ipv4Addr; 1] = [Ipv4Addr::new(10, 212, 0, 2)];

    #[test]
    fn no_isolation_renders_a_table_without_chains_that_still_replaces_the_old_one() {
        let rules = render_policy(&PolicyRules::default(), &CELL);
        assert!(rules.problems.is_empty());
        let s = &rules.script;
        assert!(
            s.starts_with(
                "add table inet updraft-policy\ndelete table inet updraft-policy\ntable inet updraft-policy {\n"
            ),
            "{s}"
        );
        assert!(!s.contains("chain"), "{s}");
        assert!(s.contains("counter ingress-denied"), "{s}");
    }

    #[test]
    fn default_deny_ingress_keeps_loopback_replies_and_the_cell() {
        let s = render_policy(&ingress(vec![]), &CELL).script;
        assert!(s.contains("chain ingress {"), "{s}");
        assert!(
            s.contains("type filter hook input priority filter; policy drop;"),
            "{s}"
        );
        assert!(s.contains("iif \"lo\" accept"), "{s}");
        assert!(s.contains("ct state established,related accept"), "{s}");
        assert!(
            s.contains("ip saddr { 10.212.0.2 } accept comment \"the cell\""),
            "{s}"
        );
        assert!(s.contains("counter name \"ingress-denied\" drop"), "{s}");
        assert!(!s.contains("chain egress"), "{s}");
    }

    #[test]
    fn default_deny_egress_filters_output_by_destination() {
        let policy = PolicyRules {
            ingress: None,
            egress: Some(vec![]),
        };
        let s = render_policy(&policy, &CELL).script;
        assert!(
            s.contains("type filter hook output priority filter; policy drop;"),
            "{s}"
        );
        assert!(s.contains("oif \"lo\" accept"), "{s}");
        assert!(s.contains("ip daddr { 10.212.0.2 } accept"), "{s}");
        assert!(s.contains("counter name \"egress-denied\" drop"), "{s}");
        assert!(!s.contains("chain ingress"), "{s}");
    }

    #[test]
    fn a_rule_with_peers_and_ports_matches_a_set_and_one_line_per_protocol() {
        let s = render_policy(
            &ingress(vec![rule(
                Some(vec![peer("10.250.1.2/32", &[]), peer("10.250.2.0/24", &[])]),
                Some(vec![
                    port(Protocol::Tcp, Some(8080), None),
                    port(Protocol::Tcp, Some(9000), Some(9100)),
                    port(Protocol::Udp, Some(53), None),
                    port(Protocol::Sctp, None, None),
                ]),
            )]),
            &CELL,
        )
        .script;
        assert!(s.contains("set ingress-0 {"), "{s}");
        assert!(s.contains("type ipv4_addr; flags interval;"), "{s}");
        assert!(
            s.contains("elements = { 10.250.1.2, 10.250.2.0-10.250.2.255 }"),
            "{s}"
        );
        assert!(
            s.contains(
                "ip saddr @ingress-0 meta l4proto tcp th dport { 8080, 9000-9100 } accept comment \"default/web\""
            ),
            "{s}"
        );
        assert!(
            s.contains("ip saddr @ingress-0 meta l4proto udp th dport { 53 } accept"),
            "{s}"
        );
        assert!(
            s.contains("ip saddr @ingress-0 meta l4proto sctp accept"),
            "{s}"
        );
    }

    #[test]
    fn any_peer_and_any_port_are_no_match_at_all() {
        let s = render_policy(&ingress(vec![rule(None, None)]), &[]).script;
        assert!(s.contains("    accept comment \"default/web\""), "{s}");
        assert!(!s.contains("the cell"), "{s}");
        let s = render_policy(
            &ingress(vec![rule(
                None,
                Some(vec![port(Protocol::Tcp, Some(80), None)]),
            )]),
            &[],
        )
        .script;
        assert!(
            s.contains("    meta l4proto tcp th dport { 80 } accept"),
            "{s}"
        );
        assert!(!s.contains("set "), "{s}");
    }

    #[test]
    fn except_blocks_are_cut_out_of_the_set() {
        let s = render_policy(
            &ingress(vec![rule(
                Some(vec![peer(
                    "10.250.0.0/16",
                    &["10.250.1.0/24", "10.250.255.255/32", "10.250.0.0/32"],
                )]),
                None,
            )]),
            &[],
        )
        .script;
        assert!(
            s.contains("elements = { 10.250.0.1-10.250.0.255, 10.250.2.0-10.250.255.254 }"),
            "{s}"
        );
        assert!(s.contains("    ip saddr @ingress-0 accept"), "{s}");
    }

    #[test]
    fn overlapping_peers_and_ports_are_merged() {
        let s = render_policy(
            &ingress(vec![rule(
                Some(vec![
                    peer("10.0.0.0/8", &[]),
                    peer("10.1.0.0/16", &[]),
                    peer("11.0.0.0/8", &[]),
                ]),
                Some(vec![
                    port(Protocol::Tcp, Some(80), Some(90)),
                    port(Protocol::Tcp, Some(85), None),
                    port(Protocol::Tcp, Some(91), None),
                    port(Protocol::Tcp, None, None),
                    port(Protocol::Udp, Some(1), Some(65535)),
                ]),
            )]),
            &[],
        )
        .script;
        assert!(s.contains("elements = { 10.0.0.0-11.255.255.255 }"), "{s}");
        // A whole protocol wins over its ranges.
        assert!(s.contains("meta l4proto tcp accept"), "{s}");
        assert!(s.contains("meta l4proto udp th dport { 1-65535 }"), "{s}");
    }

    #[test]
    fn a_whole_address_space_is_one_interval() {
        let s = render_policy(
            &ingress(vec![rule(Some(vec![peer("0.0.0.0/0", &[])]), None)]),
            &[],
        )
        .script;
        assert!(s.contains("elements = { 0.0.0.0-255.255.255.255 }"), "{s}");
    }

    #[test]
    fn rules_that_allow_nothing_are_left_out() {
        let rules = render_policy(
            &ingress(vec![
                rule(Some(vec![]), None),
                rule(None, Some(vec![])),
                rule(Some(vec![peer("10.0.0.0/24", &["10.0.0.0/24"])]), None),
            ]),
            &[],
        );
        assert!(rules.problems.is_empty());
        assert!(
            !rules.script.contains("accept comment \"default/web\""),
            "{}",
            rules.script
        );
        assert!(!rules.script.contains("set "), "{}", rules.script);
    }

    #[test]
    fn a_rule_with_an_invalid_port_is_left_out_whole_and_named() {
        let rules = render_policy(
            &ingress(vec![
                rule(
                    None,
                    Some(vec![
                        port(Protocol::Tcp, Some(80), None),
                        port(Protocol::Tcp, Some(90), Some(80)),
                    ]),
                ),
                rule(None, Some(vec![port(Protocol::Udp, None, Some(5))])),
                rule(None, Some(vec![port(Protocol::Tcp, Some(0), None)])),
                rule(None, Some(vec![port(Protocol::Tcp, Some(443), None)])),
            ]),
            &[],
        );
        assert_eq!(
            rules.problems,
            [
                "default/web (ingress rule 0): tcp endPort 80 below port 90; the rule is left out",
                "default/web (ingress rule 1): udp endPort 5 without a port; the rule is left out",
                "default/web (ingress rule 2): tcp port 0; the rule is left out",
            ]
        );
        assert!(!rules.script.contains("{ 80 }"), "{}", rules.script);
        assert!(
            rules.script.contains("th dport { 443 } accept"),
            "{}",
            rules.script
        );
    }

    #[test]
    fn sets_are_named_per_direction_and_rule() {
        let policy = PolicyRules {
            ingress: Some(vec![rule(Some(vec![peer("10.0.0.1/32", &[])]), None)]),
            egress: Some(vec![
                rule(None, Some(vec![port(Protocol::Udp, Some(53), None)])),
                rule(Some(vec![peer("10.0.0.2/32", &[])]), None),
            ]),
        };
        let s = render_policy(&policy, &[]).script;
        assert!(s.contains("set ingress-0 {"), "{s}");
        assert!(s.contains("set egress-1 {"), "{s}");
        assert!(s.contains("ip daddr @egress-1 accept"), "{s}");
        // Sets come before the chains that use them.
        assert!(
            s.find("set egress-1").unwrap() < s.find("chain ingress").unwrap(),
            "{s}"
        );
    }

    #[test]
    fn comments_keep_only_name_characters() {
        assert_eq!(comment("default/allow-web.v2"), "default/allow-web.v2");
        assert_eq!(comment("a\"; flush ruleset; \"b"), "aflushrulesetb");
    }

    #[test]
    fn the_same_rules_render_the_same_text() {
        let policy = ingress(vec![rule(
            Some(vec![peer("10.0.0.0/8", &["10.1.0.0/16"])]),
            None,
        )]);
        assert_eq!(render_policy(&policy, &CELL), render_policy(&policy, &CELL));
    }

    #[test]
    fn removal_deletes_only_the_policy_table() {
        assert_eq!(
            remove_policy(),
            "add table inet updraft-policy\ndelete table inet updraft-policy\n"
        );
    }
}
