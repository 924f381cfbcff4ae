//! The EC2 backend of the cells provider, on the official AWS SDK.
//!
//! - **Credentials** come from the SDK's default chain (environment, shared config/credentials
//!   files, web identity, IMDS) in [`AwsBackend::connect`]; they are never logged.
//!   [`AwsBackend::with_credentials`] takes static ones (tests against moto).
//! - **Boot image** ([`BootImage`]): an AMI id (checked to exist) or owners + filters, of which
//!   the newest image is used. Resolved once and cached. An optional second image boots the
//!   arm64 (Graviton) types ([`AwsConfig::arm64_boot_image`]).
//! - **Network**: the configured subnet; its VPC's CIDR is allowed to reach the agent port
//!   through a **managed security group** (`updraft-<controller id>-cells` unless named),
//!   created when missing and reused afterwards, plus the configured and per-pod extra groups
//!   (ids `sg-…` or names in the VPC).
//! - **Each cell**: `RunInstances` with one network interface carrying a primary private IP (the
//!   agent's) and one secondary private IP (the pod's); tags `Name`, `updraft:controller-id`,
//!   `updraft:node`, `updraft:namespace`, `updraft:pod`, `updraft:pod-uid` and up to 40 pod labels
//!   as `updraft:label:<key>` on the instance and its volume; spot through
//!   `InstanceMarketOptions`, falling back to on-demand when spot capacity is refused and
//!   [`AwsConfig::spot_fallback_to_on_demand`] is set; the user data from
//!   `updraft_cells_backend::cloud_init`. The pod's address: the launch asks EC2 for it
//!   (`SecondaryPrivateIpAddressCount`), and when the instance comes back without one (APIs
//!   such as moto ignore the field) it is assigned with `AssignPrivateIpAddresses`; a cell that
//!   cannot get one is terminated.
//! - **Listing** filters on the controller-id tag: after a restart a new backend finds every
//!   cell the old one started.
//! - **Idempotency**: every launch carries the spec's token as EC2 `ClientToken` (`-od` for the
//!   on-demand fallback) and as the tag [`TAG_START_TOKEN`]. EC2 answers a repeated token with
//!   the instance it launched for it, so a repeated start (a retry, a restarted Updraft) costs
//!   no extra request. When EC2 refuses the token because the parameters changed
//!   (`IdempotentParameterMismatch`, e.g. new user data after a restart) the instance is found by
//!   its tag. Only an endpoint that ignores client tokens (moto;
//!   [`AwsConfig::endpoint_ignores_client_tokens`]) gets a lookup by tag before every launch.
//! - **Bad settings** ([`AwsConfig::validate`]) stop the construction of the backend: an
//!   [`AwsBackend`] always has a valid configuration. What only EC2 can refuse (an unknown AMI,
//!   filter or subnet) is found by [`AwsBackend::prepare`] or the first start. Either error
//!   names the config field (`region`, `aws.subnetId`, `aws.bootImage…`); user data over EC2's
//!   16 KiB is refused before launching.
//!
//! The `moto` feature adds [`moto`] (for tests only): a `moto_server` on loopback and an EC2
//! proxy that refuses and records requests.
//!
//! A real AWS run needs an AMI with the cell agent installed (or installed by the bootstrap's
//! cloud-init), a subnet the Updraft host can reach, and credentials allowed to call
//! `ec2:RunInstances`, `DescribeInstances`, `TerminateInstances`, `CreateTags`, `DeleteTags`,
//! `AssignPrivateIpAddresses`, `DescribeImages`, `DescribeInstanceTypes`, `DescribeSubnets`,
//! `DescribeVpcs`, `DescribeSecurityGroups`, `CreateSecurityGroup`,
//! `AuthorizeSecurityGroupIngress` (and `iam:PassRole` for instance profiles).
#![forbid(unsafe_code)]

mod errors;
#[cfg(feature = "moto")]
pub mod moto;
mod tags;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::SystemTime;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::Credentials;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, IamInstanceProfileSpecification,
    InstanceInterruptionBehavior, InstanceLifecycleType, InstanceMarketOptionsRequest,
    InstanceNetworkInterfaceSpecification, InstanceStateName, IpPermission, IpRange, MarketType,
    ResourceType, SpotInstanceType, SpotMarketOptions, TagSpecification, VolumeType,
};
use base64::Engine;
use tokio::sync::OnceCell;
use updraft_cells_backend::cloud_init::EC2_USER_DATA_LIMIT;
use updraft_cells_backend::{
    BackendError, Cell, CellBackend, CellId, CellIdentity, CellSpec, CellState, LaunchType,
    StartedCell,
};

/// The SDK [`AwsBackend::client`] belongs to, for callers that need more of EC2.
pub use aws_sdk_ec2;
pub use errors::{AwsConfigError, classify, spot_refused};
pub use tags::{
    LABEL_PREFIX, MAX_POD_LABELS, TAG_CONTROLLER_ID, TAG_NAME, TAG_NAMESPACE, TAG_NODE, TAG_POD,
    TAG_POD_UID, TAG_STANDBY, TAG_START_TOKEN, identity_from_tags, identity_tags,
};

/// Where the boot image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootImage {
    /// An AMI id such as `ami-0123456789abcdef0`.
    Id(String),
    /// The newest image owned by one of `owners` (account ids, `amazon`, `self`) matching every
    /// filter (EC2 `DescribeImages` filters, e.g. `name` → `updraft-cell-*`).
    Filters {
        /// Image owners; empty means any.
        owners: Vec<String>,
        /// Filter name → accepted values (globs allowed where EC2 allows them).
        filters: BTreeMap<String, Vec<String>>,
    },
}

/// The backend's settings (from the provider config: `region`, `controllerId`, `agent.port`,
/// `extraCidrs`, `extraSecurityGroups` and the `aws:` section). [`AwsConfig::validate`] names
/// the field of every setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsConfig {
    /// Region, e.g. `us-east-1`.
    pub region: String,
    /// An endpoint override (moto, a VPC endpoint); `None` uses the regional endpoint.
    pub endpoint_url: Option<String>,
    /// This Updraft's controller id: stamped on every cell and security group, and the listing
    /// filter.
    pub controller_id: String,
    /// The boot image.
    pub boot_image: BootImage,
    /// The boot image for arm64 (Graviton) instance types; `None` boots every type from
    /// `boot_image`. The architecture of a type is asked from EC2 (`DescribeInstanceTypes`).
    pub arm64_boot_image: Option<BootImage>,
    /// The subnet cells start in; its VPC is used for the security groups.
    pub subnet_id: String,
    /// Name of the managed security group; `None` → `updraft-<controller id>-cells`.
    pub security_group_name: Option<String>,
    /// The agent's port opened to the VPC CIDR (and `extra_cidrs`).
    pub agent_port: u16,
    /// More CIDRs allowed to reach the agent port (e.g. where Updraft runs, outside the VPC).
    pub extra_cidrs: Vec<String>,
    /// Security groups (ids or names) every cell gets in addition to the managed one.
    pub extra_security_groups: Vec<String>,
    /// When a spot launch is refused for capacity or spot limits, launch on-demand instead.
    pub spot_fallback_to_on_demand: bool,
    /// The endpoint launches a new instance for a repeated client token (moto does; EC2 returns
    /// the one it launched): every start then first looks for an instance tagged with its token
    /// (one more `DescribeInstances` per start). Off for EC2.
    pub endpoint_ignores_client_tokens: bool,
}

impl AwsConfig {
    /// A configuration with the defaults: agent port 6421, managed group name derived from the
    /// controller id, no extra groups or CIDRs, no spot fallback, an endpoint that honours
    /// client tokens.
    pub fn new(
        region: impl Into<String>,
        controller_id: impl Into<String>,
        boot_image: BootImage,
        subnet_id: impl Into<String>,
    ) -> AwsConfig {
        AwsConfig {
            region: region.into(),
            endpoint_url: None,
            controller_id: controller_id.into(),
            boot_image,
            arm64_boot_image: None,
            subnet_id: subnet_id.into(),
            security_group_name: None,
            agent_port: updraft_cell_api::DEFAULT_AGENT_PORT,
            extra_cidrs: Vec::new(),
            extra_security_groups: Vec::new(),
            spot_fallback_to_on_demand: false,
            endpoint_ignores_client_tokens: false,
        }
    }

    /// The managed security group's name.
    pub fn managed_group_name(&self) -> String {
        self.security_group_name
            .clone()
            .unwrap_or_else(|| format!("updraft-{}-cells", self.controller_id))
    }

    /// Checks every setting without calling EC2; the error names the first bad field as the
    /// provider config spells it. What only EC2 can tell (an AMI or subnet that does not
    /// exist) is checked by [`AwsBackend::prepare`].
    pub fn validate(&self) -> Result<(), AwsConfigError> {
        self.validate_region_and_endpoint()?;
        let controller_id = &self.controller_id;
        if controller_id.trim().is_empty() {
            return Err(AwsConfigError::invalid(
                "controllerId",
                "is empty; every cell is tagged with it and listings filter on it",
            ));
        }
        if controller_id.chars().count() > 200 || !tags::tag_text_ok(controller_id) {
            return Err(AwsConfigError::invalid(
                "controllerId",
                format!(
                    "{controller_id:?} cannot be an EC2 tag value: use at most 200 letters, digits, spaces and _ . : / = + - @"
                ),
            ));
        }
        let subnet = &self.subnet_id;
        if subnet.trim().is_empty() {
            return Err(AwsConfigError::invalid(
                "aws.subnetId",
                "is empty; name the subnet the cells start in, e.g. subnet-0123456789abcdef0",
            ));
        }
        if !subnet.starts_with("subnet-") || subnet.len() <= "subnet-".len() {
            return Err(AwsConfigError::invalid(
                "aws.subnetId",
                format!("{subnet:?} is not a subnet id (subnet-…)"),
            ));
        }
        validate_image("aws.bootImage", &self.boot_image)?;
        if let Some(arm64) = &self.arm64_boot_image {
            validate_image("aws.arm64BootImage", arm64)?;
        }
        if let Some(name) = &self.security_group_name
            && name.trim().is_empty()
        {
            return Err(AwsConfigError::invalid(
                "aws.securityGroupName",
                "is empty; leave it out for updraft-<controllerId>-cells",
            ));
        }
        if self.agent_port == 0 {
            return Err(AwsConfigError::invalid("agent.port", "must not be 0"));
        }
        for (index, cidr) in self.extra_cidrs.iter().enumerate() {
            if !is_cidr(cidr) {
                return Err(AwsConfigError::invalid(
                    format!("extraCidrs[{index}]"),
                    format!("{cidr:?} is not a CIDR like 10.20.0.0/16"),
                ));
            }
        }
        for (index, group) in self.extra_security_groups.iter().enumerate() {
            if group.trim().is_empty() {
                return Err(AwsConfigError::invalid(
                    format!("extraSecurityGroups[{index}]"),
                    "is empty; give a group id (sg-…) or a group name in the subnet's VPC",
                ));
            }
        }
        Ok(())
    }

    /// The settings every EC2 call needs: the region and the endpoint.
    fn validate_region_and_endpoint(&self) -> Result<(), AwsConfigError> {
        let region = &self.region;
        if region.trim().is_empty() {
            return Err(AwsConfigError::invalid(
                "region",
                "is missing; set the region the cells run in, e.g. us-east-1",
            ));
        }
        if !region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(AwsConfigError::invalid(
                "region",
                format!("{region:?} is not an AWS region name (like us-east-1)"),
            ));
        }
        if let Some(endpoint) = &self.endpoint_url {
            let host = endpoint
                .strip_prefix("https://")
                .or_else(|| endpoint.strip_prefix("http://"));
            if host.is_none_or(|host| host.is_empty() || host.starts_with('/')) {
                return Err(AwsConfigError::invalid(
                    "aws.endpointUrl",
                    format!(
                        "{endpoint:?} is not an http(s) URL; leave it out for the regional endpoint"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Checks a boot image setting: an AMI id, or at least one well-formed filter.
fn validate_image(field: &str, image: &BootImage) -> Result<(), AwsConfigError> {
    match image {
        BootImage::Id(id) => {
            if !id.starts_with("ami-") || id.len() <= "ami-".len() {
                return Err(AwsConfigError::invalid(
                    format!("{field}.id"),
                    format!("{id:?} is not an AMI id (ami-…)"),
                ));
            }
        }
        BootImage::Filters { owners, filters } => {
            if filters.is_empty() {
                return Err(AwsConfigError::invalid(
                    format!("{field}.filters"),
                    "give at least one filter (e.g. name: [updraft-cell-*]) or an id (ami-…); \
                     without one any image of the owners could boot",
                ));
            }
            for (name, values) in filters {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_graphic()) {
                    return Err(AwsConfigError::invalid(
                        format!("{field}.filters"),
                        format!(
                            "{name:?} is not an EC2 filter name (like name, architecture or tag:Key)"
                        ),
                    ));
                }
                if values.is_empty() || values.iter().any(|value| value.trim().is_empty()) {
                    return Err(AwsConfigError::invalid(
                        format!("{field}.filters.{name}"),
                        format!("needs one or more non-empty values, got {values:?}"),
                    ));
                }
            }
            if owners.iter().any(|owner| owner.trim().is_empty()) {
                return Err(AwsConfigError::invalid(
                    format!("{field}.owners"),
                    "has an empty entry; give account ids, self or amazon",
                ));
            }
        }
    }
    Ok(())
}

/// Whether `text` is an IPv4 or IPv6 CIDR (`address/prefix`).
fn is_cidr(text: &str) -> bool {
    let Some((address, prefix)) = text.split_once('/') else {
        return false;
    };
    let Ok(prefix) = prefix.parse::<u8>() else {
        return false;
    };
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => prefix <= 32,
        Ok(IpAddr::V6(_)) => prefix <= 128,
        Err(_) => false,
    }
}

/// The EC2 client token of a start: at most 64 printable ASCII characters, with `-od` for the
/// on-demand launch that replaces a refused spot one (a token names one request's parameters).
fn client_token(token: &str, on_demand_fallback: bool) -> String {
    const MAX: usize = 64;
    let suffix = if on_demand_fallback { "-od" } else { "" };
    let base: String = token
        .chars()
        .filter(char::is_ascii_graphic)
        .take(MAX - suffix.len())
        .collect();
    format!("{base}{suffix}")
}

/// The resolved boot image.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Image {
    id: String,
    root_device_name: Option<String>,
}

/// The resolved network: VPC and the managed group.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Network {
    vpc_id: String,
    managed_group_id: String,
}

/// The EC2 backend. Its configuration passed [`AwsConfig::validate`] when it was built and
/// cannot change, so no call checks it again.
#[derive(Debug)]
pub struct AwsBackend {
    client: Client,
    config: AwsConfig,
    image: OnceCell<Image>,
    arm64_image: OnceCell<Image>,
    network: OnceCell<Network>,
    arm64_types: tokio::sync::Mutex<BTreeMap<String, bool>>,
}

fn http_client() -> aws_sdk_ec2::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// The EC2 client of `region` (at `endpoint` when given) with the credentials `loader` has.
pub(crate) async fn sdk_client(
    region: &str,
    endpoint: Option<&str>,
    loader: aws_config::ConfigLoader,
) -> Client {
    let mut loader = loader
        .region(Region::new(region.to_owned()))
        .http_client(http_client());
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    Client::new(&loader.load().await)
}

impl AwsBackend {
    /// A backend with credentials from the SDK's default chain (environment, files, IMDS);
    /// refused when `config` does not [validate](AwsConfig::validate).
    pub async fn connect(config: AwsConfig) -> Result<AwsBackend, AwsConfigError> {
        config.validate()?;
        let loader = aws_config::defaults(BehaviorVersion::latest());
        Ok(AwsBackend::load(config, loader).await)
    }

    /// A backend with static credentials (e.g. dummy ones for moto); refused when `config`
    /// does not [validate](AwsConfig::validate).
    pub async fn with_credentials(
        config: AwsConfig,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Result<AwsBackend, AwsConfigError> {
        config.validate()?;
        let credentials = Credentials::new(
            access_key_id,
            secret_access_key,
            None,
            None,
            "updraft-static",
        );
        let loader =
            aws_config::defaults(BehaviorVersion::latest()).credentials_provider(credentials);
        Ok(AwsBackend::load(config, loader).await)
    }

    /// The backend of a validated `config`.
    async fn load(config: AwsConfig, loader: aws_config::ConfigLoader) -> AwsBackend {
        let client = sdk_client(&config.region, config.endpoint_url.as_deref(), loader).await;
        AwsBackend {
            client,
            config,
            image: OnceCell::new(),
            arm64_image: OnceCell::new(),
            network: OnceCell::new(),
            arm64_types: tokio::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// The SDK client, for callers that need more of EC2.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The configuration.
    pub fn config(&self) -> &AwsConfig {
        &self.config
    }

    /// Resolves the boot image and the network (creating the managed security group if needed)
    /// now, so configuration errors surface at startup instead of at the first pod.
    pub async fn prepare(&self) -> Result<(), BackendError> {
        self.boot_image().await?;
        if let Some(arm64) = &self.config.arm64_boot_image {
            self.arm64_image
                .get_or_try_init(|| self.resolve_image("aws.arm64BootImage", arm64))
                .await?;
        }
        self.managed_security_group().await?;
        Ok(())
    }

    /// The AMI id cells boot from.
    pub async fn boot_image(&self) -> Result<String, BackendError> {
        Ok(self.image().await?.id.clone())
    }

    async fn image(&self) -> Result<&Image, BackendError> {
        self.image
            .get_or_try_init(|| self.resolve_image("aws.bootImage", &self.config.boot_image))
            .await
    }

    /// The image for an instance type: the arm64 one for arm64 types when configured.
    async fn image_for(&self, instance_type: &str) -> Result<&Image, BackendError> {
        let Some(arm64) = &self.config.arm64_boot_image else {
            return self.image().await;
        };
        if !self.is_arm64(instance_type).await? {
            return self.image().await;
        }
        self.arm64_image
            .get_or_try_init(|| self.resolve_image("aws.arm64BootImage", arm64))
            .await
    }

    /// Whether EC2 says the type runs arm64 (cached per type).
    async fn is_arm64(&self, instance_type: &str) -> Result<bool, BackendError> {
        if let Some(known) = self.arm64_types.lock().await.get(instance_type) {
            return Ok(*known);
        }
        let output = self
            .client
            .describe_instance_types()
            .instance_types(instance_type.into())
            .send()
            .await
            .map_err(|error| classify("DescribeInstanceTypes", error))?;
        let info = output
            .instance_types()
            .first()
            .ok_or_else(|| BackendError::InvalidRequest {
                detail: format!(
                    "instance type {instance_type} is not offered in {}",
                    self.config.region
                ),
            })?;
        let arm64 = info.processor_info().is_some_and(|processor| {
            processor
                .supported_architectures()
                .iter()
                .any(|arch| arch.as_str() == "arm64")
        });
        self.arm64_types
            .lock()
            .await
            .insert(instance_type.to_string(), arm64);
        Ok(arm64)
    }

    /// The image `spec` names; `field` is the setting it comes from, named in every error.
    async fn resolve_image(&self, field: &str, spec: &BootImage) -> Result<Image, BackendError> {
        let region = &self.config.region;
        let request = self.client.describe_images();
        let (request, not_found) = match spec {
            BootImage::Id(id) => (
                request.image_ids(id),
                format!(
                    "{field}: no image {id} in {region} (AMI ids are per region: copy the image \
                     to {region} or use its id there)"
                ),
            ),
            BootImage::Filters { owners, filters } => {
                let mut request = request;
                for owner in owners {
                    request = request.owners(owner);
                }
                for (name, values) in filters {
                    request = request.filters(
                        Filter::builder()
                            .name(name)
                            .set_values(Some(values.clone()))
                            .build(),
                    );
                }
                let owned_by = if owners.is_empty() {
                    String::new()
                } else {
                    format!(" owned by {}", owners.join(", "))
                };
                (
                    request,
                    format!(
                        "{field}: no image{owned_by} in {region} matches the filters {filters:?}; \
                         check the filter names and values"
                    ),
                )
            }
        };
        let output = match request.send().await {
            Ok(output) => output,
            Err(error) => {
                let missing =
                    errors::code(&error).is_some_and(|code| code.starts_with("InvalidAMIID."));
                return Err(match spec {
                    BootImage::Id(_) if missing => {
                        BackendError::InvalidRequest { detail: not_found }
                    }
                    BootImage::Id(_) => {
                        errors::in_context(field, classify("DescribeImages", error))
                    }
                    // A filter EC2 does not know is refused with its name in the message.
                    BootImage::Filters { filters, .. } => errors::in_context(
                        &format!("{field}: looking up an image with the filters {filters:?}"),
                        classify("DescribeImages", error),
                    ),
                });
            }
        };
        let newest = output
            .images()
            .iter()
            .filter(|image| image.image_id().is_some())
            .max_by(|a, b| {
                a.creation_date()
                    .cmp(&b.creation_date())
                    .then(a.name().cmp(&b.name()))
                    .then(a.image_id().cmp(&b.image_id()))
            })
            .ok_or(BackendError::InvalidRequest { detail: not_found })?;
        Ok(Image {
            id: newest.image_id().unwrap_or_default().to_string(),
            root_device_name: newest.root_device_name().map(str::to_string),
        })
    }

    /// The id of the managed security group, created (with the agent-port rule) if missing.
    pub async fn managed_security_group(&self) -> Result<String, BackendError> {
        Ok(self.network().await?.managed_group_id.clone())
    }

    async fn network(&self) -> Result<&Network, BackendError> {
        self.network
            .get_or_try_init(|| self.resolve_network())
            .await
    }

    async fn resolve_network(&self) -> Result<Network, BackendError> {
        let subnet_id = &self.config.subnet_id;
        let subnets = self
            .client
            .describe_subnets()
            .subnet_ids(subnet_id)
            .send()
            .await
            .map_err(|error| match classify("DescribeSubnets", error) {
                BackendError::InvalidRequest { .. } | BackendError::NotFound { .. } => {
                    BackendError::InvalidRequest {
                        detail: format!(
                            "aws.subnetId: subnet {subnet_id} not found in {}; name a subnet of \
                             this account and region",
                            self.config.region
                        ),
                    }
                }
                other => errors::in_context("aws.subnetId", other),
            })?;
        let vpc_id = subnets
            .subnets()
            .first()
            .and_then(|subnet| subnet.vpc_id())
            .ok_or_else(|| BackendError::InvalidRequest {
                detail: format!(
                    "aws.subnetId: subnet {subnet_id} not found in {} or it has no VPC",
                    self.config.region
                ),
            })?
            .to_string();
        let vpcs = self
            .client
            .describe_vpcs()
            .vpc_ids(&vpc_id)
            .send()
            .await
            .map_err(|error| classify("DescribeVpcs", error))?;
        let mut cidrs: Vec<String> = Vec::new();
        for vpc in vpcs.vpcs() {
            cidrs.extend(vpc.cidr_block().map(str::to_string));
            for association in vpc.cidr_block_association_set() {
                if let Some(cidr) = association.cidr_block()
                    && !cidrs.iter().any(|c| c == cidr)
                {
                    cidrs.push(cidr.to_string());
                }
            }
        }
        cidrs.extend(self.config.extra_cidrs.iter().cloned());
        let name = self.config.managed_group_name();
        let group_id = match self.find_group(&vpc_id, &name).await? {
            Some(id) => id,
            None => self.create_group(&vpc_id, &name).await?,
        };
        self.ensure_agent_rule(&group_id, &cidrs).await?;
        Ok(Network {
            vpc_id,
            managed_group_id: group_id,
        })
    }

    async fn find_group(&self, vpc_id: &str, name: &str) -> Result<Option<String>, BackendError> {
        let output = self
            .client
            .describe_security_groups()
            .filters(Filter::builder().name("vpc-id").values(vpc_id).build())
            .filters(Filter::builder().name("group-name").values(name).build())
            .send()
            .await
            .map_err(|error| classify("DescribeSecurityGroups", error))?;
        Ok(output
            .security_groups()
            .iter()
            .find(|group| group.group_name() == Some(name))
            .and_then(|group| group.group_id())
            .map(str::to_string))
    }

    async fn create_group(&self, vpc_id: &str, name: &str) -> Result<String, BackendError> {
        let created = self
            .client
            .create_security_group()
            .group_name(name)
            .description(format!(
                "Updraft cells of controller {}: the agent port from the VPC",
                self.config.controller_id
            ))
            .vpc_id(vpc_id)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::SecurityGroup)
                    .tags(tags::tag(TAG_NAME, name))
                    .tags(tags::tag(TAG_CONTROLLER_ID, &self.config.controller_id))
                    .build(),
            )
            .send()
            .await;
        match created {
            Ok(output) => {
                let id = output.group_id().unwrap_or_default().to_string();
                tracing::info!(group = %id, name, vpc = vpc_id, "created the cells security group");
                Ok(id)
            }
            Err(error) => {
                let duplicate = errors::code(&error) == Some("InvalidGroup.Duplicate");
                let classified = classify("CreateSecurityGroup", error);
                // Another Updraft (or a retry) created it meanwhile: use that one.
                if duplicate && let Some(id) = self.find_group(vpc_id, name).await? {
                    return Ok(id);
                }
                Err(classified)
            }
        }
    }

    async fn ensure_agent_rule(
        &self,
        group_id: &str,
        cidrs: &[String],
    ) -> Result<(), BackendError> {
        let port = i32::from(self.config.agent_port);
        let groups = self
            .client
            .describe_security_groups()
            .group_ids(group_id)
            .send()
            .await
            .map_err(|error| classify("DescribeSecurityGroups", error))?;
        let existing: Vec<String> = groups
            .security_groups()
            .iter()
            .flat_map(|group| group.ip_permissions())
            .filter(|permission| {
                permission.ip_protocol() == Some("tcp")
                    && permission.from_port() == Some(port)
                    && permission.to_port() == Some(port)
            })
            .flat_map(|permission| permission.ip_ranges())
            .filter_map(|range| range.cidr_ip().map(str::to_string))
            .collect();
        let missing: Vec<&String> = cidrs.iter().filter(|c| !existing.contains(c)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut permission = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(port)
            .to_port(port);
        for cidr in missing {
            permission = permission.ip_ranges(
                IpRange::builder()
                    .cidr_ip(cidr)
                    .description("Updraft cell agent")
                    .build(),
            );
        }
        let result = self
            .client
            .authorize_security_group_ingress()
            .group_id(group_id)
            .ip_permissions(permission.build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(error) if errors::code(&error) == Some("InvalidPermission.Duplicate") => Ok(()),
            Err(error) => Err(classify("AuthorizeSecurityGroupIngress", error)),
        }
    }

    /// Security group ids for a cell: the managed one, the configured extras, the pod's extras;
    /// names are looked up in the VPC.
    async fn security_group_ids(
        &self,
        network: &Network,
        extra: &[String],
    ) -> Result<Vec<String>, BackendError> {
        let mut ids = vec![network.managed_group_id.clone()];
        let mut names = Vec::new();
        for group in self.config.extra_security_groups.iter().chain(extra) {
            if group.starts_with("sg-") {
                if !ids.contains(group) {
                    ids.push(group.clone());
                }
            } else if !names.contains(group) {
                names.push(group.clone());
            }
        }
        if !names.is_empty() {
            let output = self
                .client
                .describe_security_groups()
                .filters(
                    Filter::builder()
                        .name("vpc-id")
                        .values(&network.vpc_id)
                        .build(),
                )
                .filters(
                    Filter::builder()
                        .name("group-name")
                        .set_values(Some(names.clone()))
                        .build(),
                )
                .send()
                .await
                .map_err(|error| classify("DescribeSecurityGroups", error))?;
            for name in &names {
                let id = output
                    .security_groups()
                    .iter()
                    .find(|group| group.group_name() == Some(name.as_str()))
                    .and_then(|group| group.group_id())
                    .ok_or_else(|| BackendError::InvalidRequest {
                        detail: format!(
                            "security group {name:?} not found in VPC {} (from extraSecurityGroups \
                             or the pod's security-groups annotation); give an id (sg-…) or the \
                             name of a group in that VPC",
                            network.vpc_id
                        ),
                    })?;
                if !ids.iter().any(|existing| existing == id) {
                    ids.push(id.to_string());
                }
            }
        }
        Ok(ids)
    }

    async fn run_instance(
        &self,
        spec: &CellSpec,
        image: &Image,
        group_ids: &[String],
        launch_type: LaunchType,
    ) -> Result<String, BackendError> {
        let on_demand_fallback =
            launch_type == LaunchType::OnDemand && spec.launch_type == LaunchType::Spot;
        let token = client_token(&spec.idempotency_token, on_demand_fallback);
        let mut instance_tags = identity_tags(&spec.name, &spec.identity);
        if !spec.idempotency_token.is_empty() {
            instance_tags.push(tags::tag(TAG_START_TOKEN, &token));
        }
        let tag_spec = |resource| {
            TagSpecification::builder()
                .resource_type(resource)
                .set_tags(Some(instance_tags.clone()))
                .build()
        };
        let interface = InstanceNetworkInterfaceSpecification::builder()
            .device_index(0)
            .subnet_id(&self.config.subnet_id)
            .set_groups(Some(group_ids.to_vec()))
            .secondary_private_ip_address_count(1)
            .associate_public_ip_address(!spec.private_ip_only)
            .delete_on_termination(true)
            .build();
        let mut request = self
            .client
            .run_instances()
            .image_id(&image.id)
            .instance_type(spec.instance_type.as_str().into())
            .min_count(1)
            .max_count(1)
            .network_interfaces(interface)
            .user_data(base64::engine::general_purpose::STANDARD.encode(&spec.user_data))
            .tag_specifications(tag_spec(ResourceType::Instance))
            .tag_specifications(tag_spec(ResourceType::Volume));
        if !spec.idempotency_token.is_empty() {
            request = request.client_token(&token);
        }
        if launch_type == LaunchType::Spot {
            request = request.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(
                        SpotMarketOptions::builder()
                            .spot_instance_type(SpotInstanceType::OneTime)
                            .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                            .build(),
                    )
                    .build(),
            );
        }
        if let Some(bytes) = spec.root_volume_bytes {
            let device = image
                .root_device_name
                .clone()
                .unwrap_or_else(|| "/dev/xvda".to_string());
            let gib = i32::try_from(bytes.div_ceil(1 << 30)).unwrap_or(i32::MAX);
            request = request.block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(device)
                    .ebs(
                        EbsBlockDevice::builder()
                            .volume_size(gib)
                            .volume_type(VolumeType::Gp3)
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            );
        }
        if let Some(profile) = &spec.instance_profile {
            let specification = if profile.starts_with("arn:") {
                IamInstanceProfileSpecification::builder().arn(profile)
            } else {
                IamInstanceProfileSpecification::builder().name(profile)
            };
            request = request.iam_instance_profile(specification.build());
        }
        let output = match request.send().await {
            Ok(output) => output,
            Err(error)
                if !spec.idempotency_token.is_empty()
                    && errors::code(&error) == Some("IdempotentParameterMismatch") =>
            {
                // The token launched an instance with other parameters (e.g. the user data of
                // an Updraft since restarted): that instance is this start's.
                let refused = classify("RunInstances", error);
                return match self.find_started(spec, vec![token]).await? {
                    Some(found) => Ok(found.id.0),
                    None => Err(refused),
                };
            }
            Err(error) => return Err(classify("RunInstances", error)),
        };
        let instance = output
            .instances()
            .first()
            .ok_or_else(|| BackendError::Transient {
                detail: "RunInstances returned no instance".into(),
            })?;
        let id = instance.instance_id().unwrap_or_default().to_string();
        self.ensure_pod_ip(&id, instance).await?;
        Ok(id)
    }

    /// The cell an earlier start with the same idempotency token launched (spot, or its
    /// on-demand fallback), if any: where the endpoint ignores client tokens, a repeated start
    /// returns it instead of launching another, as EC2 does for a repeated client token.
    async fn started_before(&self, spec: &CellSpec) -> Result<Option<StartedCell>, BackendError> {
        if spec.idempotency_token.is_empty() {
            return Ok(None);
        }
        let tokens = vec![
            client_token(&spec.idempotency_token, false),
            client_token(&spec.idempotency_token, true),
        ];
        self.find_started(spec, tokens).await
    }

    /// The cell of `spec`'s controller tagged with one of the client `tokens`, if any, with its
    /// pod address made sure of. A live cell is preferred; an ended one is returned like EC2
    /// returns it (the caller starts its next attempt with a new token).
    async fn find_started(
        &self,
        spec: &CellSpec,
        tokens: Vec<String>,
    ) -> Result<Option<StartedCell>, BackendError> {
        let filters = vec![
            Filter::builder()
                .name(format!("tag:{TAG_CONTROLLER_ID}"))
                .values(&spec.identity.controller_id)
                .build(),
            Filter::builder()
                .name(format!("tag:{TAG_START_TOKEN}"))
                .set_values(Some(tokens))
                .build(),
        ];
        let cells = self.describe_many(filters, Vec::new()).await?;
        let Some(cell) = cells
            .iter()
            .find(|cell| !cell.state.is_ending())
            .or_else(|| cells.first())
        else {
            return Ok(None);
        };
        tracing::info!(
            cell = %cell.id,
            token = %spec.idempotency_token,
            state = %cell.state,
            "a start with this token launched the cell before; not launching another"
        );
        if !cell.state.is_ending() && cell.pod_ip.is_none() {
            // The earlier start stopped between launching and assigning the pod's address.
            let described = self
                .client
                .describe_instances()
                .instance_ids(&cell.id.0)
                .send()
                .await
                .map_err(|error| classify("DescribeInstances", error))?;
            if let Some(instance) = described
                .reservations()
                .iter()
                .flat_map(|reservation| reservation.instances())
                .next()
            {
                self.ensure_pod_ip(&cell.id.0, instance).await?;
            }
        }
        Ok(Some(StartedCell {
            id: cell.id.clone(),
            launch_type: cell.launch_type,
        }))
    }

    /// Makes sure the primary interface has a secondary private IP for the pod. EC2 assigns it
    /// at launch from `SecondaryPrivateIpAddressCount`; some EC2-compatible APIs (moto) ignore
    /// that field, so a missing one is assigned explicitly.
    async fn ensure_pod_ip(
        &self,
        id: &str,
        instance: &aws_sdk_ec2::types::Instance,
    ) -> Result<(), BackendError> {
        let Some(interface) = instance.network_interfaces().iter().find(|interface| {
            interface
                .attachment()
                .and_then(|attachment| attachment.device_index())
                .unwrap_or(0)
                == 0
        }) else {
            return Ok(());
        };
        if interface.private_ip_addresses().len() >= 2 {
            return Ok(());
        }
        let Some(interface_id) = interface.network_interface_id() else {
            return Ok(());
        };
        let assigned = self
            .client
            .assign_private_ip_addresses()
            .network_interface_id(interface_id)
            .secondary_private_ip_address_count(1)
            .send()
            .await;
        if let Err(error) = assigned {
            let error = classify("AssignPrivateIpAddresses", error);
            // A cell without its pod address is useless: do not leave it running.
            if let Err(terminate) = self
                .client
                .terminate_instances()
                .instance_ids(id)
                .send()
                .await
            {
                tracing::warn!(
                    cell = id,
                    error = %classify("TerminateInstances", terminate),
                    "could not terminate the cell that got no pod address; the garbage collector will"
                );
            }
            return Err(error);
        }
        Ok(())
    }

    async fn describe_many(
        &self,
        filters: Vec<Filter>,
        ids: Vec<String>,
    ) -> Result<Vec<Cell>, BackendError> {
        let mut cells = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            let output = self
                .client
                .describe_instances()
                .set_filters((!filters.is_empty()).then(|| filters.clone()))
                .set_instance_ids((!ids.is_empty()).then(|| ids.clone()))
                .set_next_token(next_token.clone())
                .send()
                .await
                .map_err(|error| classify("DescribeInstances", error))?;
            for reservation in output.reservations() {
                cells.extend(reservation.instances().iter().filter_map(to_cell));
            }
            next_token = output.next_token().map(str::to_string);
            if next_token.as_deref().is_none_or(str::is_empty) {
                break;
            }
        }
        cells.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(cells)
    }
}

/// A cell from an EC2 instance description.
fn to_cell(instance: &aws_sdk_ec2::types::Instance) -> Option<Cell> {
    let id = instance.instance_id()?.to_string();
    let state = match instance.state().and_then(|s| s.name()) {
        Some(InstanceStateName::Pending) => CellState::Pending,
        Some(InstanceStateName::Running) => CellState::Running,
        Some(InstanceStateName::Stopping) => CellState::Stopping,
        Some(InstanceStateName::Stopped) => CellState::Stopped,
        Some(InstanceStateName::ShuttingDown) => CellState::Terminating,
        Some(InstanceStateName::Terminated) => CellState::Terminated,
        _ => CellState::Pending,
    };
    let tags: BTreeMap<String, String> = instance
        .tags()
        .iter()
        .filter_map(|tag| {
            Some((
                tag.key()?.to_string(),
                tag.value().unwrap_or("").to_string(),
            ))
        })
        .collect();
    let primary_interface = instance
        .network_interfaces()
        .iter()
        .find(|interface| {
            interface
                .attachment()
                .and_then(|attachment| attachment.device_index())
                == Some(0)
        })
        .or_else(|| instance.network_interfaces().first());
    let parse = |text: Option<&str>| text.and_then(|t| t.parse::<IpAddr>().ok());
    let mut management_ip = None;
    let mut pod_ip = None;
    if let Some(interface) = primary_interface {
        for address in interface.private_ip_addresses() {
            if address.primary() == Some(true) {
                management_ip = management_ip.or(parse(address.private_ip_address()));
            } else {
                pod_ip = pod_ip.or(parse(address.private_ip_address()));
            }
        }
    }
    let management_ip = management_ip.or(parse(instance.private_ip_address()));
    let launch_type = if instance.instance_lifecycle() == Some(&InstanceLifecycleType::Spot) {
        LaunchType::Spot
    } else {
        LaunchType::OnDemand
    };
    Some(Cell {
        id: CellId(id),
        name: tags.get(TAG_NAME).cloned().unwrap_or_default(),
        state,
        instance_type: instance
            .instance_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default(),
        launch_type,
        management_ip,
        pod_ip,
        public_ip: parse(instance.public_ip_address()),
        launch_time: instance
            .launch_time()
            .and_then(|time| SystemTime::try_from(*time).ok()),
        identity: identity_from_tags(&tags),
        tags,
    })
}

#[async_trait::async_trait]
impl CellBackend for AwsBackend {
    fn kind(&self) -> &'static str {
        "aws"
    }

    async fn start(&self, spec: &CellSpec) -> Result<StartedCell, BackendError> {
        if spec.user_data.len() > EC2_USER_DATA_LIMIT {
            return Err(BackendError::InvalidRequest {
                detail: format!(
                    "the user data of cell {} is {} bytes, over EC2's limit of {EC2_USER_DATA_LIMIT} \
                     bytes (before base64); shrink the cloud-init file",
                    spec.name,
                    spec.user_data.len()
                ),
            });
        }
        // EC2 answers a repeated client token itself; only an endpoint that ignores tokens
        // needs the lookup by tag first.
        if self.config.endpoint_ignores_client_tokens
            && let Some(started) = self.started_before(spec).await?
        {
            return Ok(started);
        }
        let image = match &spec.image {
            Some(id) => {
                self.resolve_image("the cell's image", &BootImage::Id(id.clone()))
                    .await?
            }
            None => self.image_for(&spec.instance_type).await?.clone(),
        };
        let network = self.network().await?;
        let group_ids = self
            .security_group_ids(network, &spec.security_groups)
            .await?;
        match self
            .run_instance(spec, &image, &group_ids, spec.launch_type)
            .await
        {
            Ok(id) => Ok(StartedCell {
                id: CellId(id),
                launch_type: spec.launch_type,
            }),
            Err(error)
                if spec.launch_type == LaunchType::Spot
                    && self.config.spot_fallback_to_on_demand
                    && spot_refused(&error) =>
            {
                tracing::warn!(
                    cell = %spec.name,
                    instance_type = %spec.instance_type,
                    %error,
                    "spot refused; launching on-demand"
                );
                let id = self
                    .run_instance(spec, &image, &group_ids, LaunchType::OnDemand)
                    .await?;
                Ok(StartedCell {
                    id: CellId(id),
                    launch_type: LaunchType::OnDemand,
                })
            }
            Err(error) => Err(error),
        }
    }

    async fn describe(&self, id: &CellId) -> Result<Cell, BackendError> {
        let cells = self
            .describe_many(Vec::new(), vec![id.0.clone()])
            .await
            .map_err(|error| match error {
                BackendError::NotFound { .. } => BackendError::NotFound { id: id.0.clone() },
                other => other,
            })?;
        cells
            .into_iter()
            .find(|cell| &cell.id == id)
            .ok_or_else(|| BackendError::NotFound { id: id.0.clone() })
    }

    async fn list(&self, controller_id: &str) -> Result<Vec<Cell>, BackendError> {
        let filters = vec![
            Filter::builder()
                .name(format!("tag:{TAG_CONTROLLER_ID}"))
                .values(controller_id)
                .build(),
            Filter::builder()
                .name("instance-state-name")
                .set_values(Some(
                    ["pending", "running", "shutting-down", "stopping", "stopped"]
                        .map(String::from)
                        .to_vec(),
                ))
                .build(),
        ];
        self.describe_many(filters, Vec::new()).await
    }

    async fn assign(
        &self,
        id: &CellId,
        name: &str,
        identity: &CellIdentity,
    ) -> Result<(), BackendError> {
        // EC2 has no conditional tagging: the provider serializes claims in memory (one Updraft
        // per controller id); this check catches a cell claimed before a restart.
        let cell = self.describe(id).await?;
        let current = cell.identity.as_ref();
        let ours = current.is_some_and(|c| c.controller_id == identity.controller_id);
        let already_this_pod =
            current.is_some_and(|c| !c.is_standby() && c.pod_uid == identity.pod_uid);
        if already_this_pod && ours {
            return Ok(());
        }
        if !ours || !current.is_some_and(CellIdentity::is_standby) || cell.state.is_ending() {
            return Err(BackendError::InvalidRequest {
                detail: format!(
                    "cell {id} is not a standby cell of controller {} (it is {}{})",
                    identity.controller_id,
                    cell.state,
                    current.map_or(", without an Updraft identity".to_owned(), |c| {
                        if c.is_standby() {
                            String::new()
                        } else {
                            format!(", assigned to pod {}/{}", c.namespace, c.pod_name)
                        }
                    })
                ),
            });
        }
        // Pod tags first, then the standby tag goes: an interruption in between still reads
        // as the pod's cell (pod tags win).
        self.client
            .create_tags()
            .resources(&id.0)
            .set_tags(Some(identity_tags(name, identity)))
            .send()
            .await
            .map_err(|error| classify("CreateTags", error))?;
        self.client
            .delete_tags()
            .resources(&id.0)
            .tags(tags::tag(TAG_STANDBY, "true"))
            .send()
            .await
            .map_err(|error| classify("DeleteTags", error))?;
        Ok(())
    }

    async fn terminate(&self, id: &CellId) -> Result<(), BackendError> {
        let result = self
            .client
            .terminate_instances()
            .instance_ids(&id.0)
            .send()
            .await;
        let Err(error) = result else {
            return Ok(());
        };
        match classify("TerminateInstances", error) {
            BackendError::NotFound { .. } => Err(BackendError::NotFound { id: id.0.clone() }),
            other => {
                // Already on its way out (some EC2-compatible APIs refuse a second terminate):
                // the goal is reached whatever the error says.
                match self.describe(id).await {
                    Ok(cell) if cell.state.is_ending() => Ok(()),
                    _ => Err(other),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> AwsConfig {
        AwsConfig::new(
            "us-east-1",
            "burst-prod",
            BootImage::Id("ami-0123456789abcdef0".into()),
            "subnet-0123456789abcdef0",
        )
    }

    fn field_of(config: AwsConfig) -> String {
        config
            .validate()
            .expect_err("invalid config")
            .field()
            .to_owned()
    }

    #[test]
    fn a_good_config_validates() {
        let mut config = good();
        config.endpoint_url = Some("http://127.0.0.1:5000".into());
        config.extra_cidrs = vec!["10.20.0.0/16".into(), "fd00::/8".into()];
        config.extra_security_groups = vec!["sg-0123".into(), "web".into()];
        config.arm64_boot_image = Some(BootImage::Filters {
            owners: vec!["self".into()],
            filters: BTreeMap::from([("name".into(), vec!["updraft-cell-arm64-*".into()])]),
        });
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn every_bad_setting_is_named() {
        let with = |change: fn(&mut AwsConfig)| {
            let mut config = good();
            change(&mut config);
            field_of(config)
        };
        assert_eq!(with(|c| c.region = String::new()), "region");
        assert_eq!(with(|c| c.region = "US East 1".into()), "region");
        assert_eq!(
            with(|c| c.endpoint_url = Some("127.0.0.1:5000".into())),
            "aws.endpointUrl"
        );
        assert_eq!(with(|c| c.controller_id = " ".into()), "controllerId");
        assert_eq!(with(|c| c.controller_id = "a;b".into()), "controllerId");
        assert_eq!(with(|c| c.subnet_id = String::new()), "aws.subnetId");
        assert_eq!(with(|c| c.subnet_id = "vpc-0123".into()), "aws.subnetId");
        assert_eq!(
            with(|c| c.boot_image = BootImage::Id("ubuntu".into())),
            "aws.bootImage.id"
        );
        assert_eq!(
            with(|c| c.boot_image = BootImage::Filters {
                owners: vec!["self".into()],
                filters: BTreeMap::new(),
            }),
            "aws.bootImage.filters"
        );
        assert_eq!(
            with(|c| c.boot_image = BootImage::Filters {
                owners: Vec::new(),
                filters: BTreeMap::from([("name".into(), Vec::new())]),
            }),
            "aws.bootImage.filters.name"
        );
        assert_eq!(
            with(|c| c.boot_image = BootImage::Filters {
                owners: Vec::new(),
                filters: BTreeMap::from([("image name".into(), vec!["x".into()])]),
            }),
            "aws.bootImage.filters"
        );
        assert_eq!(
            with(|c| c.arm64_boot_image = Some(BootImage::Id("ami-".into()))),
            "aws.arm64BootImage.id"
        );
        assert_eq!(
            with(|c| c.security_group_name = Some(String::new())),
            "aws.securityGroupName"
        );
        assert_eq!(with(|c| c.agent_port = 0), "agent.port");
        assert_eq!(
            with(|c| c.extra_cidrs = vec!["10.0.0.0/8".into(), "10.0.0.0".into()]),
            "extraCidrs[1]"
        );
        assert_eq!(
            with(|c| c.extra_cidrs = vec!["10.0.0.0/33".into()]),
            "extraCidrs[0]"
        );
        assert_eq!(
            with(|c| c.extra_security_groups = vec![String::new()]),
            "extraSecurityGroups[0]"
        );
        let message = {
            let mut config = good();
            config.region = String::new();
            BackendError::from(config.validate().expect_err("no region")).to_string()
        };
        assert!(
            message.contains("region") && message.contains("us-east-1"),
            "{message}"
        );
    }

    #[test]
    fn client_tokens_fit_ec2_and_the_fallback_has_its_own() {
        assert_eq!(client_token("uid-1", false), "uid-1");
        assert_eq!(client_token("uid-1", true), "uid-1-od");
        let long = "x".repeat(100);
        assert_eq!(client_token(&long, false).len(), 64);
        let fallback = client_token(&long, true);
        assert_eq!(fallback.len(), 64);
        assert!(fallback.ends_with("-od"));
        assert_ne!(fallback, client_token(&long, false));
        assert_eq!(client_token("ü id\n-1", false), "id-1");
    }
}
