//! The provider config file (`--provider-config cells.yaml`, the role of Kip's
//! `provider.yaml`): YAML, camelCase keys, unknown keys refused, every error naming its field.
//!
//! ```yaml
//! backend: local              # or aws
//! controllerId: demo          # stamped on every cell; listings and GC filter on it
//! certificateDir: /var/lib/updraft/cells-pki
//! defaultInstanceType: local.small
//! bootTimeout: 2m
//! healthTimeout: 30s
//! agent:
//!   port: 6421
//!   command: [/usr/local/bin/updraft-cell]
//! capacity: {cpu: "64", memory: 256Gi, pods: "50"}
//! clusterDNS: [10.96.0.10]    # the kubelet's names; --cluster-dns/--cluster-domain win
//! clusterDomain: cluster.local
//! standbyPool:               # pre-started idle cells a pod of that type takes at once
//!   - {instanceType: local.small, count: 2}
//! aws:                        # only with backend: aws
//!   subnetId: subnet-0123
//!   bootImage: {id: ami-0123}
//! ```
//!
//! Secrets (AWS keys) are only read from files or the environment, never from this file, and
//! never logged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use updraft_cells_aws::{AwsConfig, AwsConfigError, BootImage};
use updraft_cells_catalog::{Catalog, CatalogError, LaunchType};

/// A config that cannot be used: the message names the file, the field and what is expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cells provider config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not YAML, an unknown key, a missing key or a value of the wrong type.
    #[error("cells provider config {origin}: {field}: {message}")]
    Parse {
        /// Where the text came from.
        origin: String,
        /// The field's path, e.g. `aws.subnetId` (`.` for the document).
        field: String,
        /// The parser's message.
        message: String,
    },
    /// A value parsed but cannot work.
    #[error("cells provider config {origin}: {field}: {message}")]
    Invalid {
        /// Where the text came from.
        origin: String,
        /// The field, e.g. `bootTimeout`.
        field: String,
        /// What is wrong and what to write instead.
        message: String,
    },
}

/// Which backend starts the cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Network-namespace cells on this host (`updraft-cells-local`).
    Local,
    /// EC2 instances (`updraft-cells-aws`).
    Aws,
}

impl BackendKind {
    /// `local` or `aws`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Local => "local",
            BackendKind::Aws => "aws",
        }
    }
}

/// A duration written as seconds (`90`) or with a unit (`500ms`, `90s`, `5m`, `1h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

/// Parses `90`, `500ms`, `90s`, `5m`, `1h`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    match unit.trim() {
        "" | "s" => Some(Duration::from_secs(number)),
        "ms" => Some(Duration::from_millis(number)),
        "m" => Some(Duration::from_secs(number.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(number.checked_mul(3600)?)),
        _ => None,
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Seconds(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Seconds(s) => Ok(ConfigDuration(Duration::from_secs(s))),
            Raw::Text(t) => parse_duration(&t).map(ConfigDuration).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{t:?} is not a duration: write seconds (90) or a number with ms, s, m or h (90s, 5m)"
                ))
            }),
        }
    }
}

/// How the agent is started on each cell.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentSettings {
    /// The port the agent listens on (6421).
    #[serde(default = "default_agent_port")]
    pub port: u16,
    /// The program (and leading arguments) that starts the agent on the cell; the provider
    /// appends `--listen`, `--dir`, `--tls-cert`, `--tls-key`, `--client-ca`.
    #[serde(default = "default_agent_command")]
    pub command: Vec<String>,
    /// More arguments appended after the provider's (e.g. `--image-dir name=/path`).
    #[serde(default)]
    pub extra_args: Vec<String>,
    /// The agent's state directory on the cell.
    #[serde(default = "default_agent_dir")]
    pub dir: String,
    /// Where the bootstrap writes the agent's certificates and key on the cell.
    #[serde(default = "default_agent_tls_dir")]
    pub tls_dir: String,
}

fn default_agent_port() -> u16 {
    updraft_cell_api::DEFAULT_AGENT_PORT
}
fn default_agent_command() -> Vec<String> {
    vec!["updraft-cell".into()]
}
fn default_agent_dir() -> String {
    "/var/lib/updraft-cell".into()
}
fn default_agent_tls_dir() -> String {
    "/etc/updraft-cell".into()
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            port: default_agent_port(),
            command: default_agent_command(),
            extra_args: Vec::new(),
            dir: default_agent_dir(),
            tls_dir: default_agent_tls_dir(),
        }
    }
}

/// The AWS boot image: an AMI id, or owners and filters (the newest match).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BootImageSettings {
    /// `ami-…`.
    #[serde(default)]
    pub id: Option<String>,
    /// Image owners (account ids, `amazon`, `self`) for a filtered search.
    #[serde(default)]
    pub owners: Vec<String>,
    /// `DescribeImages` filters, name → values.
    #[serde(default)]
    pub filters: BTreeMap<String, Vec<String>>,
}

/// The `aws:` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AwsSettings {
    /// An endpoint override (moto, a VPC endpoint).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// The boot image of the cells.
    pub boot_image: BootImageSettings,
    /// The boot image of arm64 (Graviton) types.
    #[serde(default)]
    pub arm64_boot_image: Option<BootImageSettings>,
    /// The subnet the cells start in.
    pub subnet_id: String,
    /// Name of the managed security group (default `updraft-<controllerId>-cells`).
    #[serde(default)]
    pub security_group_name: Option<String>,
    /// When spot is refused for capacity, launch on-demand instead.
    #[serde(default)]
    pub spot_fallback_to_on_demand: bool,
    /// A file holding the access key id (else the SDK's default chain: env, profile, IMDS).
    #[serde(default)]
    pub access_key_id_file: Option<PathBuf>,
    /// A file holding the secret access key (with `accessKeyIdFile`).
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
}

/// How the pod gets its own interface on the cell (the agent's `PodNetworkConfig`): a veth
/// from `bridge` into the pod's network namespace with the cell's pod IP. Without this
/// section the pod shares nothing but loopback unless it uses `hostNetwork`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodNetworkSettings {
    /// The bridge on the cell the pod's veth joins.
    pub bridge: String,
    /// The host end's name (≤ 15 bytes).
    #[serde(default = "default_host_veth")]
    pub host_veth: String,
    /// Prefix length of the pod IP.
    pub prefix_len: u8,
    /// Named netns holding the bridge (absent: the agent's).
    #[serde(default)]
    pub host_netns: Option<String>,
    /// Default gateway of the pod.
    #[serde(default)]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// resolv.conf nameservers of pods the node formed no resolver file for (the node forms
    /// one for every pod it runs, from `--cluster-dns`, `--cluster-domain` and
    /// `--resolv-conf`).
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// resolv.conf search domains, with `nameservers`.
    #[serde(default)]
    pub searches: Vec<String>,
}

fn default_host_veth() -> String {
    "veth-pod".into()
}

/// One entry of the standby pool: keep `count` pre-started, idle cells of `instanceType` so
/// that a pod selecting that type starts in seconds instead of a cell's boot time.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StandbySettings {
    /// The instance type (must be in the catalog).
    pub instance_type: String,
    /// How many idle cells of this type to keep (0 drains the pool of this type).
    pub count: u32,
    /// `on-demand` (default) or `spot`: a pod takes a standby cell only when its launch type
    /// matches.
    #[serde(default)]
    pub launch_type: Option<String>,
}

/// Most idle cells one pool entry may keep: a typo like `count: 1000` must not start a fleet.
pub const MAX_STANDBY_PER_TYPE: u32 = 100;

impl StandbySettings {
    /// The launch type of the entry's cells.
    pub fn launch_type(&self) -> LaunchType {
        self.launch_type
            .as_deref()
            .and_then(LaunchType::parse)
            .unwrap_or_default()
    }
}

/// The whole provider config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CellsConfig {
    /// Where cells run.
    pub backend: BackendKind,
    /// The local backend's settings (with `backend: local`; defaults when absent).
    #[serde(default)]
    pub local: Option<updraft_cells_local::LocalConfig>,
    /// The AWS backend's settings (with `backend: aws`).
    #[serde(default)]
    pub aws: Option<AwsSettings>,
    /// Region: selects the catalog (`us-east-1` → the built-in AWS catalog; `local` for the
    /// local backend, its default).
    #[serde(default)]
    pub region: Option<String>,
    /// This Updraft's id, stamped on every cell it starts; cells of other ids are never
    /// touched.
    pub controller_id: String,
    /// The type for pods that request nothing (default: the catalog's `local.small` for local,
    /// `t3.small` for AWS).
    #[serde(default)]
    pub default_instance_type: Option<String>,
    /// `on-demand` (default) or `spot` for pods without a launch-type annotation.
    #[serde(default)]
    pub default_launch_type: Option<String>,
    /// An instance catalog file (JSON or YAML) replacing the built-in one.
    #[serde(default)]
    pub catalog_file: Option<PathBuf>,
    /// The operator's cloud-init merged into every cell's user data.
    #[serde(default)]
    pub cloud_init_file: Option<PathBuf>,
    /// How long a new cell may take until its agent answers (default 5m).
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout: ConfigDuration,
    /// How long a running cell's agent may stay unreachable before the cell counts as lost
    /// (default 60s).
    #[serde(default = "default_health_timeout")]
    pub health_timeout: ConfigDuration,
    /// How long a cell that belongs to no pod is kept before it is terminated (default 2m):
    /// a cell found in the backend's listing that no pod of this node claims is reported to the
    /// node's orphan sweep only after this long (counted from when this run found it), and a
    /// second cell of one pod is terminated once it is this old.
    #[serde(default = "default_gc_grace")]
    pub gc_grace_period: ConfigDuration,
    /// How often the garbage collector looks (default 30s).
    #[serde(default = "default_gc_interval")]
    pub gc_interval: ConfigDuration,
    /// How long the cell of a finished pod (Succeeded/Failed) is kept for `kubectl logs`
    /// before it is terminated (default 5m).
    #[serde(default = "default_finished_retention")]
    pub finished_pod_retention: ConfigDuration,
    /// The agent on each cell.
    #[serde(default)]
    pub agent: AgentSettings,
    /// Prefix of the cells' names (`<nameTag>-<namespace>-<pod>`; default `updraft`).
    #[serde(default)]
    pub name_tag: Option<String>,
    /// Security groups every cell gets besides the managed one (AWS).
    #[serde(default)]
    pub extra_security_groups: Vec<String>,
    /// More CIDRs allowed to reach the agent port (AWS: where Updraft runs).
    #[serde(default)]
    pub extra_cidrs: Vec<String>,
    /// Where the provider's CA and client certificate live: created on first start, reused
    /// afterwards so cells started before a restart stay reachable.
    pub certificate_dir: PathBuf,
    /// The pod's interface on the cell.
    #[serde(default)]
    pub pod_network: Option<PodNetworkSettings>,
    /// The node's advertised capacity, e.g. `{cpu: "64", memory: 256Gi, pods: "50"}`.
    #[serde(default)]
    pub capacity: BTreeMap<String, String>,
    /// The cluster DNS servers of `dnsPolicy: ClusterFirst` pods (the kubelet's
    /// `clusterDNS`; `--cluster-dns` overrides it).
    #[serde(default, rename = "clusterDNS")]
    pub cluster_dns: Vec<std::net::IpAddr>,
    /// The cluster's DNS domain (the kubelet's `clusterDomain`, usually `cluster.local`;
    /// `--cluster-domain` overrides it).
    #[serde(default)]
    pub cluster_domain: Option<String>,
    /// Pre-started idle cells per instance type, e.g.
    /// `[{instanceType: t3.small, count: 2}]`; empty (default): no pool.
    #[serde(default)]
    pub standby_pool: Vec<StandbySettings>,
}

fn default_boot_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(300))
}
fn default_health_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(60))
}
fn default_gc_grace() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(120))
}
fn default_gc_interval() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(30))
}
fn default_finished_retention() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(300))
}

impl CellsConfig {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<CellsConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        CellsConfig::from_yaml_str(&text, &path.display().to_string())
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<CellsConfig, ConfigError> {
        let deserializer = serde_yaml::Deserializer::from_str(text);
        let config: CellsConfig =
            serde_path_to_error::deserialize(deserializer).map_err(|error| {
                let field = error.path().to_string();
                ConfigError::Parse {
                    origin: origin.to_owned(),
                    field,
                    message: error.into_inner().to_string(),
                }
            })?;
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            field: field.to_owned(),
            message,
        };
        let id_ok = !self.controller_id.is_empty()
            && self.controller_id.len() <= 63
            && self
                .controller_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if !id_ok {
            return Err(invalid(
                "controllerId",
                format!(
                    "{:?} must be 1-63 letters, digits, '-', '_' or '.'",
                    self.controller_id
                ),
            ));
        }
        match (self.backend, &self.aws, &self.local) {
            (BackendKind::Aws, _, Some(_)) => {
                return Err(invalid(
                    "local",
                    "set only with backend: local (the backend is aws)".into(),
                ));
            }
            (BackendKind::Aws, None, None) => {
                return Err(invalid(
                    "aws",
                    "backend: aws needs an aws section (subnetId, bootImage)".into(),
                ));
            }
            (BackendKind::Aws, Some(aws), None) => {
                if aws.boot_image.id.is_none() && aws.boot_image.filters.is_empty() {
                    return Err(invalid(
                        "aws.bootImage",
                        "give an id (ami-…) or filters".into(),
                    ));
                }
                if aws.access_key_id_file.is_some() != aws.secret_access_key_file.is_some() {
                    return Err(invalid(
                        "aws.accessKeyIdFile",
                        "accessKeyIdFile and secretAccessKeyFile go together".into(),
                    ));
                }
                if self.region.is_none() {
                    return Err(invalid(
                        "region",
                        "backend: aws needs a region, e.g. us-east-1".into(),
                    ));
                }
                // The backend's own checks (subnet and image ids, filters, CIDRs …), so a
                // broken setting stops `updraft run` instead of failing the first pod.
                if let Some(settings) = self.aws_backend_config()
                    && let Err(AwsConfigError::Invalid { field, problem }) = settings.validate()
                {
                    return Err(invalid(&field, problem));
                }
            }
            (BackendKind::Local, _, local) => {
                if self.aws.is_some() {
                    return Err(invalid(
                        "aws",
                        "set only with backend: aws (the backend is local)".into(),
                    ));
                }
                if let Some(local) = local {
                    if local.agent_port != self.agent.port {
                        return Err(invalid(
                            "local.agentPort",
                            format!(
                                "{} differs from agent.port {}: set the port once, as agent.port",
                                local.agent_port, self.agent.port
                            ),
                        ));
                    }
                    local
                        .validate()
                        .map_err(|e| invalid("local", e.to_string()))?;
                }
            }
        }
        if let Some(launch) = &self.default_launch_type
            && LaunchType::parse(launch).is_none()
        {
            return Err(invalid(
                "defaultLaunchType",
                format!("{launch:?} must be on-demand or spot"),
            ));
        }
        if self.agent.command.is_empty() {
            return Err(invalid(
                "agent.command",
                "must name the agent program, e.g. [updraft-cell]".into(),
            ));
        }
        if self.agent.port == 0 {
            return Err(invalid("agent.port", "must not be 0".into()));
        }
        for (field, value) in [
            ("bootTimeout", self.boot_timeout),
            ("healthTimeout", self.health_timeout),
            ("gcInterval", self.gc_interval),
        ] {
            if value.0.is_zero() {
                return Err(invalid(field, "must be longer than 0".into()));
            }
        }
        for (index, entry) in self.standby_pool.iter().enumerate() {
            let field = |name: &str| format!("standbyPool[{index}].{name}");
            if entry.instance_type.trim().is_empty() {
                return Err(invalid(
                    &field("instanceType"),
                    "must name an instance type of the catalog, e.g. t3.small".into(),
                ));
            }
            if entry.count > MAX_STANDBY_PER_TYPE {
                return Err(invalid(
                    &field("count"),
                    format!(
                        "{} is more than {MAX_STANDBY_PER_TYPE} idle cells of one type; write a smaller number",
                        entry.count
                    ),
                ));
            }
            if let Some(launch) = &entry.launch_type
                && LaunchType::parse(launch).is_none()
            {
                return Err(invalid(
                    &field("launchType"),
                    format!("{launch:?} must be on-demand or spot"),
                ));
            }
            let duplicate = self.standby_pool[..index].iter().any(|earlier| {
                earlier.instance_type == entry.instance_type
                    && earlier.launch_type() == entry.launch_type()
            });
            if duplicate {
                return Err(invalid(
                    &field("instanceType"),
                    format!(
                        "{} ({}) is listed twice; give each type one entry with the total count",
                        entry.instance_type,
                        entry.launch_type().as_str()
                    ),
                ));
            }
        }
        for (resource, value) in &self.capacity {
            if updraft_cells_catalog::quantity::bytes(value).is_err()
                && updraft_cells_catalog::quantity::cpu_millis(value).is_err()
            {
                return Err(invalid(
                    &format!("capacity.{resource}"),
                    format!(
                        "{value:?} is not a Kubernetes quantity (e.g. \"4\", \"500m\", \"16Gi\")"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The region the catalog is for.
    pub fn region(&self) -> String {
        self.region.clone().unwrap_or_else(|| match self.backend {
            BackendKind::Local => "local".into(),
            BackendKind::Aws => "us-east-1".into(),
        })
    }

    /// The launch type for pods without an annotation.
    pub fn default_launch_type(&self) -> LaunchType {
        self.default_launch_type
            .as_deref()
            .and_then(LaunchType::parse)
            .unwrap_or_default()
    }

    /// The default instance type, per backend when not configured.
    pub fn default_instance_type(&self) -> String {
        self.default_instance_type
            .clone()
            .unwrap_or_else(|| match self.backend {
                BackendKind::Local => "local.small".into(),
                BackendKind::Aws => "t3.small".into(),
            })
    }

    /// The cells' name prefix.
    pub fn name_tag(&self) -> &str {
        self.name_tag.as_deref().unwrap_or("updraft")
    }

    /// The AWS backend's settings of this config (`None` without an `aws` section).
    pub fn aws_backend_config(&self) -> Option<AwsConfig> {
        let aws = self.aws.as_ref()?;
        let mut settings = AwsConfig::new(
            self.region(),
            self.controller_id.clone(),
            boot_image(&aws.boot_image),
            aws.subnet_id.clone(),
        );
        settings.endpoint_url = aws.endpoint_url.clone();
        settings.arm64_boot_image = aws.arm64_boot_image.as_ref().map(boot_image);
        settings.security_group_name = aws.security_group_name.clone();
        settings.agent_port = self.agent.port;
        settings.extra_cidrs = self.extra_cidrs.clone();
        settings.extra_security_groups = self.extra_security_groups.clone();
        settings.spot_fallback_to_on_demand = aws.spot_fallback_to_on_demand;
        Some(settings)
    }
}

fn boot_image(settings: &BootImageSettings) -> BootImage {
    match &settings.id {
        Some(id) => BootImage::Id(id.clone()),
        None => BootImage::Filters {
            owners: settings.owners.clone(),
            filters: settings.filters.clone(),
        },
    }
}

/// The catalog the config names (its file, or the built-in one of its region).
pub fn load_catalog(config: &CellsConfig) -> Result<Catalog, CatalogError> {
    match &config.catalog_file {
        Some(path) => Catalog::from_path(path),
        None => Catalog::builtin(&match config.backend {
            BackendKind::Local => "local".to_owned(),
            BackendKind::Aws => format!("aws-{}", config.region()),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const MINIMAL: &str = "backend: local\ncontrollerId: test\ncertificateDir: /tmp/x\n";

    #[test]
    fn minimal_local_config_gets_defaults() {
        let config = CellsConfig::from_yaml_str(MINIMAL, "t").unwrap();
        assert_eq!(config.backend, BackendKind::Local);
        assert_eq!(config.region(), "local");
        assert_eq!(config.default_instance_type(), "local.small");
        assert_eq!(config.boot_timeout.0, Duration::from_secs(300));
        assert_eq!(config.agent.port, 6421);
        assert_eq!(config.agent.command, vec!["updraft-cell".to_string()]);
    }

    #[test]
    fn errors_name_the_field() {
        let err = CellsConfig::from_yaml_str(&format!("{MINIMAL}bootTimout: 5m\n"), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bootTimout"), "{err}");
        let err = CellsConfig::from_yaml_str(&format!("{MINIMAL}bootTimeout: soon\n"), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bootTimeout") && err.contains("soon"), "{err}");
        let err = CellsConfig::from_yaml_str(&format!("{MINIMAL}agent: {{port: x}}\n"), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("agent.port"), "{err}");
        let err = CellsConfig::from_yaml_str(
            "backend: aws\ncontrollerId: t\ncertificateDir: /x\nregion: us-east-1\naws: {bootImage: {id: ami-1}}\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("aws") && err.contains("subnetId"), "{err}");
        // The AWS backend's own checks run when the config is read, not at the first pod.
        const AWS: &str = "backend: aws\ncontrollerId: t\ncertificateDir: /x\nregion: us-east-1\n";
        for (aws, field, value) in [
            (
                "{subnetId: vpc-1, bootImage: {id: ami-1}}",
                "aws.subnetId",
                "vpc-1",
            ),
            (
                "{subnetId: subnet-1, bootImage: {id: ami-1}}\nextraCidrs: [10.0.0.0/33]",
                "extraCidrs[0]",
                "10.0.0.0/33",
            ),
        ] {
            let err = CellsConfig::from_yaml_str(&format!("{AWS}aws: {aws}\n"), "t")
                .unwrap_err()
                .to_string();
            assert!(err.contains(field) && err.contains(value), "{aws}: {err}");
        }
        let err = CellsConfig::from_yaml_str("backend: gce\ncontrollerId: t\n", "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("backend") && err.contains("gce"), "{err}");
        let err = CellsConfig::from_yaml_str(&format!("{MINIMAL}capacity: {{cpu: lots}}\n"), "t")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("capacity.cpu") && err.contains("lots"),
            "{err}"
        );
        let err = CellsConfig::from_yaml_str(
            "backend: local\ncontrollerId: 'a b'\ncertificateDir: /x\n",
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("controllerId"), "{err}");
        let err = CellsConfig::from_yaml_str(&format!("{MINIMAL}local: {{bridgeName: x}}\n"), "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("local") && err.contains("bridgeName"), "{err}");
    }

    #[test]
    fn standby_pool_is_parsed_and_bad_entries_are_named() {
        let config = CellsConfig::from_yaml_str(
            &format!(
                "{MINIMAL}standbyPool:\n- {{instanceType: local.small, count: 2}}\n- {{instanceType: local.small, count: 1, launchType: spot}}\n"
            ),
            "t",
        )
        .unwrap();
        assert_eq!(config.standby_pool.len(), 2);
        assert_eq!(config.standby_pool[0].count, 2);
        assert_eq!(config.standby_pool[0].launch_type(), LaunchType::OnDemand);
        assert_eq!(config.standby_pool[1].launch_type(), LaunchType::Spot);
        for (entry, field) in [
            (
                "{instanceType: local.small, count: 101}",
                "standbyPool[0].count",
            ),
            (
                "{instanceType: '', count: 1}",
                "standbyPool[0].instanceType",
            ),
            (
                "{instanceType: local.small, count: 1, launchType: cheap}",
                "standbyPool[0].launchType",
            ),
            (
                "{instanceType: local.small, count: -1}",
                "standbyPool[0].count",
            ),
            ("{instanceType: local.small, size: 1}", "standbyPool[0]"),
        ] {
            let err =
                CellsConfig::from_yaml_str(&format!("{MINIMAL}standbyPool: [{entry}]\n"), "t")
                    .unwrap_err()
                    .to_string();
            assert!(err.contains(field), "{entry}: {err}");
        }
        let err = CellsConfig::from_yaml_str(
            &format!(
                "{MINIMAL}standbyPool: [{{instanceType: a, count: 1}}, {{instanceType: a, count: 2}}]\n"
            ),
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("standbyPool[1].instanceType") && err.contains("twice"),
            "{err}"
        );
    }

    #[test]
    fn durations_accept_units_and_seconds() {
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("5 minutes"), None);
        let config =
            CellsConfig::from_yaml_str(&format!("{MINIMAL}healthTimeout: 45\n"), "t").unwrap();
        assert_eq!(config.health_timeout.0, Duration::from_secs(45));
    }
}
