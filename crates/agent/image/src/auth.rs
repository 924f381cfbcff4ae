//! Registry credentials from Kubernetes `imagePullSecrets`.
//!
//! Credentials never appear in `Debug` output or error messages.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;

use crate::ImageReference;

/// Credentials for one pull.
#[derive(Clone, PartialEq, Eq)]
pub enum PullAuth {
    /// No credentials.
    Anonymous,
    /// User name and password (also used for the bearer token dance).
    Basic {
        /// User name.
        username: String,
        /// Password; kept out of `Debug`.
        password: String,
    },
}

impl fmt::Debug for PullAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Anonymous => f.write_str("Anonymous"),
            Self::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
        }
    }
}

/// A pull secret that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The content is not the expected JSON shape.
    #[error("pull secret is not valid docker config JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// An `auth` field is not base64 of `user:password`.
    #[error("pull secret entry for {registry:?} has an invalid auth field")]
    InvalidAuth {
        /// The registry key of the bad entry.
        registry: String,
    },
}

#[derive(serde::Deserialize)]
struct Entry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

#[derive(serde::Deserialize)]
struct DockerConfigJson {
    auths: BTreeMap<String, Entry>,
}

/// Credentials from pull secrets, keyed by normalized registry host.
#[derive(Default, Clone)]
pub struct Keyring {
    entries: Vec<(String, PullAuth)>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(r, _)| r))
            .finish()
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `127.0.0.1:5000` stays.
fn normalize_registry_key(key: &str) -> String {
    let without_scheme = key.split_once("://").map_or(key, |(_, rest)| rest);
    let host = without_scheme.split('/').next().unwrap_or_default();
    match host {
        "index.docker.io" | "registry-1.docker.io" => crate::reference::DOCKER_HUB.to_owned(),
        other => other.to_owned(),
    }
}

impl Keyring {
    /// Adds a `.dockerconfigjson` secret value.
    pub fn add_docker_config_json(&mut self, content: &[u8]) -> Result<(), SecretError> {
        let config: DockerConfigJson = serde_json::from_slice(content)?;
        self.add_entries(config.auths)
    }

    /// Adds a legacy `.dockercfg` secret value (the `auths` map without the wrapper).
    pub fn add_docker_cfg(&mut self, content: &[u8]) -> Result<(), SecretError> {
        let auths: BTreeMap<String, Entry> = serde_json::from_slice(content)?;
        self.add_entries(auths)
    }

    fn add_entries(&mut self, auths: BTreeMap<String, Entry>) -> Result<(), SecretError> {
        for (key, entry) in auths {
            let auth = match (entry.username, entry.password, entry.auth) {
                (Some(username), Some(password), _) => PullAuth::Basic { username, password },
                (_, _, Some(auth)) => {
                    let invalid = || SecretError::InvalidAuth {
                        registry: key.clone(),
                    };
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| invalid())?;
                    let text = String::from_utf8(decoded).map_err(|_| invalid())?;
                    let (username, password) = text.split_once(':').ok_or_else(invalid)?;
                    PullAuth::Basic {
                        username: username.to_owned(),
                        password: password.to_owned(),
                    }
                }
                _ => continue,
            };
            self.entries.push((normalize_registry_key(&key), auth));
        }
        Ok(())
    }

    /// The first credentials whose registry matches the image's, else anonymous.
    pub fn lookup(&self, image: &ImageReference) -> PullAuth {
        self.entries
            .iter()
            .find(|(registry, _)| *registry == image.registry)
            .map_or(PullAuth::Anonymous, |(_, auth)| auth.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_aliases_and_ports_match() {
        let mut keyring = Keyring::default();
        // "dXNlcjpwYXNz" is base64 of "user:pass".
        keyring
            .add_docker_config_json(br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},"127.0.0.1:5000":{"username":"a","password":"b"}}}"#)
            .unwrap();
        let hub = keyring.lookup(&ImageReference::parse("busybox").unwrap());
        assert_eq!(
            hub,
            PullAuth::Basic {
                username: "user".into(),
                password: "pass".into()
            }
        );
        let local = keyring.lookup(&ImageReference::parse("127.0.0.1:5000/x").unwrap());
        assert_eq!(
            local,
            PullAuth::Basic {
                username: "a".into(),
                password: "b".into()
            }
        );
        let other = keyring.lookup(&ImageReference::parse("127.0.0.1:5001/x").unwrap());
        assert_eq!(other, PullAuth::Anonymous);
        assert!(!format!("{hub:?}").contains("pass"));
    }

    #[test]
    fn legacy_dockercfg_and_bad_auth() {
        let mut keyring = Keyring::default();
        keyring
            .add_docker_cfg(br#"{"quay.io":{"auth":"dXNlcjpwYXNz"}}"#)
            .unwrap();
        assert_ne!(
            keyring.lookup(&ImageReference::parse("quay.io/a/b").unwrap()),
            PullAuth::Anonymous
        );
        let err = keyring
            .add_docker_cfg(br#"{"quay.io":{"auth":"!!"}}"#)
            .unwrap_err();
        assert!(err.to_string().contains("quay.io"));
        assert!(keyring.add_docker_config_json(b"garbage").is_err());
    }
}
