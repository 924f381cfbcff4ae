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

/// Why an image could not be made available.
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
    /// The registry refused or failed the pull.
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
    /// The stored image's manifest or config cannot be read.
    #[error("inspecting {image}: {message}")]
    Inspect {
        /// The image inspected.
        image: ImageReference,
        /// What is wrong with it.
        message: String,
    },
}

impl ImageError {
    /// The kubelet's reason for the container's waiting state.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidReference(_) => "InvalidImageName",
            Self::NeverPull { .. } => "ErrImageNeverPull",
            Self::Inspect { .. } => "ImageInspectError",
            Self::Registry { .. } | Self::Unreachable { .. } | Self::DigestMismatch { .. } => {
                "ErrImagePull"
            }
        }
    }

    /// Whether retrying later (with backoff) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::DigestMismatch { .. } => true,
            Self::Registry { status, .. } => *status == 429 || *status >= 500,
            Self::InvalidReference(_) | Self::NeverPull { .. } | Self::Inspect { .. } => false,
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
