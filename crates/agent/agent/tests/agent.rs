//! The agent end to end through its HTTPS API and the cell-api client, as root with busybox.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use updraft_cell_api::{
    CellClient, ClientError, ClientTls, ExecOptions, LogOptions, StreamOutput, VolumeContent,
    VolumeFile,
};

const SHARED_POD: &str = r#"
metadata: {name: shared, namespace: default}
spec:
  restartPolicy: Always
  terminationGracePeriodSeconds: 2
  volumes:
  - {name: data, emptyDir: {}}
  - {name: cfg, configMap: {name: cfg}}
  initContainers:
  - name: init
    image: busybox
    command: [sh, -c, 'echo from-init > /data/init.txt']
    volumeMounts: [{name: data, mountPath: /data}]
  containers:
  - name: server
    image: busybox
    command: [sh, -c, 'cat /data/init.txt; while true; do echo pong | nc -l -p 8080; done']
    volumeMounts: [{name: data, mountPath: /data}]
  - name: client
    image: busybox
    stdin: true
    command: [sh, -c, 'until nc 127.0.0.1 8080 </dev/null | grep -q pong; do sleep 0.2; done; echo got-pong; while read line; do echo "in:$line"; done; sleep 1000']
    volumeMounts: [{name: data, mountPath: /data}, {name: cfg, mountPath: /cfg}]
"#;

fn cfg(value: &str) -> VolumeContent {
    VolumeContent {
        files: vec![VolumeFile {
            path: "key".into(),
            content: value.as_bytes().to_vec(),
            mode: None,
        }],
    }
}

#[tokio::test]
async fn init_and_app_containers_share_volumes_and_localhost_with_exec_logs_and_forwarding() {
    let t = start_agent(None).await;
    let c = &t.client;
    c.ping().await.unwrap();
    let mut req = pod(SHARED_POD);
    req.volumes.insert("cfg".into(), cfg("v1"));
    let applied = c.apply_pod(&req).await.unwrap();
    // Idempotent: the same request again changes nothing.
    let again = c.apply_pod(&req).await.unwrap();
    assert_eq!(applied.uid, again.uid);

    let status = wait_status(c, "both app containers running and Ready", |s| {
        running(s, "server") && running(s, "client") && ready(s)
    })
    .await;
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let init = container(&status, "init").unwrap();
    let term = init.state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!(
        (term.exit_code, term.reason.as_deref()),
        (0, Some("Completed"))
    );

    // Logs: the init container's file reached the server; the client talked to it on localhost.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let client_log = c
            .logs_string("client", &LogOptions::default())
            .await
            .unwrap();
        if client_log.contains("got-pong") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "client log: {client_log:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let server_log = c
        .logs_string("server", &LogOptions::default())
        .await
        .unwrap();
    assert!(server_log.starts_with("from-init\n"), "{server_log:?}");
    let stamped = c
        .logs_string(
            "server",
            &LogOptions {
                timestamps: true,
                tail_lines: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(
        stamped.ends_with(" from-init\n") && stamped.contains('T'),
        "{stamped:?}"
    );

    // Exec: output, exit codes, stdin.
    let (out, _, code) = exec(c, "client", &["sh", "-c", "cat /data/init.txt; exit 3"]).await;
    assert_eq!((out.as_str(), code), ("from-init\n", 3));
    let mut s = c
        .exec(
            "client",
            &ExecOptions {
                command: vec!["cat".into()],
                stdin: true,
                stdout: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    s.write_stdin("hello stdin").await.unwrap();
    s.close_stdin().await.unwrap();
    let (out, _, end) = s.collect().await.unwrap();
    assert_eq!(
        (out.as_slice(), end.exit_code),
        (&b"hello stdin"[..], Some(0))
    );

    // Exec with a terminal: the resize reaches the process.
    let mut s = c
        .exec(
            "client",
            &ExecOptions {
                command: vec!["sh".into(), "-c".into(), "read x; stty size".into()],
                stdin: true,
                stdout: true,
                tty: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    s.resize(123, 45).await.unwrap();
    s.write_stdin("go\n").await.unwrap();
    let (out, _, end) = s.collect().await.unwrap();
    assert!(
        String::from_utf8_lossy(&out).contains("45 123"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(end.exit_code, Some(0));

    // Attach: stdin of the container, its output back.
    let mut a = c
        .attach(
            "client",
            &updraft_cell_api::AttachOptions {
                stdin: true,
                stdout: true,
                stderr: true,
            },
        )
        .await
        .unwrap();
    a.write_stdin("attached\n").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match a.next_output().await.unwrap() {
                Some(StreamOutput::Stdout(b))
                    if String::from_utf8_lossy(&b).contains("in:attached") =>
                {
                    return true;
                }
                Some(StreamOutput::End(_)) | None => return false,
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert!(got, "attach saw the container echo its stdin");
    drop(a);

    // Port-forward to the server on the pod's localhost.
    let mut pf = c.port_forward(8080).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), pf.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, b"pong\n");
    let closed = c.port_forward(9).await;
    assert!(
        matches!(closed, Err(ClientError::Api { ref message, .. }) if message.contains("port 9")),
        "{closed:?}"
    );

    // configMap update seen inside the container.
    let (out, _, _) = exec(c, "client", &["cat", "/cfg/key"]).await;
    assert_eq!(out, "v1");
    c.update_volume("cfg", &cfg("v2")).await.unwrap();
    let (out, _, _) = exec(c, "client", &["cat", "/cfg/key"]).await;
    assert_eq!(out, "v2");
    let err = c.update_volume("data", &cfg("x")).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Api { ref code, .. } if code == "NotFound"),
        "{err}"
    );

    // Follow: new output arrives on an open log stream.
    let mut follow = Box::pin(
        c.logs(
            "client",
            &LogOptions {
                follow: true,
                tail_lines: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap(),
    );
    let mut a = c
        .attach(
            "client",
            &updraft_cell_api::AttachOptions {
                stdin: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    a.write_stdin("followed\n").await.unwrap();
    let chunk = tokio::time::timeout(Duration::from_secs(20), follow.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&chunk[..], b"in:followed\n");

    // Stats from the cgroups and the pod netns.
    let stats = c.stats().await.unwrap();
    assert!(
        stats.pod.memory_usage_bytes > 0 && stats.pod.cpu_usage_nanos > 0,
        "{stats:?}"
    );
    assert_eq!(stats.containers.len(), 2, "{stats:?}");
    assert!(
        stats
            .network
            .iter()
            .any(|n| n.name == "lo" && n.rx_bytes > 0),
        "{stats:?}"
    );

    // Errors are clear JSON.
    let err = c
        .logs_string("nope", &LogOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Api { ref message, .. } if message.contains("nope")),
        "{err}"
    );
    t.finish().await;
}

#[tokio::test]
async fn crash_loop_backoff_previous_logs_and_oom_kill() {
    let t = start_agent(Some(Duration::from_secs(2))).await;
    let c = &t.client;
    let req = pod(r#"
metadata: {name: crash}
spec:
  restartPolicy: Always
  containers:
  - name: crash
    image: busybox
    command: [sh, -c, 'echo run; echo bye > /dev/termination-log; exit 1']
"#);
    c.apply_pod(&req).await.unwrap();
    let status = wait_status(c, "CrashLoopBackOff after restarts", |s| {
        container(s, "crash").is_some_and(|c| {
            c.restart_count >= 2
                && c.state
                    .as_ref()
                    .and_then(|st| st.waiting.as_ref())
                    .is_some_and(|w| w.reason.as_deref() == Some("CrashLoopBackOff"))
        })
    })
    .await;
    let cs = container(&status, "crash").unwrap();
    let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!((last.exit_code, last.reason.as_deref()), (1, Some("Error")));
    assert_eq!(last.message.as_deref(), Some("bye\n"));
    let previous = c
        .logs_string(
            "crash",
            &LogOptions {
                previous: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(previous, "run\n");

    // A new pod (other UID) replaces it: OOM under a memory limit, restartPolicy Never.
    let req = pod(r#"
metadata: {name: oom}
spec:
  restartPolicy: Never
  containers:
  - name: hog
    image: busybox
    command: [tail, /dev/zero]
    resources: {limits: {memory: 16Mi}}
"#);
    c.apply_pod(&req).await.unwrap();
    let status = wait_status(c, "OOMKilled and Failed", |s| {
        s.phase.as_deref() == Some("Failed")
    })
    .await;
    let term = container(&status, "hog")
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .unwrap();
    assert_eq!(
        (term.reason.as_deref(), term.exit_code),
        (Some("OOMKilled"), 137)
    );
    t.finish().await;
}

#[tokio::test]
async fn cpu_limit_throttles_and_probes_drive_ready_and_restarts() {
    let t = start_agent(None).await;
    let c = &t.client;
    let req = pod(r#"
metadata: {name: probes}
spec:
  containers:
  - name: app
    image: busybox
    command: [sh, -c, 'touch /tmp/ready; while :; do :; done']
    resources: {limits: {cpu: 100m}}
    readinessProbe: {exec: {command: [test, -f, /tmp/ready]}, periodSeconds: 1, failureThreshold: 1}
    livenessProbe: {exec: {command: [test, '!', -f, /tmp/dead]}, periodSeconds: 1, failureThreshold: 1}
"#);
    c.apply_pod(&req).await.unwrap();
    wait_status(c, "Ready", ready).await;
    // The CPU limit is enforced: the busy loop gets throttled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let stats = c.stats().await.unwrap();
        let app = stats.containers.iter().find(|s| s.name == "app").unwrap();
        if app.usage.cpu_throttled_periods > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never throttled: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Readiness flips with the probe.
    exec(c, "app", &["rm", "/tmp/ready"]).await;
    wait_status(c, "not Ready", |s| !ready(s)).await;
    exec(c, "app", &["touch", "/tmp/ready"]).await;
    wait_status(c, "Ready again", ready).await;
    // Liveness failure restarts the container (a fresh rootfs: the marker is gone).
    exec(c, "app", &["touch", "/tmp/dead"]).await;
    wait_status(c, "restarted and Ready", |s| {
        container(s, "app").is_some_and(|c| c.restart_count == 1) && ready(s)
    })
    .await;
    t.finish().await;
}

#[tokio::test]
async fn clients_without_a_valid_certificate_are_refused() {
    let t = start_agent(None).await;
    t.client.ping().await.unwrap();
    // A certificate from another CA.
    let other = pki();
    let foreign = CellClient::new(
        t.client.addr(),
        ClientTls::from_pem(
            t.pki.ca.as_bytes(),
            other.client_cert.as_bytes(),
            other.client_key.as_bytes(),
        )
        .unwrap(),
    );
    assert!(
        foreign.ping().await.is_err(),
        "a foreign client certificate is refused"
    );
    // No certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    for ca in updraft_cell_api::client::certs_from_pem(t.pki.ca.as_bytes()).unwrap() {
        roots.add(ca).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let anonymous = CellClient::new(t.client.addr(), ClientTls::from_config(config));
    assert!(
        anonymous.ping().await.is_err(),
        "a client without certificate is refused"
    );
    // And the client refuses an agent whose certificate is not from its CA.
    let wrong_ca = CellClient::new(
        t.client.addr(),
        ClientTls::from_pem(
            other.ca.as_bytes(),
            other.client_cert.as_bytes(),
            other.client_key.as_bytes(),
        )
        .unwrap(),
    );
    assert!(wrong_ca.ping().await.is_err());
    // Bad input is a clear 400.
    let raw = t.client.version().await.unwrap();
    assert_eq!(raw.api_versions, ["v1"]);
    let mut bad = pod("metadata: {name: bad}\nspec: {containers: []}");
    bad.pod.metadata.uid = Some("bad".into());
    let err = t.client.apply_pod(&bad).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Api { ref code, ref message, .. } if code == "BadRequest" && message.contains("containers")),
        "{err}"
    );
    let _ = tokio::io::stdout().flush().await;
    t.finish().await;
}

#[tokio::test]
async fn images_are_pulled_from_a_loopback_registry_with_pull_secrets() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry =
        updraft_cell_image::test_support::TestRegistry::start_with_basic_auth("cell", "s3cret")
            .unwrap();
    registry.push_busybox("private/busybox:1").await.unwrap();
    let t = start_agent_with(
        |dir| {
            let store = updraft_cell_image::ImageStore::open(
                dir.join("images"),
                updraft_cell_image::Platform::host(),
            )
            .unwrap();
            std::sync::Arc::new(updraft_cell_agent::images::OciImages::new(store))
        },
        Some(Duration::from_secs(1)),
    )
    .await;
    let c = &t.client;
    let image = format!("{}/private/busybox:1", registry.host());
    let mut req = pod(&format!(
        r#"
metadata: {{name: pulled}}
spec:
  containers:
  - name: app
    image: {image}
    command: [sh, -c, 'echo pulled; sleep 1000']
  - name: missing
    image: {}/nope:1
"#,
        registry.host()
    ));
    req.pull_secrets.push(updraft_cell_api::PullSecret {
        name: "regcred".into(),
        docker_config_json: registry.docker_config_json().into_bytes(),
    });
    c.apply_pod(&req).await.unwrap();
    let status = wait_status(c, "app running, missing image in back-off", |s| {
        running(s, "app")
            && container(s, "missing").is_some_and(|m| {
                m.state
                    .as_ref()
                    .and_then(|st| st.waiting.as_ref())
                    .is_some_and(|w| w.reason.as_deref() == Some("ImagePullBackOff"))
            })
    })
    .await;
    let app = container(&status, "app").unwrap();
    assert!(app.image_id.starts_with("sha256:"), "{}", app.image_id);
    let waiting = container(&status, "missing")
        .and_then(|m| m.state.as_ref())
        .and_then(|s| s.waiting.as_ref())
        .unwrap();
    let message = waiting.message.clone().unwrap_or_default();
    assert!(
        message.contains("nope"),
        "the message names the image: {message}"
    );
    assert!(
        !message.contains("s3cret"),
        "no credentials in messages: {message}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !c
        .logs_string("app", &LogOptions::default())
        .await
        .unwrap()
        .contains("pulled")
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.finish().await;
}

#[tokio::test]
async fn restart_policies_on_failure_never_and_always() {
    let t = start_agent(Some(Duration::from_secs(1))).await;
    let c = &t.client;
    // OnFailure: a failed container runs again, one that succeeded does not; the pod Succeeds.
    let req = pod(r#"
metadata: {name: onfailure}
spec:
  restartPolicy: OnFailure
  volumes: [{name: data, emptyDir: {}}]
  containers:
  - name: flaky
    image: busybox
    command: [sh, -c, 'if [ -f /data/ran ]; then echo second; exit 0; fi; touch /data/ran; echo first; exit 2']
    volumeMounts: [{name: data, mountPath: /data}]
  - name: ok
    image: busybox
    command: [sh, -c, 'exit 0']
"#);
    c.apply_pod(&req).await.unwrap();
    let status = wait_status(c, "Succeeded", |s| s.phase.as_deref() == Some("Succeeded")).await;
    let flaky = container(&status, "flaky").unwrap();
    assert_eq!(flaky.restart_count, 1, "{flaky:?}");
    let last = flaky
        .last_state
        .as_ref()
        .unwrap()
        .terminated
        .as_ref()
        .unwrap();
    assert_eq!((last.exit_code, last.reason.as_deref()), (2, Some("Error")));
    let now = flaky.state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!(
        (now.exit_code, now.reason.as_deref()),
        (0, Some("Completed"))
    );
    let ok = container(&status, "ok").unwrap();
    assert_eq!(ok.restart_count, 0, "a success is not restarted: {ok:?}");
    let previous = LogOptions {
        previous: true,
        ..Default::default()
    };
    assert_eq!(c.logs_string("flaky", &previous).await.unwrap(), "first\n");
    assert_eq!(
        c.logs_string("flaky", &LogOptions::default())
            .await
            .unwrap(),
        "second\n"
    );

    // Never: a failing init container fails the pod; the app container never starts.
    let req = pod(r#"
metadata: {name: never}
spec:
  restartPolicy: Never
  initContainers:
  - name: setup
    image: busybox
    command: [sh, -c, 'exit 7']
  containers:
  - name: app
    image: busybox
    command: [sh, -c, 'echo should-not-run']
"#);
    c.apply_pod(&req).await.unwrap();
    let status = wait_status(c, "Failed", |s| s.phase.as_deref() == Some("Failed")).await;
    let setup = container(&status, "setup").unwrap();
    let term = setup.state.as_ref().unwrap().terminated.as_ref().unwrap();
    assert_eq!((term.exit_code, setup.restart_count), (7, 0), "{setup:?}");
    let app = container(&status, "app").unwrap();
    assert!(
        app.state.as_ref().is_none_or(|s| s.waiting.is_some()) && app.restart_count == 0,
        "the app container never ran: {app:?}"
    );

    // Always: even a container that exits 0 runs again.
    let req = pod(r#"
metadata: {name: always}
spec:
  restartPolicy: Always
  containers:
  - name: app
    image: busybox
    command: [sh, -c, 'echo done; exit 0']
"#);
    c.apply_pod(&req).await.unwrap();
    let status = wait_status(c, "restarted twice", |s| {
        container(s, "app").is_some_and(|a| a.restart_count >= 2)
    })
    .await;
    assert_ne!(status.phase.as_deref(), Some("Succeeded"));
    let last = container(&status, "app")
        .and_then(|a| a.last_state.as_ref())
        .and_then(|l| l.terminated.as_ref())
        .unwrap();
    assert_eq!(
        (last.exit_code, last.reason.as_deref()),
        (0, Some("Completed"))
    );
    t.finish().await;
}

/// Whether a process whose command line is exactly `cmdline` runs in the container.
async fn runs(c: &CellClient, container: &str, cmdline: &str) -> bool {
    let (out, _, _) = exec(c, container, &["ps", "-o", "args"]).await;
    out.lines().any(|l| l.trim() == cmdline)
}

async fn wait_gone(c: &CellClient, container: &str, cmdline: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while runs(c, container, cmdline).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{cmdline:?} still runs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The JSON error body of an answer: (code, message).
fn error_body(body: &str) -> (String, String) {
    let e: updraft_cell_api::ErrorBody =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not an ErrorBody ({e}): {body:?}"));
    (e.code, e.message)
}

#[tokio::test]
async fn garbage_bodies_queries_and_frames_get_clear_errors_and_the_agent_keeps_serving() {
    use futures::SinkExt;
    use tokio_util::codec::Framed;
    use updraft_cell_api::{Frame, FrameCodec};

    let t = start_agent(None).await;
    let c = &t.client;
    let mut req = pod(r#"
metadata: {name: target}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{name: cfg, configMap: {name: cfg}}]
  containers:
  - name: app
    image: busybox
    stdin: true
    command: [sh, -c, 'sleep 1000']
    volumeMounts: [{name: cfg, mountPath: /cfg}]
"#);
    req.volumes.insert("cfg".into(), cfg("v1"));
    c.apply_pod(&req).await.unwrap();
    wait_status(c, "running", |s| running(s, "app")).await;

    let put = |path: &str, content_type: Option<&str>, body: &[u8]| {
        let mut r = format!(
            "PUT {path} HTTP/1.1\r\nHost: updraft-cell\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(ct) = content_type {
            r.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        r.push_str("\r\n");
        let mut r = r.into_bytes();
        r.extend_from_slice(body);
        r
    };
    let json = Some("application/json");
    // Bodies: not JSON, JSON of the wrong shape, no content type, a volume update of garbage.
    for (request, status, names) in [
        (put("/v1/pod", json, b"{not json"), 400, "ApplyPodRequest"),
        (
            put("/v1/pod", json, b"{\"pod\": 5}"),
            422,
            "ApplyPodRequest",
        ),
        (put("/v1/pod", None, b"{}"), 415, "ApplyPodRequest"),
        (
            put("/v1/volumes/cfg", json, b"\x00\xff"),
            400,
            "VolumeContent",
        ),
        (
            put(
                "/v1/volumes/cfg",
                json,
                br#"{"files": [{"path": "k", "content": "!!"}]}"#,
            ),
            422,
            "base64",
        ),
    ] {
        let (got, body) = raw_request(&t, &request).await;
        let (_, message) = error_body(&body);
        assert!(
            got == status && message.contains(names),
            "{} → {got} {message:?}",
            String::from_utf8_lossy(&request)
        );
    }
    // Queries: wrong types are a 400 naming the query.
    for path in [
        "/v1/pod/status?after=abc",
        "/v1/logs/app?tailLines=-1",
        "/v1/pod?gracePeriodSeconds=soon",
    ] {
        let method = if path.starts_with("/v1/pod?") {
            "DELETE"
        } else {
            "GET"
        };
        let (got, body) = raw_request(
            &t,
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        let (code, message) = error_body(&body);
        assert_eq!(
            (got, code.as_str()),
            (400, "BadRequest"),
            "{path}: {message}"
        );
        assert!(message.contains("query"), "{path}: {message}");
    }
    // An unknown route, an upgrade endpoint without the upgrade, HTTP that is not HTTP.
    let (got, body) = raw_request(
        &t,
        b"GET /v2/pod HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!((got, error_body(&body).0.as_str()), (404, "NotFound"));
    let (got, body) = raw_request(
        &t,
        b"POST /v1/exec/app?command=true HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(
        got == 400 && error_body(&body).1.contains("Upgrade"),
        "{got} {body}"
    );
    let (got, _) = raw_request(&t, b"\x16\x03garbage\0\r\n\r\n").await;
    assert_eq!(got, 400, "hyper answers unparsable HTTP with 400");

    // A body over the limit is refused as too large, without reading it all.
    let mut io = raw_tls(&t).await;
    let huge = updraft_cell_agent::server::MAX_BODY_BYTES + 1;
    io.write_all(
        format!("PUT /v1/pod HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {huge}\r\n\r\n[")
            .as_bytes(),
    )
    .await
    .unwrap();
    io.flush().await.unwrap();
    let (got, _) = read_head(&mut io).await;
    assert_eq!(got, 413);
    drop(io);

    // Plain TCP garbage where TLS is expected: the handshake fails, nothing else happens.
    let mut tcp = tokio::net::TcpStream::connect(c.addr()).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut sink)).await;

    // A garbage frame on an exec stream: an end frame names it and the process is killed.
    let exec_head = |path: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: {}\r\nContent-Length: 0\r\n\r\n",
            updraft_cell_api::frame::STREAM_PROTOCOL
        )
    };
    let mut io = raw_tls(&t).await;
    io.write_all(
        exec_head("/v1/exec/app?command=sleep&command=777&stdin=true&stdout=true").as_bytes(),
    )
    .await
    .unwrap();
    let (got, head) = read_head(&mut io).await;
    assert_eq!(got, 101, "{head}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !runs(c, "app", "sleep 777").await {
        assert!(tokio::time::Instant::now() < deadline, "exec never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    io.write_all(&[9, 0, 0, 0, 0]).await.unwrap();
    io.flush().await.unwrap();
    let mut frames = Framed::new(io, FrameCodec);
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(30), frames.next())
            .await
            .unwrap()
        {
            Some(Ok(Frame::End(end))) => break end,
            Some(Ok(_)) => {}
            other => panic!("no end frame: {other:?}"),
        }
    };
    let error = end.error.unwrap_or_default();
    assert!(error.contains("unknown frame kind 9"), "{error}");
    wait_gone(c, "app", "sleep 777").await;

    // A client that goes away: its exec'd process does not stay behind.
    let session = c
        .exec(
            "app",
            &ExecOptions {
                command: vec!["sleep".into(), "778".into()],
                stdin: true,
                stdout: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !runs(c, "app", "sleep 778").await {
        assert!(tokio::time::Instant::now() < deadline, "exec never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(session);
    wait_gone(c, "app", "sleep 778").await;

    // An attach stream that receives an output frame from the client ends with an error.
    let mut io = raw_tls(&t).await;
    io.write_all(exec_head("/v1/attach/app?stdin=true&stdout=true").as_bytes())
        .await
        .unwrap();
    let (got, head) = read_head(&mut io).await;
    assert_eq!(got, 101, "{head}");
    let mut frames = Framed::new(io, FrameCodec);
    frames
        .send(Frame::Stdout(bytes::Bytes::from_static(b"x")))
        .await
        .unwrap();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(30), frames.next())
            .await
            .unwrap()
        {
            Some(Ok(Frame::End(end))) => break end,
            Some(Ok(_)) => {}
            other => panic!("no end frame: {other:?}"),
        }
    };
    assert!(
        end.error
            .as_deref()
            .is_some_and(|e| e.contains("stdout frame")),
        "{end:?}"
    );

    // After all that the agent still serves and the pod still runs, untouched.
    c.ping().await.unwrap();
    let status = c.pod_status(None, Duration::ZERO).await.unwrap().status;
    assert!(running(&status, "app"));
    assert_eq!(container(&status, "app").unwrap().restart_count, 0);
    let (out, _, _) = exec(c, "app", &["cat", "/cfg/key"]).await;
    assert_eq!(out, "v1", "no garbage volume update was applied");
    t.finish().await;
}
