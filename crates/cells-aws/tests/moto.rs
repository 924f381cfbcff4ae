//! The EC2 backend against a real `moto_server` on loopback (one server per test, dummy
//! credentials): start, tags, describe, terminate, spot, the managed security group, listing for
//! garbage collection, restart recovery, and errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

use std::collections::BTreeMap;

use base64::Engine;
use updraft_cells_aws::moto::MotoServer;
use updraft_cells_aws::{AwsBackend, AwsConfig, BootImage, TAG_CONTROLLER_ID, TAG_POD_UID};
use updraft_cells_backend::cloud_init::{Bootstrap, BootstrapFile, EC2_USER_DATA_LIMIT, UserData};
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
    let config = AwsConfig {
        endpoint_url: Some(moto.endpoint()),
        ..config
    };
    AwsBackend::with_credentials(config, "testing", "testing").await
}

/// A moto server with a VPC 10.0.0.0/16 and a subnet 10.0.1.0/24.
async fn ec2() -> Ec2 {
    let moto = MotoServer::start().expect("moto_server");
    let bootstrap = backend(
        &moto,
        AwsConfig::new(REGION, "setup", BootImage::Id(AMI.into()), "none"),
    )
    .await;
    let client = bootstrap.client();
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
    let first = backend(&ec2.moto, config(&ec2, "ctl")).await;
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
    let cidrs: Vec<&str> = rule
        .ip_ranges()
        .iter()
        .filter_map(|r| r.cidr_ip())
        .collect();
    assert_eq!(cidrs, ["10.0.0.0/16"]);

    // Extra groups by name are resolved in the VPC and attached with the managed one.
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
    assert_eq!(attached.len(), 2, "{attached:?}");
    assert!(
        attached.contains(&group) && attached.contains(&extra_id),
        "{attached:?}"
    );

    let mut unknown = spec("ctl", "web-3", LaunchType::OnDemand);
    unknown.security_groups = vec!["no-such-group".into()];
    let error = second.start(&unknown).await.expect_err("unknown group");
    assert!(
        error.to_string().contains("\"no-such-group\" not found"),
        "{error}"
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

#[tokio::test]
async fn errors_are_clear_and_typed() {
    let ec2 = ec2().await;
    let unknown_ami = backend(
        &ec2.moto,
        AwsConfig {
            boot_image: BootImage::Id("ami-0000000000000dead".into()),
            ..config(&ec2, "ctl")
        },
    )
    .await;
    let error = unknown_ami
        .start(&spec("ctl", "web-1", LaunchType::OnDemand))
        .await
        .expect_err("unknown ami");
    assert!(
        matches!(error, BackendError::InvalidRequest { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("ami-0000000000000dead") && message.contains("us-east-1"),
        "{message}"
    );

    let no_match = backend(
        &ec2.moto,
        AwsConfig {
            boot_image: BootImage::Filters {
                owners: vec!["self".into()],
                filters: BTreeMap::from([("name".to_string(), vec!["nothing-*".to_string()])]),
            },
            ..config(&ec2, "ctl")
        },
    )
    .await;
    let error = no_match.prepare().await.expect_err("no image");
    assert!(error.to_string().contains("nothing-*"), "{error}");

    let bad_subnet = backend(
        &ec2.moto,
        AwsConfig {
            subnet_id: "subnet-0000dead".into(),
            ..config(&ec2, "ctl")
        },
    )
    .await;
    let error = bad_subnet.prepare().await.expect_err("bad subnet");
    assert!(error.to_string().contains("subnet-0000dead"), "{error}");

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
}

/// A loopback proxy in front of moto that refuses every spot `RunInstances` with EC2's
/// `InsufficientInstanceCapacity` (moto itself always has spot capacity) and forwards the rest.
fn spot_refusing_proxy(moto_endpoint: String) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn read_message(reader: &mut BufReader<TcpStream>) -> Option<(Vec<u8>, Vec<u8>)> {
        let mut head = Vec::new();
        loop {
            let mut line = Vec::new();
            if reader.read_until(b'\n', &mut line).ok()? == 0 {
                return None;
            }
            head.extend_from_slice(&line);
            if line == b"\r\n" {
                break;
            }
        }
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let length = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        Some((head, body))
    }

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let address = listener.local_addr().expect("proxy address");
    let upstream = moto_endpoint.trim_start_matches("http://").to_string();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                let mut writer = client.try_clone().expect("clone");
                let mut reader = BufReader::new(client);
                while let Some((head, body)) = read_message(&mut reader) {
                    let text = String::from_utf8_lossy(&body);
                    if text.contains("Action=RunInstances")
                        && text.contains("InstanceMarketOptions.MarketType=spot")
                    {
                        let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>InsufficientInstanceCapacity</Code><Message>There is no Spot capacity available that matches your request.</Message></Error></Errors><RequestID>proxy</RequestID></Response>";
                        let response = format!(
                            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{xml}",
                            xml.len()
                        );
                        if writer.write_all(response.as_bytes()).is_err() {
                            return;
                        }
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(&upstream) else {
                        return;
                    };
                    let mut server_writer = server.try_clone().expect("clone");
                    if server_writer.write_all(&head).is_err()
                        || server_writer.write_all(&body).is_err()
                    {
                        return;
                    }
                    let mut server_reader = BufReader::new(server);
                    let Some((head, body)) = read_message(&mut server_reader) else {
                        return;
                    };
                    if writer.write_all(&head).is_err() || writer.write_all(&body).is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{address}")
}

#[tokio::test]
async fn refused_spot_falls_back_to_on_demand_when_configured() {
    let ec2 = ec2().await;
    let proxy = spot_refusing_proxy(ec2.moto.endpoint());
    let through_proxy = |fallback| AwsConfig {
        endpoint_url: Some(proxy.clone()),
        spot_fallback_to_on_demand: fallback,
        ..config(&ec2, "ctl")
    };
    let strict = AwsBackend::with_credentials(through_proxy(false), "testing", "testing").await;
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

    let lenient = AwsBackend::with_credentials(through_proxy(true), "testing", "testing").await;
    let started = lenient
        .start(&spec("ctl", "batch-2", LaunchType::Spot))
        .await
        .expect("fallback start");
    assert_eq!(started.launch_type, LaunchType::OnDemand);
    let cell = lenient.describe(&started.id).await.expect("describe");
    assert_eq!(cell.launch_type, LaunchType::OnDemand);
    assert_eq!(lenient.list("ctl").await.expect("list").len(), 1);
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
