//! Service environment variables, as the kubelet gives them to containers.
//!
//! For every Service with a cluster IP in the pod's namespace (when the pod's
//! `enableServiceLinks` is true, the default) and always for the `kubernetes` Service of the
//! `default` namespace, a container sees `{NAME}_SERVICE_HOST`, `{NAME}_SERVICE_PORT`,
//! `{NAME}_SERVICE_PORT_{PORT_NAME}` and the Docker-link style `{NAME}_PORT…` variables.
//!
//! One watch of all Services feeds a cache that keeps only what the variables and the Service
//! routes need (see `slim`): Services are few and small, unlike Secrets and ConfigMaps, and
//! the kubelet reads them the same way. The process has this one copy of them.

use std::collections::BTreeMap;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use kube::api::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use tokio::sync::watch;
use updraft_provider::EnvVar;

/// The namespace and name of the API server's own Service, whose variables every container
/// gets, service links or not.
const MASTER_SERVICE: (&str, &str) = ("default", "kubernetes");

/// The Services of the cluster, reduced to what their environment variables need.
#[derive(Clone)]
pub struct Services {
    store: Store<Service>,
    /// Turns true when the watch's first list is in (its `InitDone`), like the pod cache's
    /// flag. Not kube-runtime's `Store::wait_until_ready`: that wakes only the last of several
    /// concurrent waiters, and reconciliations wait here side by side.
    listed: watch::Receiver<bool>,
    /// Counts the watch's changes (after the first list: one per added, changed or deleted
    /// Service), for those who derive something from all Services (the Service routes).
    changed: watch::Receiver<u64>,
}

impl Services {
    /// Starts watching Services through `client`; the watch runs until the returned future
    /// is dropped.
    pub fn watch(client: kube::Client) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (store, writer) = reflector::store();
        let stream = watcher::watcher(Api::<Service>::all(client), watcher::Config::default())
            .default_backoff()
            .modify(slim);
        let (mark_listed, listed) = watch::channel(false);
        let (count_change, changed) = watch::channel(0u64);
        let run = async move {
            let mut changes = reflector::reflector(writer, stream).boxed();
            while let Some(change) = changes.next().await {
                match change {
                    Ok(watcher::Event::InitDone) => {
                        mark_listed.send_replace(true);
                        count_change.send_modify(|n| *n += 1);
                    }
                    Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                        count_change.send_modify(|n| *n += 1);
                    }
                    Ok(_) => {}
                    Err(err) => tracing::debug!("watching services: {err}"),
                }
            }
        };
        (
            Self {
                store,
                listed,
                changed,
            },
            run,
        )
    }

    /// Waits until the first list of Services has arrived, so that no container starts
    /// without the variables of Services that already exist.
    pub async fn ready(&self) {
        if self
            .listed
            .clone()
            .wait_for(|listed| *listed)
            .await
            .is_err()
        {
            tracing::warn!("the service cache never became ready: its watch ended");
        }
    }

    /// Every Service, as the cache keeps it (see `slim`).
    pub fn all(&self) -> Vec<std::sync::Arc<Service>> {
        self.store.state()
    }

    /// Changes whenever a Service is added, changed or deleted (and once the first list is
    /// in).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }

    /// The service variables of a container in `namespace`.
    pub fn env(&self, namespace: &str, enable_service_links: bool) -> Vec<EnvVar> {
        let services = self.store.state();
        service_env(
            services.iter().map(|s| s.as_ref()),
            namespace,
            enable_service_links,
        )
    }
}

/// Drops everything but name, namespace, and what the service variables and the Service
/// routes need: type, cluster IPs, ports, session affinity, internal traffic policy.
fn slim(service: &mut Service) {
    let spec = service.spec.take().unwrap_or_default();
    service.spec = Some(ServiceSpec {
        type_: spec.type_,
        cluster_ip: spec.cluster_ip,
        cluster_ips: spec.cluster_ips,
        ports: spec.ports,
        session_affinity: spec.session_affinity,
        session_affinity_config: spec.session_affinity_config,
        internal_traffic_policy: spec.internal_traffic_policy,
        ..ServiceSpec::default()
    });
    service.status = None;
    let metadata = std::mem::take(&mut service.metadata);
    service.metadata.name = metadata.name;
    service.metadata.namespace = metadata.namespace;
    service.metadata.resource_version = metadata.resource_version;
    service.metadata.uid = metadata.uid;
}

/// The kubelet's service variables for a container in `namespace`, sorted by name.
///
/// Services without a cluster IP (headless ones) have none. A Service of the pod's namespace
/// named like the master Service hides it.
pub fn service_env<'a>(
    services: impl Iterator<Item = &'a Service>,
    namespace: &str,
    enable_service_links: bool,
) -> Vec<EnvVar> {
    let mut chosen: BTreeMap<&str, &Service> = BTreeMap::new();
    for service in services {
        if cluster_ip(service).is_none() {
            continue;
        }
        let name = service.metadata.name.as_deref().unwrap_or_default();
        let service_namespace = service.metadata.namespace.as_deref().unwrap_or_default();
        if (service_namespace, name) == MASTER_SERVICE {
            chosen.entry(name).or_insert(service);
        } else if service_namespace == namespace && enable_service_links {
            chosen.insert(name, service);
        }
    }
    let mut vars = BTreeMap::new();
    for service in chosen.values() {
        add_service_vars(service, &mut vars);
    }
    vars.into_iter()
        .map(|(name, value)| EnvVar { name, value })
        .collect()
}

fn cluster_ip(service: &Service) -> Option<&str> {
    service
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .filter(|ip| !ip.is_empty() && *ip != "None")
}

/// `my-svc` → `MY_SVC`.
fn env_name(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

fn add_service_vars(service: &Service, vars: &mut BTreeMap<String, String>) {
    let (Some(ip), Some(name)) = (cluster_ip(service), service.metadata.name.as_deref()) else {
        return;
    };
    let prefix = env_name(name);
    let ports: &[ServicePort] = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    vars.insert(format!("{prefix}_SERVICE_HOST"), ip.to_owned());
    let Some(first) = ports.first() else {
        return;
    };
    vars.insert(format!("{prefix}_SERVICE_PORT"), first.port.to_string());
    // An IPv6 address needs brackets in a URL.
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    };
    for (index, port) in ports.iter().enumerate() {
        if let Some(port_name) = port.name.as_deref().filter(|n| !n.is_empty()) {
            vars.insert(
                format!("{prefix}_SERVICE_PORT_{}", env_name(port_name)),
                port.port.to_string(),
            );
        }
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        let url = format!("{}://{host}:{}", protocol.to_ascii_lowercase(), port.port);
        if index == 0 {
            vars.insert(format!("{prefix}_PORT"), url.clone());
        }
        let link = format!(
            "{prefix}_PORT_{}_{}",
            port.port,
            protocol.to_ascii_uppercase()
        );
        vars.insert(format!("{link}_PROTO"), protocol.to_ascii_lowercase());
        vars.insert(format!("{link}_PORT"), port.port.to_string());
        vars.insert(format!("{link}_ADDR"), ip.to_owned());
        vars.insert(link, url);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn service(namespace: &str, name: &str, ip: &str, ports: serde_json::Value) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": namespace, "name": name},
            "spec": {"clusterIP": ip, "ports": ports}
        }))
        .unwrap()
    }

    fn as_map(vars: Vec<EnvVar>) -> BTreeMap<String, String> {
        vars.into_iter().map(|v| (v.name, v.value)).collect()
    }

    #[test]
    fn variables_follow_the_kubelet_names() {
        let services = [service(
            "app",
            "my-db",
            "10.0.0.7",
            serde_json::json!([
                {"name": "sql", "port": 5432, "protocol": "TCP"},
                {"name": "metrics-http", "port": 9187, "protocol": "UDP"}
            ]),
        )];
        let vars = as_map(service_env(services.iter(), "app", true));
        let expected: BTreeMap<String, String> = [
            ("MY_DB_SERVICE_HOST", "10.0.0.7"),
            ("MY_DB_SERVICE_PORT", "5432"),
            ("MY_DB_SERVICE_PORT_SQL", "5432"),
            ("MY_DB_SERVICE_PORT_METRICS_HTTP", "9187"),
            ("MY_DB_PORT", "tcp://10.0.0.7:5432"),
            ("MY_DB_PORT_5432_TCP", "tcp://10.0.0.7:5432"),
            ("MY_DB_PORT_5432_TCP_PROTO", "tcp"),
            ("MY_DB_PORT_5432_TCP_PORT", "5432"),
            ("MY_DB_PORT_5432_TCP_ADDR", "10.0.0.7"),
            ("MY_DB_PORT_9187_UDP", "udp://10.0.0.7:9187"),
            ("MY_DB_PORT_9187_UDP_PROTO", "udp"),
            ("MY_DB_PORT_9187_UDP_PORT", "9187"),
            ("MY_DB_PORT_9187_UDP_ADDR", "10.0.0.7"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(vars, expected);
    }

    #[test]
    fn namespace_links_and_the_master_service() {
        let ports = serde_json::json!([{"port": 443}]);
        let services = [
            service("default", "kubernetes", "10.0.0.1", ports.clone()),
            service("app", "web", "10.0.0.2", ports.clone()),
            service("other", "elsewhere", "10.0.0.3", ports.clone()),
            service("app", "headless", "None", ports.clone()),
        ];
        let linked = as_map(service_env(services.iter(), "app", true));
        assert_eq!(linked["KUBERNETES_SERVICE_HOST"], "10.0.0.1");
        assert_eq!(linked["WEB_PORT"], "tcp://10.0.0.2:443");
        assert!(!linked.contains_key("ELSEWHERE_SERVICE_HOST"));
        assert!(!linked.keys().any(|k| k.starts_with("HEADLESS")));

        let unlinked = as_map(service_env(services.iter(), "app", false));
        assert_eq!(unlinked["KUBERNETES_SERVICE_PORT"], "443");
        assert!(!unlinked.contains_key("WEB_SERVICE_HOST"));
    }

    #[test]
    fn ipv6_addresses_are_bracketed_in_urls() {
        let services = [service(
            "app",
            "v6",
            "fd00::10",
            serde_json::json!([{"port": 80}]),
        )];
        let vars = as_map(service_env(services.iter(), "app", true));
        assert_eq!(vars["V6_PORT"], "tcp://[fd00::10]:80");
        assert_eq!(vars["V6_PORT_80_TCP_ADDR"], "fd00::10");
    }
}
