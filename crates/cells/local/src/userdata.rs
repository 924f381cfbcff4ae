//! Reading a cell's user data the way cloud-init would: a `#cloud-config` document (plain or
//! gzip-compressed) whose `hostname`, `write_files` and `runcmd` the local backend carries out.
//! Keys that only make sense on a real machine (`users`, `ssh_authorized_keys`, `packages`, …)
//! are reported in [`CellUserData::ignored_keys`] and otherwise ignored.

use std::io::Read;
use std::path::{Component, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_yaml::Value;

use crate::error::LocalError;

/// A file from `write_files`, decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct WriteFile {
    /// Absolute, normalized path on the cell.
    pub path: PathBuf,
    /// Decoded contents (may be secret: not shown by `Debug`).
    pub contents: Vec<u8>,
    /// Mode bits (`permissions`, default 0644).
    pub mode: u32,
    /// `append: true`: added to the end of what the cell already sees at `path`.
    pub append: bool,
}

impl std::fmt::Debug for WriteFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteFile")
            .field("path", &self.path)
            .field("contents", &format_args!("<{} bytes>", self.contents.len()))
            .field("mode", &format_args!("{:#o}", self.mode))
            .field("append", &self.append)
            .finish()
    }
}

/// One `runcmd` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunCommand {
    /// An argument list, run without a shell.
    Argv(Vec<String>),
    /// A string, run by `/bin/sh -c`.
    Shell(String),
}

/// What the local backend does with a cell's user data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CellUserData {
    /// `hostname`.
    pub hostname: Option<String>,
    /// `write_files`, in order.
    pub files: Vec<WriteFile>,
    /// `runcmd`, in order.
    pub commands: Vec<RunCommand>,
    /// Top-level keys the local backend does not carry out.
    pub ignored_keys: Vec<String>,
}

fn invalid(field: impl std::fmt::Display, message: impl std::fmt::Display) -> LocalError {
    LocalError::UserData(format!("{field}: {message}"))
}

fn gunzip(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

/// Parses user data: empty, or a `#cloud-config` document, optionally gzip-compressed.
pub fn parse(user_data: &[u8]) -> Result<CellUserData, LocalError> {
    if user_data.is_empty() {
        return Ok(CellUserData::default());
    }
    let plain = if user_data.starts_with(&[0x1f, 0x8b]) {
        gunzip(user_data)
            .ok_or_else(|| LocalError::UserData("gzip data that does not decompress".into()))?
    } else {
        user_data.to_vec()
    };
    let text =
        String::from_utf8(plain).map_err(|_| LocalError::UserData("not UTF-8 text".into()))?;
    if !text.starts_with("#cloud-config") {
        return Err(LocalError::UserData(
            "not a #cloud-config document (local cells run only #cloud-config user data, not scripts or MIME multipart)".into(),
        ));
    }
    let document: Value = serde_yaml::from_str(&text)
        .map_err(|error| LocalError::UserData(format!("not valid YAML: {error}")))?;
    let mapping = match document {
        Value::Mapping(mapping) => mapping,
        Value::Null => return Ok(CellUserData::default()),
        _ => {
            return Err(LocalError::UserData(
                "the document is not a mapping of cloud-init keys".into(),
            ));
        }
    };
    let mut data = CellUserData::default();
    for (key, value) in mapping {
        let Value::String(key) = key else {
            return Err(LocalError::UserData(
                "a top-level key is not a string".into(),
            ));
        };
        match key.as_str() {
            "hostname" => data.hostname = Some(hostname(value)?),
            "write_files" => {
                let Value::Sequence(files) = value else {
                    return Err(invalid("write_files", "must be a list"));
                };
                for (index, file) in files.into_iter().enumerate() {
                    data.files.push(write_file(file, index)?);
                }
            }
            "runcmd" => {
                let Value::Sequence(commands) = value else {
                    return Err(invalid("runcmd", "must be a list"));
                };
                for (index, command) in commands.into_iter().enumerate() {
                    data.commands.push(run_command(command, index)?);
                }
            }
            _ => data.ignored_keys.push(key),
        }
    }
    Ok(data)
}

fn hostname(value: Value) -> Result<String, LocalError> {
    let Value::String(name) = value else {
        return Err(invalid("hostname", "must be a string"));
    };
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !valid {
        return Err(invalid(
            "hostname",
            format!("{name:?} must be 1-63 letters, digits or '-'"),
        ));
    }
    Ok(name)
}

fn run_command(command: Value, index: usize) -> Result<RunCommand, LocalError> {
    match command {
        Value::String(text) => Ok(RunCommand::Shell(text)),
        Value::Sequence(items) => {
            let argv: Option<Vec<String>> = items
                .into_iter()
                .map(|item| match item {
                    Value::String(text) => Some(text),
                    Value::Number(number) => Some(number.to_string()),
                    Value::Bool(flag) => Some(flag.to_string()),
                    _ => None,
                })
                .collect();
            match argv {
                Some(argv) if !argv.is_empty() => Ok(RunCommand::Argv(argv)),
                _ => Err(invalid(
                    format!("runcmd[{index}]"),
                    "must be a non-empty list of strings",
                )),
            }
        }
        _ => Err(invalid(
            format!("runcmd[{index}]"),
            "must be a shell string or a list of arguments",
        )),
    }
}

/// Makes `path` absolute and free of `.`/`..` (refusing `..`).
pub fn normalize(path: &str) -> Option<PathBuf> {
    if !path.starts_with('/') {
        return None;
    }
    let mut out = PathBuf::from("/");
    for component in std::path::Path::new(path).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (out != std::path::Path::new("/")).then_some(out)
}

fn write_file(file: Value, index: usize) -> Result<WriteFile, LocalError> {
    let field = |name: &str| format!("write_files[{index}].{name}");
    let Value::Mapping(entry) = file else {
        return Err(invalid(
            format!("write_files[{index}]"),
            "must be a mapping",
        ));
    };
    let path = match entry.get("path") {
        Some(Value::String(path)) => normalize(path).ok_or_else(|| {
            invalid(
                field("path"),
                format!("{path:?} must be an absolute file path without '..'"),
            )
        })?,
        _ => return Err(invalid(field("path"), "is required")),
    };
    let content = match entry.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(_) => return Err(invalid(field("content"), "must be a string")),
    };
    let encoding = match entry.get("encoding") {
        None | Some(Value::Null) => String::from("text/plain"),
        Some(Value::String(text)) => text.to_ascii_lowercase(),
        Some(_) => return Err(invalid(field("encoding"), "must be a string")),
    };
    let decode_b64 = |text: &str| {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        BASE64.decode(compact).map_err(|_| {
            invalid(
                field("content"),
                format!("is not valid base64 ({encoding})"),
            )
        })
    };
    let contents = match encoding.as_str() {
        "text/plain" | "" => content.into_bytes(),
        "b64" | "base64" => decode_b64(&content)?,
        "gz" | "gzip" | "gz+b64" | "gz+base64" | "gzip+b64" | "gzip+base64" => {
            gunzip(&decode_b64(&content)?).ok_or_else(|| {
                invalid(field("content"), "is not gzip data after base64 decoding")
            })?
        }
        other => {
            return Err(invalid(
                field("encoding"),
                format!("{other:?} is not supported; use text/plain, b64 or gzip+base64"),
            ));
        }
    };
    let mode = match entry.get("permissions") {
        None | Some(Value::Null) => 0o644,
        Some(Value::String(text)) => u32::from_str_radix(text.trim(), 8)
            .ok()
            .filter(|mode| *mode <= 0o7777)
            .ok_or_else(|| {
                invalid(
                    field("permissions"),
                    format!("{text:?} must be an octal mode such as '0644'"),
                )
            })?,
        Some(_) => {
            return Err(invalid(
                field("permissions"),
                "must be a quoted octal string such as '0644'",
            ));
        }
    };
    let append = matches!(entry.get("append"), Some(Value::Bool(true)));
    Ok(WriteFile {
        path,
        contents,
        mode,
        append,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use updraft_cells_backend::cloud_init::{
        Bootstrap, BootstrapFile, CloudConfig, EC2_USER_DATA_LIMIT, UserData,
    };

    fn gzip_b64(bytes: &[u8]) -> String {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).expect("gzip");
        BASE64.encode(encoder.finish().expect("gzip"))
    }

    #[test]
    fn reads_what_the_provider_builds_plain_and_gzipped() {
        let bootstrap = Bootstrap {
            files: vec![BootstrapFile {
                path: "/etc/updraft-cell/server.key".into(),
                contents: b"secret key".to_vec(),
                mode: 0o600,
            }],
            commands: vec![vec!["updraft-cell".into(), "--tls-key".into(), "/x".into()]],
        };
        let user = CloudConfig::parse(
            &format!(
                "#cloud-config\nhostname: web-1\nusers: [default]\nwrite_files:\n  - path: /etc/motd\n    content: hi\n    append: true\n  - path: /etc/gz\n    encoding: gzip\n    content: {}\nruncmd:\n  - echo user\n",
                gzip_b64(b"zipped\n")
            ),
            "ci.yaml",
        )
        .expect("valid");
        for limit in [EC2_USER_DATA_LIMIT, 200] {
            let built = UserData::build(&bootstrap, Some(&user), limit);
            let Ok(built) = built else {
                continue; // 200 bytes is too small even gzipped; the plain case already ran
            };
            let data = parse(&built.bytes).expect("parses");
            assert_eq!(data.hostname.as_deref(), Some("web-1"));
            assert_eq!(data.ignored_keys, vec!["users".to_string()]);
            assert_eq!(data.files.len(), 3);
            assert_eq!(
                data.files[0].path,
                PathBuf::from("/etc/updraft-cell/server.key")
            );
            assert_eq!(data.files[0].contents, b"secret key");
            assert_eq!(data.files[0].mode, 0o600);
            assert_eq!(data.files[1].mode, 0o644);
            assert!(data.files[1].append);
            assert_eq!(data.files[2].contents, b"zipped\n");
            assert_eq!(
                data.commands,
                vec![
                    RunCommand::Argv(vec!["updraft-cell".into(), "--tls-key".into(), "/x".into()]),
                    RunCommand::Shell("echo user".into()),
                ]
            );
            assert!(!format!("{data:?}").contains("secret"));
        }
        // A gzipped document (what UserData::build produces over the limit) parses too.
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder
            .write_all(b"#cloud-config\nruncmd: [[true]]\n")
            .expect("gzip");
        let zipped = encoder.finish().expect("gzip");
        assert_eq!(
            parse(&zipped).expect("gzip").commands,
            vec![RunCommand::Argv(vec!["true".into()])]
        );
        assert_eq!(parse(b"").expect("empty"), CellUserData::default());
    }

    #[test]
    fn refuses_what_it_cannot_run_with_the_field_named() {
        for (text, expected) in [
            (&b"#!/bin/sh\necho hi\n"[..], "not a #cloud-config"),
            (b"\x1f\x8bgarbage", "does not decompress"),
            (b"#cloud-config\n- a\n", "not a mapping"),
            (b"#cloud-config\nwrite_files: x\n", "write_files: must be a list"),
            (
                b"#cloud-config\nwrite_files:\n  - path: etc/x\n",
                "write_files[0].path",
            ),
            (
                b"#cloud-config\nwrite_files:\n  - path: /a/../b\n",
                "without '..'",
            ),
            (
                b"#cloud-config\nwrite_files:\n  - path: /a\n    encoding: b64\n    content: '!!'\n",
                "not valid base64",
            ),
            (
                b"#cloud-config\nwrite_files:\n  - path: /a\n    permissions: 644\n",
                "quoted octal",
            ),
            (
                b"#cloud-config\nwrite_files:\n  - path: /a\n    permissions: '9'\n",
                "octal mode",
            ),
            (
                b"#cloud-config\nwrite_files:\n  - path: /a\n    encoding: zstd\n",
                "not supported",
            ),
            (b"#cloud-config\nruncmd:\n  - []\n", "runcmd[0]"),
            (b"#cloud-config\nruncmd:\n  - {a: b}\n", "runcmd[0]"),
            (b"#cloud-config\nhostname: 'a b'\n", "hostname"),
            (b"#cloud-config\nhostname: [a\n", "not valid YAML"),
        ] {
            let message = parse(text).expect_err(&String::from_utf8_lossy(text)).to_string();
            assert!(
                message.contains(expected),
                "{:?}: {message}",
                String::from_utf8_lossy(text)
            );
        }
    }
}
