//! Talking to a registry through `oci-client`: manifests (with image index
//! platform selection), configs and layer blobs, each verified against its
//! digest; registry failures turned into [`ImageError`]s that name the image and
//! the registry's answer.

use std::path::Path;

use futures::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use tokio::io::AsyncWriteExt as _;
use updraft_common::error_chain;

use crate::{DigestError, DigestVerifier, ImageError, ImageReference, Platform, PullAuth};

/// The largest manifest or config we accept, so a hostile registry cannot make us
/// hold gigabytes in memory.
const MAX_JSON_BLOB: i64 = 8 * 1024 * 1024;

/// One pull session against one registry with one set of credentials.
///
/// A fresh `oci_client::Client` per session: the client remembers the first
/// credentials it saw for a registry, and a later pull with other credentials
/// (a fixed pull secret) must not reuse them.
pub(crate) struct RegistrySession {
    client: oci_client::Client,
    auth: RegistryAuth,
    image: ImageReference,
    reference: oci_client::Reference,
    with_credentials: bool,
}

/// A resolved image: its platform manifest and that manifest's digest.
pub(crate) struct Resolved {
    pub(crate) manifest: OciImageManifest,
    pub(crate) digest: String,
}

impl RegistrySession {
    /// A client for one registry and one set of credentials. Callers keep it per
    /// (registry, credentials) and reuse it: connections and bearer tokens carry over.
    pub(crate) fn client(plain_http: bool) -> Result<oci_client::Client, String> {
        install_crypto_provider();
        let config = ClientConfig {
            protocol: if plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..ClientConfig::default()
        };
        oci_client::Client::try_from(config)
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    }

    /// A session with `client`, which must only ever have been used with `auth`
    /// (it remembers the first credentials it saw for a registry).
    pub(crate) fn new(client: oci_client::Client, image: &ImageReference, auth: &PullAuth) -> Self {
        let reference = match (&image.tag, &image.digest) {
            (Some(tag), Some(digest)) => oci_client::Reference::with_tag_and_digest(
                image.registry.clone(),
                image.repository.clone(),
                tag.clone(),
                digest.clone(),
            ),
            (_, Some(digest)) => oci_client::Reference::with_digest(
                image.registry.clone(),
                image.repository.clone(),
                digest.clone(),
            ),
            (tag, None) => oci_client::Reference::with_tag(
                image.registry.clone(),
                image.repository.clone(),
                tag.clone().unwrap_or_else(|| "latest".to_owned()),
            ),
        };
        let (auth, with_credentials) = match auth {
            PullAuth::Anonymous => (RegistryAuth::Anonymous, false),
            PullAuth::Basic { username, password } => (
                RegistryAuth::Basic(username.clone(), password.clone()),
                true,
            ),
        };
        Self {
            client,
            auth,
            image: image.clone(),
            reference,
            with_credentials,
        }
    }

    /// Fetches the manifest; for an image index, the entry for `platform`.
    pub(crate) async fn resolve(&self, platform: &Platform) -> Result<Resolved, ImageError> {
        let (manifest, digest) = self
            .client
            .pull_manifest(&self.reference, &self.auth)
            .await
            .map_err(|e| self.error(e))?;
        match manifest {
            OciManifest::Image(manifest) => Ok(Resolved { manifest, digest }),
            OciManifest::ImageIndex(index) => {
                let mut available = Vec::new();
                let mut chosen = None;
                for entry in &index.manifests {
                    let Some(p) = &entry.platform else { continue };
                    let (os, arch) = (p.os.to_string(), p.architecture.to_string());
                    available.push(match &p.variant {
                        Some(v) => format!("{os}/{arch}/{v}"),
                        None => format!("{os}/{arch}"),
                    });
                    if chosen.is_none() && platform.matches(&os, &arch, p.variant.as_deref()) {
                        chosen = Some(entry.digest.clone());
                    }
                }
                let Some(platform_digest) = chosen else {
                    return Err(ImageError::NoMatchingPlatform {
                        image: self.image.clone(),
                        wanted: platform.to_string(),
                        available: available.join(", "),
                    });
                };
                tracing::debug!(image = %self.image, %platform, digest = %platform_digest, "picked image index entry");
                let by_digest = self.reference.clone_with_digest(platform_digest.clone());
                let (manifest, digest) = self
                    .client
                    .pull_manifest(&by_digest, &self.auth)
                    .await
                    .map_err(|e| self.error(e))?;
                match manifest {
                    OciManifest::Image(manifest) => Ok(Resolved { manifest, digest }),
                    OciManifest::ImageIndex(_) => Err(ImageError::Protocol {
                        image: self.image.clone(),
                        message: format!(
                            "index entry {platform_digest} is another index, not an image manifest"
                        ),
                    }),
                }
            }
        }
    }

    /// Fetches a small JSON blob (the image config) into memory, verified.
    pub(crate) async fn fetch_json_blob(
        &self,
        descriptor: &OciDescriptor,
    ) -> Result<Vec<u8>, ImageError> {
        if descriptor.size > MAX_JSON_BLOB {
            return Err(ImageError::Protocol {
                image: self.image.clone(),
                message: format!(
                    "config {} is {} bytes, more than the {MAX_JSON_BLOB} accepted",
                    descriptor.digest, descriptor.size
                ),
            });
        }
        let mut data = Vec::new();
        self.stream_blob(descriptor, &mut data).await?;
        Ok(data)
    }

    /// Downloads a blob into `path` (created), verified against its digest and size.
    pub(crate) async fn fetch_blob_to_file(
        &self,
        descriptor: &OciDescriptor,
        path: &Path,
    ) -> Result<(), ImageError> {
        let file = tokio::fs::File::create(path)
            .await
            .map_err(|e| ImageError::store(path, "creating blob file", e))?;
        let mut writer = tokio::io::BufWriter::with_capacity(256 * 1024, file);
        self.stream_blob(descriptor, &mut writer).await?;
        writer
            .flush()
            .await
            .map_err(|e| ImageError::store(path, "writing blob file", e))?;
        writer
            .into_inner()
            .sync_all()
            .await
            .map_err(|e| ImageError::store(path, "syncing blob file", e))
    }

    async fn stream_blob<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        descriptor: &OciDescriptor,
        sink: &mut W,
    ) -> Result<(), ImageError> {
        let mut verifier =
            DigestVerifier::new(&descriptor.digest).map_err(|e| ImageError::Protocol {
                image: self.image.clone(),
                message: e.to_string(),
            })?;
        let mut stream = self
            .client
            .pull_blob_stream(&self.reference, descriptor)
            .await
            .map_err(|e| self.error(e))?;
        let limit = u64::try_from(descriptor.size).unwrap_or(0);
        let mut received: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                // oci-client checks the digest too and reports a mismatch as an
                // error after the last chunk; our own verdict names both digests.
                Err(e) => {
                    return Err(match verifier.finish() {
                        Err(mismatch) => self.digest_error(mismatch),
                        Ok(()) => ImageError::Unreachable {
                            image: self.image.clone(),
                            message: format!("reading blob {}: {e}", descriptor.digest),
                        },
                    });
                }
            };
            received += chunk.len() as u64;
            if limit > 0 && received > limit {
                return Err(ImageError::Protocol {
                    image: self.image.clone(),
                    message: format!(
                        "blob {} is longer than the {limit} bytes its descriptor says",
                        descriptor.digest
                    ),
                });
            }
            verifier.update(&chunk);
            sink.write_all(&chunk)
                .await
                .map_err(|e| ImageError::Store {
                    path: std::path::PathBuf::from("<blob>"),
                    message: format!("writing blob {}: {e}", descriptor.digest),
                })?;
        }
        verifier.finish().map_err(|e| self.digest_error(e))
    }

    fn digest_error(&self, error: DigestError) -> ImageError {
        match error {
            DigestError::Mismatch { expected, actual } => ImageError::DigestMismatch {
                image: self.image.clone(),
                expected,
                actual,
            },
            DigestError::Unsupported(digest) => ImageError::Protocol {
                image: self.image.clone(),
                message: format!("unsupported digest {digest:?}"),
            },
        }
    }

    /// Turns an `oci-client` error into ours: the registry's answer, never credentials.
    fn error(&self, error: OciDistributionError) -> ImageError {
        let image = self.image.clone();
        let registry = self.image.registry.clone();
        match error {
            OciDistributionError::UnauthorizedError { .. } => ImageError::Unauthorized {
                image,
                registry,
                with_credentials: self.with_credentials,
                message: "401 Unauthorized".to_owned(),
            },
            OciDistributionError::AuthenticationFailure(reason) => ImageError::Unauthorized {
                image,
                registry,
                with_credentials: self.with_credentials,
                message: format!("token request failed: {}", truncate(&reason)),
            },
            OciDistributionError::RegistryError { envelope, .. } => {
                let message = envelope
                    .errors
                    .iter()
                    .map(|e| {
                        if e.message.is_empty() {
                            format!("{:?}", e.code)
                        } else {
                            e.message.clone()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                let first = envelope.errors.first().map(|e| &e.code);
                match first {
                    Some(
                        OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown,
                    ) => ImageError::NotFound {
                        image,
                        registry,
                        message,
                    },
                    Some(OciErrorCode::Unauthorized | OciErrorCode::Denied) => {
                        ImageError::Unauthorized {
                            image,
                            registry,
                            with_credentials: self.with_credentials,
                            message,
                        }
                    }
                    Some(OciErrorCode::Toomanyrequests) => ImageError::Registry {
                        image,
                        status: 429,
                        message,
                    },
                    _ => ImageError::Registry {
                        image,
                        status: 400,
                        message,
                    },
                }
            }
            OciDistributionError::ServerError {
                code: 404, message, ..
            } => ImageError::NotFound {
                image,
                registry,
                message: truncate(&message),
            },
            OciDistributionError::ServerError { code, message, .. } => ImageError::Registry {
                image,
                status: code,
                message: truncate(&message),
            },
            OciDistributionError::DigestError(
                oci_client::errors::DigestError::VerificationError { expected, actual },
            ) => ImageError::DigestMismatch {
                image,
                expected,
                actual,
            },
            OciDistributionError::RequestError(e) => ImageError::Unreachable {
                image,
                message: error_chain(&e),
            },
            OciDistributionError::IoError(e) => ImageError::Unreachable {
                image,
                message: e.to_string(),
            },
            other => ImageError::Protocol {
                image,
                message: other.to_string(),
            },
        }
    }
}

/// Registry bodies can be whole HTML pages; keep messages readable.
fn truncate(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_owned(),
    }
}

/// reqwest (inside oci-client) is built without a default TLS crypto provider;
/// install the ring provider the rest of the workspace uses, once per process.
pub(crate) fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing the race to another thread installing one is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
