//! EC2 errors classified into the backend's error kinds, and the configuration's own errors.

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use updraft_cells_backend::BackendError;

/// The AWS backend's configuration cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AwsConfigError {
    /// A setting of [`crate::AwsConfig`] is missing or malformed.
    #[error("{field}: {problem}")]
    Invalid {
        /// The field as the provider config names it (`region`, `aws.subnetId`,
        /// `aws.bootImage.filters`, …).
        field: String,
        /// What is wrong and what to write instead.
        problem: String,
    },
}

impl AwsConfigError {
    pub(crate) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> AwsConfigError {
        AwsConfigError::Invalid {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The config field the error is about.
    pub fn field(&self) -> &str {
        match self {
            AwsConfigError::Invalid { field, .. } => field,
        }
    }
}

impl From<AwsConfigError> for BackendError {
    fn from(error: AwsConfigError) -> BackendError {
        BackendError::InvalidRequest {
            detail: format!("aws backend config: {error}"),
        }
    }
}

/// The EC2 error code of a service error (`InvalidAMIID.NotFound`, …), if it is one.
pub(crate) fn code<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> Option<&str> {
    match error {
        SdkError::ServiceError(context) => context.err().code(),
        _ => None,
    }
}

/// Classifies an SDK error of `operation` into a [`BackendError`] whose detail names the
/// operation, EC2's code and message (EC2 messages never contain credentials).
pub fn classify<E>(
    operation: &str,
    error: SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
) -> BackendError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &error {
        SdkError::ServiceError(context) => {
            let code = context.err().code().unwrap_or("");
            let message = context.err().message().unwrap_or("");
            let status = context.raw().status().as_u16();
            classify_code(operation, code, message, status)
        }
        SdkError::ConstructionFailure(_) => BackendError::InvalidRequest {
            detail: format!("{operation}: {}", DisplayErrorContext(&error)),
        },
        _ => {
            let detail = format!("{operation}: {}", DisplayErrorContext(&error));
            // Missing credentials surface as a dispatch failure; retrying will not help.
            if detail.contains("no credentials") || detail.contains("credentials provider") {
                BackendError::Unauthorized { detail }
            } else {
                BackendError::Transient { detail }
            }
        }
    }
}

/// The classification of an EC2 error code (public for tests of the mapping).
pub(crate) fn classify_code(
    operation: &str,
    code: &str,
    message: &str,
    status: u16,
) -> BackendError {
    let detail = if code.is_empty() {
        format!("{operation}: HTTP {status}: {message}")
    } else {
        format!("{operation}: {code}: {message}")
    };
    match code {
        c if c.ends_with(".NotFound") && c.starts_with("InvalidInstanceID") => {
            BackendError::NotFound { id: detail }
        }
        "InvalidInstanceID.Malformed" => BackendError::NotFound { id: detail },
        "InsufficientInstanceCapacity"
        | "InsufficientCapacity"
        | "InsufficientHostCapacity"
        | "InsufficientReservedInstanceCapacity"
        | "InsufficientFreeAddressesInSubnet"
        | "SpotMaxPriceTooLow"
        | "UnfulfillableCapacity" => BackendError::Capacity { detail },
        "InstanceLimitExceeded"
        | "VcpuLimitExceeded"
        | "MaxSpotInstanceCountExceeded"
        | "AddressLimitExceeded"
        | "ResourceLimitExceeded"
        | "SecurityGroupLimitExceeded"
        | "RulesPerSecurityGroupLimitExceeded" => BackendError::Quota { detail },
        "AuthFailure"
        | "UnauthorizedOperation"
        | "Blocked"
        | "OptInRequired"
        | "PendingVerification"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "ExpiredToken"
        | "RequestExpired" => BackendError::Unauthorized { detail },
        "RequestLimitExceeded"
        | "Throttling"
        | "ThrottlingException"
        | "ServiceUnavailable"
        | "Unavailable"
        | "InternalError"
        | "InternalFailure" => BackendError::Transient { detail },
        _ if status >= 500 => BackendError::Transient { detail },
        _ => BackendError::InvalidRequest { detail },
    }
}

/// `error` with `context` put before its detail (the kind is kept: a throttled lookup stays
/// transient, a refused one stays invalid).
pub(crate) fn in_context(context: &str, error: BackendError) -> BackendError {
    let with = |detail: String| format!("{context}: {detail}");
    match error {
        BackendError::NotFound { id } => BackendError::InvalidRequest {
            detail: with(format!("not found ({id})")),
        },
        BackendError::Capacity { detail } => BackendError::Capacity {
            detail: with(detail),
        },
        BackendError::Quota { detail } => BackendError::Quota {
            detail: with(detail),
        },
        BackendError::InvalidRequest { detail } => BackendError::InvalidRequest {
            detail: with(detail),
        },
        BackendError::Unauthorized { detail } => BackendError::Unauthorized {
            detail: with(detail),
        },
        BackendError::Transient { detail } => BackendError::Transient {
            detail: with(detail),
        },
    }
}

/// Whether a failed spot launch should be retried on-demand: the cloud refused spot capacity or
/// the account's spot limit, not the request itself.
pub fn spot_refused(error: &BackendError) -> bool {
    match error {
        BackendError::Capacity { .. } => true,
        BackendError::Quota { detail } => detail.contains("MaxSpotInstanceCountExceeded"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_kinds() {
        let kind = |code: &str, status| classify_code("RunInstances", code, "m", status);
        assert!(matches!(
            kind("InvalidInstanceID.NotFound", 400),
            BackendError::NotFound { .. }
        ));
        assert!(matches!(
            kind("InsufficientInstanceCapacity", 500),
            BackendError::Capacity { .. }
        ));
        assert!(matches!(
            kind("VcpuLimitExceeded", 400),
            BackendError::Quota { .. }
        ));
        assert!(matches!(
            kind("UnauthorizedOperation", 403),
            BackendError::Unauthorized { .. }
        ));
        assert!(matches!(
            kind("RequestLimitExceeded", 503),
            BackendError::Transient { .. }
        ));
        assert!(matches!(
            kind("Mystery", 502),
            BackendError::Transient { .. }
        ));
        assert!(matches!(
            kind("InvalidAMIID.NotFound", 400),
            BackendError::InvalidRequest { .. }
        ));
        let detail = kind("InvalidParameterValue", 400).to_string();
        assert_eq!(
            detail,
            "invalid request: RunInstances: InvalidParameterValue: m"
        );
    }

    #[test]
    fn spot_fallback_only_for_capacity_and_spot_limits() {
        assert!(spot_refused(&classify_code(
            "RunInstances",
            "InsufficientInstanceCapacity",
            "",
            500
        )));
        assert!(spot_refused(&classify_code(
            "RunInstances",
            "MaxSpotInstanceCountExceeded",
            "",
            400
        )));
        assert!(!spot_refused(&classify_code(
            "RunInstances",
            "VcpuLimitExceeded",
            "",
            400
        )));
        assert!(!spot_refused(&classify_code(
            "RunInstances",
            "InvalidAMIID.NotFound",
            "",
            400
        )));
    }
}
