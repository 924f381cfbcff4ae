//! Instance selection seen from the cluster, on the real `updraft` binary with local cells
//! sized by the AWS us-east-1 catalog (`catalogFile`): a pod requesting 8 CPU / 15 GiB runs on
//! the cheapest type that fits (checked against a brute-force search over the catalog here), a
//! pod with Kip's spot annotation runs on a spot cell, and a pod no type can hold (500 CPUs) is
//! not started: it gets an Event and a status naming the problem, and no cell.
//!
//! Needs root, socat, docker-registry, the control plane and the `updraft` and `updraft-cell`
//! binaries (see `common`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use updraft_cells_backend::LaunchType;
use updraft_cells_catalog::{BURST_SURCHARGE_PER_VCPU_HOUR, Catalog, InstanceType};

use common::{
    Cells, ConfigOptions, Images, LoopbackRegistry, Setup, TIMEOUT, UpdraftProcess, cell_condition,
    cell_of, delete_node, every_cell, free_port, live_cells, running_and_ready, sleeping_pod,
    wait_node_ready,
};
use updraft_testing::{eventually, wait_for, wait_for_deletion};

fn aws_catalog_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../catalog/data/aws-us-east-1.json")
}

/// The cheapest x86_64 type of `catalog` with at least `cpu_millis` and `memory_bytes`, by
/// looking at every type: price for the launch type plus the unlimited-credits surcharge of a
/// burstable type whose baseline is below the request; ties go to fewer vCPUs, less memory,
/// then the name.
fn brute_force_cheapest(
    catalog: &Catalog,
    cpu_millis: u64,
    memory_bytes: u64,
    spot: bool,
) -> (InstanceType, f64) {
    let mut best: Option<(InstanceType, f64)> = None;
    for t in &catalog.instance_types {
        if t.architecture.as_str() != "x86_64"
            || u64::from(t.vcpus) * 1000 < cpu_millis
            || t.memory_mib * 1024 * 1024 < memory_bytes
        {
            continue;
        }
        let Some(base) = (if spot {
            t.spot_per_hour
        } else {
            Some(t.on_demand_per_hour)
        }) else {
            continue;
        };
        let surcharge = match t.burstable_baseline {
            Some(fraction) => {
                let baseline = (fraction * f64::from(t.vcpus) * 1000.0).round() as u64;
                cpu_millis.saturating_sub(baseline) as f64 / 1000.0 * BURST_SURCHARGE_PER_VCPU_HOUR
            }
            None => 0.0,
        };
        let price = base + surcharge;
        let better = match &best {
            None => true,
            Some((b, p)) => {
                (price, t.vcpus, t.memory_mib, &t.name) < (*p, b.vcpus, b.memory_mib, &b.name)
            }
        };
        if better {
            best = Some((t.clone(), price));
        }
    }
    best.expect("some type fits")
}

fn pod(name: &str, node: &str, image: &str, resources: serde_json::Value) -> Pod {
    let mut pod = sleeping_pod(name, node, image);
    pod.spec.as_mut().unwrap().containers[0].resources =
        Some(serde_json::from_value(resources).unwrap());
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pods_get_the_cheapest_fitting_type_spot_when_asked_and_a_clear_error_when_nothing_fits() {
    let Setup {
        cluster,
        namespace,
        node,
        tmp,
    } = Setup::new("cells-select").await;
    let ns = namespace.name().to_owned();
    let registry = LoopbackRegistry::start(tmp.path()).await;
    let mut options = ConfigOptions::new(1);
    options.images = Images::Registry(&registry);
    options.catalog_file = Some(aws_catalog_file());
    options.default_instance_type = Some("t3.small");
    // Room for the scheduler: the 500-CPU pod must reach the provider to be refused there.
    options.capacity = Some(r#"{cpu: "1000", memory: 4Ti, pods: "20"}"#);
    let Cells {
        config,
        cleanup,
        backend,
        controller,
    } = Cells::new(tmp.path(), options);
    let catalog = Catalog::from_path(&aws_catalog_file()).unwrap();

    let updraft = UpdraftProcess::start(&cluster, &node, free_port(), &config);
    wait_node_ready(&cluster, &node).await;
    let pods = Api::<Pod>::namespaced(cluster.client(), &ns);

    // 8 CPU / 15 GiB, on-demand.
    let (expected, price) = brute_force_cheapest(&catalog, 8000, 15 << 30, false);
    pods.create(
        &PostParams::default(),
        &pod(
            "big",
            &node,
            &registry.image,
            serde_json::json!({"requests": {"cpu": "8", "memory": "15Gi"}}),
        ),
    )
    .await
    .unwrap();
    // Spot through Kip's annotation name, 1 CPU / 1 GiB.
    let (expected_spot, spot_price) = brute_force_cheapest(&catalog, 1000, 1 << 30, true);
    let mut spot = pod(
        "spot",
        &node,
        &registry.image,
        serde_json::json!({"requests": {"cpu": "1", "memory": "1Gi"}}),
    );
    spot.metadata.annotations =
        Some([("pod.elotl.co/launch-type".to_owned(), "spot".to_owned())].into());
    pods.create(&PostParams::default(), &spot).await.unwrap();
    // More than any type has.
    pods.create(
        &PostParams::default(),
        &pod(
            "huge",
            &node,
            &registry.image,
            serde_json::json!({"requests": {"cpu": "500", "memory": "1Gi"}}),
        ),
    )
    .await
    .unwrap();

    let big = wait_for(&pods, "big", "the 8-CPU pod to run", TIMEOUT, |p| {
        running_and_ready(p) && cell_of(p).is_some()
    })
    .await;
    let message = cell_condition(&big).unwrap();
    assert!(
        message.contains(&format!(": {} on-demand, {price:.4} USD/h", expected.name)),
        "expected {} at {price:.4} USD/h (brute force); the pod says {message:?}",
        expected.name
    );
    let spot_pod = wait_for(&pods, "spot", "the spot pod to run", TIMEOUT, |p| {
        running_and_ready(p) && cell_of(p).is_some()
    })
    .await;
    let message = cell_condition(&spot_pod).unwrap();
    assert!(
        message.contains(&format!(
            ": {} spot, {spot_price:.4} USD/h",
            expected_spot.name
        )),
        "expected spot {} at {spot_price:.4} USD/h; the pod says {message:?}",
        expected_spot.name
    );

    // The backend's listing (what `updraft cells list` shows) agrees.
    let cells = live_cells(&backend, &controller).await;
    let cell_for = |pod: &Pod| {
        let id = cell_of(pod).unwrap();
        cells.iter().find(|c| c.id.0 == id).cloned().unwrap()
    };
    let big_cell = cell_for(&big);
    assert_eq!(big_cell.instance_type, expected.name);
    assert_eq!(big_cell.launch_type, LaunchType::OnDemand);
    let spot_cell = cell_for(&spot_pod);
    assert_eq!(spot_cell.instance_type, expected_spot.name);
    assert_eq!(spot_cell.launch_type, LaunchType::Spot);

    // The impossible pod: an Event and a status that name the problem, and no cell.
    let huge = wait_for(
        &pods,
        "huge",
        "the 500-CPU pod to be refused",
        TIMEOUT,
        |p| {
            p.status
                .as_ref()
                .is_some_and(|s| s.reason.as_deref() == Some("ProviderFailed"))
        },
    )
    .await;
    let status = huge.status.clone().unwrap();
    let refusal = status.message.clone().unwrap_or_default();
    assert_eq!(status.phase.as_deref(), Some("Pending"), "{status:?}");
    assert!(
        refusal.contains("500 vCPUs") && refusal.contains("us-east-1"),
        "the message names the request and the catalog: {refusal:?}"
    );
    let events = Api::<Event>::namespaced(cluster.client(), &ns);
    let event = eventually(TIMEOUT, || async {
        let list = events
            .list(&ListParams::default().fields("involvedObject.name=huge"))
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("ProviderCreateFailed")
                    && e.message
                        .as_deref()
                        .is_some_and(|m| m.contains("500 vCPUs"))
            })
            .ok_or_else(|| "no ProviderCreateFailed event yet".to_owned())
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let huge_uid = huge.metadata.uid.clone().unwrap();
    let started = every_cell(&backend, &controller);
    assert!(
        started
            .iter()
            .all(|c| c.identity.as_ref().is_none_or(|i| i.pod_uid != huge_uid)),
        "no cell was ever started for the impossible pod: {started:?}"
    );
    assert_eq!(live_cells(&backend, &controller).await.len(), 2);

    for name in ["big", "spot", "huge"] {
        pods.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in ["big", "spot", "huge"] {
        wait_for_deletion(&pods, name, TIMEOUT).await;
    }
    eventually(TIMEOUT, || async {
        match live_cells(&backend, &controller).await.len() {
            0 => Ok(()),
            n => Err(format!("{n} cells left")),
        }
    })
    .await;
    updraft.kill();
    delete_node(&node);
    drop(cleanup);
}
