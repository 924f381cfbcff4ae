//! A pod's `/etc/resolv.conf`, formed as the kubelet forms it.
//!
//! The rules (the kubelet's DNS configurer):
//! - `dnsPolicy: ClusterFirst` (the default) on a pod without host network, and
//!   `ClusterFirstWithHostNet` on any pod: the cluster DNS servers (`--cluster-dns`) are the
//!   only nameservers; the search list is `<namespace>.svc.<domain> svc.<domain> <domain>`
//!   followed by the host's (without repeats; only the host's when no `--cluster-domain`);
//!   options are `ndots:5`. Without cluster DNS servers the pod falls back to `Default`, with
//!   a `MissingClusterDNS` warning.
//! - `ClusterFirst` on a host-network pod, and `Default`: the host's resolver file
//!   (`--resolv-conf`) as it is; with `--resolv-conf ""`, `nameserver 127.0.0.1` and
//!   `search .` (lookups effectively off).
//! - `None`: nothing but the pod's `dnsConfig`.
//! - Then `dnsConfig` is appended: its nameservers and searches after the policy's, repeats
//!   dropped; its options merged by name, the pod's value winning.
//! - Limits: 3 nameservers, 32 search domains, no domain longer than 253 characters, 2048
//!   characters of search line; what exceeds them is dropped from the end with a
//!   `DNSConfigForming` warning naming what was applied.
//!
//! The "host" of a virtual node is the machine Updraft runs on: its resolver file is read
//! once at start-up, as the kubelet reads its own.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
pub use updraft_provider::PodDns;

/// The most nameservers a resolver uses (glibc's `MAXNS`).
const MAX_NAMESERVERS: usize = 3;
/// The most search domains Kubernetes allows (expanded DNS config, GA).
const MAX_SEARCHES: usize = 32;
/// The longest search line Kubernetes allows.
const MAX_SEARCH_LINE: usize = 2048;
/// The longest search domain (a DNS-1123 subdomain); longer ones crash some resolvers.
const MAX_DOMAIN: usize = 253;
/// The options of a `ClusterFirst` pod.
const CLUSTER_OPTIONS: &str = "ndots:5";

/// What the node forms resolver files from: the kubelet's `--cluster-dns`,
/// `--cluster-domain` and `--resolv-conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsSettings {
    /// The cluster DNS servers (`--cluster-dns`); empty: `ClusterFirst` falls back.
    pub cluster_dns: Vec<IpAddr>,
    /// The cluster domain (`--cluster-domain`, usually `cluster.local`); empty: no cluster
    /// search domains.
    pub cluster_domain: String,
    /// The host's resolver file, parsed; `None` for `--resolv-conf ""`.
    pub host: Option<ResolverFile>,
}

/// The parts of a resolver file that pods inherit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolverFile {
    /// `nameserver` lines, in order.
    pub nameservers: Vec<String>,
    /// The last `search` line's domains, trailing dots removed.
    pub searches: Vec<String>,
    /// The last `options` line's entries.
    pub options: Vec<String>,
}

impl ResolverFile {
    /// Parses resolv.conf text as the kubelet does: nameservers accumulate, the last
    /// `search` and the last `options` line win, `#` starts a comment line.
    pub fn parse(text: &str) -> ResolverFile {
        let mut file = ResolverFile::default();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            match fields.next() {
                Some("nameserver") => file.nameservers.extend(fields.next().map(str::to_owned)),
                Some("search") => {
                    file.searches = fields
                        .map(|s| s.strip_suffix('.').unwrap_or(s).to_owned())
                        .collect();
                }
                Some("options") => file.options = fields.map(str::to_owned).collect(),
                _ => {}
            }
        }
        file
    }
}

/// Something the pod's owner should know about how its resolver file was formed (a Warning
/// Event on the pod, as the kubelet emits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsWarning {
    /// The Event reason: `DNSConfigForming` or `MissingClusterDNS`.
    pub reason: &'static str,
    /// What happened and what was applied.
    pub message: String,
}

/// The resolver settings of `pod` under `settings`, with the warnings the kubelet would emit.
pub fn pod_dns(pod: &Pod, settings: &DnsSettings) -> (PodDns, Vec<DnsWarning>) {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let policy = spec
        .and_then(|s| s.dns_policy.as_deref())
        .unwrap_or("ClusterFirst");
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut warnings = Vec::new();
    let cluster = match policy {
        "None" => None,
        "ClusterFirstWithHostNet" => Some(true),
        "ClusterFirst" if !host_network => Some(true),
        _ => Some(false),
    };
    let mut dns = match cluster {
        None => PodDns::default(),
        Some(true) if !settings.cluster_dns.is_empty() => {
            let mut searches = Vec::new();
            if !settings.cluster_domain.is_empty() {
                let domain = &settings.cluster_domain;
                searches.push(format!("{namespace}.svc.{domain}"));
                searches.push(format!("svc.{domain}"));
                searches.push(domain.clone());
            }
            if let Some(host) = &settings.host {
                searches.extend(host.searches.iter().cloned());
            }
            PodDns {
                nameservers: settings
                    .cluster_dns
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                searches: without_repeats(searches),
                options: vec![CLUSTER_OPTIONS.to_owned()],
            }
        }
        Some(cluster_first) => {
            if cluster_first {
                warnings.push(DnsWarning {
                    reason: "MissingClusterDNS",
                    message: format!(
                        "pod: {namespace}/{}. the node has no cluster DNS server configured (--cluster-dns) and cannot create the pod with the \"ClusterFirst\" policy; falling back to \"Default\"",
                        pod.metadata.name.as_deref().unwrap_or_default()
                    ),
                });
            }
            host_dns(settings.host.as_ref())
        }
    };
    if let Some(config) = spec.and_then(|s| s.dns_config.as_ref()) {
        dns.nameservers
            .extend(config.nameservers.iter().flatten().cloned());
        dns.nameservers = without_repeats(std::mem::take(&mut dns.nameservers));
        dns.searches
            .extend(config.searches.iter().flatten().cloned());
        dns.searches = without_repeats(std::mem::take(&mut dns.searches));
        for option in config.options.iter().flatten() {
            let Some(name) = option.name.as_deref() else {
                continue;
            };
            let entry = match &option.value {
                Some(value) if !value.is_empty() => format!("{name}:{value}"),
                _ => name.to_owned(),
            };
            match dns.options.iter_mut().find(|o| option_name(o) == name) {
                Some(existing) => *existing = entry,
                None => dns.options.push(entry),
            }
        }
    }
    fit_limits(&mut dns, &mut warnings);
    (dns, warnings)
}

/// The host's settings, or the "no lookups" settings of `--resolv-conf ""`.
fn host_dns(host: Option<&ResolverFile>) -> PodDns {
    match host {
        Some(host) => PodDns {
            nameservers: host.nameservers.clone(),
            searches: host.searches.clone(),
            options: host.options.clone(),
        },
        None => PodDns {
            nameservers: vec!["127.0.0.1".to_owned()],
            searches: vec![".".to_owned()],
            options: Vec::new(),
        },
    }
}

fn option_name(option: &str) -> &str {
    option.split_once(':').map_or(option, |(name, _)| name)
}

fn without_repeats(items: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    items
        .into_iter()
        .filter(|item| seen.insert(item.clone()))
        .collect()
}

fn fit_limits(dns: &mut PodDns, warnings: &mut Vec<DnsWarning>) {
    if dns.nameservers.len() > MAX_NAMESERVERS {
        dns.nameservers.truncate(MAX_NAMESERVERS);
        warnings.push(DnsWarning {
            reason: "DNSConfigForming",
            message: format!(
                "Nameserver limits were exceeded, some nameservers have been omitted, the applied nameserver line is: {}",
                dns.nameservers.join(" ")
            ),
        });
    }
    let mut exceeded = false;
    if dns.searches.len() > MAX_SEARCHES {
        dns.searches.truncate(MAX_SEARCHES);
        exceeded = true;
    }
    let before = dns.searches.len();
    dns.searches.retain(|domain| domain.len() <= MAX_DOMAIN);
    exceeded |= dns.searches.len() != before;
    while dns.searches.join(" ").len() > MAX_SEARCH_LINE {
        dns.searches.pop();
        exceeded = true;
    }
    if exceeded {
        warnings.push(DnsWarning {
            reason: "DNSConfigForming",
            message: format!(
                "Search Line limits were exceeded, some search paths have been omitted, the applied search line is: {}",
                dns.searches.join(" ")
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": "team-a", "name": "web-0"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn settings() -> DnsSettings {
        DnsSettings {
            cluster_dns: vec!["10.96.0.10".parse().unwrap()],
            cluster_domain: "cluster.local".into(),
            host: Some(ResolverFile::parse(
                "# host\nnameserver 192.0.2.53\nnameserver 192.0.2.54\nsearch corp.example. lab.example\noptions timeout:2 rotate\n",
            )),
        }
    }

    fn containers() -> serde_json::Value {
        serde_json::json!([{"name": "c", "image": "i"}])
    }

    #[test]
    fn the_host_file_is_parsed_as_the_kubelet_does() {
        let file = ResolverFile::parse(
            "nameserver 1.1.1.1\nsearch a.example\nnameserver 8.8.8.8\nsearch b.example. c.example\noptions ndots:1\noptions attempts:3\nnameserver\n",
        );
        assert_eq!(file.nameservers, ["1.1.1.1", "8.8.8.8"]);
        assert_eq!(file.searches, ["b.example", "c.example"]);
        assert_eq!(file.options, ["attempts:3"]);
    }

    #[test]
    fn cluster_first_uses_the_cluster_servers_and_search_domains_then_the_hosts() {
        let (dns, warnings) = pod_dns(
            &pod(serde_json::json!({"containers": containers()})),
            &settings(),
        );
        assert!(warnings.is_empty());
        assert_eq!(dns.nameservers, ["10.96.0.10"]);
        assert_eq!(
            dns.searches,
            [
                "team-a.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example",
                "lab.example"
            ]
        );
        assert_eq!(dns.options, ["ndots:5"]);
        assert_eq!(
            dns.to_resolv_conf(),
            "nameserver 10.96.0.10\nsearch team-a.svc.cluster.local svc.cluster.local cluster.local corp.example lab.example\noptions ndots:5\n"
        );
    }

    #[test]
    fn a_host_network_pod_with_cluster_first_gets_the_hosts_file_unless_with_host_net() {
        let host = pod(serde_json::json!({"hostNetwork": true, "containers": containers()}));
        let (dns, _) = pod_dns(&host, &settings());
        assert_eq!(dns.nameservers, ["192.0.2.53", "192.0.2.54"]);
        assert_eq!(dns.searches, ["corp.example", "lab.example"]);
        assert_eq!(dns.options, ["timeout:2", "rotate"]);
        let with = pod(
            serde_json::json!({"hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet", "containers": containers()}),
        );
        assert_eq!(pod_dns(&with, &settings()).0.nameservers, ["10.96.0.10"]);
    }

    #[test]
    fn default_is_the_hosts_file_and_none_only_the_pods_config() {
        let default = pod(serde_json::json!({"dnsPolicy": "Default", "containers": containers()}));
        assert_eq!(
            pod_dns(&default, &settings()).0.nameservers,
            ["192.0.2.53", "192.0.2.54"]
        );
        let none = pod(
            serde_json::json!({"dnsPolicy": "None", "containers": containers(),
            "dnsConfig": {"nameservers": ["1.2.3.4"], "searches": ["ns1.svc.cluster-domain.example"],
                          "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]}}),
        );
        let (dns, _) = pod_dns(&none, &settings());
        assert_eq!(
            dns.to_resolv_conf(),
            "nameserver 1.2.3.4\nsearch ns1.svc.cluster-domain.example\noptions ndots:2 edns0\n"
        );
    }

    #[test]
    fn dns_config_is_appended_without_repeats_and_its_options_win() {
        let merged = pod(serde_json::json!({"containers": containers(),
            "dnsConfig": {"nameservers": ["10.96.0.10", "1.2.3.4"],
                          "searches": ["svc.cluster.local", "extra.example"],
                          "options": [{"name": "ndots", "value": "2"}, {"name": "single-request"}]}}));
        let (dns, _) = pod_dns(&merged, &settings());
        assert_eq!(dns.nameservers, ["10.96.0.10", "1.2.3.4"]);
        assert_eq!(
            dns.searches.last().map(String::as_str),
            Some("extra.example")
        );
        assert_eq!(
            dns.searches
                .iter()
                .filter(|s| *s == "svc.cluster.local")
                .count(),
            1
        );
        assert_eq!(dns.options, ["ndots:2", "single-request"]);
    }

    #[test]
    fn without_cluster_dns_cluster_first_falls_back_to_default_with_a_warning() {
        let mut no_cluster = settings();
        no_cluster.cluster_dns.clear();
        let (dns, warnings) = pod_dns(
            &pod(serde_json::json!({"containers": containers()})),
            &no_cluster,
        );
        assert_eq!(dns.nameservers, ["192.0.2.53", "192.0.2.54"]);
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].reason, "MissingClusterDNS");
    }

    #[test]
    fn without_a_host_file_default_turns_lookups_off() {
        let mut no_host = settings();
        no_host.host = None;
        let default = pod(serde_json::json!({"dnsPolicy": "Default", "containers": containers()}));
        assert_eq!(
            pod_dns(&default, &no_host).0.to_resolv_conf(),
            "nameserver 127.0.0.1\nsearch .\n"
        );
        // ClusterFirst then has only the cluster's search domains.
        let (dns, _) = pod_dns(
            &pod(serde_json::json!({"containers": containers()})),
            &no_host,
        );
        assert_eq!(dns.searches.len(), 3);
    }

    #[test]
    fn without_a_cluster_domain_only_the_hosts_search_domains() {
        let mut no_domain = settings();
        no_domain.cluster_domain.clear();
        let (dns, _) = pod_dns(
            &pod(serde_json::json!({"containers": containers()})),
            &no_domain,
        );
        assert_eq!(dns.searches, ["corp.example", "lab.example"]);
    }

    #[test]
    fn limits_drop_the_excess_from_the_end_and_say_what_was_applied() {
        let servers: Vec<String> = (1..=5).map(|n| format!("10.0.0.{n}")).collect();
        let searches: Vec<String> = (0..40).map(|n| format!("d{n}.example")).collect();
        let big = pod(
            serde_json::json!({"dnsPolicy": "None", "containers": containers(),
            "dnsConfig": {"nameservers": servers, "searches": searches}}),
        );
        let (dns, warnings) = pod_dns(&big, &settings());
        assert_eq!(dns.nameservers, ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
        assert_eq!(dns.searches.len(), 32);
        assert_eq!(dns.searches[31], "d31.example");
        assert_eq!(warnings.len(), 2);
        assert!(warnings.iter().all(|w| w.reason == "DNSConfigForming"));
        assert!(
            warnings[0].message.ends_with("10.0.0.1 10.0.0.2 10.0.0.3"),
            "{warnings:?}"
        );

        let long: Vec<String> = (0..20)
            .map(|n| format!("{n:02}{}", "x".repeat(120)))
            .collect();
        let too_long = pod(
            serde_json::json!({"dnsPolicy": "None", "containers": containers(),
            "dnsConfig": {"searches": long, "nameservers": ["1.1.1.1"]}}),
        );
        let (dns, warnings) = pod_dns(&too_long, &settings());
        assert!(dns.searches.join(" ").len() <= 2048);
        assert_eq!(dns.searches.len(), 16);
        assert_eq!(warnings.len(), 1);

        let overlong = pod(
            serde_json::json!({"dnsPolicy": "None", "containers": containers(),
            "dnsConfig": {"searches": ["a.example", "y".repeat(254)], "nameservers": ["1.1.1.1"]}}),
        );
        assert_eq!(pod_dns(&overlong, &settings()).0.searches, ["a.example"]);
    }
}
