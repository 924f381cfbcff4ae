//! The NetworkPolicy of a pod that runs off the cluster's nodes: what the node derives from
//! NetworkPolicies, pods and namespaces, and a provider installs where the pod runs (the cells
//! provider pushes it to the pod's agent), so that the pod is isolated the way a network plugin
//! would isolate it on a kubelet node.
//!
//! The node resolves everything Kubernetes-specific before it sends the table, so the cell sees
//! only addresses and port numbers:
//! - pod and namespace selectors become the selected pods' IPv4 addresses, each a `/32`
//!   [`Peer`]; `ipBlock`s become a [`Peer`] with its `except` blocks;
//! - named ports become numbers: for ingress, the name is looked up in the pod's own container
//!   ports; for egress it names a port of the *destination* pod, which can differ from pod to
//!   pod, so the node emits one [`Rule`] per resolved number, whose peers are the pods that
//!   have the name on that number (see `updraft_node::network_policy`);
//! - `policyTypes` is applied and the policies selecting the pod are merged (they are
//!   additive), so a direction is either not isolated or isolated with the union of the
//!   rules that allow traffic.
//!
//! Invariant: the table is always whole. It is the complete policy of one pod, never a
//! change; an agent that missed updates (it was unreachable, or restarted) is sent the current
//! table and ends in the same state as one that saw every change; `version` only tells the
//! provider which table an agent has applied.
//!
//! Meaning of the options, the same on the wire (`null` or absent, or a list):
//! - [`PolicyRules::ingress`] / [`PolicyRules::egress`]: `None` = no policy selects the pod for
//!   that direction, everything is allowed; `Some(rules)` = isolated, only what one of the
//!   rules allows (`Some(vec![])` is default deny);
//! - [`Rule::peers`]: `None` = any peer; `Some` = one of these (an empty list allows nothing);
//! - [`Rule::ports`]: `None` = any port of any protocol; `Some` = one of these (an empty list
//!   allows nothing).
//!
//! Only IPv4 is carried: the cells' network is IPv4. An installer therefore lets IPv6 through an
//! isolated direction only where a rule allows any peer (and on loopback).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use crate::services::Protocol;

/// The whole NetworkPolicy of one pod, as the provider sends it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodPolicy {
    /// Grows with every table the provider builds; the agent reports the one it applied.
    pub version: u64,
    /// What is allowed in each direction.
    #[serde(flatten)]
    pub rules: PolicyRules,
}

/// What a pod may receive and send (see the module docs for `None` against `Some`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRules {
    /// Traffic to the pod: `None` = not isolated; `Some` = only what a rule allows.
    pub ingress: Option<Vec<Rule>>,
    /// Traffic from the pod: `None` = not isolated; `Some` = only what a rule allows.
    pub egress: Option<Vec<Rule>>,
}

impl PolicyRules {
    /// Whether any direction is isolated (some policy selects the pod).
    pub fn is_isolated(&self) -> bool {
        self.ingress.is_some() || self.egress.is_some()
    }
}

/// Traffic one rule allows: from (ingress) or to (egress) one of `peers`, on one of `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// The NetworkPolicy the rule comes from, `namespace/name`, for logs and rule comments.
    pub policy: String,
    /// `None`: any peer (IPv6 included); else the addresses, one of which must match.
    pub peers: Option<Vec<Peer>>,
    /// `None`: any port of any protocol; else the ports, one of which must match.
    pub ports: Option<Vec<PortRule>>,
}

/// Addresses a rule allows: `cidr` without the `except` blocks (each inside `cidr`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    /// The block; a pod is its address as a `/32`.
    pub cidr: Ipv4Cidr,
    /// Blocks inside `cidr` that are not allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<Ipv4Cidr>,
}

impl Peer {
    /// One address (a pod), nothing excepted.
    pub fn host(address: Ipv4Addr) -> Peer {
        Peer {
            cidr: Ipv4Cidr::host(address),
            except: Vec::new(),
        }
    }
}

/// Destination ports a rule allows, on one protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRule {
    /// The protocol.
    pub protocol: Protocol,
    /// The port, or the first of the range; `None`: every port of `protocol`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The last port of the range `port..=end_port`; only with `port`, never below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
}

/// What the agent answers when it is sent a [`PodPolicy`] or asked for the one in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodPolicyStatus {
    /// The version of the table in force (0: none applied yet).
    pub applied_version: u64,
    /// Rules of that table the agent could not install, each naming the rule and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// An IPv4 block, `address/prefix`.
///
/// Invariant: the prefix is at most 32 and the host bits of the network address are zero
/// (parsing `10.1.2.3/8` gives `10.0.0.0/8`, as Go's `net.ParseCIDR`, which Kubernetes
/// validates `ipBlock`s with, does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// Why a text is not an IPv4 block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// No `/prefix`.
    #[error("{0:?} is not address/prefix")]
    Format(String),
    /// The address part is no IPv4 address.
    #[error("{0:?} is not an IPv4 address")]
    Address(String),
    /// The prefix is no number from 0 to 32.
    #[error("prefix {0:?} is not a number from 0 to 32")]
    Prefix(String),
    /// A valid IPv6 block, which this type cannot hold.
    #[error("{0:?} is an IPv6 block")]
    Ipv6(String),
}

impl Ipv4Cidr {
    /// The block of `address` with `prefix_len` bits (host bits cleared); `None` when
    /// `prefix_len` is above 32.
    pub fn new(address: Ipv4Addr, prefix_len: u8) -> Option<Ipv4Cidr> {
        (prefix_len <= 32).then(|| Ipv4Cidr {
            network: Ipv4Addr::from(u32::from(address) & mask(prefix_len)),
            prefix_len,
        })
    }

    /// `address/32`.
    pub fn host(address: Ipv4Addr) -> Ipv4Cidr {
        Ipv4Cidr {
            network: address,
            prefix_len: 32,
        }
    }

    /// The network address (host bits zero).
    pub fn network(self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length, 0 to 32.
    pub fn prefix_len(self) -> u8 {
        self.prefix_len
    }

    /// The first and the last address of the block.
    pub fn range(self) -> (Ipv4Addr, Ipv4Addr) {
        let first = u32::from(self.network);
        (self.network, Ipv4Addr::from(first | !mask(self.prefix_len)))
    }

    /// Whether `address` lies in the block.
    pub fn contains(self, address: Ipv4Addr) -> bool {
        u32::from(address) & mask(self.prefix_len) == u32::from(self.network)
    }

    /// Whether `other` lies wholly in this block.
    pub fn contains_cidr(self, other: Ipv4Cidr) -> bool {
        other.prefix_len >= self.prefix_len && self.contains(other.network)
    }
}

fn mask(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Ipv4Cidr, CidrError> {
        let (address, prefix) = text
            .split_once('/')
            .ok_or_else(|| CidrError::Format(text.to_owned()))?;
        let prefix_len: Option<u8> = prefix
            .parse()
            .ok()
            .filter(|_| prefix.bytes().all(|b| b.is_ascii_digit()));
        let Ok(ip) = address.parse::<Ipv4Addr>() else {
            if address.parse::<Ipv6Addr>().is_ok() && prefix_len.is_some_and(|p| p <= 128) {
                return Err(CidrError::Ipv6(text.to_owned()));
            }
            return Err(CidrError::Address(address.to_owned()));
        };
        prefix_len
            .and_then(|p| Ipv4Cidr::new(ip, p))
            .ok_or_else(|| CidrError::Prefix(prefix.to_owned()))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl TryFrom<String> for Ipv4Cidr {
    type Error = CidrError;

    fn try_from(text: String) -> Result<Ipv4Cidr, CidrError> {
        text.parse()
    }
}

impl From<Ipv4Cidr> for String {
    fn from(cidr: Ipv4Cidr) -> String {
        cidr.to_string()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cidr(text: &str) -> Ipv4Cidr {
        text.parse().unwrap()
    }

    #[test]
    fn the_wire_form_is_camel_case_and_keeps_none_apart_from_empty() {
        let policy = PodPolicy {
            version: 3,
            rules: PolicyRules {
                ingress: Some(vec![Rule {
                    policy: "default/allow-web".into(),
                    peers: Some(vec![Peer {
                        cidr: cidr("10.0.0.0/8"),
                        except: vec![cidr("10.1.0.0/16")],
                    }]),
                    ports: Some(vec![PortRule {
                        protocol: Protocol::Tcp,
                        port: Some(8000),
                        end_port: Some(8080),
                    }]),
                }]),
                egress: Some(vec![]),
            },
        };
        let json = serde_json::to_value(&policy).unwrap();
        assert_eq!(json["version"], 3);
        let rule = &json["ingress"][0];
        assert_eq!(rule["policy"], "default/allow-web");
        assert_eq!(rule["peers"][0]["cidr"], "10.0.0.0/8");
        assert_eq!(rule["peers"][0]["except"][0], "10.1.0.0/16");
        assert_eq!(rule["ports"][0]["protocol"], "TCP");
        assert_eq!(rule["ports"][0]["endPort"], 8080);
        assert_eq!(json["egress"], serde_json::json!([]));
        assert_eq!(serde_json::from_value::<PodPolicy>(json).unwrap(), policy);

        let open = serde_json::to_value(PodPolicy::default()).unwrap();
        assert_eq!(
            open,
            serde_json::json!({"version": 0, "ingress": null, "egress": null})
        );
        let absent: PodPolicy = serde_json::from_str(r#"{"version": 1}"#).unwrap();
        assert!(!absent.rules.is_isolated());
    }

    #[test]
    fn any_peer_and_any_port_are_null_on_the_wire() {
        let rule = Rule {
            policy: "a/b".into(),
            peers: None,
            ports: None,
        };
        let json = serde_json::to_value(&rule).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"policy": "a/b", "peers": null, "ports": null})
        );
    }

    #[test]
    fn a_block_is_kept_canonical() {
        assert_eq!(cidr("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("0.0.0.0/0").range().1, Ipv4Addr::BROADCAST);
        assert_eq!(
            cidr("10.250.1.0/24").range(),
            (Ipv4Addr::new(10, 250, 1, 0), Ipv4Addr::new(10, 250, 1, 255))
        );
        assert_eq!(
            Ipv4Cidr::host(Ipv4Addr::new(10, 0, 0, 1)).to_string(),
            "10.0.0.1/32"
        );
        assert!(Ipv4Cidr::new(Ipv4Addr::LOCALHOST, 33).is_none());
    }

    #[test]
    fn containment() {
        let block = cidr("10.250.0.0/16");
        assert!(block.contains(Ipv4Addr::new(10, 250, 7, 1)));
        assert!(!block.contains(Ipv4Addr::new(10, 251, 0, 1)));
        assert!(block.contains_cidr(cidr("10.250.3.0/24")));
        assert!(block.contains_cidr(block));
        assert!(!block.contains_cidr(cidr("10.0.0.0/8")));
        assert!(cidr("0.0.0.0/0").contains_cidr(block));
    }

    #[test]
    fn what_is_no_ipv4_block_says_why() {
        assert_eq!(
            "10.0.0.0".parse::<Ipv4Cidr>(),
            Err(CidrError::Format("10.0.0.0".into()))
        );
        assert_eq!(
            "10.0.0/8".parse::<Ipv4Cidr>(),
            Err(CidrError::Address("10.0.0".into()))
        );
        assert_eq!(
            "10.0.0.0/33".parse::<Ipv4Cidr>(),
            Err(CidrError::Prefix("33".into()))
        );
        assert_eq!(
            "10.0.0.0/+8".parse::<Ipv4Cidr>(),
            Err(CidrError::Prefix("+8".into()))
        );
        assert_eq!(
            "2001:db8::/64".parse::<Ipv4Cidr>(),
            Err(CidrError::Ipv6("2001:db8::/64".into()))
        );
        assert!(serde_json::from_str::<Ipv4Cidr>("\"10.0.0.0/40\"").is_err());
    }

    #[test]
    fn the_status_leaves_out_no_problems() {
        let json = serde_json::to_value(PodPolicyStatus {
            applied_version: 2,
            problems: vec![],
        })
        .unwrap();
        assert_eq!(json, serde_json::json!({"appliedVersion": 2}));
    }
}
