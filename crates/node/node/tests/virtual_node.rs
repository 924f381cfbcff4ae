//! The virtual node against the real control plane: registration, heartbeat, scheduling by
//! the real kube-scheduler, pod lifecycle, restarts — all under the node identity (Node
//! authorizer and NodeRestriction active).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use support::*;
use updraft_testing::{TestCluster, eventually, wait_for, wait_for_deletion};

#[tokio::test]
async fn the_node_registers_ready_with_its_labels_taint_and_a_renewing_lease() {
    let cluster = TestCluster::connect().await;
    let name = node_name();
    let _vnode = start_node(&cluster, config(&name.0), mock()).await;
    let node = wait_ready(&cluster, &name.0).await;

    let labels = node.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("type").map(String::as_str),
        Some("virtual-kubelet")
    );
    assert_eq!(labels.get("kubernetes.io/hostname"), Some(&name.0));
    assert_eq!(
        labels
            .get("node.kubernetes.io/exclude-from-external-load-balancers")
            .map(String::as_str),
        Some("true")
    );
    // Under the node identity NodeRestriction forbids kubernetes.io/role; it is left out.
    assert!(!labels.contains_key("kubernetes.io/role"));
    let taints = node
        .spec
        .clone()
        .unwrap_or_default()
        .taints
        .unwrap_or_default();
    assert!(
        taints.iter().any(|t| t.key == "virtual-kubelet.io/provider"
            && t.value.as_deref() == Some("mock")
            && t.effect == "NoSchedule"),
        "{taints:?}"
    );
    let status = node.status.clone().unwrap();
    assert_eq!(
        status.capacity.unwrap().get("pods").map(|q| q.0.as_str()),
        Some("110")
    );
    assert_eq!(
        status
            .daemon_endpoints
            .unwrap()
            .kubelet_endpoint
            .unwrap()
            .port,
        10250
    );

    let leases = Api::<Lease>::namespaced(cluster.client(), "kube-node-lease");
    let first = wait_for(&leases, &name.0, "the node lease", TIMEOUT, |_| true).await;
    let spec = first.spec.clone().unwrap();
    assert_eq!(spec.lease_duration_seconds, Some(40));
    assert_eq!(
        first.metadata.owner_references.unwrap()[0].uid,
        node.metadata.uid.clone().unwrap()
    );
    let first_renewal = spec.renew_time.unwrap();
    wait_for(
        &leases,
        &name.0,
        "the lease to be renewed",
        Duration::from_secs(30),
        |l| {
            l.spec
                .as_ref()
                .and_then(|s| s.renew_time.as_ref())
                .is_some_and(|t| t.0 > first_renewal.0)
        },
    )
    .await;
}

#[tokio::test]
async fn the_scheduler_places_tolerating_pods_which_run_and_are_deleted_gracefully() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("vnode-pods").await;
    let name = node_name();
    let vnode = start_node(&cluster, config(&name.0), mock()).await;
    wait_ready(&cluster, &name.0).await;

    let pods = Api::<Pod>::namespaced(cluster.client(), ns.name());
    let no_extra = serde_json::json!({});
    pods.create(
        &PostParams::default(),
        &pod(&name.0, "runs", no_extra.clone(), no_extra.clone()),
    )
    .await
    .unwrap();
    let mut untolerated = pod(&name.0, "untolerated", no_extra.clone(), no_extra.clone());
    untolerated.spec.as_mut().unwrap().tolerations = None;
    pods.create(&PostParams::default(), &untolerated)
        .await
        .unwrap();

    let running = wait_for(
        &pods,
        "runs",
        "the pod to be Running and Ready",
        TIMEOUT,
        running_and_ready,
    )
    .await;
    let status = running.status.unwrap();
    assert!(status.pod_ip.is_some_and(|ip| !ip.is_empty()));
    assert_eq!(status.host_ip.as_deref(), Some("127.0.0.1"));
    assert!(
        status
            .conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "PodScheduled" && c.status == "True"),
        "PodScheduled kept"
    );
    assert_eq!(vnode.provider.pod_count(), 1);

    let refused = wait_for(
        &pods,
        "untolerated",
        "the scheduler to refuse the pod",
        TIMEOUT,
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.type_ == "PodScheduled"
                            && c.status == "False"
                            && c.reason.as_deref() == Some("Unschedulable")
                    })
                })
        },
    )
    .await;
    assert!(refused.spec.unwrap().node_name.is_none());

    pods.delete("runs", &DeleteParams::default()).await.unwrap();
    wait_for_deletion(&pods, "runs", TIMEOUT).await;
    assert_eq!(
        vnode.provider.pod_count(),
        0,
        "the provider pod is gone too"
    );
}

#[tokio::test]
async fn a_restarted_node_neither_loses_nor_duplicates_pods_and_deletes_orphans() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("vnode-restart").await;
    let name = node_name();
    let provider = mock();
    let vnode = start_node(&cluster, config(&name.0), provider.clone()).await;
    wait_ready(&cluster, &name.0).await;
    let pods = Api::<Pod>::namespaced(cluster.client(), ns.name());
    let none = serde_json::json!({});
    for pod_name in ["a", "b", "c"] {
        pods.create(
            &PostParams::default(),
            &pod(&name.0, pod_name, none.clone(), none.clone()),
        )
        .await
        .unwrap();
    }
    for pod_name in ["a", "b", "c"] {
        wait_for(
            &pods,
            pod_name,
            "the pod to run",
            TIMEOUT,
            running_and_ready,
        )
        .await;
    }
    let uid_b = provider
        .resolved(ns.name(), "b")
        .unwrap()
        .pod
        .metadata
        .uid
        .clone();

    // Updraft goes away; meanwhile pod "c" is force-deleted, so nothing tells the provider.
    vnode.stop().await;
    pods.delete(
        "c",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await
    .unwrap();
    wait_for_deletion(&pods, "c", TIMEOUT).await;
    assert_eq!(
        provider.pod_count(),
        3,
        "pods keep running in the provider while Updraft is down"
    );

    let _vnode = start_node(&cluster, config(&name.0), provider.clone()).await;
    eventually(TIMEOUT, || async {
        match provider.pod_count() {
            2 => Ok(()),
            n => Err(format!("the provider runs {n} pods, expected a and b only")),
        }
    })
    .await;
    assert_eq!(
        provider.resolved(ns.name(), "b").unwrap().pod.metadata.uid,
        uid_b,
        "b was not re-created"
    );
    for pod_name in ["a", "b"] {
        let pod = pods.get(pod_name).await.unwrap();
        assert!(running_and_ready(&pod), "{pod_name} still runs");
    }
}

#[tokio::test]
async fn a_deleted_node_is_registered_again() {
    let cluster = TestCluster::connect().await;
    let name = node_name();
    let _vnode = start_node(&cluster, config(&name.0), mock()).await;
    let first = wait_ready(&cluster, &name.0).await;
    let nodes = Api::<Node>::all(cluster.client());
    nodes
        .delete(&name.0, &DeleteParams::default())
        .await
        .unwrap();
    let again = wait_for(&nodes, &name.0, "the node to come back", TIMEOUT, |n| {
        n.metadata.uid != first.metadata.uid
            && node_condition(n, "Ready").as_deref() == Some("True")
    })
    .await;
    assert!(
        again
            .spec
            .unwrap()
            .taints
            .unwrap()
            .iter()
            .any(|t| t.key == "virtual-kubelet.io/provider")
    );
}

#[tokio::test]
async fn a_job_completes_and_a_deployment_scales() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("vnode-workloads").await;
    let name = node_name();
    let vnode = start_node(&cluster, config(&name.0), mock()).await;
    wait_ready(&cluster, &name.0).await;

    let mut template = pod_template(
        &name.0,
        serde_json::json!({"mock.updraft.dev/exit-after-ms": "500", "mock.updraft.dev/exit-code": "0"}),
        serde_json::json!({"restartPolicy": "Never"}),
    );
    template["metadata"]["labels"] = serde_json::json!({"app": "job"});
    let job: Job = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "once"},
        "spec": {"backoffLimit": 0, "template": template}
    }))
    .unwrap();
    let jobs = Api::<Job>::namespaced(cluster.client(), ns.name());
    jobs.create(&PostParams::default(), &job).await.unwrap();

    let mut template = pod_template(&name.0, serde_json::json!({}), serde_json::json!({}));
    template["metadata"]["labels"] = serde_json::json!({"app": "web"});
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 20, "selector": {"matchLabels": {"app": "web"}}, "template": template}
    }))
    .unwrap();
    let deployments = Api::<Deployment>::namespaced(cluster.client(), ns.name());
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();

    wait_for(&jobs, "once", "the Job to succeed", TIMEOUT, |j| {
        j.status.as_ref().and_then(|s| s.succeeded) == Some(1)
    })
    .await;
    wait_for(&deployments, "web", "20 ready replicas", TIMEOUT, |d| {
        d.status.as_ref().and_then(|s| s.ready_replicas) == Some(20)
    })
    .await;

    let scale = serde_json::json!({"spec": {"replicas": 5}});
    deployments
        .patch_scale("web", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .unwrap();
    wait_for(&deployments, "web", "scaling down to 5", TIMEOUT, |d| {
        let status = d.status.as_ref();
        status.and_then(|s| s.replicas) == Some(5)
            && status.and_then(|s| s.ready_replicas) == Some(5)
    })
    .await;
    eventually(TIMEOUT, || async {
        // 5 web pods; the finished Job pod stays until the Job is deleted.
        match vnode.provider.pod_count() {
            6 => Ok(()),
            n => Err(format!(
                "the provider runs {n} pods, expected 5 web + 1 completed job pod"
            )),
        }
    })
    .await;
}

#[tokio::test]
async fn a_pod_the_provider_refuses_fails_with_provider_failed_and_an_event() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("vnode-fail").await;
    let name = node_name();
    let _vnode = start_node(&cluster, config(&name.0), mock()).await;
    wait_ready(&cluster, &name.0).await;
    let pods = Api::<Pod>::namespaced(cluster.client(), ns.name());
    let refused = pod(
        &name.0,
        "refused",
        serde_json::json!({"mock.updraft.dev/fail-create": "permanent"}),
        serde_json::json!({"restartPolicy": "Never"}),
    );
    pods.create(&PostParams::default(), &refused).await.unwrap();
    let failed = wait_for(&pods, "refused", "the pod to fail", TIMEOUT, |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
    })
    .await;
    let status = failed.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("ProviderFailed"));
    assert!(status.message.unwrap_or_default().contains("told to fail"));
    let ns_name = ns.name().to_owned();
    eventually(TIMEOUT, || {
        let cluster = &cluster;
        let ns_name = ns_name.clone();
        async move {
            let reasons = event_reasons(cluster, &ns_name, "refused").await;
            if reasons.iter().any(|r| r == "ProviderCreateFailed") {
                Ok(())
            } else {
                Err(format!("events: {reasons:?}"))
            }
        }
    })
    .await;

    // Transient failures are retried with backoff until the provider accepts the pod.
    let flaky = pod(
        &name.0,
        "flaky",
        serde_json::json!({"mock.updraft.dev/fail-create": "transient:2"}),
        serde_json::json!({}),
    );
    pods.create(&PostParams::default(), &flaky).await.unwrap();
    wait_for(
        &pods,
        "flaky",
        "the flaky pod to run after retries",
        TIMEOUT,
        running_and_ready,
    )
    .await;
}

#[tokio::test]
async fn an_unhealthy_provider_makes_the_node_not_ready_without_touching_others_conditions() {
    let cluster = TestCluster::connect().await;
    let name = node_name();
    let mut node_config = config(&name.0);
    // Health is checked at heartbeat pace; a quick heartbeat keeps the test short.
    node_config.lease_renew_interval = Duration::from_secs(1);
    let provider = mock();
    let _vnode = start_node(&cluster, node_config, provider.clone()).await;
    wait_ready(&cluster, &name.0).await;

    // Another component (an admin here) reports a condition of its own on the node.
    let nodes = Api::<Node>::all(cluster.client());
    let theirs = serde_json::json!({"status": {"conditions": [{
        "type": "ExampleVendorCheck", "status": "True",
        "reason": "CheckedByVendor", "message": "set by someone else"
    }]}});
    nodes
        .patch_status(&name.0, &PatchParams::default(), &Patch::Strategic(&theirs))
        .await
        .unwrap();

    provider.set_unhealthy(Some("the cloud API is unreachable".into()));
    let not_ready = wait_for(&nodes, &name.0, "Ready=False", TIMEOUT, |n| {
        node_condition(n, "Ready").as_deref() == Some("False")
    })
    .await;
    let conditions = not_ready.status.unwrap().conditions.unwrap();
    let ready = conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.reason.as_deref(), Some("ProviderUnhealthy"));
    assert!(
        ready
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("the cloud API is unreachable"),
        "{ready:?}"
    );
    assert!(
        conditions.iter().any(|c| c.type_ == "ExampleVendorCheck"),
        "another component's condition was overwritten: {conditions:?}"
    );

    provider.set_unhealthy(None);
    let ready_again = wait_ready(&cluster, &name.0).await;
    assert!(
        ready_again
            .status
            .unwrap()
            .conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "ExampleVendorCheck")
    );
}
