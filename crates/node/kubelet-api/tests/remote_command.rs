//! `kubectl logs/exec/attach/cp` through the real API server to an Updraft node whose mock
//! pods run real processes. The exec/attach/cp scenarios run once per [`StreamingPath`]: the
//! node declaring `ExtendWebSocketsToKubelet` (the API server passes kubectl's WebSocket
//! through) and not (the API server translates it to SPDY); each checks at the node's
//! `/metrics` that its sessions took that path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

#[macro_use]
mod remote_command_support;

use std::io::{Read as _, Write as _};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use remote_command_support::{
    StreamingPath, TIMEOUT, create_pod, idle_pod, kubectl, kubectl_ok, running, start, start_on,
};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use updraft_testing::{TestCluster, eventually, unique_name};

#[tokio::test]
async fn kubectl_logs_tail_since_timestamps_limit_bytes_container_and_previous() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("rc-logs").await;
    let kubelet = start(&cluster).await;
    let lines = "for i in 1 2 3 4 5; do echo line-$i; done; exec sleep infinity";
    // `counter` restarts once (OnFailure, exit 1 the first time) so it has a previous instance.
    let counter = "n=$(cat n 2>/dev/null || echo 0); n=$((n+1)); echo $n > n; echo instance-$n; \
                   if [ $n -ge 2 ]; then exec sleep infinity; fi; exit 1";
    create_pod(
        &cluster,
        ns.name(),
        &kubelet.name,
        "talker",
        serde_json::json!({
            "restartPolicy": "OnFailure",
            "containers": [
                {"name": "main", "image": "busybox", "command": ["sh", "-c", lines]},
                {"name": "errors", "image": "busybox", "command": ["sh", "-c", "echo oops >&2; exec sleep infinity"]},
                {"name": "counter", "image": "busybox", "command": ["sh", "-c", counter]}
            ]
        }),
        |p| {
            running(p)
                && p.status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.name == "counter" && c.restart_count >= 1))
        },
    )
    .await;
    let ns = ns.name();
    let all = eventually(TIMEOUT, || async {
        let out = kubectl_ok(&cluster, &["logs", "-n", ns, "talker", "-c", "main"]).await;
        if out.contains("line-5") {
            Ok(out)
        } else {
            Err(out)
        }
    })
    .await;
    assert_eq!(all, "line-1\nline-2\nline-3\nline-4\nline-5\n");
    // stderr is logged too.
    eventually(TIMEOUT, || async {
        let out = kubectl_ok(&cluster, &["logs", "-n", ns, "talker", "-c", "errors"]).await;
        if out == "oops\n" { Ok(()) } else { Err(out) }
    })
    .await;
    assert_eq!(
        kubectl_ok(
            &cluster,
            &["logs", "-n", ns, "talker", "-c", "main", "--tail=2"]
        )
        .await,
        "line-4\nline-5\n"
    );
    assert_eq!(
        kubectl_ok(
            &cluster,
            &["logs", "-n", ns, "talker", "-c", "main", "--limit-bytes=9"]
        )
        .await,
        "line-1\nli"
    );
    assert_eq!(
        kubectl_ok(
            &cluster,
            &["logs", "-n", ns, "talker", "-c", "main", "--since=1h"]
        )
        .await,
        all
    );
    let future = "2099-01-01T00:00:00Z";
    assert_eq!(
        kubectl_ok(
            &cluster,
            &[
                "logs",
                "-n",
                ns,
                "talker",
                "-c",
                "main",
                &format!("--since-time={future}")
            ]
        )
        .await,
        ""
    );
    let stamped = kubectl_ok(
        &cluster,
        &["logs", "-n", ns, "talker", "-c", "main", "--timestamps"],
    )
    .await;
    for (line, expected) in stamped.lines().zip(all.lines()) {
        let (time, text) = line.split_once(' ').unwrap();
        assert_eq!(text, expected);
        assert!(
            time.parse::<k8s_openapi::jiff::Timestamp>().is_ok(),
            "{time:?} is not an RFC 3339 timestamp"
        );
    }
    assert_eq!(stamped.lines().count(), 5);
    assert_eq!(
        kubectl_ok(&cluster, &["logs", "-n", ns, "talker", "-c", "counter"]).await,
        "instance-2\n"
    );
    assert_eq!(
        kubectl_ok(
            &cluster,
            &["logs", "-n", ns, "talker", "-c", "counter", "--previous"]
        )
        .await,
        "instance-1\n"
    );
}

#[tokio::test]
async fn kubectl_logs_follow_streams_until_the_container_ends() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("rc-follow").await;
    let kubelet = start(&cluster).await;
    // Waits for a file that the test creates through exec, then ends.
    let script = "echo first; while [ ! -e go ]; do sleep 0.1; done; echo second";
    create_pod(
        &cluster,
        ns.name(),
        &kubelet.name,
        "waiter",
        serde_json::json!({
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox", "command": ["sh", "-c", script]}]
        }),
        running,
    )
    .await;
    let mut follow = tokio::process::Command::from(cluster.kubectl());
    follow
        .args(["logs", "-f", "-n", ns.name(), "waiter"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut follow = follow.spawn().unwrap();
    let mut stdout = follow.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !seen.ends_with(b"first\n") {
        let n = tokio::time::timeout(TIMEOUT, stdout.read(&mut buf))
            .await
            .expect("kubectl logs -f printed the first line")
            .unwrap();
        assert!(
            n > 0,
            "kubectl logs -f ended early: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    kubectl_ok(
        &cluster,
        &["exec", "-n", ns.name(), "waiter", "--", "touch", "go"],
    )
    .await;
    let mut rest = Vec::new();
    tokio::time::timeout(TIMEOUT, stdout.read_to_end(&mut rest))
        .await
        .expect("kubectl logs -f ends with the container")
        .unwrap();
    seen.extend_from_slice(&rest);
    let status = tokio::time::timeout(TIMEOUT, follow.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "kubectl logs -f: {status}");
    assert_eq!(String::from_utf8(seen).unwrap(), "first\nsecond\n");
}

#[tokio::test]
async fn logs_of_another_nodes_pod_are_404() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("rc-other").await;
    let kubelet = start(&cluster).await;
    // Another Node whose kubelet endpoint is (wrongly) our port: the API server sends us the
    // request for its pod, and we must not serve a pod that is not ours.
    let other = unique_name("other-node");
    let nodes = Api::<Node>::all(cluster.client());
    let node: Node =
        serde_json::from_value(serde_json::json!({"metadata": {"name": other}})).unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let _cleanup = NodeCleanup(other.clone());
    let status = serde_json::json!({"status": {
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet.port}}
    }});
    nodes
        .patch_status(&other, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "elsewhere"},
        "spec": {"nodeName": other, "containers": [{"name": "main", "image": "busybox"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(cluster.client(), ns.name())
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    // Through the API server: its NotFound for our 404.
    let output = kubectl(&cluster, &["logs", "-n", ns.name(), "elsewhere"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("NotFound"), "expected a 404: {stderr}");
    // Straight to the kubelet port with the API server's kubelet client certificate: the 404
    // names the node.
    let pki = cluster.layout().pki();
    let mut identity = std::fs::read(pki.join("apiserver-kubelet-client.crt")).unwrap();
    identity.extend(std::fs::read(pki.join("apiserver-kubelet-client.key")).unwrap());
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(kubelet.ca_pem.as_bytes()).unwrap())
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .build()
        .unwrap();
    let response = client
        .get(format!(
            "https://127.0.0.1:{}/containerLogs/{}/elsewhere/main",
            kubelet.port,
            ns.name()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body = response.text().await.unwrap();
    assert!(
        body.contains(&format!("is not on node {}", kubelet.name)),
        "{body}"
    );
}

struct NodeCleanup(String);

impl Drop for NodeCleanup {
    fn drop(&mut self) {
        updraft_testing::delete_node(&self.0);
    }
}

test_on_both_paths!(
    kubectl_exec_reports_exit_codes_and_pipes_10_mib_through_cat,
    exec_reports_exit_codes_and_pipes_10_mib_through_cat
);

async fn exec_reports_exit_codes_and_pipes_10_mib_through_cat(path: StreamingPath) {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("rc-exec").await;
    let kubelet = start_on(&cluster, path).await;
    idle_pod(&cluster, ns.name(), &kubelet.name, "box").await;
    let ns = ns.name();

    let ok = kubectl(
        &cluster,
        &[
            "exec",
            "-n",
            ns,
            "box",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2",
        ],
    )
    .await;
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "out\n");
    assert!(String::from_utf8_lossy(&ok.stderr).contains("err\n"));

    let three = kubectl(
        &cluster,
        &["exec", "-n", ns, "box", "--", "sh", "-c", "exit 3"],
    )
    .await;
    assert_eq!(
        three.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&three.stderr)
    );

    let missing = kubectl(
        &cluster,
        &["exec", "-n", ns, "box", "--", "no-such-command-here"],
    )
    .await;
    assert_eq!(
        missing.status.code(),
        Some(127),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
    assert!(String::from_utf8_lossy(&missing.stderr).contains("executable file not found"));

    // The working directory is the pod's scratch directory, with the container's environment.
    let pwd = kubectl_ok(
        &cluster,
        &[
            "exec",
            "-n",
            ns,
            "box",
            "--",
            "sh",
            "-c",
            "echo $HOSTNAME; pwd",
        ],
    )
    .await;
    assert!(
        pwd.starts_with("box\n") && pwd.contains(&kubelet.scratch.path().display().to_string()),
        "{pwd}"
    );

    let mut data = vec![0u8; 10 * 1024 * 1024];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for byte in &mut data {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *byte = seed as u8;
    }
    let mut cat = tokio::process::Command::from(cluster.kubectl());
    cat.args(["exec", "-i", "-n", ns, "box", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut cat = cat.spawn().unwrap();
    let mut stdin = cat.stdin.take().unwrap();
    let input = data.clone();
    let writer = tokio::spawn(async move {
        stdin.write_all(&input).await.unwrap();
        drop(stdin);
    });
    let output = tokio::time::timeout(TIMEOUT, cat.wait_with_output())
        .await
        .expect("kubectl exec -i cat finished")
        .unwrap();
    writer.await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.stdout.len(), data.len());
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&output.stdout)),
        hex::encode(sha2::Sha256::digest(&data))
    );
    kubelet
        .assert_sessions_took(&cluster, path, "exec", 5)
        .await;
}

// The terminal is driven with blocking reads: other threads must serve the kubelet port.
test_on_both_paths!(
    kubectl_exec_it_gets_a_terminal_that_follows_resizes,
    exec_it_gets_a_terminal_that_follows_resizes,
    flavor = "multi_thread",
    worker_threads = 2
);

async fn exec_it_gets_a_terminal_that_follows_resizes(path: StreamingPath) {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("rc-tty").await;
    let kubelet = start_on(&cluster, path).await;
    idle_pod(&cluster, ns.name(), &kubelet.name, "box").await;

    let size = |rows: u16, cols: u16| nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size(30, 100)), None).unwrap();
    // kubectl needs the terminal as its controlling terminal to hear SIGWINCH: `setsid -c`.
    let kubectl_path = cluster.layout().kubectl();
    let mut command = std::process::Command::new("setsid");
    command
        .args(["--wait", "--ctty"])
        .arg(&kubectl_path)
        .args(["exec", "-it", "-n", ns.name(), "box", "--", "sh"])
        .env("KUBECONFIG", cluster.layout().admin_kubeconfig())
        .env("TERM", "dumb")
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::from(pty.slave.try_clone().unwrap()));
    let mut child = command.spawn().unwrap();
    drop(command);
    drop(pty.slave);
    let mut master_in = std::fs::File::from(pty.master.try_clone().unwrap());
    let mut master_out = std::fs::File::from(pty.master.try_clone().unwrap());
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = master_out.read(&mut buf) {
            if n == 0 || seen_tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut screen = String::new();
    let wait_for_text = |text: &str, screen: &mut String, retype: &mut dyn FnMut()| {
        let deadline = std::time::Instant::now() + TIMEOUT;
        while !screen.contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {text:?} on the terminal: {screen:?}"
            );
            match seen_rx.recv_timeout(Duration::from_secs(2)) {
                Ok(chunk) => screen.push_str(&String::from_utf8_lossy(&chunk)),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => retype(),
                Err(err) => panic!("terminal closed: {err}; screen: {screen:?}"),
            }
        }
    };
    let mut type_line = |line: &str| {
        master_in.write_all(line.as_bytes()).unwrap();
        master_in.flush().unwrap();
    };
    type_line("stty size\n");
    wait_for_text("30 100", &mut screen, &mut || type_line("stty size\n"));
    rustix::termios::tcsetwinsize(
        &pty.master,
        rustix::termios::Winsize {
            ws_row: 40,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .unwrap();
    // The resize travels kubectl → API server → kubelet asynchronously: ask until it shows.
    type_line("stty size\n");
    wait_for_text("40 120", &mut screen, &mut || type_line("stty size\n"));
    type_line("exit 0\n");
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "kubectl exec -it: {status}; screen: {screen:?}"
    );
    kubelet
        .assert_sessions_took(&cluster, path, "exec", 1)
        .await;
}

test_on_both_paths!(
    kubectl_attach_reaches_the_main_process,
    attach_reaches_the_main_process
);

async fn attach_reaches_the_main_process(path: StreamingPath) {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("rc-attach").await;
    let kubelet = start_on(&cluster, path).await;
    create_pod(
        &cluster,
        ns.name(),
        &kubelet.name,
        "echoer",
        serde_json::json!({
            "restartPolicy": "Never",
            "containers": [{
                "name": "main", "image": "busybox", "stdin": true, "stdinOnce": true,
                "command": ["sh", "-c", "while read line; do echo \"got $line\"; done; echo bye"]
            }]
        }),
        running,
    )
    .await;
    let mut attach = tokio::process::Command::from(cluster.kubectl());
    attach
        .args(["attach", "-i", "-n", ns.name(), "echoer", "-c", "main"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut attach = attach.spawn().unwrap();
    let mut stdin = attach.stdin.take().unwrap();
    let mut stdout = attach.stdout.take().unwrap();
    // Type until the process answers (kubectl may still be connecting when the first line goes).
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    stdin.write_all(b"hello\n").await.unwrap();
    while !String::from_utf8_lossy(&seen).contains("got hello") {
        match tokio::time::timeout(Duration::from_secs(2), stdout.read(&mut buf)).await {
            Ok(Ok(0)) => panic!("kubectl attach ended: {:?}", String::from_utf8_lossy(&seen)),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Ok(Err(err)) => panic!("{err}"),
            Err(_) => stdin.write_all(b"hello\n").await.unwrap(),
        }
    }
    // stdinOnce: closing our stdin closes the process's, so it says bye and exits.
    drop(stdin);
    let mut rest = Vec::new();
    tokio::time::timeout(TIMEOUT, stdout.read_to_end(&mut rest))
        .await
        .expect("kubectl attach ends with the process")
        .unwrap();
    seen.extend_from_slice(&rest);
    let status = tokio::time::timeout(TIMEOUT, attach.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&seen).contains("bye"),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
    assert!(status.success(), "kubectl attach: {status}");
    kubelet
        .assert_sessions_took(&cluster, path, "attach", 1)
        .await;
}

/// Legacy clients speak SPDY to the API server, which then passes the upgrade through to the
/// kubelet unchanged: kubectl does so with its WebSocket feature turned off. They arrive as
/// SPDY also at a node declaring `ExtendWebSocketsToKubelet` (Updraft's default).
#[tokio::test]
async fn kubectl_exec_over_spdy_end_to_end() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("rc-spdy").await;
    let kubelet = start_on(&cluster, StreamingPath::Passthrough).await;
    idle_pod(&cluster, ns.name(), &kubelet.name, "box").await;
    let mut exec = tokio::process::Command::from(cluster.kubectl());
    exec.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .args([
            "exec",
            "-i",
            "-n",
            ns.name(),
            "box",
            "--",
            "sh",
            "-c",
            "cat; exit 3",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut exec = exec.spawn().unwrap();
    let mut stdin = exec.stdin.take().unwrap();
    stdin.write_all(b"over spdy\n").await.unwrap();
    drop(stdin);
    let output = tokio::time::timeout(TIMEOUT, exec.wait_with_output())
        .await
        .expect("kubectl exec over SPDY finished")
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.stdout, b"over spdy\n");
    kubelet
        .assert_sessions(&cluster, "exec", "spdy", "v5.channel.k8s.io", 1)
        .await;
}

test_on_both_paths!(kubectl_cp_copies_both_ways, cp_copies_both_ways);

/// `kubectl cp` is tar over exec, in both directions.
async fn cp_copies_both_ways(path: StreamingPath) {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("rc-cp").await;
    let kubelet = start_on(&cluster, path).await;
    idle_pod(&cluster, ns.name(), &kubelet.name, "box").await;
    let local = tempfile::tempdir().unwrap();
    let upload = local.path().join("upload.bin");
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&upload, &content).unwrap();
    let ns = ns.name();
    kubectl_ok(
        &cluster,
        &[
            "cp",
            upload.to_str().unwrap(),
            &format!("{ns}/box:uploaded.bin"),
            "-c",
            "main",
        ],
    )
    .await;
    let remote_sum = kubectl_ok(
        &cluster,
        &["exec", "-n", ns, "box", "--", "sha256sum", "uploaded.bin"],
    )
    .await;
    assert!(
        remote_sum.starts_with(&hex::encode(sha2::Sha256::digest(&content))),
        "{remote_sum}"
    );
    let download = local.path().join("download.bin");
    kubectl_ok(
        &cluster,
        &[
            "cp",
            &format!("{ns}/box:uploaded.bin"),
            download.to_str().unwrap(),
            "-c",
            "main",
        ],
    )
    .await;
    assert_eq!(std::fs::read(&download).unwrap(), content);
    // At least the upload's tar, the check and the download's tar.
    kubelet
        .assert_sessions_took(&cluster, path, "exec", 3)
        .await;
}
