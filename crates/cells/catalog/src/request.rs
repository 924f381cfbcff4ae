//! The effective resource request of a pod, computed the way the Kubernetes scheduler does.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::catalog::Arch;
use updraft_common::quantity::{self, QuantityError};

/// The extended resource name of NVIDIA GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// The node-selector label that pins a pod to an architecture.
pub const ARCH_LABEL: &str = "kubernetes.io/arch";

/// What a pod needs from its cell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodRequest {
    /// CPU in millicores.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Number of `nvidia.com/gpu`.
    pub gpus: u32,
    /// The architecture from the `kubernetes.io/arch` node selector, if any.
    pub arch: Option<Arch>,
}

/// A pod whose resources cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A container's request or limit is not a valid quantity.
    #[error("container {container:?}: resources.{kind}[{resource:?}]: {source}")]
    Quantity {
        /// The container's name.
        container: String,
        /// `requests` or `limits`.
        kind: &'static str,
        /// The resource name (`cpu`, `memory`, `nvidia.com/gpu`).
        resource: String,
        /// Why the quantity was rejected.
        source: QuantityError,
    },
    /// `spec.overhead` holds an invalid quantity.
    #[error("spec.overhead[{resource:?}]: {source}")]
    Overhead {
        /// The resource name.
        resource: String,
        /// Why the quantity was rejected.
        source: QuantityError,
    },
    /// The `kubernetes.io/arch` node selector names an architecture no catalog has.
    #[error(
        "nodeSelector {ARCH_LABEL}={value:?} is not an architecture cells offer; use \"amd64\" or \"arm64\""
    )]
    UnknownArch {
        /// The selector's value.
        value: String,
    },
    /// More GPUs than fit a number.
    #[error("container {container:?}: {GPU_RESOURCE} count {count} is too large")]
    TooManyGpus {
        /// The container's name.
        container: String,
        /// The requested count.
        count: u64,
    },
}

/// One container's requests: requests where given, else limits (as the API server defaults them).
#[derive(Debug, Clone, Copy, Default)]
struct Amounts {
    cpu_millis: u64,
    memory_bytes: u64,
    gpus: u64,
}

impl Amounts {
    fn plus(self, other: Amounts) -> Amounts {
        Amounts {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            gpus: self.gpus.saturating_add(other.gpus),
        }
    }

    fn max(self, other: Amounts) -> Amounts {
        Amounts {
            cpu_millis: self.cpu_millis.max(other.cpu_millis),
            memory_bytes: self.memory_bytes.max(other.memory_bytes),
            gpus: self.gpus.max(other.gpus),
        }
    }
}

fn pick<'a>(
    map: Option<&'a BTreeMap<String, Quantity>>,
    resource: &str,
    kind: &'static str,
) -> Option<(&'a Quantity, &'static str)> {
    map.and_then(|m| m.get(resource)).map(|q| (q, kind))
}

fn container_amounts(container: &Container) -> Result<Amounts, RequestError> {
    let resources = container.resources.as_ref();
    let requests = resources.and_then(|r| r.requests.as_ref());
    let limits = resources.and_then(|r| r.limits.as_ref());
    let read = |resource: &str,
                parse: fn(&str) -> Result<u64, QuantityError>|
     -> Result<u64, RequestError> {
        match pick(requests, resource, "requests").or_else(|| pick(limits, resource, "limits")) {
            None => Ok(0),
            Some((value, kind)) => parse(&value.0).map_err(|source| RequestError::Quantity {
                container: container.name.clone(),
                kind,
                resource: resource.to_string(),
                source,
            }),
        }
    };
    Ok(Amounts {
        cpu_millis: read("cpu", quantity::cpu_millis)?,
        memory_bytes: read("memory", quantity::bytes)?,
        gpus: read(GPU_RESOURCE, quantity::count)?,
    })
}

impl PodRequest {
    /// The pod's effective request, per resource: the larger of the largest init container and
    /// the sum of the app containers, plus `spec.overhead`. Sidecars (init containers with
    /// `restartPolicy: Always`) count towards both, as in Kubernetes 1.29+. A container that sets
    /// only limits requests its limits. The architecture comes from the `kubernetes.io/arch`
    /// node selector.
    pub fn from_pod_spec(spec: &PodSpec) -> Result<PodRequest, RequestError> {
        let mut sidecars = Amounts::default();
        let mut init_peak = Amounts::default();
        for container in spec.init_containers.iter().flatten() {
            let amounts = container_amounts(container)?;
            if container.restart_policy.as_deref() == Some("Always") {
                sidecars = sidecars.plus(amounts);
                init_peak = init_peak.max(sidecars);
            } else {
                init_peak = init_peak.max(amounts.plus(sidecars));
            }
        }
        let mut apps = Amounts::default();
        for container in &spec.containers {
            apps = apps.plus(container_amounts(container)?);
        }
        let mut total = apps.plus(sidecars).max(init_peak);
        if let Some(overhead) = &spec.overhead {
            let read = |resource: &str, parse: fn(&str) -> Result<u64, QuantityError>| {
                overhead
                    .get(resource)
                    .map(|q| {
                        parse(&q.0).map_err(|source| RequestError::Overhead {
                            resource: resource.to_string(),
                            source,
                        })
                    })
                    .transpose()
                    .map(Option::unwrap_or_default)
            };
            total = total.plus(Amounts {
                cpu_millis: read("cpu", quantity::cpu_millis)?,
                memory_bytes: read("memory", quantity::bytes)?,
                gpus: 0,
            });
        }
        let gpus = u32::try_from(total.gpus).map_err(|_| RequestError::TooManyGpus {
            container: "(pod total)".to_string(),
            count: total.gpus,
        })?;
        let arch = match spec.node_selector.as_ref().and_then(|s| s.get(ARCH_LABEL)) {
            None => None,
            Some(value) => {
                Some(
                    Arch::from_kubernetes(value).ok_or_else(|| RequestError::UnknownArch {
                        value: value.clone(),
                    })?,
                )
            }
        };
        Ok(PodRequest {
            cpu_millis: total.cpu_millis,
            memory_bytes: total.memory_bytes,
            gpus,
            arch,
        })
    }

    /// True when the pod asks for no CPU, memory or GPU (it then gets the default type).
    pub fn requests_nothing(&self) -> bool {
        self.cpu_millis == 0 && self.memory_bytes == 0 && self.gpus == 0
    }
}

/// `8`, `0.5`, `2.25` (CPUs from millicores).
pub fn format_cpu(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        format!("{}", millis / 1000)
    } else {
        let text = format!("{}.{:03}", millis / 1000, millis % 1000);
        text.trim_end_matches('0').to_string()
    }
}

/// `15 GiB`, `1.5 GiB`, `512 MiB`, `100 bytes`.
pub fn format_bytes(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    const GIB: u64 = 1024 * MIB;
    if bytes >= GIB {
        let tenths = (bytes * 10).div_ceil(GIB);
        if tenths.is_multiple_of(10) {
            format!("{} GiB", tenths / 10)
        } else {
            format!("{}.{} GiB", tenths / 10, tenths % 10)
        }
    } else if bytes >= MIB {
        format!("{} MiB", bytes.div_ceil(MIB))
    } else {
        format!("{bytes} bytes")
    }
}

impl fmt::Display for PodRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} CPU, {} memory",
            format_cpu(self.cpu_millis),
            format_bytes(self.memory_bytes)
        )?;
        if self.gpus > 0 {
            write!(f, ", {} GPU", self.gpus)?;
        }
        if let Some(arch) = self.arch {
            write!(f, ", {arch}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceRequirements;

    fn container(name: &str, requests: &[(&str, &str)], limits: &[(&str, &str)]) -> Container {
        let map = |pairs: &[(&str, &str)]| {
            (!pairs.is_empty()).then(|| {
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                    .collect()
            })
        };
        Container {
            name: name.to_string(),
            resources: Some(ResourceRequirements {
                requests: map(requests),
                limits: map(limits),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn sum_of_apps_versus_largest_init() {
        let spec = PodSpec {
            init_containers: Some(vec![
                container("migrate", &[("cpu", "3"), ("memory", "1Gi")], &[]),
                container("warm", &[("memory", "6Gi")], &[]),
            ]),
            containers: vec![
                container("web", &[("cpu", "1"), ("memory", "2Gi")], &[]),
                container("log", &[("cpu", "500m"), ("memory", "1Gi")], &[]),
            ],
            ..Default::default()
        };
        let request = PodRequest::from_pod_spec(&spec).expect("request");
        assert_eq!(request.cpu_millis, 3000);
        assert_eq!(request.memory_bytes, 6 << 30);
    }

    #[test]
    fn limits_only_and_gpu_and_overhead() {
        let mut spec = PodSpec {
            containers: vec![container(
                "train",
                &[("memory", "4Gi")],
                &[("cpu", "2"), ("memory", "8Gi"), (GPU_RESOURCE, "1")],
            )],
            overhead: Some(
                [("cpu".to_string(), Quantity("250m".into()))]
                    .into_iter()
                    .collect(),
            ),
            ..Default::default()
        };
        spec.node_selector = Some([(ARCH_LABEL.to_string(), "arm64".to_string())].into());
        let request = PodRequest::from_pod_spec(&spec).expect("request");
        assert_eq!(
            request,
            PodRequest {
                cpu_millis: 2250,
                memory_bytes: 4 << 30,
                gpus: 1,
                arch: Some(Arch::Arm64)
            }
        );
        assert_eq!(request.to_string(), "2.25 CPU, 4 GiB memory, 1 GPU, arm64");
    }

    #[test]
    fn sidecars_count_towards_apps_and_later_inits() {
        let mut sidecar = container("proxy", &[("cpu", "1")], &[]);
        sidecar.restart_policy = Some("Always".into());
        let spec = PodSpec {
            init_containers: Some(vec![sidecar, container("setup", &[("cpu", "2")], &[])]),
            containers: vec![container("app", &[("cpu", "1")], &[])],
            ..Default::default()
        };
        // init peak: setup (2) + proxy (1) = 3; apps: app (1) + proxy (1) = 2.
        assert_eq!(
            PodRequest::from_pod_spec(&spec)
                .expect("request")
                .cpu_millis,
            3000
        );
    }

    #[test]
    fn errors_name_container_and_resource() {
        let spec = PodSpec {
            containers: vec![container("web", &[("memory", "lots")], &[])],
            ..Default::default()
        };
        let message = PodRequest::from_pod_spec(&spec)
            .expect_err("bad")
            .to_string();
        assert!(message.contains("\"web\""), "{message}");
        assert!(message.contains("requests[\"memory\"]"), "{message}");
        let spec = PodSpec {
            node_selector: Some([(ARCH_LABEL.to_string(), "s390x".to_string())].into()),
            ..Default::default()
        };
        let message = PodRequest::from_pod_spec(&spec)
            .expect_err("arch")
            .to_string();
        assert!(message.contains("s390x"), "{message}");
        assert!(
            PodRequest::from_pod_spec(&PodSpec::default())
                .expect("empty")
                .requests_nothing()
        );
    }
}
