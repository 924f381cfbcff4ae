//! Starting a cell's init: a shell that enters the cell's network namespace and a new mount
//! and UTS namespace, joins the cell's cgroup, mounts the cell's directories, sets the
//! hostname and runs `runcmd` as cloud-init would (in order, a failing command does not stop
//! the rest). `updraft-cell` commands start the configured agent binary in the background; the
//! init then waits for it, so the cell's processes form one tree that is not ours: it runs in
//! its own session (`setsid --fork`), and neither exiting nor a SIGKILL of the process that
//! started it touches the cell.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{LocalError, io};
use crate::fs::{FsPlan, in_root};
use crate::net::netns_name;
use crate::record::ProcessRef;
use crate::userdata::RunCommand;

/// The program name in `runcmd` that means "the agent".
pub const AGENT_PROGRAM: &str = "updraft-cell";

/// Quotes `text` for `/bin/sh`.
pub fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn quote_path(path: &Path) -> String {
    sh_quote(&path.to_string_lossy())
}

/// Whether a `runcmd` entry starts the agent.
pub fn is_agent_command(command: &RunCommand) -> bool {
    matches!(command, RunCommand::Argv(argv)
        if argv.first().is_some_and(|program| Path::new(program).file_name()
            == Some(std::ffi::OsStr::new(AGENT_PROGRAM))))
}

/// The files of one cell's directory.
#[derive(Debug, Clone)]
pub struct CellPaths {
    /// `stateDir/cells/<id>`.
    pub dir: PathBuf,
}

impl CellPaths {
    /// The cell's private tree (overlay uppers, private directories).
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
    /// Overlay work directories.
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
    /// The init script.
    pub fn script(&self) -> PathBuf {
        self.dir.join("init.sh")
    }
    /// Everything the init and its commands print.
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The init's pid, written by the init itself.
    pub fn init_pid(&self) -> PathBuf {
        self.dir.join("init.pid")
    }
    /// The agent's pid, written by the init when it starts the agent.
    pub fn agent_pid(&self) -> PathBuf {
        self.dir.join("agent.pid")
    }
}

/// What the init script needs.
pub struct InitSpec<'a> {
    /// The cell's directory.
    pub paths: &'a CellPaths,
    /// The mounts.
    pub plan: &'a FsPlan,
    /// The hostname.
    pub hostname: &'a str,
    /// The `cgroup.procs` files the init writes itself into.
    pub cgroup_procs: &'a [PathBuf],
    /// `runcmd`.
    pub commands: &'a [RunCommand],
    /// The agent program.
    pub agent_binary: &'a Path,
    /// Environment of the commands (the cell's "instance metadata").
    pub env: &'a [(String, String)],
}

/// The init script.
pub fn script(spec: &InitSpec<'_>) -> String {
    let paths = spec.paths;
    let mut s = String::from(
        "#!/bin/sh\n# The init of an Updraft local cell, written by updraft-cells-local.\n",
    );
    s.push_str("fail() { echo \"updraft-cells-local: $*\" >&2; exit 1; }\n");
    for procs in spec.cgroup_procs {
        let _ = writeln!(
            s,
            "echo $$ > {} || fail 'joining the cell cgroup'",
            quote_path(procs)
        );
    }
    let init_pid = quote_path(&paths.init_pid());
    let _ = writeln!(
        s,
        "echo $$ > {init_pid}.tmp && mv {init_pid}.tmp {init_pid}"
    );
    for (index, dir) in spec.plan.overlays.iter().enumerate() {
        let upper = in_root(&paths.root(), dir);
        let work = paths.work().join(index.to_string());
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            dir.display(),
            upper.display(),
            work.display()
        );
        let _ = writeln!(
            s,
            "mount -t overlay updraft-cell -o {} {} || fail 'overlaying {}'",
            sh_quote(&options),
            quote_path(dir),
            dir.display()
        );
    }
    // The agent's pods get named network namespaces of the cell's own.
    s.push_str("if [ -d /run/netns ]; then mount -t tmpfs -o mode=0755 updraft-cell-netns /run/netns || fail 'mounting /run/netns'; fi\n");
    for dir in &spec.plan.binds {
        let _ = writeln!(
            s,
            "mount --bind {} {} || fail 'mounting the private directory {}'",
            quote_path(&in_root(&paths.root(), dir)),
            quote_path(dir),
            dir.display()
        );
    }
    let _ = writeln!(
        s,
        "echo {} > /proc/sys/kernel/hostname || fail 'setting the hostname'",
        sh_quote(spec.hostname)
    );
    s.push_str("cd /\n");
    for (name, value) in spec.env {
        let _ = writeln!(s, "export {name}={}", sh_quote(value));
    }
    let agent_pid = quote_path(&paths.agent_pid());
    for (index, command) in spec.commands.iter().enumerate() {
        let _ = writeln!(s, "# runcmd[{index}]");
        match command {
            RunCommand::Argv(argv) if is_agent_command(command) => {
                let mut line = quote_path(spec.agent_binary);
                for arg in &argv[1..] {
                    line.push(' ');
                    line.push_str(&sh_quote(arg));
                }
                let _ = writeln!(
                    s,
                    "{line} &\necho $! > {agent_pid}.tmp && mv {agent_pid}.tmp {agent_pid}"
                );
            }
            RunCommand::Argv(argv) => {
                let line: Vec<String> = argv.iter().map(|a| sh_quote(a)).collect();
                let _ = writeln!(
                    s,
                    "{} || echo \"updraft-cells-local: runcmd[{index}] exited with $?\" >&2",
                    line.join(" ")
                );
            }
            RunCommand::Shell(text) => {
                let _ = writeln!(
                    s,
                    "/bin/sh -c {} || echo \"updraft-cells-local: runcmd[{index}] exited with $?\" >&2",
                    sh_quote(text)
                );
            }
        }
    }
    s.push_str("echo 'updraft-cells-local: runcmd done'\nwait\n");
    s
}

/// The last `max` bytes of the console log, for error messages.
pub fn console_tail(paths: &CellPaths, max: usize) -> String {
    let text = std::fs::read(paths.console()).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let tail = String::from_utf8_lossy(&text[start..]).trim().to_string();
    if tail.is_empty() {
        "(empty)".into()
    } else {
        tail
    }
}

/// Reads a pid file written by the init.
pub fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is in the cgroup `cgroup` (relative path, any controller).
pub fn in_cgroup(pid: i32, cgroup: &Path) -> bool {
    let wanted = Path::new("/").join(cgroup);
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|text| {
        text.lines().any(|line| {
            line.splitn(3, ':')
                .nth(2)
                .is_some_and(|path| Path::new(path).starts_with(&wanted))
        })
    })
}

/// Writes the script, starts the init detached from us, and waits (bounded by `timeout`) until
/// it has joined the cell's cgroup (`cgroup`) and written its pid.
pub fn start_init(
    id: &str,
    spec: &InitSpec<'_>,
    cgroup: &Path,
    timeout: Duration,
) -> Result<ProcessRef, LocalError> {
    let paths = spec.paths;
    let script_path = paths.script();
    std::fs::write(&script_path, script(spec)).map_err(io("write", &script_path))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script_path, std::fs::Permissions::from_mode(0o700))
            .map_err(io("chmod", &script_path))?;
    }
    let console = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(paths.console())
        .map_err(io("open", paths.console()))?;
    let console_err = console.try_clone().map_err(io("open", paths.console()))?;
    let netns = Path::new("/run/netns").join(netns_name(id));
    let mut command = Command::new("setsid");
    command
        .arg("--fork")
        .arg("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .args([
            "unshare",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "--",
        ])
        .arg("/bin/sh")
        .arg(&script_path)
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(console_err)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root");
    let status = command.status().map_err(|error| LocalError::Command {
        command: "setsid --fork nsenter … unshare … /bin/sh init.sh".into(),
        stderr: error.to_string(),
    })?;
    if !status.success() {
        return Err(LocalError::BootFailed {
            id: id.to_string(),
            message: format!("setsid exited with {status}"),
            console: console_tail(paths, 2000),
        });
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(pid) = read_pid(&paths.init_pid())
            && in_cgroup(pid, cgroup)
            && let Some(process) = ProcessRef::current(pid)
        {
            return Ok(process);
        }
        if Instant::now() >= deadline {
            return Err(LocalError::BootFailed {
                id: id.to_string(),
                message: format!(
                    "its init did not write {} within {timeout:?}",
                    paths.init_pid().display()
                ),
                console: console_tail(paths, 2000),
            });
        }
        // The init is a detached process tree: its pid file is the only signal it gives.
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        let output = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("printf %s {}", sh_quote("x'y $HOME \"z\"")))
            .output()
            .expect("sh");
        assert_eq!(String::from_utf8_lossy(&output.stdout), "x'y $HOME \"z\"");
    }

    #[test]
    fn the_script_mounts_then_runs_commands_with_the_agent_in_the_background() {
        let paths = CellPaths {
            dir: PathBuf::from("/state/cells/cell-00000001"),
        };
        let plan = FsPlan {
            overlays: vec![PathBuf::from("/etc")],
            binds: vec![PathBuf::from("/var/lib/updraft-cell")],
            host_mountpoints: vec![],
        };
        let commands = [
            RunCommand::Argv(vec!["updraft-cell".into(), "--tls-key".into(), "/k".into()]),
            RunCommand::Shell("echo 'hi'".into()),
            RunCommand::Argv(vec!["touch".into(), "/tmp/x".into()]),
        ];
        let text = script(&InitSpec {
            paths: &paths,
            plan: &plan,
            hostname: "web-1",
            cgroup_procs: &[PathBuf::from(
                "/sys/fs/cgroup/pids/updraft-cells/cell-00000001/init/cgroup.procs",
            )],
            commands: &commands,
            agent_binary: Path::new("/opt/bin/updraft-cell"),
            env: &[("UPDRAFT_CELL_LISTEN".into(), "10.0.0.2:6421".into())],
        });
        let order = [
            "cgroup.procs",
            "init.pid",
            "lowerdir=/etc,upperdir=/state/cells/cell-00000001/root/etc,workdir=/state/cells/cell-00000001/work/0",
            "/run/netns",
            "mount --bind '/state/cells/cell-00000001/root/var/lib/updraft-cell' '/var/lib/updraft-cell'",
            "echo 'web-1' > /proc/sys/kernel/hostname",
            "export UPDRAFT_CELL_LISTEN='10.0.0.2:6421'",
            "'/opt/bin/updraft-cell' '--tls-key' '/k' &",
            "agent.pid",
            r"/bin/sh -c 'echo '\''hi'\'''",
            "'touch' '/tmp/x' ||",
            "\nwait\n",
        ];
        let mut at = 0;
        for needle in order {
            let found = text[at..]
                .find(needle)
                .unwrap_or_else(|| panic!("{needle:?} after {at} in\n{text}"));
            at += found + needle.len();
        }
        assert!(is_agent_command(&RunCommand::Argv(vec![
            "/usr/local/bin/updraft-cell".into()
        ])));
        assert!(!is_agent_command(&RunCommand::Shell("updraft-cell".into())));
    }
}
