//! Resolving what a pod references into values and files for the provider.
//!
//! Each ConfigMap and Secret a pod references is read by name, when the pod is reconciled;
//! nothing keeps a cluster-wide copy. Under the Node authorizer the node may read exactly the
//! objects that pods bound to it reference, which is all this needs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, ObjectFieldSelector, Pod,
    ResourceFieldSelector, Secret, ServiceAccount,
};
use kube::api::{Api, PostParams};
use updraft_common::quantity::Quantity;
use updraft_provider::{EnvVar, ResolvedPod, VolumeFile, VolumeFiles};

/// Why a pod's references could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// A ConfigMap or Secret (or one of its keys) that the pod requires does not exist. The
    /// pod waits; it is retried, since the object may be created later.
    #[error("{kind} {namespace}/{name}{} not found{}", key.as_ref().map(|k| format!(" key {k:?}")).unwrap_or_default(), context.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    MandatoryMissing {
        /// `ConfigMap` or `Secret`.
        kind: &'static str,
        /// The object's namespace.
        namespace: String,
        /// The object's name.
        name: String,
        /// The missing key, if the object exists but lacks it.
        key: Option<String>,
        /// Where the reference is (container and variable, or volume).
        context: Option<String>,
    },
    /// The pod's spec references something unsupported or malformed.
    #[error("invalid reference: {0}")]
    Invalid(String),
    /// Reading a referenced object or requesting a token failed.
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

impl ResolveError {
    /// The kubelet-style Event reason for this failure.
    pub fn event_reason(&self) -> &'static str {
        match self {
            Self::MandatoryMissing { kind: "Secret", .. } => "MandatorySecretNotFound",
            Self::MandatoryMissing { .. } => "MandatoryConfigMapNotFound",
            Self::Invalid(_) => "InvalidReference",
            Self::Api(_) => "ReferenceReadFailed",
        }
    }
}

/// Something the pod references that is optional and absent: the pod starts without it, and
/// an Event says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionalMissing {
    /// `OptionalConfigMapNotFound` or `OptionalSecretNotFound` (or `…KeyNotFound`).
    pub reason: &'static str,
    /// What was missing.
    pub message: String,
}

/// The result of resolving a pod.
#[derive(Debug)]
pub struct Resolution {
    /// What the provider receives.
    pub pod: ResolvedPod,
    /// Optional references that were absent.
    pub missing_optional: Vec<OptionalMissing>,
    /// Every ConfigMap and Secret the pod references (present or not), in its namespace:
    /// what must be watched for the provider to see updates.
    pub references: Vec<crate::references::Referenced>,
    /// The shortest lifetime of the projected service-account tokens in the pod's volumes,
    /// if it has any: they must be requested again before they expire.
    pub token_lifetime: Option<std::time::Duration>,
}

/// The first and the last pause before asking for a token again after a 403 or 404 that a
/// control-plane lag may explain (50, 100, 200, 400 ms: under a second in all).
const AUTHORIZER_LAG_FIRST_RETRY: std::time::Duration = std::time::Duration::from_millis(50);
const AUTHORIZER_LAG_LAST_RETRY: std::time::Duration = std::time::Duration::from_millis(400);

/// Reads ConfigMaps and Secrets by name, once per object per resolution.
pub struct Resolver {
    client: kube::Client,
    config_maps: HashMap<String, Option<ConfigMap>>,
    secrets: HashMap<String, Option<Secret>>,
    missing_optional: Vec<OptionalMissing>,
    namespace: String,
    /// The shortest lifetime of the service-account tokens issued for the pod.
    token_lifetime: Option<std::time::Duration>,
}

impl Resolver {
    /// Resolves `pod`'s env and volumes through `client` (the node's identity).
    /// `service_env` holds the service variables of the pod's namespace (see
    /// [`crate::services`]): containers get those their own env does not set, and `$(VAR)`
    /// may refer to them.
    pub async fn resolve(
        client: kube::Client,
        pod: &Arc<Pod>,
        service_env: &[EnvVar],
    ) -> Result<Resolution, ResolveError> {
        let mut resolver = Self {
            client,
            config_maps: HashMap::new(),
            secrets: HashMap::new(),
            missing_optional: Vec::new(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            token_lifetime: None,
        };
        let mut env = BTreeMap::new();
        let spec = pod
            .spec
            .as_ref()
            .ok_or_else(|| ResolveError::Invalid("the pod has no spec".into()))?;
        for container in spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
        {
            env.insert(
                container.name.clone(),
                resolver.container_env(pod, container, service_env).await?,
            );
        }
        let mut volumes = BTreeMap::new();
        for volume in spec.volumes.iter().flatten() {
            if let Some(files) = resolver.volume_files(pod, volume).await? {
                volumes.insert(volume.name.clone(), files);
            }
        }
        Ok(Resolution {
            pod: ResolvedPod {
                pod: Arc::clone(pod),
                env,
                volumes,
                dns: None,
            },
            references: resolver
                .config_maps
                .keys()
                .map(|name| crate::references::Referenced::config_map(&resolver.namespace, name))
                .chain(
                    resolver.secrets.keys().map(|name| {
                        crate::references::Referenced::secret(&resolver.namespace, name)
                    }),
                )
                .collect(),
            missing_optional: resolver.missing_optional,
            token_lifetime: resolver.token_lifetime,
        })
    }

    async fn config_map(&mut self, name: &str) -> Result<Option<ConfigMap>, ResolveError> {
        if !self.config_maps.contains_key(name) {
            let found = Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace)
                .get_opt(name)
                .await?;
            self.config_maps.insert(name.to_owned(), found);
        }
        Ok(self.config_maps.get(name).cloned().flatten())
    }

    async fn secret(&mut self, name: &str) -> Result<Option<Secret>, ResolveError> {
        if !self.secrets.contains_key(name) {
            let found = Api::<Secret>::namespaced(self.client.clone(), &self.namespace)
                .get_opt(name)
                .await?;
            self.secrets.insert(name.to_owned(), found);
        }
        Ok(self.secrets.get(name).cloned().flatten())
    }

    /// All key/value pairs of a ConfigMap (data and binaryData) or Secret, as bytes.
    async fn source_data(
        &mut self,
        kind: &'static str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, ResolveError> {
        Ok(match kind {
            "Secret" => self.secret(name).await?.map(|s| {
                let mut data: BTreeMap<String, Vec<u8>> = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect();
                data.extend(
                    s.string_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes())),
                );
                data
            }),
            _ => self.config_map(name).await?.map(|c| {
                let mut data: BTreeMap<String, Vec<u8>> = c
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                data.extend(
                    c.binary_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                );
                data
            }),
        })
    }

    /// The value of `key` in a ConfigMap or Secret; `None` when optional and absent.
    async fn key_value(
        &mut self,
        kind: &'static str,
        name: &str,
        key: &str,
        optional: bool,
        context: String,
    ) -> Result<Option<Vec<u8>>, ResolveError> {
        let data = self.source_data(kind, name).await?;
        let value = data.as_ref().and_then(|d| d.get(key)).cloned();
        if value.is_none() {
            let key_missing = data.is_some();
            if optional {
                let reason = match (kind, key_missing) {
                    ("Secret", false) => "OptionalSecretNotFound",
                    ("Secret", true) => "OptionalSecretKeyNotFound",
                    (_, false) => "OptionalConfigMapNotFound",
                    (_, true) => "OptionalConfigMapKeyNotFound",
                };
                let what = if key_missing {
                    format!("key {key:?} of {kind} {name:?}")
                } else {
                    format!("{kind} {name:?}")
                };
                self.missing_optional.push(OptionalMissing {
                    reason,
                    message: format!("optional {what} not found ({context})"),
                });
            } else {
                return Err(ResolveError::MandatoryMissing {
                    kind,
                    namespace: self.namespace.clone(),
                    name: name.to_owned(),
                    key: key_missing.then(|| key.to_owned()),
                    context: Some(context),
                });
            }
        }
        Ok(value)
    }

    async fn container_env(
        &mut self,
        pod: &Pod,
        container: &Container,
        service_env: &[EnvVar],
    ) -> Result<Vec<EnvVar>, ResolveError> {
        // Order as the kubelet builds it: envFrom sources in order, then env entries in order,
        // each `env` value expanded against what is defined before it.
        let mut vars: Vec<EnvVar> = Vec::new();
        let set = |vars: &mut Vec<EnvVar>, name: String, value: String| match vars
            .iter_mut()
            .find(|v| v.name == name)
        {
            Some(existing) => existing.value = value,
            None => vars.push(EnvVar { name, value }),
        };
        for source in container.env_from.iter().flatten() {
            let prefix = source.prefix.clone().unwrap_or_default();
            let (kind, name, optional) = match (&source.config_map_ref, &source.secret_ref) {
                (Some(c), _) => ("ConfigMap", c.name.clone(), c.optional.unwrap_or(false)),
                (None, Some(s)) => ("Secret", s.name.clone(), s.optional.unwrap_or(false)),
                (None, None) => continue,
            };
            match self.source_data(kind, &name).await? {
                Some(data) => {
                    for (key, value) in data {
                        set(
                            &mut vars,
                            format!("{prefix}{key}"),
                            String::from_utf8_lossy(&value).into_owned(),
                        );
                    }
                }
                None if optional => self.missing_optional.push(OptionalMissing {
                    reason: if kind == "Secret" {
                        "OptionalSecretNotFound"
                    } else {
                        "OptionalConfigMapNotFound"
                    },
                    message: format!(
                        "optional {kind} {name:?} not found (envFrom of container {})",
                        container.name
                    ),
                }),
                None => {
                    return Err(ResolveError::MandatoryMissing {
                        kind,
                        namespace: self.namespace.clone(),
                        name,
                        key: None,
                        context: Some(format!("envFrom of container {}", container.name)),
                    });
                }
            }
        }
        for var in container.env.iter().flatten() {
            let context = format!("env {} of container {}", var.name, container.name);
            let value = match (&var.value, &var.value_from) {
                (Some(value), _) => {
                    // The container's own variables win over service variables.
                    let defined: HashMap<&str, &str> = service_env
                        .iter()
                        .chain(vars.iter())
                        .map(|v| (v.name.as_str(), v.value.as_str()))
                        .collect();
                    expand(value, &defined)
                }
                (None, Some(from)) => {
                    if let Some(r) = &from.config_map_key_ref {
                        match self
                            .key_value(
                                "ConfigMap",
                                &r.name,
                                &r.key,
                                r.optional.unwrap_or(false),
                                context,
                            )
                            .await?
                        {
                            Some(v) => String::from_utf8_lossy(&v).into_owned(),
                            None => continue,
                        }
                    } else if let Some(r) = &from.secret_key_ref {
                        match self
                            .key_value(
                                "Secret",
                                &r.name,
                                &r.key,
                                r.optional.unwrap_or(false),
                                context,
                            )
                            .await?
                        {
                            Some(v) => String::from_utf8_lossy(&v).into_owned(),
                            None => continue,
                        }
                    } else if let Some(field) = &from.field_ref {
                        field_value(pod, field)?
                    } else if let Some(resource) = &from.resource_field_ref {
                        resource_value(pod, Some(&container.name), resource)?
                    } else {
                        String::new()
                    }
                }
                (None, None) => String::new(),
            };
            set(&mut vars, var.name.clone(), value);
        }
        for service_var in service_env {
            if !vars.iter().any(|v| v.name == service_var.name) {
                vars.push(service_var.clone());
            }
        }
        Ok(vars)
    }

    async fn volume_files(
        &mut self,
        pod: &Pod,
        volume: &k8s_openapi::api::core::v1::Volume,
    ) -> Result<Option<VolumeFiles>, ResolveError> {
        const DEFAULT_MODE: i32 = 0o644;
        if let Some(source) = &volume.config_map {
            let mode = source.default_mode.unwrap_or(DEFAULT_MODE);
            let context = format!("volume {}", volume.name);
            return self
                .key_files(
                    "ConfigMap",
                    &source.name,
                    source.items.as_deref(),
                    mode,
                    source.optional.unwrap_or(false),
                    &context,
                )
                .await;
        }
        if let Some(source) = &volume.secret {
            let mode = source.default_mode.unwrap_or(DEFAULT_MODE);
            let name = source.secret_name.clone().unwrap_or_default();
            let context = format!("volume {}", volume.name);
            return self
                .key_files(
                    "Secret",
                    &name,
                    source.items.as_deref(),
                    mode,
                    source.optional.unwrap_or(false),
                    &context,
                )
                .await;
        }
        if let Some(source) = &volume.downward_api {
            let mode = source.default_mode.unwrap_or(DEFAULT_MODE);
            return Ok(Some(downward_files(
                pod,
                source.items.as_deref().unwrap_or_default(),
                mode,
            )?));
        }
        if let Some(projected) = &volume.projected {
            let mode = projected.default_mode.unwrap_or(DEFAULT_MODE);
            let mut files = VolumeFiles::new();
            for source in projected.sources.iter().flatten() {
                let context = format!("projected volume {}", volume.name);
                if let Some(c) = &source.config_map {
                    let found = self
                        .key_files(
                            "ConfigMap",
                            &c.name,
                            c.items.as_deref(),
                            mode,
                            c.optional.unwrap_or(false),
                            &context,
                        )
                        .await?;
                    files.extend(found.unwrap_or_default());
                }
                if let Some(s) = &source.secret {
                    let found = self
                        .key_files(
                            "Secret",
                            &s.name,
                            s.items.as_deref(),
                            mode,
                            s.optional.unwrap_or(false),
                            &context,
                        )
                        .await?;
                    files.extend(found.unwrap_or_default());
                }
                if let Some(d) = &source.downward_api {
                    files.extend(downward_files(
                        pod,
                        d.items.as_deref().unwrap_or_default(),
                        mode,
                    )?);
                }
                if let Some(token) = &source.service_account_token {
                    let data = self
                        .service_account_token(
                            pod,
                            token.audience.clone(),
                            token.expiration_seconds,
                        )
                        .await?;
                    files.insert(
                        token.path.clone(),
                        VolumeFile {
                            data,
                            mode: mode_bits(mode),
                        },
                    );
                }
            }
            return Ok(Some(files));
        }
        Ok(None)
    }

    async fn key_files(
        &mut self,
        kind: &'static str,
        name: &str,
        items: Option<&[KeyToPath]>,
        default_mode: i32,
        optional: bool,
        context: &str,
    ) -> Result<Option<VolumeFiles>, ResolveError> {
        let Some(data) = self.source_data(kind, name).await? else {
            if optional {
                self.missing_optional.push(OptionalMissing {
                    reason: if kind == "Secret" {
                        "OptionalSecretNotFound"
                    } else {
                        "OptionalConfigMapNotFound"
                    },
                    message: format!("optional {kind} {name:?} not found ({context})"),
                });
                return Ok(Some(VolumeFiles::new()));
            }
            return Err(ResolveError::MandatoryMissing {
                kind,
                namespace: self.namespace.clone(),
                name: name.to_owned(),
                key: None,
                context: Some(context.to_owned()),
            });
        };
        let mut files = VolumeFiles::new();
        match items {
            None => {
                for (key, value) in data {
                    files.insert(
                        key,
                        VolumeFile {
                            data: value,
                            mode: mode_bits(default_mode),
                        },
                    );
                }
            }
            Some(items) => {
                for item in items {
                    let Some(value) = data.get(&item.key) else {
                        if optional {
                            continue;
                        }
                        return Err(ResolveError::MandatoryMissing {
                            kind,
                            namespace: self.namespace.clone(),
                            name: name.to_owned(),
                            key: Some(item.key.clone()),
                            context: Some(context.to_owned()),
                        });
                    };
                    check_relative_path(&item.path)?;
                    files.insert(
                        item.path.clone(),
                        VolumeFile {
                            data: value.clone(),
                            mode: mode_bits(item.mode.unwrap_or(default_mode)),
                        },
                    );
                }
            }
        }
        Ok(Some(files))
    }

    /// A token for the pod's service account, bound to the pod (it dies with the pod).
    async fn service_account_token(
        &mut self,
        pod: &Pod,
        audience: Option<String>,
        expiration_seconds: Option<i64>,
    ) -> Result<Vec<u8>, ResolveError> {
        let account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                // No audience: the API server's own, as for the default token volume.
                audiences: audience.map(|a| vec![a]),
                expiration_seconds: Some(expiration_seconds.unwrap_or(3600)),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let accounts = Api::<ServiceAccount>::namespaced(self.client.clone(), &self.namespace);
        let mut retry_in = AUTHORIZER_LAG_FIRST_RETRY;
        let issued = loop {
            match accounts
                .create_token_request(&account, &PostParams::default(), &request)
                .await
            {
                // The Node authorizer learns that a pod is bound to this node from its own
                // watch, which may lag behind ours by a moment right after binding (403); in a
                // namespace created a moment ago, the controller manager may not have created
                // the `default` ServiceAccount yet (404). Ask again shortly instead of failing
                // the reconciliation into a seconds-long backoff with a warning Event.
                Err(kube::Error::Api(status))
                    if matches!(status.code, 403 | 404)
                        && retry_in <= AUTHORIZER_LAG_LAST_RETRY =>
                {
                    tokio::time::sleep(retry_in).await;
                    retry_in *= 2;
                }
                other => break other?,
            }
        };
        // The lifetime asked for; the API server may only shorten it through its own maximum,
        // which still leaves the refresh (well) before expiry for the usual settings.
        let lifetime = std::time::Duration::from_secs(
            u64::try_from(expiration_seconds.unwrap_or(3600)).unwrap_or(3600),
        );
        self.token_lifetime = Some(self.token_lifetime.map_or(lifetime, |l| l.min(lifetime)));
        Ok(issued
            .status
            .and_then(|s| s.token)
            .unwrap_or_default()
            .into_bytes())
    }
}

fn mode_bits(mode: i32) -> u32 {
    u32::try_from(mode).unwrap_or(0o644) & 0o7777
}

fn check_relative_path(path: &str) -> Result<(), ResolveError> {
    if path.starts_with('/') || path.split('/').any(|part| part == "..") {
        return Err(ResolveError::Invalid(format!(
            "volume item path {path:?} must be relative and must not contain '..'"
        )));
    }
    Ok(())
}

fn downward_files(
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: i32,
) -> Result<VolumeFiles, ResolveError> {
    let mut files = VolumeFiles::new();
    for item in items {
        check_relative_path(&item.path)?;
        let value = match (&item.field_ref, &item.resource_field_ref) {
            (Some(field), _) => field_value(pod, field)?,
            (None, Some(resource)) => {
                resource_value(pod, resource.container_name.as_deref(), resource)?
            }
            (None, None) => String::new(),
        };
        files.insert(
            item.path.clone(),
            VolumeFile {
                data: value.into_bytes(),
                mode: mode_bits(item.mode.unwrap_or(default_mode)),
            },
        );
    }
    Ok(files)
}

/// `$(VAR)` expansion as the kubelet does it: defined variables are replaced, `$$` escapes a
/// `$`, and references to undefined variables stay as written.
pub fn expand(input: &str, defined: &HashMap<&str, &str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match defined.get(name) {
                        Some(value) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The value of a `fieldRef` (downward API).
pub fn field_value(pod: &Pod, field: &ObjectFieldSelector) -> Result<String, ResolveError> {
    let meta = &pod.metadata;
    let status = pod.status.as_ref();
    let path = field.field_path.as_str();
    let map_entry = |map: Option<&BTreeMap<String, String>>, prefix: &str| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.and_then(|m| m.get(key)).cloned().unwrap_or_default())
    };
    let render_map = |map: Option<&BTreeMap<String, String>>| {
        map.map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => render_map(meta.labels.as_ref()),
        "metadata.annotations" => render_map(meta.annotations.as_ref()),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()).unwrap_or_default(),
        "status.hostIPs" => status
            .and_then(|s| s.host_ips.as_ref())
            .map(|ips| {
                ips.iter()
                    .map(|i| i.ip.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        "status.podIPs" => status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| {
                ips.iter()
                    .map(|i| i.ip.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default(),
        _ => {
            if let Some(v) = map_entry(meta.labels.as_ref(), "metadata.labels['") {
                v
            } else if let Some(v) = map_entry(meta.annotations.as_ref(), "metadata.annotations['") {
                v
            } else {
                return Err(ResolveError::Invalid(format!(
                    "unsupported fieldRef {path:?}"
                )));
            }
        }
    })
}

/// The value of a `resourceFieldRef`: the container's request or limit, divided by the
/// divisor and rounded up, as the kubelet renders it.
pub fn resource_value(
    pod: &Pod,
    container: Option<&str>,
    selector: &ResourceFieldSelector,
) -> Result<String, ResolveError> {
    let name = selector
        .container_name
        .as_deref()
        .or(container)
        .unwrap_or_default();
    let spec = pod.spec.as_ref();
    let found = spec
        .iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .find(|c| c.name == name)
        .ok_or_else(|| {
            ResolveError::Invalid(format!("resourceFieldRef names unknown container {name:?}"))
        })?;
    let (kind, resource) = selector.resource.split_once('.').ok_or_else(|| {
        ResolveError::Invalid(format!(
            "unsupported resourceFieldRef {:?}",
            selector.resource
        ))
    })?;
    let resources = found.resources.as_ref();
    let quantity = match kind {
        "limits" => resources
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get(resource)),
        "requests" => resources
            .and_then(|r| r.requests.as_ref())
            .and_then(|l| l.get(resource)),
        _ => {
            return Err(ResolveError::Invalid(format!(
                "unsupported resourceFieldRef {:?}",
                selector.resource
            )));
        }
    };
    let divisor = selector
        .divisor
        .as_ref()
        .map(|d| d.0.as_str())
        .unwrap_or("1");
    let parse = |text: &str| {
        Quantity::parse(text).map_err(|error| {
            ResolveError::Invalid(format!("resourceFieldRef {:?}: {error}", selector.resource))
        })
    };
    let value = quantity
        .map(|q| parse(&q.0))
        .transpose()?
        .unwrap_or(Quantity::ZERO);
    let divisor = parse(divisor)?;
    // As the kubelet: CPU is divided in millicores, everything else (memory, ephemeral
    // storage, hugepages) in whole units, each rounded up first; the quotient is rounded up,
    // so anything set shows as at least 1.
    let (value, divisor) = if resource == "cpu" {
        (value.to_milli(), divisor.to_milli())
    } else {
        (value.to_units(), divisor.to_units())
    };
    if divisor <= 0 {
        return Err(ResolveError::Invalid(
            "resourceFieldRef divisor must be positive".into(),
        ));
    }
    let quotient = value / divisor;
    let rounded_up = if value % divisor > 0 {
        quotient + 1
    } else {
        quotient
    };
    Ok(rounded_up.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_the_kubelet_rules() {
        let defined: HashMap<&str, &str> = [("A", "1"), ("B", "two")].into_iter().collect();
        assert_eq!(expand("x-$(A)-$(B)", &defined), "x-1-two");
        assert_eq!(expand("$(MISSING)", &defined), "$(MISSING)");
        assert_eq!(expand("$$(A)", &defined), "$(A)");
        assert_eq!(expand("cost $5 $(A", &defined), "cost $5 $(A");
    }

    #[test]
    fn field_refs_read_the_pod() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "labels": {"app": "web"}},
            "spec": {"nodeName": "vn", "containers": [{"name": "c", "resources": {"limits": {"cpu": "250m", "memory": "64Mi"}}}]},
            "status": {"podIP": "10.244.0.7"}
        }))
        .unwrap();
        let field = |p: &str| {
            field_value(
                &pod,
                &ObjectFieldSelector {
                    field_path: p.into(),
                    api_version: None,
                },
            )
            .unwrap()
        };
        assert_eq!(field("metadata.labels['app']"), "web");
        assert_eq!(field("status.podIP"), "10.244.0.7");
        assert_eq!(field("spec.nodeName"), "vn");
        let resource = |r: &str, d: Option<&str>| {
            resource_value(
                &pod,
                Some("c"),
                &ResourceFieldSelector {
                    resource: r.into(),
                    divisor: d
                        .map(|d| k8s_openapi::apimachinery::pkg::api::resource::Quantity(d.into())),
                    container_name: None,
                },
            )
            .unwrap()
        };
        assert_eq!(resource("limits.cpu", None), "1");
        assert_eq!(resource("limits.cpu", Some("1m")), "250");
        assert_eq!(resource("limits.memory", Some("1Mi")), "64");
        // Memory divides whole bytes: a divisor of 1m is one byte, as the kubelet reads it.
        assert_eq!(resource("limits.memory", Some("1m")), "67108864");
        assert_eq!(resource("limits.cpu", Some("300m")), "1");
        assert_eq!(resource("requests.cpu", None), "0");
    }
}
