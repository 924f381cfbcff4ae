//! The Service routes of the node's pods, derived from Services and EndpointSlices the way
//! kube-proxy derives its rules, for providers whose pods run where no kube-proxy does.
//!
//! [`routes`] is a pure function of the cluster's Services, its EndpointSlices and the node's
//! name; the node recomputes the whole table on every change of either (the table is small
//! next to the pods, and a whole table is what an agent that missed changes needs anyway).
//!
//! The rules it applies, each as kube-proxy does:
//! - a Service without a cluster IP (headless, `None`) or of type `ExternalName` has no route:
//!   it is DNS only;
//! - a Service port's endpoints come from the Service's EndpointSlices (label
//!   `kubernetes.io/service-name`) of address type IPv4, through the slice port of the same
//!   name and protocol (the slice already holds the resolved target port, named or not);
//! - new connections go to ready endpoints (`conditions.ready` unset counts as ready); when
//!   none is ready, to endpoints that are serving and terminating, so a rolling update
//!   drains instead of refusing; else the port has no endpoint and connections are refused;
//! - `internalTrafficPolicy: Local` keeps only endpoints on this node;
//! - `sessionAffinity: ClientIP` sticks for `sessionAffinityConfig.clientIP.timeoutSeconds`
//!   (10800 by default).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::api::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use tokio::sync::watch;
use updraft_common::services::{Protocol, ServiceRoute, ServiceRoutes};

use crate::services::Services;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when the Service does not say.
const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;

/// The routes of `services` through `slices`, sorted by Service and port, and one line per
/// Service port that could not be routed (naming it and why).
pub fn routes<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node_name: &str,
) -> (Vec<ServiceRoute>, Vec<String>) {
    let mut slices_of: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
        slices_of
            .entry((namespace, service.as_str()))
            .or_default()
            .push(slice);
    }

    let mut routes = Vec::new();
    let mut problems = Vec::new();
    let mut sorted: Vec<&Service> = services.into_iter().collect();
    sorted.sort_by_key(|s| (s.metadata.namespace.clone(), s.metadata.name.clone()));
    for service in sorted {
        let namespace = service.metadata.namespace.as_deref().unwrap_or_default();
        let name = service.metadata.name.as_deref().unwrap_or_default();
        let Some(spec) = &service.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let Some(cluster_ip) = cluster_ipv4(service) else {
            continue;
        };
        let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(DEFAULT_AFFINITY_SECONDS)
        });
        let slices = slices_of
            .get(&(namespace, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for port in spec.ports.iter().flatten() {
            let label = port_label(namespace, name, port);
            let protocol_name = port.protocol.as_deref().unwrap_or("TCP");
            let Some(protocol) = Protocol::from_kubernetes(protocol_name) else {
                problems.push(format!("{label}: protocol {protocol_name:?} is not routed"));
                continue;
            };
            let Ok(number) = u16::try_from(port.port) else {
                problems.push(format!("{label}: port {} is out of range", port.port));
                continue;
            };
            let endpoints = endpoints(slices, port, protocol_name, local_only.then_some(node_name));
            routes.push(ServiceRoute {
                service: label,
                cluster_ip,
                protocol,
                port: number,
                endpoints,
                affinity_timeout_seconds: affinity,
            });
        }
    }
    (routes, problems)
}

/// The shortest time between two tables: a burst of changes (a Deployment scaled by
/// hundreds, a re-list) becomes a few tables instead of one per event, as kube-proxy's
/// minimum sync period does.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Derives the node's Service routes until dropped: watches EndpointSlices (one watch for
/// the node, reduced to what [`routes`] reads), recomputes the table whenever a Service or
/// an EndpointSlice changes, and calls `publish` with each table that differs from the last.
///
/// Versions grow with the wall clock (milliseconds), so that the tables of a restarted
/// Updraft are newer than any an agent kept from before the restart. A Service port that
/// cannot be routed is logged once, when it first appears in the problems.
pub async fn run(
    client: kube::Client,
    services: Services,
    node_name: String,
    publish: impl Fn(Arc<ServiceRoutes>) + Send,
) {
    let (slices, watch_slices) = watch_endpoint_slices(client);
    let watch_slices = tokio::spawn(watch_slices);
    let mut slice_changes = slices.changed.clone();
    let mut service_changes = services.changes();
    services.ready().await;
    if slice_changes.wait_for(|n| *n > 0).await.is_err() {
        return;
    }
    let mut last: Option<ServiceRoutes> = None;
    let mut reported = BTreeSet::new();
    loop {
        service_changes.borrow_and_update();
        slice_changes.borrow_and_update();
        let all_services = services.all();
        let all_slices = slices.store.state();
        let (table, problems) = routes(
            all_services.iter().map(AsRef::as_ref),
            all_slices.iter().map(AsRef::as_ref),
            &node_name,
        );
        for problem in &problems {
            if !reported.contains(problem) {
                tracing::warn!("service routes: {problem}");
            }
        }
        reported = problems.into_iter().collect();
        if last.as_ref().map(|l| &l.routes) != Some(&table) {
            let version = next_version(last.as_ref().map_or(0, |l| l.version));
            let next = ServiceRoutes {
                version,
                routes: table,
            };
            tracing::debug!(version, routes = next.routes.len(), "new service routes");
            publish(Arc::new(next.clone()));
            last = Some(next);
        }
        tokio::time::sleep(MIN_INTERVAL).await;
        tokio::select! {
            changed = service_changes.changed() => if changed.is_err() { break },
            changed = slice_changes.changed() => if changed.is_err() { break },
        }
    }
    watch_slices.abort();
}

/// A version past `previous` and at least the wall clock in milliseconds.
fn next_version(previous: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    now.max(previous.saturating_add(1))
}

/// The EndpointSlices of the cluster as the routes read them, and a count of their changes
/// (0 until the first list is in).
struct Slices {
    store: Store<EndpointSlice>,
    changed: watch::Receiver<u64>,
}

fn watch_endpoint_slices(client: kube::Client) -> (Slices, impl Future<Output = ()> + Send) {
    let (store, writer) = reflector::store();
    let stream = watcher::watcher(
        Api::<EndpointSlice>::all(client),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(slim_slice);
    let (count, changed) = watch::channel(0u64);
    let run = async move {
        let mut events = reflector::reflector(writer, stream).boxed();
        let mut listed = false;
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::InitDone) => {
                    listed = true;
                    count.send_modify(|n| *n += 1);
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) if listed => {
                    count.send_modify(|n| *n += 1);
                }
                Ok(_) => {}
                Err(err) => tracing::debug!("watching endpoint slices: {err}"),
            }
        }
    };
    (Slices { store, changed }, run)
}

/// Keeps what [`routes`] reads: the Service label, the address type, the ports, and per
/// endpoint its addresses, conditions and node.
fn slim_slice(slice: &mut EndpointSlice) {
    let metadata = std::mem::take(&mut slice.metadata);
    slice.metadata.name = metadata.name;
    slice.metadata.namespace = metadata.namespace;
    slice.metadata.resource_version = metadata.resource_version;
    slice.metadata.uid = metadata.uid;
    slice.metadata.labels = metadata.labels.map(|labels| {
        labels
            .into_iter()
            .filter(|(key, _)| key == SERVICE_NAME_LABEL)
            .collect()
    });
    for endpoint in slice.endpoints.iter_mut().flatten() {
        endpoint.hints = None;
        endpoint.target_ref = None;
        endpoint.deprecated_topology = None;
        endpoint.hostname = None;
        endpoint.zone = None;
    }
}

/// The Service's IPv4 cluster IP (the first of `clusterIPs` that is one), if it has one.
fn cluster_ipv4(service: &Service) -> Option<Ipv4Addr> {
    let spec = service.spec.as_ref()?;
    spec.cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .find_map(|ip| ip.parse().ok())
}

/// `namespace/name:port-name` (the number when the port has no name).
fn port_label(namespace: &str, name: &str, port: &ServicePort) -> String {
    match port.name.as_deref().filter(|n| !n.is_empty()) {
        Some(port_name) => format!("{namespace}/{name}:{port_name}"),
        None => format!("{namespace}/{name}:{}", port.port),
    }
}

/// Where new connections to `port` go (see the module docs), sorted and without repeats.
fn endpoints(
    slices: &[&EndpointSlice],
    port: &ServicePort,
    protocol: &str,
    only_on_node: Option<&str>,
) -> Vec<SocketAddrV4> {
    let wanted = port.name.as_deref().unwrap_or_default();
    let mut ready = BTreeSet::new();
    let mut draining = BTreeSet::new();
    for slice in slices {
        let Some(number) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| {
                p.name.as_deref().unwrap_or_default() == wanted
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol
            })
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in slice.endpoints.iter().flatten() {
            if only_on_node.is_some_and(|node| endpoint.node_name.as_deref() != Some(node)) {
                continue;
            }
            let set = match condition(endpoint) {
                Condition::Ready => &mut ready,
                Condition::Draining => &mut draining,
                Condition::Unusable => continue,
            };
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<Ipv4Addr>() {
                    set.insert(SocketAddrV4::new(ip, number));
                }
            }
        }
    }
    let chosen = if ready.is_empty() { draining } else { ready };
    chosen.into_iter().collect()
}

enum Condition {
    /// Takes new connections.
    Ready,
    /// Serving but terminating: used only when no endpoint is ready.
    Draining,
    /// Neither.
    Unusable,
}

fn condition(endpoint: &Endpoint) -> Condition {
    let conditions = endpoint.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    if ready && !terminating {
        Condition::Ready
    } else if serving && terminating {
        Condition::Draining
    } else {
        Condition::Unusable
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn service(name: &str, json: serde_json::Value) -> Service {
        let mut value = serde_json::json!({
            "metadata": {"namespace": "default", "name": name},
            "spec": json,
        });
        value["apiVersion"] = "v1".into();
        value["kind"] = "Service".into();
        serde_json::from_value(value).unwrap()
    }

    fn slice(
        service: &str,
        ports: serde_json::Value,
        endpoints: serde_json::Value,
    ) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": "default",
                "name": format!("{service}-abcde"),
                "labels": {SERVICE_NAME_LABEL: service},
            },
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    fn addr(text: &str) -> SocketAddrV4 {
        text.parse().unwrap()
    }

    #[test]
    fn each_service_port_routes_to_its_slice_port_by_name() {
        let web = service(
            "web",
            serde_json::json!({"clusterIP": "10.96.0.20", "ports": [
                {"name": "http", "port": 80, "targetPort": "web"},
                {"name": "metrics", "port": 9090, "targetPort": 9090},
            ]}),
        );
        let slices = [slice(
            "web",
            serde_json::json!([{"name": "http", "port": 8080, "protocol": "TCP"},
                               {"name": "metrics", "port": 9090, "protocol": "TCP"}]),
            serde_json::json!([
                {"addresses": ["10.212.0.6"], "conditions": {"ready": true}},
                {"addresses": ["10.212.0.5"]},
            ]),
        )];
        let (routes, problems) = routes([&web], &slices, "node");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].service, "default/web:http");
        assert_eq!(routes[0].cluster_ip, Ipv4Addr::new(10, 96, 0, 20));
        assert_eq!(routes[0].port, 80);
        assert_eq!(
            routes[0].endpoints,
            [addr("10.212.0.5:8080"), addr("10.212.0.6:8080")]
        );
        assert_eq!(routes[1].port, 9090);
        assert_eq!(routes[1].endpoints[0], addr("10.212.0.5:9090"));
    }

    #[test]
    fn headless_and_external_name_services_have_no_route() {
        let headless = service(
            "db",
            serde_json::json!({"clusterIP": "None", "ports": [{"port": 5432}]}),
        );
        let external = service(
            "ext",
            serde_json::json!({"type": "ExternalName", "externalName": "example.invalid"}),
        );
        let (routes, problems) = routes([&headless, &external], [], "node");
        assert!(routes.is_empty() && problems.is_empty());
    }

    #[test]
    fn a_port_without_endpoints_is_routed_empty_so_it_is_refused() {
        let lonely = service(
            "lonely",
            serde_json::json!({"clusterIP": "10.96.0.21", "ports": [{"port": 80}]}),
        );
        let (routes, _) = routes([&lonely], [], "node");
        assert_eq!(routes.len(), 1);
        assert!(routes[0].endpoints.is_empty());
        assert_eq!(routes[0].service, "default/lonely:80");
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let web = service(
            "web",
            serde_json::json!({"clusterIP": "10.96.0.22", "ports": [{"port": 80}]}),
        );
        let ports = serde_json::json!([{"port": 8080}]);
        let draining = serde_json::json!({"addresses": ["10.212.0.7"],
            "conditions": {"ready": false, "serving": true, "terminating": true}});
        let gone = serde_json::json!({"addresses": ["10.212.0.8"],
            "conditions": {"ready": false, "serving": false, "terminating": true}});
        let ready = serde_json::json!({"addresses": ["10.212.0.9"], "conditions": {"ready": true}});
        let both = [slice(
            "web",
            ports.clone(),
            serde_json::json!([draining, gone, ready]),
        )];
        assert_eq!(
            routes([&web], &both, "n").0[0].endpoints,
            [addr("10.212.0.9:8080")]
        );
        let only_draining = [slice("web", ports, serde_json::json!([draining, gone]))];
        assert_eq!(
            routes([&web], &only_draining, "n").0[0].endpoints,
            [addr("10.212.0.7:8080")]
        );
    }

    #[test]
    fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
        let web = service(
            "web",
            serde_json::json!({"clusterIP": "10.96.0.23", "internalTrafficPolicy": "Local",
                               "ports": [{"port": 80}]}),
        );
        let slices = [slice(
            "web",
            serde_json::json!([{"port": 80}]),
            serde_json::json!([
                {"addresses": ["10.212.0.10"], "nodeName": "cells"},
                {"addresses": ["10.0.5.3"], "nodeName": "worker-1"},
            ]),
        )];
        assert_eq!(
            routes([&web], &slices, "cells").0[0].endpoints,
            [addr("10.212.0.10:80")]
        );
    }

    #[test]
    fn client_ip_affinity_with_its_timeout_or_the_default() {
        let sticky = service(
            "sticky",
            serde_json::json!({"clusterIP": "10.96.0.24", "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                "ports": [{"port": 80}]}),
        );
        let default = service(
            "sticky2",
            serde_json::json!({"clusterIP": "10.96.0.25", "sessionAffinity": "ClientIP",
                               "ports": [{"port": 80}]}),
        );
        let (routes, _) = routes([&sticky, &default], [], "n");
        assert_eq!(routes[0].affinity_timeout_seconds, Some(60));
        assert_eq!(routes[1].affinity_timeout_seconds, Some(10_800));
    }

    #[test]
    fn udp_ports_match_udp_slice_ports_only() {
        let dns = service(
            "kube-dns",
            serde_json::json!({"clusterIP": "10.96.0.10", "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ]}),
        );
        let slices = [slice(
            "kube-dns",
            serde_json::json!([{"name": "dns", "port": 1053, "protocol": "UDP"},
                               {"name": "dns-tcp", "port": 1053, "protocol": "TCP"}]),
            serde_json::json!([{"addresses": ["10.212.0.11"]}]),
        )];
        let (routes, _) = routes([&dns], &slices, "n");
        assert_eq!(routes[0].protocol, Protocol::Udp);
        assert_eq!(routes[0].endpoints, [addr("10.212.0.11:1053")]);
        assert_eq!(routes[1].protocol, Protocol::Tcp);
    }

    #[test]
    fn slices_of_other_services_and_ipv6_slices_are_ignored() {
        let web = service(
            "web",
            serde_json::json!({"clusterIP": "10.96.0.26", "ports": [{"port": 80}]}),
        );
        let mut v6 = slice(
            "web",
            serde_json::json!([{"port": 80}]),
            serde_json::json!([{"addresses": ["fd00::1"]}]),
        );
        v6.address_type = "IPv6".into();
        let other = slice(
            "other",
            serde_json::json!([{"port": 80}]),
            serde_json::json!([{"addresses": ["10.212.0.12"]}]),
        );
        let (routes, _) = routes([&web], [&v6, &other], "n");
        assert!(routes[0].endpoints.is_empty());
    }

    #[test]
    fn an_unroutable_protocol_is_named() {
        let odd = service(
            "odd",
            serde_json::json!({"clusterIP": "10.96.0.27", "ports": [{"name": "x", "port": 80, "protocol": "QUIC"}]}),
        );
        let (routes, problems) = routes([&odd], [], "n");
        assert!(routes.is_empty());
        assert_eq!(problems, ["default/odd:x: protocol \"QUIC\" is not routed"]);
    }
}
