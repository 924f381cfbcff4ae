//! The cell's [`ContainerRuntime`]: instances are `updraft-cell-runtime` containers in the
//! pod's sandbox, root filesystems come from the agent's [`ImageSource`], output goes to the
//! container logs, and every running instance is recorded for a later agent
//! ([`crate::record`]).
//!
//! Per container this owns the files under the pod directory: `fifo/<name>.{in,out,err}` (the
//! stdio FIFOs; one pump per output FIFO reads it into the log for the pod's whole life, across
//! restarts), `termination/<name>` (the termination message file, bound into the container)
//! and `containers/<name>.json` (the record of the running instance).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container as K8sContainer, Probe};
use nix::sys::signal::Signal;
use tokio_util::task::TaskTracker;
use updraft_cell_api::ApplyPodRequest;
use updraft_cell_runtime::{
    BindMount, Container, ContainerExit, ContainerSpec, PodSandbox, StdioMode,
};

use crate::images::{ImageSource, PreparedImage};
use crate::lifecycle::Stops;
use crate::logs::{ContainerLog, LogStream};
use crate::record::{InstanceRecord, start_ticks, write_json};
use crate::runtime::{ContainerRuntime, Instance, ProbeTarget, StartFailure, Started};
use crate::status::Terminated;
use crate::{probe, spec};

/// Runs a pod's container instances in its sandbox.
pub struct CellRuntime {
    sandbox: PodSandbox,
    request: Arc<ApplyPodRequest>,
    dir: PathBuf,
    images: Arc<dyn ImageSource>,
    logs: BTreeMap<String, Arc<ContainerLog>>,
    /// The FIFO pumps; they end with the pod (deleted or detached).
    pumps: TaskTracker,
    /// Per output FIFO (`<container>.out`, `.err`): whether its pump runs.
    pumped: BTreeMap<String, AtomicBool>,
    stops: Stops,
}

impl CellRuntime {
    /// The runtime of the pod `request` in `sandbox`, with its files under `dir` and a log per
    /// container.
    pub fn new(
        sandbox: PodSandbox,
        request: Arc<ApplyPodRequest>,
        dir: PathBuf,
        images: Arc<dyn ImageSource>,
        logs: BTreeMap<String, Arc<ContainerLog>>,
        stops: Stops,
    ) -> Self {
        let pumped = logs
            .keys()
            .flat_map(|name| {
                ["out", "err"].map(|s| (format!("{name}.{s}"), AtomicBool::new(false)))
            })
            .collect();
        Self {
            sandbox,
            request,
            dir,
            images,
            logs,
            pumps: TaskTracker::new(),
            pumped,
            stops,
        }
    }

    /// The pod sandbox.
    pub fn sandbox(&self) -> &PodSandbox {
        &self.sandbox
    }

    /// The sandbox, for teardown or detaching once no instance is left.
    pub fn into_sandbox(self) -> PodSandbox {
        self.sandbox
    }

    /// Log of a container.
    pub fn log(&self, container: &str) -> Option<&Arc<ContainerLog>> {
        self.logs.get(container)
    }

    /// Removes the root filesystems of instances `0..=restarts` of `container`.
    pub fn remove_rootfs(&self, container: &str, restarts: u32) {
        for i in 0..=restarts {
            self.images.remove(&self.instance_id(container, i));
        }
    }

    /// Waits until the FIFO pumps ended (after the pod was deleted or detached).
    pub async fn pumps_ended(&self) {
        self.pumps.close();
        self.pumps.wait().await;
    }

    /// Root filesystem and container name of instance `restarts` of `container`.
    fn instance_id(&self, container: &str, restarts: u32) -> String {
        format!("{}-{container}-{restarts}", self.sandbox.id())
    }

    fn record_path(&self, container: &str) -> PathBuf {
        self.dir
            .join("containers")
            .join(format!("{container}.json"))
    }

    fn fifo(&self, container: &str, suffix: &str) -> PathBuf {
        self.dir.join("fifo").join(format!("{container}.{suffix}"))
    }

    fn termination_path(&self, container: &str) -> PathBuf {
        self.dir.join("termination").join(container)
    }

    /// The instance handle of a started or adopted container.
    fn instance(&self, c: &K8sContainer, container: Container) -> Box<dyn Instance> {
        Box::new(CellInstance {
            container,
            exited: false,
            record_path: self.record_path(&c.name),
            message_path: self.termination_path(&c.name),
            fifos: [self.fifo(&c.name, "out"), self.fifo(&c.name, "err")],
            log: self.logs.get(&c.name).cloned(),
            message_from_log: c.termination_message_policy.as_deref()
                == Some("FallbackToLogsOnError"),
        })
    }

    /// Reads the container's FIFOs into its log for as long as the pod lives (one reader per
    /// FIFO, kept across restarts).
    fn spawn_pumps(&self, c: &K8sContainer) {
        if c.tty == Some(true) {
            return;
        }
        let Some(log) = self.logs.get(&c.name) else {
            return;
        };
        for (suffix, stream) in [("out", LogStream::Stdout), ("err", LogStream::Stderr)] {
            let path = self.fifo(&c.name, suffix);
            if updraft_cell_runtime::ensure_fifo(&path).is_err() {
                continue;
            }
            let Some(pumped) = self.pumped.get(&format!("{}.{suffix}", c.name)) else {
                continue;
            };
            if pumped.swap(true, Ordering::SeqCst) {
                continue;
            }
            // Opened here, before the container starts, not in the task: a container that
            // writes and exits before a reader holds the FIFO would take its output with it
            // (the pipe's buffer goes with its last open descriptor).
            let Ok(rx) = tokio::net::unix::pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(&path)
            else {
                pumped.store(false, Ordering::SeqCst);
                continue;
            };
            let log = log.clone();
            let stops = self.stops.clone();
            self.pumps.spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    tokio::select! {
                        r = rx.readable() => if r.is_err() { return },
                        () = stops.stop.cancelled() => return,
                        () = stops.detach.cancelled() => return,
                    }
                    // Read and write under the log's reading guard, so an instance's end
                    // (which drains the pipe under the same guard) never splits them.
                    let _reading = log.reading();
                    loop {
                        match rx.try_read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) => log.write(stream, &buf[..n]),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(_) => return,
                        }
                    }
                }
            });
        }
    }

    /// The bind mounts of `c`: its volume mounts and the termination message file.
    fn mounts(&self, c: &K8sContainer) -> Result<Vec<BindMount>, StartFailure> {
        let config_error = |message: String| StartFailure {
            reason: "CreateContainerConfigError".into(),
            message,
        };
        let no_volumes = Vec::new();
        let volumes = self
            .request
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .unwrap_or(&no_volumes);
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let Some(v) = volumes.iter().find(|v| v.name == m.name) else {
                return Err(config_error(format!(
                    "volumeMount {:?} names no volume of the pod",
                    m.name
                )));
            };
            let mut source = match &v.host_path {
                Some(hp) => {
                    let p = PathBuf::from(&hp.path);
                    if matches!(hp.type_.as_deref(), Some("DirectoryOrCreate")) {
                        let _ = std::fs::create_dir_all(&p);
                    }
                    p
                }
                None => self.dir.join("volumes").join(&v.name),
            };
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                if sub.contains("..") || sub.starts_with('/') {
                    return Err(config_error(format!(
                        "subPath {sub:?} must be relative without '..'"
                    )));
                }
                source = source.join(sub);
                let _ = std::fs::create_dir_all(&source);
            }
            mounts.push(BindMount {
                source,
                destination: PathBuf::from(&m.mount_path),
                read_only: m.read_only == Some(true),
            });
        }
        let message_path = self.termination_path(&c.name);
        let _ = std::fs::write(&message_path, b"");
        mounts.push(BindMount {
            source: message_path,
            destination: PathBuf::from(
                c.termination_message_path
                    .clone()
                    .unwrap_or_else(|| "/dev/termination-log".into()),
            ),
            read_only: false,
        });
        Ok(mounts)
    }

    /// The runtime spec of an instance of `c` from `image`.
    fn container_spec(
        &self,
        c: &K8sContainer,
        image: &PreparedImage,
        env: Vec<(String, String)>,
    ) -> Result<ContainerSpec, StartFailure> {
        let pod_sc = self
            .request
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref());
        let sc = c.security_context.as_ref();
        let uid = sc
            .and_then(|s| s.run_as_user)
            .or(pod_sc.and_then(|s| s.run_as_user))
            .unwrap_or(0);
        let gid = sc
            .and_then(|s| s.run_as_group)
            .or(pod_sc.and_then(|s| s.run_as_group))
            .unwrap_or(0);
        let caps = sc.and_then(|s| s.capabilities.as_ref());
        let stdio = if c.tty == Some(true) {
            StdioMode::Tty { rows: 24, cols: 80 }
        } else {
            StdioMode::Fifos {
                stdin: (c.stdin == Some(true)).then(|| self.fifo(&c.name, "in")),
                stdout: self.fifo(&c.name, "out"),
                stderr: self.fifo(&c.name, "err"),
            }
        };
        Ok(ContainerSpec {
            name: c.name.clone(),
            rootfs: image.rootfs.clone(),
            argv: spec::argv(c, image),
            env,
            working_dir: c.working_dir.clone().or(image.working_dir.clone()),
            uid: uid.max(0) as u32,
            gid: gid.max(0) as u32,
            supplementary_groups: pod_sc
                .and_then(|s| s.supplemental_groups.clone())
                .unwrap_or_default()
                .into_iter()
                .map(|g| g.max(0) as u32)
                .collect(),
            capabilities_add: caps.and_then(|c| c.add.clone()).unwrap_or_default(),
            capabilities_drop: caps.and_then(|c| c.drop.clone()).unwrap_or_default(),
            read_only_rootfs: sc.and_then(|s| s.read_only_root_filesystem) == Some(true),
            mounts: self.mounts(c)?,
            resources: spec::resources(c),
            stdio,
        })
    }
}

#[async_trait::async_trait]
impl ContainerRuntime for CellRuntime {
    async fn pull(&self, c: &K8sContainer, restarts: u32) -> Result<PreparedImage, StartFailure> {
        let image = c.image.clone().unwrap_or_default();
        let policy = c.image_pull_policy.clone().unwrap_or_else(|| {
            if image.ends_with(":latest") || !image.contains(':') {
                "Always".into()
            } else {
                "IfNotPresent".into()
            }
        });
        // The previous instance's rootfs goes; each instance starts from the image.
        if restarts > 0 {
            self.images.remove(&self.instance_id(&c.name, restarts - 1));
        }
        self.images
            .prepare(
                &image,
                &policy,
                &self.request.pull_secrets,
                &self.instance_id(&c.name, restarts),
            )
            .await
            .map_err(|f| StartFailure {
                reason: f.reason,
                message: f.message,
            })
    }

    fn start(
        &self,
        c: &K8sContainer,
        image: PreparedImage,
        restarts: u32,
        last: Option<&Terminated>,
    ) -> Result<Started, StartFailure> {
        let name = &c.name;
        let resolved: Vec<(String, String)> = self
            .request
            .env
            .get(name)
            .into_iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        let env = spec::env(&image, &resolved);
        let container_spec = self.container_spec(c, &image, env.clone())?;
        if let Some(log) = self.logs.get(name) {
            let _ = log.begin(restarts);
        }
        self.spawn_pumps(c);
        let (container, stdio) = Container::start(&self.sandbox, container_spec).map_err(|e| {
            let reason = if matches!(e, updraft_cell_runtime::Error::Setup { .. }) {
                "StartError"
            } else {
                "CreateContainerError"
            };
            StartFailure {
                reason: reason.into(),
                message: e.to_string(),
            }
        })?;
        if let updraft_cell_runtime::Stdio::Tty(pty) = stdio
            && let Some(log) = self.logs.get(name).cloned()
            && let Ok(mut master) = pty.master().try_clone()
        {
            // The terminal's output is the log; the reader ends with EIO when the container
            // (the last slave holder) exits.
            std::thread::spawn(move || {
                let _keep = pty;
                let mut buf = vec![0u8; 16 << 10];
                while let Ok(n) = std::io::Read::read(&mut master, &mut buf) {
                    if n == 0 {
                        break;
                    }
                    log.write(LogStream::Stdout, &buf[..n]);
                }
            });
        }
        let started_at = crate::now();
        let pid = container.pid().as_raw();
        let record = InstanceRecord {
            pid,
            start_ticks: start_ticks(pid).unwrap_or(0),
            restarts,
            started_at,
            container_id: format!("updraft://{}", self.instance_id(name, restarts)),
            image_id: image.image_id.clone(),
            env: env.clone(),
            last: last.cloned(),
        };
        if let Err(e) = write_json(&self.record_path(name), &record) {
            tracing::warn!(container = %name, error = %e, "could not record the container for agent restarts");
        }
        let exec = Some(container.exec_target());
        Ok(Started {
            instance: self.instance(c, container),
            started_at,
            container_id: record.container_id,
            image_id: record.image_id,
            env,
            exec,
        })
    }

    fn recorded(&self, c: &K8sContainer) -> Option<InstanceRecord> {
        InstanceRecord::read(&self.record_path(&c.name))
    }

    fn adopt(&self, c: &K8sContainer, record: &InstanceRecord) -> Option<Started> {
        let pid = nix::unistd::Pid::from_raw(record.pid);
        let container = record
            .alive()
            .then(|| Container::adopt(&self.sandbox, &c.name, pid).ok())
            .flatten();
        let Some(container) = container else {
            let _ = std::fs::remove_file(self.record_path(&c.name));
            return None;
        };
        if let Some(log) = self.logs.get(&c.name) {
            let _ = log.begin(record.restarts);
        }
        self.spawn_pumps(c);
        let exec = Some(container.exec_target());
        Some(Started {
            instance: self.instance(c, container),
            started_at: record.started_at,
            container_id: record.container_id.clone(),
            image_id: record.image_id.clone(),
            env: record.env.clone(),
            exec,
        })
    }

    async fn probe(&self, target: &ProbeTarget, p: &Probe) -> bool {
        let Some(exec) = &target.exec else {
            tracing::debug!(container = %target.container, kind = ?target.kind, "no instance to probe");
            return false;
        };
        probe::run_once(p, exec, self.sandbox.netns(), &target.env, &target.ports).await
    }
}

/// A container instance of this cell.
struct CellInstance {
    container: Container,
    /// Its exit was seen: it is reaped, its PID may name another process now.
    exited: bool,
    record_path: PathBuf,
    message_path: PathBuf,
    /// stdout and stderr FIFOs.
    fifos: [PathBuf; 2],
    log: Option<Arc<ContainerLog>>,
    /// `terminationMessagePolicy: FallbackToLogsOnError`.
    message_from_log: bool,
}

#[async_trait::async_trait]
impl Instance for CellInstance {
    async fn wait(&mut self) -> Option<ContainerExit> {
        let exit = self.container.wait().await.ok()?;
        self.exited = true;
        Some(exit)
    }

    fn signal(&self, signal: Signal) {
        if self.exited {
            return;
        }
        match nix::sys::signal::kill(self.container.pid(), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => {
                tracing::warn!(container = %self.container.name(), %signal, error = %e, "could not signal the container")
            }
        }
    }

    fn detach(self: Box<Self>) {
        self.container.detach();
    }

    async fn release(self: Box<Self>, exit_code: i32) -> Option<String> {
        // Exited already: this only removes the container's cgroup.
        if let Err(e) = self.container.stop(Duration::ZERO).await {
            tracing::debug!(error = %e, "removing a container's cgroup");
        }
        let _ = std::fs::remove_file(&self.record_path);
        if let Some(log) = &self.log {
            // Output still in the pipes belongs to this instance, not to the next one; the
            // pumps cannot be between a read and its write while this drains.
            let _reading = log.reading();
            for (path, stream) in self
                .fifos
                .iter()
                .zip([LogStream::Stdout, LogStream::Stderr])
            {
                drain_fifo(path, |data| log.write(stream, data));
            }
            log.end();
        }
        let message = std::fs::read(&self.message_path)
            .ok()
            .map(|mut b| {
                b.truncate(4096);
                String::from_utf8_lossy(&b).into_owned()
            })
            .filter(|m| !m.is_empty());
        if message.is_some() || exit_code == 0 || !self.message_from_log {
            return message;
        }
        let log = self.log.as_ref()?;
        let raw = log.read_instance(log.instance());
        let text = crate::logs::render(
            &raw,
            &updraft_cell_api::LogOptions {
                tail_lines: Some(80),
                ..Default::default()
            },
            None,
        );
        let start = text.len().saturating_sub(2048);
        Some(String::from_utf8_lossy(&text[start..]).into_owned())
    }
}

/// Reads what is buffered in a FIFO without blocking.
fn drain_fifo(path: &Path, mut sink: impl FnMut(&[u8])) {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    else {
        return;
    };
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = std::io::Read::read(&mut f, &mut buf) {
        if n == 0 {
            break;
        }
        sink(&buf[..n]);
    }
}
