//! Pull errors, mapped to the kubelet's container waiting reasons.

use crate::ImageReference;

/// How the cell agent should treat a missing image (`imagePullPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    /// Always ask the registry for the manifest.
    Always,
    /// Pull only when the image is not in the local store.
    IfNotPresent,
    /// Never pull; a missing image is an error.
    Never,
}

impl PullPolicy {
    /// Parses the Kubernetes spelling; `None` for unknown values.
    pub fn from_kubernetes(value: &str) -> Option<Self> {
        match value {
            "Always" => Some(Self::Always),
            "IfNotPresent" => Some(Self::IfNotPresent),
            "Never" => Some(Self::Never),
            _ => None,
        }
    }
}

/// Why an image could not be made available, or a root filesystem not made.
///
/// Messages name the image and what the registry answered; they never contain
/// credentials.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image reference could not be parsed.
    #[error(transparent)]
    InvalidReference(#[from] crate::ReferenceError),
    /// Policy `Never` and the image is not in the local store.
    #[error("image {image} is not present and the pull policy is Never")]
    NeverPull {
        /// The image asked for.
        image: ImageReference,
    },
    /// The registry answered 401/403: no or wrong credentials.
    #[error("registry {registry} refused {} for {image}: {message}", if *.with_credentials { "the credentials" } else { "anonymous access (no imagePullSecret matches this registry)" })]
    Unauthorized {
        /// The image being pulled.
        image: ImageReference,
        /// The registry host that refused.
        registry: String,
        /// Whether credentials were sent (from an `imagePullSecret`).
        with_credentials: bool,
        /// The registry's error text.
        message: String,
    },
    /// The registry does not have the repository, tag or manifest.
    #[error("pulling {image}: {message} (registry {registry} answered 404)")]
    NotFound {
        /// The image being pulled.
        image: ImageReference,
        /// The registry host.
        registry: String,
        /// The registry's error text, e.g. `manifest unknown`.
        message: String,
    },
    /// The registry refused or failed the pull with another status.
    #[error("pulling {image}: registry answered {status}: {message}")]
    Registry {
        /// The image being pulled.
        image: ImageReference,
        /// HTTP status the registry answered with.
        status: u16,
        /// The registry's error text (never contains credentials).
        message: String,
    },
    /// The registry could not be reached.
    #[error("pulling {image}: cannot reach the registry: {message}")]
    Unreachable {
        /// The image being pulled.
        image: ImageReference,
        /// What failed (connect, TLS, timeout …).
        message: String,
    },
    /// The registry's answer does not follow the distribution spec (bad JSON,
    /// unsupported media type or schema).
    #[error("pulling {image}: the registry sent something unusable: {message}")]
    Protocol {
        /// The image being pulled.
        image: ImageReference,
        /// What is wrong with the answer.
        message: String,
    },
    /// The image index has no manifest for the cell's platform.
    #[error(
        "pulling {image}: no manifest for platform {wanted} in the image index (it has: {available})"
    )]
    NoMatchingPlatform {
        /// The image being pulled.
        image: ImageReference,
        /// The cell's platform.
        wanted: String,
        /// The platforms the index lists, comma separated.
        available: String,
    },
    /// A blob's content did not match its digest.
    #[error("pulling {image}: blob digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The image being pulled.
        image: ImageReference,
        /// The digest the manifest names.
        expected: String,
        /// The digest of the bytes received.
        actual: String,
    },
    /// A layer cannot be unpacked: bad compression, a path escaping the root,
    /// an entry through a symlink, an unsupported media type.
    #[error("unpacking layer {digest} of {image}: {message}")]
    Layer {
        /// The image whose layer it is.
        image: ImageReference,
        /// The layer's (compressed) digest.
        digest: String,
        /// What is wrong with it.
        message: String,
    },
    /// The stored image's manifest or config cannot be read.
    #[error("inspecting {image}: {message}")]
    Inspect {
        /// The image inspected.
        image: ImageReference,
        /// What is wrong with it.
        message: String,
    },
    /// A container root filesystem cannot be created or removed.
    #[error("root filesystem of container {container_id}: {message}")]
    Rootfs {
        /// The container's id as given to `create_rootfs`.
        container_id: String,
        /// What failed.
        message: String,
    },
    /// The local store (cache directory) failed.
    #[error("image store at {path}: {message}")]
    Store {
        /// The file or directory involved.
        path: std::path::PathBuf,
        /// What failed.
        message: String,
    },
}

impl ImageError {
    /// The kubelet's reason for the container's waiting state.
    ///
    /// `ImagePullBackOff` is not here: the agent reports it while it waits to
    /// retry after repeated `ErrImagePull`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidReference(_) => "InvalidImageName",
            Self::NeverPull { .. } => "ErrImageNeverPull",
            Self::Inspect { .. } => "ImageInspectError",
            Self::Rootfs { .. } => "CreateContainerError",
            Self::Unauthorized { .. }
            | Self::NotFound { .. }
            | Self::Registry { .. }
            | Self::Unreachable { .. }
            | Self::Protocol { .. }
            | Self::NoMatchingPlatform { .. }
            | Self::DigestMismatch { .. }
            | Self::Layer { .. }
            | Self::Store { .. } => "ErrImagePull",
        }
    }

    /// Whether retrying later (with backoff) may succeed without anything changing
    /// on our side. (The agent retries permanent pull errors too, with backoff,
    /// as the kubelet does: credentials or tags may appear later.)
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::DigestMismatch { .. } | Self::Store { .. } => true,
            Self::Registry { status, .. } => *status == 429 || *status >= 500,
            Self::InvalidReference(_)
            | Self::NeverPull { .. }
            | Self::Unauthorized { .. }
            | Self::NotFound { .. }
            | Self::Protocol { .. }
            | Self::NoMatchingPlatform { .. }
            | Self::Layer { .. }
            | Self::Inspect { .. }
            | Self::Rootfs { .. } => false,
        }
    }

    pub(crate) fn store(path: &std::path::Path, what: &str, err: impl std::fmt::Display) -> Self {
        Self::Store {
            path: path.to_path_buf(),
            message: format!("{what}: {err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_and_retryability() {
        let image = ImageReference::parse("busybox").unwrap();
        let never = ImageError::NeverPull {
            image: image.clone(),
        };
        assert_eq!(never.reason(), "ErrImageNeverPull");
        assert!(!never.is_transient());
        let denied = ImageError::Registry {
            image: image.clone(),
            status: 401,
            message: "UNAUTHORIZED".into(),
        };
        assert_eq!(denied.reason(), "ErrImagePull");
        assert!(!denied.is_transient());
        assert!(denied.to_string().contains("401"));
        let busy = ImageError::Registry {
            image,
            status: 503,
            message: "busy".into(),
        };
        assert!(busy.is_transient());
        let bad: ImageError = ImageReference::parse("A").unwrap_err().into();
        assert_eq!(bad.reason(), "InvalidImageName");
        assert_eq!(
            PullPolicy::from_kubernetes("Never"),
            Some(PullPolicy::Never)
        );
        assert_eq!(PullPolicy::from_kubernetes("never"), None);
    }
}
