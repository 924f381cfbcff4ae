//! How the backend's, the agent's and the cost engine's errors become [`ProviderError`]s: the
//! kind decides what the node does (retry a transient failure, fail the pod on a permanent
//! one), the message says what was being done.

use updraft_cell_api::ClientError;
use updraft_cells_backend::BackendError;
use updraft_cells_catalog::CostError;
use updraft_provider::ProviderError;

/// A backend call that failed while doing `context`.
pub(crate) fn backend_error(context: &str, error: BackendError) -> ProviderError {
    let message = format!("{context}: {error}");
    if error.is_retryable() {
        ProviderError::Transient(message)
    } else {
        match error {
            BackendError::InvalidRequest { .. } => ProviderError::Permanent(message),
            // Quotas and credentials can be fixed by the operator: keep retrying.
            _ => ProviderError::Transient(message),
        }
    }
}

/// An agent call that failed while doing `context`.
pub(crate) fn client_error(context: &str, error: ClientError) -> ProviderError {
    let message = format!("{context}: {error}");
    match &error {
        ClientError::Api { status, .. } if status.as_u16() == 404 => {
            ProviderError::NotFound(message)
        }
        ClientError::Api { status, .. } if matches!(status.as_u16(), 400 | 409) => {
            ProviderError::InvalidInput(message)
        }
        _ => ProviderError::Transient(message),
    }
}

/// The cost engine refused the pod: no type fits (permanent) or its annotations are invalid.
pub(crate) fn cost_error(error: CostError) -> ProviderError {
    match error {
        CostError::Selection(e) => ProviderError::Permanent(e.to_string()),
        other => ProviderError::InvalidInput(other.to_string()),
    }
}
