//! The serving certificate through the Kubernetes CSR API, as the kubelet gets its own with
//! `serverTLSBootstrap`: a `kubernetes.io/kubelet-serving` CertificateSigningRequest as the
//! node identity, for the node's addresses, renewed before it expires. Approving the request
//! stays with the cluster (an operator, or an approver controller).

use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use kube::api::{Api, PostParams};
use kube::runtime::watcher::{self, Event};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

use crate::tls::ServingCertificate;

/// The signer the kubelet uses for its serving certificate.
pub const KUBELET_SERVING_SIGNER: &str = "kubernetes.io/kubelet-serving";

/// Why a serving certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// The key or the request could not be generated.
    #[error("generating the certificate request: {0}")]
    Generate(#[from] rcgen::Error),
    /// The API server refused or failed a call.
    #[error("CertificateSigningRequest API: {0}")]
    Api(#[from] kube::Error),
    /// The request was denied or failed; the condition's reason and message say why.
    #[error("CertificateSigningRequest {name} was {condition}: {message}")]
    Refused {
        /// The CSR's name.
        name: String,
        /// `Denied` or `Failed`.
        condition: String,
        /// The condition's reason and message.
        message: String,
    },
    /// Nobody approved (or the signer did not sign) in time.
    #[error(
        "CertificateSigningRequest {name} was not signed within {seconds} s; approve it with \
         `kubectl certificate approve {name}` or run an approver for kubelet-serving CSRs"
    )]
    NotSigned {
        /// The CSR's name.
        name: String,
        /// How long we waited.
        seconds: u64,
    },
    /// The signed certificate did not parse or did not match the key.
    #[error("the signed certificate is unusable: {0}")]
    Unusable(String),
}

/// What to ask for.
#[derive(Debug, Clone)]
pub struct ServingRequest {
    /// The node's name: the certificate is for `system:node:<name>`.
    pub node_name: String,
    /// IP addresses the kubelet port is reached at.
    pub ip_addresses: Vec<IpAddr>,
    /// DNS names the kubelet port is reached at.
    pub dns_names: Vec<String>,
    /// How long to wait for approval and signing.
    pub signing_timeout: Duration,
}

/// A certificate and key, PEM.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The signed certificate (chain), PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// When the certificate became valid.
    pub not_before: std::time::SystemTime,
    /// When the certificate expires.
    pub not_after: std::time::SystemTime,
}

/// Creates a kubelet-serving CSR with a fresh key and waits until it is signed.
/// `client` must authenticate as the node (`system:node:<name>`), as the signer requires.
pub async fn request_serving_certificate(
    client: kube::Client,
    request: &ServingRequest,
) -> Result<IssuedCertificate, CsrError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("system:node:{}", request.node_name),
    );
    params
        .distinguished_name
        .push(DnType::OrganizationName, "system:nodes");
    for dns in &request.dns_names {
        params
            .subject_alt_names
            .push(SanType::DnsName(dns.clone().try_into()?));
    }
    for ip in &request.ip_addresses {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    let csr_pem = params.serialize_request(&key)?.pem()?;

    let api = Api::<CertificateSigningRequest>::all(client);
    let csr = CertificateSigningRequest {
        metadata: kube::api::ObjectMeta {
            generate_name: Some(format!("csr-updraft-{}-", request.node_name)),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(csr_pem.into_bytes()),
            signer_name: KUBELET_SERVING_SIGNER.into(),
            // ECDSA keys sign; they do not encipher, so "key encipherment" is not asked for.
            usages: Some(vec!["digital signature".into(), "server auth".into()]),
            ..Default::default()
        },
        status: None,
    };
    let created = api.create(&PostParams::default(), &csr).await?;
    let name = created.metadata.name.unwrap_or_default();
    tracing::info!(csr = %name, "requested a kubelet-serving certificate; waiting for approval");
    let cert_pem = wait_for_certificate(&api, &name, request.signing_timeout).await?;
    let (not_before, not_after) = validity(cert_pem.as_bytes())?;
    Ok(IssuedCertificate {
        cert_pem,
        key_pem: key.serialize_pem(),
        not_before,
        not_after,
    })
}

async fn wait_for_certificate(
    api: &Api<CertificateSigningRequest>,
    name: &str,
    timeout: Duration,
) -> Result<String, CsrError> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api.clone(), config).boxed();
    let outcome = tokio::time::timeout(timeout, async {
        while let Some(event) = events.next().await {
            let csr = match event {
                Ok(Event::Apply(csr) | Event::InitApply(csr)) => csr,
                Ok(_) => continue,
                Err(err) => {
                    tracing::debug!(csr = name, "watching the CSR: {err}");
                    continue;
                }
            };
            let Some(status) = csr.status else { continue };
            for condition in status.conditions.unwrap_or_default() {
                if matches!(condition.type_.as_str(), "Denied" | "Failed")
                    && condition.status == "True"
                {
                    return Err(CsrError::Refused {
                        name: name.to_owned(),
                        condition: condition.type_,
                        message: format!(
                            "{}: {}",
                            condition.reason.unwrap_or_default(),
                            condition.message.unwrap_or_default()
                        ),
                    });
                }
            }
            if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
                return String::from_utf8(cert.0).map_err(|e| CsrError::Unusable(e.to_string()));
            }
        }
        Err(CsrError::NotSigned {
            name: name.to_owned(),
            seconds: timeout.as_secs(),
        })
    })
    .await;
    outcome.unwrap_or_else(|_| {
        Err(CsrError::NotSigned {
            name: name.to_owned(),
            seconds: timeout.as_secs(),
        })
    })
}

/// When the first certificate in `pem` becomes valid and when it expires.
pub fn validity(pem: &[u8]) -> Result<(std::time::SystemTime, std::time::SystemTime), CsrError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let der = CertificateDer::from_pem_slice(pem).map_err(|e| CsrError::Unusable(e.to_string()))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| CsrError::Unusable(e.to_string()))?;
    let at = |t: x509_parser::time::ASN1Time| {
        std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    Ok((
        at(cert.validity().not_before),
        at(cert.validity().not_after),
    ))
}

/// When to renew a certificate valid from `issued` to `expires`: at 80% of its lifetime, as
/// the kubelet does (it picks 70–90%).
pub fn renewal_time(
    issued: std::time::SystemTime,
    expires: std::time::SystemTime,
) -> std::time::SystemTime {
    let lifetime = expires.duration_since(issued).unwrap_or_default();
    issued + lifetime.mul_f64(0.8)
}

/// Keeps `serving` renewed through CSRs until the returned future is dropped. Failures are
/// retried with backoff while the current certificate is still served.
pub async fn keep_renewed(
    client: kube::Client,
    request: ServingRequest,
    serving: ServingCertificate,
    current: IssuedCertificate,
) {
    let mut current = current;
    let mut retry = Duration::from_secs(5);
    loop {
        let due = renewal_time(current.not_before, current.not_after);
        let wait = due
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        tokio::time::sleep(wait).await;
        match request_serving_certificate(client.clone(), &request).await {
            Ok(renewed) => match serving
                .replace(renewed.cert_pem.as_bytes(), renewed.key_pem.as_bytes())
            {
                Ok(()) => {
                    tracing::info!("renewed the kubelet serving certificate");
                    current = renewed;
                    retry = Duration::from_secs(5);
                }
                Err(err) => tracing::warn!("the renewed serving certificate is unusable: {err}"),
            },
            Err(err) => {
                tracing::warn!(
                    "renewing the kubelet serving certificate: {err}; retrying in {retry:?}"
                );
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(300));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_eighty_percent_of_the_lifetime() {
        let issued = std::time::UNIX_EPOCH;
        let expires = issued + Duration::from_secs(1000);
        assert_eq!(
            renewal_time(issued, expires),
            issued + Duration::from_secs(800)
        );
        assert_eq!(
            renewal_time(expires, issued),
            expires,
            "an expired certificate is due now"
        );
    }
}
