//! What a provider call can fail with.
//!
//! The kind decides what the node does (retry, fail the pod, answer 404/400/501 at the kubelet
//! API); the message says what the provider was doing, and the source, when there is one,
//! keeps the typed cause (a backend's or an agent client's error) so that its chain reaches
//! logs and the pod's status intact. Render one with `updraft_common::error_chain`, which
//! prints the message followed by every cause; `Display` alone prints the kind and the message.

use std::error::Error;
use std::sync::Arc;

/// The cause of a [`ProviderError`]: any error, shared so that the error stays `Clone`.
pub type Cause = Arc<dyn Error + Send + Sync + 'static>;

/// What a provider call can fail with; the node reacts to each kind differently.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The pod or container does not exist in the provider (404 at the kubelet API).
    #[error("not found: {message}")]
    NotFound {
        /// What was not found.
        message: String,
        /// Why, when a lower layer said so.
        #[source]
        source: Option<Cause>,
    },
    /// The request cannot be satisfied as given (a malformed annotation, an impossible
    /// resource request); retrying will not help (400 at the kubelet API). The pod fails.
    #[error("invalid input: {message}")]
    InvalidInput {
        /// What is wrong with the request, naming the field.
        message: String,
        /// The lower layer's refusal, if any.
        #[source]
        source: Option<Cause>,
    },
    /// A temporary failure (the backend is busy or unreachable): retried with backoff.
    #[error("transient failure: {message}")]
    Transient {
        /// What the provider was doing.
        message: String,
        /// The lower layer's error, if any.
        #[source]
        source: Option<Cause>,
    },
    /// A failure retrying will not fix: the pod is marked failed (`ProviderFailed`).
    #[error("permanent failure: {message}")]
    Permanent {
        /// What the provider was doing and why it cannot succeed.
        message: String,
        /// The lower layer's error, if any.
        #[source]
        source: Option<Cause>,
    },
    /// The provider does not implement this capability (501 at the kubelet API).
    #[error("not implemented by this provider: {0}")]
    Unsupported(&'static str),
}

impl ProviderError {
    /// [`ProviderError::NotFound`] without a source.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound {
            message: message.into(),
            source: None,
        }
    }

    /// [`ProviderError::InvalidInput`] without a source.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::InvalidInput {
            message: message.into(),
            source: None,
        }
    }

    /// [`ProviderError::Transient`] without a source.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::Transient {
            message: message.into(),
            source: None,
        }
    }

    /// [`ProviderError::Permanent`] without a source.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
            source: None,
        }
    }

    /// [`ProviderError::Unsupported`]: the capability `what` is not implemented.
    pub fn unsupported(what: &'static str) -> Self {
        Self::Unsupported(what)
    }

    /// The same error, caused by `cause` (replacing an earlier cause). An `Unsupported` error
    /// has no cause and is returned unchanged.
    #[must_use]
    pub fn caused_by(mut self, cause: impl Error + Send + Sync + 'static) -> Self {
        match &mut self {
            Self::NotFound { source, .. }
            | Self::InvalidInput { source, .. }
            | Self::Transient { source, .. }
            | Self::Permanent { source, .. } => *source = Some(Arc::new(cause)),
            Self::Unsupported(_) => {}
        }
        self
    }

    /// Whether the node should retry the call later.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }

    /// The provider's own message, without the kind and the causes.
    pub fn message(&self) -> &str {
        match self {
            Self::NotFound { message, .. }
            | Self::InvalidInput { message, .. }
            | Self::Transient { message, .. }
            | Self::Permanent { message, .. } => message,
            Self::Unsupported(what) => what,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::ProviderError;

    #[derive(Debug, thiserror::Error)]
    #[error("connection refused")]
    struct Refused;

    #[test]
    fn the_cause_is_kept_as_the_source() {
        let error = ProviderError::transient("starting a cell").caused_by(Refused);
        assert!(error.is_transient());
        assert_eq!(error.to_string(), "transient failure: starting a cell");
        assert_eq!(error.message(), "starting a cell");
        let source = error.source().map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("connection refused"));
        assert_eq!(
            updraft_common::error_chain(&error),
            "transient failure: starting a cell: connection refused"
        );
    }

    #[test]
    fn unsupported_has_no_cause() {
        let error = ProviderError::unsupported("port-forward").caused_by(Refused);
        assert!(error.source().is_none());
        assert!(!error.is_transient());
    }
}
