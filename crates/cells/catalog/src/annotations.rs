//! The pod annotations that steer a pod's cell, under `cells.updraft.dev/` with Kip's
//! `pod.elotl.co/` names accepted as aliases.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use updraft_common::quantity;

/// Updraft's annotation prefix.
pub const PREFIX: &str = "cells.updraft.dev/";
/// Kip's annotation prefix, accepted for the same names.
pub const KIP_PREFIX: &str = "pod.elotl.co/";

/// Annotation names (without prefix) read by [`CellAnnotations::parse`].
pub mod names {
    /// An instance type by exact name (`c5.xlarge`) or glob (`c5*`, `m?g.large`).
    pub const INSTANCE_TYPE: &str = "instance-type";
    /// `on-demand` or `spot`.
    pub const LAUNCH_TYPE: &str = "launch-type";
    /// `true`: the cell gets no public IP.
    pub const PRIVATE_IP_ONLY: &str = "private-ip-only";
    /// Extra security groups, comma separated.
    pub const SECURITY_GROUPS: &str = "security-groups";
    /// Root volume size, a quantity (`20Gi`).
    pub const VOLUME_SIZE: &str = "volume-size";
    /// The instance profile (IAM role) of the cell, a name or ARN.
    pub const INSTANCE_PROFILE: &str = "instance-profile";
}

/// How a cell is bought.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub enum LaunchType {
    /// Regular on-demand capacity.
    #[default]
    #[serde(rename = "on-demand")]
    OnDemand,
    /// Spot capacity: cheaper, may be refused or reclaimed.
    #[serde(rename = "spot")]
    Spot,
}

impl LaunchType {
    /// `on-demand` or `spot`.
    pub fn as_str(self) -> &'static str {
        match self {
            LaunchType::OnDemand => "on-demand",
            LaunchType::Spot => "spot",
        }
    }

    /// Parses `on-demand` / `spot` (also `ondemand`, `on_demand`, any case).
    pub fn parse(text: &str) -> Option<LaunchType> {
        match text.trim().to_ascii_lowercase().as_str() {
            "on-demand" | "ondemand" | "on_demand" => Some(LaunchType::OnDemand),
            "spot" => Some(LaunchType::Spot),
            _ => None,
        }
    }
}

impl fmt::Display for LaunchType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An instance type named exactly or by a glob (`*` any run of characters, `?` one character).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceTypePattern {
    /// An exact name such as `c5.xlarge`.
    Exact(String),
    /// A glob such as `c5*`.
    Glob(String),
}

impl InstanceTypePattern {
    /// Parses a name or glob. Instance type names use lowercase letters, digits, `.` and `-`;
    /// anything else (spaces, brackets) is refused with `None`.
    pub fn parse(text: &str) -> Option<InstanceTypePattern> {
        let text = text.trim().to_ascii_lowercase();
        let valid = !text.is_empty()
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '*' | '?'));
        if !valid {
            return None;
        }
        if text.contains(['*', '?']) {
            Some(InstanceTypePattern::Glob(text))
        } else {
            Some(InstanceTypePattern::Exact(text))
        }
    }

    /// The pattern as written (lowercased).
    pub fn as_str(&self) -> &str {
        match self {
            InstanceTypePattern::Exact(text) | InstanceTypePattern::Glob(text) => text,
        }
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            InstanceTypePattern::Exact(text) => text.eq_ignore_ascii_case(name),
            InstanceTypePattern::Glob(pattern) => glob_matches(pattern.as_bytes(), name.as_bytes()),
        }
    }
}

impl fmt::Display for InstanceTypePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Iterative glob match with backtracking to the last `*` (linear in practice for names).
/// `pattern` is lowercase; `name` is compared ASCII-case-insensitively without allocating.
fn glob_matches(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == name[n].to_ascii_lowercase()) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((star_p, star_n)) = star {
            p = star_p + 1;
            n = star_n + 1;
            star = Some((star_p, star_n + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The cell settings a pod asks for through annotations. `None`/empty means "not set": the
/// provider's configuration applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CellAnnotations {
    /// `instance-type`: exact name or glob.
    pub instance_type: Option<InstanceTypePattern>,
    /// `launch-type`.
    pub launch_type: Option<LaunchType>,
    /// `private-ip-only`.
    pub private_ip_only: Option<bool>,
    /// `security-groups`, in the order given, without empty entries.
    pub security_groups: Vec<String>,
    /// `volume-size` in bytes.
    pub volume_size_bytes: Option<u64>,
    /// `instance-profile`.
    pub instance_profile: Option<String>,
}

/// A cell annotation that cannot be used; the pod must not be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    /// The value is not valid for the annotation.
    #[error("annotation {annotation}={value:?} is invalid: expected {expected}")]
    Invalid {
        /// The full annotation key as written on the pod.
        annotation: String,
        /// The rejected value.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// The Updraft and the Kip spelling are both set, to different values.
    #[error(
        "annotations {updraft}={updraft_value:?} and {kip}={kip_value:?} disagree; set only one of them"
    )]
    Conflict {
        /// The `cells.updraft.dev/` key.
        updraft: String,
        /// Its value.
        updraft_value: String,
        /// The `pod.elotl.co/` key.
        kip: String,
        /// Its value.
        kip_value: String,
    },
}

impl CellAnnotations {
    /// Reads the cell annotations of a pod. Keys under either prefix that are not cell settings
    /// (including annotations Updraft writes itself) are ignored.
    pub fn parse(
        annotations: &BTreeMap<String, String>,
    ) -> Result<CellAnnotations, AnnotationError> {
        let mut parsed = CellAnnotations::default();
        if let Some((key, value)) = lookup(annotations, names::INSTANCE_TYPE)? {
            parsed.instance_type = Some(InstanceTypePattern::parse(value).ok_or_else(|| {
                invalid(
                    key,
                    value,
                    "an instance type name such as c5.xlarge or a glob such as c5* (letters, digits, '.', '-', '*', '?')",
                )
            })?);
        }
        if let Some((key, value)) = lookup(annotations, names::LAUNCH_TYPE)? {
            let expected = if value.trim().eq_ignore_ascii_case("dedicated") {
                "on-demand or spot (dedicated tenancy is not supported by Updraft)"
            } else {
                "on-demand or spot"
            };
            parsed.launch_type =
                Some(LaunchType::parse(value).ok_or_else(|| invalid(key, value, expected))?);
        }
        if let Some((key, value)) = lookup(annotations, names::PRIVATE_IP_ONLY)? {
            parsed.private_ip_only = Some(match value.trim() {
                "true" | "True" | "TRUE" | "t" | "T" | "1" => true,
                "false" | "False" | "FALSE" | "f" | "F" | "0" => false,
                _ => return Err(invalid(key, value, "true or false")),
            });
        }
        if let Some((key, value)) = lookup(annotations, names::SECURITY_GROUPS)? {
            for group in value.split(',').map(str::trim).filter(|g| !g.is_empty()) {
                if group.chars().any(char::is_whitespace) {
                    return Err(invalid(
                        key,
                        value,
                        "a comma-separated list of security group ids or names (sg-0123,web)",
                    ));
                }
                parsed.security_groups.push(group.to_string());
            }
        }
        if let Some((key, value)) = lookup(annotations, names::VOLUME_SIZE)? {
            let bytes = quantity::bytes(value)
                .map_err(|error| invalid(key, value, &format!("a size such as 20Gi ({error})")))?;
            if bytes == 0 {
                return Err(invalid(key, value, "a size larger than zero, such as 20Gi"));
            }
            parsed.volume_size_bytes = Some(bytes);
        }
        if let Some((key, value)) = lookup(annotations, names::INSTANCE_PROFILE)? {
            let profile = value.trim();
            if profile.is_empty() || profile.chars().any(char::is_whitespace) {
                return Err(invalid(
                    key,
                    value,
                    "an instance profile name or ARN without spaces",
                ));
            }
            parsed.instance_profile = Some(profile.to_string());
        }
        Ok(parsed)
    }
}

fn invalid(key: &str, value: &str, expected: &str) -> AnnotationError {
    AnnotationError::Invalid {
        annotation: key.to_string(),
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

/// The value of `name` under either prefix, with the key it was found under.
fn lookup<'a>(
    annotations: &'a BTreeMap<String, String>,
    name: &str,
) -> Result<Option<(&'a str, &'a str)>, AnnotationError> {
    let updraft = annotations.get_key_value(&format!("{PREFIX}{name}"));
    let kip = annotations.get_key_value(&format!("{KIP_PREFIX}{name}"));
    match (updraft, kip) {
        (Some((uk, uv)), Some((kk, kv))) if uv.trim() != kv.trim() => {
            Err(AnnotationError::Conflict {
                updraft: uk.clone(),
                updraft_value: uv.clone(),
                kip: kk.clone(),
                kip_value: kv.clone(),
            })
        }
        (Some((key, value)), _) | (None, Some((key, value))) => {
            Ok(Some((key.as_str(), value.as_str())))
        }
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_all_settings_under_both_prefixes() {
        let parsed = CellAnnotations::parse(&map(&[
            ("cells.updraft.dev/instance-type", "c5*"),
            ("pod.elotl.co/launch-type", "spot"),
            ("cells.updraft.dev/private-ip-only", "true"),
            ("pod.elotl.co/security-groups", "sg-1, web ,,"),
            ("cells.updraft.dev/volume-size", "20Gi"),
            ("cells.updraft.dev/instance-profile", "cells-role"),
            ("cells.updraft.dev/selected-instance-type", "ignored"),
        ]))
        .expect("valid");
        assert_eq!(
            parsed,
            CellAnnotations {
                instance_type: Some(InstanceTypePattern::Glob("c5*".into())),
                launch_type: Some(LaunchType::Spot),
                private_ip_only: Some(true),
                security_groups: vec!["sg-1".into(), "web".into()],
                volume_size_bytes: Some(20 << 30),
                instance_profile: Some("cells-role".into()),
            }
        );
    }

    #[test]
    fn errors_name_the_annotation() {
        let message = CellAnnotations::parse(&map(&[("pod.elotl.co/launch-type", "dedicated")]))
            .expect_err("dedicated")
            .to_string();
        assert!(message.contains("pod.elotl.co/launch-type"), "{message}");
        assert!(
            message.contains("dedicated tenancy is not supported"),
            "{message}"
        );
        let message = CellAnnotations::parse(&map(&[("cells.updraft.dev/volume-size", "big")]))
            .expect_err("size")
            .to_string();
        assert!(
            message.contains("cells.updraft.dev/volume-size"),
            "{message}"
        );
        assert!(
            CellAnnotations::parse(&map(&[("cells.updraft.dev/private-ip-only", "yes")])).is_err()
        );
        assert!(
            CellAnnotations::parse(&map(&[("cells.updraft.dev/instance-type", "c5 large")]))
                .is_err()
        );
        let conflict = CellAnnotations::parse(&map(&[
            ("cells.updraft.dev/launch-type", "spot"),
            ("pod.elotl.co/launch-type", "on-demand"),
        ]))
        .expect_err("conflict");
        assert!(matches!(conflict, AnnotationError::Conflict { .. }));
    }

    #[test]
    fn globs() {
        let c5 = InstanceTypePattern::parse("c5*").expect("glob");
        assert!(c5.matches("c5.large") && c5.matches("c5a.large") && !c5.matches("c6i.large"));
        let any_large = InstanceTypePattern::parse("*.LARGE").expect("glob");
        assert!(any_large.matches("m5.large") && !any_large.matches("m5.xlarge"));
        let one = InstanceTypePattern::parse("m?g.*").expect("glob");
        assert!(one.matches("m6g.large") && one.matches("m7g.metal") && !one.matches("m6i.large"));
        assert!(
            InstanceTypePattern::parse("*")
                .expect("glob")
                .matches("anything")
        );
        assert_eq!(
            InstanceTypePattern::parse("c5.large"),
            Some(InstanceTypePattern::Exact("c5.large".into()))
        );
    }
}
