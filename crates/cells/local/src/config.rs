//! The local backend's settings (the `local:` section of the cells provider config) and the
//! IPv4 CIDR cells take their addresses from.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use updraft_cell_api::DEFAULT_AGENT_PORT;

use crate::error::LocalError;

/// Settings of the local backend. YAML/JSON in camelCase; unknown keys are refused.
///
/// ```yaml
/// local:
///   stateDir: /var/lib/updraft/local-cells
///   cidr: 10.213.0.0/16
///   bridge: updraft-cells0
///   agentBinary: /usr/local/bin/updraft-cell
///   agentPort: 6421
///   cgroupParent: updraft-cells
///   privateDirs: [/var/lib/updraft-cell]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LocalConfig {
    /// Where the backend keeps one JSON record per cell (`records/`) and each cell's files
    /// (`cells/<id>/`: its private directories, console log, pid files). Must not lie below a
    /// directory a cell's bootstrap overlays.
    pub state_dir: PathBuf,
    /// The addresses of the cells: the first one is the host bridge's (the cells' gateway),
    /// every cell takes two more (management and pod). At most /29.
    pub cidr: Ipv4Cidr,
    /// The host bridge every cell's uplink joins (at most 15 bytes).
    pub bridge: String,
    /// The `updraft-cell` program: bootstrap commands naming `updraft-cell` run this file.
    pub agent_binary: PathBuf,
    /// The port the agent listens on at the management address (`UPDRAFT_CELL_LISTEN`).
    pub agent_port: u16,
    /// The cgroup (relative to the hierarchy root) under which each cell gets `<id>`.
    pub cgroup_parent: String,
    /// Directories every cell gets as its own, empty at boot (backed by the cell's directory
    /// under `stateDir`), like a fresh disk: by default the agent's state directory.
    pub private_dirs: Vec<PathBuf>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            state_dir: PathBuf::from("/var/lib/updraft/local-cells"),
            cidr: Ipv4Cidr {
                network: Ipv4Addr::new(10, 213, 0, 0),
                prefix_len: 16,
            },
            bridge: "updraft-cells0".into(),
            agent_binary: PathBuf::from("/usr/local/bin/updraft-cell"),
            agent_port: DEFAULT_AGENT_PORT,
            cgroup_parent: "updraft-cells".into(),
            private_dirs: vec![PathBuf::from("/var/lib/updraft-cell")],
        }
    }
}

impl LocalConfig {
    /// Checks the values that parse but cannot work; the error names the field.
    pub fn validate(&self) -> Result<(), LocalError> {
        let invalid = |field: &str, message: String| LocalError::Config {
            field: field.to_string(),
            message,
        };
        if !self.state_dir.is_absolute() {
            return Err(invalid(
                "stateDir",
                format!("{} must be an absolute path", self.state_dir.display()),
            ));
        }
        let state = self.state_dir.to_string_lossy();
        if state.contains([',', ':', '\'', '\n']) || state.contains(char::is_whitespace) {
            return Err(invalid(
                "stateDir",
                format!(
                    "{state} must not contain ',', ':', quotes or whitespace (it appears in overlay mount options)"
                ),
            ));
        }
        if self.bridge.is_empty()
            || self.bridge.len() > 15
            || !self
                .bridge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(invalid(
                "bridge",
                format!(
                    "{:?} must be 1-15 letters, digits, '-', '_' or '.' (a Linux interface name)",
                    self.bridge
                ),
            ));
        }
        if self.cidr.prefix_len > 29 {
            return Err(invalid(
                "cidr",
                format!(
                    "{} is too small: it needs room for the gateway and two addresses per cell; use /29 or larger (e.g. 10.213.0.0/16)",
                    self.cidr
                ),
            ));
        }
        if self.agent_port == 0 {
            return Err(invalid("agentPort", "must not be 0".into()));
        }
        if !self.agent_binary.is_absolute() {
            return Err(invalid(
                "agentBinary",
                format!(
                    "{} must be an absolute path to the updraft-cell program",
                    self.agent_binary.display()
                ),
            ));
        }
        let parent = Path::new(&self.cgroup_parent);
        if self.cgroup_parent.is_empty()
            || parent.is_absolute()
            || parent
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(invalid(
                "cgroupParent",
                format!(
                    "{:?} must be a relative cgroup path without '..', e.g. updraft-cells",
                    self.cgroup_parent
                ),
            ));
        }
        for (index, dir) in self.private_dirs.iter().enumerate() {
            let field = format!("privateDirs[{index}]");
            crate::fs::check_mount_target(dir, &self.state_dir)
                .map_err(|message| invalid(&field, message))?;
        }
        Ok(())
    }
}

/// An IPv4 network such as `10.213.0.0/16` (host bits must be zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    /// The network address.
    pub network: Ipv4Addr,
    /// The prefix length (0-32).
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    fn mask(self) -> u32 {
        if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        }
    }

    /// The first address after the network address: the host bridge's, the cells' gateway.
    pub fn gateway(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network).wrapping_add(1))
    }

    /// The broadcast address.
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    /// Whether `address` lies in this network.
    pub fn contains(self, address: Ipv4Addr) -> bool {
        u32::from(address) & self.mask() == u32::from(self.network)
    }

    /// The addresses cells may take, lowest first: after the gateway, before the broadcast.
    pub fn cell_addresses(self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network).saturating_add(2);
        let last = u32::from(self.broadcast()).saturating_sub(1);
        (first..=last).map(Ipv4Addr::from)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR; write it as 10.213.0.0/16"))?;
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("{address:?} in {text:?} is not an IPv4 address"))?;
        let prefix_len: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("prefix length {prefix:?} in {text:?} must be 0-32"))?;
        let cidr = Ipv4Cidr {
            network: address,
            prefix_len,
        };
        let network = Ipv4Addr::from(u32::from(address) & cidr.mask());
        if network != address {
            return Err(format!(
                "{text} has host bits set; did you mean {network}/{prefix_len}?"
            ));
        }
        Ok(cidr)
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_and_names_mistakes() {
        let cidr: Ipv4Cidr = "10.213.0.0/16".parse().expect("valid");
        assert_eq!(cidr.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(cidr.broadcast(), Ipv4Addr::new(10, 213, 255, 255));
        assert!(cidr.contains(Ipv4Addr::new(10, 213, 7, 9)));
        assert!(!cidr.contains(Ipv4Addr::new(10, 214, 0, 1)));
        let small: Ipv4Cidr = "10.1.2.8/29".parse().expect("valid");
        let hosts: Vec<Ipv4Addr> = small.cell_addresses().collect();
        assert_eq!(hosts.first(), Some(&Ipv4Addr::new(10, 1, 2, 10)));
        assert_eq!(hosts.last(), Some(&Ipv4Addr::new(10, 1, 2, 14)));
        assert_eq!(hosts.len(), 5);
        for (text, expected) in [
            ("10.213.0.1/16", "did you mean 10.213.0.0/16"),
            ("10.213.0.0", "not a CIDR"),
            ("10.213.0.0/33", "must be 0-32"),
            ("10.213.0/16", "not an IPv4 address"),
        ] {
            let error = text.parse::<Ipv4Cidr>().expect_err(text);
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn config_is_camel_case_with_defaults_and_refuses_unknown_keys() {
        let config: LocalConfig =
            serde_yaml::from_str("stateDir: /srv/cells\ncidr: 10.50.0.0/24\nagentPort: 7000\n")
                .expect("valid");
        assert_eq!(config.state_dir, PathBuf::from("/srv/cells"));
        assert_eq!(config.cidr.to_string(), "10.50.0.0/24");
        assert_eq!(config.agent_port, 7000);
        assert_eq!(config.bridge, "updraft-cells0");
        config.validate().expect("valid");
        LocalConfig::default()
            .validate()
            .expect("defaults are valid");

        let unknown = serde_yaml::from_str::<LocalConfig>("bridgeName: x\n")
            .expect_err("unknown key")
            .to_string();
        assert!(unknown.contains("bridgeName"), "{unknown}");
        let bad_cidr = serde_yaml::from_str::<LocalConfig>("cidr: 10.0.0.1/8\n")
            .expect_err("host bits")
            .to_string();
        assert!(bad_cidr.contains("did you mean 10.0.0.0/8"), "{bad_cidr}");

        for (config, field) in [
            (
                LocalConfig {
                    bridge: "a-very-long-bridge-name".into(),
                    ..LocalConfig::default()
                },
                "bridge",
            ),
            (
                LocalConfig {
                    cidr: "10.0.0.0/30".parse().expect("cidr"),
                    ..LocalConfig::default()
                },
                "cidr",
            ),
            (
                LocalConfig {
                    agent_binary: "updraft-cell".into(),
                    ..LocalConfig::default()
                },
                "agentBinary",
            ),
            (
                LocalConfig {
                    cgroup_parent: "../x".into(),
                    ..LocalConfig::default()
                },
                "cgroupParent",
            ),
            (
                LocalConfig {
                    private_dirs: vec!["/proc/x".into()],
                    ..LocalConfig::default()
                },
                "privateDirs[0]",
            ),
            (
                LocalConfig {
                    state_dir: "/srv/a,b".into(),
                    ..LocalConfig::default()
                },
                "stateDir",
            ),
        ] {
            let message = config.validate().expect_err(field).to_string();
            assert!(message.contains(field), "{field}: {message}");
        }
    }
}
