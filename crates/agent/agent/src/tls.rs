//! The agent's TLS: its server certificate, and client certificates required and verified
//! against the provider's CA.

use std::sync::Arc;

use updraft_cell_api::client::{certs_from_pem, key_from_pem};

/// Errors of the TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Bad PEM input.
    #[error("{0}")]
    Pem(#[from] updraft_cell_api::ClientError),
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built (e.g. an empty CA).
    #[error("client CA: {0}")]
    Verifier(String),
}

/// Server config: presents `cert_pem`/`key_pem`, requires a client certificate chaining to
/// `client_ca_pem`. HTTP/1.1 only (upgrades carry exec/attach/port-forward).
pub fn server_config(
    client_ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs_from_pem(client_ca_pem)? {
        roots.add(ca)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
