/// What a provider call can fail with; the node reacts to each kind differently.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The pod or container does not exist in the provider (404 at the kubelet API).
    #[error("not found: {0}")]
    NotFound(String),
    /// The request cannot be satisfied as given (a malformed annotation, an impossible
    /// resource request); retrying will not help (400 at the kubelet API). The pod fails.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A temporary failure (the backend is busy or unreachable): retried with backoff.
    #[error("transient failure: {0}")]
    Transient(String),
    /// A failure retrying will not fix: the pod is marked failed (`ProviderFailed`).
    #[error("permanent failure: {0}")]
    Permanent(String),
    /// The provider does not implement this capability (501 at the kubelet API).
    #[error("not implemented by this provider: {0}")]
    Unsupported(&'static str),
}

impl ProviderError {
    /// Whether the node should retry the call later.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
}
