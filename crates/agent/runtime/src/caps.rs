//! Linux capability names and the container-runtime default set.

use crate::error::{Error, Result};

/// Capability names in kernel numbering order (`CAP_CHOWN` = 0 …).
const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The default set of containerd/CRI-O/Docker.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

fn number(name: &str) -> Result<u32> {
    let bare = name
        .strip_prefix("CAP_")
        .unwrap_or(name)
        .to_ascii_uppercase();
    NAMES
        .iter()
        .position(|n| *n == bare)
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| Error::InvalidSpec(format!("unknown capability {name:?}")))
}

/// Capability numbers to drop from the bounding set: everything up to `last_cap` that is not in
/// the default set plus `add` minus `drop` (`ALL` is accepted in either list).
pub fn to_drop(add: &[String], drop: &[String], last_cap: u32) -> Result<Vec<u32>> {
    let all = |l: &[String]| l.iter().any(|c| c.eq_ignore_ascii_case("ALL"));
    let mut keep = vec![false; last_cap as usize + 1];
    fn set(keep: &mut [bool], n: u32, v: bool) {
        if let Some(slot) = keep.get_mut(n as usize) {
            *slot = v;
        }
    }
    for c in DEFAULT_CAPABILITIES {
        set(&mut keep, number(c)?, true);
    }
    if all(drop) {
        keep.iter_mut().for_each(|k| *k = false);
    }
    for c in drop.iter().filter(|c| !c.eq_ignore_ascii_case("ALL")) {
        set(&mut keep, number(c)?, false);
    }
    if all(add) {
        keep.iter_mut().for_each(|k| *k = true);
    }
    for c in add.iter().filter(|c| !c.eq_ignore_ascii_case("ALL")) {
        set(&mut keep, number(c)?, true);
    }
    Ok((0..=last_cap)
        .filter(|n| !keep.get(*n as usize).copied().unwrap_or(false))
        .collect())
}

/// The highest capability number this kernel knows.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_add_drop() -> Result<()> {
        let d = to_drop(&[], &[], 40)?;
        assert!(
            !d.contains(&0) && d.contains(&21),
            "CHOWN kept, SYS_ADMIN dropped"
        );
        let d = to_drop(&["SYS_ADMIN".into()], &["CAP_CHOWN".into()], 40)?;
        assert!(d.contains(&0) && !d.contains(&21));
        assert_eq!(to_drop(&[], &["ALL".into()], 40)?.len(), 41);
        assert!(
            matches!(to_drop(&["NOPE".into()], &[], 40), Err(Error::InvalidSpec(m)) if m.contains("NOPE"))
        );
        Ok(())
    }
}
