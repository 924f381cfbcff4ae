//! Connections made inside the pod's network namespace (probes, port-forward).

use std::fs::File;
use std::net::SocketAddr;
use std::time::Duration;

/// Connects to `addr` from inside the network namespace `netns`. The socket is created on a
/// short-lived thread that joined the namespace (a socket keeps the namespace it was created
/// in), so no runtime thread ever changes namespace.
pub async fn connect(
    netns: &File,
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let ns = netns.try_clone()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("netns-connect".into())
        .spawn(move || {
            let result = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
                .and_then(|()| std::net::TcpStream::connect_timeout(&addr, timeout));
            let _ = tx.send(result);
        })?;
    let stream = rx
        .await
        .map_err(|_| std::io::Error::other("connect thread ended without an answer"))??;
    stream.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(stream)
}
