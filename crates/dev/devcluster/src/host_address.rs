//! The control plane's host address: where cells and in-cluster clients reach the API server.
//!
//! On a real cluster the API server advertises a node address that every pod can route to,
//! and the `kubernetes` Service's endpoints name it. Here everything listens on loopback,
//! which no pod in its own network namespace can reach and which the API server refuses as an
//! Endpoint or as a node address to proxy to. So `cluster up` gives the host one more address,
//! [`HOST_ADDRESS`], on its loopback link under a label of its own ([`HOST_LABEL`]; a dummy
//! link would need a kernel module these hosts lack): local cells reach it through
//! their bridge's gateway (the host delivers any of its own addresses), the API server
//! advertises it, and nodes may use it as their `InternalIP`. Nothing outside this machine is
//! involved: the address exists only on a link this machine made.
//!
//! Making the link needs root (`CAP_NET_ADMIN`); without it the control plane stays on
//! loopback only, as before, and says so.

use std::net::Ipv4Addr;
use std::process::Command;

/// The host's address for cells and in-cluster clients.
pub const HOST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 211, 0, 1);
/// The label of [`HOST_ADDRESS`] on `lo`, so that `ip addr` says whose it is.
pub const HOST_LABEL: &str = "lo:updraft";

/// Whether [`HOST_ADDRESS`] is on this host now.
pub fn present() -> bool {
    Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", "lo"])
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(&format!("{HOST_ADDRESS}/"))
        })
}

/// Adds [`HOST_ADDRESS`] to `lo` unless it is there. Returns whether the address is present
/// afterwards; a failure (no root, no `ip`) is printed, not returned: the control plane then
/// runs on loopback only.
pub fn ensure() -> bool {
    if present() {
        return true;
    }
    let cidr = format!("{HOST_ADDRESS}/32");
    match Command::new("ip")
        .args(["addr", "add", &cidr, "dev", "lo", "label", HOST_LABEL])
        .output()
    {
        Ok(out) if out.status.success() => present(),
        Ok(out) => {
            eprintln!(
                "warning: adding {cidr} to lo failed ({}): {}; the control plane stays on loopback only, so pods on cells cannot reach the API server (cluster up needs root for it)",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            false
        }
        Err(e) => {
            eprintln!(
                "warning: running ip (Debian package iproute2): {e}; the control plane stays on loopback only"
            );
            false
        }
    }
}

/// Removes [`HOST_ADDRESS`] from `lo` (nothing to do when it is not there).
pub fn remove() {
    if present() {
        let _ = Command::new("ip")
            .args(["addr", "del", &format!("{HOST_ADDRESS}/32"), "dev", "lo"])
            .status();
    }
}
