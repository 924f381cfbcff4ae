//! The pod status the node writes, from the agent's status and the cell's state: running on a
//! cell, waiting for one, or its cell lost; the cell condition says which cell and its price.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, PodCondition, PodStatus,
};

use crate::cell_summary::CellSummary;

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

/// Whether `status` is final (`Succeeded` or `Failed`).
pub(crate) fn is_finished(status: &PodStatus) -> bool {
    matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerStateRunning, ContainerStatus};

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
