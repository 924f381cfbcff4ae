//! Request and response bodies of the agent API (JSON, camelCase).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use serde::{Deserialize, Serialize};

/// Bytes carried as standard base64 in JSON.
mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }
}

/// `PUT /v1/pod`: the desired pod. Applying the same request again changes nothing; a pod
/// with another UID replaces the running one (its containers are stopped first).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyPodRequest {
    /// The Kubernetes pod (metadata and spec; status is ignored).
    pub pod: Pod,
    /// Resolved environment per container name (init and app), in order: `valueFrom`
    /// references, `envFrom` and `$(VAR)` expansion already done by the node.
    #[serde(default)]
    pub env: BTreeMap<String, Vec<EnvValue>>,
    /// Files of the configMap/secret/downwardAPI/projected volumes, by volume name.
    #[serde(default)]
    pub volumes: BTreeMap<String, VolumeContent>,
    /// Image pull credentials (`.dockerconfigjson` documents) from `imagePullSecrets`.
    #[serde(default)]
    pub pull_secrets: Vec<PullSecret>,
    /// How the pod network is set up on the cell.
    #[serde(default)]
    pub network: PodNetworkConfig,
}

/// One resolved environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvValue {
    /// Variable name.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// The content of a file-backed volume; replaces the whole previous content atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeContent {
    /// The files, by relative path (no `..`, not absolute).
    pub files: Vec<VolumeFile>,
}

/// A file of a volume.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeFile {
    /// Relative path inside the volume, e.g. `config.yaml` or `dir/key`.
    pub path: String,
    /// Content (base64 in JSON).
    #[serde(with = "b64")]
    pub content: Vec<u8>,
    /// File mode bits; 0644 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

impl std::fmt::Debug for VolumeFile {
    /// Secret volumes travel in this type: only the size of the content is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeFile")
            .field("path", &self.path)
            .field("content", &format_args!("<{} bytes>", self.content.len()))
            .field("mode", &self.mode)
            .finish()
    }
}

/// Image pull credentials: a `.dockerconfigjson` (or `.dockercfg`) document.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PullSecret {
    /// Name of the Kubernetes Secret, for messages.
    pub name: String,
    /// The document (base64 in JSON).
    #[serde(with = "b64")]
    pub docker_config_json: Vec<u8>,
}

impl std::fmt::Debug for PullSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullSecret")
            .field("name", &self.name)
            .field("docker_config_json", &"<redacted>")
            .finish()
    }
}

/// Network of the pod on the cell. `hostNetwork: true` in the pod spec overrides it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodNetworkConfig {
    /// The pod's interface; without it the pod netns has only loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<PodInterface>,
    /// DNS settings for the pod's `/etc/resolv.conf`.
    #[serde(default)]
    pub dns: DnsSettings,
}

/// A veth pair from a bridge on the cell into the pod netns, with the pod's address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInterface {
    /// Named netns (under `/run/netns`) holding the bridge; absent = the agent's netns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_netns: Option<String>,
    /// Bridge the host end of the veth joins.
    pub bridge: String,
    /// Name of the host end (≤ 15 bytes).
    pub host_veth: String,
    /// The pod IP (reported as `status.podIP`).
    pub address: Ipv4Addr,
    /// Prefix length of `address`.
    pub prefix_len: u8,
    /// Default gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
}

/// resolv.conf content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsSettings {
    /// `nameserver` lines.
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// `search` domains.
    #[serde(default)]
    pub searches: Vec<String>,
    /// `options` entries such as `ndots:5`.
    #[serde(default)]
    pub options: Vec<String>,
}

/// Answer of `PUT /v1/pod`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyPodResponse {
    /// UID of the pod now desired on the cell.
    pub uid: String,
    /// Status version after the apply; wait for later versions with `GET /v1/pod/status`.
    pub version: u64,
}

/// Answer of `GET /v1/pod/status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatusResponse {
    /// Increases with every change of `status` or `services_version`.
    pub version: u64,
    /// UID of the pod the status belongs to; absent when no pod was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The pod status in the Kubernetes shape.
    pub status: PodStatus,
    /// Version of the Service routes table in force in the pod's network namespace
    /// (`PUT /v1/services`); 0 when there is none: no pod, no table sent since the agent
    /// started (a restarted agent forgets the table, so the provider sends it again), or none
    /// could be installed.
    #[serde(default)]
    pub services_version: u64,
}

/// `GET /v1/logs/{container}` query. Log lines are in the CRI format on disk; the response is
/// the plain text (with an RFC 3339 timestamp prefix when `timestamps`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogOptions {
    /// Keep the response open and stream new lines.
    #[serde(default)]
    pub follow: bool,
    /// Only the last N lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail_lines: Option<u64>,
    /// Only lines newer than this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_seconds: Option<u64>,
    /// Only lines at or after this RFC 3339 time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_time: Option<String>,
    /// Prefix each line with its RFC 3339 timestamp.
    #[serde(default)]
    pub timestamps: bool,
    /// The previous (terminated) instance of the container.
    #[serde(default)]
    pub previous: bool,
    /// Stop after this many bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
}

/// `POST /v1/exec/{container}` query (`command` repeated once per argument).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecOptions {
    /// Program and arguments.
    pub command: Vec<String>,
    /// Forward stdin frames to the process.
    #[serde(default)]
    pub stdin: bool,
    /// Send stdout frames.
    #[serde(default)]
    pub stdout: bool,
    /// Send stderr frames (ignored with `tty`: the terminal merges them).
    #[serde(default)]
    pub stderr: bool,
    /// Run on a pseudo-terminal.
    #[serde(default)]
    pub tty: bool,
}

/// `POST /v1/attach/{container}` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachOptions {
    /// Forward stdin frames to the container's stdin (the container needs `stdin: true`).
    #[serde(default)]
    pub stdin: bool,
    /// Send stdout frames.
    #[serde(default)]
    pub stdout: bool,
    /// Send stderr frames.
    #[serde(default)]
    pub stderr: bool,
}

/// Terminal size carried by a resize frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalSize {
    /// Columns.
    pub width: u16,
    /// Rows.
    pub height: u16,
}

/// How an exec or attach stream ended (the last frame).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamEnd {
    /// Exit code of the process (128 + signal when killed); absent when it is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Why the stream failed, when it did not end with the process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Answer of `GET /v1/stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsResponse {
    /// When the numbers were read (RFC 3339).
    pub time: String,
    /// Whole-pod usage (the pod cgroup).
    pub pod: UsageStats,
    /// Per running container.
    pub containers: Vec<ContainerStats>,
    /// Interfaces of the pod network namespace.
    pub network: Vec<InterfaceStats>,
}

/// CPU, memory and filesystem usage of a cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageStats {
    /// Cumulative CPU time in nanoseconds.
    pub cpu_usage_nanos: u64,
    /// Times the CPU limit throttled the cgroup (CFS periods).
    pub cpu_throttled_periods: u64,
    /// Memory usage including page cache.
    pub memory_usage_bytes: u64,
    /// Working set (usage minus inactive file cache), as the kubelet reports it.
    pub memory_working_set_bytes: u64,
    /// Anonymous memory.
    pub memory_rss_bytes: u64,
    /// Bytes written to the container's writable layer and emptyDir volumes (pod only).
    #[serde(default)]
    pub filesystem_used_bytes: u64,
    /// Number of processes/threads.
    pub pids: u64,
}

/// Usage of one container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStats {
    /// Container name.
    pub name: String,
    /// Its usage.
    pub usage: UsageStats,
}

/// Counters of one network interface in the pod netns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceStats {
    /// Interface name.
    pub name: String,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Send errors.
    pub tx_errors: u64,
}

/// Answer of `GET /v1/version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    /// Agent version (crate version).
    pub version: String,
    /// API versions served, e.g. `["v1"]`.
    pub api_versions: Vec<String>,
    /// cgroup layout in use (`v1` or `v2`).
    pub cgroup_version: String,
}

/// Body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Machine-readable code: `NotFound`, `BadRequest`, `Conflict`, `Unavailable`, `Internal`.
    pub code: String,
    /// What went wrong and what to do.
    pub message: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_services_version_is_camel_case_and_zero_from_an_agent_without_it() {
        let json = serde_json::to_value(PodStatusResponse {
            version: 3,
            services_version: 7,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(json["servicesVersion"], 7);
        let older: PodStatusResponse =
            serde_json::from_str(r#"{"version": 3, "status": {}}"#).unwrap();
        assert_eq!(older.services_version, 0);
    }
}
