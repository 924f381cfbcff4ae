//! Pod networks: veth pairs from a bridge in a test-created "cell" netns into pod netns.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use updraft_cell_runtime::{Container, ExitStatus, PodNetwork, PodSandbox, Stdio};

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The "cell" netns with a bridge; deleted on drop even when the test fails.
struct CellNetns(String);

impl CellNetns {
    fn create() -> Self {
        let name = unique("updraft-cell");
        ip(&["netns", "add", &name]);
        let cell = Self(name);
        ip(&["-n", &cell.0, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &cell.0, "addr", "add", "10.244.0.1/16", "dev", "br0"]);
        ip(&["-n", &cell.0, "link", "set", "br0", "up"]);
        cell
    }
}

impl Drop for CellNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[tokio::test]
async fn two_sandboxes_talk_over_veth_pairs_on_a_bridge() {
    let env = env();
    let rootfs = busybox_rootfs();
    let cell = CellNetns::create();
    let (id_a, id_b) = (unique("pa"), unique("pb"));
    {
        let net = |veth: &str, last: u8| PodNetwork {
            host_netns: Some(cell.0.clone()),
            bridge: "br0".into(),
            host_veth: veth.into(),
            address: std::net::Ipv4Addr::new(10, 244, 1, last),
            prefix_len: 16,
            gateway: Some(std::net::Ipv4Addr::new(10, 244, 0, 1)),
        };
        let mut spec_a = sandbox_spec(&env, &id_a);
        spec_a.network = Some(net("vetha", 2));
        let mut spec_b = sandbox_spec(&env, &id_b);
        spec_b.network = Some(net("vethb", 3));
        let a = PodSandbox::create(&env.driver, spec_a).expect("sandbox a");
        let b = PodSandbox::create(&env.driver, spec_b).expect("sandbox b");

        let (server, server_io) = Container::start(
            &a,
            // stdin stays open: busybox nc exits at stdin EOF, maybe before reading.
            container_spec(
                "server",
                rootfs.path(),
                &["sh", "-c", "sleep 1000 2>/dev/null | nc -l -p 8080"],
            ),
        )
        .unwrap();
        let client = "ip addr show eth0 | grep -q 10.244.1.3/16 || exit 7; \
                      for i in $(seq 100); do echo hello-pod | nc 10.244.1.2 8080 && exit 0; sleep 0.1; done; exit 1";
        let (exit, _, err) = run(
            &b,
            container_spec("client", rootfs.path(), &["sh", "-c", client]),
        )
        .await;
        assert_eq!(exit.status, ExitStatus::Exited(0), "client: {err}");
        let Stdio::Pipes { stdout, .. } = server_io else {
            panic!("pipes expected")
        };
        let first_line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
            line
        });
        let out = tokio::time::timeout(Duration::from_secs(30), first_line)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out, "hello-pod\n");
        server.stop(Duration::from_secs(1)).await.unwrap();
        let hosts = std::fs::read_to_string(a.etc_file("hosts")).unwrap();
        assert!(hosts.contains("10.244.1.2\tpod-a"), "{hosts}");
        a.teardown().unwrap();
        b.teardown().unwrap();
        // The host ends of the veth pairs go with the pod namespaces; the kernel destroys a
        // namespace asynchronously, so wait (bounded) for the links to disappear.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let links = Command::new("ip")
                .args(["-n", &cell.0, "link"])
                .output()
                .unwrap();
            let links = String::from_utf8_lossy(&links.stdout).into_owned();
            if !links.contains("vetha") && !links.contains("vethb") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "veth pairs left: {links}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_sandbox_gone(&id_a);
    assert_sandbox_gone(&id_b);
}
