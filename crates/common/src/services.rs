//! The Service routes of a pod that runs off the cluster's nodes: what the node derives from
//! Services and EndpointSlices and a provider installs where the pod runs (the cells provider
//! pushes them to each agent, `PUT /v1/services`), so that the pod reaches ClusterIP Services
//! the way kube-proxy would route it on a kubelet node.
//!
//! The provider resolves everything Kubernetes-specific before it sends the table: named
//! target ports are already numbers (EndpointSlices carry resolved ports), only the endpoints
//! a new connection may use are listed (ready ones, or serving-and-terminating ones when none
//! is ready, as kube-proxy falls back), `internalTrafficPolicy: Local` is applied, and
//! headless and `ExternalName` Services have no route (they are DNS only). The agent turns
//! the table into packet-filter rules (crate `updraft-cell-proxy`) and replaces its rules with each table it is sent.
//!
//! Invariant: the table is always whole. An agent that missed updates (it was unreachable, or
//! restarted) is sent the current table and ends in the same state as one that saw every
//! change; `version` only tells the provider which table an agent has applied.

use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Deserialize, Serialize};

/// Every Service route of a pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRoutes {
    /// Grows with every table the provider builds; the agent reports the one it applied.
    pub version: u64,
    /// One entry per Service IP, protocol and port.
    pub routes: Vec<ServiceRoute>,
}

/// How connections to one Service port are routed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRoute {
    /// `namespace/name:port` (the port's name, or its number when unnamed), for logs and the
    /// rules' comments.
    pub service: String,
    /// The Service's cluster IP.
    pub cluster_ip: Ipv4Addr,
    /// The port's protocol.
    pub protocol: Protocol,
    /// The Service port.
    pub port: u16,
    /// Where new connections go; empty: connections are refused at once (not dropped).
    pub endpoints: Vec<SocketAddrV4>,
    /// `sessionAffinity: ClientIP`: how long a client sticks to the endpoint it was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_seconds: Option<u32>,
}

/// A Service port's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP.
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
    /// SCTP.
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// The Kubernetes name (`TCP`, `UDP`, `SCTP`); `None` for anything else.
    pub fn from_kubernetes(name: &str) -> Option<Protocol> {
        match name {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// What the agent answers to `PUT /v1/services` and `GET /v1/services`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRoutesStatus {
    /// The version of the table in force (0: none applied yet).
    pub applied_version: u64,
    /// Routes of that table the agent could not install, each naming the route and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_wire_form_is_camel_case_with_kubernetes_protocol_names() {
        let routes = ServiceRoutes {
            version: 7,
            routes: vec![ServiceRoute {
                service: "default/web:http".into(),
                cluster_ip: Ipv4Addr::new(10, 96, 0, 20),
                protocol: Protocol::Tcp,
                port: 80,
                endpoints: vec![SocketAddrV4::new(Ipv4Addr::new(10, 212, 0, 5), 8080)],
                affinity_timeout_seconds: Some(10800),
            }],
        };
        let json = serde_json::to_value(&routes).unwrap();
        assert_eq!(json["routes"][0]["clusterIp"], "10.96.0.20");
        assert_eq!(json["routes"][0]["protocol"], "TCP");
        assert_eq!(json["routes"][0]["endpoints"][0], "10.212.0.5:8080");
        assert_eq!(json["routes"][0]["affinityTimeoutSeconds"], 10800);
        let back: ServiceRoutes = serde_json::from_value(json).unwrap();
        assert_eq!(back, routes);
    }

    #[test]
    fn protocols_by_their_kubernetes_names() {
        assert_eq!(Protocol::from_kubernetes("UDP"), Some(Protocol::Udp));
        assert_eq!(Protocol::from_kubernetes("udp"), None);
    }
}
