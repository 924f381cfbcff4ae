//! Between Kubernetes, the node's resolved pods and the agent API: the apply request, the
//! bootstrap of a cell, and the pod status the node writes.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, Pod, PodCondition, PodStatus,
};
use updraft_cell_api::{
    ApplyPodRequest, DnsSettings, EnvValue, PodInterface, PodNetworkConfig, VolumeContent,
    VolumeFile,
};
use updraft_cells_backend::cloud_init::{Bootstrap, BootstrapFile};
use updraft_provider::ResolvedPod;

use crate::config::{AgentSettings, PodNetworkSettings};
use crate::pki::ServerCertificate;

/// The pod condition type that says which cell runs the pod, its instance type and price.
pub const CELL_CONDITION: &str = "cells.updraft.dev/Cell";
/// Reason of a pod whose cell was lost.
pub const REASON_CELL_LOST: &str = "CellLost";
/// Reason of a pod whose cell's agent did not answer within `bootTimeout`.
pub const REASON_CELL_BOOT_TIMEOUT: &str = "CellBootTimeout";
/// Reason of the cell condition while the cell boots.
pub const REASON_CELL_STARTING: &str = "CellStarting";
/// Reason of the cell condition once the agent runs the pod.
pub const REASON_CELL_RUNNING: &str = "CellRunning";

/// The agent's request for `resolved`, with the pod's interface on the cell.
pub fn apply_request(
    resolved: &ResolvedPod,
    interface: Option<PodInterface>,
    network: Option<&PodNetworkSettings>,
) -> ApplyPodRequest {
    // Works whether the node hands the pod by value or shared.
    let mut pod = Pod::clone(&resolved.pod);
    pod.status = None;
    pod.metadata.managed_fields = None;
    let env = resolved
        .env
        .iter()
        .map(|(container, vars)| {
            let values = vars
                .iter()
                .map(|v| EnvValue {
                    name: v.name.clone(),
                    value: v.value.clone(),
                })
                .collect();
            (container.clone(), values)
        })
        .collect();
    let volumes = resolved
        .volumes
        .iter()
        .map(|(name, files)| {
            let files = files
                .iter()
                .map(|(path, file)| VolumeFile {
                    path: path.clone(),
                    content: file.data.clone(),
                    mode: Some(file.mode),
                })
                .collect();
            (name.clone(), VolumeContent { files })
        })
        .collect();
    let dns = network.map_or_else(DnsSettings::default, |settings| DnsSettings {
        nameservers: settings.nameservers.clone(),
        searches: settings.searches.clone(),
        options: Vec::new(),
    });
    ApplyPodRequest {
        pod,
        env,
        volumes,
        // The node does not resolve imagePullSecrets yet (providers never read Secrets):
        // private registries need credentials on the cell until it does.
        pull_secrets: Vec::new(),
        network: PodNetworkConfig { interface, dns },
    }
}

/// Where the bootstrap puts the agent's TLS files.
pub struct AgentFiles {
    /// The client CA (the provider's CA).
    pub ca: String,
    /// The server certificate.
    pub cert: String,
    /// Its key.
    pub key: String,
}

/// The files and the command that start the agent on a new cell.
pub fn bootstrap(
    agent: &AgentSettings,
    listen_flag: bool,
    ca_pem: &str,
    server: &ServerCertificate,
) -> Bootstrap {
    let dir = agent.tls_dir.trim_end_matches('/');
    let files = AgentFiles {
        ca: format!("{dir}/client-ca.crt"),
        cert: format!("{dir}/server.crt"),
        key: format!("{dir}/server.key"),
    };
    let mut command = agent.command.clone();
    if listen_flag {
        command.extend(["--listen".to_owned(), format!("0.0.0.0:{}", agent.port)]);
    }
    command.extend([
        "--dir".to_owned(),
        agent.dir.clone(),
        "--tls-cert".to_owned(),
        files.cert.clone(),
        "--tls-key".to_owned(),
        files.key.clone(),
        "--client-ca".to_owned(),
        files.ca.clone(),
    ]);
    command.extend(agent.extra_args.iter().cloned());
    Bootstrap {
        files: vec![
            BootstrapFile {
                path: files.ca,
                contents: ca_pem.as_bytes().to_vec(),
                mode: 0o644,
            },
            BootstrapFile {
                path: files.cert,
                contents: server.cert_pem.as_bytes().to_vec(),
                mode: 0o644,
            },
            BootstrapFile {
                path: files.key,
                contents: server.key_pem.as_bytes().to_vec(),
                mode: 0o600,
            },
        ],
        commands: vec![command],
    }
}

/// What the cell condition says about a cell.
#[derive(Debug, Clone, PartialEq)]
pub struct CellSummary {
    /// The backend's id.
    pub id: String,
    /// Instance type.
    pub instance_type: String,
    /// `on-demand` or `spot`.
    pub launch_type: String,
    /// Hourly price, if the catalog knows the type.
    pub price_per_hour: Option<f64>,
    /// Currency of the price.
    pub currency: String,
    /// The agent's address.
    pub management_ip: Option<IpAddr>,
}

impl CellSummary {
    /// `cell i-0123 (10.0.0.5): t3.small on-demand, 0.0208 USD/h`.
    pub fn describe(&self) -> String {
        let address = self
            .management_ip
            .map_or(String::new(), |ip| format!(" ({ip})"));
        let price = self.price_per_hour.map_or_else(
            || "price unknown".to_owned(),
            |p| format!("{p:.4} {}/h", self.currency),
        );
        format!(
            "cell {}{address}: {} {}, {price}",
            self.id, self.instance_type, self.launch_type
        )
    }
}

fn condition(type_: &str, status: bool, reason: &str, message: String) -> PodCondition {
    PodCondition {
        type_: type_.to_owned(),
        status: if status { "True" } else { "False" }.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message),
        last_transition_time: Some(updraft_provider::now()),
        ..PodCondition::default()
    }
}

fn set_condition(status: &mut PodStatus, new: PodCondition) {
    let conditions = status.conditions.get_or_insert_with(Vec::new);
    conditions.retain(|c| c.type_ != new.type_);
    conditions.push(new);
}

/// The status the node writes: the agent's, with the cell's address as host IP (the pod's IP
/// too for `hostNetwork` pods) and the cell condition.
pub fn running_status(agent: &PodStatus, cell: &CellSummary, host_network: bool) -> PodStatus {
    let mut status = agent.clone();
    if let Some(ip) = cell.management_ip {
        status.host_ip = Some(ip.to_string());
        status.host_ips = Some(vec![k8s_openapi::api::core::v1::HostIP {
            ip: ip.to_string(),
        }]);
        if host_network && status.pod_ip.is_none() {
            status.pod_ip = Some(ip.to_string());
            status.pod_ips = Some(vec![k8s_openapi::api::core::v1::PodIP {
                ip: ip.to_string(),
            }]);
        }
    }
    set_condition(
        &mut status,
        condition(CELL_CONDITION, true, REASON_CELL_RUNNING, cell.describe()),
    );
    status
}

/// The status while a cell boots: Pending, with the chosen type and price in the condition.
pub fn starting_status(cell: &CellSummary) -> PodStatus {
    let mut status = PodStatus {
        phase: Some("Pending".into()),
        ..PodStatus::default()
    };
    set_condition(
        &mut status,
        condition(
            CELL_CONDITION,
            false,
            REASON_CELL_STARTING,
            format!("starting {}", cell.describe()),
        ),
    );
    status
}

/// The status of a pod whose cell is gone (`reason`: [`REASON_CELL_LOST`] or
/// [`REASON_CELL_BOOT_TIMEOUT`]): `Failed` when it will not be restarted, else `Pending` while
/// a replacement cell starts. Running containers become terminated with reason `CellLost`.
pub fn lost_status(
    last: Option<&PodStatus>,
    failed: bool,
    reason: &str,
    message: String,
) -> PodStatus {
    let mut status = last.cloned().unwrap_or_default();
    status.phase = Some(if failed { "Failed" } else { "Pending" }.into());
    status.reason = Some(reason.into());
    status.message = Some(message.clone());
    let lost = |state: &mut Option<ContainerState>| {
        let finished = state.as_ref().is_some_and(|s| s.terminated.is_some());
        if !finished {
            *state = Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 137,
                    reason: Some(REASON_CELL_LOST.into()),
                    message: Some("the cell running the container was lost".into()),
                    finished_at: Some(updraft_provider::now()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            });
        }
    };
    for list in [
        status.container_statuses.as_mut(),
        status.init_container_statuses.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        for container in list {
            lost(&mut container.state);
            container.ready = false;
            container.started = Some(false);
        }
    }
    for type_ in ["Ready", "ContainersReady"] {
        set_condition(
            &mut status,
            condition(type_, false, reason, message.clone()),
        );
    }
    set_condition(
        &mut status,
        condition(CELL_CONDITION, false, reason, message),
    );
    status
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerStateRunning, ContainerStatus, Pod};
    use std::collections::BTreeMap;
    use updraft_provider::{EnvVar, VolumeFile as ResolvedFile};

    #[test]
    fn apply_request_carries_env_volumes_and_network() {
        let mut resolved = ResolvedPod::unresolved(Pod::default());
        resolved.env.insert(
            "app".into(),
            vec![EnvVar {
                name: "A".into(),
                value: "1".into(),
            }],
        );
        resolved.volumes.insert(
            "cfg".into(),
            BTreeMap::from([(
                "k".to_string(),
                ResolvedFile {
                    data: b"v".to_vec(),
                    mode: 0o600,
                },
            )]),
        );
        let network = PodNetworkSettings {
            bridge: "br0".into(),
            host_veth: "veth-pod".into(),
            prefix_len: 24,
            host_netns: None,
            gateway: None,
            nameservers: vec!["10.0.0.53".into()],
            searches: vec![],
        };
        let interface = PodInterface {
            host_netns: None,
            bridge: network.bridge.clone(),
            host_veth: network.host_veth.clone(),
            address: "10.1.0.7".parse().unwrap(),
            prefix_len: 24,
            gateway: None,
        };
        let request = apply_request(&resolved, Some(interface), Some(&network));
        assert_eq!(request.env["app"][0].value, "1");
        assert_eq!(request.volumes["cfg"].files[0].content, b"v");
        assert_eq!(request.volumes["cfg"].files[0].mode, Some(0o600));
        let interface = request.network.interface.unwrap();
        assert_eq!(interface.address.to_string(), "10.1.0.7");
        assert_eq!(request.network.dns.nameservers, vec!["10.0.0.53"]);
    }

    #[test]
    fn a_lost_cell_terminates_running_containers() {
        let last = PodStatus {
            phase: Some("Running".into()),
            container_statuses: Some(vec![ContainerStatus {
                name: "app".into(),
                ready: true,
                state: Some(ContainerState {
                    running: Some(ContainerStateRunning::default()),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        };
        let status = lost_status(Some(&last), true, REASON_CELL_LOST, "gone".into());
        assert_eq!(status.phase.as_deref(), Some("Failed"));
        assert_eq!(status.reason.as_deref(), Some(REASON_CELL_LOST));
        let container = &status.container_statuses.unwrap()[0];
        assert!(!container.ready);
        let terminated = container
            .state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap();
        assert_eq!(terminated.reason.as_deref(), Some(REASON_CELL_LOST));
    }
}
