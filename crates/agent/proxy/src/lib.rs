//! The kube-proxy role on a cell: routes a pod's connections to ClusterIP Services; and the
//! network-policy role: enforces the pod's NetworkPolicy ([`policy`], its own table
//! `inet updraft-policy`).
//!
//! A pod on a kubelet node reaches a Service because kube-proxy rewrote the node's packet
//! filter. A cell has no kube-proxy, so the agent does the same in the pod's own network
//! namespace: [`render`] turns the provider's [`ServiceRoutes`] into one nftables table
//! (the model is kube-proxy's nftables mode), and [`Nft::apply`] replaces the namespace's table
//! with it in one `nft -f` transaction, so a connection never sees half a table.
//!
//! # The rules
//! All in table `ip updraft-proxy`, for traffic the pod itself sends (hook `output`: the pod's
//! processes are local to its namespace, nothing is forwarded through it):
//! - `nat-output` looks the destination up in the verdict map `service-ips`
//!   (`ip daddr . meta l4proto . th dport`) and jumps to the Service port's chain;
//! - `svc-N` sends a client that has an affinity entry to its endpoint, then picks one of the
//!   endpoints at random (`numgen random mod K`);
//! - `ep-N-M` records the client in the endpoint's affinity set (ClientIP affinity only) and
//!   DNATs to the endpoint;
//! - `filter-output` refuses connections to Service ports that have no endpoint, with a TCP
//!   reset or an ICMP port-unreachable, so the client fails at once instead of timing out.
//!
//! No masquerading is needed: the source stays the pod's own routable address, and a pod
//! that reaches itself through a Service is delivered locally. Connections already open keep
//! their translation when the table is replaced (conntrack holds it), so a change only
//! affects new connections; a replaced table starts with empty affinity sets.
#![forbid(unsafe_code)]

mod apply;
pub mod policy;
mod render;

pub use apply::{ApplyError, Nft, TABLE};
pub use render::{Ruleset, render};
pub use updraft_common::services::{Protocol, ServiceRoute, ServiceRoutes};
