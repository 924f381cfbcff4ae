//! `updraft cells` as an operator runs it: the real binary against a provider config.
//!
//! - `select` (no root needed): the chosen type and price are the cost engine's, spot comes
//!   from the annotation, and an unsatisfiable pod, a bad file or a missing config exit 1
//!   with a message that says what is wrong.
//! - `list` and `describe` (root): real local cells (network namespaces, mount namespaces and
//!   cgroups on this host, started through the local backend), listed with their type, pod,
//!   IPs and catalog price; a terminated cell shows as ended. Nothing is left behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use updraft_cells_backend::cloud_init::{Bootstrap, EC2_USER_DATA_LIMIT, UserData};
use updraft_cells_backend::{CellBackend, CellId, CellIdentity, CellSpec, CellState, LaunchType};
use updraft_cells_catalog::{Catalog, Demand, PodRequest, SelectionPolicy, Selector};

fn updraft(args: &[&str], config: Option<&Path>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_updraft"));
    command.args(args).env_remove("UPDRAFT_PROVIDER_CONFIG");
    if let Some(config) = config {
        command.arg("--provider-config").arg(config);
    }
    command.output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

fn failed(output: Output) -> String {
    assert_eq!(
        output.status.code(),
        Some(1),
        "expected exit 1\nstdout: {}\nstderr: {}",
        stdout(&output),
        stderr(&output)
    );
    stderr(&output)
}

fn aws_config(dir: &Path) -> PathBuf {
    let path = dir.join("cells.yaml");
    std::fs::write(
        &path,
        format!(
            "backend: aws\nregion: us-east-1\ncontrollerId: cli-test\ncertificateDir: {}/pki\naws:\n  subnetId: subnet-0123\n  bootImage: {{id: ami-0123}}\n",
            dir.display()
        ),
    )
    .unwrap();
    path
}

fn pod_file(dir: &Path, name: &str, annotations: &str, cpu: &str, memory: &str) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  annotations: {{{annotations}}}\nspec:\n  containers:\n    - name: app\n      image: busybox\n      resources:\n        requests: {{cpu: \"{cpu}\", memory: {memory}}}\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn select_prints_the_cost_engines_choice_and_refuses_what_cannot_run() {
    let tmp = tempfile::tempdir().unwrap();
    let config = aws_config(tmp.path());
    let selector = Selector::new(
        Catalog::aws_us_east_1().unwrap(),
        SelectionPolicy::new("t3.small"),
    )
    .unwrap();
    let expected = selector
        .select(&Demand {
            request: PodRequest {
                cpu_millis: 8000,
                memory_bytes: 15 << 30,
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();

    // 8 CPU / 15 GiB, on-demand: the table and the JSON name the engine's choice and price.
    let big = pod_file(tmp.path(), "big", "", "8", "15Gi");
    let big_arg = big.to_str().unwrap();
    let table = ok(updraft(&["cells", "select", "-f", big_arg], Some(&config)));
    let chosen = &expected.chosen.instance_type.name;
    assert!(table.contains("Instance Type:"), "{table}");
    assert!(table.contains(&format!("{chosen} (8 vCPUs")), "{table}");
    assert!(
        table.contains(&format!("{:.4} USD/h", expected.chosen.price_per_hour)),
        "{table}"
    );
    assert!(table.contains("Runners-up:"), "{table}");
    for runner_up in &expected.runners_up {
        assert!(table.contains(&runner_up.instance_type.name), "{table}");
    }
    let json: serde_json::Value = serde_json::from_str(&ok(updraft(
        &["cells", "select", "-f", big_arg, "-o", "json"],
        Some(&config),
    )))
    .unwrap();
    assert_eq!(json["chosen"]["instanceType"], chosen.as_str());
    assert_eq!(
        json["chosen"]["pricePerHour"],
        expected.chosen.price_per_hour
    );
    assert_eq!(json["launchType"], "on-demand");
    assert_eq!(json["request"]["cpu"], "8");

    // The spot annotation: spot, at the spot price of the chosen type.
    let spot = pod_file(
        tmp.path(),
        "spot",
        "cells.updraft.dev/launch-type: spot",
        "8",
        "15Gi",
    );
    let json: serde_json::Value = serde_yaml::from_str(&ok(updraft(
        &[
            "cells",
            "select",
            "-f",
            spot.to_str().unwrap(),
            "-o",
            "yaml",
        ],
        Some(&config),
    )))
    .unwrap();
    assert_eq!(json["launchType"], "spot");
    let spot_type = Catalog::aws_us_east_1()
        .unwrap()
        .get(json["chosen"]["instanceType"].as_str().unwrap())
        .cloned()
        .unwrap();
    assert_eq!(
        json["chosen"]["pricePerHour"].as_f64(),
        spot_type.spot_per_hour
    );

    // What cannot run: exit 1 and the reason.
    let huge = pod_file(tmp.path(), "huge", "", "200", "1Gi");
    let err = failed(updraft(
        &["cells", "select", "-f", huge.to_str().unwrap()],
        Some(&config),
    ));
    assert!(
        err.contains("default/huge") && err.contains("200 vCPUs") && err.contains("largest"),
        "{err}"
    );
    let bad_annotation = pod_file(
        tmp.path(),
        "odd",
        "cells.updraft.dev/launch-type: sometimes",
        "1",
        "1Gi",
    );
    let err = failed(updraft(
        &["cells", "select", "-f", bad_annotation.to_str().unwrap()],
        Some(&config),
    ));
    assert!(err.contains("sometimes"), "{err}");
    let missing = tmp.path().join("missing.yaml");
    let err = failed(updraft(
        &["cells", "select", "-f", missing.to_str().unwrap()],
        Some(&config),
    ));
    assert!(err.contains("missing.yaml"), "{err}");
    let service = tmp.path().join("service.yaml");
    std::fs::write(&service, "kind: Service\nspec: {ports: []}\n").unwrap();
    let err = failed(updraft(
        &["cells", "select", "-f", service.to_str().unwrap()],
        Some(&config),
    ));
    assert!(
        err.contains("service.yaml") && err.contains("pod template"),
        "{err}"
    );
    let err = failed(updraft(&["cells", "select", "-f", big_arg], None));
    assert!(err.contains("--provider-config"), "{err}");
    let broken = tmp.path().join("broken.yaml");
    std::fs::write(&broken, "backend: local\ncontrollerId: x\n").unwrap();
    let err = failed(updraft(&["cells", "select", "-f", big_arg], Some(&broken)));
    assert!(
        err.contains("broken.yaml") && err.contains("certificateDir"),
        "{err}"
    );
}

fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap();
    assert_eq!(uid, "0", "this test must run as root (local cells)");
}

/// Terminates every cell of the test's backend and removes its bridge and cgroup parent, also
/// when the test fails.
struct Cleanup {
    backend: updraft_cells_local::LocalBackend,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(scan) = self.backend.scan() {
            for cell in scan.cells {
                let _ = self.backend.terminate_blocking(&cell.id);
            }
        }
        let _ = self.backend.remove_bridge_if_unused();
        let parent = self.backend.config().cgroup_parent.clone();
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for hierarchy in hierarchies.flatten() {
                let _ = std::fs::remove_dir(hierarchy.path().join(&parent));
            }
        }
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&parent));
    }
}

fn spec(controller: &str, pod: &str, instance_type: &str) -> CellSpec {
    let user_data = UserData::build(
        &Bootstrap {
            files: vec![],
            commands: vec![vec!["sleep".into(), "3600".into()]],
        },
        None,
        EC2_USER_DATA_LIMIT,
    )
    .unwrap()
    .bytes;
    CellSpec {
        name: format!("cli-default-{pod}"),
        instance_type: instance_type.into(),
        launch_type: LaunchType::OnDemand,
        image: None,
        user_data,
        identity: CellIdentity {
            controller_id: controller.into(),
            node: "cli-node".into(),
            namespace: "default".into(),
            pod_name: pod.into(),
            pod_uid: format!("uid-{pod}"),
            pod_labels: BTreeMap::new(),
        },
        security_groups: vec![],
        private_ip_only: true,
        root_volume_bytes: None,
        instance_profile: None,
        idempotency_token: format!("uid-{pod}-1"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_describe_show_real_local_cells() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let controller = format!("cli-{pid}");
    let config_path = tmp.path().join("cells.yaml");
    std::fs::write(
        &config_path,
        format!(
            "backend: local\ncontrollerId: {controller}\ncertificateDir: {dir}/pki\nlocal:\n  stateDir: {dir}/state\n  cidr: 10.211.{third}.0/24\n  bridge: updcli{short}\n  agentBinary: /bin/sleep\n  cgroupParent: updraft-cli-test-{pid}\n  privateDirs: [{dir}/agent]\n",
            dir = tmp.path().display(),
            third = pid % 250 + 1,
            short = pid % 100_000,
        ),
    )
    .unwrap();
    let config = updraft_provider_cells::CellsConfig::load(&config_path).unwrap();
    let backend = updraft_provider_cells::local_backend(&config).unwrap();
    let _cleanup = Cleanup {
        backend: backend.clone(),
    };

    // Nothing yet.
    assert_eq!(
        ok(updraft(&["cells", "list"], Some(&config_path))),
        "No cells.\n"
    );

    let web = backend
        .start(&spec(&controller, "web", "local.small"))
        .await
        .unwrap()
        .id;
    let db = backend
        .start(&spec(&controller, "db", "local.medium"))
        .await
        .unwrap()
        .id;
    for id in [&web, &db] {
        wait_state(&backend, id, CellState::Running).await;
    }

    let json: serde_json::Value = serde_json::from_str(&ok(updraft(
        &["cells", "list", "-o", "json"],
        Some(&config_path),
    )))
    .unwrap();
    let cells = json.as_array().unwrap();
    assert_eq!(cells.len(), 2, "{json}");
    let catalog = Catalog::local().unwrap();
    for (pod, id, instance_type) in [("db", &db, "local.medium"), ("web", &web, "local.small")] {
        let cell = cells
            .iter()
            .find(|c| c["cellId"] == id.0.as_str())
            .unwrap_or_else(|| panic!("cell {id} missing in {json}"));
        assert_eq!(cell["name"], format!("cli-default-{pod}"));
        assert_eq!(cell["status"], "Running");
        assert_eq!(cell["instanceType"], instance_type);
        assert_eq!(cell["launchType"], "on-demand");
        assert_eq!(cell["pod"], format!("default/{pod}"));
        assert_eq!(cell["podUid"], format!("uid-{pod}"));
        assert_eq!(cell["node"], "cli-node");
        assert_eq!(
            cell["pricePerHour"].as_f64(),
            Some(catalog.get(instance_type).unwrap().on_demand_per_hour)
        );
        let management = cell["managementIp"].as_str().unwrap();
        assert!(management.starts_with("10.211."), "{cell}");
        assert!(
            cell["podIp"].as_str().unwrap().starts_with("10.211."),
            "{cell}"
        );
    }

    let table = ok(updraft(&["cells", "list"], Some(&config_path)));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "NAME",
            "STATUS",
            "INSTANCE-TYPE",
            "LAUNCH-TYPE",
            "CELL-ID",
            "IPs",
            "POD",
            "PRICE/h",
            "AGE"
        ],
        "{table}"
    );
    assert_eq!(lines.len(), 3, "{table}");
    let web_line = lines.iter().find(|l| l.contains("default/web")).unwrap();
    let columns: Vec<&str> = web_line.split_whitespace().collect();
    assert_eq!(columns[0], "cli-default-web", "{web_line}");
    assert_eq!(columns[1], "Running", "{web_line}");
    assert_eq!(columns[2], "local.small", "{web_line}");
    assert_eq!(columns[4], web.0, "{web_line}");

    let described = ok(updraft(&["cells", "describe", "web"], Some(&config_path)));
    for expected in [
        "Cell ID:".to_owned(),
        web.0.clone(),
        "local.small (".to_owned(),
        "default/web (uid uid-web)".to_owned(),
    ] {
        assert!(
            described.contains(&expected),
            "{expected:?} in\n{described}"
        );
    }
    assert!(
        described
            .lines()
            .any(|l| l.starts_with("Controller:") && l.ends_with(&controller)),
        "{described}"
    );
    let err = failed(updraft(&["cells", "describe", "nope"], Some(&config_path)));
    assert!(err.contains("\"nope\"") && err.contains("2 cells"), "{err}");

    // Terminated from outside: the listing shows it ended (or no longer lists it).
    backend.terminate(&web).await.unwrap();
    let json: serde_json::Value = serde_json::from_str(&ok(updraft(
        &["cells", "list", "-o", "json"],
        Some(&config_path),
    )))
    .unwrap();
    let web_status = json
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cellId"] == web.0.as_str())
        .map(|c| c["status"].as_str().unwrap().to_owned());
    assert!(
        web_status.is_none()
            || web_status.as_deref() == Some("Terminated")
            || web_status.as_deref() == Some("Terminating"),
        "{json}"
    );
}

async fn wait_state(backend: &updraft_cells_local::LocalBackend, id: &CellId, state: CellState) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let cell = backend.describe(id).await.unwrap();
        if cell.state == state {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cell {id} is {:?}, not {state:?}, after 60 s",
            cell.state
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
