//! The cells provider with the AWS backend, through the official SDK pointed at a real
//! `moto_server` on loopback, driven by the real control plane: a pod bound to the node starts
//! exactly one EC2 instance of the selected type, with the pod's tags, the bootstrap plus the
//! operator's cloud-init as user data, the managed and the extra security groups, spot as
//! annotated and a secondary private IP; the pod says it waits for the agent and, when the boot
//! timeout passes, why it failed; a restarted provider adopts the instance; an instance of a pod
//! that does not exist is collected while foreign instances are left alone; deleting the pod
//! terminates its instance.
//!
//! No agent can run inside moto, so the pod never becomes Running here. The VPC is
//! 127.42.0.0/16 so that the agent's address is on loopback: the provider's probes reach
//! nothing but this host (where nothing listens on the agent port).
//!
//! More tests: an operator's cloud-init too large for EC2's user data limit fails the pod with
//! the sizes named, and a subnet that does not exist stops the provider's start with the
//! setting named; neither starts anything; a spot
//! pod without spot capacity (a proxy in front of moto refuses it as EC2 does) gets an
//! on-demand instance when `spotFallbackToOnDemand` is set, and the pod says so.
//!
//! Needs the control plane (`cargo xtask cluster up`) and python3-venv (moto is installed
//! from PyPI into the Updraft cache on first use).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use updraft_cells_aws::moto::{self, Ec2Proxy, MotoServer, no_spot_capacity};
use updraft_cells_aws::{AwsBackend, AwsConfig, BootImage};
use updraft_cells_backend::cloud_init::{EC2_USER_DATA_LIMIT, UserData};
use updraft_cells_backend::{Cell, CellBackend, CellIdentity, CellSpec, LaunchType};
use updraft_provider::Provider as _;
use updraft_provider_cells::CellsConfig;
use updraft_testing::{TestCluster, eventually, unique_name, wait_for, wait_for_deletion};

use common::{CELL_CONDITION, TIMEOUT, run_node};

/// The message of the pod's cell condition, whatever its status.
fn cell_condition(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == CELL_CONDITION)?
        .message
        .clone()
}

const REGION: &str = "us-east-1";
/// An Amazon Linux image in moto's built-in catalog.
const AMI: &str = "ami-760aaa0f";

/// moto with a VPC on loopback addresses, a subnet, and an extra security group.
struct Ec2 {
    moto: MotoServer,
    /// A backend of no controller: its SDK client and its listings by controller id.
    backend: AwsBackend,
    subnet_id: String,
    extra_group_id: String,
}

async fn ec2() -> Ec2 {
    let moto = MotoServer::start().expect("moto_server");
    let client = moto::client(REGION, &moto.endpoint()).await;
    let vpc = client
        .create_vpc()
        .cidr_block("127.42.0.0/16")
        .send()
        .await
        .expect("create vpc");
    let vpc_id = vpc.vpc().and_then(|v| v.vpc_id()).unwrap().to_string();
    let subnet = client
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block("127.42.1.0/24")
        .send()
        .await
        .expect("create subnet");
    let subnet_id = subnet
        .subnet()
        .and_then(|s| s.subnet_id())
        .unwrap()
        .to_string();
    let group = client
        .create_security_group()
        .group_name("cells-extra")
        .description("an operator's extra group")
        .vpc_id(&vpc_id)
        .send()
        .await
        .expect("create group");
    let setup = AwsConfig::new(REGION, "setup", BootImage::Id(AMI.into()), &subnet_id);
    let backend = moto::backend(moto.endpoint(), setup)
        .await
        .expect("a valid config");
    Ec2 {
        moto,
        backend,
        subnet_id,
        extra_group_id: group.group_id().unwrap().to_string(),
    }
}

/// The operator's cloud-init of the main test.
const OPERATOR_CLOUD_INIT: &str = "#cloud-config\nwrite_files:\n- path: /etc/operator-note\n  content: written-by-the-operators-cloud-init\nruncmd:\n- [echo, operator-runcmd]\n";

/// The provider config: aws backend at moto, keys from files, the operator's cloud-init.
fn write_config(dir: &std::path::Path, ec2: &Ec2, controller_id: &str) -> CellsConfig {
    write_config_with(dir, ec2, controller_id, Variant::default())
}

/// What a test changes in [`write_config`]'s config.
#[derive(Default)]
struct Variant<'a> {
    /// Instead of the VPC's subnet.
    subnet_id: Option<&'a str>,
    /// Instead of [`OPERATOR_CLOUD_INIT`].
    cloud_init: Option<&'a str>,
    /// Instead of moto's endpoint (a proxy in front of it).
    endpoint: Option<String>,
    /// `aws.spotFallbackToOnDemand`.
    spot_fallback: bool,
}

/// [`write_config`] with `variant`'s changes.
fn write_config_with(
    dir: &std::path::Path,
    ec2: &Ec2,
    controller_id: &str,
    variant: Variant<'_>,
) -> CellsConfig {
    let cloud_init = variant.cloud_init.unwrap_or(OPERATOR_CLOUD_INIT);
    std::fs::write(dir.join("key-id"), "testing\n").unwrap();
    std::fs::write(dir.join("secret"), "testing\n").unwrap();
    std::fs::write(dir.join("cloud-init.yaml"), cloud_init).unwrap();
    let text = format!(
        r#"backend: aws
region: {REGION}
controllerId: {controller_id}
certificateDir: {dir}/pki
cloudInitFile: {dir}/cloud-init.yaml
bootTimeout: 45s
gcInterval: 2s
gcGracePeriod: 1s
extraSecurityGroups: [cells-extra]
aws:
  endpointUrl: {endpoint}
  subnetId: {subnet}
  bootImage: {{id: {AMI}}}
  accessKeyIdFile: {dir}/key-id
  secretAccessKeyFile: {dir}/secret
  spotFallbackToOnDemand: {spot_fallback}
capacity: {{cpu: "64", memory: 256Gi, pods: "20"}}
"#,
        dir = dir.display(),
        endpoint = variant.endpoint.unwrap_or_else(|| ec2.moto.endpoint()),
        subnet = variant.subnet_id.unwrap_or(&ec2.subnet_id),
        spot_fallback = variant.spot_fallback,
    );
    let path = dir.join("cells.yaml");
    std::fs::write(&path, text).unwrap();
    CellsConfig::load(&path).unwrap()
}

/// The instances of `controller_id` that are not terminated or shutting down.
async fn live_instances(ec2: &Ec2, controller_id: &str) -> Vec<Cell> {
    ec2.backend
        .list(controller_id)
        .await
        .expect("list instances")
        .into_iter()
        .filter(|cell| !cell.state.is_ending())
        .collect()
}

/// Fails the test when the pod `uid` has more than one instance that is not ending: nothing is
/// ever started twice for one pod.
async fn assert_at_most_one_live_instance(ec2: &Ec2, uid: &str) {
    let live: Vec<String> = moto::instances_of_pod(ec2.backend.client(), uid)
        .await
        .expect("describe instances")
        .iter()
        .filter(|i| {
            !matches!(
                i.state().and_then(|s| s.name()),
                Some(
                    updraft_cells_aws::aws_sdk_ec2::types::InstanceStateName::ShuttingDown
                        | updraft_cells_aws::aws_sdk_ec2::types::InstanceStateName::Terminated
                )
            )
        })
        .filter_map(|i| i.instance_id().map(str::to_owned))
        .collect();
    assert!(
        live.len() <= 1,
        "pod {uid} has several live instances: {live:?}"
    );
}

/// Standard base64 (the user data attribute), decoded.
fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for byte in text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
    {
        let value = ALPHABET.iter().position(|c| *c == byte).expect("base64") as u32;
        buffer = (buffer << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    out
}

async fn user_data(ec2: &Ec2, id: &str) -> String {
    let attribute = ec2
        .backend
        .client()
        .describe_instance_attribute()
        .instance_id(id)
        .attribute("userData".into())
        .send()
        .await
        .expect("user data attribute");
    let encoded = attribute.user_data().and_then(|v| v.value()).unwrap();
    String::from_utf8(base64_decode(encoded)).expect("plain (not gzipped) user data")
}

/// A pod for `node_name` with the node's toleration and one busybox container requesting
/// `requests` (CPU, memory) when given; `metadata` is its name, labels and annotations.
fn pod_for(node_name: &str, metadata: serde_json::Value, requests: Option<(&str, &str)>) -> Pod {
    let resources = requests.map_or_else(
        || serde_json::json!({}),
        |(cpu, memory)| serde_json::json!({"requests": {"cpu": cpu, "memory": memory}}),
    );
    serde_json::from_value(serde_json::json!({
        "metadata": metadata,
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node_name},
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": "busybox", "resources": resources}]
        }
    }))
    .unwrap()
}

/// The cost engine's decision for `pod` under `config`: what the provider must start.
fn decision_for(config: &CellsConfig, pod: &Pod) -> updraft_cells_catalog::Decision {
    let selector = updraft_provider_cells::selector(config).unwrap();
    let no_annotations = BTreeMap::new();
    let (decision, _) = updraft_cells_catalog::decide(
        &selector,
        pod.spec.as_ref().unwrap(),
        pod.metadata.annotations.as_ref().unwrap_or(&no_annotations),
        LaunchType::OnDemand,
    )
    .unwrap();
    decision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_gets_one_ec2_instance_that_is_adopted_after_a_restart_and_terminated_on_delete() {
    common::init_logging();
    let cluster = TestCluster::connect().await;
    let namespace = cluster.namespace("cells-aws").await;
    let node_name = unique_name("cells-aws");
    let ec2 = ec2().await;
    let tmp = tempfile::tempdir().unwrap();
    let controller_id = format!("moto-{}", std::process::id());
    let config = write_config(tmp.path(), &ec2, &controller_id);
    let node = run_node(&cluster, &node_name, &config, |_| {}).await;

    // 3 CPUs / 6 GiB, spot: the cost engine's choice is what must be started.
    let pods = Api::<Pod>::namespaced(cluster.client(), namespace.name());
    let pod = pod_for(
        &node_name,
        serde_json::json!({
            "name": "burst",
            "labels": {"app": "burst", "tier": "batch"},
            "annotations": {"pod.elotl.co/launch-type": "spot"}
        }),
        Some(("3", "6Gi")),
    );
    let decision = decision_for(&config, &pod);
    let expected_type = decision.chosen.instance_type.name.clone();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    let uid = created.metadata.uid.clone().unwrap();

    // The pod says which cell it waits for.
    let waiting = wait_for(
        &pods,
        "burst",
        "the cell condition CellStarting",
        TIMEOUT,
        |p| cell_condition(p).is_some_and(|m| m.starts_with("starting cell i-")),
    )
    .await;
    let message = cell_condition(&waiting).unwrap();
    assert!(
        message.contains(&expected_type) && message.contains("spot"),
        "{message}"
    );
    let condition = waiting
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == CELL_CONDITION))
        .unwrap();
    assert_eq!(condition.status, "False");
    assert_eq!(condition.reason.as_deref(), Some("CellStarting"));
    assert_eq!(
        waiting.status.as_ref().unwrap().phase.as_deref(),
        Some("Pending")
    );

    // Exactly one instance: the selected type, spot, the pod's tags, both groups, two IPs.
    let instances = live_instances(&ec2, &controller_id).await;
    assert_eq!(instances.len(), 1, "{instances:?}");
    let cell = &instances[0];
    let instance_id = cell.id.0.clone();
    assert!(message.contains(&instance_id), "{message}");
    assert_eq!(cell.instance_type, expected_type);
    assert_eq!(cell.launch_type, LaunchType::Spot);
    let tags = &cell.tags;
    assert_eq!(tags["updraft:controller-id"], controller_id);
    assert_eq!(tags["updraft:node"], node_name);
    assert_eq!(tags["updraft:namespace"], namespace.name());
    assert_eq!(tags["updraft:pod"], "burst");
    assert_eq!(tags["updraft:pod-uid"], uid);
    assert_eq!(tags["updraft:label:app"], "burst");
    assert_eq!(tags["updraft:label:tier"], "batch");
    assert_eq!(tags["Name"], format!("updraft-{}-burst", namespace.name()));
    let described = ec2
        .backend
        .client()
        .describe_instances()
        .instance_ids(&instance_id)
        .send()
        .await
        .expect("describe instances");
    let interface = &described.reservations()[0].instances()[0].network_interfaces()[0];
    let groups: Vec<&str> = interface
        .groups()
        .iter()
        .filter_map(|g| g.group_id())
        .collect();
    assert!(groups.contains(&ec2.extra_group_id.as_str()), "{groups:?}");
    assert_eq!(
        groups.len(),
        2,
        "the managed group and the extra one: {groups:?}"
    );
    let addresses = interface.private_ip_addresses();
    assert_eq!(
        addresses.len(),
        2,
        "the agent's and the pod's: {addresses:?}"
    );
    assert!(
        addresses.iter().all(|a| a
            .private_ip_address()
            .unwrap_or("")
            .starts_with("127.42.1.")),
        "{addresses:?}"
    );
    let data = user_data(&ec2, &instance_id).await;
    assert!(data.starts_with("#cloud-config"), "{data}");
    for expected in [
        "updraft-cell",
        "--client-ca",
        "/etc/updraft-cell/server.key",
        "/etc/updraft-cell/client-ca.crt",
        "/etc/operator-note",
        "written-by-the-operators-cloud-init",
        "operator-runcmd",
    ] {
        assert!(
            data.contains(expected),
            "user data lacks {expected}: {data}"
        );
    }

    // Updraft restarts: the new provider finds the instance in the listing and adopts it.
    let provider = node.provider.clone();
    node.stop().await;
    provider.shutdown();
    drop(provider);
    let restarted = updraft_provider_cells::CellsProvider::from_config(&config, &node_name)
        .await
        .unwrap();
    // No node claims it here: it is reported once its grace period (1 s) is over.
    let adopted = eventually(TIMEOUT, || async {
        assert_at_most_one_live_instance(&ec2, &uid).await;
        let listed = restarted.list_pods().await.map_err(|e| e.to_string())?;
        if listed.is_empty() {
            Err("the adopted cell's pod is not listed yet".to_owned())
        } else {
            Ok(listed)
        }
    })
    .await;
    assert_eq!(adopted.len(), 1, "{adopted:?}");
    assert_eq!(adopted[0].pod.uid, uid);
    restarted.shutdown();
    drop(restarted);

    // An instance of a pod the API does not have, and one of another controller, appear.
    let backend = updraft_provider_cells::connect_backend(&config)
        .await
        .unwrap();
    let ghost_spec = |controller: &str, uid: &str| {
        let user_data = UserData::build(
            &updraft_cells_backend::cloud_init::Bootstrap {
                files: Vec::new(),
                commands: Vec::new(),
            },
            None,
            EC2_USER_DATA_LIMIT,
        )
        .unwrap();
        CellSpec {
            name: format!("ghost-{uid}"),
            instance_type: "t3.small".into(),
            launch_type: LaunchType::OnDemand,
            image: None,
            user_data: user_data.bytes,
            identity: CellIdentity {
                controller_id: controller.into(),
                node: node_name.clone(),
                namespace: namespace.name().into(),
                pod_name: "ghost".into(),
                pod_uid: uid.into(),
                pod_labels: BTreeMap::new(),
            },
            security_groups: Vec::new(),
            private_ip_only: true,
            root_volume_bytes: None,
            instance_profile: None,
            idempotency_token: format!("ghost-{uid}"),
        }
    };
    let orphan = backend
        .start(&ghost_spec(&controller_id, "no-such-pod-uid"))
        .await
        .unwrap();
    let foreign_controller = format!("{controller_id}-other");
    let foreign = backend
        .start(&ghost_spec(&foreign_controller, "foreign-uid"))
        .await
        .unwrap();

    // The node comes back: it sweeps the orphan once its grace period is over; the pod's
    // instance is the same one.
    let node = run_node(&cluster, &node_name, &config, |node| {
        node.orphan_sweep_interval = std::time::Duration::from_secs(2);
    })
    .await;
    eventually(TIMEOUT, || async {
        assert_at_most_one_live_instance(&ec2, &uid).await;
        let live = live_instances(&ec2, &controller_id).await;
        let ids: Vec<&str> = live.iter().map(|c| c.id.0.as_str()).collect();
        if ids.contains(&orphan.id.0.as_str()) {
            Err(format!("the orphan {} still runs: {ids:?}", orphan.id))
        } else {
            Ok(())
        }
    })
    .await;
    let foreign_live = live_instances(&ec2, &foreign_controller).await;
    assert_eq!(
        foreign_live.len(),
        1,
        "another controller's instance is never touched"
    );
    assert_eq!(foreign_live[0].id, foreign.id);

    // The agent never answers inside moto: after the boot timeout the pod's status says so
    // (and a new instance is started for it).
    let boot_timeout = eventually(TIMEOUT, || async {
        assert_at_most_one_live_instance(&ec2, &uid).await;
        let pod = pods.get("burst").await.map_err(|e| e.to_string())?;
        let message = pod.status.and_then(|s| s.message).unwrap_or_default();
        if message.contains("did not answer within the boot timeout") {
            Ok(message)
        } else {
            Err(format!(
                "no boot timeout in the pod's status yet: {message:?}"
            ))
        }
    })
    .await;
    assert!(boot_timeout.contains("cell i-"), "{boot_timeout}");
    // Every instance the pod ever had came from a start attempt of its own.
    let instances = moto::instances_of_pod(ec2.backend.client(), &uid)
        .await
        .expect("describe instances");
    let mut tokens: Vec<String> = instances
        .iter()
        .map(|i| {
            i.tags()
                .iter()
                .find(|t| t.key() == Some("updraft:start-token"))
                .and_then(|t| t.value())
                .expect("start token tag")
                .to_owned()
        })
        .collect();
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), instances.len(), "{tokens:?}");
    assert!(
        instances
            .iter()
            .any(|i| i.instance_id() == Some(instance_id.as_str())),
        "the first instance is the pod's"
    );

    // Deleting the pod terminates its instance; nothing of this controller is left.
    pods.delete("burst", &DeleteParams::default())
        .await
        .unwrap();
    wait_for_deletion(&pods, "burst", TIMEOUT).await;
    eventually(TIMEOUT, || async {
        let live = live_instances(&ec2, &controller_id).await;
        if live.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} instances left: {:?}",
                live.len(),
                live.iter().map(|c| &c.id).collect::<Vec<_>>()
            ))
        }
    })
    .await;
    node.stop_and_delete().await;
}

/// A pod whose user data cannot be built or whose cell EC2 cannot start.
async fn refused_pod(pods: &Api<Pod>, node_name: &str, name: &str) -> String {
    let pod = pod_for(node_name, serde_json::json!({ "name": name }), None);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let failed = wait_for(pods, name, "the reason ProviderFailed", TIMEOUT, |p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.reason.as_deref() == Some("ProviderFailed"))
    })
    .await;
    failed.status.and_then(|s| s.message).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_cloud_init_fails_the_pod_and_an_unknown_subnet_stops_the_start_with_a_clear_reason()
 {
    common::init_logging();
    let cluster = TestCluster::connect().await;
    let namespace = cluster.namespace("cells-aws-bad").await;
    let pods = Api::<Pod>::namespaced(cluster.client(), namespace.name());
    let ec2 = ec2().await;

    // The operator's cloud-init embeds 24 KiB of noise: even gzip-compressed, the user data
    // exceeds EC2's 16 KiB.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let noise: String = (0..32 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
                    [(state % 64) as usize],
            )
        })
        .collect();
    let oversized = format!("#cloud-config\nwrite_files:\n- path: /opt/blob\n  content: {noise}\n");
    let tmp = tempfile::tempdir().unwrap();
    let controller_id = format!("moto-big-{}", std::process::id());
    let config = write_config_with(
        tmp.path(),
        &ec2,
        &controller_id,
        Variant {
            cloud_init: Some(&oversized),
            ..Variant::default()
        },
    );
    let node_name = unique_name("cells-aws-big");
    let node = run_node(&cluster, &node_name, &config, |_| {}).await;
    let message = refused_pod(&pods, &node_name, "big").await;
    assert!(
        message.contains("over the 16384-byte limit") && message.contains("/opt/blob"),
        "{message}"
    );
    assert!(live_instances(&ec2, &controller_id).await.is_empty());
    node.stop_and_delete().await;

    // A subnet that does not exist: Updraft does not start, and says which setting to fix.
    let tmp = tempfile::tempdir().unwrap();
    let controller_id = format!("moto-subnet-{}", std::process::id());
    let config = write_config_with(
        tmp.path(),
        &ec2,
        &controller_id,
        Variant {
            subnet_id: Some("subnet-0000dead"),
            ..Variant::default()
        },
    );
    let error = updraft_provider_cells::CellsProvider::from_config(&config, "cells-aws-subnet")
        .await
        .err()
        .expect("a provider for a subnet EC2 does not have");
    let message = error.to_string();
    assert!(
        message.contains("aws.subnetId") && message.contains("subnet-0000dead"),
        "{message}"
    );
    assert!(live_instances(&ec2, &controller_id).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spot_pod_without_spot_capacity_gets_an_on_demand_instance_when_configured() {
    common::init_logging();
    let cluster = TestCluster::connect().await;
    let namespace = cluster.namespace("cells-aws-spot").await;
    let pods = Api::<Pod>::namespaced(cluster.client(), namespace.name());
    let ec2 = ec2().await;
    // EC2 without spot capacity: the proxy refuses every spot launch as EC2 does.
    let proxy = Ec2Proxy::start(&ec2.moto.endpoint(), no_spot_capacity).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let controller_id = format!("moto-spot-{}", std::process::id());
    let config = write_config_with(
        tmp.path(),
        &ec2,
        &controller_id,
        Variant {
            endpoint: Some(proxy.endpoint()),
            spot_fallback: true,
            ..Variant::default()
        },
    );
    let node_name = unique_name("cells-aws-spot");
    let node = run_node(&cluster, &node_name, &config, |_| {}).await;

    let pod = pod_for(
        &node_name,
        serde_json::json!({"name": "batch", "annotations": {"pod.elotl.co/launch-type": "spot"}}),
        Some(("1", "1Gi")),
    );
    let decision = decision_for(&config, &pod);
    assert_eq!(decision.launch_type, LaunchType::Spot);
    let chosen = decision.chosen.instance_type.clone();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    let uid = created.metadata.uid.clone().unwrap();

    // The pod says it got an on-demand cell of the chosen type, at the on-demand price.
    let waiting = wait_for(
        &pods,
        "batch",
        "the cell condition CellStarting",
        TIMEOUT,
        |p| cell_condition(p).is_some_and(|m| m.starts_with("starting cell i-")),
    )
    .await;
    let message = cell_condition(&waiting).unwrap();
    let expected = format!(
        "{} on-demand, {:.4} ",
        chosen.name, chosen.on_demand_per_hour
    );
    assert!(message.contains(&expected), "{message} lacks {expected}");
    let instances = live_instances(&ec2, &controller_id).await;
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert_eq!(instances[0].launch_type, LaunchType::OnDemand);
    assert_eq!(instances[0].identity.as_ref().unwrap().pod_uid, uid);
    // Spot was asked for first.
    let launches = proxy.requests("RunInstances");
    assert!(
        launches
            .first()
            .is_some_and(|body| body.contains("InstanceMarketOptions.MarketType=spot")),
        "{launches:?}"
    );

    pods.delete("batch", &DeleteParams::default())
        .await
        .unwrap();
    wait_for_deletion(&pods, "batch", TIMEOUT).await;
    eventually(TIMEOUT, || async {
        let live = live_instances(&ec2, &controller_id).await;
        if live.is_empty() {
            Ok(())
        } else {
            Err(format!("{} instances left", live.len()))
        }
    })
    .await;
    node.stop_and_delete().await;
}
