//! Real processes for mock pods that ask for them (`mock.updraft.dev/run: "true"`).
//!
//! Each such pod gets a scratch directory (`<MockConfig::scratch_dir>/<ns>_<name>_<uid>`); each
//! container's `command` + `args` runs there as a host process (in its own process group, with
//! the container's resolved environment), supervised and restarted per `restartPolicy`. Its
//! stdout and stderr go to `logs/<container>/<restart>.log` in the CRI format (module
//! `cri_log`) and to whoever is attached. Deleting the pod kills every process of the pod.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::api::core::v1::Container as ContainerSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::ChildStdin;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use updraft_common::sync::lock;
use updraft_provider::{ExitStatus, ProviderError, ResolvedPod, Result, StreamIo};

use crate::cri_log::{LogFile, LogWriter, Output};

/// What a container runs when its spec names no command (there is no image to take one from).
const IDLE_COMMAND: [&str; 2] = ["sleep", "infinity"];
/// The `PATH` processes get, as in a typical container image.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Longest wait before restarting a container that keeps exiting.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A change of one container, reported to the provider's status.
#[derive(Debug, Clone)]
pub(crate) enum ContainerEvent {
    /// The main process started.
    Running {
        /// The container.
        name: String,
        /// Restarts before this instance.
        restart_count: i32,
        /// When it started.
        started_at: Time,
    },
    /// The main process ended.
    Terminated {
        /// The container.
        name: String,
        /// Restarts before this instance.
        restart_count: i32,
        /// Its exit code (128 + signal when killed by a signal).
        exit_code: i32,
        /// When it started.
        started_at: Time,
        /// When it ended.
        finished_at: Time,
    },
}

/// Receives container events.
pub(crate) type Reporter = Arc<dyn Fn(ContainerEvent) + Send + Sync>;

/// One run of a container's main process: its log, its stdin and its live output.
#[derive(Debug, Clone)]
pub(crate) struct Instance {
    /// The instance's log file.
    pub log: LogFile,
    stdin: Arc<tokio::sync::Mutex<Option<ChildStdin>>>,
    output: broadcast::Sender<(Output, Bytes)>,
    exit: watch::Receiver<Option<ExitStatus>>,
}

#[derive(Debug)]
struct Container {
    spec: ContainerSpec,
    /// Instances, oldest first; only the last two are kept (current and previous).
    instances: Mutex<Vec<Instance>>,
}

/// The processes of one pod. Dropping it kills them and removes the scratch directory.
#[derive(Debug)]
pub(crate) struct Sandbox {
    dir: PathBuf,
    env: HashMap<String, Vec<(String, String)>>,
    containers: HashMap<String, Arc<Container>>,
    supervisors: Vec<JoinHandle<()>>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for supervisor in &self.supervisors {
            supervisor.abort();
        }
        let dir = self.dir.clone();
        // Aborted supervisors kill their process groups as they are dropped; the directory
        // goes afterwards (best effort: the scratch root is temporary anyway).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                tokio::task::yield_now().await;
                let _ = tokio::fs::remove_dir_all(&dir).await;
            });
        }
    }
}

/// Kills a process group when dropped: a container's (or exec's) other processes end with it.
#[derive(Debug)]
pub(crate) struct GroupKiller(Option<i32>);

impl GroupKiller {
    /// Guards the process group `pgid` (`None`: nothing to kill).
    pub fn new(pgid: Option<u32>) -> Self {
        Self(pgid.and_then(|p| i32::try_from(p).ok()))
    }

    /// Kills the group now.
    pub fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The exit code Kubernetes reports for `status`.
pub(crate) fn exit_code(status: ExitStatus) -> i32 {
    match status {
        ExitStatus::Code(code) => code,
        ExitStatus::Signal(signal) => 128 + signal,
    }
}

pub(crate) fn exit_status(status: std::process::ExitStatus) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitStatus::Code(code),
        (None, Some(signal)) => ExitStatus::Signal(signal),
        (None, None) => ExitStatus::Code(-1),
    }
}

/// The environment of a process in `container`: a base `PATH`/`HOME`/`HOSTNAME`, then the
/// container's resolved variables.
fn environment(resolved: &ResolvedPod, container: &str, dir: &Path) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_owned(), PATH.to_owned()),
        ("HOME".to_owned(), dir.display().to_string()),
        (
            "HOSTNAME".to_owned(),
            resolved.pod.metadata.name.clone().unwrap_or_default(),
        ),
    ];
    env.extend(
        resolved
            .env
            .get(container)
            .into_iter()
            .flatten()
            .map(|v| (v.name.clone(), v.value.clone())),
    );
    env
}

/// Why a command could not start, as a shell would say it, and the shell's exit code.
pub(crate) fn spawn_failure(program: &str, err: &std::io::Error) -> (String, i32) {
    match err.kind() {
        std::io::ErrorKind::NotFound => (
            format!("exec: {program:?}: executable file not found in $PATH\n"),
            127,
        ),
        std::io::ErrorKind::PermissionDenied => {
            (format!("exec: {program:?}: permission denied\n"), 126)
        }
        _ => (format!("exec: {program:?}: {err}\n"), 126),
    }
}

impl Sandbox {
    /// Creates the pod's scratch directory and starts every container.
    pub async fn start(root: &Path, resolved: &ResolvedPod, report: Reporter) -> Result<Self> {
        let meta = &resolved.pod.metadata;
        let dir = root.join(format!(
            "{}_{}_{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default(),
            meta.uid.as_deref().unwrap_or_default()
        ));
        let specs = resolved
            .pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        let restart_policy = resolved
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        let mut sandbox = Self {
            dir: dir.clone(),
            env: HashMap::new(),
            containers: HashMap::new(),
            supervisors: Vec::new(),
        };
        for spec in specs {
            let log_dir = dir.join("logs").join(&spec.name);
            tokio::fs::create_dir_all(&log_dir).await.map_err(|e| {
                ProviderError::transient(format!(
                    "mock: creating the scratch directory {}: {e}",
                    log_dir.display()
                ))
            })?;
            let env = environment(resolved, &spec.name, &dir);
            let container = Arc::new(Container {
                spec: spec.clone(),
                instances: Mutex::new(Vec::new()),
            });
            sandbox.env.insert(spec.name.clone(), env.clone());
            sandbox
                .containers
                .insert(spec.name.clone(), container.clone());
            sandbox.supervisors.push(tokio::spawn(supervise(
                container,
                dir.clone(),
                log_dir,
                env,
                restart_policy.clone(),
                report.clone(),
            )));
        }
        Ok(sandbox)
    }

    /// The scratch directory processes run in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The environment of processes in `container`, if the pod has it.
    pub fn environment(&self, container: &str) -> Option<&[(String, String)]> {
        self.env.get(container).map(Vec::as_slice)
    }

    /// The current (or with `previous`, the one before) instance of `container`.
    pub fn instance(&self, container: &str, previous: bool) -> Result<Instance> {
        let Some(c) = self.containers.get(container) else {
            return Err(ProviderError::not_found(format!(
                "container {container:?} is not in this pod"
            )));
        };
        let instances = lock(&c.instances);
        let index = instances.len().checked_sub(if previous { 2 } else { 1 });
        index
            .and_then(|i| instances.get(i))
            .cloned()
            .ok_or_else(|| {
                if previous {
                    ProviderError::invalid_input(format!(
                        "previous terminated container {container:?} not found"
                    ))
                } else {
                    ProviderError::not_found(format!("container {container:?} has not started yet"))
                }
            })
    }

    /// Whether `container`'s spec asks for stdin to close when the first attached client
    /// closes it.
    pub fn stdin_once(&self, container: &str) -> bool {
        self.containers
            .get(container)
            .and_then(|c| c.spec.stdin_once)
            .unwrap_or(false)
    }
}

/// Runs `container`'s main process again and again, as `restart_policy` says.
async fn supervise(
    container: Arc<Container>,
    dir: PathBuf,
    log_dir: PathBuf,
    env: Vec<(String, String)>,
    restart_policy: String,
    report: Reporter,
) {
    let name = container.spec.name.clone();
    let argv: Vec<String> = {
        let spec = &container.spec;
        let argv: Vec<String> = spec
            .command
            .iter()
            .flatten()
            .chain(spec.args.iter().flatten())
            .cloned()
            .collect();
        if argv.is_empty() {
            IDLE_COMMAND.iter().map(|s| (*s).to_owned()).collect()
        } else {
            argv
        }
    };
    let mut restart_count: i32 = 0;
    loop {
        let log_path = log_dir.join(format!("{restart_count}.log"));
        let Ok((writer, log)) = LogWriter::create(&log_path).await else {
            tracing::warn!(container = %name, "mock: cannot create {}", log_path.display());
            return;
        };
        let (exit_tx, exit_rx) = watch::channel(None);
        let (output, _) = broadcast::channel(256);
        let stdin = Arc::new(tokio::sync::Mutex::new(None));
        {
            let mut instances = lock(&container.instances);
            instances.push(Instance {
                log,
                stdin: stdin.clone(),
                output: output.clone(),
                exit: exit_rx,
            });
            if instances.len() > 2 {
                instances.remove(0);
            }
        }
        let started_at = updraft_provider::now();
        report(ContainerEvent::Running {
            name: name.clone(),
            restart_count,
            started_at: started_at.clone(),
        });
        let status = run_once(&argv, &dir, &env, &container.spec, writer, output, &stdin).await;
        let code = exit_code(status);
        let _ = exit_tx.send(Some(status));
        let will_restart = match restart_policy.as_str() {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        report(ContainerEvent::Terminated {
            name: name.clone(),
            restart_count,
            exit_code: code,
            started_at,
            finished_at: updraft_provider::now(),
        });
        if !will_restart {
            return;
        }
        let backoff = Duration::from_secs(1u64 << restart_count.clamp(0, 5)).min(MAX_BACKOFF);
        tokio::time::sleep(backoff).await;
        restart_count = restart_count.saturating_add(1);
    }
}

/// Runs the main process once: output to the log and to attached clients, until it exits.
async fn run_once(
    argv: &[String],
    dir: &Path,
    env: &[(String, String)],
    spec: &ContainerSpec,
    mut writer: LogWriter,
    output: broadcast::Sender<(Output, Bytes)>,
    stdin: &tokio::sync::Mutex<Option<ChildStdin>>,
) -> ExitStatus {
    let program = argv.first().map_or("", String::as_str);
    let mut command = tokio::process::Command::new(program);
    command
        .args(argv.iter().skip(1))
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(if spec.stdin == Some(true) {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            let (message, code) = spawn_failure(program, &err);
            writer
                .record(Output::Stderr, true, message.trim_end().as_bytes())
                .await;
            writer.finish();
            return ExitStatus::Code(code);
        }
    };
    let mut killer = GroupKiller::new(child.id());
    *stdin.lock().await = child.stdin.take();
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let pumps = async {
        tokio::join!(
            pump(stdout, Output::Stdout, &writer, &output),
            pump(stderr, Output::Stderr, &writer, &output)
        )
    };
    let wait = async {
        let status = child.wait().await;
        // The container ends with its main process: nothing it started may keep the pipes open.
        killer.kill();
        status
    };
    let (status, _) = tokio::join!(wait, pumps);
    stdin.lock().await.take();
    writer.lock().await.finish();
    match status {
        Ok(status) => exit_status(status),
        Err(_) => ExitStatus::Code(-1),
    }
}

/// Copies one output pipe into the log and to attached clients.
async fn pump(
    pipe: Option<impl AsyncRead + Unpin>,
    output: Output,
    writer: &tokio::sync::Mutex<LogWriter>,
    live: &broadcast::Sender<(Output, Bytes)>,
) {
    let Some(mut pipe) = pipe else {
        return;
    };
    let mut splitter = crate::cri_log::LineSplitter::default();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = buf.get(..n).unwrap_or_default();
        // No receiver (nobody attached) is fine.
        let _ = live.send((output, Bytes::copy_from_slice(chunk)));
        let records = splitter.feed(chunk);
        if !records.is_empty() {
            let mut writer = writer.lock().await;
            for (complete, content) in records {
                writer.record(output, complete, &content).await;
            }
        }
    }
    if let Some((complete, content)) = splitter.finish() {
        writer.lock().await.record(output, complete, &content).await;
    }
}

/// Connects `io` to a running instance's main process until it exits (its exit status) or
/// the future is dropped (the client detached). Closing the client's stdin closes the
/// process's stdin only with `stdin_once`.
pub(crate) async fn attach(
    instance: Instance,
    stdin_once: bool,
    io: StreamIo,
) -> Result<ExitStatus> {
    let StreamIo {
        stdin,
        stdout,
        stderr,
        tty,
        resize: _,
    } = io;
    let mut live = instance.output.subscribe();
    let mut exit = instance.exit.clone();
    if let Some(status) = *exit.borrow_and_update() {
        return Ok(status);
    }
    let process_stdin = instance.stdin.clone();
    let forward_stdin = async move {
        if let Some(mut from) = stdin {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut guard = process_stdin.lock().await;
                        let Some(to) = guard.as_mut() else { break };
                        let chunk = buf.get(..n).unwrap_or_default();
                        if to.write_all(chunk).await.is_err() || to.flush().await.is_err() {
                            break;
                        }
                    }
                }
            }
            if stdin_once {
                process_stdin.lock().await.take();
            }
        }
        std::future::pending::<()>().await;
    };
    let forward_output = async move {
        let (mut stdout, mut stderr) = (stdout, stderr);
        loop {
            let received = tokio::select! {
                biased;
                received = live.recv() => received,
                _ = exit.changed() => {
                    // The pumps are done before the exit is published: drain what is left.
                    while let Ok((output, data)) = live.try_recv() {
                        write_output(output, &data, tty, &mut stdout, &mut stderr).await;
                    }
                    break;
                }
            };
            match received {
                Ok((output, data)) => {
                    if !write_output(output, &data, tty, &mut stdout, &mut stderr).await {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!("mock attach: a slow client missed {missed} output chunks");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        for out in [stdout.as_mut(), stderr.as_mut()].into_iter().flatten() {
            let _ = out.shutdown().await;
        }
        *exit.borrow()
    };
    tokio::select! {
        status = forward_output => Ok(status.unwrap_or(ExitStatus::Code(0))),
        () = forward_stdin => Ok(ExitStatus::Code(0)),
    }
}

/// Writes attached output; `false` once the client's side is gone.
async fn write_output(
    output: Output,
    data: &[u8],
    tty: bool,
    stdout: &mut Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
    stderr: &mut Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
) -> bool {
    let target = match output {
        Output::Stderr if !tty => stderr.as_mut(),
        _ => stdout.as_mut(),
    };
    match target {
        Some(out) => out.write_all(data).await.is_ok() && out.flush().await.is_ok(),
        None => true,
    }
}
