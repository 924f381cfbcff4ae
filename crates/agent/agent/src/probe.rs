//! Probes: exec, httpGet and tcpSocket, run in the pod.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::Probe;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use updraft_cell_runtime::{ExecSpec, ExecTarget, StdioMode};

/// Port of an httpGet/tcpSocket probe (named ports resolved against the container's ports).
fn port(p: &IntOrString, ports: &[(String, u16)]) -> Option<u16> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => ports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .or_else(|| name.parse().ok()),
    }
}

/// Runs the probe once; true = success.
pub async fn run_once(
    probe: &Probe,
    target: &ExecTarget,
    netns: &File,
    env: &[(String, String)],
    ports: &[(String, u16)],
) -> bool {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    if let Some(exec) = &probe.exec {
        let argv = exec.command.clone().unwrap_or_default();
        let Ok((mut proc, _io)) = target.exec(ExecSpec {
            argv,
            env: env.to_vec(),
            working_dir: None,
            stdio: StdioMode::Null,
        }) else {
            return false;
        };
        return matches!(
            tokio::time::timeout(timeout, proc.wait()).await,
            Ok(Ok(status)) if status.code() == 0
        );
    }
    if let Some(tcp) = &probe.tcp_socket {
        let Some(p) = port(&tcp.port, ports) else {
            return false;
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, p));
        return crate::netns::connect(netns, addr, timeout).await.is_ok();
    }
    if let Some(http) = &probe.http_get {
        let Some(p) = port(&http.port, ports) else {
            return false;
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, p));
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        let attempt = async {
            let mut s = crate::netns::connect(netns, addr, timeout).await.ok()?;
            let mut req = format!(
                "GET {path} HTTP/1.0\r\nHost: localhost:{p}\r\nUser-Agent: updraft-cell-probe\r\n"
            );
            for h in http.http_headers.iter().flatten() {
                req.push_str(&format!("{}: {}\r\n", h.name, h.value));
            }
            req.push_str("\r\n");
            s.write_all(req.as_bytes()).await.ok()?;
            let mut buf = vec![0u8; 64];
            let n = s.read(&mut buf).await.ok()?;
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            let code: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
            Some((200..400).contains(&code))
        };
        return matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)));
    }
    // A probe without a handler is invalid; treat it as failing so the user notices.
    false
}
