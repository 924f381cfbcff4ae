//! The EC2 backend against a real `moto_server` on loopback (one server per test, dummy
//! credentials): start, tags (within EC2's limits, on the instance and its volume), describe,
//! terminate, spot and its on-demand fallback, the managed and extra security groups, the pod's
//! secondary private IP, user data and its size limit, listing for garbage collection, restart
//! recovery (a repeated start launches nothing, also where the endpoint ignores client tokens,
//! and costs no lookup where it does not), standby cells taken by one pod, and errors that name
//! the bad setting (a configuration that cannot work gets no backend).
//!
//! Where moto grants what EC2 may refuse (spot capacity, addresses, a reused client token), the
//! loopback [`Ec2Proxy`] in front of it answers with EC2's error instead; its record of the
//! requests shows what a start costs where client tokens work (EC2) and where they do not (moto).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

use std::collections::BTreeMap;

use base64::Engine;
use updraft_cells_aws::moto::{
    self, Ec2Proxy, MotoServer, Refusal, instances_of_pod, no_spot_capacity, refuse_nothing,
};
use updraft_cells_aws::{
    AwsBackend, AwsConfig, BootImage, MAX_POD_LABELS, TAG_CONTROLLER_ID, TAG_POD_UID, TAG_STANDBY,
};
use updraft_cells_backend::cloud_init::{
    Bootstrap, BootstrapFile, CloudConfig, EC2_USER_DATA_LIMIT, UserData,
};
use updraft_cells_backend::{
    BackendError, CellBackend, CellId, CellIdentity, CellSpec, CellState, LaunchType,
};

const REGION: &str = "us-east-1";
/// An Amazon Linux image in moto's built-in catalog.
const AMI: &str = "ami-760aaa0f";

struct Ec2 {
    moto: MotoServer,
    subnet_id: String,
    vpc_id: String,
}

async fn backend(moto: &MotoServer, config: AwsConfig) -> AwsBackend {
    backend_at(moto.endpoint(), config).await
}

/// A backend of `config` that reaches moto through `proxy` (which refuses what EC2 may refuse).
async fn through_proxy(proxy: &Ec2Proxy, config: AwsConfig) -> AwsBackend {
    backend_at(proxy.endpoint(), config).await
}

async fn backend_at(endpoint: String, config: AwsConfig) -> AwsBackend {
    moto::backend(endpoint, config)
        .await
        .expect("a valid config")
}

/// A moto server with a VPC 10.0.0.0/16 and a subnet 10.0.1.0/24.
async fn ec2() -> Ec2 {
    let moto = MotoServer::start().expect("moto_server");
    let client = moto::client(REGION, &moto.endpoint()).await;
    let vpc = client
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .expect("create vpc");
    let vpc_id = vpc
        .vpc()
        .and_then(|v| v.vpc_id())
        .expect("vpc id")
        .to_string();
    let subnet = client
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block("10.0.1.0/24")
        .send()
        .await
        .expect("create subnet");
    let subnet_id = subnet
        .subnet()
        .and_then(|s| s.subnet_id())
        .expect("subnet id")
        .to_string();
    Ec2 {
        moto,
        subnet_id,
        vpc_id,
    }
}

fn config(ec2: &Ec2, controller_id: &str) -> AwsConfig {
    AwsConfig::new(
        REGION,
        controller_id,
        BootImage::Id(AMI.into()),
        ec2.subnet_id.clone(),
    )
}

fn spec(controller_id: &str, pod: &str, launch_type: LaunchType) -> CellSpec {
    let bootstrap = Bootstrap {
        files: vec![BootstrapFile {
            path: "/etc/updraft/agent.yaml".into(),
            contents: format!("pod: {pod}\n").into_bytes(),
            mode: 0o600,
        }],
        commands: vec![vec!["/usr/local/bin/updraft-agent".into()]],
    };
    let user_data = UserData::build(&bootstrap, None, EC2_USER_DATA_LIMIT).expect("user data");
    CellSpec {
        name: format!("burst-default-{pod}"),
        instance_type: "c5.large".into(),
        launch_type,
        image: None,
        user_data: user_data.bytes,
        identity: CellIdentity {
            controller_id: controller_id.into(),
            node: "burst".into(),
            namespace: "default".into(),
            pod_name: pod.into(),
            pod_uid: format!("uid-{pod}"),
            pod_labels: BTreeMap::from([
                ("app".to_string(), "web".to_string()),
                ("app.kubernetes.io/part-of".to_string(), "shop".to_string()),
            ]),
        },
        security_groups: Vec::new(),
        private_ip_only: true,
        root_volume_bytes: Some(20 << 30),
        instance_profile: None,
        idempotency_token: format!("uid-{pod}-1"),
    }
}

#[tokio::test]
async fn start_describe_and_terminate_a_cell() {
    let ec2 = ec2().await;
    let backend = backend(&ec2.moto, config(&ec2, "ctl")).await;
    let spec = spec("ctl", "web-1", LaunchType::OnDemand);
    let started = backend.start(&spec).await.expect("start");
    assert_eq!(started.launch_type, LaunchType::OnDemand);

    let cell = backend.describe(&started.id).await.expect("describe");
    assert_eq!(cell.id, started.id);
    assert!(
        matches!(cell.state, CellState::Pending | CellState::Running),
        "{:?}",
        cell.state
    );
    assert_eq!(cell.instance_type, "c5.large");
    assert_eq!(cell.launch_type, LaunchType::OnDemand);
    assert_eq!(cell.name, "burst-default-web-1");
    assert!(cell.launch_time.is_some());
    let management = cell.management_ip.expect("management ip").to_string();
    let pod = cell.pod_ip.expect("secondary ip for the pod").to_string();
    assert!(
        management.starts_with("10.0.1.") && pod.starts_with("10.0.1."),
        "{management} {pod}"
    );
    assert_ne!(management, pod);
    let identity = cell.identity.clone().expect("identity from tags");
    assert_eq!(identity, spec.identity);
    assert_eq!(cell.tags[TAG_POD_UID], "uid-web-1");

    // The user data arrives as built, and the managed group is attached.
    let attribute = backend
        .client()
        .describe_instance_attribute()
        .instance_id(&started.id.0)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .expect("user data attribute");
    let encoded = attribute
        .user_data()
        .and_then(|v| v.value())
        .expect("user data");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("base64");
    assert_eq!(decoded, spec.user_data);
    let managed = backend.managed_security_group().await.expect("group");
    let described = backend
        .client()
        .describe_instances()
        .instance_ids(&started.id.0)
        .send()
        .await
        .expect("describe instances");
    let instance = &described.reservations()[0].instances()[0];
    let groups: Vec<&str> = instance.network_interfaces()[0]
        .groups()
        .iter()
        .filter_map(|g| g.group_id())
        .collect();
    assert!(
        groups.contains(&managed.as_str()),
        "{groups:?} lacks {managed}"
    );

    backend.terminate(&started.id).await.expect("terminate");
    let after = backend
        .describe(&started.id)
        .await
        .expect("describe terminated");
    assert!(after.state.is_ending(), "{:?}", after.state);
    assert!(backend.list("ctl").await.expect("list").is_empty());
    // Terminating again is fine.
    backend
        .terminate(&started.id)
        .await
        .expect("terminate twice");
}

#[tokio::test]
async fn spot_cells_are_spot() {
    let ec2 = ec2().await;
    let backend = backend(&ec2.moto, config(&ec2, "ctl")).await;
    let started = backend
        .start(&spec("ctl", "batch-1", LaunchType::Spot))
        .await
        .expect("spot start");
    assert_eq!(started.launch_type, LaunchType::Spot);
    let cell = backend.describe(&started.id).await.expect("describe");
    assert_eq!(cell.launch_type, LaunchType::Spot);
    let listed = backend.list("ctl").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].launch_type, LaunchType::Spot);
}

#[tokio::test]
async fn security_group_is_created_once_and_reused() {
    let ec2 = ec2().await;
    let first = backend(
        &ec2.moto,
        AwsConfig {
            extra_cidrs: vec!["127.0.0.0/8".into()],
            ..config(&ec2, "ctl")
        },
    )
    .await;
    first.prepare().await.expect("prepare");
    let group = first.managed_security_group().await.expect("group");
    let second = backend(&ec2.moto, config(&ec2, "ctl")).await;
    assert_eq!(
        second.managed_security_group().await.expect("group again"),
        group
    );

    let groups = first
        .client()
        .describe_security_groups()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("group-name")
                .values("updraft-ctl-cells")
                .build(),
        )
        .send()
        .await
        .expect("describe groups");
    assert_eq!(
        groups.security_groups().len(),
        1,
        "exactly one managed group"
    );
    let managed = &groups.security_groups()[0];
    assert_eq!(managed.vpc_id(), Some(ec2.vpc_id.as_str()));
    let rule = managed
        .ip_permissions()
        .iter()
        .find(|p| p.from_port() == Some(6421))
        .expect("agent port rule");
    assert_eq!(rule.ip_protocol(), Some("tcp"));
    let mut cidrs: Vec<&str> = rule
        .ip_ranges()
        .iter()
        .filter_map(|r| r.cidr_ip())
        .collect();
    cidrs.sort();
    assert_eq!(
        cidrs,
        ["10.0.0.0/16", "127.0.0.0/8"],
        "the VPC and extraCidrs"
    );

    // Extra groups: the configured ones (here by id) and the pod's (here by name, resolved in
    // the VPC) are attached with the managed one.
    let ops = first
        .client()
        .create_security_group()
        .group_name("ops")
        .description("configured extra")
        .vpc_id(&ec2.vpc_id)
        .send()
        .await
        .expect("configured extra group");
    let ops_id = ops.group_id().expect("id").to_string();
    let second = backend(
        &ec2.moto,
        AwsConfig {
            extra_security_groups: vec![ops_id.clone()],
            ..config(&ec2, "ctl")
        },
    )
    .await;
    let extra = first
        .client()
        .create_security_group()
        .group_name("web")
        .description("extra")
        .vpc_id(&ec2.vpc_id)
        .send()
        .await
        .expect("extra group");
    let extra_id = extra.group_id().expect("id").to_string();
    let mut with_extra = spec("ctl", "web-2", LaunchType::OnDemand);
    with_extra.security_groups = vec!["web".into()];
    let started = second.start(&with_extra).await.expect("start");
    let described = second
        .client()
        .describe_instances()
        .instance_ids(&started.id.0)
        .send()
        .await
        .expect("describe");
    let attached: Vec<String> = described.reservations()[0].instances()[0].network_interfaces()[0]
        .groups()
        .iter()
        .filter_map(|g| g.group_id().map(str::to_string))
        .collect();
    assert_eq!(attached.len(), 3, "{attached:?}");
    assert!(
        attached.contains(&group) && attached.contains(&extra_id) && attached.contains(&ops_id),
        "{attached:?}"
    );

    let mut unknown = spec("ctl", "web-3", LaunchType::OnDemand);
    unknown.security_groups = vec!["no-such-group".into()];
    let error = second.start(&unknown).await.expect_err("unknown group");
    assert!(
        error.to_string().contains("\"no-such-group\" not found"),
        "{error}"
    );
    assert!(
        !second
            .list("ctl")
            .await
            .expect("list")
            .iter()
            .any(|cell| cell.name.ends_with("web-3")),
        "nothing started for the pod with the unknown group"
    );
}

#[tokio::test]
async fn a_new_backend_lists_the_cells_of_its_controller() {
    let ec2 = ec2().await;
    let before_restart = backend(&ec2.moto, config(&ec2, "ctl-a")).await;
    let mut started = Vec::new();
    for pod in ["web-1", "web-2", "web-3"] {
        started.push(
            before_restart
                .start(&spec("ctl-a", pod, LaunchType::OnDemand))
                .await
                .expect("start"),
        );
    }
    let other = backend(&ec2.moto, config(&ec2, "ctl-b")).await;
    other
        .start(&spec("ctl-b", "elsewhere", LaunchType::OnDemand))
        .await
        .expect("start other");
    drop(before_restart);

    // "Restart": a fresh backend with no memory finds exactly its own cells, with their pods.
    let after_restart = backend(&ec2.moto, config(&ec2, "ctl-a")).await;
    let cells = after_restart.list("ctl-a").await.expect("list");
    let mut pods: Vec<String> = cells
        .iter()
        .map(|c| c.identity.as_ref().expect("identity").pod_name.clone())
        .collect();
    pods.sort();
    assert_eq!(pods, ["web-1", "web-2", "web-3"]);
    assert!(cells.iter().all(|c| c.tags[TAG_CONTROLLER_ID] == "ctl-a"));
    let mut ids: Vec<CellId> = cells.iter().map(|c| c.id.clone()).collect();
    ids.sort();
    let mut expected: Vec<CellId> = started.iter().map(|s| s.id.clone()).collect();
    expected.sort();
    assert_eq!(ids, expected);

    // Garbage collection of one: it leaves the listing, the others stay.
    after_restart
        .terminate(&started[1].id)
        .await
        .expect("terminate");
    let remaining = after_restart.list("ctl-a").await.expect("list again");
    assert_eq!(remaining.len(), 2);
    assert!(remaining.iter().all(|c| c.id != started[1].id));
    assert_eq!(other.list("ctl-b").await.expect("list b").len(), 1);
}

#[tokio::test]
async fn boot_image_by_filters_picks_the_newest() {
    let ec2 = ec2().await;
    let seed = backend(&ec2.moto, config(&ec2, "ctl")).await;
    let instance = seed
        .start(&spec("ctl", "image-source", LaunchType::OnDemand))
        .await
        .expect("start");
    let mut images = Vec::new();
    for name in ["updraft-cell-2026.01", "updraft-cell-2026.02"] {
        let image = seed
            .client()
            .create_image()
            .instance_id(&instance.id.0)
            .name(name)
            .send()
            .await
            .expect("create image");
        images.push(image.image_id().expect("image id").to_string());
    }
    let filters = BootImage::Filters {
        owners: Vec::new(),
        filters: BTreeMap::from([("name".to_string(), vec!["updraft-cell-*".to_string()])]),
    };
    let by_filter = backend(
        &ec2.moto,
        AwsConfig {
            boot_image: filters,
            ..config(&ec2, "ctl")
        },
    )
    .await;
    assert_eq!(by_filter.boot_image().await.expect("image"), images[1]);
}

/// A configuration that cannot work gets no backend: the error names every one of `named` (the
/// setting and what to write) and nothing reaches EC2.
async fn assert_backend_refused(ec2: &Ec2, config: AwsConfig, named: &[&str]) {
    let proxy = Ec2Proxy::start(&ec2.moto.endpoint(), refuse_nothing).expect("proxy");
    let error = moto::backend(proxy.endpoint(), config)
        .await
        .expect_err("a backend with a broken configuration");
    let message = BackendError::from(error).to_string();
    assert!(
        named.iter().all(|n| message.contains(n)),
        "{named:?} not all in: {message}"
    );
    assert_eq!(
        proxy.all_requests(),
        Vec::<String>::new(),
        "no request to EC2"
    );
}

/// What a backend configured with `config` answers to a pod's start: an error whose message
/// names every one of `named` (the setting and the bad value), typed as `InvalidRequest` when
/// `invalid_request` (what EC2 refuses as a client error).
async fn assert_start_refused(ec2: &Ec2, config: AwsConfig, named: &[&str], invalid_request: bool) {
    let backend = backend(&ec2.moto, config).await;
    let error = backend
        .start(&spec("ctl", "web-1", LaunchType::OnDemand))
        .await
        .expect_err("a start with a broken configuration");
    let message = error.to_string();
    assert!(
        named.iter().all(|n| message.contains(n)),
        "{named:?} not all in: {message}"
    );
    if invalid_request {
        assert!(
            matches!(error, BackendError::InvalidRequest { .. }),
            "{error:?}"
        );
    }
}

fn filters(owners: &[&str], name: &str, values: &[&str]) -> BootImage {
    BootImage::Filters {
        owners: owners.iter().map(|o| (*o).to_owned()).collect(),
        filters: BTreeMap::from([(
            name.to_owned(),
            values.iter().map(|v| (*v).to_owned()).collect(),
        )]),
    }
}

#[tokio::test]
async fn errors_are_clear_and_typed() {
    let ec2 = ec2().await;
    let with_image = |boot_image| AwsConfig {
        boot_image,
        ..config(&ec2, "ctl")
    };
    assert_start_refused(
        &ec2,
        with_image(BootImage::Id("ami-0000000000000dead".into())),
        &["aws.bootImage", "ami-0000000000000dead", "us-east-1"],
        true,
    )
    .await;
    // A filter EC2 does not know: its error names the setting and the filter. (moto answers
    // it with a server error, EC2 with a client error: the type is not checked.)
    assert_start_refused(
        &ec2,
        with_image(filters(&[], "nmae", &["updraft-*"])),
        &["aws.bootImage", "nmae"],
        false,
    )
    .await;
    // A filter without values never reaches EC2.
    assert_backend_refused(
        &ec2,
        with_image(filters(&["self"], "name", &[])),
        &["aws.bootImage.filters.name"],
    )
    .await;
    let bad_subnet = AwsConfig {
        subnet_id: "subnet-0000dead".into(),
        ..config(&ec2, "ctl")
    };
    assert_start_refused(&ec2, bad_subnet.clone(), &["aws.subnetId"], true).await;
    // No region: no backend, and no call reaches EC2.
    let no_region = AwsConfig {
        region: String::new(),
        ..config(&ec2, "ctl")
    };
    assert_backend_refused(&ec2, no_region, &["region", "e.g. us-east-1"]).await;

    // Preparing (what a start does first) names the setting and the value too.
    let no_match = backend(
        &ec2.moto,
        with_image(filters(&["self"], "name", &["nothing-*"])),
    )
    .await;
    let message = no_match.prepare().await.expect_err("no image").to_string();
    assert!(
        message.contains("aws.bootImage") && message.contains("nothing-*"),
        "{message}"
    );
    let message = backend(&ec2.moto, bad_subnet)
        .await
        .prepare()
        .await
        .expect_err("bad subnet")
        .to_string();
    assert!(
        message.contains("aws.subnetId") && message.contains("subnet-0000dead"),
        "{message}"
    );

    let backend = backend(&ec2.moto, config(&ec2, "ctl")).await;
    let missing = CellId("i-0123456789abcdef0".into());
    let error = backend
        .describe(&missing)
        .await
        .expect_err("unknown instance");
    assert_eq!(
        error,
        BackendError::NotFound {
            id: missing.0.clone()
        }
    );
    let error = backend
        .terminate(&missing)
        .await
        .expect_err("unknown instance");
    assert!(matches!(error, BackendError::NotFound { .. }), "{error:?}");

    // None of the broken configurations started anything.
    assert_eq!(backend.list("ctl").await.expect("list"), Vec::new());
}

#[tokio::test]
async fn refused_spot_falls_back_to_on_demand_when_configured() {
    let ec2 = ec2().await;
    let proxy = Ec2Proxy::start(&ec2.moto.endpoint(), no_spot_capacity).expect("proxy");
    let with_fallback = |fallback| AwsConfig {
        spot_fallback_to_on_demand: fallback,
        ..config(&ec2, "ctl")
    };
    let strict = through_proxy(&proxy, with_fallback(false)).await;
    let error = strict
        .start(&spec("ctl", "batch-1", LaunchType::Spot))
        .await
        .expect_err("spot refused");
    assert!(matches!(error, BackendError::Capacity { .. }), "{error:?}");
    assert!(
        error.to_string().contains("InsufficientInstanceCapacity"),
        "{error}"
    );
    assert!(
        strict.list("ctl").await.expect("list").is_empty(),
        "nothing started"
    );

    let lenient = through_proxy(&proxy, with_fallback(true)).await;
    let batch = spec("ctl", "batch-2", LaunchType::Spot);
    let started = lenient.start(&batch).await.expect("fallback start");
    assert_eq!(started.launch_type, LaunchType::OnDemand);
    let cell = lenient.describe(&started.id).await.expect("describe");
    assert_eq!(cell.launch_type, LaunchType::OnDemand);
    assert_eq!(lenient.list("ctl").await.expect("list").len(), 1);

    // The on-demand launch has a client token of its own (EC2 refuses a token reused with
    // other parameters), and a repeated start (a retry, a restart) finds it: spot is not
    // tried again and no second instance appears.
    let tokens: Vec<String> = proxy
        .requests("RunInstances")
        .iter()
        .filter(|body| body.contains("uid-batch-2"))
        .map(|body| {
            body.split('&')
                .find_map(|pair| pair.strip_prefix("ClientToken="))
                .expect("a client token")
                .to_string()
        })
        .collect();
    assert_eq!(tokens, ["uid-batch-2-1", "uid-batch-2-1-od"]);
    let launches = proxy.requests("RunInstances").len();
    let restarted = through_proxy(&proxy, with_fallback(true)).await;
    let again = restarted.start(&batch).await.expect("repeated start");
    assert_eq!(again, started);
    assert_eq!(restarted.list("ctl").await.expect("list").len(), 1);
    assert_eq!(
        proxy.requests("RunInstances").len(),
        launches,
        "no launch request"
    );
}

#[tokio::test]
async fn arm64_types_boot_the_arm64_image() {
    const ARM64_AMI: &str = "ami-0e9271c829888680e";
    let ec2 = ec2().await;
    let backend = backend(
        &ec2.moto,
        AwsConfig {
            arm64_boot_image: Some(BootImage::Id(ARM64_AMI.into())),
            ..config(&ec2, "ctl")
        },
    )
    .await;
    let image_of = |id: CellId| {
        let client = backend.client().clone();
        async move {
            let described = client
                .describe_instances()
                .instance_ids(&id.0)
                .send()
                .await
                .expect("describe");
            described.reservations()[0].instances()[0]
                .image_id()
                .expect("image")
                .to_string()
        }
    };
    let graviton = CellSpec {
        instance_type: "c6g.large".into(),
        ..spec("ctl", "arm-1", LaunchType::OnDemand)
    };
    let started = backend.start(&graviton).await.expect("arm64 start");
    assert_eq!(image_of(started.id).await, ARM64_AMI);
    let intel = backend
        .start(&spec("ctl", "x86-1", LaunchType::OnDemand))
        .await
        .expect("x86 start");
    assert_eq!(image_of(intel.id).await, AMI);
}

fn tag_map(tags: &[aws_sdk_ec2::types::Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .map(|t| {
            (
                t.key().unwrap_or("").to_string(),
                t.value().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn tags_name_the_pod_within_ec2s_limits() {
    let ec2 = ec2().await;
    let backend = backend(&ec2.moto, config(&ec2, "ctl")).await;
    let mut labelled = spec("ctl", "labelled", LaunchType::OnDemand);
    labelled.identity.pod_labels = (0..60)
        .map(|i| (format!("label-{i:02}"), format!("value-{i}")))
        .collect();
    labelled.identity.pod_labels.insert(
        format!("example.com/{}", "k".repeat(120)),
        "key too long for a tag".into(),
    );
    labelled
        .identity
        .pod_labels
        .insert("note".into(), "semi;colon".into());
    // moto refuses more than 50 tags per resource, as EC2 does.
    let started = backend.start(&labelled).await.expect("start, 62 labels");

    let cell = backend.describe(&started.id).await.expect("describe");
    assert!(cell.tags.len() <= 50, "{} tags", cell.tags.len());
    assert!(
        cell.tags
            .iter()
            .all(|(k, v)| k.chars().count() <= 128 && v.chars().count() <= 256),
        "{:?}",
        cell.tags
    );
    let identity = cell.identity.expect("identity from tags");
    assert_eq!(
        (
            identity.controller_id.as_str(),
            identity.node.as_str(),
            identity.namespace.as_str(),
            identity.pod_name.as_str(),
            identity.pod_uid.as_str()
        ),
        ("ctl", "burst", "default", "labelled", "uid-labelled")
    );
    assert_eq!(identity.pod_labels.len(), MAX_POD_LABELS);
    for (key, value) in &identity.pod_labels {
        assert_eq!(&labelled.identity.pod_labels[key], value, "label {key}");
    }
    assert!(!identity.pod_labels.contains_key("note"));

    // The root volume carries the same identity (a volume left behind is attributable).
    let described = backend
        .client()
        .describe_instances()
        .instance_ids(&started.id.0)
        .send()
        .await
        .expect("describe instances");
    let volume_id = described.reservations()[0].instances()[0].block_device_mappings()[0]
        .ebs()
        .and_then(|ebs| ebs.volume_id())
        .expect("root volume")
        .to_string();
    let volumes = backend
        .client()
        .describe_volumes()
        .volume_ids(&volume_id)
        .send()
        .await
        .expect("describe volumes");
    let volume_tags = tag_map(volumes.volumes()[0].tags());
    assert_eq!(volume_tags[TAG_POD_UID], "uid-labelled");
    assert_eq!(volume_tags[TAG_CONTROLLER_ID], "ctl");
    assert_eq!(volume_tags["Name"], "burst-default-labelled");
}

#[tokio::test]
async fn the_pod_gets_one_secondary_private_ip_on_the_primary_interface() {
    let ec2 = ec2().await;
    let proxy = Ec2Proxy::start(&ec2.moto.endpoint(), |_| None).expect("proxy");
    let backend = through_proxy(&proxy, config(&ec2, "ctl")).await;
    let started = backend
        .start(&spec("ctl", "web-1", LaunchType::OnDemand))
        .await
        .expect("start");

    // EC2 is asked for the pod's address at launch, on the primary interface...
    let launches = proxy.requests("RunInstances");
    assert_eq!(launches.len(), 1);
    for field in [
        "NetworkInterface.1.DeviceIndex=0",
        "NetworkInterface.1.SecondaryPrivateIpAddressCount=1",
    ] {
        assert!(launches[0].contains(field), "{field}: {}", launches[0]);
    }
    // ...and the instance has exactly one secondary address (moto ignores the launch field,
    // so the backend assigned it; two would mean both happened).
    let described = backend
        .client()
        .describe_instances()
        .instance_ids(&started.id.0)
        .send()
        .await
        .expect("describe instances");
    let interfaces = described.reservations()[0].instances()[0].network_interfaces();
    assert_eq!(interfaces.len(), 1, "{interfaces:?}");
    let addresses = interfaces[0].private_ip_addresses();
    assert_eq!(addresses.len(), 2, "{addresses:?}");
    let address = |primary: bool| {
        addresses
            .iter()
            .find(|a| a.primary().unwrap_or(false) == primary)
            .and_then(|a| a.private_ip_address())
            .expect("address")
            .to_string()
    };
    let (primary, secondary) = (address(true), address(false));
    assert_ne!(primary, secondary);
    assert!(
        primary.starts_with("10.0.1.") && secondary.starts_with("10.0.1."),
        "{primary} {secondary}"
    );

    // The agent is reached on the primary address, the pod gets the secondary one; a restarted
    // Updraft's listing says the same.
    let cell = backend.describe(&started.id).await.expect("describe");
    assert_eq!(cell.management_ip.map(|ip| ip.to_string()), Some(primary));
    assert_eq!(cell.pod_ip.map(|ip| ip.to_string()), Some(secondary));
    let listed = backend.list("ctl").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].management_ip, listed[0].pod_ip),
        (cell.management_ip, cell.pod_ip)
    );
}

/// Refuses every `AssignPrivateIpAddresses`, as EC2 does when the interface or subnet has no
/// address left.
fn no_more_addresses(body: &str) -> Option<Refusal> {
    body.contains("Action=AssignPrivateIpAddresses").then_some((
        "PrivateIpAddressLimitExceeded",
        "Number of private addresses will exceed limit.",
    ))
}

#[tokio::test]
async fn a_cell_without_its_pod_address_is_not_left_running() {
    let ec2 = ec2().await;
    let proxy = Ec2Proxy::start(&ec2.moto.endpoint(), no_more_addresses).expect("proxy");
    let backend = through_proxy(&proxy, config(&ec2, "ctl")).await;
    let error = backend
        .start(&spec("ctl", "web-1", LaunchType::OnDemand))
        .await
        .expect_err("no address for the pod");
    let message = error.to_string();
    assert!(
        message.contains("AssignPrivateIpAddresses")
            && message.contains("PrivateIpAddressLimitExceeded"),
        "{message}"
    );
    assert_eq!(backend.list("ctl").await.expect("list"), Vec::new());
    let launched = instances_of_pod(backend.client(), "uid-web-1")
        .await
        .expect("describe instances");
    assert_eq!(launched.len(), 1, "one launch");
    assert_eq!(
        launched[0].state().and_then(|s| s.name()),
        Some(&aws_sdk_ec2::types::InstanceStateName::Terminated)
    );
}

#[tokio::test]
async fn user_data_is_checked_against_the_ec2_limit_before_launch() {
    let ec2 = ec2().await;
    let backend = backend(&ec2.moto, config(&ec2, "ctl")).await;
    let mut at_limit = spec("ctl", "big-1", LaunchType::OnDemand);
    at_limit.user_data = vec![b'#'; EC2_USER_DATA_LIMIT];
    let started = backend.start(&at_limit).await.expect("16 KiB fit");
    let attribute = backend
        .client()
        .describe_instance_attribute()
        .instance_id(&started.id.0)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .expect("user data attribute");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(
            attribute
                .user_data()
                .and_then(|v| v.value())
                .expect("user data"),
        )
        .expect("base64");
    assert_eq!(decoded, at_limit.user_data);

    let mut over = spec("ctl", "big-2", LaunchType::OnDemand);
    over.user_data = vec![b'#'; EC2_USER_DATA_LIMIT + 1];
    let error = backend.start(&over).await.expect_err("over the limit");
    assert!(
        matches!(error, BackendError::InvalidRequest { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("16385 bytes") && message.contains("16384"),
        "{message}"
    );
    assert!(
        instances_of_pod(backend.client(), "uid-big-2")
            .await
            .expect("describe instances")
            .is_empty()
    );

    // The bootstrap plus an operator's cloud-init that cannot fit even compressed is refused
    // when the user data is built, naming both sizes, the limit and the biggest file.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let noise: Vec<u8> = (0..24 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let cloud_init = format!(
        "#cloud-config\nwrite_files:\n- path: /opt/blob\n  encoding: b64\n  content: {}\n",
        base64::engine::general_purpose::STANDARD.encode(&noise)
    );
    let operator = CloudConfig::parse(&cloud_init, "cloud-init.yaml").expect("valid cloud-init");
    let bootstrap = Bootstrap {
        files: Vec::new(),
        commands: vec![vec!["/usr/local/bin/updraft-agent".into()]],
    };
    let error =
        UserData::build(&bootstrap, Some(&operator), EC2_USER_DATA_LIMIT).expect_err("too large");
    let message = error.to_string();
    assert!(
        message.contains("over the 16384-byte limit") && message.contains("/opt/blob"),
        "{message}"
    );
}

#[tokio::test]
async fn a_repeated_start_finds_its_cell_instead_of_launching_another() {
    // moto launches again for a repeated client token: the backends here are told so, and
    // find the earlier start's instance by its tag (on EC2 the token does this).
    let ec2 = ec2().await;
    let web = spec("ctl", "web-1", LaunchType::OnDemand);
    let before_restart = backend(&ec2.moto, config(&ec2, "ctl")).await;
    let started = before_restart.start(&web).await.expect("start");
    drop(before_restart);

    // A restarted Updraft that starts the same attempt again (its answer was lost) gets the
    // same instance.
    let restarted = backend(&ec2.moto, config(&ec2, "ctl")).await;
    let again = restarted.start(&web).await.expect("repeated start");
    assert_eq!(again, started);
    assert_eq!(
        instances_of_pod(restarted.client(), "uid-web-1")
            .await
            .expect("describe instances")
            .len(),
        1
    );

    // Once that instance has ended, the same token still names it (as EC2 answers a repeated
    // client token): nothing is launched; the next attempt's token starts a new cell.
    restarted.terminate(&started.id).await.expect("terminate");
    let ended = restarted
        .start(&web)
        .await
        .expect("start of an ended attempt");
    assert_eq!(ended.id, started.id);
    assert!(
        restarted
            .describe(&ended.id)
            .await
            .expect("describe")
            .state
            .is_ending()
    );
    assert_eq!(
        instances_of_pod(restarted.client(), "uid-web-1")
            .await
            .expect("describe instances")
            .len(),
        1
    );
    let next_attempt = CellSpec {
        idempotency_token: "uid-web-1-2".into(),
        ..web.clone()
    };
    let replacement = restarted.start(&next_attempt).await.expect("new attempt");
    assert_ne!(replacement.id, started.id);
    let live: Vec<CellId> = restarted
        .list("ctl")
        .await
        .expect("list")
        .into_iter()
        .map(|cell| cell.id)
        .collect();
    assert_eq!(live, [replacement.id]);
}

/// The backend of `config` at `proxy` as it runs against EC2: the endpoint is taken to honour
/// client tokens.
async fn as_on_ec2(proxy: &Ec2Proxy, config: AwsConfig) -> AwsBackend {
    let config = AwsConfig {
        endpoint_url: Some(proxy.endpoint()),
        ..config
    };
    assert!(!config.endpoint_ignores_client_tokens, "EC2's default");
    AwsBackend::with_credentials(config, "testing", "testing")
        .await
        .expect("a valid config")
}

#[tokio::test]
async fn a_start_asks_for_no_earlier_instance_where_client_tokens_work() {
    let ec2 = ec2().await;
    let proxy = Ec2Proxy::start(&ec2.moto.endpoint(), refuse_nothing).expect("proxy");
    let describes = || proxy.requests("DescribeInstances").len();
    let launches = || proxy.requests("RunInstances").len();

    // As on EC2: a start is one RunInstances (and, on moto, the pod's address), nothing more.
    let on_ec2 = as_on_ec2(&proxy, config(&ec2, "ctl")).await;
    on_ec2.prepare().await.expect("prepare");
    for pod in ["web-1", "web-2", "web-3"] {
        on_ec2
            .start(&spec("ctl", pod, LaunchType::OnDemand))
            .await
            .expect("start");
    }
    assert_eq!(
        (launches(), describes()),
        (3, 0),
        "{:#?}",
        proxy.all_requests()
    );

    // Where the endpoint ignores client tokens: one lookup by tag per start.
    let ignoring = through_proxy(&proxy, config(&ec2, "ctl")).await;
    ignoring.prepare().await.expect("prepare");
    for pod in ["db-1", "db-2"] {
        ignoring
            .start(&spec("ctl", pod, LaunchType::OnDemand))
            .await
            .expect("start");
    }
    assert_eq!((launches(), describes()), (5, 2));
}

/// Refuses the launches with the client token of `web-1`'s first attempt as EC2 refuses a
/// token reused with other parameters.
fn token_reused_with_other_parameters(body: &str) -> Option<Refusal> {
    (body.contains("Action=RunInstances")
        && body.split('&').any(|pair| pair == "ClientToken=uid-web-1-1"))
    .then_some((
        "IdempotentParameterMismatch",
        "The client token you have provided is associated with a resource that is already deleted or has different parameters.",
    ))
}

#[tokio::test]
async fn a_token_refused_for_changed_parameters_finds_its_instance() {
    let ec2 = ec2().await;
    let web = spec("ctl", "web-1", LaunchType::OnDemand);
    let before_restart = backend(&ec2.moto, config(&ec2, "ctl")).await;
    let started = before_restart.start(&web).await.expect("start");

    // A restarted Updraft starts the same attempt with new user data; EC2 refuses the token.
    let proxy =
        Ec2Proxy::start(&ec2.moto.endpoint(), token_reused_with_other_parameters).expect("proxy");
    let restarted = as_on_ec2(&proxy, config(&ec2, "ctl")).await;
    let changed = CellSpec {
        user_data: b"#cloud-config\n# new certificates\n".to_vec(),
        ..web.clone()
    };
    let again = restarted.start(&changed).await.expect("repeated start");
    assert_eq!(again, started);
    assert_eq!(proxy.requests("RunInstances").len(), 1, "refused once");
    assert_eq!(
        instances_of_pod(restarted.client(), "uid-web-1")
            .await
            .expect("describe instances")
            .len(),
        1
    );

    // A token that launched nothing stays EC2's error.
    let never_launched = CellSpec {
        identity: CellIdentity {
            controller_id: "ctl-b".into(),
            ..changed.identity.clone()
        },
        ..changed
    };
    let error = as_on_ec2(&proxy, config(&ec2, "ctl-b"))
        .await
        .start(&never_launched)
        .await
        .expect_err("a mismatch without an instance");
    assert!(
        error.to_string().contains("IdempotentParameterMismatch"),
        "{error}"
    );
}

#[tokio::test]
async fn a_standby_cell_is_assigned_to_one_pod_only() {
    let ec2 = ec2().await;
    let backend = backend(&ec2.moto, config(&ec2, "ctl")).await;
    let standby = CellSpec {
        name: "updraft-standby".into(),
        identity: CellIdentity::standby("ctl", "burst"),
        idempotency_token: "standby-1-0".into(),
        ..spec("ctl", "unused", LaunchType::OnDemand)
    };
    let started = backend.start(&standby).await.expect("standby start");
    let listed = backend.list("ctl").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert!(
        listed[0]
            .identity
            .as_ref()
            .is_some_and(CellIdentity::is_standby),
        "{:?}",
        listed[0].identity
    );

    // A pod takes it: the tags name the pod, the standby tag is gone, a restarted Updraft's
    // listing says so; taking it again for the same pod is fine.
    let web = spec("ctl", "web-1", LaunchType::OnDemand);
    backend
        .assign(&started.id, &web.name, &web.identity)
        .await
        .expect("assign");
    let restarted = self::backend(&ec2.moto, config(&ec2, "ctl")).await;
    let cell = restarted.describe(&started.id).await.expect("describe");
    assert_eq!(cell.identity.as_ref(), Some(&web.identity));
    assert_eq!(cell.name, "burst-default-web-1");
    assert!(!cell.tags.contains_key(TAG_STANDBY), "{:?}", cell.tags);
    restarted
        .assign(&started.id, &web.name, &web.identity)
        .await
        .expect("assign again to the same pod");

    // Another pod cannot take it, nor can another controller.
    let other = spec("ctl", "web-2", LaunchType::OnDemand);
    let error = restarted
        .assign(&started.id, &other.name, &other.identity)
        .await
        .expect_err("already taken");
    let message = error.to_string();
    assert!(
        message.contains("not a standby cell") && message.contains("default/web-1"),
        "{message}"
    );
    let foreign = spec("ctl-b", "web-3", LaunchType::OnDemand);
    let error = restarted
        .assign(&started.id, &foreign.name, &foreign.identity)
        .await
        .expect_err("another controller's cell");
    assert!(
        matches!(error, BackendError::InvalidRequest { .. }),
        "{error:?}"
    );
    let cell = restarted.describe(&started.id).await.expect("describe");
    assert_eq!(cell.identity.as_ref(), Some(&web.identity), "unchanged");
}
