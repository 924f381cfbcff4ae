//! Kubeconfig files for the identities that talk to the dev cluster.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use crate::Result;
use crate::pki::{CertifiedKey, write_secret};

/// The API server's address as every kubeconfig names it.
pub fn server_url(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

/// Renders a self-contained kubeconfig (certificates inlined) for one user.
pub fn render(server: &str, ca_pem: &str, user: &str, credentials: &Credentials) -> String {
    let ca = STANDARD.encode(ca_pem);
    let auth = match credentials {
        Credentials::ClientCertificate(cert) => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            STANDARD.encode(&cert.cert_pem),
            STANDARD.encode(&cert.key_pem)
        ),
        Credentials::Token(token) => format!("    token: {token}\n"),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: updraft-dev\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n{auth}contexts:\n- name: {user}@updraft-dev\n  \
         context:\n    cluster: updraft-dev\n    user: {user}\ncurrent-context: {user}@updraft-dev\n"
    )
}

/// How a kubeconfig's user authenticates.
#[derive(Debug)]
pub enum Credentials {
    /// An X.509 client certificate and its key.
    ClientCertificate(CertifiedKey),
    /// A bearer token (e.g. a service account token from the TokenRequest API).
    Token(String),
}

/// Writes a kubeconfig readable by its owner only (it holds credentials).
pub fn write(path: &Path, contents: &str) -> Result<()> {
    write_secret(path, contents)
}
