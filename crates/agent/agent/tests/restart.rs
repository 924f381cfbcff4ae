//! The `updraft-cell` binary killed and started again: it finds its running container again,
//! nothing runs twice, and a container that ends meanwhile is reported honestly; the Service
//! rules stay in force, but the agent reports none until it is sent the table again.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use common::*;
use updraft_cell_api::services::{Protocol, ServiceRoute, ServiceRoutes};
use updraft_cell_api::{CellClient, ClientTls, LogOptions};

struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_agent(dir: &Path, port: u16, image: &Path) -> AgentProcess {
    AgentProcess(
        Command::new(env!("CARGO_BIN_EXE_updraft-cell"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--dir")
            .arg(dir.join("agent"))
            .arg("--tls-cert")
            .arg(dir.join("server.crt"))
            .arg("--tls-key")
            .arg(dir.join("server.key"))
            .arg("--client-ca")
            .arg(dir.join("ca.crt"))
            .arg("--cgroup-root")
            .arg("updraft-cell-test")
            .arg("--image-dir")
            .arg(format!("busybox={}", image.display()))
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    )
}

async fn wait_ping(client: &CellClient) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while client.ping().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent never answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_killed_agent_restarts_and_adopts_its_running_container() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    for (name, pem) in [
        ("ca.crt", &pki.ca),
        ("server.crt", &pki.server_cert),
        ("server.key", &pki.server_key),
    ] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let image = dir.path().join("busybox-image");
    busybox_rootfs(&image);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = CellClient::new(
        ([127, 0, 0, 1], port).into(),
        ClientTls::from_pem(
            pki.ca.as_bytes(),
            pki.client_cert.as_bytes(),
            pki.client_key.as_bytes(),
        )
        .unwrap(),
    );
    let mut agent = spawn_agent(dir.path(), port, &image);
    wait_ping(&client).await;
    let req = pod(r#"
metadata: {name: survivor}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{name: data, emptyDir: {}}]
  containers:
  - name: app
    image: busybox
    command: [sh, -c, 'echo started >> /data/starts; echo hello; while true; do sleep 1; done']
    volumeMounts: [{name: data, mountPath: /data}]
"#);
    client.apply_pod(&req).await.unwrap();
    let before = wait_status(&client, "running", |s| running(s, "app")).await;
    let table = ServiceRoutes {
        version: 7,
        routes: vec![ServiceRoute {
            service: "default/web:80".into(),
            cluster_ip: [10, 96, 0, 60].into(),
            protocol: Protocol::Tcp,
            port: 80,
            endpoints: vec![std::net::SocketAddrV4::new([127, 0, 0, 1].into(), 8080)],
            affinity_timeout_seconds: None,
        }],
    };
    assert_eq!(
        client.put_services(&table).await.unwrap().applied_version,
        7
    );
    let uid = req.pod.metadata.uid.as_deref().unwrap();
    let netns = format!("updraft-{}", updraft_cell_agent::pod::uid_to_id(uid));
    let rules = || proxy_rules(&netns);
    assert!(rules().contains("10.96.0.60"), "{}", rules());
    let started_at = |s: &k8s_openapi::api::core::v1::PodStatus| {
        container(s, "app")
            .and_then(|c| c.state.as_ref())
            .and_then(|st| st.running.as_ref())
            .and_then(|r| r.started_at.clone())
    };

    // SIGKILL: no chance to clean up or to stop anything.
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    let _agent = spawn_agent(dir.path(), port, &image);
    wait_ping(&client).await;
    let after = wait_status(&client, "running after the restart", |s| running(s, "app")).await;
    assert_eq!(
        started_at(&after),
        started_at(&before),
        "the same instance, not a new one"
    );
    assert_eq!(container(&after, "app").unwrap().restart_count, 0);
    // The rules are still in the pod's namespace, but the new agent was not told: it says
    // none, so the provider sends the table again, and installing it again is harmless.
    let status = client.pod_status(None, Duration::ZERO).await.unwrap();
    assert_eq!(status.services_version, 0);
    assert_eq!(client.services().await.unwrap().applied_version, 0);
    assert!(rules().contains("10.96.0.60"), "{}", rules());
    assert_eq!(
        client.put_services(&table).await.unwrap().applied_version,
        7
    );
    assert!(rules().contains("10.96.0.60"), "{}", rules());
    let (starts, _, code) = exec(&client, "app", &["cat", "/data/starts"]).await;
    assert_eq!(
        (starts.as_str(), code),
        ("started\n", 0),
        "the container ran once"
    );
    let log = client
        .logs_string("app", &LogOptions::default())
        .await
        .unwrap();
    assert_eq!(log, "hello\n");

    // The adopted container ends: the agent notices, says it cannot know the exit code, and
    // restarts it per policy (Always).
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("agent/pod/containers/app.json")).unwrap(),
    )
    .unwrap();
    let pid = record["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restarted = wait_status(&client, "restarted after the lost exit", |s| {
        container(s, "app").is_some_and(|c| c.restart_count == 1) && running(s, "app")
    })
    .await;
    let last = container(&restarted, "app")
        .and_then(|c| c.last_state.as_ref())
        .and_then(|l| l.terminated.as_ref())
        .unwrap();
    assert_eq!(last.reason.as_deref(), Some("ContainerStatusUnknown"));
    let (starts, _, _) = exec(&client, "app", &["cat", "/data/starts"]).await;
    assert_eq!(starts, "started\nstarted\n");
    client.delete_pod(None).await.unwrap();
}
