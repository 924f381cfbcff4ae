use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

/// One resolved environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EnvVar {
    /// The variable's name.
    pub name: String,
    /// Its value, after `$(VAR)` expansion and reference resolution.
    pub value: String,
}

/// One file of a configMap, secret, downwardAPI or projected volume.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct VolumeFile {
    /// The file's content.
    pub data: Vec<u8>,
    /// Its permission bits (from `defaultMode`/`mode`).
    pub mode: u32,
}

impl std::fmt::Debug for VolumeFile {
    // File contents may be secret: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeFile")
            .field("bytes", &self.data.len())
            .field("mode", &format_args!("{:o}", self.mode))
            .finish()
    }
}

/// The files of one volume, by relative path.
pub type VolumeFiles = BTreeMap<String, VolumeFile>;

/// A pod with everything the provider needs resolved by the node.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedPod {
    /// The pod as in the API server (decoded from the node's compact cache for this call; a
    /// provider that keeps all of it per pod adds its full in-memory size to the node's).
    pub pod: Arc<Pod>,
    /// Environment per container name (init and app containers), in definition order.
    pub env: BTreeMap<String, Vec<EnvVar>>,
    /// The files of every configMap, secret, downwardAPI and projected volume, by volume name.
    pub volumes: BTreeMap<String, VolumeFiles>,
    /// The pod's resolver settings, formed by the node as the kubelet forms them (its
    /// `dnsPolicy` and `dnsConfig` under the node's `--cluster-dns`, `--cluster-domain` and
    /// `--resolv-conf`); `None` when the node formed none (the provider's default applies).
    pub dns: Option<PodDns>,
}

/// A pod's `/etc/resolv.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PodDns {
    /// `nameserver` lines.
    pub nameservers: Vec<String>,
    /// The `search` line.
    pub searches: Vec<String>,
    /// The `options` line.
    pub options: Vec<String>,
}

impl PodDns {
    /// The resolv.conf text.
    pub fn to_resolv_conf(&self) -> String {
        let mut text = String::new();
        for server in &self.nameservers {
            text.push_str(&format!("nameserver {server}\n"));
        }
        if !self.searches.is_empty() {
            text.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        if !self.options.is_empty() {
            text.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        text
    }
}

impl ResolvedPod {
    /// A pod whose containers get no environment and whose volumes have no files.
    pub fn unresolved(pod: impl Into<Arc<Pod>>) -> Self {
        Self {
            pod: pod.into(),
            env: BTreeMap::new(),
            volumes: BTreeMap::new(),
            dns: None,
        }
    }
}
