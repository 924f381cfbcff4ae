//! Command-line flags, environment variables and the provider config file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use k8s_openapi::api::core::v1::Taint;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::Deserialize;
use updraft_node::NodeConfig;
use updraft_node::dns::{DnsSettings, ResolverFile};

/// The providers this binary carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProviderKind {
    /// In-process pods for tests, demos and benchmarks.
    Mock,
    /// One cell (an instance running the cell agent) per pod: local network namespaces or
    /// EC2, per `--provider-config`.
    Cells,
}

impl ProviderKind {
    /// The provider's name (the default taint's value).
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Mock => "mock",
            ProviderKind::Cells => "cells",
        }
    }
}

/// Where the kubelet port's certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServingCertificateSource {
    /// `--tls-cert-file` and `--tls-key-file`.
    Files,
    /// A `kubernetes.io/kubelet-serving` CSR, renewed before expiry (someone must approve it).
    Csr,
    /// A self-signed certificate: the API server will not trust it unless told to skip
    /// verification. Only when explicitly asked for.
    SelfSigned,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `updraft run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The node's name.
    #[arg(
        long = "nodename",
        env = "DEFAULT_NODE_NAME",
        default_value = "updraft"
    )]
    pub node_name: String,
    /// Which provider runs the pods.
    #[arg(long, env = "UPDRAFT_PROVIDER", value_enum, default_value = "mock")]
    pub provider: ProviderKind,
    /// The provider's YAML config file.
    #[arg(long, env = "UPDRAFT_PROVIDER_CONFIG")]
    pub provider_config: Option<PathBuf>,
    /// Kubeconfig to reach the API server with (in-cluster config when absent).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubelet API port.
    #[arg(long, env = "KUBELET_PORT", default_value_t = 10250)]
    pub kubelet_port: u16,
    /// The address the API server reaches the node at (the Node's InternalIP; the kubelet
    /// API listens on it too).
    #[arg(long, env = "VKUBELET_POD_IP", default_value = "127.0.0.1")]
    pub node_ip: String,
    /// Key of the node's taint.
    #[arg(
        long,
        env = "VKUBELET_TAINT_KEY",
        default_value = "virtual-kubelet.io/provider"
    )]
    pub taint_key: String,
    /// Value of the node's taint (default: the provider's name).
    #[arg(long, env = "VKUBELET_TAINT_VALUE")]
    pub taint_value: Option<String>,
    /// Effect of the node's taint.
    #[arg(long, env = "VKUBELET_TAINT_EFFECT", default_value = "NoSchedule")]
    pub taint_effect: String,
    /// Register the node without a taint.
    #[arg(long, env = "UPDRAFT_DISABLE_TAINT")]
    pub disable_taint: bool,
    /// Extra node labels, KEY=VALUE, repeatable.
    #[arg(long = "node-label", value_parser = parse_label)]
    pub node_labels: Vec<(String, String)>,
    /// Limit requests to the API server to this many per second (unlimited when unset).
    #[arg(long, env = "UPDRAFT_KUBE_API_QPS")]
    pub qps: Option<u32>,
    /// Pods reconciled concurrently.
    #[arg(long, env = "UPDRAFT_POD_WORKERS", default_value_t = 10)]
    pub pod_workers: u16,
    /// Where the serving certificate comes from.
    #[arg(
        long,
        env = "UPDRAFT_SERVING_CERTIFICATE",
        value_enum,
        default_value = "files"
    )]
    pub serving_certificate: ServingCertificateSource,
    /// Serving certificate (PEM) for `--serving-certificate files`.
    #[arg(long, env = "APISERVER_CERT_LOCATION")]
    pub tls_cert_file: Option<PathBuf>,
    /// Serving key (PEM) for `--serving-certificate files`.
    #[arg(long, env = "APISERVER_KEY_LOCATION")]
    pub tls_key_file: Option<PathBuf>,
    /// CA that client certificates are verified against (the API server's kubelet client).
    #[arg(long, env = "APISERVER_CA_CERT_LOCATION")]
    pub client_ca_file: Option<PathBuf>,
    /// Let requests without credentials through as `system:anonymous` (still authorized).
    #[arg(long, env = "UPDRAFT_ANONYMOUS_AUTH")]
    pub anonymous_auth: bool,
    /// Close an exec, attach or port-forward connection that carried no traffic either way
    /// for this long (the kubelet's flag and default; units h, m, s, ms, e.g. `1h30m`).
    #[arg(long, env = "UPDRAFT_STREAMING_CONNECTION_IDLE_TIMEOUT", default_value = "4h", value_parser = parse_duration)]
    pub streaming_connection_idle_timeout: std::time::Duration,
    /// How long a SPDY client may take to open the streams of an exec, attach or
    /// port-forward session.
    #[arg(long, env = "UPDRAFT_STREAM_CREATION_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub stream_creation_timeout: std::time::Duration,
    /// Feature gates, as the kubelet takes them: `Name=true|false`, comma-separated or
    /// repeated. Known: `ExtendWebSocketsToKubelet` (default true: the Node declares it, so
    /// API servers 1.36+ pass kubectl's exec/attach/port-forward WebSockets through to
    /// Updraft; false leaves them translating to SPDY).
    #[arg(long = "feature-gates", env = "UPDRAFT_FEATURE_GATES", value_delimiter = ',', value_parser = parse_feature_gate)]
    pub feature_gates: Vec<(FeatureGate, bool)>,
    /// The cluster DNS servers pods with `dnsPolicy: ClusterFirst` get (the kubelet's flag;
    /// comma-separated or repeated). Overrides the provider file's `clusterDNS`.
    #[arg(
        long = "cluster-dns",
        env = "UPDRAFT_CLUSTER_DNS",
        value_delimiter = ','
    )]
    pub cluster_dns: Vec<std::net::IpAddr>,
    /// The cluster's DNS domain (the kubelet's flag, usually `cluster.local`): pods search
    /// `<namespace>.svc.<domain> svc.<domain> <domain>`. Overrides the provider file's
    /// `clusterDomain`.
    #[arg(long = "cluster-domain", env = "UPDRAFT_CLUSTER_DOMAIN")]
    pub cluster_domain: Option<String>,
    /// The resolver file `dnsPolicy: Default` pods inherit and whose search domains cluster
    /// pods append (the kubelet's flag; `""`: none).
    #[arg(
        long = "resolv-conf",
        env = "UPDRAFT_RESOLV_CONF",
        default_value = "/etc/resolv.conf"
    )]
    pub resolv_conf: String,
    /// Log filter (`info`, `updraft_node=debug`, …).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "UPDRAFT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// The feature gates `--feature-gates` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureGate {
    /// Declare `ExtendWebSocketsToKubelet` in the Node's `status.declaredFeatures`.
    ExtendWebSocketsToKubelet,
}

fn parse_feature_gate(text: &str) -> Result<(FeatureGate, bool), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not Name=true|false"))?;
    let gate = match name.trim() {
        updraft_node::config::EXTEND_WEBSOCKETS_TO_KUBELET => {
            FeatureGate::ExtendWebSocketsToKubelet
        }
        other => {
            return Err(format!(
                "unknown feature gate {other:?}; known: {}",
                updraft_node::config::EXTEND_WEBSOCKETS_TO_KUBELET
            ));
        }
    };
    let enabled = value
        .trim()
        .parse::<bool>()
        .map_err(|_| format!("{text:?}: the value must be true or false"))?;
    Ok((gate, enabled))
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

/// A duration the way the kubelet's flags take it: numbers with units `h`, `m`, `s` or `ms`,
/// one after the other (`4h`, `1h30m`, `500ms`).
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{text:?} is not a duration like 4h, 1h30m, 30s or 500ms");
    let mut total = std::time::Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return Err(bad()),
        };
        total += std::time::Duration::from_secs_f64(number as f64 * seconds_per_unit);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// The mock provider's config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MockProviderFile {
    /// Node capacity, e.g. `{cpu: "20", memory: 100Gi, pods: "110"}`.
    #[serde(default)]
    pub capacity: BTreeMap<String, String>,
    /// As `--cluster-dns`.
    #[serde(default, rename = "clusterDNS")]
    pub cluster_dns: Vec<std::net::IpAddr>,
    /// As `--cluster-domain`.
    #[serde(default)]
    pub cluster_domain: Option<String>,
}

/// What a provider file says about the node (not the provider): its capacity and the
/// kubelet's DNS settings, which the flags override.
#[derive(Debug, Clone, Copy)]
pub struct NodeFile<'a> {
    /// `capacity`.
    pub capacity: &'a BTreeMap<String, String>,
    /// `clusterDNS`.
    pub cluster_dns: &'a [std::net::IpAddr],
    /// `clusterDomain`.
    pub cluster_domain: Option<&'a str>,
}

impl MockProviderFile {
    /// The node's part.
    pub fn node(&self) -> NodeFile<'_> {
        NodeFile {
            capacity: &self.capacity,
            cluster_dns: &self.cluster_dns,
            cluster_domain: self.cluster_domain.as_deref(),
        }
    }
}

/// The node's part of the cells provider's file.
pub fn cells_node_file(config: &updraft_provider_cells::CellsConfig) -> NodeFile<'_> {
    NodeFile {
        capacity: &config.capacity,
        cluster_dns: &config.cluster_dns,
        cluster_domain: config.cluster_domain.as_deref(),
    }
}

/// Reads the cells provider's config file (required with `--provider cells`).
pub fn read_cells_config(
    path: Option<&PathBuf>,
) -> anyhow::Result<updraft_provider_cells::CellsConfig> {
    let Some(path) = path else {
        bail!(
            "--provider cells needs --provider-config cells.yaml (backend, controllerId, certificateDir, …)"
        );
    };
    Ok(updraft_provider_cells::CellsConfig::load(path)?)
}

/// Reads the provider config file, with errors that name the file, the field and the line.
pub fn read_mock_config(path: Option<&PathBuf>) -> anyhow::Result<MockProviderFile> {
    let Some(path) = path else {
        return Ok(MockProviderFile::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading provider config {}", path.display()))?;
    let file: MockProviderFile = serde_yaml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("provider config {}: {e}", path.display()))?;
    for (resource, value) in &file.capacity {
        if updraft_common::quantity::Quantity::parse(value).is_err() {
            bail!(
                "provider config {}: capacity.{resource}: {value:?} is not a Kubernetes quantity (e.g. \"4\", \"500m\", \"16Gi\")",
                path.display()
            );
        }
    }
    Ok(file)
}

impl RunArgs {
    /// The node's configuration from the flags and the provider file's node settings.
    pub fn node_config(&self, file: NodeFile<'_>) -> NodeConfig {
        let provider = self.provider.as_str();
        let mut config = NodeConfig::new(&self.node_name, provider);
        config.internal_ip = self.node_ip.clone();
        config.kubelet_port = self.kubelet_port;
        config.pod_workers = self.pod_workers.max(1);
        config.labels = self.node_labels.iter().cloned().collect();
        config.taint = (!self.disable_taint).then(|| Taint {
            key: self.taint_key.clone(),
            value: Some(
                self.taint_value
                    .clone()
                    .unwrap_or_else(|| provider.to_owned()),
            ),
            effect: self.taint_effect.clone(),
            time_added: None,
        });
        for (gate, enabled) in &self.feature_gates {
            match gate {
                FeatureGate::ExtendWebSocketsToKubelet => {
                    let name = updraft_node::config::EXTEND_WEBSOCKETS_TO_KUBELET.to_owned();
                    if *enabled {
                        config.declared_features.insert(name);
                    } else {
                        config.declared_features.remove(&name);
                    }
                }
            }
        }
        for (resource, value) in file.capacity {
            config
                .capacity
                .insert(resource.clone(), Quantity(value.clone()));
        }
        config.dns = self.dns_settings(file);
        config
    }

    /// How pods' resolver files are formed: the flags, else the provider file; the host's
    /// resolver file read now, as the kubelet reads it once.
    fn dns_settings(&self, file: NodeFile<'_>) -> DnsSettings {
        let cluster_dns = if self.cluster_dns.is_empty() {
            file.cluster_dns.to_vec()
        } else {
            self.cluster_dns.clone()
        };
        let cluster_domain = self
            .cluster_domain
            .as_deref()
            .or(file.cluster_domain)
            .unwrap_or_default()
            .trim_end_matches('.')
            .to_owned();
        let host = (!self.resolv_conf.is_empty()).then(|| {
            match std::fs::read_to_string(&self.resolv_conf) {
                Ok(text) => ResolverFile::parse(&text),
                Err(e) => {
                    tracing::warn!(
                        "--resolv-conf {}: {e}; pods with dnsPolicy Default get no nameserver (pass --resolv-conf \"\" to say so on purpose)",
                        self.resolv_conf
                    );
                    ResolverFile::default()
                }
            }
        });
        if cluster_dns.is_empty() {
            tracing::info!(
                "no --cluster-dns: pods with dnsPolicy ClusterFirst get the host's resolver (a MissingClusterDNS event each), as on a kubelet"
            );
        }
        DnsSettings {
            cluster_dns,
            cluster_domain,
            host,
        }
    }

    /// Where the kubelet API listens.
    pub fn listen_address(&self) -> anyhow::Result<SocketAddr> {
        let ip: std::net::IpAddr = self
            .node_ip
            .parse()
            .with_context(|| format!("--node-ip {:?} is not an IP address", self.node_ip))?;
        Ok(SocketAddr::new(ip, self.kubelet_port))
    }
}

/// Sets up logging per `--log-level` and `--log-format`.
pub fn init_logging(args: &RunArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("--log-level {:?} is not a valid filter", args.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_the_kubelets_flags() {
        use std::time::Duration;
        assert_eq!(parse_duration("4h"), Ok(Duration::from_secs(4 * 3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in ["", "4", "h", "4x", "-1s", "1.5h"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("not a duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn feature_gates_parse_like_the_kubelets_flag() {
        assert_eq!(
            parse_feature_gate("ExtendWebSocketsToKubelet=false"),
            Ok((FeatureGate::ExtendWebSocketsToKubelet, false))
        );
        let err = parse_feature_gate("NoSuchGate=true").unwrap_err();
        assert!(
            err.contains("NoSuchGate") && err.contains("ExtendWebSocketsToKubelet"),
            "{err}"
        );
        assert!(parse_feature_gate("ExtendWebSocketsToKubelet=maybe").is_err());
        assert!(parse_feature_gate("ExtendWebSocketsToKubelet").is_err());
    }

    #[test]
    fn the_node_declares_websocket_pass_through_unless_the_gate_is_off() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let declared = |args: &[&str]| {
            let cli = <Cli as clap::Parser>::try_parse_from(
                std::iter::once("updraft").chain(args.iter().copied()),
            )
            .unwrap();
            cli.run
                .node_config(MockProviderFile::default().node())
                .declared_features
        };
        assert!(declared(&[]).contains("ExtendWebSocketsToKubelet"));
        assert!(declared(&["--feature-gates", "ExtendWebSocketsToKubelet=false"]).is_empty());
        assert!(
            declared(&[
                "--feature-gates=ExtendWebSocketsToKubelet=false,ExtendWebSocketsToKubelet=true"
            ])
            .contains("ExtendWebSocketsToKubelet")
        );
    }

    #[test]
    fn config_file_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("provider.yaml");
        std::fs::write(&path, "capacity:\n  cpu: lots\n").unwrap();
        let err = read_mock_config(Some(&path)).unwrap_err().to_string();
        assert!(
            err.contains("capacity.cpu") && err.contains("lots"),
            "{err}"
        );
        std::fs::write(&path, "capcity: {}\n").unwrap();
        let err = read_mock_config(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("capcity"), "{err}");
    }
}
