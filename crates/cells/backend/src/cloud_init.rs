//! Cell user data: the agent's bootstrap (certificates, config files, the command that starts
//! it) merged with the operator's cloud-init file, as one `#cloud-config` document.
//!
//! The operator's file may use `users` (with `ssh_authorized_keys`), `ssh_authorized_keys`,
//! `hostname`, `write_files` (plain, `b64`/`base64`, `gz`/`gzip`/`gzip+base64` content) and
//! `runcmd`; those are validated and merged. Any other cloud-init key is passed through as
//! written. The bootstrap's files come first and may not be overwritten by the operator's; the
//! agent is started before the operator's `runcmd` so a slow user command cannot delay it.
//!
//! EC2 accepts at most [`EC2_USER_DATA_LIMIT`] bytes of user data (before base64). A document
//! over the limit is gzip-compressed (cloud-init detects gzip by its magic bytes); if it is still
//! too large the error names the sizes and the largest files.

use std::fmt;
use std::io::{Read, Write};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_yaml::{Mapping, Value};

/// The EC2 user-data limit: 16 KiB of raw bytes.
pub const EC2_USER_DATA_LIMIT: usize = 16 * 1024;

/// A file the agent needs on the cell (certificates, key, config).
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapFile {
    /// Absolute path on the cell.
    pub path: String,
    /// The bytes (may be secret: never printed by `Debug`).
    pub contents: Vec<u8>,
    /// File mode, e.g. `0o600` for a key.
    pub mode: u32,
}

impl fmt::Debug for BootstrapFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapFile")
            .field("path", &self.path)
            .field(
                "contents",
                &format_args!("<{} bytes, redacted>", self.contents.len()),
            )
            .field("mode", &format_args!("{:#o}", self.mode))
            .finish()
    }
}

/// What Updraft puts on every cell: files and the commands that start the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bootstrap {
    /// Files written before anything runs.
    pub files: Vec<BootstrapFile>,
    /// Commands (argv lists, no shell) run first in `runcmd`, e.g. starting the agent.
    pub commands: Vec<Vec<String>>,
}

/// A cloud-init file that cannot be used, or user data that does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudInitError {
    /// Not YAML, or not a mapping at the top.
    #[error("cloud-init {origin}: not a #cloud-config YAML mapping: {message}")]
    NotCloudConfig {
        /// The file it came from.
        origin: String,
        /// The parser's message or what was found instead.
        message: String,
    },
    /// A supported key has a value of the wrong shape.
    #[error("cloud-init {origin}: {field}: {message}")]
    Invalid {
        /// The file it came from.
        origin: String,
        /// The key, e.g. `write_files[2].encoding`.
        field: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// The operator's `write_files` targets a path the bootstrap owns.
    #[error(
        "cloud-init {origin}: write_files[{index}] writes {path}, which the cell agent's bootstrap owns; choose another path"
    )]
    ReservedPath {
        /// The file it came from.
        origin: String,
        /// Index in `write_files`.
        index: usize,
        /// The path.
        path: String,
    },
    /// Even gzip-compressed, the user data exceeds the limit.
    #[error(
        "user data is {plain} bytes ({gzipped} gzip-compressed), over the {limit}-byte limit; largest files: {largest}. Shrink the cloud-init file (e.g. fetch big files at boot instead of embedding them)"
    )]
    TooLarge {
        /// Size of the document.
        plain: usize,
        /// Size after gzip.
        gzipped: usize,
        /// The limit.
        limit: usize,
        /// The largest `write_files` entries with their sizes.
        largest: String,
    },
}

/// The operator's cloud-init, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CloudConfig {
    origin: String,
    hostname: Option<String>,
    users: Vec<Value>,
    ssh_authorized_keys: Vec<String>,
    write_files: Vec<WriteFile>,
    runcmd: Vec<Value>,
    other: Mapping,
}

/// One `write_files` entry, decoded for validation and size accounting.
#[derive(Debug, Clone, PartialEq)]
struct WriteFile {
    path: String,
    /// The entry as written, with `encoding` normalized.
    entry: Mapping,
    /// Size of the decoded contents.
    decoded_len: usize,
}

fn gunzip(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(bytes);
    encoder.finish().unwrap_or_default()
}

impl CloudConfig {
    /// Parses the operator's cloud-init (`#cloud-config` header optional); `origin` names the
    /// file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<CloudConfig, CloudInitError> {
        let invalid = |field: String, message: &str| CloudInitError::Invalid {
            origin: origin.to_string(),
            field,
            message: message.to_string(),
        };
        if text.starts_with("#!") {
            return Err(CloudInitError::NotCloudConfig {
                origin: origin.to_string(),
                message: "a shell script (#!); only #cloud-config documents are supported".into(),
            });
        }
        let value: Value =
            serde_yaml::from_str(text).map_err(|error| CloudInitError::NotCloudConfig {
                origin: origin.to_string(),
                message: error.to_string(),
            })?;
        let mut mapping = match value {
            Value::Mapping(mapping) => mapping,
            Value::Null => Mapping::new(),
            _ => {
                return Err(CloudInitError::NotCloudConfig {
                    origin: origin.to_string(),
                    message: "the document is not a mapping of cloud-init keys".into(),
                });
            }
        };
        let mut config = CloudConfig {
            origin: origin.to_string(),
            ..Default::default()
        };
        if let Some(hostname) = mapping.remove("hostname") {
            let Value::String(hostname) = hostname else {
                return Err(invalid("hostname".into(), "must be a string"));
            };
            let valid = !hostname.is_empty()
                && hostname.len() <= 63
                && hostname
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !hostname.starts_with('-')
                && !hostname.ends_with('-');
            if !valid {
                return Err(invalid(
                    "hostname".into(),
                    "must be 1-63 letters, digits or '-', not starting or ending with '-'",
                ));
            }
            config.hostname = Some(hostname);
        }
        if let Some(keys) = mapping.remove("ssh_authorized_keys") {
            config.ssh_authorized_keys = string_list(keys)
                .ok_or_else(|| invalid("ssh_authorized_keys".into(), "must be a list of keys"))?;
        }
        if let Some(users) = mapping.remove("users") {
            let Value::Sequence(users) = users else {
                return Err(invalid("users".into(), "must be a list"));
            };
            for (index, user) in users.iter().enumerate() {
                match user {
                    Value::String(_) => {}
                    Value::Mapping(fields) => {
                        let has_name =
                            matches!(fields.get("name"), Some(Value::String(n)) if !n.is_empty());
                        if !has_name {
                            return Err(invalid(
                                format!("users[{index}].name"),
                                "is required (a user name)",
                            ));
                        }
                        if let Some(keys) = fields.get("ssh_authorized_keys")
                            && string_list(keys.clone()).is_none()
                        {
                            return Err(invalid(
                                format!("users[{index}].ssh_authorized_keys"),
                                "must be a list of keys",
                            ));
                        }
                    }
                    _ => {
                        return Err(invalid(
                            format!("users[{index}]"),
                            "must be a user mapping or \"default\"",
                        ));
                    }
                }
            }
            config.users = users;
        }
        if let Some(files) = mapping.remove("write_files") {
            let Value::Sequence(files) = files else {
                return Err(invalid("write_files".into(), "must be a list"));
            };
            for (index, file) in files.into_iter().enumerate() {
                config
                    .write_files
                    .push(parse_write_file(file, index, &invalid)?);
            }
        }
        if let Some(commands) = mapping.remove("runcmd") {
            let Value::Sequence(commands) = commands else {
                return Err(invalid("runcmd".into(), "must be a list"));
            };
            for (index, command) in commands.iter().enumerate() {
                let ok = match command {
                    Value::String(_) => true,
                    Value::Sequence(_) => string_list(command.clone()).is_some(),
                    _ => false,
                };
                if !ok {
                    return Err(invalid(
                        format!("runcmd[{index}]"),
                        "must be a shell string or a list of arguments",
                    ));
                }
            }
            config.runcmd = commands;
        }
        config.other = mapping;
        Ok(config)
    }
}

fn string_list(value: Value) -> Option<Vec<String>> {
    match value {
        Value::Sequence(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(text) => Some(text),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn parse_write_file(
    file: Value,
    index: usize,
    invalid: &dyn Fn(String, &str) -> CloudInitError,
) -> Result<WriteFile, CloudInitError> {
    let Value::Mapping(mut entry) = file else {
        return Err(invalid(
            format!("write_files[{index}]"),
            "must be a mapping",
        ));
    };
    let path = match entry.get("path") {
        Some(Value::String(path)) if path.starts_with('/') => path.clone(),
        _ => {
            return Err(invalid(
                format!("write_files[{index}].path"),
                "is required and must be an absolute path",
            ));
        }
    };
    let content = match entry.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(_) => {
            return Err(invalid(
                format!("write_files[{index}].content"),
                "must be a string",
            ));
        }
    };
    let encoding = match entry.get("encoding") {
        None | Some(Value::Null) => "text/plain".to_string(),
        Some(Value::String(text)) => text.to_ascii_lowercase(),
        Some(_) => {
            return Err(invalid(
                format!("write_files[{index}].encoding"),
                "must be a string",
            ));
        }
    };
    let field = format!("write_files[{index}].content");
    let decode_b64 = |text: &str| {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        BASE64
            .decode(compact)
            .map_err(|_| invalid(field.clone(), &format!("is not valid base64 ({encoding})")))
    };
    let (normalized, decoded_len) = match encoding.as_str() {
        "text/plain" | "" => ("text/plain", content.len()),
        "b64" | "base64" => ("b64", decode_b64(&content)?.len()),
        // cloud-init's plain `gz`/`gzip` wants raw bytes (a YAML !!binary); in a text file the
        // content is base64 either way, so both are written as gzip+base64.
        "gz" | "gzip" | "gz+b64" | "gz+base64" | "gzip+b64" | "gzip+base64" => {
            let compressed = decode_b64(&content)?;
            let plain = gunzip(&compressed)
                .ok_or_else(|| invalid(field.clone(), "is not gzip data after base64 decoding"))?;
            ("gzip+base64", plain.len())
        }
        other => {
            return Err(invalid(
                format!("write_files[{index}].encoding"),
                &format!(
                    "{other:?} is not supported; use text/plain, b64, or gzip+base64 (gz, gzip)"
                ),
            ));
        }
    };
    if normalized != "text/plain" {
        entry.insert("encoding".into(), normalized.into());
    }
    if let Some(permissions) = entry.get("permissions") {
        let ok = matches!(permissions, Value::String(p) if p.len() <= 5 && p.chars().all(|c| ('0'..='7').contains(&c)));
        if !ok {
            return Err(invalid(
                format!("write_files[{index}].permissions"),
                "must be an octal mode string such as '0644'",
            ));
        }
    }
    Ok(WriteFile {
        path,
        entry,
        decoded_len,
    })
}

/// The user data of one cell.
#[derive(Clone, PartialEq, Eq)]
pub struct UserData {
    /// The bytes to pass to the cloud (plain `#cloud-config` or its gzip).
    pub bytes: Vec<u8>,
    /// Whether `bytes` is gzip-compressed.
    pub gzipped: bool,
}

impl fmt::Debug for UserData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserData")
            .field(
                "bytes",
                &format_args!("<{} bytes, redacted>", self.bytes.len()),
            )
            .field("gzipped", &self.gzipped)
            .finish()
    }
}

impl UserData {
    /// Merges the bootstrap with the operator's cloud-init and checks the size against `limit`
    /// (use [`EC2_USER_DATA_LIMIT`] for AWS), compressing when needed.
    pub fn build(
        bootstrap: &Bootstrap,
        user: Option<&CloudConfig>,
        limit: usize,
    ) -> Result<UserData, CloudInitError> {
        let empty = CloudConfig::default();
        let user = user.unwrap_or(&empty);
        for (index, file) in user.write_files.iter().enumerate() {
            if bootstrap.files.iter().any(|b| b.path == file.path) {
                return Err(CloudInitError::ReservedPath {
                    origin: user.origin.clone(),
                    index,
                    path: file.path.clone(),
                });
            }
        }
        let mut document = Mapping::new();
        if let Some(hostname) = &user.hostname {
            document.insert("hostname".into(), hostname.clone().into());
        }
        if !user.users.is_empty() {
            document.insert("users".into(), Value::Sequence(user.users.clone()));
        }
        if !user.ssh_authorized_keys.is_empty() {
            document.insert(
                "ssh_authorized_keys".into(),
                Value::Sequence(
                    user.ssh_authorized_keys
                        .iter()
                        .map(|k| k.clone().into())
                        .collect(),
                ),
            );
        }
        let mut files: Vec<Value> = bootstrap
            .files
            .iter()
            .map(|file| {
                let mut entry = Mapping::new();
                entry.insert("path".into(), file.path.clone().into());
                entry.insert("encoding".into(), "b64".into());
                entry.insert("content".into(), BASE64.encode(&file.contents).into());
                entry.insert(
                    "permissions".into(),
                    format!("{:04o}", file.mode & 0o7777).into(),
                );
                Value::Mapping(entry)
            })
            .collect();
        files.extend(
            user.write_files
                .iter()
                .map(|file| Value::Mapping(file.entry.clone())),
        );
        if !files.is_empty() {
            document.insert("write_files".into(), Value::Sequence(files));
        }
        let mut commands: Vec<Value> = bootstrap
            .commands
            .iter()
            .map(|argv| Value::Sequence(argv.iter().map(|a| a.clone().into()).collect()))
            .collect();
        commands.extend(user.runcmd.iter().cloned());
        if !commands.is_empty() {
            document.insert("runcmd".into(), Value::Sequence(commands));
        }
        for (key, value) in &user.other {
            document.insert(key.clone(), value.clone());
        }
        let yaml = serde_yaml::to_string(&Value::Mapping(document)).map_err(|error| {
            CloudInitError::NotCloudConfig {
                origin: user.origin.clone(),
                message: error.to_string(),
            }
        })?;
        let plain = format!("#cloud-config\n{yaml}").into_bytes();
        if plain.len() <= limit {
            return Ok(UserData {
                bytes: plain,
                gzipped: false,
            });
        }
        let compressed = gzip(&plain);
        if compressed.len() <= limit {
            return Ok(UserData {
                bytes: compressed,
                gzipped: true,
            });
        }
        let mut sizes: Vec<(String, usize)> = bootstrap
            .files
            .iter()
            .map(|f| (f.path.clone(), f.contents.len()))
            .chain(
                user.write_files
                    .iter()
                    .map(|f| (f.path.clone(), f.decoded_len)),
            )
            .collect();
        sizes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let largest = sizes
            .iter()
            .take(3)
            .map(|(path, size)| format!("{path} ({size} bytes)"))
            .collect::<Vec<_>>()
            .join(", ");
        Err(CloudInitError::TooLarge {
            plain: plain.len(),
            gzipped: compressed.len(),
            limit,
            largest: if largest.is_empty() {
                "none".into()
            } else {
                largest
            },
        })
    }

    /// The plain `#cloud-config` text (decompressing when gzipped), e.g. for inspection in tests.
    pub fn text(&self) -> Option<String> {
        let bytes = if self.gzipped {
            gunzip(&self.bytes)?
        } else {
            self.bytes.clone()
        };
        String::from_utf8(bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bootstrap() -> Bootstrap {
        Bootstrap {
            files: vec![
                BootstrapFile {
                    path: "/etc/updraft/agent.key".into(),
                    contents: b"-----BEGIN PRIVATE KEY-----\nsecret\n".to_vec(),
                    mode: 0o600,
                },
                BootstrapFile {
                    path: "/etc/updraft/agent.yaml".into(),
                    contents: b"listen: 0.0.0.0:6421\n".to_vec(),
                    mode: 0o644,
                },
            ],
            commands: vec![vec![
                "/usr/local/bin/updraft-agent".into(),
                "--config".into(),
                "/etc/updraft/agent.yaml".into(),
            ]],
        }
    }

    #[test]
    fn merges_bootstrap_and_operator_config() {
        let gz = BASE64.encode(gzip(b"hello gz\n"));
        let text = format!(
            "#cloud-config\nhostname: cell-1\nusers:\n  - default\n  - name: ops\n    ssh_authorized_keys: [\"ssh-ed25519 AAAA ops\"]\nssh_authorized_keys: [\"ssh-ed25519 BBBB root\"]\nwrite_files:\n  - path: /etc/motd\n    content: hi\n  - path: /etc/b64\n    encoding: base64\n    content: aGVsbG8=\n  - path: /etc/gz\n    encoding: gz\n    content: {gz}\nruncmd:\n  - echo user\n  - [touch, /tmp/x]\npackages: [jq]\n"
        );
        let user = CloudConfig::parse(&text, "cloud-init.yaml").expect("valid");
        let data = UserData::build(&bootstrap(), Some(&user), EC2_USER_DATA_LIMIT).expect("fits");
        assert!(!data.gzipped);
        let out = data.text().expect("utf8");
        assert!(out.starts_with("#cloud-config\n"), "{out}");
        let parsed: Value = serde_yaml::from_str(&out).expect("yaml");
        assert_eq!(parsed["hostname"], Value::from("cell-1"));
        assert_eq!(parsed["users"][1]["name"], Value::from("ops"));
        assert_eq!(
            parsed["ssh_authorized_keys"][0],
            Value::from("ssh-ed25519 BBBB root")
        );
        let files = parsed["write_files"].as_sequence().expect("files");
        let paths: Vec<&str> = files.iter().filter_map(|f| f["path"].as_str()).collect();
        assert_eq!(
            paths,
            [
                "/etc/updraft/agent.key",
                "/etc/updraft/agent.yaml",
                "/etc/motd",
                "/etc/b64",
                "/etc/gz"
            ]
        );
        assert_eq!(files[0]["permissions"], Value::from("0600"));
        assert_eq!(
            BASE64
                .decode(files[0]["content"].as_str().expect("b64"))
                .expect("decode"),
            b"-----BEGIN PRIVATE KEY-----\nsecret\n"
        );
        assert_eq!(files[3]["encoding"], Value::from("b64"));
        assert_eq!(files[4]["encoding"], Value::from("gzip+base64"));
        let runcmd = parsed["runcmd"].as_sequence().expect("runcmd");
        assert_eq!(runcmd[0][0], Value::from("/usr/local/bin/updraft-agent"));
        assert_eq!(runcmd[1], Value::from("echo user"));
        assert_eq!(runcmd[2][1], Value::from("/tmp/x"));
        assert_eq!(parsed["packages"][0], Value::from("jq"));
        // Debug never shows the key.
        assert!(!format!("{:?}", bootstrap()).contains("secret"));
        assert!(!format!("{data:?}").contains("secret"));
    }

    #[test]
    fn compresses_then_refuses_with_sizes() {
        // Compressible: 30 KB of text fits after gzip.
        let big = CloudConfig::parse(
            &format!(
                "write_files:\n  - path: /etc/big\n    content: \"{}\"\n",
                "a".repeat(30_000)
            ),
            "big.yaml",
        )
        .expect("valid");
        let data = UserData::build(&bootstrap(), Some(&big), EC2_USER_DATA_LIMIT).expect("gzip");
        assert!(data.gzipped && data.bytes.len() <= EC2_USER_DATA_LIMIT);
        assert_eq!(&data.bytes[..2], &[0x1f, 0x8b]);
        assert!(data.text().expect("text").contains("/etc/big"));

        // Incompressible: pseudo-random bytes as base64.
        let mut state = 0x1234_5678_u32;
        let noise: Vec<u8> = (0..40_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect();
        let random = CloudConfig::parse(
            &format!(
                "write_files:\n  - path: /opt/blob\n    encoding: b64\n    content: {}\n",
                BASE64.encode(&noise)
            ),
            "random.yaml",
        )
        .expect("valid");
        let error = UserData::build(&bootstrap(), Some(&random), EC2_USER_DATA_LIMIT)
            .expect_err("too large");
        let message = error.to_string();
        assert!(message.contains("over the 16384-byte limit"), "{message}");
        assert!(message.contains("/opt/blob (40000 bytes)"), "{message}");
    }

    #[test]
    fn rejects_bad_operator_config() {
        let cases = [
            ("#!/bin/sh\necho hi\n", "shell script"),
            ("- just\n- a list\n", "not a mapping"),
            ("hostname: -bad-\n", "hostname"),
            ("users:\n  - shell: /bin/sh\n", "users[0].name"),
            ("write_files:\n  - content: x\n", "write_files[0].path"),
            (
                "write_files:\n  - path: /x\n    encoding: b64\n    content: '!!!'\n",
                "write_files[0].content",
            ),
            (
                "write_files:\n  - path: /x\n    encoding: gzip\n    content: aGVsbG8=\n",
                "not gzip",
            ),
            (
                "write_files:\n  - path: /x\n    encoding: zstd\n",
                "\"zstd\" is not supported",
            ),
            (
                "write_files:\n  - path: /x\n    permissions: rw\n",
                "permissions",
            ),
            ("runcmd:\n  - {a: b}\n", "runcmd[0]"),
            ("hostname: [a\n", "not a #cloud-config"),
        ];
        for (text, expected) in cases {
            let message = CloudConfig::parse(text, "ci.yaml")
                .expect_err(text)
                .to_string();
            assert!(message.contains(expected), "{text:?}: {message}");
            assert!(message.contains("ci.yaml"), "{message}");
        }
        let clash = CloudConfig::parse(
            "write_files:\n  - path: /etc/updraft/agent.key\n    content: mine\n",
            "ci.yaml",
        )
        .expect("valid alone");
        let message = UserData::build(&bootstrap(), Some(&clash), EC2_USER_DATA_LIMIT)
            .expect_err("reserved")
            .to_string();
        assert!(
            message.contains("write_files[0] writes /etc/updraft/agent.key"),
            "{message}"
        );
    }
}
