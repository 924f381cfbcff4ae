//! The control plane's host address: where cells and in-cluster clients reach the API server.
//!
//! On a real cluster the API server advertises a node address that every pod can route to,
//! and the `kubernetes` Service's endpoints name it. Here everything listens on loopback,
//! which no pod in its own network namespace can reach and which the API server refuses as an
//! Endpoint or as a node address to proxy to. So `cluster up` gives the host one more address,
//! [`HOST_ADDRESS`], on a dummy link of its own ([`HOST_LINK`]): local cells reach it through
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
/// The dummy link that carries [`HOST_ADDRESS`].
pub const HOST_LINK: &str = "updraft-host0";

/// Whether [`HOST_ADDRESS`] is on this host now.
pub fn present() -> bool {
    Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", HOST_LINK])
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(&format!("{HOST_ADDRESS}/"))
        })
}

/// Adds [`HOST_LINK`] with [`HOST_ADDRESS`] unless it is there. Returns whether the address
/// is present afterwards; a failure (no root, no `ip`) is printed, not returned: the control
/// plane then runs on loopback only.
pub fn ensure() -> bool {
    if present() {
        return true;
    }
    let steps: [&[&str]; 3] = [
        &["link", "add", HOST_LINK, "type", "dummy"],
        &[
            "addr",
            "replace",
            &format!("{HOST_ADDRESS}/32"),
            "dev",
            HOST_LINK,
        ],
        &["link", "set", HOST_LINK, "up"],
    ];
    for args in steps {
        match Command::new("ip").args(args).output() {
            Ok(out) if out.status.success() => {}
            Ok(out)
                if args[1] == "add"
                    && String::from_utf8_lossy(&out.stderr).contains("File exists") => {}
            Ok(out) => {
                eprintln!(
                    "warning: `ip {}` failed ({}): {}; the control plane stays on loopback only, so pods on cells cannot reach the API server (run cluster up as root)",
                    args.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                return false;
            }
            Err(e) => {
                eprintln!(
                    "warning: running ip (Debian package iproute2): {e}; the control plane stays on loopback only"
                );
                return false;
            }
        }
    }
    present()
}

/// Removes [`HOST_LINK`] (nothing to do when it is not there).
pub fn remove() {
    if Command::new("ip")
        .args(["link", "show", HOST_LINK])
        .output()
        .is_ok_and(|out| out.status.success())
    {
        let _ = Command::new("ip").args(["link", "del", HOST_LINK]).status();
    }
}
