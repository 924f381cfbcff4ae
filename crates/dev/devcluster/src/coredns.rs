//! The cluster DNS: CoreDNS with its `kubernetes` plugin, as `kube-dns` in `kube-system`.
//!
//! A real cluster runs CoreDNS as pods behind the `kube-dns` Service, and each kubelet points
//! its pods' resolvers at that Service's cluster IP (`--cluster-dns`). Here CoreDNS runs on
//! the host like the rest of the control plane, on the [`HOST_ADDRESS`] that cells reach;
//! `kube-dns` has the cluster IP [`CLUSTER_DNS_IP`] and no selector, and an EndpointSlice
//! this crate manages names the host address, so pods on cells reach it through their
//! Service rules exactly as they reach a CoreDNS pod. It answers for `cluster.local` (and the
//! reverse zones) from the API, with its own least-privilege identity; other names are
//! refused (there is no upstream to forward to here).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, Patch, PatchParams};

use crate::host_address::HOST_ADDRESS;
use crate::{Error, Layout, Result};

/// The cluster DNS Service's cluster IP (`--cluster-dns` of the nodes).
pub const CLUSTER_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The cluster domain (`--cluster-domain` of the nodes).
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The user name in CoreDNS's client certificate.
pub const COREDNS_USER: &str = "updraft-dev:coredns";
/// CoreDNS's `ready` endpoint on loopback (how `cluster up` sees that it serves).
pub const READY_PORT: u16 = 8181;
/// Field manager of what this module applies.
const MANAGER: &str = "updraft-devcluster";

/// Where CoreDNS's files live.
pub fn dir(layout: &Layout) -> PathBuf {
    layout.root().join("coredns")
}

/// CoreDNS's configuration file.
pub fn corefile_path(layout: &Layout) -> PathBuf {
    dir(layout).join("Corefile")
}

/// CoreDNS's kubeconfig.
pub fn kubeconfig_path(layout: &Layout) -> PathBuf {
    dir(layout).join("coredns.kubeconfig")
}

/// The Corefile: the cluster zone from the API on the host address, `ready` on loopback.
pub fn corefile(layout: &Layout) -> String {
    let kubeconfig = kubeconfig_path(layout).display().to_string();
    format!(
        "{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{\n\
         \x20   bind {HOST_ADDRESS}\n\
         \x20   errors\n\
         \x20   kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n\
         \x20       kubeconfig {kubeconfig}\n\
         \x20       pods insecure\n\
         \x20       fallthrough in-addr.arpa ip6.arpa\n\
         \x20   }}\n\
         \x20   cache 5\n\
         \x20   ready 127.0.0.1:{READY_PORT}\n\
         }}\n"
    )
}

/// Applies what CoreDNS needs in the API: its ClusterRole and binding (what the upstream
/// `system:coredns` role grants), and `kube-dns` with the EndpointSlice naming the host.
pub async fn bootstrap(client: &kube::Client) -> Result<()> {
    let params = PatchParams::apply(MANAGER).force();
    let role: ClusterRole = parse(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": COREDNS_USER},
        "rules": [
            {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
             "verbs": ["list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
             "verbs": ["list", "watch"]},
        ],
    }))?;
    Api::<ClusterRole>::all(client.clone())
        .patch(COREDNS_USER, &params, &Patch::Apply(&role))
        .await?;
    let binding: ClusterRoleBinding = parse(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": COREDNS_USER},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": COREDNS_USER},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": COREDNS_USER}],
    }))?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(COREDNS_USER, &params, &Patch::Apply(&binding))
        .await?;
    let service: Service = parse(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system",
                     "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}},
        "spec": {
            "clusterIP": CLUSTER_DNS_IP.to_string(),
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
            ],
        },
    }))?;
    Api::<Service>::namespaced(client.clone(), "kube-system")
        .patch("kube-dns", &params, &Patch::Apply(&service))
        .await?;
    let slice: EndpointSlice = parse(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "kube-dns-host", "namespace": "kube-system",
                     "labels": {"kubernetes.io/service-name": "kube-dns",
                                "endpointslice.kubernetes.io/managed-by": MANAGER}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [HOST_ADDRESS.to_string()], "conditions": {"ready": true}}],
        "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ],
    }))?;
    Api::<EndpointSlice>::namespaced(client.clone(), "kube-system")
        .patch("kube-dns-host", &params, &Patch::Apply(&slice))
        .await?;
    Ok(())
}

fn parse<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T> {
    serde_json::from_value(value).map_err(|e| Error::NotRunning {
        reason: format!("invalid built-in CoreDNS object: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_corefile_serves_the_cluster_zone_on_the_host_address_only() {
        let layout = Layout::new("/state");
        let text = corefile(&layout);
        assert!(
            text.starts_with("cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {\n"),
            "{text}"
        );
        assert!(text.contains("    bind 10.211.0.1\n"), "{text}");
        assert!(
            text.contains("        kubeconfig /state/coredns/coredns.kubeconfig\n"),
            "{text}"
        );
        assert!(text.contains("    ready 127.0.0.1:8181\n"), "{text}");
    }

    #[test]
    fn the_built_in_objects_parse() {
        let value = serde_json::json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "x"}, "spec": {"clusterIP": CLUSTER_DNS_IP.to_string()}});
        let service: Service = parse(value).unwrap_or_default();
        assert_eq!(
            service.spec.and_then(|s| s.cluster_ip).as_deref(),
            Some("10.96.0.10")
        );
    }
}
