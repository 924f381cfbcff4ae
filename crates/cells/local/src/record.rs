//! The backend's own record of a cell (its "cloud"): one JSON file per cell under
//! `stateDir/records/`, written atomically. It holds what cannot be observed (identity, type,
//! addresses, launch time, the idempotency token) and which processes are the cell's (pid and
//! start time, so a reused pid is never mistaken for the cell's). Liveness is always observed.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use updraft_cells_backend::{CellIdentity, LaunchType};

use crate::error::{LocalError, io};

/// The record format version.
pub const RECORD_VERSION: u32 = 1;

/// Where a cell is in its life, as far as the backend's own actions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Addresses reserved; namespaces and processes being set up.
    Creating,
    /// The cell's init was started.
    Launched,
    /// Being torn down.
    Terminating,
    /// Torn down; the record stays a while as a tombstone (terminate stays idempotent).
    Terminated,
}

/// A process of the cell: pid plus its start time in clock ticks since boot
/// (`/proc/<pid>/stat` field 22).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProcessRef {
    /// Host pid.
    pub pid: i32,
    /// Start time in clock ticks after boot.
    pub start_ticks: u64,
}

impl ProcessRef {
    /// The process with this pid now, if any.
    pub fn current(pid: i32) -> Option<ProcessRef> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may contain spaces and parentheses: fields follow the last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // rest starts at field 3 (state); field 22 is index 19. A zombie counts as gone.
        if fields.first() == Some(&"Z") {
            return None;
        }
        let start_ticks = fields.get(19)?.parse().ok()?;
        Some(ProcessRef { pid, start_ticks })
    }

    /// Whether this very process (not a later one with the same pid) is alive.
    pub fn alive(&self) -> bool {
        ProcessRef::current(self.pid).is_some_and(|now| now == *self)
    }
}

/// The owner identity as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityRecord {
    /// Controller id.
    pub controller_id: String,
    /// Node name.
    pub node: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod_name: String,
    /// Pod UID.
    pub pod_uid: String,
    /// Pod labels.
    #[serde(default)]
    pub pod_labels: BTreeMap<String, String>,
}

impl From<&CellIdentity> for IdentityRecord {
    fn from(identity: &CellIdentity) -> Self {
        IdentityRecord {
            controller_id: identity.controller_id.clone(),
            node: identity.node.clone(),
            namespace: identity.namespace.clone(),
            pod_name: identity.pod_name.clone(),
            pod_uid: identity.pod_uid.clone(),
            pod_labels: identity.pod_labels.clone(),
        }
    }
}

impl IdentityRecord {
    /// The identity, when complete (controller id, namespace, pod name and UID present), or a
    /// standby identity (controller id and no pod fields; see `CellIdentity::standby`).
    pub fn identity(&self) -> Option<CellIdentity> {
        let standby = !self.controller_id.is_empty()
            && self.namespace.is_empty()
            && self.pod_name.is_empty()
            && self.pod_uid.is_empty();
        if standby {
            return Some(CellIdentity::standby(&self.controller_id, &self.node));
        }
        let complete = !self.controller_id.is_empty()
            && !self.namespace.is_empty()
            && !self.pod_name.is_empty()
            && !self.pod_uid.is_empty();
        complete.then(|| CellIdentity {
            controller_id: self.controller_id.clone(),
            node: self.node.clone(),
            namespace: self.namespace.clone(),
            pod_name: self.pod_name.clone(),
            pod_uid: self.pod_uid.clone(),
            pod_labels: self.pod_labels.clone(),
        })
    }
}

/// One cell as the backend remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CellRecord {
    /// [`RECORD_VERSION`].
    pub version: u32,
    /// The cell id (`cell-<8 hex digits>`), also the file name.
    pub id: String,
    /// The name given at start.
    pub name: String,
    /// The instance type.
    pub instance_type: String,
    /// The launch type asked for (there is no spot market locally: it is recorded as asked).
    pub launch_type: LaunchType,
    /// The start's idempotency token.
    pub idempotency_token: String,
    /// Who the cell belongs to.
    pub identity: IdentityRecord,
    /// The agent's address.
    pub management_ip: Ipv4Addr,
    /// The pod's address.
    pub pod_ip: Ipv4Addr,
    /// Launch time, milliseconds since the Unix epoch.
    pub launch_time_ms: u64,
    /// The backend's last action.
    pub phase: Phase,
    /// The cell's init (the shell that carries out the bootstrap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<ProcessRef>,
    /// The agent, once the init started it and the backend saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<ProcessRef>,
    /// Whether the bootstrap starts an agent (then the agent's life is the cell's).
    pub starts_agent: bool,
    /// When the cell was terminated, milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated_time_ms: Option<u64>,
    /// The process carrying out the start while the phase is `Creating`: when it is gone
    /// before the cell was launched (Updraft killed mid-start), the start was abandoned and
    /// can be resumed (`LocalBackend::resume_abandoned_starts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creator: Option<ProcessRef>,
}

/// Whether `id` has the shape of a local cell id.
pub fn valid_id(id: &str) -> bool {
    id.len() == 13
        && id.starts_with("cell-")
        && id[5..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Reads a record file; `Ok(None)` when it does not exist.
pub fn read(path: &Path, id: &str) -> Result<Option<CellRecord>, LocalError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io("read", path)(error)),
    };
    let broken = |message: String| LocalError::Record {
        path: path.to_path_buf(),
        message,
    };
    let record: CellRecord =
        serde_json::from_slice(&bytes).map_err(|error| broken(error.to_string()))?;
    if record.version != RECORD_VERSION {
        return Err(broken(format!(
            "version {} is not {RECORD_VERSION}",
            record.version
        )));
    }
    if record.id != id {
        return Err(broken(format!(
            "it names cell {:?}, not {id:?} as its file name says",
            record.id
        )));
    }
    Ok(Some(record))
}

/// Writes a record atomically (temporary file, then rename).
pub fn write(path: &Path, record: &CellRecord) -> Result<(), LocalError> {
    let bytes = serde_json::to_vec_pretty(record).map_err(|error| LocalError::Record {
        path: path.to_path_buf(),
        message: error.to_string(),
    })?;
    let temporary: PathBuf = path.with_extension("json.tmp");
    std::fs::write(&temporary, bytes).map_err(io("write", &temporary))?;
    std::fs::rename(&temporary, path).map_err(io("rename", &temporary))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_process_identity() {
        assert!(valid_id("cell-0a1b2c3d"));
        assert!(!valid_id("cell-0A1B2C3D"));
        assert!(!valid_id("cell-0a1b2c3"));
        assert!(!valid_id("../etc/passwd"));
        let me = ProcessRef::current(std::process::id() as i32).expect("self");
        assert!(me.alive());
        let reused = ProcessRef {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert!(!reused.alive(), "another start time is another process");
    }

    #[test]
    fn records_round_trip_and_garbage_is_named() {
        let tmp = tempfile::tempdir().expect("tmp");
        let path = tmp.path().join("cell-00000001.json");
        let record = CellRecord {
            version: RECORD_VERSION,
            id: "cell-00000001".into(),
            name: "n".into(),
            instance_type: "local.nano".into(),
            launch_type: LaunchType::Spot,
            idempotency_token: "t".into(),
            identity: IdentityRecord::default(),
            management_ip: Ipv4Addr::new(10, 0, 0, 2),
            pod_ip: Ipv4Addr::new(10, 0, 0, 3),
            launch_time_ms: 1,
            phase: Phase::Launched,
            init: None,
            agent: None,
            starts_agent: true,
            terminated_time_ms: None,
            creator: ProcessRef::current(std::process::id() as i32),
        };
        write(&path, &record).expect("write");
        assert_eq!(read(&path, "cell-00000001").expect("read"), Some(record));
        assert!(
            read(&tmp.path().join("none.json"), "x")
                .expect("missing")
                .is_none()
        );
        std::fs::write(&path, b"{ not json").expect("write");
        let message = read(&path, "cell-00000001")
            .expect_err("garbage")
            .to_string();
        assert!(
            message.contains("cell-00000001.json is unreadable"),
            "{message}"
        );
    }
}
