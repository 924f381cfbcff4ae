//! Building the configured [`CellBackend`].

use std::sync::Arc;

use updraft_cell_api::PodInterface;
use updraft_cells_aws::{AwsBackend, AwsConfig, BootImage};
use updraft_cells_backend::{Cell, CellBackend};
use updraft_cells_local::LocalBackend;

use crate::config::{BackendKind, BootImageSettings, CellsConfig};
use crate::provider::load_catalog;

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
}

fn boot_image(settings: &BootImageSettings) -> BootImage {
    match &settings.id {
        Some(id) => BootImage::Id(id.clone()),
        None => BootImage::Filters {
            owners: settings.owners.clone(),
            filters: settings.filters.clone(),
        },
    }
}

/// The AWS backend's settings from the provider config.
pub fn aws_config(config: &CellsConfig) -> Result<AwsConfig, BackendSetupError> {
    let Some(aws) = &config.aws else {
        return Err(BackendSetupError::Config {
            backend: "aws",
            message: "the config has no aws section".into(),
        });
    };
    let mut settings = AwsConfig::new(
        config.region(),
        config.controller_id.clone(),
        boot_image(&aws.boot_image),
        aws.subnet_id.clone(),
    );
    settings.endpoint_url = aws.endpoint_url.clone();
    settings.arm64_boot_image = aws.arm64_boot_image.as_ref().map(boot_image);
    settings.security_group_name = aws.security_group_name.clone();
    settings.agent_port = config.agent.port;
    settings.extra_cidrs = config.extra_cidrs.clone();
    settings.extra_security_groups = config.extra_security_groups.clone();
    settings.spot_fallback_to_on_demand = aws.spot_fallback_to_on_demand;
    Ok(settings)
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
        BackendKind::Local => local_backend(config),
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

fn local_backend(config: &CellsConfig) -> Result<Arc<dyn CellBackend>, BackendSetupError> {
    Ok(Arc::new(local(config)?))
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

/// How the pod's interface on a cell is derived from the cell (see [`PodWiring`]).
pub(crate) fn pod_wiring(config: &CellsConfig, backend: Option<LocalBackend>) -> PodWiring {
    if let Some(local) = backend {
        return PodWiring::new(move |cell: &Cell| {
            local.pod_network(cell).map(|w| PodInterface {
                host_netns: None,
                bridge: w.bridge,
                host_veth: w.host_veth,
                address: w.address,
                prefix_len: w.prefix_len,
                gateway: Some(w.gateway),
            })
        });
    }
    let Some(settings) = config.pod_network.clone() else {
        return PodWiring::none();
    };
    PodWiring::new(move |cell: &Cell| match cell.pod_ip {
        Some(std::net::IpAddr::V4(address)) => Some(PodInterface {
            host_netns: settings.host_netns.clone(),
            bridge: settings.bridge.clone(),
            host_veth: settings.host_veth.clone(),
            address,
            prefix_len: settings.prefix_len,
            gateway: settings.gateway,
        }),
        _ => None,
    })
}

/// Computes a pod interface from a cell.
type WiringFn = dyn Fn(&Cell) -> Option<PodInterface> + Send + Sync;

/// The pod's interface on a cell (the agent's `PodNetworkConfig.interface`), derived from the
/// cell: the local backend knows its bridge; other backends use the `podNetwork` section.
#[derive(Clone)]
pub struct PodWiring(Option<Arc<WiringFn>>);

impl PodWiring {
    /// Wiring computed by `f`.
    pub fn new(f: impl Fn(&Cell) -> Option<PodInterface> + Send + Sync + 'static) -> PodWiring {
        PodWiring(Some(Arc::new(f)))
    }

    /// No pod interface: the pod has loopback only (unless it uses the host network).
    pub fn none() -> PodWiring {
        PodWiring(None)
    }

    /// The interface for `cell`.
    pub fn interface(&self, cell: &Cell) -> Option<PodInterface> {
        self.0.as_ref().and_then(|f| f(cell))
    }
}

impl std::fmt::Debug for PodWiring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "PodWiring(..)"
        } else {
            "PodWiring(none)"
        })
    }
}
