//! How the backend's, the agent's and the cost engine's errors become [`ProviderError`]s: the
//! kind decides what the node does (retry a transient failure, fail the pod on a permanent
//! one), the message says what was being done.

use updraft_cell_api::ClientError;
use updraft_cells_backend::BackendError;
use updraft_cells_catalog::CostError;
use updraft_provider::ProviderError;

/// A backend call that failed while doing `context`: the message says what failed and why
/// (the node shows it in the pod's status as it is), the backend's error stays its source.
pub(crate) fn backend_error(context: &str, error: BackendError) -> ProviderError {
    let message = format!("{context}: {error}");
    let kind = if error.is_retryable() {
        ProviderError::transient(message)
    } else {
        match error {
            BackendError::InvalidRequest { .. } => ProviderError::permanent(message),
            // Quotas and credentials can be fixed by the operator: keep retrying.
            _ => ProviderError::transient(message),
        }
    };
    kind.caused_by(error)
}

/// An agent call that failed while doing `context`, like [`backend_error`].
pub(crate) fn client_error(context: &str, error: ClientError) -> ProviderError {
    let message = format!("{context}: {error}");
    let kind = match &error {
        ClientError::Api { status, .. } if status.as_u16() == 404 => {
            ProviderError::not_found(message)
        }
        ClientError::Api { status, .. } if matches!(status.as_u16(), 400 | 409) => {
            ProviderError::invalid_input(message)
        }
        _ => ProviderError::transient(message),
    };
    kind.caused_by(error)
}

/// The cost engine refused the pod: no type fits (permanent) or its annotations are invalid.
pub(crate) fn cost_error(error: CostError) -> ProviderError {
    let kind = match &error {
        CostError::Selection(e) => ProviderError::permanent(e.to_string()),
        other => ProviderError::invalid_input(other.to_string()),
    };
    kind.caused_by(error)
}
