//! The streaming idle timeout (the kubelet's `--streaming-connection-idle-timeout`) with a
//! short value, through the real API server with real kubectl: an exec or port-forward that
//! carries no traffic is closed (the exec'd process killed, the forwarded connection in the
//! pod closed), one that keeps talking is not.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

mod remote_command_support;

use std::process::Stdio;
use std::time::Duration;

use remote_command_support::{TIMEOUT, idle_pod, start_with};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use updraft_kubelet_api::streaming::StreamingConfig;
use updraft_testing::TestCluster;

/// Short enough for a test, long enough that a session printing every 0.2 s never comes close,
/// and shorter than the API server's SPDY PING period towards the kubelet (5 s: a PING is
/// traffic, so an idle timeout of 5 s would race it).
const IDLE: Duration = Duration::from_secs(3);

fn short_idle() -> StreamingConfig {
    StreamingConfig {
        idle_timeout: IDLE,
        ..StreamingConfig::default()
    }
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {TIMEOUT:?}"))
}

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn an_idle_kubectl_exec_is_closed_and_its_process_killed_a_talking_one_is_not() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("rc-idle").await;
    let kubelet = start_with(&cluster, short_idle()).await;
    idle_pod(&cluster, ns.name(), &kubelet.name, "box").await;

    // Output every 0.2 s for longer than the idle timeout: the session runs to its end.
    let mut talking = tokio::process::Command::from(cluster.kubectl());
    talking
        .args(["exec", "-n", ns.name(), "box", "--", "sh", "-c"])
        .arg("i=0; while [ $i -lt 40 ]; do echo line $i; i=$((i+1)); sleep 0.2; done")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = within("the talking exec", talking.output()).await.unwrap();
    assert!(
        output.status.success(),
        "a session with traffic was cut: {} {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8(output.stdout).unwrap().lines().count(),
        40
    );

    // Silent after its pid: the kubelet closes it, kubectl ends, the process is killed.
    let mut silent = tokio::process::Command::from(cluster.kubectl());
    silent
        .args(["exec", "-n", ns.name(), "box", "--", "sh", "-c"])
        .arg("echo $$; exec sleep 100000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut silent = silent.spawn().unwrap();
    let mut stdout = BufReader::new(silent.stdout.take().unwrap());
    let mut pid = String::new();
    within("the pid", stdout.read_line(&mut pid)).await.unwrap();
    let pid: i32 = pid.trim().parse().expect("a pid");
    assert!(alive(pid));
    // kubectl ends with an error naming the idle timeout (not as if the command succeeded).
    let mut stderr = silent.stderr.take().unwrap();
    let status = within("kubectl exec to end after the idle timeout", silent.wait())
        .await
        .unwrap();
    let mut message = String::new();
    within("kubectl's stderr", stderr.read_to_string(&mut message))
        .await
        .unwrap();
    assert!(!status.success(), "an idled-out exec looked like success");
    assert!(message.contains("idle timeout"), "kubectl said: {message}");
    updraft_testing::eventually(TIMEOUT, || async {
        if alive(pid) {
            Err(format!("process {pid} still runs"))
        } else {
            Ok(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_kubectl_port_forward_is_closed_with_its_connection_in_the_pod() {
    let cluster = TestCluster::connect().await;
    let ns = cluster.namespace("pf-idle").await;
    let kubelet = start_with(&cluster, short_idle()).await;
    idle_pod(&cluster, ns.name(), &kubelet.name, "box").await;
    // The mock's pod network is the host's loopback.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_port = listener.local_addr().unwrap().port();
    let mut forward = tokio::process::Command::from(cluster.kubectl());
    forward
        .args(["port-forward", "-n", ns.name(), "--address", "127.0.0.1"])
        .arg("pod/box")
        .arg(format!(":{server_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut forward = forward.spawn().unwrap();
    let mut lines = BufReader::new(forward.stdout.take().unwrap()).lines();
    let local_port = within("kubectl port-forward to listen", async {
        loop {
            let line = lines.next_line().await.unwrap().expect("a Forwarding line");
            if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:")
                && let Some((port, _)) = rest.split_once(' ')
            {
                return port.parse::<u16>().unwrap();
            }
        }
    })
    .await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let mut conn = TcpStream::connect(("127.0.0.1", local_port)).await.unwrap();
    conn.write_all(b"ping").await.unwrap();
    let (mut in_pod, _) = within("the forwarded connection", listener.accept())
        .await
        .unwrap();
    let mut ping = [0u8; 4];
    within("the first bytes", in_pod.read_exact(&mut ping))
        .await
        .unwrap();
    assert_eq!(&ping, b"ping");
    in_pod.write_all(b"pong").await.unwrap();
    within("the answer", conn.read_exact(&mut ping))
        .await
        .unwrap();
    assert_eq!(&ping, b"pong");

    // Then nobody says anything: neither side closes, the kubelet does.
    let mut rest = Vec::new();
    let _ = within(
        "the pod-side connection to be closed by the idle timeout",
        in_pod.read_to_end(&mut rest),
    )
    .await;
    assert!(rest.is_empty());
    drop(conn);
    let _ = forward.start_kill();
}
