//! Building the configured [`CellBackend`], and what the provider needs of it at start-up
//! (the local backend's resumed starts, the AWS backend's checks).

use std::sync::Arc;

use updraft_cells_aws::{AwsBackend, AwsConfig};
use updraft_cells_backend::{BackendError, CellBackend};
use updraft_cells_local::LocalBackend;

use crate::config::{BackendKind, CellsConfig, load_catalog};
use crate::pod_interface::PodInterfaceSource;

/// The backend could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BackendSetupError {
    /// A settings section is missing or unusable.
    #[error("backend {backend}: {message}")]
    Config {
        /// `local` or `aws`.
        backend: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A credentials file could not be read (its content is never shown).
    #[error("reading {field} {path}: {source}")]
    Secret {
        /// The config field naming the file.
        field: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The AWS backend refused its configuration at start-up (an image or subnet that does
    /// not exist).
    #[error("the aws backend cannot start cells with this config: {source}")]
    Prepare {
        /// The backend's error, naming the setting.
        #[source]
        source: BackendError,
    },
}

/// The AWS backend's settings from the provider config.
pub fn aws_config(config: &CellsConfig) -> Result<AwsConfig, BackendSetupError> {
    config
        .aws_backend_config()
        .ok_or_else(|| BackendSetupError::Config {
            backend: "aws",
            message: "the config has no aws section".into(),
        })
}

fn read_secret(field: &'static str, path: &std::path::Path) -> Result<String, BackendSetupError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| BackendSetupError::Secret {
            field,
            path: path.to_owned(),
            source,
        })
}

/// The backend the config names, ready to start cells.
pub async fn connect_backend(
    config: &CellsConfig,
) -> Result<Arc<dyn CellBackend>, BackendSetupError> {
    match config.backend {
        BackendKind::Aws => Ok(Arc::new(aws_backend(config).await?)),
        BackendKind::Local => Ok(Arc::new(local(config)?)),
    }
}

/// The AWS backend of `config` (its `aws` section), with credentials from the configured files
/// or else from the SDK's default chain.
pub async fn aws_backend(config: &CellsConfig) -> Result<AwsBackend, BackendSetupError> {
    let settings = aws_config(config)?;
    let aws = config.aws.as_ref();
    let files = aws.and_then(|a| {
        a.access_key_id_file
            .as_ref()
            .zip(a.secret_access_key_file.as_ref())
    });
    let backend = match files {
        Some((id_file, secret_file)) => {
            let id = read_secret("aws.accessKeyIdFile", id_file)?;
            let secret = read_secret("aws.secretAccessKeyFile", secret_file)?;
            AwsBackend::with_credentials(settings, &id, &secret).await
        }
        None => AwsBackend::connect(settings).await,
    };
    backend.map_err(|error| BackendSetupError::Config {
        backend: "aws",
        message: error.to_string(),
    })
}

/// The local backend of `config` (its `local` section, defaults when absent).
pub fn local(config: &CellsConfig) -> Result<LocalBackend, BackendSetupError> {
    let mut settings = config.local.clone().unwrap_or_default();
    settings.agent_port = config.agent.port;
    let catalog = load_catalog(config).map_err(|e| BackendSetupError::Config {
        backend: "local",
        message: e.to_string(),
    })?;
    LocalBackend::new(settings, catalog).map_err(|e| BackendSetupError::Config {
        backend: "local",
        message: e.to_string(),
    })
}

/// The configured backend as the provider runs it, with where its pods' interfaces come from.
///
/// - Local: starts a killed run cut short are launched again under their ids first, so the
///   listing shows them and they are adopted as their pods' booting cells.
/// - AWS: what only EC2 can tell (does the image exist, the subnet) stops the start here
///   instead of failing every pod; EC2 out of reach for a moment does not.
pub(crate) async fn provider_backend(
    config: &CellsConfig,
) -> Result<(Arc<dyn CellBackend>, PodInterfaceSource), BackendSetupError> {
    match config.backend {
        BackendKind::Local => {
            let local = local(config)?;
            let resumer = local.clone();
            match tokio::task::spawn_blocking(move || resumer.resume_abandoned_starts()).await {
                Ok(Ok(resumed)) => {
                    for (cell, result) in resumed {
                        match result {
                            Ok(()) => tracing::info!(%cell, "resumed a start a killed run left"),
                            Err(e) => {
                                tracing::warn!(%cell, "resuming a start a killed run left: {e}")
                            }
                        }
                    }
                }
                Ok(Err(e)) => tracing::warn!("looking for starts a killed run left: {e}"),
                Err(e) => tracing::warn!("looking for starts a killed run left: {e}"),
            }
            let interfaces = PodInterfaceSource::local(local.clone());
            Ok((Arc::new(local), interfaces))
        }
        BackendKind::Aws => {
            let aws = aws_backend(config).await?;
            match aws.prepare().await {
                Ok(()) => {}
                Err(source @ BackendError::InvalidRequest { .. }) => {
                    return Err(BackendSetupError::Prepare { source });
                }
                Err(e) => tracing::warn!("preparing the aws backend, again at the first pod: {e}"),
            }
            Ok((Arc::new(aws), PodInterfaceSource::from_config(config)))
        }
    }
}
