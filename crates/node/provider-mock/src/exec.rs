//! `kubectl exec` for running mock pods: the command runs as a host process in the pod's
//! scratch directory with the container's environment; with a TTY it gets a pseudo-terminal
//! (its own session, the terminal as controlling terminal via util-linux `setsid --ctty`) whose
//! size follows the client's resize events.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::mpsc;
use updraft_provider::{ExitStatus, ProviderError, Result, StreamIo, TerminalSize};

use crate::sandbox::{GroupKiller, exit_status, spawn_failure};

/// The size a terminal has until the client sends its own.
const DEFAULT_SIZE: TerminalSize = TerminalSize {
    width: 80,
    height: 24,
};

/// Runs `command` in `dir` with `env`, connected to `io`, until it exits. Dropping the future
/// kills the command and everything it started.
pub(crate) async fn exec(
    dir: &Path,
    env: &[(String, String)],
    command: &[String],
    io: StreamIo,
) -> Result<ExitStatus> {
    let Some(program) = command.first() else {
        return Err(ProviderError::invalid_input(
            "exec needs a command: none was given",
        ));
    };
    if io.tty {
        exec_tty(dir, env, command, io).await
    } else {
        exec_pipes(dir, env, program, command, io).await
    }
}

fn base_command(program: &str, dir: &Path, env: &[(String, String)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    command
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true);
    command
}

/// Copies the client's stdin into the process, closing the process's stdin at the client's
/// end of input (`eof`: what to send instead of closing, for a terminal); then waits forever,
/// so a `select!` ends only with the process.
async fn forward_stdin(
    from: Option<Box<dyn AsyncRead + Send + Unpin>>,
    to: Option<impl AsyncWrite + Unpin>,
    eof: Option<&[u8]>,
) {
    if let (Some(mut from), Some(mut to)) = (from, to) {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk = buf.get(..n).unwrap_or_default();
                    if to.write_all(chunk).await.is_err() || to.flush().await.is_err() {
                        break;
                    }
                }
            }
        }
        if let Some(eof) = eof {
            let _ = to.write_all(eof).await;
            let _ = to.flush().await;
        }
        // Dropping `to` closes the pipe: the process sees end of input.
    }
    std::future::pending::<()>().await;
}

/// Copies process output to the client; the client's side is shut down at the end so it
/// sees end of stream before the exit status.
async fn forward_output(
    from: Option<impl AsyncRead + Unpin>,
    to: Option<Box<dyn AsyncWrite + Send + Unpin>>,
) {
    let Some(mut from) = from else {
        return;
    };
    let mut buf = vec![0u8; 32 * 1024];
    let mut to = to;
    loop {
        // A terminal reports EIO once every process holding it has exited: that is its end.
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(out) = to.as_mut() {
            let chunk = buf.get(..n).unwrap_or_default();
            if out.write_all(chunk).await.is_err() || out.flush().await.is_err() {
                // The client stopped reading; keep draining so the process is not blocked.
                to = None;
            }
        }
    }
    if let Some(mut out) = to {
        let _ = out.shutdown().await;
    }
}

async fn exec_pipes(
    dir: &Path,
    env: &[(String, String)],
    program: &str,
    command: &[String],
    io: StreamIo,
) -> Result<ExitStatus> {
    let mut process = base_command(program, dir, env);
    let piped = |wanted: bool| {
        if wanted {
            Stdio::piped()
        } else {
            Stdio::null()
        }
    };
    process
        .args(command.iter().skip(1))
        .stdin(piped(io.stdin.is_some()))
        .stdout(piped(io.stdout.is_some()))
        .stderr(piped(io.stderr.is_some()))
        .process_group(0);
    let StreamIo {
        stdin,
        stdout,
        mut stderr,
        ..
    } = io;
    let mut child = match process.spawn() {
        Ok(child) => child,
        Err(err) => {
            let (message, code) = spawn_failure(program, &err);
            if let Some(out) = stderr.as_mut() {
                let _ = out.write_all(message.as_bytes()).await;
                let _ = out.shutdown().await;
            }
            return Ok(ExitStatus::Code(code));
        }
    };
    let mut killer = GroupKiller::new(child.id());
    let child_stdin = child.stdin.take();
    let (child_stdout, child_stderr) = (child.stdout.take(), child.stderr.take());
    let outputs = async {
        tokio::join!(
            forward_output(child_stdout, stdout),
            forward_output(child_stderr, stderr)
        )
    };
    let run = async {
        let wait = async {
            let status = child.wait().await;
            // Processes the command left behind would hold the output pipes open.
            killer.kill();
            status
        };
        tokio::join!(wait, outputs).0
    };
    let status = tokio::select! {
        status = run => status,
        () = forward_stdin(stdin, child_stdin, None) => unreachable_pending(),
    };
    status
        .map(exit_status)
        .map_err(|e| ProviderError::transient(format!("waiting for the exec'd process: {e}")))
}

/// `forward_stdin` never completes.
fn unreachable_pending() -> std::io::Result<std::process::ExitStatus> {
    Err(std::io::Error::other("stdin forwarding ended unexpectedly"))
}

fn winsize(size: TerminalSize) -> rustix::termios::Winsize {
    rustix::termios::Winsize {
        ws_row: size.height,
        ws_col: size.width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

async fn apply_resizes(terminal: OwnedFd, resize: Option<mpsc::Receiver<TerminalSize>>) {
    if let Some(mut resize) = resize {
        while let Some(size) = resize.recv().await {
            if let Err(err) = rustix::termios::tcsetwinsize(&terminal, winsize(size)) {
                tracing::debug!("mock exec: resizing the terminal: {err}");
            }
        }
    }
    std::future::pending::<()>().await;
}

async fn exec_tty(
    dir: &Path,
    env: &[(String, String)],
    command: &[String],
    io: StreamIo,
) -> Result<ExitStatus> {
    let io_error = |what: &str, e: &dyn std::fmt::Display| {
        ProviderError::transient(format!("mock exec: {what}: {e}"))
    };
    let initial = nix::pty::Winsize {
        ws_row: DEFAULT_SIZE.height,
        ws_col: DEFAULT_SIZE.width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&initial), None)
        .map_err(|e| io_error("opening a pseudo-terminal", &e))?;
    let clone = |fd: &OwnedFd| {
        fd.try_clone()
            .map_err(|e| io_error("duplicating the terminal", &e))
    };
    // `setsid --ctty` makes the command a session leader with the terminal (its stdin) as
    // controlling terminal, so job control and SIGWINCH work; `--wait` passes its exit status on.
    let mut process = base_command("setsid", dir, env);
    process
        .arg("--wait")
        .arg("--ctty")
        .args(command)
        .stdin(Stdio::from(clone(&pty.slave)?))
        .stdout(Stdio::from(clone(&pty.slave)?))
        .stderr(Stdio::from(pty.slave));
    let mut child = process
        .spawn()
        .map_err(|e| io_error("starting setsid (util-linux)", &e))?;
    // The command holds copies of the terminal's far end; the near end reports EIO (end of
    // output) only once every copy is closed.
    drop(process);
    // setsid does not fork (it is no group leader), so the session's id is its pid.
    let mut killer = GroupKiller::new(child.id());
    let reader = tokio::fs::File::from_std(std::fs::File::from(clone(&pty.master)?));
    let writer = tokio::fs::File::from_std(std::fs::File::from(clone(&pty.master)?));
    let StreamIo {
        stdin,
        stdout,
        resize,
        ..
    } = io;
    let run = async {
        let wait = async {
            let status = child.wait().await;
            killer.kill();
            status
        };
        tokio::join!(wait, forward_output(Some(reader), stdout)).0
    };
    // End of input on a terminal is ^D, as a user would type it.
    let status = tokio::select! {
        status = run => status,
        () = forward_stdin(stdin, Some(writer), Some(b"\x04")) => unreachable_pending(),
        () = apply_resizes(pty.master, resize) => unreachable_pending(),
    };
    status
        .map(exit_status)
        .map_err(|e| ProviderError::transient(format!("waiting for the exec'd process: {e}")))
}
