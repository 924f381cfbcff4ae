//! What the agent keeps on disk about a running container instance, so that a restarted agent
//! finds it again: `containers/<name>.json` with the PID and the process's start time (together
//! they name one process: a reused PID has another start time) and the lifecycle's history.

use std::path::Path;

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::status::Terminated;

/// One running instance as recorded for a later agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Host PID of the instance's init process.
    pub pid: i32,
    /// Field 22 of /proc/<pid>/stat: with the PID it names the process uniquely.
    pub start_ticks: u64,
    /// Restarts of the container before this instance.
    pub restarts: u32,
    /// When the instance started.
    pub started_at: Timestamp,
    /// `updraft://<instance>`.
    pub container_id: String,
    /// Digest of its image.
    pub image_id: String,
    /// Its environment (for exec).
    pub env: Vec<(String, String)>,
    /// How the instance before it ended.
    pub last: Option<Terminated>,
}

impl InstanceRecord {
    /// The record at `path`, if there is a readable one.
    pub fn read(path: &Path) -> Option<Self> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Whether the recorded process still exists (same PID, same start time).
    pub fn alive(&self) -> bool {
        start_ticks(self.pid) == Some(self.start_ticks)
    }
}

/// Start time of a process (field 22 of /proc/<pid>/stat).
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Writes `value` as JSON to `path` through a temporary file and a rename, so a reader (or an
/// agent killed half-way) never sees half a file.
pub fn write_json(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_names_this_process_alive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let pid = std::process::id() as i32;
        let record = InstanceRecord {
            pid,
            start_ticks: start_ticks(pid).unwrap(),
            restarts: 2,
            started_at: Timestamp::UNIX_EPOCH,
            container_id: "updraft://x".into(),
            image_id: "sha256:1".into(),
            env: vec![("A".into(), "1".into())],
            last: None,
        };
        write_json(&path, &record).unwrap();
        let read = InstanceRecord::read(&path).unwrap();
        assert_eq!(read.restarts, 2);
        assert!(read.alive());
        let reused = InstanceRecord {
            start_ticks: read.start_ticks + 1,
            ..read
        };
        assert!(
            !reused.alive(),
            "same PID, other start time: another process"
        );
        assert!(InstanceRecord::read(&dir.path().join("missing.json")).is_none());
    }
}
