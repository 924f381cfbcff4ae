//! Containers from a busybox rootfs: output, exit codes, isolation, limits, stop, exec.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use updraft_cell_runtime::{
    Container, ExecSpec, ExitReason, ExitStatus, PodSandbox, Resources, Stdio, StdioMode,
};

#[tokio::test]
async fn runs_busybox_with_output_exit_codes_and_isolation() {
    let env = env();
    let rootfs = busybox_rootfs();
    let id = unique("basic");
    {
        let sandbox = PodSandbox::create(&env.driver, sandbox_spec(&env, &id)).expect("sandbox");
        let (exit, out, _) = run(
            &sandbox,
            container_spec("echo", rootfs.path(), &["echo", "hello"]),
        )
        .await;
        assert_eq!(
            (exit.status, exit.reason, out.as_str()),
            (ExitStatus::Exited(0), ExitReason::Completed, "hello\n")
        );

        // SIGPIPE has its default disposition (the agent's own is ignored): `yes` dies when
        // `head` is done instead of spinning on EPIPE forever.
        let (exit, out, _) = run(
            &sandbox,
            container_spec(
                "pipe",
                rootfs.path(),
                &["sh", "-c", "yes | head -n 2; echo done"],
            ),
        )
        .await;
        assert_eq!(
            (exit.status, out.as_str()),
            (ExitStatus::Exited(0), "y\ny\ndone\n")
        );

        let (exit, _, _) = run(
            &sandbox,
            container_spec("three", rootfs.path(), &["sh", "-c", "exit 3"]),
        )
        .await;
        assert_eq!(
            (exit.status, exit.reason),
            (ExitStatus::Exited(3), ExitReason::Error)
        );

        let script = "hostname; echo $$; ls -d /proc/[0-9]* | wc -l; cat /etc/hostname; grep nameserver /etc/resolv.conf; \
                      ls /work 2>/dev/null && echo host-visible; ls /";
        let (exit, out, err) = run(
            &sandbox,
            container_spec("iso", rootfs.path(), &["sh", "-c", script]),
        )
        .await;
        assert_eq!(exit.status, ExitStatus::Exited(0), "stderr: {err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "pod-a", "hostname");
        assert_eq!(lines[1], "1", "the container process is PID 1");
        let procs: u32 = lines[2].trim().parse().unwrap();
        assert!(
            procs <= 3,
            "/proc shows only the container's processes, saw {procs}"
        );
        assert_eq!(lines[3], "pod-a", "/etc/hostname");
        assert_eq!(lines[4], "nameserver 10.96.0.10");
        assert!(!out.contains("host-visible"), "host /work visible: {out}");
        assert!(
            !out.contains("work") && out.contains("bin"),
            "root listing is the rootfs: {out}"
        );

        let mut spec = container_spec("ro", rootfs.path(), &["sh", "-c", "touch /x"]);
        spec.read_only_rootfs = true;
        let (exit, _, err) = run(&sandbox, spec).await;
        assert_ne!(
            exit.status,
            ExitStatus::Exited(0),
            "read-only rootfs is writable"
        );
        assert!(err.contains("Read-only"), "stderr: {err}");

        let missing = Container::start(
            &sandbox,
            container_spec("nope", rootfs.path(), &["does-not-exist"]),
        );
        assert!(
            matches!(
                &missing,
                Err(updraft_cell_runtime::Error::Setup {
                    stage: "execve",
                    ..
                })
            ),
            "{missing:?}"
        );
    }
    assert_sandbox_gone(&id);
    assert!(
        mounts_mentioning(rootfs.path()).is_empty(),
        "mounts left: {:?}",
        mounts_mentioning(rootfs.path())
    );
}

#[tokio::test]
async fn bind_mounts_are_visible_and_read_only_when_asked() {
    let env = env();
    let rootfs = busybox_rootfs();
    let vol = tempfile::tempdir().unwrap();
    std::fs::write(vol.path().join("data"), "from-volume").unwrap();
    let id = unique("vol");
    {
        let sandbox = PodSandbox::create(&env.driver, sandbox_spec(&env, &id)).expect("sandbox");
        let mut spec = container_spec(
            "v",
            rootfs.path(),
            &[
                "sh",
                "-c",
                "cat /data/data; echo x > /rw/out; echo y > /data/y",
            ],
        );
        spec.mounts = vec![
            updraft_cell_runtime::BindMount {
                source: vol.path().into(),
                destination: "/data".into(),
                read_only: true,
            },
            updraft_cell_runtime::BindMount {
                source: vol.path().into(),
                destination: "/rw".into(),
                read_only: false,
            },
        ];
        let (exit, out, err) = run(&sandbox, spec).await;
        assert_eq!(out, "from-volume");
        assert!(err.contains("Read-only"), "stderr: {err}");
        assert_ne!(exit.status, ExitStatus::Exited(0));
        assert_eq!(
            std::fs::read_to_string(vol.path().join("out")).unwrap(),
            "x\n"
        );
    }
    assert_sandbox_gone(&id);
}

#[tokio::test]
async fn containers_share_the_pod_network_but_not_pids() {
    let env = env();
    let rootfs = busybox_rootfs();
    let id = unique("net");
    {
        let sandbox = PodSandbox::create(&env.driver, sandbox_spec(&env, &id)).expect("sandbox");
        // busybox nc exits when its stdin ends, possibly before it read what the peer sent,
        // and then exits non-zero on the client side although the exchange happened (the
        // old flake). The server's stdin stays open, and success is judged by what each side
        // received, not by nc's exit status.
        let (server, server_io) = Container::start(
            &sandbox,
            container_spec(
                "server",
                rootfs.path(),
                &[
                    "sh",
                    "-c",
                    "while true; do (echo pong; sleep 1000) 2>/dev/null | nc -l -p 7777; done",
                ],
            ),
        )
        .unwrap();
        let client_script = "cat /proc/1/cmdline; echo; for i in $(seq 300); do \
            r=$(echo ping | nc 127.0.0.1 7777); [ \"$r\" = pong ] && exit 0; sleep 0.1; done; exit 1";
        let (exit, out, err) = run(
            &sandbox,
            container_spec("client", rootfs.path(), &["sh", "-c", client_script]),
        )
        .await;
        assert_eq!(
            exit.status,
            ExitStatus::Exited(0),
            "client got no pong over the pod's loopback: {err}"
        );
        assert!(
            out.starts_with("sh\0-c") && !out.starts_with("nc"),
            "client sees its own PID 1: {out:?}"
        );
        let Stdio::Pipes { stdout, .. } = server_io else {
            panic!("pipes expected")
        };
        let first_line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
            line
        });
        let line = tokio::time::timeout(Duration::from_secs(30), first_line)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(line, "ping\n");
        server.stop(Duration::from_secs(1)).await.unwrap();
    }
    assert_sandbox_gone(&id);
}

#[tokio::test]
async fn memory_limit_oom_kills_and_pids_limit_holds() {
    let env = env();
    let rootfs = busybox_rootfs();
    let id = unique("oom");
    {
        let sandbox = PodSandbox::create(&env.driver, sandbox_spec(&env, &id)).expect("sandbox");
        // dd allocates and fills a 256 MiB buffer: real anonymous memory past the 32 MiB limit.
        let mut spec = container_spec(
            "hog",
            rootfs.path(),
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"],
        );
        spec.resources = Resources {
            memory_limit_bytes: Some(32 << 20),
            ..Resources::default()
        };
        let (exit, _, err) = run(&sandbox, spec).await;
        assert_eq!(
            (exit.status, exit.reason),
            (ExitStatus::Signaled(9), ExitReason::OomKilled),
            "stderr: {err}"
        );

        let mut spec = container_spec(
            "small",
            rootfs.path(),
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=1M", "count=1"],
        );
        spec.resources = Resources {
            memory_limit_bytes: Some(32 << 20),
            ..Resources::default()
        };
        let (exit, _, _) = run(&sandbox, spec).await;
        assert_eq!(
            exit.reason,
            ExitReason::Completed,
            "under the limit is no OOM"
        );
    }
    assert_sandbox_gone(&id);
}

#[tokio::test]
async fn stop_is_graceful_for_term_handlers_and_kills_the_whole_tree_otherwise() {
    let env = env();
    let rootfs = busybox_rootfs();
    let id = unique("stop");
    {
        let sandbox = PodSandbox::create(&env.driver, sandbox_spec(&env, &id)).expect("sandbox");
        let trap = "trap 'echo bye; exit 0' TERM; echo ready; while true; do sleep 0.1; done";
        let (c, stdio) = Container::start(
            &sandbox,
            container_spec("trap", rootfs.path(), &["sh", "-c", trap]),
        )
        .unwrap();
        let Stdio::Pipes { mut stdout, .. } = stdio else {
            panic!()
        };
        let mut buf = [0u8; 6];
        stdout.read_exact(&mut buf).unwrap();
        let t = Instant::now();
        let exit = c.stop(Duration::from_secs(10)).await.unwrap();
        assert_eq!(exit.status, ExitStatus::Exited(0));
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "graceful stop took {:?}",
            t.elapsed()
        );

        // PID 1 without a TERM handler ignores TERM; its children form a tree.
        let tree = "sleep 1000 & sleep 1000 & sh -c 'sleep 1000 & wait' & trap '' TERM; wait";
        let (c, _stdio) = Container::start(
            &sandbox,
            container_spec("tree", rootfs.path(), &["sh", "-c", tree]),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let pids = loop {
            let pids = c.procs().unwrap();
            if pids.len() >= 5 || Instant::now() > deadline {
                break pids;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(pids.len(), 5, "tree started: {pids:?}");
        let t = Instant::now();
        let exit = c.stop(Duration::from_millis(500)).await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "killed before the grace period"
        );
        assert_eq!(exit.status, ExitStatus::Signaled(9));
        for pid in pids {
            let cmdline =
                std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            assert!(
                !cmdline.contains("sleep"),
                "process {pid} survived: {cmdline}"
            );
        }
    }
    assert_sandbox_gone(&id);
    assert!(mounts_mentioning(rootfs.path()).is_empty());
}

#[tokio::test]
async fn exec_reports_exit_codes_and_a_pty_exec_resizes() {
    let env = env();
    let rootfs = busybox_rootfs();
    let id = unique("exec");
    {
        let sandbox = PodSandbox::create(&env.driver, sandbox_spec(&env, &id)).expect("sandbox");
        let (c, _io) = Container::start(
            &sandbox,
            container_spec("main", rootfs.path(), &["sleep", "1000"]),
        )
        .unwrap();
        let exec = |argv: &[&str], stdio: StdioMode| {
            c.exec(ExecSpec {
                argv: argv.iter().map(|s| (*s).to_owned()).collect(),
                env: vec![("PATH".into(), "/bin".into())],
                working_dir: None,
                stdio,
            })
        };
        let (mut p, io) = exec(&["sh", "-c", "hostname; cat /proc/1/cmdline; echo; ls /work >/dev/null 2>&1 || echo isolated; exit 5"], StdioMode::Pipes { stdin: false }).unwrap();
        let (out, err) = collect(io).await;
        assert_eq!(
            p.wait().await.unwrap(),
            ExitStatus::Exited(5),
            "stderr: {err}"
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "pod-a");
        assert!(
            lines[1].starts_with("sleep"),
            "exec sees the container's PID 1: {out:?}"
        );
        assert_eq!(lines[2], "isolated");

        let (mut p, io) = exec(
            &["sh", "-c", "stty size; read x; stty size"],
            StdioMode::Tty { rows: 24, cols: 80 },
        )
        .unwrap();
        let Stdio::Tty(pty) = io else { panic!("tty") };
        let mut master = pty.master().try_clone().unwrap();
        let reader = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let mut buf = [0u8; 256];
            // Reading the master ends with EIO once the exec'd process closed the slave.
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&out).contains("24 80")
                    && !String::from_utf8_lossy(&out).contains("go")
                {
                    break;
                }
            }
            (master, out)
        });
        let (mut master, first) = reader.await.unwrap();
        assert!(
            String::from_utf8_lossy(&first).contains("24 80"),
            "{:?}",
            String::from_utf8_lossy(&first)
        );
        pty.resize(50, 132).unwrap();
        master.write_all(b"go\n").unwrap();
        let rest = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            let _ = master.read_to_end(&mut out);
            out
        });
        assert_eq!(p.wait().await.unwrap(), ExitStatus::Exited(0));
        drop(pty);
        let rest = tokio::time::timeout(Duration::from_secs(10), rest)
            .await
            .unwrap()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&rest).contains("50 132"),
            "{:?}",
            String::from_utf8_lossy(&rest)
        );

        let exit = c.stop(Duration::from_millis(200)).await.unwrap();
        assert_eq!(exit.status, ExitStatus::Signaled(9));
    }
    assert_sandbox_gone(&id);
}

#[tokio::test]
async fn pids_limit_holds() {
    let env = env();
    let rootfs = busybox_rootfs();
    let id = unique("pids");
    {
        let sandbox = PodSandbox::create(&env.driver, sandbox_spec(&env, &id)).expect("sandbox");
        // A shell whose fork fails exits ("can't fork"), and when the PID namespace's init
        // exits the kernel kills the whole namespace: so the forking happens in an inner
        // shell, and init reports how it ended and stays alive.
        let script = "sh -c 'for i in $(seq 20); do sleep 1000 & done; wait'; \
                      echo inner-exit=$?; exec sleep 1000";
        let mut spec = container_spec("forks", rootfs.path(), &["sh", "-c", script]);
        spec.resources = Resources {
            pids_max: Some(5),
            ..Resources::default()
        };
        let (c, stdio) = Container::start(&sandbox, spec).unwrap();
        let Stdio::Pipes { stdout, stderr, .. } = stdio else {
            panic!("pipes expected")
        };
        let first_line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
            line
        });
        let line = tokio::time::timeout(Duration::from_secs(30), first_line)
            .await
            .expect("the inner shell ends within 30 s")
            .unwrap();
        assert!(
            line.starts_with("inner-exit=") && line.trim() != "inner-exit=0",
            "the inner shell must fail to fork: {line:?}"
        );
        let pids = c.stats().unwrap().pids;
        assert!(pids <= 5, "pids limit exceeded: {pids}");
        c.stop(Duration::from_millis(100)).await.unwrap();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut err);
        assert!(
            err.contains("can't fork"),
            "stderr names the refused fork: {err:?}"
        );
    }
    assert_sandbox_gone(&id);
}
