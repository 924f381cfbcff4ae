//! The cells' network, with iproute2: a host bridge holding the gateway address, and per cell
//! a network namespace whose uplink (a veth) joins that bridge. Inside the cell the uplink is
//! enslaved to the cell's own bridge [`CELL_BRIDGE`], which carries the management address;
//! the agent attaches the pod's veth to the same bridge, so the pod address is on the same L2
//! segment as every other cell and the host (no routing, no NAT).

use std::net::Ipv4Addr;
use std::process::Command;

use crate::config::Ipv4Cidr;
use crate::error::LocalError;

/// The bridge inside every cell (management address; the pod's veth joins it).
pub const CELL_BRIDGE: &str = "cell0";
/// The cell's end of its uplink veth.
pub const CELL_UPLINK: &str = "uplink0";
/// The name the agent should give the cell's end of the pod's veth.
pub const POD_HOST_VETH: &str = "pod0";

/// The named network namespace of a cell.
pub fn netns_name(id: &str) -> String {
    format!("updraft-{id}")
}

/// The host end of a cell's uplink (`uc` + the id's 8 hex digits: 10 bytes).
pub fn host_veth(id: &str) -> String {
    format!("uc{}", id.trim_start_matches("cell-"))
}

/// Runs `ip` with `args`.
pub fn ip(args: &[&str]) -> Result<String, LocalError> {
    let command = format!("ip {}", args.join(" "));
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|error| LocalError::Command {
            command: command.clone(),
            stderr: error.to_string(),
        })?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    stderr.truncate(500);
    Err(LocalError::Command { command, stderr })
}

/// Whether an `ip` failure says the object does not exist.
fn is_missing(error: &LocalError) -> bool {
    matches!(error, LocalError::Command { stderr, .. }
        if stderr.contains("Cannot find device")
            || stderr.contains("No such file")
            || stderr.contains("does not exist"))
}

/// The IPv4 addresses (with prefix length) on `device` in the namespace `netns` (host when
/// `None`); `None` when the device does not exist.
pub fn addresses(
    netns: Option<&str>,
    device: &str,
) -> Result<Option<Vec<(Ipv4Addr, u8)>>, LocalError> {
    let mut args = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-j", "-4", "addr", "show", "dev", device]);
    let text = match ip(&args) {
        Ok(text) => text,
        Err(error) if is_missing(&error) => return Ok(None),
        Err(error) => return Err(error),
    };
    let parsed: serde_json::Value =
        serde_json::from_str(&text).map_err(|error| LocalError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: format!("unexpected output: {error}"),
        })?;
    let mut found = Vec::new();
    for link in parsed.as_array().into_iter().flatten() {
        for info in link["addr_info"].as_array().into_iter().flatten() {
            if let (Some(local), Some(prefix)) =
                (info["local"].as_str(), info["prefixlen"].as_u64())
                && let Ok(address) = local.parse()
            {
                found.push((address, prefix as u8));
            }
        }
    }
    Ok(Some(found))
}

/// Creates the host bridge with the gateway address, or checks an existing one.
pub fn ensure_bridge(bridge: &str, cidr: Ipv4Cidr) -> Result<(), LocalError> {
    let gateway = cidr.gateway();
    let wanted = (gateway, cidr.prefix_len);
    match addresses(None, bridge)? {
        None => {
            if let Err(error) = ip(&["link", "add", bridge, "type", "bridge"])
                && !matches!(&error, LocalError::Command { stderr, .. } if stderr.contains("File exists"))
            {
                return Err(error);
            }
            add_gateway(bridge, wanted)?;
        }
        Some(existing) if existing.contains(&wanted) => {}
        Some(existing) if existing.is_empty() => add_gateway(bridge, wanted)?,
        Some(existing) => {
            let list: Vec<String> = existing.iter().map(|(a, p)| format!("{a}/{p}")).collect();
            return Err(LocalError::Config {
                field: "bridge".into(),
                message: format!(
                    "the host bridge {bridge} already has {} instead of the gateway {gateway}/{} of local.cidr {cidr}; choose another bridge name or CIDR",
                    list.join(", "),
                    cidr.prefix_len
                ),
            });
        }
    }
    ip(&["link", "set", bridge, "up"])?;
    Ok(())
}

fn add_gateway(bridge: &str, (gateway, prefix): (Ipv4Addr, u8)) -> Result<(), LocalError> {
    match ip(&["addr", "add", &format!("{gateway}/{prefix}"), "dev", bridge]) {
        // Already there (older iproute2 says "File exists", newer "Address already assigned").
        Err(LocalError::Command { stderr, .. })
            if stderr.contains("File exists") || stderr.contains("already assigned") =>
        {
            Ok(())
        }
        other => other.map(|_| ()),
    }
}

/// Deletes the host bridge (when no cell uses it any more).
pub fn delete_bridge(bridge: &str) -> Result<(), LocalError> {
    match ip(&["link", "del", bridge]) {
        Err(error) if is_missing(&error) => Ok(()),
        other => other.map(|_| ()),
    }
}

/// The cell's network: namespace, uplink into `bridge`, the cell bridge with the management
/// address, default route via the gateway. The host forgets what it knew of `addresses` (the
/// management and pod addresses): a cell terminated moments ago may have had them, and the
/// host's neighbour entry would send the new cell's packets to the old cell's MAC until it
/// expires (seen: a reused address answered only after 9–11 s).
pub fn create_cell_network(
    id: &str,
    bridge: &str,
    cidr: Ipv4Cidr,
    addresses: [Ipv4Addr; 2],
) -> Result<(), LocalError> {
    let ns = netns_name(id);
    let veth = host_veth(id);
    let [management_ip, _pod_ip] = addresses;
    for address in addresses {
        // Succeeds also when there is no entry.
        ip(&["neigh", "flush", "to", &address.to_string(), "dev", bridge])?;
    }
    ip(&["netns", "add", &ns])?;
    ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    ip(&[
        "link",
        "add",
        &veth,
        "type",
        "veth",
        "peer",
        "name",
        CELL_UPLINK,
        "netns",
        &ns,
    ])?;
    ip(&["link", "set", &veth, "master", bridge, "up"])?;
    ip(&["-n", &ns, "link", "add", CELL_BRIDGE, "type", "bridge"])?;
    ip(&[
        "-n",
        &ns,
        "link",
        "set",
        CELL_UPLINK,
        "master",
        CELL_BRIDGE,
        "up",
    ])?;
    ip(&[
        "-n",
        &ns,
        "addr",
        "add",
        &format!("{management_ip}/{}", cidr.prefix_len),
        "dev",
        CELL_BRIDGE,
    ])?;
    ip(&["-n", &ns, "link", "set", CELL_BRIDGE, "up"])?;
    ip(&[
        "-n",
        &ns,
        "route",
        "add",
        "default",
        "via",
        &cidr.gateway().to_string(),
    ])?;
    Ok(())
}

/// Removes the cell's uplink and namespace; what is already gone is fine.
pub fn delete_cell_network(id: &str) -> Result<(), LocalError> {
    if let Err(error) = ip(&["link", "del", &host_veth(id)])
        && !is_missing(&error)
    {
        return Err(error);
    }
    match ip(&["netns", "del", &netns_name(id)]) {
        Err(error) if is_missing(&error) => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Whether the cell's named namespace exists.
pub fn netns_exists(id: &str) -> bool {
    std::path::Path::new("/run/netns")
        .join(netns_name(id))
        .exists()
}
