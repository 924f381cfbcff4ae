//! The local backend of the cells provider: a cell is a network namespace on this host with
//! its own mount and UTS namespaces and a cgroup sized by its instance type, running the cell
//! agent `updraft-cell`. It is what the demo, the tests and single-host or edge users run.
//!
//! # A cell
//! - **Network** ([`net`]): a host bridge (`local.bridge`, default `updraft-cells0`) holds the
//!   first address of `local.cidr` (the cells' gateway). Each cell gets a named netns
//!   `updraft-<id>` and a veth whose host end `uc<hex>` joins the host bridge; inside, the
//!   uplink is enslaved to the cell's bridge [`CELL_BRIDGE`] carrying the **management
//!   address**, where the agent listens (`local.agentPort`, 6421). The **pod address** is the
//!   second address of the cell: the agent puts the pod's veth on [`CELL_BRIDGE`] with it
//!   (see [`LocalBackend::pod_network`]), so the host and every cell and pod share one L2
//!   segment: the host reaches every address, pods reach each other across cells.
//! - **Filesystem** ([`fs`]): the host's, with the bootstrap's files in directories of the
//!   cell's own (private bind mounts or overlays, in the cell's mount namespace only).
//! - **Resources**: the instance type's vCPUs and memory (from the catalog the backend is
//!   given) are the cgroup limits of `<cgroupParent>/<id>`; the init and the agent run in
//!   `<id>/init`, the pods below `<id>/pods` (passed to the agent as
//!   `UPDRAFT_CELL_CGROUP_ROOT`). cgroup v1 and v2 through `updraft-cell-runtime`'s driver.
//! - **Bootstrap** ([`userdata`], [`launch`]): the user data is read as cloud-init reads it
//!   (`#cloud-config`, plain or gzip): `write_files` (text, b64, gzip+base64; permissions,
//!   append), `hostname`, then `runcmd` in order inside the cell. A command whose program is
//!   `updraft-cell` runs `local.agentBinary` in the background; the commands see the
//!   environment `UPDRAFT_CELL_LISTEN=<management ip>:<port>`,
//!   `UPDRAFT_CELL_CGROUP_ROOT=<cgroupParent>/<id>/pods`, `UPDRAFT_CELL_ID`, and
//!   `UPDRAFT_CELL_POD_IP` (the cell's "instance metadata"). Other cloud-init keys (`users`,
//!   `ssh_authorized_keys`, `packages`, …) do nothing locally and are logged.
//! - **Lifetime**: the cell's processes run in their own session, not as our children: they
//!   outlive the `updraft` process, whether it exits or is SIGKILLed.
//!
//! # The backend's records
//! No database: one JSON file per cell under `stateDir/records/` ([`record`]) holds what
//! cannot be observed (identity, type, addresses, launch time, idempotency token, the pid and
//! start time of the init and the agent). States are derived from reality on every call:
//! - `Pending`: being created, or the init runs and has not started the agent yet;
//! - `Running`: the agent process (same pid **and** start time) is alive (for a bootstrap
//!   without an agent: the init is alive);
//! - `Stopped`: the record exists but that process is gone (killed from outside, crashed, the
//!   host rebooted). The cell's namespaces, addresses and files are still held, as a stopped
//!   instance holds its disk: the provider treats it as lost and terminates it. `Stopped` and
//!   not `Terminated`, because only terminate releases the addresses;
//! - `Terminating` / `Terminated`: during / after terminate. A terminated cell's record stays
//!   an hour as a tombstone (terminate stays idempotent, describe answers `Terminated`).
//!
//! Addresses in use are derived from the records (and from a live namespace where a record is
//! unreadable), so a new backend over the same state directory never hands out an address a
//! cell holds. A garbage record makes [`LocalBackend::scan`] report that cell's error; the
//! listing of the others goes on.
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod fs;
pub mod launch;
pub mod net;
pub mod record;
pub mod userdata;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use updraft_cell_runtime::{Cgroup, CgroupDriver, Resources};
use updraft_cells_backend::{
    BackendError, Cell, CellBackend, CellId, CellIdentity, CellSpec, CellState, StartedCell,
};
use updraft_cells_catalog::Catalog;

pub use config::{Ipv4Cidr, LocalConfig};
pub use error::LocalError;
pub use net::{CELL_BRIDGE, POD_HOST_VETH};
pub use record::{CellRecord, Phase, ProcessRef};

use record::IdentityRecord;

use error::io;
use launch::{CellPaths, InitSpec};

/// The tag keys of a cell's identity (the same names as on AWS).
pub mod tags {
    /// The name given at start.
    pub const NAME: &str = "Name";
    /// The owning Updraft's controller id.
    pub const CONTROLLER_ID: &str = "updraft:controller-id";
    /// The virtual node.
    pub const NODE: &str = "updraft:node";
    /// The pod's namespace.
    pub const NAMESPACE: &str = "updraft:namespace";
    /// The pod's name.
    pub const POD: &str = "updraft:pod";
    /// The pod's UID.
    pub const POD_UID: &str = "updraft:pod-uid";
    /// Prefix of the tags copying pod labels.
    pub const LABEL_PREFIX: &str = "updraft:label:";
}

/// How long the init may take to come up (enter its namespaces and write its pid).
const INIT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long terminated cells stay listed for `describe` (as EC2 keeps terminated instances).
const TOMBSTONE_RETENTION: Duration = Duration::from_secs(3600);
/// cgroup v1 controllers cell-runtime creates cgroups in.
const V1_CONTROLLERS: [&str; 4] = ["pids", "memory", "cpu", "cpuacct"];

/// The pod's interface on a cell, for the agent's `PodNetworkConfig.interface`
/// (`updraft_cell_api::PodInterface`): `hostNetns` absent (the agent's own), `bridge`,
/// `hostVeth`, `address`, `prefixLen`, `gateway`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodWiring {
    /// The bridge in the cell's namespace ([`CELL_BRIDGE`]).
    pub bridge: String,
    /// The cell's end of the pod veth ([`POD_HOST_VETH`]).
    pub host_veth: String,
    /// The pod IP.
    pub address: Ipv4Addr,
    /// The CIDR's prefix length.
    pub prefix_len: u8,
    /// The host bridge's address.
    pub gateway: Ipv4Addr,
}

/// Every cell of the state directory, and the records that could not be read.
#[derive(Debug)]
pub struct Scan {
    /// The cells (all controllers, tombstones included).
    pub cells: Vec<Cell>,
    /// `(cell id, error)` of each unreadable record.
    pub broken: Vec<(String, LocalError)>,
}

/// The local backend. Cheap to share; several instances (even processes) over the same
/// state directory coordinate through a lock file.
#[derive(Clone)]
pub struct LocalBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: LocalConfig,
    catalog: Catalog,
    driver: CgroupDriver,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn random_id() -> Result<String, LocalError> {
    let mut bytes = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io("read", "/dev/urandom"))?;
    Ok(format!("cell-{}", hex::encode(bytes)))
}

/// A hostname from the cell's name: `[a-z0-9-]`, at most 63.
fn hostname_from(name: &str, id: &str) -> String {
    let mut host: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    host.truncate(63);
    let host = host.trim_matches('-').to_string();
    if host.is_empty() {
        id.to_string()
    } else {
        host
    }
}

impl LocalBackend {
    /// A backend with `config`, sizing cells from `catalog` (the provider's effective catalog,
    /// e.g. `Catalog::local()`). Checks root, the tools (`ip`, `nsenter`, `unshare`, `setsid`,
    /// `mount`), the agent binary and the cgroup hierarchy, and creates the state directory.
    pub fn new(config: LocalConfig, catalog: Catalog) -> Result<LocalBackend, LocalError> {
        config.validate()?;
        if !nix::unistd::Uid::effective().is_root() {
            return Err(LocalError::NotRoot);
        }
        for (program, package) in [
            ("ip", "iproute2"),
            ("nsenter", "util-linux"),
            ("unshare", "util-linux"),
            ("setsid", "util-linux"),
            ("mount", "mount"),
        ] {
            if !on_path(program) {
                return Err(LocalError::ToolMissing {
                    program: program.into(),
                    package: package.into(),
                });
            }
        }
        if !config.agent_binary.is_file() {
            return Err(LocalError::AgentBinaryMissing {
                path: config.agent_binary.clone(),
            });
        }
        let driver = CgroupDriver::detect()?;
        for dir in [
            config.state_dir.join("records"),
            config.state_dir.join("cells"),
        ] {
            std::fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        }
        Ok(LocalBackend {
            inner: Arc::new(Inner {
                config,
                catalog,
                driver,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LocalConfig {
        &self.inner.config
    }

    /// The pod interface the provider passes to the cell's agent for `cell`.
    pub fn pod_network(&self, cell: &Cell) -> Option<PodWiring> {
        let Some(IpAddr::V4(address)) = cell.pod_ip else {
            return None;
        };
        Some(PodWiring {
            bridge: CELL_BRIDGE.into(),
            host_veth: POD_HOST_VETH.into(),
            address,
            prefix_len: self.inner.config.cidr.prefix_len,
            gateway: self.inner.config.cidr.gateway(),
        })
    }

    /// The cgroup of a cell, relative to the hierarchy root.
    pub fn cgroup_path(&self, id: &CellId) -> PathBuf {
        Path::new(&self.inner.config.cgroup_parent).join(&id.0)
    }

    /// The backend's record of a cell (with the init's and agent's pids).
    pub fn record(&self, id: &CellId) -> Result<CellRecord, LocalError> {
        let inner = &self.inner;
        if !record::valid_id(&id.0) {
            return Err(LocalError::NotFound { id: id.0.clone() });
        }
        let mut found = record::read(&inner.record_path(&id.0), &id.0)?
            .ok_or_else(|| LocalError::NotFound { id: id.0.clone() })?;
        inner.observe(&mut found);
        Ok(found)
    }

    /// What the cell's init and commands printed (like EC2's console output).
    pub fn console_output(&self, id: &CellId) -> Result<String, LocalError> {
        if !record::valid_id(&id.0) {
            return Err(LocalError::NotFound { id: id.0.clone() });
        }
        let path = self.inner.paths(&id.0).console();
        match std::fs::read(&path) {
            Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(LocalError::NotFound { id: id.0.clone() })
            }
            Err(e) => Err(io("read", path)(e)),
        }
    }

    /// Every cell in the state directory with its observed state, and the unreadable records.
    pub fn scan(&self) -> Result<Scan, LocalError> {
        self.inner.scan(Scope::WithTombstones)
    }

    /// Finishes the starts that a process died in the middle of (Updraft killed while a cell
    /// was being created: its record says `Creating`, its starting process is gone). Each such
    /// cell is set up again from scratch and launched under the same id, addresses and
    /// identity, so the restarted provider adopts it as the pod's booting cell instead of
    /// waiting for a cell that never boots. Blocking (the launches run here); returns each
    /// resumed cell with the result (a failed one is removed like a failed start).
    pub fn resume_abandoned_starts(&self) -> Result<ResumedStarts, LocalError> {
        self.inner.resume_abandoned_starts()
    }

    /// Terminates a cell without an async runtime (CLIs, cleanup in `Drop`); the same as
    /// [`CellBackend::terminate`].
    pub fn terminate_blocking(&self, id: &CellId) -> Result<(), LocalError> {
        self.inner.terminate(&id.0)
    }

    /// Deletes the host bridge when no cell (other than terminated ones) is left; true when it
    /// was deleted. The bridge is shared by all cells, so terminate leaves it.
    pub fn remove_bridge_if_unused(&self) -> Result<bool, LocalError> {
        let inner = self.inner.clone();
        let _lock = inner.lock()?;
        let scan = inner.scan(Scope::Live)?;
        let busy =
            scan.cells.iter().any(|c| c.state != CellState::Terminated) || !scan.broken.is_empty();
        if busy {
            return Ok(false);
        }
        net::delete_bridge(&inner.config.bridge)?;
        Ok(true)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, LocalError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|error| BackendError::Transient {
                detail: format!("local backend task failed: {error}"),
            })?
            .map_err(BackendError::from)
    }
}

/// Writes `bytes` to a new file only the owner may read.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), LocalError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create", path))?;
    file.write_all(bytes).map_err(io("write", path))
}

/// Each resumed start's cell with the result of its launch.
pub type ResumedStarts = Vec<(CellId, Result<(), LocalError>)>;

/// `(cell id, error)` of each unreadable record.
type BrokenRecords = Vec<(String, LocalError)>;

/// Which records a scan reads into memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// Every cell not terminated.
    Live,
    /// Also the tombstones of terminated cells (kept [`TOMBSTONE_RETENTION`]).
    WithTombstones,
}

/// Holds the state directory's lock file (flock) while alive.
struct StateLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Inner {
    fn record_path(&self, id: &str) -> PathBuf {
        self.config
            .state_dir
            .join("records")
            .join(format!("{id}.json"))
    }

    fn paths(&self, id: &str) -> CellPaths {
        CellPaths {
            dir: self.config.state_dir.join("cells").join(id),
        }
    }

    fn cgroup_rel(&self, id: &str) -> PathBuf {
        Path::new(&self.config.cgroup_parent).join(id)
    }

    fn lock(&self) -> Result<StateLock, LocalError> {
        let path = self.config.state_dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| io("lock", &path)(std::io::Error::from(errno)))?;
        Ok(StateLock { _lock: lock })
    }

    /// Reads the records of `scope`: good ones and the errors of the unreadable ones. Expired
    /// tombstones are removed on the way.
    fn read_records(&self, scope: Scope) -> Result<(Vec<CellRecord>, BrokenRecords), LocalError> {
        let dir = self.config.state_dir.join("records");
        let mut good = Vec::new();
        let mut broken = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(io("read directory", &dir))?;
        for entry in entries {
            let entry = entry.map_err(io("read directory", &dir))?;
            let file_name = entry.file_name();
            let Some(id) = file_name
                .to_str()
                .and_then(|name| name.strip_suffix(".json"))
            else {
                continue;
            };
            if !record::valid_id(id) {
                continue;
            }
            match record::read(&entry.path(), id) {
                Ok(Some(found)) if found.phase == Phase::Terminated => {
                    let expired = found.terminated_time_ms.is_some_and(|t| {
                        now_ms().saturating_sub(t) > TOMBSTONE_RETENTION.as_millis() as u64
                    });
                    if expired {
                        let _ = std::fs::remove_file(entry.path());
                    } else if scope == Scope::WithTombstones {
                        good.push(found);
                    }
                }
                Ok(Some(found)) => good.push(found),
                Ok(None) => {}
                Err(error) => broken.push((id.to_string(), error)),
            }
        }
        good.sort_by(|a, b| a.id.cmp(&b.id));
        broken.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((good, broken))
    }

    /// The observed state; fills in the agent's process once the init has started it.
    fn observe(&self, found: &mut CellRecord) -> CellState {
        match found.phase {
            Phase::Creating => CellState::Pending,
            Phase::Terminating => CellState::Terminating,
            Phase::Terminated => CellState::Terminated,
            Phase::Launched => {
                let init_alive = found.init.is_some_and(|p| p.alive());
                if !found.starts_agent {
                    return if init_alive {
                        CellState::Running
                    } else {
                        CellState::Stopped
                    };
                }
                if found.agent.is_none()
                    && let Some(pid) = launch::read_pid(&self.paths(&found.id).agent_pid())
                    && launch::in_cgroup(pid, &self.cgroup_rel(&found.id))
                {
                    found.agent = ProcessRef::current(pid);
                }
                match found.agent {
                    Some(agent) if agent.alive() => CellState::Running,
                    Some(_) => CellState::Stopped,
                    None if init_alive && !self.paths(&found.id).agent_pid().exists() => {
                        CellState::Pending
                    }
                    None => CellState::Stopped,
                }
            }
        }
    }

    fn cell(&self, found: &CellRecord, state: CellState) -> Cell {
        let identity = &found.identity;
        let mut tags = BTreeMap::from([
            (tags::NAME.to_string(), found.name.clone()),
            (
                tags::CONTROLLER_ID.to_string(),
                identity.controller_id.clone(),
            ),
            (tags::NODE.to_string(), identity.node.clone()),
            (tags::NAMESPACE.to_string(), identity.namespace.clone()),
            (tags::POD.to_string(), identity.pod_name.clone()),
            (tags::POD_UID.to_string(), identity.pod_uid.clone()),
        ]);
        for (key, value) in &identity.pod_labels {
            tags.insert(format!("{}{key}", tags::LABEL_PREFIX), value.clone());
        }
        Cell {
            id: CellId(found.id.clone()),
            name: found.name.clone(),
            state,
            instance_type: found.instance_type.clone(),
            launch_type: found.launch_type,
            management_ip: Some(IpAddr::V4(found.management_ip)),
            pod_ip: Some(IpAddr::V4(found.pod_ip)),
            public_ip: None,
            launch_time: Some(UNIX_EPOCH + Duration::from_millis(found.launch_time_ms)),
            identity: identity.identity(),
            tags,
        }
    }

    /// Persists an agent process seen for the first time (under the lock, re-reading first so
    /// a concurrent terminate is never overwritten).
    fn remember_agent(&self, id: &str, agent: ProcessRef) -> Result<(), LocalError> {
        let _lock = self.lock()?;
        let path = self.record_path(id);
        if let Some(mut current) = record::read(&path, id)?
            && current.phase == Phase::Launched
            && current.agent.is_none()
        {
            current.agent = Some(agent);
            record::write(&path, &current)?;
        }
        Ok(())
    }

    fn scan(&self, scope: Scope) -> Result<Scan, LocalError> {
        let (records, broken) = self.read_records(scope)?;
        let mut cells = Vec::new();
        for mut found in records {
            let had_agent = found.agent.is_some();
            let state = self.observe(&mut found);
            if !had_agent && let Some(agent) = found.agent {
                self.remember_agent(&found.id, agent)?;
            }
            cells.push(self.cell(&found, state));
        }
        Ok(Scan { cells, broken })
    }

    fn describe(&self, id: &str) -> Result<Cell, LocalError> {
        if !record::valid_id(id) {
            return Err(LocalError::NotFound { id: id.to_string() });
        }
        let mut found = record::read(&self.record_path(id), id)?
            .ok_or_else(|| LocalError::NotFound { id: id.to_string() })?;
        let had_agent = found.agent.is_some();
        let state = self.observe(&mut found);
        if !had_agent && let Some(agent) = found.agent {
            self.remember_agent(id, agent)?;
        }
        Ok(self.cell(&found, state))
    }

    /// Addresses held by cells: from the records, and from the live namespace of a cell whose
    /// record is unreadable.
    fn used_addresses(
        &self,
        records: &[CellRecord],
        broken: &[(String, LocalError)],
    ) -> Result<BTreeSet<Ipv4Addr>, LocalError> {
        let mut used = BTreeSet::new();
        for found in records.iter().filter(|r| r.phase != Phase::Terminated) {
            used.insert(found.management_ip);
            used.insert(found.pod_ip);
        }
        for (id, _) in broken {
            if net::netns_exists(id)
                && let Some(addresses) = net::addresses(Some(&net::netns_name(id)), CELL_BRIDGE)?
            {
                used.extend(addresses.into_iter().map(|(address, _)| address));
            }
        }
        Ok(used)
    }

    /// The cgroup limits of an instance type.
    fn resources(&self, instance_type: &str) -> Result<Resources, LocalError> {
        let instance =
            self.catalog
                .get(instance_type)
                .ok_or_else(|| LocalError::UnknownInstanceType {
                    name: instance_type.to_string(),
                    known: self
                        .catalog
                        .instance_types
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
        Ok(Resources {
            cpu_quota_us: Some(u64::from(instance.vcpus) * 100_000),
            cpu_period_us: Some(100_000),
            memory_limit_bytes: Some(instance.memory_bytes()),
            ..Resources::default()
        })
    }

    /// Where a start keeps the cell's user data until the cell is launched (a resumed start
    /// needs it; it holds the agent's key, so it is the owner's only and removed afterwards).
    fn pending_user_data_path(&self, id: &str) -> PathBuf {
        self.config
            .state_dir
            .join("records")
            .join(format!("{id}.user-data"))
    }

    fn start(&self, spec: &CellSpec) -> Result<StartedCell, LocalError> {
        let config = &self.config;
        let resources = self.resources(&spec.instance_type)?;
        let data = userdata::parse(&spec.user_data)?;
        let plan = fs::plan(&data.files, &config.private_dirs, &config.state_dir)?;
        let starts_agent = data.commands.iter().any(launch::is_agent_command);

        let found = {
            let _lock = self.lock()?;
            // Tombstones too: a repeated token names its cell even once it has ended.
            let (records, broken) = self.read_records(Scope::WithTombstones)?;
            if let Some(existing) = records
                .iter()
                .find(|r| r.idempotency_token == spec.idempotency_token)
            {
                return Ok(StartedCell {
                    id: CellId(existing.id.clone()),
                    launch_type: existing.launch_type,
                });
            }
            let used = self.used_addresses(&records, &broken)?;
            let mut free = config.cidr.cell_addresses().filter(|a| !used.contains(a));
            let (Some(management_ip), Some(pod_ip)) = (free.next(), free.next()) else {
                return Err(LocalError::CidrExhausted {
                    cidr: config.cidr.to_string(),
                    in_use: used.len(),
                });
            };
            let mut id = random_id()?;
            while self.record_path(&id).exists() || self.paths(&id).dir.exists() {
                id = random_id()?;
            }
            let created = CellRecord {
                version: record::RECORD_VERSION,
                id,
                name: spec.name.clone(),
                instance_type: spec.instance_type.clone(),
                launch_type: spec.launch_type,
                idempotency_token: spec.idempotency_token.clone(),
                identity: (&spec.identity).into(),
                management_ip,
                pod_ip,
                launch_time_ms: now_ms(),
                phase: Phase::Creating,
                init: None,
                agent: None,
                starts_agent,
                terminated_time_ms: None,
                creator: ProcessRef::current(std::process::id() as i32),
            };
            write_private(&self.pending_user_data_path(&created.id), &spec.user_data)?;
            record::write(&self.record_path(&created.id), &created)?;
            created
        };
        if !data.ignored_keys.is_empty() {
            tracing::info!(cell = %found.id, keys = ?data.ignored_keys, "cloud-init keys without effect on local cells");
        }
        self.launch_recorded(found, &data, &plan, &resources)
    }

    /// Launches the cell of a `Creating` record and records it `Launched`; on failure, removes
    /// what the start created (the cell is gone, as a failed EC2 launch).
    fn launch_recorded(
        &self,
        mut found: CellRecord,
        data: &userdata::CellUserData,
        plan: &fs::FsPlan,
        resources: &Resources,
    ) -> Result<StartedCell, LocalError> {
        let result = self.launch(&found, data, plan, resources);
        let _ = std::fs::remove_file(self.pending_user_data_path(&found.id));
        match result {
            Ok(init) => {
                let _lock = self.lock()?;
                found.phase = Phase::Launched;
                found.init = Some(init);
                found.creator = None;
                record::write(&self.record_path(&found.id), &found)?;
                tracing::info!(cell = %found.id, management_ip = %found.management_ip, pod_ip = %found.pod_ip, "local cell launched");
                Ok(StartedCell {
                    id: CellId(found.id.clone()),
                    launch_type: found.launch_type,
                })
            }
            Err(error) => {
                if let Err(cleanup) = self.destroy(&found.id) {
                    tracing::warn!(cell = %found.id, error = %cleanup, "cleaning up a failed start");
                }
                let _ = std::fs::remove_file(self.record_path(&found.id));
                Err(error)
            }
        }
    }

    /// Finishes the starts whose process died before the cell was launched (records still
    /// `Creating` whose creator is gone): the partial setup is removed and the cell launched
    /// again under the same id, addresses and identity. Returns each resumed cell with the
    /// result; a start that cannot be resumed (its user data is gone) is removed like a failed
    /// start.
    fn resume_abandoned_starts(&self) -> Result<ResumedStarts, LocalError> {
        let (records, _) = self.read_records(Scope::Live)?;
        let mut resumed = Vec::new();
        for candidate in records {
            let abandoned = |r: &CellRecord| {
                r.phase == Phase::Creating && r.creator.is_some_and(|c| !c.alive())
            };
            if !abandoned(&candidate) {
                continue;
            }
            let id = candidate.id.clone();
            // Take the start over under the lock: of two resumers only one finds it abandoned.
            let taken = {
                let _lock = self.lock()?;
                match record::read(&self.record_path(&id), &id)? {
                    Some(mut current) if abandoned(&current) => {
                        current.creator = ProcessRef::current(std::process::id() as i32);
                        record::write(&self.record_path(&id), &current)?;
                        Some(current)
                    }
                    _ => None,
                }
            };
            let Some(found) = taken else { continue };
            tracing::info!(cell = %id, "resuming a start whose process died before the cell was launched");
            let result = self.resume(found);
            if let Err(error) = &result {
                tracing::warn!(cell = %id, %error, "resuming an abandoned start failed: the cell is removed");
            }
            resumed.push((CellId(id), result));
        }
        Ok(resumed)
    }

    fn resume(&self, found: CellRecord) -> Result<(), LocalError> {
        let id = found.id.clone();
        let prepared = std::fs::read(self.pending_user_data_path(&id))
            .map_err(io("read", self.pending_user_data_path(&id)))
            .and_then(|bytes| {
                let data = userdata::parse(&bytes)?;
                let plan = fs::plan(
                    &data.files,
                    &self.config.private_dirs,
                    &self.config.state_dir,
                )?;
                let resources = self.resources(&found.instance_type)?;
                Ok((data, plan, resources))
            });
        // Whatever the dead start had set up goes first (it may be half-made).
        let cleaned = self.destroy(&id);
        let (data, plan, resources) = match prepared.and_then(|p| cleaned.map(|()| p)) {
            Ok(prepared) => prepared,
            Err(error) => {
                let _ = self.destroy(&id);
                let _ = std::fs::remove_file(self.pending_user_data_path(&id));
                let _ = std::fs::remove_file(self.record_path(&id));
                return Err(error);
            }
        };
        self.launch_recorded(found, &data, &plan, &resources)
            .map(|_| ())
    }

    fn launch(
        &self,
        found: &CellRecord,
        data: &userdata::CellUserData,
        plan: &fs::FsPlan,
        resources: &Resources,
    ) -> Result<ProcessRef, LocalError> {
        let config = &self.config;
        let paths = self.paths(&found.id);
        std::fs::create_dir_all(&paths.dir).map_err(io("create directory", &paths.dir))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&paths.dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io("chmod", &paths.dir))?;
        }
        fs::populate(plan, &data.files, &paths.root(), &paths.work())?;
        {
            // Once for all cells, under the state lock: concurrent first starts (threads or
            // processes) would otherwise race to create the bridge and add its address.
            let _lock = self.lock()?;
            net::ensure_bridge(&config.bridge, config.cidr)?;
        }
        net::create_cell_network(
            &found.id,
            &config.bridge,
            config.cidr,
            [found.management_ip, found.pod_ip],
        )?;
        let rel = self.cgroup_rel(&found.id);
        let mut cell_cgroup = Cgroup::create(&self.driver, &rel)?;
        cell_cgroup.keep();
        cell_cgroup.apply(resources)?;
        let mut init_cgroup = cell_cgroup.child("init")?;
        init_cgroup.keep();
        let mut pods_cgroup = cell_cgroup.child("pods")?;
        pods_cgroup.keep();
        let env = vec![
            (
                "UPDRAFT_CELL_LISTEN".to_string(),
                format!("{}:{}", found.management_ip, config.agent_port),
            ),
            (
                "UPDRAFT_CELL_CGROUP_ROOT".to_string(),
                pods_cgroup.rel().display().to_string(),
            ),
            ("UPDRAFT_CELL_ID".to_string(), found.id.clone()),
            ("UPDRAFT_CELL_POD_IP".to_string(), found.pod_ip.to_string()),
        ];
        let hostname = data
            .hostname
            .clone()
            .unwrap_or_else(|| hostname_from(&found.name, &found.id));
        let procs = init_cgroup.procs_files();
        let spec = InitSpec {
            paths: &paths,
            plan,
            hostname: &hostname,
            cgroup_procs: &procs,
            commands: &data.commands,
            agent_binary: &config.agent_binary,
            env: &env,
        };
        launch::start_init(&found.id, &spec, &rel, INIT_TIMEOUT)
    }

    /// Relative paths of the cgroups below (and including) `rel`, deepest first.
    fn cgroup_tree(&self, rel: &Path) -> Vec<PathBuf> {
        let bases: Vec<PathBuf> = match &self.driver {
            CgroupDriver::V1 { root } => V1_CONTROLLERS.iter().map(|c| root.join(c)).collect(),
            CgroupDriver::V2 { root } => vec![root.clone()],
        };
        let mut found = BTreeSet::new();
        for base in bases {
            let mut stack = vec![rel.to_path_buf()];
            while let Some(current) = stack.pop() {
                let dir = base.join(&current);
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                found.insert(current.clone());
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(current.join(entry.file_name()));
                    }
                }
            }
        }
        let mut tree: Vec<PathBuf> = found.into_iter().collect();
        tree.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        tree
    }

    /// Stops every process of the cell and removes its network, cgroups and files. What is
    /// already gone is skipped, so this can be repeated.
    fn destroy(&self, id: &str) -> Result<(), LocalError> {
        let rel = self.cgroup_rel(id);
        // The init and agent first, so nothing starts new pod processes meanwhile.
        let init = rel.join("init");
        let tree = self.cgroup_tree(&rel);
        let mut first_error: Option<LocalError> = None;
        for cgroup in tree
            .iter()
            .filter(|c| **c == init)
            .chain(tree.iter().filter(|c| **c != init))
        {
            let mut handle = Cgroup::create(&self.driver, cgroup)?;
            handle.keep();
            if let Err(error) = handle.kill_all(Duration::from_secs(10)) {
                first_error.get_or_insert(error.into());
            }
        }
        if let Err(error) = net::delete_cell_network(id) {
            first_error.get_or_insert(error);
        }
        for cgroup in &tree {
            let mut handle = Cgroup::create(&self.driver, cgroup)?;
            if let Err(error) = handle.remove() {
                first_error.get_or_insert(error.into());
            }
        }
        let dir = self.paths(id).dir;
        if let Err(error) = std::fs::remove_dir_all(&dir)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            first_error.get_or_insert(io("remove", &dir)(error));
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Stamps a pod's identity on a standby cell, under the state lock: of two claims of one
    /// cell only the first finds it standby.
    fn assign(&self, id: &str, name: &str, identity: &CellIdentity) -> Result<(), LocalError> {
        if !record::valid_id(id) {
            return Err(LocalError::NotFound { id: id.to_string() });
        }
        let path = self.record_path(id);
        let _lock = self.lock()?;
        let mut found =
            record::read(&path, id)?.ok_or_else(|| LocalError::NotFound { id: id.to_string() })?;
        let current = found.identity.identity();
        let not_standby = |now: String| LocalError::NotStandby {
            id: id.to_string(),
            controller_id: identity.controller_id.clone(),
            now,
        };
        if found.phase == Phase::Terminating || found.phase == Phase::Terminated {
            return Err(not_standby("it is terminated".into()));
        }
        // The start in progress writes its own copy of the record when the cell is launched:
        // a claim before that would be overwritten.
        if found.phase != Phase::Launched {
            return Err(not_standby("it is still starting".into()));
        }
        match current {
            Some(current) if current.controller_id != identity.controller_id => Err(not_standby(
                format!("it belongs to controller {}", current.controller_id),
            )),
            Some(current) if current.is_standby() => {
                found.identity = IdentityRecord::from(identity);
                found.name = name.to_string();
                record::write(&path, &found)?;
                Ok(())
            }
            Some(current) if current.pod_uid == identity.pod_uid => Ok(()),
            Some(current) => Err(not_standby(format!(
                "it runs pod {}/{}",
                current.namespace, current.pod_name
            ))),
            None => Err(not_standby("it has no complete identity".into())),
        }
    }

    fn terminate(&self, id: &str) -> Result<(), LocalError> {
        if !record::valid_id(id) {
            return Err(LocalError::NotFound { id: id.to_string() });
        }
        let path = self.record_path(id);
        let existing = {
            let _lock = self.lock()?;
            match record::read(&path, id) {
                Ok(None) => return Err(LocalError::NotFound { id: id.to_string() }),
                Ok(Some(found)) if found.phase == Phase::Terminated => return Ok(()),
                Ok(Some(mut found)) => {
                    found.phase = Phase::Terminating;
                    record::write(&path, &found)?;
                    Some(found)
                }
                // An unreadable record still names the cell: clean up what it holds.
                Err(error) => {
                    tracing::warn!(cell = id, %error, "terminating a cell with an unreadable record");
                    None
                }
            }
        };
        self.destroy(id)?;
        let _ = std::fs::remove_file(self.pending_user_data_path(id));
        let _lock = self.lock()?;
        match existing {
            Some(mut found) => {
                found.phase = Phase::Terminated;
                found.terminated_time_ms = Some(now_ms());
                record::write(&path, &found)?;
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
        tracing::info!(cell = id, "local cell terminated");
        Ok(())
    }
}

#[async_trait::async_trait]
impl CellBackend for LocalBackend {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn start(&self, spec: &CellSpec) -> Result<StartedCell, BackendError> {
        let spec = spec.clone();
        self.blocking(move |inner| inner.start(&spec)).await
    }

    async fn describe(&self, id: &CellId) -> Result<Cell, BackendError> {
        let id = id.0.clone();
        self.blocking(move |inner| inner.describe(&id)).await
    }

    async fn list(&self, controller_id: &str) -> Result<Vec<Cell>, BackendError> {
        let controller_id = controller_id.to_string();
        self.blocking(move |inner| {
            // Not the tombstones: the provider lists on every pod start, and an hour of
            // terminated cells would be read into memory by each of a burst's starts at once.
            let scan = inner.scan(Scope::Live)?;
            for (id, error) in &scan.broken {
                tracing::warn!(cell = %id, %error, "skipping a cell with an unreadable record");
            }
            Ok(scan
                .cells
                .into_iter()
                .filter(|cell| cell.state != CellState::Terminated)
                .filter(|cell| {
                    cell.tags.get(tags::CONTROLLER_ID).map(String::as_str)
                        == Some(controller_id.as_str())
                })
                .collect())
        })
        .await
    }

    async fn terminate(&self, id: &CellId) -> Result<(), BackendError> {
        let id = id.0.clone();
        self.blocking(move |inner| inner.terminate(&id)).await
    }

    async fn assign(
        &self,
        id: &CellId,
        name: &str,
        identity: &CellIdentity,
    ) -> Result<(), BackendError> {
        let (id, name, identity) = (id.0.clone(), name.to_string(), identity.clone());
        self.blocking(move |inner| inner.assign(&id, &name, &identity))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_come_from_names() {
        assert_eq!(
            hostname_from("burst-default-Web_1", "cell-1"),
            "burst-default-web-1"
        );
        assert_eq!(hostname_from("---", "cell-00000001"), "cell-00000001");
        assert_eq!(hostname_from(&"a".repeat(80), "x").len(), 63);
    }

    /// Records in a temporary state directory, read without root (no cell is started).
    fn state_with(records: &[(&str, Phase, Option<u64>)]) -> (tempfile::TempDir, Inner) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LocalConfig {
            state_dir: dir.path().to_path_buf(),
            ..LocalConfig::default()
        };
        std::fs::create_dir_all(dir.path().join("records")).expect("records dir");
        let inner = Inner {
            config,
            catalog: Catalog::local().expect("catalog"),
            driver: CgroupDriver::V2 {
                root: dir.path().join("cgroup"),
            },
        };
        for (index, (id, phase, terminated_time_ms)) in records.iter().enumerate() {
            let address = Ipv4Addr::new(10, 0, 0, 2 + 2 * index as u8);
            let found = CellRecord {
                version: record::RECORD_VERSION,
                id: (*id).to_string(),
                name: format!("pod-{index}"),
                instance_type: "local.nano".into(),
                launch_type: updraft_cells_backend::LaunchType::OnDemand,
                idempotency_token: format!("token-{index}"),
                identity: IdentityRecord {
                    controller_id: "ctl".into(),
                    ..IdentityRecord::default()
                },
                management_ip: address,
                pod_ip: Ipv4Addr::from(u32::from(address) + 1),
                launch_time_ms: now_ms(),
                phase: *phase,
                init: None,
                agent: None,
                starts_agent: true,
                terminated_time_ms: *terminated_time_ms,
                creator: None,
            };
            record::write(&inner.record_path(id), &found).expect("write record");
        }
        (dir, inner)
    }

    #[test]
    fn a_listing_holds_no_tombstone_and_expired_ones_are_removed() {
        let expired = now_ms() - TOMBSTONE_RETENTION.as_millis() as u64 - 1000;
        let (_dir, inner) = state_with(&[
            ("cell-0000000a", Phase::Launched, None),
            ("cell-0000000b", Phase::Terminated, Some(now_ms())),
            ("cell-0000000c", Phase::Terminated, Some(expired)),
        ]);
        let ids = |scope| -> Vec<String> {
            let scan = inner.scan(scope).expect("scan");
            scan.cells.into_iter().map(|cell| cell.id.0).collect()
        };
        // What the provider lists on every pod start holds no tombstone.
        assert_eq!(ids(Scope::Live), ["cell-0000000a"]);
        assert!(!inner.record_path("cell-0000000c").exists(), "expired");
        // The tombstone stays for describe, terminate and a repeated start's token.
        assert_eq!(
            ids(Scope::WithTombstones),
            ["cell-0000000a", "cell-0000000b"]
        );
        assert_eq!(
            inner.describe("cell-0000000b").expect("describe").state,
            CellState::Terminated
        );
    }

    #[test]
    fn errors_map_to_backend_kinds() {
        let exhausted: BackendError = LocalError::CidrExhausted {
            cidr: "10.0.0.0/29".into(),
            in_use: 5,
        }
        .into();
        assert!(matches!(exhausted, BackendError::Capacity { .. }));
        assert!(exhausted.to_string().contains("CIDR 10.0.0.0/29 exhausted"));
        let missing: BackendError = LocalError::AgentBinaryMissing {
            path: "/nope/updraft-cell".into(),
        }
        .into();
        assert!(
            missing
                .to_string()
                .contains("updraft-cell binary not found at /nope/updraft-cell")
        );
        assert!(matches!(
            BackendError::from(LocalError::NotFound { id: "cell-x".into() }),
            BackendError::NotFound { id } if id == "cell-x"
        ));
        assert!(
            BackendError::from(LocalError::NotRoot)
                .to_string()
                .contains("not authorized: local cells need root")
        );
    }
}
