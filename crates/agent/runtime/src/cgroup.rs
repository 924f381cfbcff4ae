//! One small abstraction over cgroup v1 (one hierarchy per controller) and v2 (unified).
//!
//! The driver is chosen by [`CgroupDriver::detect`] from the mounts under `/sys/fs/cgroup`;
//! a [`Cgroup`] is a relative path (e.g. `updraft/pod-a/app`) that exists under every
//! controller the runtime uses.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{Error, Result, io};

/// v1 controllers the runtime creates a directory in; the first one that has `cgroup.procs`
/// membership is authoritative for "which processes are in this cgroup".
const V1_CONTROLLERS: [&str; 4] = ["pids", "memory", "cpu", "cpuacct"];

/// Which cgroup layout is in use, and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupDriver {
    /// Legacy hierarchies: `root/<controller>/...` (e.g. `/sys/fs/cgroup/memory`).
    V1 {
        /// Directory holding the per-controller mounts.
        root: PathBuf,
    },
    /// The unified hierarchy mounted at `root`.
    V2 {
        /// The cgroup2 mount point.
        root: PathBuf,
    },
}

impl CgroupDriver {
    /// Detects the layout of `/sys/fs/cgroup`: cgroup2 mounted there → v2; otherwise v1 when the
    /// `memory`, `cpu` and `pids` controllers are mounted (hybrid hosts use v1 for limits).
    pub fn detect() -> Result<Self> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(io("read", "/proc/self/mountinfo"))?;
        Self::from_mountinfo(&mountinfo, Path::new("/sys/fs/cgroup"))
    }

    /// Chooses the driver from the text of a `mountinfo` file, for the hierarchy at `root`.
    pub fn from_mountinfo(mountinfo: &str, root: &Path) -> Result<Self> {
        let mut v1 = Vec::new();
        for line in mountinfo.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(sep) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            let (Some(mount_point), Some(fstype), Some(options)) =
                (fields.get(4), fields.get(sep + 1), fields.get(sep + 3))
            else {
                continue;
            };
            let mount_point = Path::new(mount_point);
            if *fstype == "cgroup2" && mount_point == root {
                return Ok(Self::V2 {
                    root: root.to_path_buf(),
                });
            }
            if *fstype == "cgroup" && mount_point.parent() == Some(root) {
                v1.extend(options.split(',').map(str::to_owned));
            }
        }
        let missing: Vec<&str> = ["memory", "cpu", "pids"]
            .into_iter()
            .filter(|c| !v1.iter().any(|o| o == c))
            .collect();
        if missing.is_empty() {
            Ok(Self::V1 {
                root: root.to_path_buf(),
            })
        } else {
            Err(Error::NoCgroups(format!(
                "{} is not cgroup2 and lacks v1 controllers {missing:?}",
                root.display()
            )))
        }
    }

    fn dirs(&self, rel: &Path) -> Vec<PathBuf> {
        match self {
            Self::V1 { root } => V1_CONTROLLERS
                .iter()
                .map(|c| root.join(c).join(rel))
                .collect(),
            Self::V2 { root } => vec![root.join(rel)],
        }
    }
}

/// Resource limits for a cgroup; `None` leaves the kernel default (unlimited).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// CPU quota in microseconds per `cpu_period_us` (a limit of 0.5 CPU = 50_000 / 100_000).
    pub cpu_quota_us: Option<u64>,
    /// CFS period in microseconds; 100_000 when `None` and a quota is set.
    pub cpu_period_us: Option<u64>,
    /// Relative CPU weight in v1 `cpu.shares` units (2..=262144); converted for v2.
    pub cpu_shares: Option<u64>,
    /// Memory limit in bytes (swap is disabled for the cgroup when set).
    pub memory_limit_bytes: Option<u64>,
    /// Maximum number of tasks.
    pub pids_max: Option<u64>,
}

/// Usage read from a cgroup's files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// Cumulative CPU time in nanoseconds.
    pub cpu_usage_ns: u64,
    /// Memory usage in bytes (including page cache).
    pub memory_usage_bytes: u64,
    /// Usage minus inactive file cache: what the kubelet reports as working set.
    pub memory_working_set_bytes: u64,
    /// Anonymous (RSS) memory in bytes.
    pub memory_rss_bytes: u64,
    /// Number of tasks in the cgroup.
    pub pids: u64,
    /// CFS periods in which the cgroup was throttled by its CPU limit.
    pub cpu_throttled_periods: u64,
}

/// A cgroup at the same relative path under every controller of a driver. Removed on drop
/// (after killing whatever is left in it) unless [`Cgroup::remove`] already ran.
#[derive(Debug)]
pub struct Cgroup {
    driver: CgroupDriver,
    rel: PathBuf,
    removed: bool,
}

fn write_file(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(io("write", path))
}

fn read_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(io("read", path))
}

/// Value of `key` in a flat keyed file such as `memory.stat` or `memory.events`.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key))
            .then(|| it.next().and_then(|v| v.parse().ok()))
            .flatten()
    })
}

/// v1 `cpu.shares` (2..=262144, default 1024) to v2 `cpu.weight` (1..=10000, default 100),
/// the conversion the Kubernetes ecosystem uses.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

impl Cgroup {
    /// Creates (or adopts) the cgroup `rel` under every controller; for v2, enables the cpu,
    /// memory and pids controllers in each ancestor's `cgroup.subtree_control`.
    pub fn create(driver: &CgroupDriver, rel: impl Into<PathBuf>) -> Result<Self> {
        let rel = rel.into();
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(Error::InvalidSpec(format!(
                "cgroup path {} must be relative, without ..",
                rel.display()
            )));
        }
        if let CgroupDriver::V2 { root } = driver {
            let mut dir = root.clone();
            for component in rel.components() {
                write_file(&dir.join("cgroup.subtree_control"), "+cpu +memory +pids")?;
                dir.push(component);
                std::fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
            }
        } else {
            for dir in driver.dirs(&rel) {
                std::fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
            }
        }
        Ok(Self {
            driver: driver.clone(),
            rel,
            removed: false,
        })
    }

    /// Dropping this handle leaves the cgroup (and its processes) in place.
    pub fn keep(&mut self) {
        self.removed = true;
    }

    /// The path relative to the hierarchy root.
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    /// A child cgroup below this one.
    pub fn child(&self, name: &str) -> Result<Self> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(Error::InvalidSpec(format!(
                "cgroup name {name:?} must be one path component"
            )));
        }
        Self::create(&self.driver, self.rel.join(name))
    }

    fn dir(&self, controller: &str) -> PathBuf {
        match &self.driver {
            CgroupDriver::V1 { root } => root.join(controller).join(&self.rel),
            CgroupDriver::V2 { root } => root.join(&self.rel),
        }
    }

    /// Writes the limits into the controller files.
    pub fn apply(&self, r: &Resources) -> Result<()> {
        match &self.driver {
            CgroupDriver::V1 { .. } => {
                let cpu = self.dir("cpu");
                if let Some(quota) = r.cpu_quota_us {
                    write_file(
                        &cpu.join("cpu.cfs_period_us"),
                        &r.cpu_period_us.unwrap_or(100_000).to_string(),
                    )?;
                    write_file(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                if let Some(shares) = r.cpu_shares {
                    write_file(
                        &cpu.join("cpu.shares"),
                        &shares.clamp(2, 262_144).to_string(),
                    )?;
                }
                if let Some(limit) = r.memory_limit_bytes {
                    let mem = self.dir("memory");
                    write_file(&mem.join("memory.limit_in_bytes"), &limit.to_string())?;
                    // Without memsw (no swap accounting) the limit alone already caps usage.
                    let memsw = mem.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write_file(&memsw, &limit.to_string())?;
                    }
                }
                if let Some(max) = r.pids_max {
                    write_file(&self.dir("pids").join("pids.max"), &max.to_string())?;
                }
            }
            CgroupDriver::V2 { .. } => {
                let dir = self.dir("");
                if let Some(quota) = r.cpu_quota_us {
                    let period = r.cpu_period_us.unwrap_or(100_000);
                    write_file(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
                }
                if let Some(shares) = r.cpu_shares {
                    write_file(
                        &dir.join("cpu.weight"),
                        &shares_to_weight(shares).to_string(),
                    )?;
                }
                if let Some(limit) = r.memory_limit_bytes {
                    write_file(&dir.join("memory.max"), &limit.to_string())?;
                    write_file(&dir.join("memory.swap.max"), "0")?;
                }
                if let Some(max) = r.pids_max {
                    write_file(&dir.join("pids.max"), &max.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Moves process `pid` (host PID) into this cgroup under every controller.
    pub fn add(&self, pid: Pid) -> Result<()> {
        for dir in self.driver.dirs(&self.rel) {
            write_file(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The `cgroup.procs` files of this cgroup under every controller (writing a PID moves it).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.driver
            .dirs(&self.rel)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// Host PIDs of the processes in this cgroup (not its children).
    pub fn procs(&self) -> Result<Vec<Pid>> {
        let path = self.dir("pids").join("cgroup.procs");
        Ok(read_file(&path)?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .map(Pid::from_raw)
            .collect())
    }

    /// How many times the kernel OOM killer killed a process in this cgroup.
    pub fn oom_kills(&self) -> Result<u64> {
        let (file, key) = match self.driver {
            CgroupDriver::V1 { .. } => (self.dir("memory").join("memory.oom_control"), "oom_kill"),
            CgroupDriver::V2 { .. } => (self.dir("").join("memory.events"), "oom_kill"),
        };
        Ok(keyed(&read_file(&file)?, key).unwrap_or(0))
    }

    /// Reads CPU, memory and pids usage (v1 and v2 file names differ).
    pub fn stats(&self) -> Result<CgroupStats> {
        let num = |p: PathBuf| -> Result<u64> { Ok(read_file(&p)?.trim().parse().unwrap_or(0)) };
        match self.driver {
            CgroupDriver::V1 { .. } => {
                let mem = self.dir("memory");
                let stat = read_file(&mem.join("memory.stat"))?;
                let usage = num(mem.join("memory.usage_in_bytes"))?;
                let inactive = keyed(&stat, "total_inactive_file").unwrap_or(0);
                Ok(CgroupStats {
                    cpu_usage_ns: num(self.dir("cpuacct").join("cpuacct.usage"))?,
                    memory_usage_bytes: usage,
                    memory_working_set_bytes: usage.saturating_sub(inactive),
                    memory_rss_bytes: keyed(&stat, "total_rss").unwrap_or(0),
                    pids: num(self.dir("pids").join("pids.current"))?,
                    cpu_throttled_periods: read_file(&self.dir("cpu").join("cpu.stat"))
                        .ok()
                        .and_then(|t| keyed(&t, "nr_throttled"))
                        .unwrap_or(0),
                })
            }
            CgroupDriver::V2 { .. } => {
                let dir = self.dir("");
                let stat = read_file(&dir.join("memory.stat"))?;
                let cpu = read_file(&dir.join("cpu.stat"))?;
                let usage = num(dir.join("memory.current"))?;
                let inactive = keyed(&stat, "inactive_file").unwrap_or(0);
                Ok(CgroupStats {
                    cpu_usage_ns: keyed(&cpu, "usage_usec").unwrap_or(0).saturating_mul(1000),
                    memory_usage_bytes: usage,
                    memory_working_set_bytes: usage.saturating_sub(inactive),
                    memory_rss_bytes: keyed(&stat, "anon").unwrap_or(0),
                    pids: num(dir.join("pids.current"))?,
                    cpu_throttled_periods: keyed(&cpu, "nr_throttled").unwrap_or(0),
                })
            }
        }
    }

    /// SIGKILLs every process in the cgroup until it is empty (bounded by `deadline`).
    /// Uses `cgroup.kill` where the kernel has it; otherwise kills the listed PIDs repeatedly,
    /// which also catches processes forked while the list was read.
    pub fn kill_all(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let kill_file = self.dir("").join("cgroup.kill");
        if matches!(self.driver, CgroupDriver::V2 { .. }) && kill_file.exists() {
            write_file(&kill_file, "1")?;
        }
        loop {
            let procs = self.procs()?;
            if procs.is_empty() {
                return Ok(());
            }
            for pid in procs {
                // ESRCH: it exited between reading the list and now.
                let _ = kill(pid, Signal::SIGKILL);
            }
            if Instant::now() >= deadline {
                return Err(Error::CgroupBusy(self.rel.clone()));
            }
            // Killed processes leave cgroup.procs once reaped by their parent; there is no
            // notification for that on v1, so re-check at a short interval until the deadline.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills what is left and removes the directories (children first is the caller's job).
    pub fn remove(&mut self) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        self.kill_all(Duration::from_secs(5))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        for dir in self.driver.dirs(&self.rel) {
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    // EBUSY while the last killed task is still being torn down.
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(io("remove directory", &dir)(e)),
                }
            }
        }
        self.removed = true;
        Ok(())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            tracing::warn!(cgroup = %self.rel.display(), error = %e, "cgroup cleanup failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_v2_and_hybrid_v1() {
        let v2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            CgroupDriver::from_mountinfo(v2, Path::new("/sys/fs/cgroup")).ok(),
            Some(CgroupDriver::V2 {
                root: "/sys/fs/cgroup".into()
            })
        );
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
            32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
            33 31 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
            34 31 0:31 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n\
            35 31 0:32 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            CgroupDriver::from_mountinfo(hybrid, Path::new("/sys/fs/cgroup")).ok(),
            Some(CgroupDriver::V1 {
                root: "/sys/fs/cgroup".into()
            })
        );
        let none = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n";
        let err = CgroupDriver::from_mountinfo(none, Path::new("/sys/fs/cgroup"))
            .err()
            .map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("memory")));
    }

    #[test]
    fn v2_writes_limits_and_enables_controllers_in_a_fake_cgroupfs() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(io("tempdir", "/tmp"))?;
        let driver = CgroupDriver::V2 {
            root: tmp.path().to_path_buf(),
        };
        let mut cg = Cgroup::create(&driver, "updraft/pod-a")?;
        std::fs::write(tmp.path().join("updraft/pod-a/cgroup.procs"), "")
            .map_err(io("write", "procs"))?;
        cg.apply(&Resources {
            cpu_quota_us: Some(50_000),
            cpu_period_us: None,
            cpu_shares: Some(1024),
            memory_limit_bytes: Some(64 << 20),
            pids_max: Some(32),
        })?;
        let read = |p: &str| std::fs::read_to_string(tmp.path().join(p)).unwrap_or_default();
        assert_eq!(read("cgroup.subtree_control"), "+cpu +memory +pids");
        assert_eq!(read("updraft/cgroup.subtree_control"), "+cpu +memory +pids");
        assert_eq!(read("updraft/pod-a/cpu.max"), "50000 100000");
        assert_eq!(read("updraft/pod-a/cpu.weight"), "39");
        assert_eq!(read("updraft/pod-a/memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("updraft/pod-a/memory.swap.max"), "0");
        assert_eq!(read("updraft/pod-a/pids.max"), "32");

        std::fs::write(
            tmp.path().join("updraft/pod-a/memory.events"),
            "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
        )
        .map_err(io("write", "events"))?;
        assert_eq!(cg.oom_kills()?, 1);
        for (f, v) in [
            ("cpu.stat", "usage_usec 1500\nuser_usec 1000\n"),
            ("memory.current", "1000000\n"),
            (
                "memory.stat",
                "anon 600000\nfile 400000\ninactive_file 300000\n",
            ),
            ("pids.current", "3\n"),
        ] {
            std::fs::write(tmp.path().join("updraft/pod-a").join(f), v).map_err(io("write", f))?;
        }
        assert_eq!(
            cg.stats()?,
            CgroupStats {
                cpu_usage_ns: 1_500_000,
                memory_usage_bytes: 1_000_000,
                memory_working_set_bytes: 700_000,
                memory_rss_bytes: 600_000,
                pids: 3,
                cpu_throttled_periods: 0,
            }
        );
        // The fake directory holds regular files, so removal is not attempted on it.
        cg.removed = true;
        Ok(())
    }

    #[test]
    fn rejects_escaping_paths() {
        let driver = CgroupDriver::V2 {
            root: "/nonexistent".into(),
        };
        assert!(matches!(
            Cgroup::create(&driver, "../x"),
            Err(Error::InvalidSpec(_))
        ));
        assert!(matches!(
            Cgroup::create(&driver, "/abs"),
            Err(Error::InvalidSpec(_))
        ));
    }

    #[test]
    fn shares_convert_to_weights() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1024), 39);
    }
}
