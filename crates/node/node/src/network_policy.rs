//! The NetworkPolicy of one of the node's pods, derived from the cluster's NetworkPolicies,
//! pods and namespaces the way a network plugin derives what to enforce, for providers whose
//! pods run where no network plugin does. The provider installs the result where the pod runs
//! (the cells provider: in the pod's network namespace on its cell, `updraft-cell-proxy`).
//!
//! [`pod_policy`] is a pure function of its inputs and gives the pod's whole table
//! ([`PolicyRules`], the wire type of `updraft_common::network_policy`): the node recomputes it
//! when a policy, a pod or a namespace changes, as for the Service routes. Equal inputs give
//! equal tables (policies are taken in name order, addresses and ports sorted), so a provider
//! can tell an unchanged table from a changed one.
//!
//! # The rules (networking.k8s.io/v1)
//! - A policy applies to the pods of its own namespace that its `podSelector` selects (absent
//!   or empty: all of them).
//! - `policyTypes` says which directions it isolates; absent (or empty) it is `Ingress`, plus
//!   `Egress` when the policy has at least one egress rule. A direction is isolated as soon as
//!   one policy selecting the pod has that type, even with no rules (default deny); rules of a
//!   direction the policy does not have are ignored.
//! - Policies are additive: an isolated direction allows the union of the rules of every
//!   policy that selects the pod for it. A rule allows traffic from (`from`) or to (`to`) one
//!   of its peers on one of its ports; an empty or absent peer list is any peer, an empty or
//!   absent port list is any port.
//! - A peer is an `ipBlock` (its `cidr` without its `except` blocks), or pods: `podSelector`
//!   alone selects pods of the policy's namespace, `namespaceSelector` alone every pod of the
//!   namespaces it selects, both together the pods matching `podSelector` in those
//!   namespaces. Pods become their addresses (`/32`), so only pods that have one count: an
//!   IPv4 address in `status.podIPs` (or `status.podIP`) and not terminated (phase `Succeeded`
//!   or `Failed`). A pod being deleted still counts while it runs out its grace period.
//! - Namespaces are matched by their labels, with `kubernetes.io/metadata.name` set to the
//!   name as the API server sets it; a namespace missing from `namespaces` has only that label.
//! - Label selectors: `matchLabels` and `matchExpressions` (`In`, `NotIn`, `Exists`,
//!   `DoesNotExist`), all of which must hold; kube's [`Selector`] does the matching.
//! - A port has a protocol (`TCP` when absent, `UDP`, `SCTP`), and a number, a number with
//!   `endPort` (the range, inclusive), a name, or nothing (every port of the protocol). A name
//!   is a container port's name (with the same protocol) on the pod the traffic goes to: for
//!   ingress the policy's pod itself, so the name is looked up in its containers; for egress
//!   the destination, whose number may differ from pod to pod, so the name is looked up in
//!   every pod the rule's peers cover (the selected pods; for an `ipBlock`, the known pods
//!   with an address in it; for any peer, every pod) and the rule becomes one [`Rule`] per
//!   group of pods with the same numbers, each allowing those pods on those numbers. A name
//!   that resolves nowhere allows nothing, and neither does a rule whose ports all are such
//!   names, or whose selectors select no pod. Containers and sidecars (init containers with
//!   `restartPolicy: Always`) are looked up, as they are the ones that listen.
//!
//! # What is not enforced, and why
//! - A pod with `hostNetwork` is never isolated: it shares the namespace of the cell (its
//!   agent, its other traffic), and Kubernetes leaves policies for such pods undefined (most
//!   plugins do not apply them). A policy selecting one is named in the problems.
//! - Host-network pods are not peers either: their address is their node's, shared with the
//!   node and every other host-network pod there. An `ipBlock` with that address allows them.
//! - IPv6: the cells' network is IPv4, so IPv6 pod addresses and IPv6 `ipBlock`s are left out
//!   (a rule whose only peers are IPv6 blocks allows nothing over IPv4).
//! - What Kubernetes always allows is the installer's to allow, as it is where the addresses
//!   are known: the pod's own loopback, replies to allowed connections, and traffic to and
//!   from the pod's node (on a cell: the cell itself, whose agent runs the probes).
//!
//! # Bad input
//! The API server validates policies, so these only come from objects that bypassed it; none
//! of them panics and each is one line of the problems, naming the policy and the field:
//! - a rule with an invalid part (a CIDR that is none, an `except` outside its block, an
//!   unknown protocol, a port out of range, an `endPort` below its port or with a named port,
//!   a peer with no field or with `ipBlock` beside a selector, a selector with an unknown
//!   operator or a wrong number of values) is skipped whole: skipping only the part could
//!   widen the rule (a rule whose only port is dropped would allow every port);
//! - an unknown entry in `policyTypes` is ignored;
//! - a policy whose own `podSelector` cannot be read may be meant for the pod: it is taken as
//!   selecting it, isolating it for the policy's types with none of the policy's rules
//!   (failing closed rather than open).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::{Selector, SelectorExt};
use updraft_common::network_policy::{
    CidrError, Ipv4Cidr, Peer, PolicyRules, PortRule, Protocol, Rule,
};

/// The label the API server gives every namespace, its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// No labels.
static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// The policy table of `pod` under `policies` (all of the cluster's; those of other
/// namespaces are ignored), with `pods` and `namespaces` (all of the cluster's) to resolve
/// peers and named ports; and one line per thing that could not be enforced, naming the
/// policy and the field (see the module docs). Stamp the table with a version to send it
/// (`updraft_common::network_policy::PodPolicy`).
pub fn pod_policy(
    pod: &Pod,
    policies: &[NetworkPolicy],
    pods: &[Pod],
    namespaces: &[Namespace],
) -> (PolicyRules, Vec<String>) {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS);
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let cluster = Cluster::new(pods, namespaces);
    let mut sorted: Vec<&NetworkPolicy> = policies
        .iter()
        .filter(|p| p.metadata.namespace.as_deref().unwrap_or_default() == namespace)
        .collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    let mut rules = PolicyRules::default();
    let mut problems = Vec::new();
    let no_spec = NetworkPolicySpec::default();
    for policy in sorted {
        let name = format!(
            "{namespace}/{}",
            policy.metadata.name.as_deref().unwrap_or_default()
        );
        let spec = policy.spec.as_ref().unwrap_or(&no_spec);
        let mut readable = true;
        if let Some(selector) = &spec.pod_selector {
            match parse_selector(selector) {
                Ok(selector) if selector.matches(labels) => {}
                Ok(_) => continue,
                Err(why) => {
                    problems.push(format!(
                        "networkpolicy {name}: spec.podSelector{why}; the pod is isolated for the policy's types with none of its rules"
                    ));
                    readable = false;
                }
            }
        }
        if host_network {
            problems.push(format!(
                "networkpolicy {name} selects the pod, which uses hostNetwork: policies are not enforced for host-network pods"
            ));
            continue;
        }
        let (ingress, egress) = policy_types(spec, &name, &mut problems);
        let context = Context {
            policy: &name,
            namespace,
            target: pod,
            cluster: &cluster,
        };
        if ingress {
            let table = rules.ingress.get_or_insert_with(Vec::new);
            if readable {
                let found = spec.ingress.iter().flatten();
                let found = found.map(|r| (r.from.as_deref(), r.ports.as_deref()));
                context.rules(Direction::Ingress, found, table, &mut problems);
            }
        }
        if egress {
            let table = rules.egress.get_or_insert_with(Vec::new);
            if readable {
                let found = spec.egress.iter().flatten();
                let found = found.map(|r| (r.to.as_deref(), r.ports.as_deref()));
                context.rules(Direction::Egress, found, table, &mut problems);
            }
        }
    }
    (rules, problems)
}

/// Which directions `spec` isolates (see the module docs).
fn policy_types(spec: &NetworkPolicySpec, name: &str, problems: &mut Vec<String>) -> (bool, bool) {
    match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            let (mut ingress, mut egress) = (false, false);
            for (i, kind) in types.iter().enumerate() {
                match kind.as_str() {
                    "Ingress" => ingress = true,
                    "Egress" => egress = true,
                    other => problems.push(format!(
                        "networkpolicy {name}: spec.policyTypes[{i}]: {other:?} is neither Ingress nor Egress; ignored"
                    )),
                }
            }
            (ingress, egress)
        }
        _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    }
}

/// `selector` as kube's matcher, or why it is none (a field path suffix and the reason).
fn parse_selector(selector: &LabelSelector) -> Result<Selector, String> {
    for (i, requirement) in selector.match_expressions.iter().flatten().enumerate() {
        let values = requirement.values.as_ref().map_or(0, Vec::len);
        let fine = match requirement.operator.as_str() {
            "In" | "NotIn" => values > 0,
            "Exists" | "DoesNotExist" => values == 0,
            other => {
                return Err(format!(
                    ".matchExpressions[{i}].operator: {other:?} is not In, NotIn, Exists or DoesNotExist"
                ));
            }
        };
        if !fine {
            return Err(format!(
                ".matchExpressions[{i}].values: {} takes {}",
                requirement.operator,
                if values == 0 { "values" } else { "no values" }
            ));
        }
    }
    Selector::try_from(selector.clone()).map_err(|e| format!(": {e}"))
}

/// Traffic to (ingress) or from (egress) the policy's pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

/// A pod that can be a peer: it has an IPv4 address, runs in the pod network and has not
/// terminated.
struct PeerPod<'a> {
    namespace: &'a str,
    labels: &'a BTreeMap<String, String>,
    address: Ipv4Addr,
    pod: &'a Pod,
}

/// The pods that can be peers and the labels of every namespace.
struct Cluster<'a> {
    pods: Vec<PeerPod<'a>>,
    namespace_labels: BTreeMap<&'a str, BTreeMap<String, String>>,
}

impl<'a> Cluster<'a> {
    fn new(pods: &'a [Pod], namespaces: &'a [Namespace]) -> Cluster<'a> {
        let mut namespace_labels = BTreeMap::new();
        for namespace in namespaces {
            let name = namespace.metadata.name.as_deref().unwrap_or_default();
            let mut labels = namespace.metadata.labels.clone().unwrap_or_default();
            labels
                .entry(NAMESPACE_NAME_LABEL.to_owned())
                .or_insert_with(|| name.to_owned());
            namespace_labels.insert(name, labels);
        }
        let mut peers = Vec::new();
        for pod in pods {
            let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
            namespace_labels.entry(namespace).or_insert_with(|| {
                BTreeMap::from([(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned())])
            });
            let Some(address) = peer_address(pod) else {
                continue;
            };
            peers.push(PeerPod {
                namespace,
                labels: pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
                address,
                pod,
            });
        }
        Cluster {
            pods: peers,
            namespace_labels,
        }
    }
}

/// The pod's IPv4 address if it can be a peer (see [`PeerPod`]).
fn peer_address(pod: &Pod) -> Option<Ipv4Addr> {
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    status
        .pod_ips
        .iter()
        .flatten()
        .map(|ip| ip.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .find_map(|ip| ip.parse().ok())
}

/// The numbers of the container ports named `name` with `protocol` in `pod` (containers and
/// sidecars).
fn named_port(pod: &Pod, name: &str, protocol: Protocol) -> BTreeSet<u16> {
    let Some(spec) = &pod.spec else {
        return BTreeSet::new();
    };
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    spec.containers
        .iter()
        .chain(sidecars)
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| {
            p.name.as_deref() == Some(name)
                && Protocol::from_kubernetes(p.protocol.as_deref().unwrap_or("TCP"))
                    == Some(protocol)
        })
        .filter_map(|p| u16::try_from(p.container_port).ok().filter(|n| *n > 0))
        .collect()
}

/// A rule's peers, resolved.
enum Peers<'c, 'a> {
    /// Any peer.
    Any,
    /// These blocks and pods.
    Listed {
        blocks: Vec<Peer>,
        pods: Vec<&'c PeerPod<'a>>,
    },
}

/// A rule's ports, parsed.
enum Ports {
    /// Any port.
    Any,
    /// These numbers (ranges, whole protocols) and these names.
    Listed {
        numbered: BTreeSet<PortRule>,
        named: Vec<(String, Protocol)>,
    },
}

/// What a policy's rules are resolved against.
struct Context<'c, 'a> {
    /// `namespace/name`.
    policy: &'c str,
    /// The policy's namespace (the pod's).
    namespace: &'c str,
    /// The pod the policy is derived for.
    target: &'c Pod,
    cluster: &'c Cluster<'a>,
}

impl<'c, 'a> Context<'c, 'a> {
    /// Adds the wire rules of the policy's `found` rules of `direction` (their peers and
    /// ports) to `table`, and a problem for each rule that is skipped.
    fn rules<'r>(
        &self,
        direction: Direction,
        found: impl Iterator<
            Item = (
                Option<&'r [NetworkPolicyPeer]>,
                Option<&'r [NetworkPolicyPort]>,
            ),
        >,
        table: &mut Vec<Rule>,
        problems: &mut Vec<String>,
    ) {
        for (i, (peers, ports)) in found.enumerate() {
            match self.rule(direction, i, peers, ports) {
                Ok(derived) => table.extend(derived),
                Err(why) => problems.push(format!(
                    "networkpolicy {}: {why}; this rule is skipped",
                    self.policy
                )),
            }
        }
    }

    /// The wire rules of the policy's rule `i` of `direction` (none when it allows nothing),
    /// or why it is skipped.
    fn rule(
        &self,
        direction: Direction,
        i: usize,
        peers: Option<&[NetworkPolicyPeer]>,
        ports: Option<&[NetworkPolicyPort]>,
    ) -> Result<Vec<Rule>, String> {
        let (field, key) = match direction {
            Direction::Ingress => (format!("spec.ingress[{i}]"), "from"),
            Direction::Egress => (format!("spec.egress[{i}]"), "to"),
        };
        let peers = self.peers(&format!("{field}.{key}"), peers)?;
        let ports = parse_ports(&format!("{field}.ports"), ports)?;
        let (numbered, named) = match ports {
            Ports::Any => (None, Vec::new()),
            Ports::Listed { numbered, named } => (Some(numbered), named),
        };
        let mut rules = Vec::new();
        match direction {
            Direction::Ingress => {
                // The names are the policy's pod's own ports.
                let numbered = numbered.map(|mut numbered| {
                    for (name, protocol) in &named {
                        numbered.extend(named_port(self.target, name, *protocol).into_iter().map(
                            |port| PortRule {
                                protocol: *protocol,
                                port: Some(port),
                                end_port: None,
                            },
                        ));
                    }
                    numbered
                });
                rules.extend(self.wire_rule(&peers, numbered));
            }
            Direction::Egress => {
                let only_named = numbered.as_ref().is_some_and(BTreeSet::is_empty);
                if !only_named {
                    rules.extend(self.wire_rule(&peers, numbered));
                }
                rules.extend(self.named_egress(&peers, &named));
            }
        }
        Ok(rules)
    }

    /// One wire rule for `peers` on `ports` (`None`: any), unless it allows nothing.
    fn wire_rule(&self, peers: &Peers<'_, '_>, ports: Option<BTreeSet<PortRule>>) -> Option<Rule> {
        let ports = match ports {
            None => None,
            Some(ports) if ports.is_empty() => return None,
            Some(ports) => Some(ports.into_iter().collect()),
        };
        let peers = match peers {
            Peers::Any => None,
            Peers::Listed { blocks, pods } => {
                let all: BTreeSet<Peer> = blocks
                    .iter()
                    .cloned()
                    .chain(pods.iter().map(|p| Peer::host(p.address)))
                    .collect();
                if all.is_empty() {
                    return None;
                }
                Some(all.into_iter().collect())
            }
        };
        Some(Rule {
            policy: self.policy.to_owned(),
            peers,
            ports,
        })
    }

    /// Egress named ports: every pod `peers` cover, grouped by the numbers the names have on
    /// it, one rule per group.
    fn named_egress(&self, peers: &Peers<'_, '_>, named: &[(String, Protocol)]) -> Vec<Rule> {
        if named.is_empty() {
            return Vec::new();
        }
        let covered: Vec<&PeerPod<'_>> = match peers {
            Peers::Any => self.cluster.pods.iter().collect(),
            Peers::Listed { blocks, pods } => {
                let in_blocks = self.cluster.pods.iter().filter(|candidate| {
                    blocks.iter().any(|b| {
                        b.cidr.contains(candidate.address)
                            && !b.except.iter().any(|e| e.contains(candidate.address))
                    })
                });
                // A pod both selected and in a block is looked up twice, to the same ports.
                pods.iter().copied().chain(in_blocks).collect()
            }
        };
        let mut by_ports: BTreeMap<BTreeSet<PortRule>, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        let mut ports_of: BTreeMap<Ipv4Addr, BTreeSet<PortRule>> = BTreeMap::new();
        for pod in covered {
            for (name, protocol) in named {
                ports_of.entry(pod.address).or_default().extend(
                    named_port(pod.pod, name, *protocol)
                        .into_iter()
                        .map(|port| PortRule {
                            protocol: *protocol,
                            port: Some(port),
                            end_port: None,
                        }),
                );
            }
        }
        for (address, ports) in ports_of {
            if !ports.is_empty() {
                by_ports.entry(ports).or_default().insert(address);
            }
        }
        by_ports
            .into_iter()
            .map(|(ports, addresses)| Rule {
                policy: self.policy.to_owned(),
                peers: Some(addresses.into_iter().map(Peer::host).collect()),
                ports: Some(ports.into_iter().collect()),
            })
            .collect()
    }

    /// The peers of a rule (`field` is the `from`/`to` path).
    fn peers(
        &self,
        field: &str,
        peers: Option<&[NetworkPolicyPeer]>,
    ) -> Result<Peers<'c, 'a>, String> {
        let Some(peers) = peers.filter(|p| !p.is_empty()) else {
            return Ok(Peers::Any);
        };
        let mut blocks = Vec::new();
        let mut pods = Vec::new();
        for (i, peer) in peers.iter().enumerate() {
            let field = format!("{field}[{i}]");
            match (&peer.ip_block, &peer.pod_selector, &peer.namespace_selector) {
                (Some(_), None, None) | (None, _, _) => {}
                (Some(_), _, _) => {
                    return Err(format!(
                        "{field}: ipBlock cannot be combined with podSelector or namespaceSelector"
                    ));
                }
            }
            if let Some(block) = &peer.ip_block {
                blocks.extend(ip_block(&field, block)?);
                continue;
            }
            let pod_selector = peer
                .pod_selector
                .as_ref()
                .map(|s| parse_selector(s).map_err(|why| format!("{field}.podSelector{why}")))
                .transpose()?;
            let namespace_selector = peer
                .namespace_selector
                .as_ref()
                .map(|s| parse_selector(s).map_err(|why| format!("{field}.namespaceSelector{why}")))
                .transpose()?;
            if pod_selector.is_none() && namespace_selector.is_none() {
                return Err(format!(
                    "{field}: sets none of podSelector, namespaceSelector and ipBlock"
                ));
            }
            pods.extend(self.cluster.pods.iter().filter(|candidate| {
                let namespace_fits = match &namespace_selector {
                    None => candidate.namespace == self.namespace,
                    Some(selector) => selector.matches(
                        self.cluster
                            .namespace_labels
                            .get(candidate.namespace)
                            .unwrap_or(&NO_LABELS),
                    ),
                };
                namespace_fits
                    && pod_selector
                        .as_ref()
                        .is_none_or(|selector| selector.matches(candidate.labels))
            }));
        }
        Ok(Peers::Listed { blocks, pods })
    }
}

/// An `ipBlock` as a peer; `None` for an IPv6 block (see the module docs).
fn ip_block(field: &str, block: &IPBlock) -> Result<Option<Peer>, String> {
    let cidr = match block.cidr.parse::<Ipv4Cidr>() {
        Ok(cidr) => cidr,
        Err(CidrError::Ipv6(_)) => return Ok(None),
        Err(e) => return Err(format!("{field}.ipBlock.cidr: {e}")),
    };
    let mut except = BTreeSet::new();
    for (j, text) in block.except.iter().flatten().enumerate() {
        let inside = text
            .parse::<Ipv4Cidr>()
            .map_err(|e| format!("{field}.ipBlock.except[{j}]: {e}"))?;
        if !cidr.contains_cidr(inside) {
            return Err(format!(
                "{field}.ipBlock.except[{j}]: {text} is outside the block {cidr}"
            ));
        }
        except.insert(inside);
    }
    Ok(Some(Peer {
        cidr,
        except: except.into_iter().collect(),
    }))
}

/// A rule's ports (`field` is the `ports` path).
fn parse_ports(field: &str, ports: Option<&[NetworkPolicyPort]>) -> Result<Ports, String> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return Ok(Ports::Any);
    };
    let mut numbered = BTreeSet::new();
    let mut named = Vec::new();
    for (k, port) in ports.iter().enumerate() {
        let field = format!("{field}[{k}]");
        let protocol_name = port.protocol.as_deref().unwrap_or("TCP");
        let protocol = Protocol::from_kubernetes(protocol_name).ok_or_else(|| {
            format!("{field}.protocol: {protocol_name:?} is not TCP, UDP or SCTP")
        })?;
        match (&port.port, port.end_port) {
            (None, None) => {
                numbered.insert(PortRule {
                    protocol,
                    port: None,
                    end_port: None,
                });
            }
            (None, Some(_)) => return Err(format!("{field}.endPort: needs a numeric port")),
            (Some(IntOrString::String(_)), Some(_)) => {
                return Err(format!("{field}.endPort: cannot be used with a named port"));
            }
            (Some(IntOrString::String(name)), None) => named.push((name.clone(), protocol)),
            (Some(IntOrString::Int(number)), end) => {
                let first = u16::try_from(*number)
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{field}.port: {number} is not a port (1-65535)"))?;
                let end_port = end
                    .map(|end| {
                        u16::try_from(end)
                            .ok()
                            .filter(|e| *e >= first)
                            .ok_or_else(|| {
                                format!(
                                    "{field}.endPort: {end} is not a port from {first} to 65535"
                                )
                            })
                    })
                    .transpose()?;
                numbered.insert(PortRule {
                    protocol,
                    port: Some(first),
                    end_port,
                });
            }
        }
    }
    Ok(Ports::Listed { numbered, named })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    /// A running pod with `labels`, address `ip` (none: no address yet) and these
    /// containers' ports.
    fn pod(namespace: &str, name: &str, labels: serde_json::Value, ip: Option<&str>) -> Pod {
        pod_with(namespace, name, labels, ip, json!([]))
    }

    fn pod_with(
        namespace: &str,
        name: &str,
        labels: serde_json::Value,
        ip: Option<&str>,
        ports: serde_json::Value,
    ) -> Pod {
        let mut value = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"namespace": namespace, "name": name, "labels": labels},
            "spec": {"containers": [{"name": "main", "image": "busybox", "ports": ports}]},
            "status": {"phase": "Running"},
        });
        if let Some(ip) = ip {
            value["status"]["podIP"] = ip.into();
            value["status"]["podIPs"] = json!([{"ip": ip}]);
        }
        serde_json::from_value(value).unwrap()
    }

    fn policy(namespace: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
        serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"namespace": namespace, "name": name},
            "spec": spec,
        }))
        .unwrap()
    }

    fn namespace(name: &str, labels: serde_json::Value) -> Namespace {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": labels},
        }))
        .unwrap()
    }

    fn web() -> Pod {
        pod_with(
            "default",
            "web",
            json!({"app": "web"}),
            Some("10.212.0.5"),
            json!([{"name": "http", "containerPort": 8080},
                   {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]),
        )
    }

    fn host(ip: &str) -> Peer {
        Peer::host(ip.parse().unwrap())
    }

    fn block(cidr: &str, except: &[&str]) -> Peer {
        Peer {
            cidr: cidr.parse().unwrap(),
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
        }
    }

    fn tcp(port: u16) -> PortRule {
        PortRule {
            protocol: Protocol::Tcp,
            port: Some(port),
            end_port: None,
        }
    }

    /// The rules derived for `web()` with no other pods or namespaces, problems asserted
    /// empty.
    fn derive(policies: &[NetworkPolicy]) -> PolicyRules {
        derive_with(policies, &[], &[])
    }

    fn derive_with(
        policies: &[NetworkPolicy],
        pods: &[Pod],
        namespaces: &[Namespace],
    ) -> PolicyRules {
        let (rules, problems) = pod_policy(&web(), policies, pods, namespaces);
        assert!(problems.is_empty(), "{problems:?}");
        rules
    }

    #[test]
    fn a_pod_no_policy_selects_is_not_isolated() {
        assert_eq!(derive(&[]), PolicyRules::default());
        let elsewhere = policy("other", "deny", json!({"podSelector": {}}));
        let others = policy(
            "default",
            "db-only",
            json!({"podSelector": {"matchLabels": {"app": "db"}}}),
        );
        assert_eq!(derive(&[elsewhere, others]), PolicyRules::default());
    }

    #[test]
    fn default_deny_ingress() {
        let deny = policy("default", "deny", json!({"podSelector": {}}));
        let rules = derive(&[deny]);
        assert_eq!(rules.ingress, Some(vec![]));
        assert_eq!(rules.egress, None);
        // A policy without a spec is the same (the API server defaults it so).
        let bare: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": "bare"},
        }))
        .unwrap();
        assert_eq!(derive(&[bare]).ingress, Some(vec![]));
    }

    #[test]
    fn default_deny_egress() {
        let deny = policy(
            "default",
            "deny-out",
            json!({"podSelector": {}, "policyTypes": ["Egress"]}),
        );
        let rules = derive(&[deny]);
        assert_eq!(rules.ingress, None);
        assert_eq!(rules.egress, Some(vec![]));
    }

    #[test]
    fn policy_types_default_to_ingress_plus_egress_when_there_are_egress_rules() {
        let with_egress = policy(
            "default",
            "out",
            json!({"podSelector": {}, "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]}),
        );
        let rules = derive(&[with_egress]);
        assert_eq!(rules.ingress, Some(vec![]));
        let egress = rules.egress.unwrap();
        assert_eq!(egress.len(), 1);
        assert_eq!(egress[0].peers, None);
        assert_eq!(
            egress[0].ports,
            Some(vec![PortRule {
                protocol: Protocol::Udp,
                port: Some(53),
                end_port: None
            }])
        );
        // An empty egress list is no egress section.
        let empty = policy("default", "empty", json!({"podSelector": {}, "egress": []}));
        let rules = derive(&[empty]);
        assert_eq!((rules.ingress, rules.egress), (Some(vec![]), None));
    }

    #[test]
    fn rules_of_a_direction_the_policy_types_leave_out_are_ignored() {
        let egress_only = policy(
            "default",
            "out",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]}),
        );
        let rules = derive(&[egress_only]);
        assert_eq!((rules.ingress, rules.egress), (None, Some(vec![])));
    }

    #[test]
    fn an_empty_rule_allows_everything_in_its_direction() {
        let open = policy(
            "default",
            "open",
            json!({"podSelector": {}, "ingress": [{}]}),
        );
        let rules = derive(&[open]);
        assert_eq!(
            rules.ingress,
            Some(vec![Rule {
                policy: "default/open".into(),
                peers: None,
                ports: None
            }])
        );
        let empty_lists = policy(
            "default",
            "open",
            json!({"podSelector": {}, "ingress": [{"from": [], "ports": []}]}),
        );
        assert_eq!(derive(&[empty_lists]), rules);
    }

    #[test]
    fn a_pod_selector_peer_selects_pods_of_the_policys_namespace() {
        let pods = [
            pod(
                "default",
                "client",
                json!({"role": "client"}),
                Some("10.212.0.6"),
            ),
            pod(
                "other",
                "client",
                json!({"role": "client"}),
                Some("10.212.0.7"),
            ),
            pod(
                "default",
                "server",
                json!({"role": "server"}),
                Some("10.212.0.8"),
            ),
        ];
        let allow = policy(
            "default",
            "from-clients",
            json!({"podSelector": {"matchLabels": {"app": "web"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]}),
        );
        let rules = derive_with(&[allow], &pods, &[]);
        assert_eq!(
            rules.ingress.unwrap()[0].peers,
            Some(vec![host("10.212.0.6")])
        );
    }

    #[test]
    fn allow_from_a_namespace() {
        let namespaces = [
            namespace("monitoring", json!({"team": "ops"})),
            namespace("default", json!({})),
        ];
        let pods = [
            pod(
                "monitoring",
                "prometheus",
                json!({"app": "prometheus"}),
                Some("10.212.0.9"),
            ),
            pod("monitoring", "grafana", json!({}), Some("10.212.0.10")),
            pod("default", "client", json!({}), Some("10.212.0.11")),
        ];
        let allow = policy(
            "default",
            "from-ops",
            json!({"podSelector": {},
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "ops"}}}]}]}),
        );
        let rules = derive_with(&[allow], &pods, &namespaces);
        assert_eq!(
            rules.ingress.unwrap()[0].peers,
            Some(vec![host("10.212.0.9"), host("10.212.0.10")])
        );
    }

    #[test]
    fn pod_and_namespace_selectors_together_select_matching_pods_in_matching_namespaces() {
        let namespaces = [namespace("monitoring", json!({"team": "ops"}))];
        let pods = [
            pod(
                "monitoring",
                "prometheus",
                json!({"app": "prometheus"}),
                Some("10.212.0.9"),
            ),
            pod("monitoring", "grafana", json!({}), Some("10.212.0.10")),
            pod(
                "default",
                "prometheus",
                json!({"app": "prometheus"}),
                Some("10.212.0.11"),
            ),
        ];
        let allow = policy(
            "default",
            "from-prometheus",
            json!({"podSelector": {}, "ingress": [{"from": [{
                "namespaceSelector": {"matchLabels": {"team": "ops"}},
                "podSelector": {"matchLabels": {"app": "prometheus"}},
            }]}]}),
        );
        let rules = derive_with(&[allow], &pods, &namespaces);
        assert_eq!(
            rules.ingress.unwrap()[0].peers,
            Some(vec![host("10.212.0.9")])
        );
    }

    #[test]
    fn namespaces_carry_their_name_label_even_when_not_listed() {
        let pods = [
            pod(
                "kube-system",
                "coredns",
                json!({"k8s-app": "kube-dns"}),
                Some("10.212.0.12"),
            ),
            pod("default", "client", json!({}), Some("10.212.0.13")),
        ];
        let dns = policy(
            "default",
            "dns",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"to": [{
                "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: "kube-system"}},
            }]}]}),
        );
        let rules = derive_with(&[dns], &pods, &[]);
        assert_eq!(
            rules.egress.unwrap()[0].peers,
            Some(vec![host("10.212.0.12")])
        );
        // An empty namespace selector is every namespace.
        let all = policy(
            "default",
            "all",
            json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]}),
        );
        let rules = derive_with(&[all], &pods, &[namespace("default", json!({}))]);
        assert_eq!(
            rules.ingress.unwrap()[0].peers,
            Some(vec![host("10.212.0.12"), host("10.212.0.13")])
        );
    }

    #[test]
    fn only_running_pods_with_an_ipv4_address_in_the_pod_network_are_peers() {
        let mut done = pod("default", "done", json!({}), Some("10.212.0.20"));
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut failed = pod("default", "failed", json!({}), Some("10.212.0.21"));
        failed.status.as_mut().unwrap().phase = Some("Failed".into());
        let pending = pod("default", "pending", json!({}), None);
        let mut host_net = pod("default", "host", json!({}), Some("10.212.0.1"));
        host_net.spec.as_mut().unwrap().host_network = Some(true);
        let v6 = pod("default", "v6", json!({}), Some("fd00::5"));
        let mut terminating = pod("default", "terminating", json!({}), Some("10.212.0.22"));
        terminating.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let mut old_status = pod("default", "old", json!({}), None);
        old_status.status.as_mut().unwrap().pod_ip = Some("10.212.0.23".into());
        let pods = [done, failed, pending, host_net, v6, terminating, old_status];
        let allow = policy(
            "default",
            "same-namespace",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
        );
        let rules = derive_with(&[allow], &pods, &[]);
        assert_eq!(
            rules.ingress.unwrap()[0].peers,
            Some(vec![host("10.212.0.22"), host("10.212.0.23")])
        );
    }

    #[test]
    fn selectors_that_select_no_pod_allow_nothing() {
        let allow = policy(
            "default",
            "nobody",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"x": "y"}}}]}]}),
        );
        assert_eq!(derive(&[allow]).ingress, Some(vec![]));
    }

    #[test]
    fn match_expressions_with_every_operator() {
        let pods = [
            pod(
                "default",
                "a",
                json!({"tier": "front", "canary": "yes"}),
                Some("10.212.0.30"),
            ),
            pod("default", "b", json!({"tier": "back"}), Some("10.212.0.31")),
            pod(
                "default",
                "c",
                json!({"tier": "cache", "env": "prod"}),
                Some("10.212.0.32"),
            ),
            pod("default", "d", json!({}), Some("10.212.0.33")),
        ];
        let select = |expressions: serde_json::Value| {
            let allow = policy(
                "default",
                "expr",
                json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchExpressions": expressions}}]}]}),
            );
            let rules = derive_with(&[allow], &pods, &[]);
            let peers = rules.ingress.unwrap().first().and_then(|r| r.peers.clone());
            peers
                .unwrap_or_default()
                .into_iter()
                .map(|p| p.cidr.network().octets()[3])
                .collect::<Vec<_>>()
        };
        assert_eq!(
            select(json!([{"key": "tier", "operator": "In", "values": ["front", "back"]}])),
            [30, 31]
        );
        assert_eq!(
            select(json!([{"key": "tier", "operator": "NotIn", "values": ["front", "back"]}])),
            [32, 33]
        );
        assert_eq!(select(json!([{"key": "env", "operator": "Exists"}])), [32]);
        assert_eq!(
            select(json!([{"key": "tier", "operator": "Exists"},
                          {"key": "canary", "operator": "DoesNotExist"}])),
            [31, 32]
        );
        // matchLabels and matchExpressions must both hold.
        let both = policy(
            "default",
            "both",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {
                "matchLabels": {"tier": "front"},
                "matchExpressions": [{"key": "canary", "operator": "In", "values": ["yes"]}],
            }}]}]}),
        );
        let rules = derive_with(&[both], &pods, &[]);
        assert_eq!(
            rules.ingress.unwrap()[0].peers,
            Some(vec![host("10.212.0.30")])
        );
    }

    #[test]
    fn ip_block_with_except() {
        let allow = policy(
            "default",
            "block",
            json!({"podSelector": {}, "ingress": [{"from": [
                {"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}},
                {"ipBlock": {"cidr": "2001:db8::/64"}},
            ]}]}),
        );
        let rules = derive(&[allow]);
        assert_eq!(
            rules.ingress.unwrap()[0].peers,
            Some(vec![block("172.17.0.0/16", &["172.17.1.0/24"])])
        );
        // A rule whose only peers are IPv6 blocks allows nothing over IPv4.
        let v6 = policy(
            "default",
            "v6",
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "2001:db8::/64"}}]}]}),
        );
        assert_eq!(derive(&[v6]).ingress, Some(vec![]));
    }

    #[test]
    fn ports_by_number_range_and_protocol() {
        let allow = policy(
            "default",
            "ports",
            json!({"podSelector": {}, "ingress": [{"ports": [
                {"port": 80},
                {"port": 32000, "endPort": 32767},
                {"protocol": "UDP", "port": 53},
                {"protocol": "SCTP"},
            ]}]}),
        );
        let rules = derive(&[allow]);
        let rule = &rules.ingress.unwrap()[0];
        assert_eq!(rule.peers, None);
        assert_eq!(
            rule.ports,
            Some(vec![
                tcp(80),
                PortRule {
                    protocol: Protocol::Tcp,
                    port: Some(32000),
                    end_port: Some(32767)
                },
                PortRule {
                    protocol: Protocol::Udp,
                    port: Some(53),
                    end_port: None
                },
                PortRule {
                    protocol: Protocol::Sctp,
                    port: None,
                    end_port: None
                },
            ])
        );
    }

    #[test]
    fn an_ingress_named_port_is_the_pods_own_port_of_that_name_and_protocol() {
        let allow = policy(
            "default",
            "named",
            json!({"podSelector": {}, "ingress": [{"ports": [
                {"port": "http"},
                {"port": "dns", "protocol": "UDP"},
                {"port": "metrics"},
                {"port": 9000},
            ]}]}),
        );
        let rules = derive(&[allow]);
        assert_eq!(
            rules.ingress.unwrap()[0].ports,
            Some(vec![
                tcp(8080),
                tcp(9000),
                PortRule {
                    protocol: Protocol::Udp,
                    port: Some(5353),
                    end_port: None
                }
            ])
        );
        // A name the pod does not have (or not with that protocol) allows nothing.
        let missing = policy(
            "default",
            "missing",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": "metrics"}, {"port": "dns"}]}]}),
        );
        assert_eq!(derive(&[missing]).ingress, Some(vec![]));
    }

    #[test]
    fn sidecar_ports_resolve_names_too() {
        let mut target = web();
        let spec = target.spec.as_mut().unwrap();
        spec.init_containers = Some(vec![
            serde_json::from_value(json!({
                "name": "proxy", "image": "envoy", "restartPolicy": "Always",
                "ports": [{"name": "admin", "containerPort": 9901}],
            }))
            .unwrap(),
        ]);
        let allow = policy(
            "default",
            "admin",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": "admin"}]}]}),
        );
        let (rules, problems) = pod_policy(&target, &[allow], &[], &[]);
        assert!(problems.is_empty());
        assert_eq!(rules.ingress.unwrap()[0].ports, Some(vec![tcp(9901)]));
    }

    #[test]
    fn an_egress_named_port_resolves_per_destination_pod() {
        let pods = [
            pod_with(
                "default",
                "db-1",
                json!({"app": "db"}),
                Some("10.212.0.40"),
                json!([{"name": "sql", "containerPort": 5432}]),
            ),
            pod_with(
                "default",
                "db-2",
                json!({"app": "db"}),
                Some("10.212.0.41"),
                json!([{"name": "sql", "containerPort": 5432}]),
            ),
            pod_with(
                "default",
                "db-old",
                json!({"app": "db"}),
                Some("10.212.0.42"),
                json!([{"name": "sql", "containerPort": 3306}]),
            ),
            pod_with(
                "default",
                "db-none",
                json!({"app": "db"}),
                Some("10.212.0.43"),
                json!([{"name": "other", "containerPort": 1}]),
            ),
            pod_with(
                "default",
                "cache",
                json!({"app": "cache"}),
                Some("10.212.0.44"),
                json!([{"name": "sql", "containerPort": 6000}]),
            ),
        ];
        let to_db = policy(
            "default",
            "to-db",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
                "to": [{"podSelector": {"matchLabels": {"app": "db"}}}],
                "ports": [{"port": "sql"}, {"port": 443}],
            }]}),
        );
        let rules = derive_with(&[to_db], &pods, &[]);
        let egress = rules.egress.unwrap();
        assert_eq!(egress.len(), 3, "{egress:?}");
        // The numbered ports go to every selected pod.
        assert_eq!(
            egress[0].peers,
            Some(vec![
                host("10.212.0.40"),
                host("10.212.0.41"),
                host("10.212.0.42"),
                host("10.212.0.43")
            ])
        );
        assert_eq!(egress[0].ports, Some(vec![tcp(443)]));
        // The name: each pod on its own number, pods with the same number in one rule.
        assert_eq!(egress[1].peers, Some(vec![host("10.212.0.42")]));
        assert_eq!(egress[1].ports, Some(vec![tcp(3306)]));
        assert_eq!(
            egress[2].peers,
            Some(vec![host("10.212.0.40"), host("10.212.0.41")])
        );
        assert_eq!(egress[2].ports, Some(vec![tcp(5432)]));
    }

    #[test]
    fn an_egress_named_port_to_any_peer_or_a_block_covers_the_pods_there() {
        let pods = [
            pod_with(
                "default",
                "a",
                json!({}),
                Some("10.212.0.50"),
                json!([{"name": "http", "containerPort": 80}]),
            ),
            pod_with(
                "other",
                "b",
                json!({}),
                Some("10.213.0.51"),
                json!([{"name": "http", "containerPort": 80}]),
            ),
            pod_with(
                "other",
                "c",
                json!({}),
                Some("10.213.1.52"),
                json!([{"name": "http", "containerPort": 80}]),
            ),
        ];
        let anywhere = policy(
            "default",
            "http-anywhere",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "http"}]}]}),
        );
        let rules = derive_with(&[anywhere], &pods, &[]);
        assert_eq!(
            rules.egress.unwrap(),
            [Rule {
                policy: "default/http-anywhere".into(),
                peers: Some(vec![
                    host("10.212.0.50"),
                    host("10.213.0.51"),
                    host("10.213.1.52")
                ]),
                ports: Some(vec![tcp(80)]),
            }]
        );
        let in_block = policy(
            "default",
            "http-block",
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
                "to": [{"ipBlock": {"cidr": "10.213.0.0/16", "except": ["10.213.1.0/24"]}}],
                "ports": [{"port": "http"}],
            }]}),
        );
        let rules = derive_with(&[in_block], &pods, &[]);
        let egress = rules.egress.unwrap();
        assert_eq!(egress.len(), 1, "{egress:?}");
        assert_eq!(egress[0].peers, Some(vec![host("10.213.0.51")]));
    }

    #[test]
    fn policies_are_additive() {
        let pods = [pod(
            "default",
            "client",
            json!({"role": "client"}),
            Some("10.212.0.60"),
        )];
        let deny = policy("default", "a-deny", json!({"podSelector": {}}));
        let clients = policy(
            "default",
            "b-clients",
            json!({"podSelector": {"matchLabels": {"app": "web"}},
                   "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "ports": [{"port": 8080}]}]}),
        );
        let metrics = policy(
            "default",
            "c-metrics",
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 9090}]}],
                   "egress": [{}], "policyTypes": ["Ingress", "Egress"]}),
        );
        let rules = derive_with(&[metrics, deny, clients], &pods, &[]);
        let ingress = rules.ingress.unwrap();
        let from: Vec<&str> = ingress.iter().map(|r| r.policy.as_str()).collect();
        assert_eq!(from, ["default/b-clients", "default/c-metrics"]);
        assert_eq!(ingress[0].ports, Some(vec![tcp(8080)]));
        assert_eq!(ingress[1].peers, Some(vec![block("10.0.0.0/8", &[])]));
        assert_eq!(rules.egress.unwrap()[0].peers, None);
    }

    #[test]
    fn the_same_inputs_give_the_same_table() {
        let pods = [
            pod("default", "b", json!({}), Some("10.212.0.71")),
            pod("default", "a", json!({}), Some("10.212.0.70")),
        ];
        let allow = policy(
            "default",
            "p",
            json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
        );
        let mut reversed = pods.clone();
        reversed.reverse();
        assert_eq!(
            derive_with(std::slice::from_ref(&allow), &pods, &[]),
            derive_with(&[allow], &reversed, &[])
        );
    }

    /// Derives for `web()` and returns the rules and the problems.
    fn derive_bad(spec: serde_json::Value) -> (PolicyRules, Vec<String>) {
        let good = policy(
            "default",
            "good",
            json!({"podSelector": {}, "ingress": [{"ports": [{"port": 22}]}]}),
        );
        pod_policy(&web(), &[policy("default", "bad", spec), good], &[], &[])
    }

    #[test]
    fn an_invalid_cidr_skips_its_rule_and_names_the_field() {
        let (rules, problems) = derive_bad(json!({"podSelector": {}, "ingress": [
            {"from": [{"ipBlock": {"cidr": "10.0.0/8"}}]},
            {"ports": [{"port": 443}]},
        ]}));
        assert_eq!(
            problems,
            [
                "networkpolicy default/bad: spec.ingress[0].from[0].ipBlock.cidr: \"10.0.0\" is not an IPv4 address; this rule is skipped"
            ]
        );
        // The other rules, of this policy and of others, stay.
        let ingress = rules.ingress.unwrap();
        assert_eq!(ingress.len(), 2);
        assert_eq!(ingress[0].ports, Some(vec![tcp(443)]));
        assert_eq!(ingress[1].ports, Some(vec![tcp(22)]));
    }

    #[test]
    fn an_except_outside_its_block_skips_the_rule() {
        let (_, problems) = derive_bad(json!({"podSelector": {}, "ingress": [
            {"from": [{"ipBlock": {"cidr": "10.1.0.0/16", "except": ["10.2.0.0/24"]}}]},
        ]}));
        assert_eq!(
            problems,
            [
                "networkpolicy default/bad: spec.ingress[0].from[0].ipBlock.except[0]: 10.2.0.0/24 is outside the block 10.1.0.0/16; this rule is skipped"
            ]
        );
    }

    #[test]
    fn an_unknown_protocol_skips_the_rule() {
        let (rules, problems) = derive_bad(
            json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [
                {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 80, "protocol": "QUIC"}]},
            ]}),
        );
        assert_eq!(
            problems,
            [
                "networkpolicy default/bad: spec.egress[0].ports[1].protocol: \"QUIC\" is not TCP, UDP or SCTP; this rule is skipped"
            ]
        );
        // Egress is isolated with nothing allowed: the bad rule is not narrowed to its UDP port.
        assert_eq!(rules.egress, Some(vec![]));
    }

    #[test]
    fn an_unknown_operator_skips_the_rule() {
        let (_, problems) = derive_bad(json!({"podSelector": {}, "ingress": [
            {"from": [{"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "Like", "values": ["b"]}]}}]},
        ]}));
        assert_eq!(
            problems,
            [
                "networkpolicy default/bad: spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].operator: \"Like\" is not In, NotIn, Exists or DoesNotExist; this rule is skipped"
            ]
        );
        let (_, problems) = derive_bad(json!({"podSelector": {}, "ingress": [
            {"from": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}]},
        ]}));
        assert_eq!(
            problems,
            [
                "networkpolicy default/bad: spec.ingress[0].from[0].podSelector.matchExpressions[0].values: In takes values; this rule is skipped"
            ]
        );
    }

    #[test]
    fn bad_ports_skip_the_rule() {
        for (port, why) in [
            (
                json!({"port": 0}),
                "ports[0].port: 0 is not a port (1-65535)",
            ),
            (
                json!({"port": 70000}),
                "ports[0].port: 70000 is not a port (1-65535)",
            ),
            (
                json!({"port": 90, "endPort": 80}),
                "ports[0].endPort: 80 is not a port from 90 to 65535",
            ),
            (
                json!({"endPort": 80}),
                "ports[0].endPort: needs a numeric port",
            ),
            (
                json!({"port": "http", "endPort": 9000}),
                "ports[0].endPort: cannot be used with a named port",
            ),
        ] {
            let (_, problems) =
                derive_bad(json!({"podSelector": {}, "ingress": [{"ports": [port]}]}));
            assert_eq!(
                problems,
                [format!(
                    "networkpolicy default/bad: spec.ingress[0].{why}; this rule is skipped"
                )]
            );
        }
    }

    #[test]
    fn peers_with_no_field_or_ip_block_beside_a_selector_skip_the_rule() {
        let (_, problems) = derive_bad(json!({"podSelector": {}, "ingress": [
            {"from": [{}]},
            {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]},
        ]}));
        assert_eq!(
            problems,
            [
                "networkpolicy default/bad: spec.ingress[0].from[0]: sets none of podSelector, namespaceSelector and ipBlock; this rule is skipped",
                "networkpolicy default/bad: spec.ingress[1].from[0]: ipBlock cannot be combined with podSelector or namespaceSelector; this rule is skipped",
            ]
        );
    }

    #[test]
    fn an_unreadable_pod_selector_isolates_with_none_of_the_policys_rules() {
        let (rules, problems) = pod_policy(
            &web(),
            &[policy(
                "default",
                "bad",
                json!({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Maybe"}]},
                       "policyTypes": ["Ingress", "Egress"], "ingress": [{}], "egress": [{}]}),
            )],
            &[],
            &[],
        );
        assert_eq!(
            problems,
            [
                "networkpolicy default/bad: spec.podSelector.matchExpressions[0].operator: \"Maybe\" is not In, NotIn, Exists or DoesNotExist; the pod is isolated for the policy's types with none of its rules"
            ]
        );
        assert_eq!((rules.ingress, rules.egress), (Some(vec![]), Some(vec![])));
    }

    #[test]
    fn an_unknown_policy_type_is_ignored() {
        let (rules, problems) =
            derive_bad(json!({"podSelector": {}, "policyTypes": ["Egress", "Sideways"]}));
        assert_eq!(
            problems,
            [
                "networkpolicy default/bad: spec.policyTypes[1]: \"Sideways\" is neither Ingress nor Egress; ignored"
            ]
        );
        assert_eq!(rules.egress, Some(vec![]));
    }

    #[test]
    fn a_host_network_pod_is_not_isolated_and_the_policy_is_named() {
        let mut target = web();
        target.spec.as_mut().unwrap().host_network = Some(true);
        let deny = policy("default", "deny", json!({"podSelector": {}}));
        let other = policy(
            "default",
            "db",
            json!({"podSelector": {"matchLabels": {"app": "db"}}}),
        );
        let (rules, problems) = pod_policy(&target, &[deny, other], &[], &[]);
        assert_eq!(rules, PolicyRules::default());
        assert_eq!(
            problems,
            [
                "networkpolicy default/deny selects the pod, which uses hostNetwork: policies are not enforced for host-network pods"
            ]
        );
    }
}
