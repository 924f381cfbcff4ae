//! The provider's certificate authority for the cell agents' mutual TLS.
//!
//! Kept in the configured `certificateDir`: `ca.crt`, `ca.key`, `client.crt`, `client.key`
//! (keys mode 0600). Created on the first start and reused afterwards, so the cells started
//! before a restart (which trust this CA and hold server certificates it signed) stay
//! reachable. Each cell gets its own server certificate (DNS name
//! [`updraft_cell_api::SERVER_NAME`]) issued at start and delivered in its bootstrap.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use updraft_cell_api::ClientTls;

/// The CA could not be created, read or used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file of the directory could not be read or written.
    #[error("certificate directory {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Generating or parsing a certificate or key failed.
    #[error("certificate {what}: {message}")]
    Certificate {
        /// Which one (`ca.crt`, the server certificate…).
        what: String,
        /// rcgen's or rustls' message.
        message: String,
    },
    /// Only some of the files exist: refusing to overwrite a half CA.
    #[error(
        "certificate directory {dir} has {present} but not {missing}: restore the missing file or remove the directory to create a new CA (cells started with the old CA become unreachable)"
    )]
    Incomplete {
        /// The directory.
        dir: PathBuf,
        /// Files found.
        present: String,
        /// Files missing.
        missing: String,
    },
}

/// A server certificate for one cell's agent, PEM.
#[derive(Clone)]
pub struct ServerCertificate {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (secret: never printed).
    pub key_pem: String,
}

impl std::fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerCertificate { .. }")
    }
}

/// The loaded CA and the provider's client identity.
pub struct CellsPki {
    ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    client_tls: ClientTls,
}

impl std::fmt::Debug for CellsPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CellsPki { .. }")
    }
}

const FILES: [&str; 4] = ["ca.crt", "ca.key", "client.crt", "client.key"];

fn cert_err(what: &str, message: impl std::fmt::Display) -> PkiError {
    PkiError::Certificate {
        what: what.to_owned(),
        message: message.to_string(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    // Written under a temporary name and renamed, so a crash never leaves half a key.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).map_err(io_err(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn leaf_params(name: &str, client: bool) -> Result<rcgen::CertificateParams, PkiError> {
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(|e| cert_err(name, e))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.extended_key_usages = vec![if client {
        rcgen::ExtendedKeyUsagePurpose::ClientAuth
    } else {
        rcgen::ExtendedKeyUsagePurpose::ServerAuth
    }];
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(3600)).into();
    params.not_after = (now + std::time::Duration::from_secs(10 * 365 * 86400)).into();
    Ok(params)
}

impl CellsPki {
    /// Loads the CA from `dir`, creating the directory and a new CA on the first start.
    pub fn open(dir: &Path) -> Result<CellsPki, PkiError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let present: Vec<&str> = FILES
            .iter()
            .copied()
            .filter(|f| dir.join(f).exists())
            .collect();
        if present.is_empty() {
            Self::create(dir)?;
        } else if present.len() != FILES.len() {
            let missing: Vec<&str> = FILES
                .iter()
                .copied()
                .filter(|f| !present.contains(f))
                .collect();
            return Err(PkiError::Incomplete {
                dir: dir.to_owned(),
                present: present.join(", "),
                missing: missing.join(", "),
            });
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(io_err(&path))
        };
        let ca_pem = read("ca.crt")?;
        let ca_key =
            rcgen::KeyPair::from_pem(&read("ca.key")?).map_err(|e| cert_err("ca.key", e))?;
        let issuer =
            rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| cert_err("ca.crt", e))?;
        let client_tls = ClientTls::from_pem(
            ca_pem.as_bytes(),
            read("client.crt")?.as_bytes(),
            read("client.key")?.as_bytes(),
        )
        .map_err(|e| cert_err("client.crt", e))?;
        Ok(CellsPki {
            ca_pem,
            issuer,
            client_tls,
        })
    }

    fn create(dir: &Path) -> Result<(), PkiError> {
        let ca_key = rcgen::KeyPair::generate().map_err(|e| cert_err("ca.key", e))?;
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| cert_err("ca", e))?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "updraft cells CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let now = std::time::SystemTime::now();
        params.not_before = (now - std::time::Duration::from_secs(3600)).into();
        params.not_after = (now + std::time::Duration::from_secs(20 * 365 * 86400)).into();
        let ca_cert = params.self_signed(&ca_key).map_err(|e| cert_err("ca", e))?;
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = rcgen::Issuer::new(params, ca_key);
        let client_key = rcgen::KeyPair::generate().map_err(|e| cert_err("client.key", e))?;
        let client = leaf_params("updraft-provider", true)?
            .signed_by(&client_key, &issuer)
            .map_err(|e| cert_err("client.crt", e))?;
        // Keys first, certificates last: `open` treats a directory with all four as complete.
        write_file(&dir.join("ca.key"), &ca_key_pem, 0o600)?;
        write_file(&dir.join("client.key"), &client_key.serialize_pem(), 0o600)?;
        write_file(&dir.join("client.crt"), &client.pem(), 0o644)?;
        write_file(&dir.join("ca.crt"), &ca_cert.pem(), 0o644)?;
        tracing::info!(dir = %dir.display(), "created the cells CA");
        Ok(())
    }

    /// The CA certificate (the agents' client CA), PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The client TLS settings for [`updraft_cell_api::CellClient`].
    pub fn client_tls(&self) -> ClientTls {
        self.client_tls.clone()
    }

    /// A new server certificate for one cell's agent.
    pub fn issue_server_certificate(&self) -> Result<ServerCertificate, PkiError> {
        let key = rcgen::KeyPair::generate().map_err(|e| cert_err("server key", e))?;
        let cert = leaf_params(updraft_cell_api::SERVER_NAME, false)?
            .signed_by(&key, &self.issuer)
            .map_err(|e| cert_err("server certificate", e))?;
        Ok(ServerCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_ca_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = CellsPki::open(&dir.path().join("pki")).unwrap();
        let again = CellsPki::open(&dir.path().join("pki")).unwrap();
        assert_eq!(first.ca_pem(), again.ca_pem());
        let mode = std::fs::metadata(dir.path().join("pki/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(again.issue_server_certificate().is_ok());
    }

    #[test]
    fn a_half_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        CellsPki::open(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join("ca.key")).unwrap();
        let err = CellsPki::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("ca.key"), "{err}");
    }
}
