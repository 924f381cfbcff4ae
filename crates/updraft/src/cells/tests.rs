#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};

use updraft_cells_backend::{Cell, CellId, CellIdentity, CellState, LaunchType};
use updraft_cells_catalog::{SelectionPolicy, Selector};

use super::*;

fn row(name: &str, pod: Option<(&str, &str)>, launched_secs_ago: u64, now: SystemTime) -> CellRow {
    let identity = pod.map(|(namespace, pod_name)| CellIdentity {
        controller_id: "demo".into(),
        node: "updraft-demo".into(),
        namespace: namespace.into(),
        pod_name: pod_name.into(),
        pod_uid: if pod_name.is_empty() {
            String::new()
        } else {
            format!("uid-{pod_name}")
        },
        pod_labels: BTreeMap::new(),
    });
    CellRow {
        cell: Cell {
            id: CellId(format!("lc-{name}")),
            name: name.into(),
            state: CellState::Running,
            instance_type: "local.medium".into(),
            launch_type: LaunchType::OnDemand,
            management_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 213, 0, 2))),
            pod_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 213, 0, 3))),
            public_ip: None,
            launch_time: Some(now - Duration::from_secs(launched_secs_ago)),
            identity: identity.clone(),
            tags: BTreeMap::from([("updraft.dev/controller".into(), "demo".into())]),
        },
        pod: identity
            .as_ref()
            .map(|i| format!("{}/{}", i.namespace, i.pod_name)),
        pod_uid: identity.as_ref().map(|i| i.pod_uid.clone()),
        node: identity.map(|i| i.node),
        price_per_hour: Some(0.0416),
        currency: "USD".into(),
    }
}

#[test]
fn ages_read_like_kubectl() {
    let cases = [
        (0, "0s"),
        (95, "95s"),
        (120, "2m"),
        (303, "5m3s"),
        (40 * 60 + 10, "40m"),
        (3 * 3600 + 5 * 60, "3h5m"),
        (30 * 3600, "30h"),
        (3 * 86400 + 4 * 3600, "3d4h"),
        (45 * 86400, "45d"),
        (800 * 86400, "2y70d"),
    ];
    for (seconds, expected) in cases {
        assert_eq!(
            human_age(Duration::from_secs(seconds)),
            expected,
            "{seconds}s"
        );
    }
}

#[test]
fn table_aligns_columns_and_trims_line_ends() {
    let text = table(
        &["A", "LONG-HEADER", "C"],
        &[
            vec!["wide-value".into(), "x".into(), "".into()],
            vec!["y".into(), "z".into(), "last".into()],
        ],
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "A            LONG-HEADER   C");
    assert_eq!(lines[1], "wide-value   x");
    assert_eq!(lines[2], "y            z             last");
}

#[test]
fn list_shows_every_column_and_standby_cells() {
    let now = SystemTime::now();
    let rows = vec![
        row("updraft-default-web", Some(("default", "web")), 303, now),
        row("updraft-standby-1", Some(("", "")), 30, now),
    ];
    let text = render_list(&rows, now, OutputFormat::Table).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let headers: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        headers,
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
        ]
    );
    let first: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        first,
        [
            "updraft-default-web",
            "Running",
            "local.medium",
            "on-demand",
            "lc-updraft-default-web",
            "10.213.0.2,10.213.0.3",
            "default/web",
            "0.0416",
            "USD",
            "5m3s"
        ]
    );
    assert!(lines[2].contains("<standby>"), "{}", lines[2]);
    assert_eq!(
        render_list(&[], now, OutputFormat::Table).unwrap(),
        "No cells.\n"
    );
}

#[test]
fn list_as_json_and_yaml_carries_the_same_fields() {
    let now = SystemTime::now();
    let rows = vec![row(
        "updraft-default-web",
        Some(("default", "web")),
        60,
        now,
    )];
    let json: serde_json::Value =
        serde_json::from_str(&render_list(&rows, now, OutputFormat::Json).unwrap()).unwrap();
    let cell = &json[0];
    assert_eq!(cell["name"], "updraft-default-web");
    assert_eq!(cell["status"], "Running");
    assert_eq!(cell["instanceType"], "local.medium");
    assert_eq!(cell["launchType"], "on-demand");
    assert_eq!(cell["cellId"], "lc-updraft-default-web");
    assert_eq!(cell["podIp"], "10.213.0.3");
    assert_eq!(cell["pod"], "default/web");
    assert_eq!(cell["podUid"], "uid-web");
    assert_eq!(cell["pricePerHour"], 0.0416);
    assert_eq!(cell["ageSeconds"], 60);
    assert_eq!(cell["standby"], false);
    assert!(
        cell["launchedAt"].as_str().unwrap().ends_with('Z'),
        "{cell}"
    );
    let yaml: serde_json::Value =
        serde_yaml::from_str(&render_list(&rows, now, OutputFormat::Yaml).unwrap()).unwrap();
    assert_eq!(yaml, json);
}

#[test]
fn describe_names_type_price_pod_tags_and_console() {
    let now = SystemTime::now();
    let rows = vec![row(
        "updraft-default-web",
        Some(("default", "web")),
        60,
        now,
    )];
    let catalog = Catalog::local().unwrap();
    let console = BTreeMap::from([(
        "lc-updraft-default-web".to_owned(),
        "agent listening".to_owned(),
    )]);
    let matched = find(&rows, "web");
    assert_eq!(matched.len(), 1);
    let text = render_describe(&matched, &catalog, &console, now, OutputFormat::Table).unwrap();
    for expected in [
        "Name:",
        "updraft-default-web",
        "Cell ID:",
        "Instance Type:",
        "local.medium (",
        "vCPUs",
        "Price:",
        "0.0416 USD/h",
        "Pod:",
        "default/web (uid uid-web)",
        "Controller:",
        "updraft.dev/controller=demo",
        "Console (last 10 lines):",
        "  agent listening",
    ] {
        assert!(text.contains(expected), "{expected:?} missing in\n{text}");
    }
}

#[test]
fn find_matches_cell_ids_names_pods_and_uids() {
    let now = SystemTime::now();
    let rows = vec![
        row("updraft-default-web", Some(("default", "web")), 60, now),
        row("updraft-other-web", Some(("other", "web")), 60, now),
    ];
    assert_eq!(find(&rows, "lc-updraft-default-web").len(), 1);
    assert_eq!(find(&rows, "updraft-other-web").len(), 1);
    assert_eq!(find(&rows, "other/web").len(), 1);
    assert_eq!(find(&rows, "uid-web").len(), 2);
    assert_eq!(find(&rows, "web").len(), 2, "a pod name in two namespaces");
    assert!(find(&rows, "nothing").is_empty());
}

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: big
  annotations:
    cells.updraft.dev/launch-type: spot
spec:
  containers:
    - name: app
      image: busybox
      resources:
        requests: {cpu: "8", memory: 15Gi}
"#;

#[test]
fn pods_and_workload_templates_are_read() {
    let pod = parse_pod_manifest(POD).unwrap();
    assert_eq!(pod.name, "default/big");
    assert_eq!(pod.kind, "Pod");
    assert_eq!(
        pod.annotations
            .get("cells.updraft.dev/launch-type")
            .map(String::as_str),
        Some("spot")
    );
    assert_eq!(pod.spec.containers.len(), 1);

    let deployment = parse_pod_manifest(
        r#"{"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"template": {"metadata": {"annotations": {"a": "b"}},
                     "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}"#,
    )
    .unwrap();
    assert_eq!(deployment.name, "shop/web");
    assert_eq!(deployment.kind, "Deployment");
    assert_eq!(
        deployment.annotations.get("a").map(String::as_str),
        Some("b")
    );
}

#[test]
fn bad_manifests_say_what_is_wrong() {
    for (text, expected) in [
        ("", "empty"),
        ("kind: [unclosed", "not YAML"),
        ("metadata: {name: x}\n", "no kind"),
        ("kind: Service\nspec: {ports: []}\n", "no pod template"),
        (
            "kind: Pod\nspec:\n  containers: [{name: a, image: b, resources: {requests: 3}}]\n",
            "containers[0].resources.requests",
        ),
        (
            "kind: Pod\nmetadata: {annotations: {a: {b: c}}}\nspec: {containers: []}\n",
            "annotations",
        ),
    ] {
        let err = parse_pod_manifest(text).unwrap_err();
        assert!(err.contains(expected), "{text:?}: {err}");
    }
}

#[test]
fn select_shows_the_choice_its_price_and_runners_up() {
    let selector = Selector::new(
        Catalog::aws_us_east_1().unwrap(),
        SelectionPolicy::new("t3.small"),
    )
    .unwrap();
    let pod =
        parse_pod_manifest(&POD.replace("launch-type: spot", "launch-type: on-demand")).unwrap();
    let (decision, _) =
        updraft_cells_catalog::decide(&selector, &pod.spec, &pod.annotations, LaunchType::OnDemand)
            .unwrap();
    let request = PodRequest::from_pod_spec(&pod.spec).unwrap();
    let view = SelectView::new(&pod, &request, &decision, "us-east-1");
    let text = render_select(&view, OutputFormat::Table).unwrap();
    let price = decision.chosen.price_per_hour;
    for expected in [
        "Pod:".to_owned(),
        "default/big (Pod)".to_owned(),
        "8 CPU, 15 GiB memory".to_owned(),
        "c5a.2xlarge (8 vCPUs".to_owned(),
        "on-demand".to_owned(),
        format!("{price:.4} USD/h"),
        "Why:".to_owned(),
        decision.reason.clone(),
        "Runners-up:".to_owned(),
        "INSTANCE-TYPE".to_owned(),
    ] {
        assert!(text.contains(&expected), "{expected:?} missing in\n{text}");
    }
    for runner_up in &decision.runners_up {
        assert!(
            text.contains(&runner_up.instance_type.name),
            "{} missing in\n{text}",
            runner_up.instance_type.name
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&render_select(&view, OutputFormat::Json).unwrap()).unwrap();
    assert_eq!(json["chosen"]["instanceType"], "c5a.2xlarge");
    assert_eq!(json["chosen"]["pricePerHour"], price);
    assert_eq!(json["launchType"], "on-demand");
    assert_eq!(
        json["runnersUp"].as_array().unwrap().len(),
        decision.runners_up.len()
    );
}

#[test]
fn console_escapes_are_removed() {
    assert_eq!(
        strip_terminal_escapes("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m serving"),
        "2026  INFO serving"
    );
    assert_eq!(strip_terminal_escapes("plain"), "plain");
}
