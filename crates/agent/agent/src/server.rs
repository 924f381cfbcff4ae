//! The HTTPS API (routes in `updraft-cell-api`'s crate docs).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use updraft_cell_api::frame::{PORT_FORWARD_PROTOCOL, STREAM_PROTOCOL};
use updraft_cell_api::services::{ServiceRoutes, ServiceRoutesStatus};
use updraft_cell_api::{
    ApplyPodRequest, ApplyPodResponse, ContainerStats, ErrorBody, Frame, FrameCodec, FrameError,
    LogOptions, StatsResponse, StreamEnd, UsageStats, VersionInfo, VolumeContent,
};
use updraft_cell_runtime::{Cgroup, CgroupStats, ExecSpec, Stdio, StdioMode};

use crate::Agent;
use crate::logs::{self, LogStream};

/// An error answer: status and [`ErrorBody`].
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(m: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, m.into())
    }
    fn not_found(m: impl Into<String>) -> Self {
        Self(StatusCode::NOT_FOUND, m.into())
    }
    fn conflict(m: impl Into<String>) -> Self {
        Self(StatusCode::CONFLICT, m.into())
    }
}

impl ApiError {
    /// A body that could not be read as `what`: the rejection's own status (400 malformed,
    /// 413 too large, 415 not JSON, 422 wrong shape) with a message naming the expected type.
    fn body(what: &str, e: &JsonRejection) -> Self {
        Self(
            e.status(),
            format!("the body is not a valid {what}: {}", e.body_text()),
        )
    }
    fn query(what: &str, e: &QueryRejection) -> Self {
        Self::bad(format!("{what} query: {}", e.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match self.0 {
            StatusCode::BAD_REQUEST => "BadRequest",
            StatusCode::PAYLOAD_TOO_LARGE => "TooLarge",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "UnsupportedMediaType",
            StatusCode::UNPROCESSABLE_ENTITY => "Invalid",
            StatusCode::NOT_FOUND => "NotFound",
            StatusCode::CONFLICT => "Conflict",
            StatusCode::SERVICE_UNAVAILABLE => "Unavailable",
            StatusCode::BAD_GATEWAY => "BadGateway",
            _ => "Internal",
        };
        (
            self.0,
            axum::Json(ErrorBody {
                code: code.into(),
                message: self.1,
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Largest request body: a pod's spec with the content of all its configMap/secret volumes
/// (each object is at most about 1 MiB in Kubernetes) and its pull secrets, base64-encoded.
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// The router of the API.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route(
            "/v1/ping",
            get(|| async { axum::Json(serde_json::json!({})) }),
        )
        .route("/v1/version", get(version))
        .route("/v1/pod", put(apply))
        .route("/v1/pod", delete(delete_pod))
        .route("/v1/pod/status", get(status))
        .route("/v1/logs/{container}", get(logs_route))
        .route("/v1/exec/{container}", post(exec))
        .route("/v1/attach/{container}", post(attach))
        .route("/v1/portforward", post(port_forward))
        .route("/v1/stats", get(stats))
        .route("/v1/volumes/{name}", put(update_volume))
        .route("/v1/services", put(put_services))
        .route("/v1/services", get(services_status))
        .fallback(|| async { ApiError::not_found("no such route; this agent serves /v1/...") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(refuse_oversized))
        .with_state(agent)
}

/// Answers a request that announces a body over [`MAX_BODY_BYTES`] at once, before any of it
/// is read (the body limit alone would only trip after reading that much).
async fn refuse_oversized(req: Request, next: axum::middleware::Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| *n > MAX_BODY_BYTES as u64);
    match declared {
        Some(n) => ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a body of {n} bytes exceeds this agent's limit of {MAX_BODY_BYTES} bytes"),
        )
        .into_response(),
        None => next.run(req).await,
    }
}

/// Serves the API on `listener` until `shutdown`: TLS with required client certificates, then
/// HTTP/1.1 with upgrades.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    agent: Arc<Agent>,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let app = router(agent);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => return,
                };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn version(State(agent): State<Arc<Agent>>) -> axum::Json<VersionInfo> {
    axum::Json(VersionInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        api_versions: vec!["v1".into()],
        cgroup_version: agent.cgroup_version().into(),
    })
}

async fn apply(
    State(agent): State<Arc<Agent>>,
    body: Result<axum::Json<ApplyPodRequest>, JsonRejection>,
) -> ApiResult<axum::Json<ApplyPodResponse>> {
    let axum::Json(request) = body.map_err(|e| ApiError::body("ApplyPodRequest", &e))?;
    match agent.apply(request).await {
        Ok((uid, version)) => Ok(axum::Json(ApplyPodResponse { uid, version })),
        Err(e @ crate::PodError::Invalid(_)) => Err(ApiError::bad(e.to_string())),
        Err(e @ crate::PodError::Volume(crate::volumes::VolumeError::BadPath { .. })) => {
            Err(ApiError::bad(e.to_string()))
        }
        Err(e) => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeleteQuery {
    grace_period_seconds: Option<u64>,
}

async fn delete_pod(
    State(agent): State<Arc<Agent>>,
    q: Result<Query<DeleteQuery>, QueryRejection>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    let Query(q) = q.map_err(|e| ApiError::query("delete", &e))?;
    if agent
        .delete(q.grace_period_seconds.map(Duration::from_secs))
        .await
    {
        Ok(axum::Json(serde_json::json!({})))
    } else {
        Err(ApiError::not_found("no pod on this cell"))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusQuery {
    after: Option<u64>,
    wait_seconds: Option<u64>,
}

async fn status(
    State(agent): State<Arc<Agent>>,
    q: Result<Query<StatusQuery>, QueryRejection>,
) -> ApiResult<axum::Json<updraft_cell_api::PodStatusResponse>> {
    let Query(q) = q.map_err(|e| ApiError::query("status", &e))?;
    let mut rx = agent.status();
    if let Some(after) = q.after {
        let wait = Duration::from_secs(q.wait_seconds.unwrap_or(30).min(300));
        let _ = tokio::time::timeout(wait, rx.wait_for(|s| s.version > after)).await;
    }
    let current = rx.borrow().clone();
    Ok(axum::Json(current))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct LogQuery {
    #[serde(default)]
    follow: bool,
    tail_lines: Option<u64>,
    since_seconds: Option<u64>,
    since_time: Option<String>,
    #[serde(default)]
    timestamps: bool,
    #[serde(default)]
    previous: bool,
    limit_bytes: Option<u64>,
}

async fn logs_route(
    State(agent): State<Arc<Agent>>,
    Path(container): Path<String>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ApiError::query("log", &e))?;
    let options = LogOptions {
        follow: q.follow,
        tail_lines: q.tail_lines,
        since_seconds: q.since_seconds,
        since_time: q.since_time,
        timestamps: q.timestamps,
        previous: q.previous,
        limit_bytes: q.limit_bytes,
    };
    let since = logs::since_of(&options).map_err(ApiError::bad)?;
    let pod = agent
        .pod()
        .await
        .ok_or_else(|| ApiError::not_found("no pod on this cell"))?;
    let log = pod
        .log(&container)
        .ok_or_else(|| ApiError::not_found(format!("no container {container:?} in the pod")))?;
    let current = log.instance();
    let instance = if options.previous {
        current.checked_sub(1).ok_or_else(|| {
            ApiError::bad(format!(
                "previous terminated container {container:?} not found"
            ))
        })?
    } else {
        current
    };
    let raw = log.read_instance(instance);
    let complete = raw.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
    let mut first = logs::render(&raw[..complete], &options, since);
    let mut limit = options.limit_bytes;
    if let Some(l) = limit {
        first.truncate(l as usize);
        limit = Some(l - first.len() as u64);
    }
    let follow = options.follow && !options.previous && limit != Some(0);
    let headers = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    )];
    if !follow {
        return Ok((headers, first).into_response());
    }
    let path = log.file_of(instance);
    let rx = log.subscribe();
    let timestamps = options.timestamps;
    let state = (Some(Bytes::from(first)), complete as u64, rx, limit, false);
    let stream = futures::stream::unfold(
        state,
        move |(first, mut offset, mut rx, mut limit, done)| {
            let path = path.clone();
            async move {
                if let Some(f) = first.filter(|f| !f.is_empty()) {
                    return Some((Ok::<_, std::io::Error>(f), (None, offset, rx, limit, done)));
                }
                if done {
                    return None;
                }
                loop {
                    // Marked seen before the read: a line written after it wakes `changed`
                    // below (marked after, a line written in between would be lost until the
                    // next one).
                    let (inst, _, ended) = *rx.borrow_and_update();
                    let data = tokio::fs::read(&path).await.unwrap_or_default();
                    let start = (offset as usize).min(data.len());
                    let tail = &data[start..];
                    let complete = tail.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
                    if complete > 0 {
                        offset += complete as u64;
                        let mut out = Vec::new();
                        for l in tail[..complete]
                            .split(|b| *b == b'\n')
                            .filter(|l| !l.is_empty())
                            .filter_map(logs::parse_line)
                        {
                            logs::render_line(&l, timestamps, &mut out);
                        }
                        let mut finished = false;
                        if let Some(l) = limit.as_mut() {
                            out.truncate(*l as usize);
                            *l -= out.len() as u64;
                            finished = *l == 0;
                        }
                        return Some((Ok(Bytes::from(out)), (None, offset, rx, limit, finished)));
                    }
                    if ended || inst != instance {
                        return None;
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            }
        },
    );
    Ok((headers, Body::from_stream(stream)).into_response())
}

fn upgrade_response(protocol: &'static str) -> Response {
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, protocol)
        .body(Body::empty())
        .unwrap_or_default()
}

fn wants_upgrade(req: &Request, protocol: &str) -> ApiResult<()> {
    let ok = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(protocol));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "this endpoint needs `Connection: upgrade` and `Upgrade: {protocol}`"
        )))
    }
}

/// The query's `name=value` pairs, decoded as a form (`%XX`, `+` for a space, invalid UTF-8
/// replaced), the way the kubelet API's endpoints decode theirs.
fn query_pairs(req: &Request) -> Vec<(String, String)> {
    req.uri()
        .query()
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default()
}

fn flag(pairs: &[(String, String)], name: &str) -> bool {
    pairs
        .iter()
        .any(|(k, v)| k == name && (v == "true" || v == "1"))
}

async fn exec(
    State(agent): State<Arc<Agent>>,
    Path(container): Path<String>,
    mut req: Request,
) -> ApiResult<Response> {
    wants_upgrade(&req, STREAM_PROTOCOL)?;
    let pairs = query_pairs(&req);
    let command: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    if command.is_empty() {
        return Err(ApiError::bad("exec needs at least one `command` parameter"));
    }
    let (stdin, tty) = (flag(&pairs, "stdin"), flag(&pairs, "tty"));
    let pod = agent
        .pod()
        .await
        .ok_or_else(|| ApiError::not_found("no pod on this cell"))?;
    if !pod.has_container(&container) {
        return Err(ApiError::not_found(format!(
            "no container {container:?} in the pod"
        )));
    }
    let (target, env) = pod
        .exec_target(&container)
        .ok_or_else(|| ApiError::conflict(format!("container {container:?} is not running")))?;
    let stdio = if tty {
        StdioMode::Tty { rows: 24, cols: 80 }
    } else {
        StdioMode::Pipes { stdin }
    };
    let (mut process, io) = target
        .exec(ExecSpec {
            argv: command,
            env,
            working_dir: None,
            stdio,
        })
        .map_err(|e| ApiError::conflict(format!("exec in {container:?}: {e}")))?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let framed = Framed::new(TokioIo::new(upgraded), FrameCodec);
        let (mut sink, mut source) = framed.split();
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Frame>(16);
        let mut readers = Vec::new();
        let mut stdin_file: Option<tokio::fs::File> = None;
        let mut pty = None;
        match io {
            Stdio::Pipes {
                stdin: sin,
                stdout,
                stderr,
            } => {
                stdin_file = sin.map(tokio::fs::File::from_std);
                for (f, is_err) in [(stdout, false), (stderr, true)] {
                    readers.push(pump(tokio::fs::File::from_std(f), is_err, out_tx.clone()));
                }
            }
            Stdio::Tty(p) => {
                if let Ok(m) = p.master().try_clone() {
                    readers.push(pump(tokio::fs::File::from_std(m), false, out_tx.clone()));
                }
                if let Ok(m) = p.master().try_clone() {
                    stdin_file = Some(tokio::fs::File::from_std(m));
                }
                pty = Some(p);
            }
            Stdio::Null => {}
        }
        drop(out_tx);
        // Input ends when the client goes away (`None`: the process is killed below, nothing
        // keeps running for nobody) or sends a frame this version cannot read (the stream
        // ends with an error naming it).
        let input = async {
            loop {
                let frame = match source.next().await {
                    None => return None,
                    Some(Err(e)) => return Some(e),
                    Some(Ok(frame)) => frame,
                };
                match frame {
                    Frame::Stdin(b) => {
                        if let Some(f) = stdin_file.as_mut() {
                            let _ = f.write_all(&b).await;
                            let _ = f.flush().await;
                        }
                    }
                    Frame::CloseStdin => {
                        if pty.is_some() {
                            // EOF on a terminal is ^D.
                            if let Some(f) = stdin_file.as_mut() {
                                let _ = f.write_all(&[4]).await;
                            }
                        } else {
                            stdin_file = None;
                        }
                    }
                    Frame::Resize(size) => {
                        if let Some(p) = &pty {
                            let _ = p.resize(size.height, size.width);
                        }
                    }
                    Frame::Stdout(_) | Frame::Stderr(_) | Frame::End(_) => {
                        return Some(FrameError::Unexpected(frame.kind_name()));
                    }
                }
            }
        };
        let output = async {
            while let Some(frame) = out_rx.recv().await {
                if sink.send(frame).await.is_err() {
                    break;
                }
            }
            let status = process.wait().await;
            for r in readers {
                let _ = r.await;
            }
            let end = match status {
                Ok(s) => StreamEnd {
                    exit_code: Some(s.code()),
                    error: None,
                },
                Err(e) => StreamEnd {
                    exit_code: None,
                    error: Some(e.to_string()),
                },
            };
            let _ = sink.send(Frame::End(end)).await;
            let _ = sink.close().await;
        };
        let bad_input = tokio::select! {
            bad = input => bad,
            () = output => return,
        };
        // The client is gone or broke the protocol: the exec'd process is killed when
        // `process` drops at the end of this task.
        if let Some(e) = bad_input {
            let _ = process.kill();
            end_with_error(&mut sink, &e).await;
        }
    });
    Ok(upgrade_response(STREAM_PROTOCOL))
}

/// Ends a stream whose client sent something unreadable: an end frame naming the problem.
async fn end_with_error<S>(sink: &mut S, e: &FrameError)
where
    S: futures::Sink<Frame> + Unpin,
{
    tracing::info!(error = %e, "exec/attach stream ended by a bad frame from the client");
    let end = StreamEnd {
        exit_code: None,
        error: Some(format!(
            "bad frame from the client, stream closed: {e} (see updraft_cell_api::frame)"
        )),
    };
    let _ = sink.send(Frame::End(end)).await;
    let _ = sink.close().await;
}

/// Reads a process output into frames until EOF (EIO on a closed terminal counts as EOF).
fn pump(
    mut f: tokio::fs::File,
    is_err: bool,
    tx: tokio::sync::mpsc::Sender<Frame>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match f.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    let frame = if is_err {
                        Frame::Stderr(data)
                    } else {
                        Frame::Stdout(data)
                    };
                    if tx.send(frame).await.is_err() {
                        return;
                    }
                }
            }
        }
    })
}

async fn attach(
    State(agent): State<Arc<Agent>>,
    Path(container): Path<String>,
    mut req: Request,
) -> ApiResult<Response> {
    wants_upgrade(&req, STREAM_PROTOCOL)?;
    let pairs = query_pairs(&req);
    let pod = agent
        .pod()
        .await
        .ok_or_else(|| ApiError::not_found("no pod on this cell"))?;
    let log = pod
        .log(&container)
        .ok_or_else(|| ApiError::not_found(format!("no container {container:?} in the pod")))?;
    if pod.exec_target(&container).is_none() {
        return Err(ApiError::conflict(format!(
            "container {container:?} is not running"
        )));
    }
    let stdin_path = if flag(&pairs, "stdin") {
        Some(pod.stdin_fifo(&container).ok_or_else(|| {
            ApiError::bad(format!(
                "container {container:?} was not started with stdin: true (or uses a tty)"
            ))
        })?)
    } else {
        None
    };
    let (want_out, want_err) = (flag(&pairs, "stdout"), flag(&pairs, "stderr"));
    let instance = log.instance();
    let path = log.file_of(instance);
    let start = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let mut rx = log.subscribe();
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let (mut sink, mut source) = Framed::new(TokioIo::new(upgraded), FrameCodec).split();
        let mut stdin = match stdin_path {
            Some(p) => tokio::net::unix::pipe::OpenOptions::new()
                .open_sender(p)
                .ok(),
            None => None,
        };
        // Input ends when the client goes away or sends a frame it may not send.
        let input = async {
            loop {
                let frame = match source.next().await {
                    None => return None,
                    Some(Err(e)) => return Some(e),
                    Some(Ok(frame)) => frame,
                };
                match frame {
                    Frame::Stdin(b) => {
                        if let Some(s) = stdin.as_mut() {
                            let _ = s.write_all(&b).await;
                        }
                    }
                    Frame::CloseStdin => stdin = None,
                    // Attach has no terminal of its own to resize.
                    Frame::Resize(_) => {}
                    Frame::Stdout(_) | Frame::Stderr(_) | Frame::End(_) => {
                        return Some(FrameError::Unexpected(frame.kind_name()));
                    }
                }
            }
        };
        // Output comes from the container's log (complete lines, by stream).
        let output = async {
            let mut offset = start;
            loop {
                // Marked seen before the read, as in the log follow.
                let (inst, _, ended) = *rx.borrow_and_update();
                let data = tokio::fs::read(&path).await.unwrap_or_default();
                let from = (offset as usize).min(data.len());
                let tail = &data[from..];
                let complete = tail.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
                offset += complete as u64;
                for l in tail[..complete]
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty())
                    .filter_map(logs::parse_line)
                {
                    let mut text = Vec::new();
                    logs::render_line(&l, false, &mut text);
                    let frame = match l.stream {
                        "stderr" if want_err => Frame::Stderr(text.into()),
                        "stdout" if want_out => Frame::Stdout(text.into()),
                        _ => continue,
                    };
                    if sink.send(frame).await.is_err() {
                        return;
                    }
                }
                if complete == 0 {
                    if ended || inst != instance {
                        break;
                    }
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            }
            let _ = sink.send(Frame::End(StreamEnd::default())).await;
            let _ = sink.close().await;
        };
        let bad_input = tokio::select! {
            bad = input => bad,
            () = output => return,
        };
        if let Some(e) = bad_input {
            end_with_error(&mut sink, &e).await;
        }
    });
    let _ = LogStream::Stdout;
    Ok(upgrade_response(STREAM_PROTOCOL))
}

async fn port_forward(State(agent): State<Arc<Agent>>, mut req: Request) -> ApiResult<Response> {
    wants_upgrade(&req, PORT_FORWARD_PROTOCOL)?;
    let pairs = query_pairs(&req);
    let port: u16 = pairs
        .iter()
        .find(|(k, _)| k == "port")
        .and_then(|(_, v)| v.parse().ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiError::bad("port-forward needs `port` = 1..65535"))?;
    let pod = agent
        .pod()
        .await
        .ok_or_else(|| ApiError::not_found("no pod on this cell"))?;
    let mut conn = crate::netns::connect(
        pod.sandbox().netns(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| {
        ApiError(
            StatusCode::BAD_GATEWAY,
            format!("connecting to port {port} in the pod: {e}"),
        )
    })?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let mut io = TokioIo::new(upgraded);
            let _ = tokio::io::copy_bidirectional(&mut io, &mut conn).await;
        }
    });
    Ok(upgrade_response(PORT_FORWARD_PROTOCOL))
}

fn usage(s: &CgroupStats) -> UsageStats {
    UsageStats {
        cpu_usage_nanos: s.cpu_usage_ns,
        cpu_throttled_periods: s.cpu_throttled_periods,
        memory_usage_bytes: s.memory_usage_bytes,
        memory_working_set_bytes: s.memory_working_set_bytes,
        memory_rss_bytes: s.memory_rss_bytes,
        filesystem_used_bytes: 0,
        pids: s.pids,
    }
}

async fn stats(State(agent): State<Arc<Agent>>) -> ApiResult<axum::Json<StatsResponse>> {
    let pod = agent
        .pod()
        .await
        .ok_or_else(|| ApiError::not_found("no pod on this cell"))?;
    let sandbox = pod.sandbox();
    let pod_stats = sandbox
        .stats()
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let driver = updraft_cell_runtime::CgroupDriver::detect()
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let mut containers = Vec::new();
    let mut net_pid = None;
    for name in pod.container_names() {
        if let Some((t, _)) = pod.exec_target(&name) {
            net_pid.get_or_insert(t.pid().as_raw());
        }
        // Open the container's cgroup without owning it (keep() before drop).
        if let Ok(mut cg) = Cgroup::create(&driver, sandbox.cgroup().rel().join(&name)) {
            if let Ok(s) = cg.stats() {
                containers.push(ContainerStats {
                    name,
                    usage: usage(&s),
                });
            }
            cg.keep();
        }
    }
    Ok(axum::Json(StatsResponse {
        time: format!("{}", crate::now()),
        pod: usage(&pod_stats),
        containers,
        network: net_pid.map(crate::pod::read_net_dev).unwrap_or_default(),
    }))
}

async fn update_volume(
    State(agent): State<Arc<Agent>>,
    Path(name): Path<String>,
    body: Result<axum::Json<VolumeContent>, JsonRejection>,
) -> ApiResult<axum::Json<serde_json::Value>> {
    let axum::Json(content) = body.map_err(|e| ApiError::body("VolumeContent", &e))?;
    let pod = agent
        .pod()
        .await
        .ok_or_else(|| ApiError::not_found("no pod on this cell"))?;
    let is_file_volume = pod
        .request()
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|v| v.iter().find(|v| v.name == name))
        .is_some_and(|v| {
            v.config_map.is_some()
                || v.secret.is_some()
                || v.downward_api.is_some()
                || v.projected.is_some()
        });
    if !is_file_volume {
        return Err(ApiError::not_found(format!(
            "no configMap/secret/downwardAPI/projected volume {name:?} in the pod"
        )));
    }
    crate::volumes::write_atomic(&name, &pod.dir().join("volumes").join(&name), &content).map_err(
        |e| match e {
            crate::volumes::VolumeError::BadPath { .. } => ApiError::bad(e.to_string()),
            _ => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
    )?;
    Ok(axum::Json(serde_json::json!({})))
}

/// `PUT /v1/services`: a `200` once the table is kept, also when its rules could not be
/// installed (the answer's problems say why); the install runs `nft`, so off the runtime.
async fn put_services(
    State(agent): State<Arc<Agent>>,
    body: Result<axum::Json<ServiceRoutes>, JsonRejection>,
) -> ApiResult<axum::Json<ServiceRoutesStatus>> {
    let axum::Json(table) = body.map_err(|e| ApiError::body("ServiceRoutes", &e))?;
    let services = agent.services().clone();
    let status = tokio::task::spawn_blocking(move || services.put(table))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("installing the Service routes: {e}"),
            )
        })?;
    Ok(axum::Json(status))
}

/// `GET /v1/services` (off the runtime: it waits for an install under way).
async fn services_status(
    State(agent): State<Arc<Agent>>,
) -> ApiResult<axum::Json<ServiceRoutesStatus>> {
    let services = agent.services().clone();
    let status = tokio::task::spawn_blocking(move || services.status())
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the Service routes: {e}"),
            )
        })?;
    Ok(axum::Json(status))
}
