//! HTTPS client of the agent API with mutual TLS, for the cells provider.
//!
//! One HTTP/1.1 connection per call: calls are rare (apply, long-poll, streams), and a fresh
//! connection per long-lived stream keeps them independent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use crate::frame::{Frame, FrameCodec, FrameError, PORT_FORWARD_PROTOCOL, STREAM_PROTOCOL};
use crate::services::{ServiceRoutes, ServiceRoutesStatus};
use crate::types::{
    ApplyPodRequest, ApplyPodResponse, AttachOptions, ErrorBody, ExecOptions, LogOptions,
    PodStatusResponse, StatsResponse, StreamEnd, TerminalSize, VersionInfo, VolumeContent,
};
use crate::{API_PREFIX, SERVER_NAME};

/// Errors of [`CellClient`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A PEM input did not contain what it should.
    #[error("TLS material: {0}")]
    Pem(String),
    /// rustls refused the configuration (e.g. a key that does not match the certificate).
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] rustls::Error),
    /// TCP connect or TLS handshake failed (an unknown CA or a refused client certificate ends
    /// up here).
    #[error("connecting to the cell agent at {addr}: {source}")]
    Connect {
        /// The agent's address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No answer within the deadline.
    #[error("the cell agent at {0} did not answer in time")]
    Timeout(SocketAddr),
    /// HTTP-level failure.
    #[error("HTTP exchange with the cell agent: {0}")]
    Http(#[from] hyper::Error),
    /// The agent answered with an error.
    #[error("cell agent answered {status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// [`ErrorBody::code`].
        code: String,
        /// [`ErrorBody::message`].
        message: String,
    },
    /// A body that is not the expected JSON.
    #[error("unexpected answer from the cell agent: {0}")]
    Decode(String),
    /// An exec/attach stream broke.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// TLS settings of the client: the CA that signed the agent's certificate and the provider's
/// own client certificate.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls { .. }")
    }
}

/// Certificates from a PEM document.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Pem(format!("reading certificates: {e}")))?;
    if certs.is_empty() {
        return Err(ClientError::Pem("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// The first private key of a PEM document.
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, ClientError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| ClientError::Pem(format!("reading private key: {e}")))?
        .ok_or_else(|| ClientError::Pem("no PRIVATE KEY block found".into()))
}

impl ClientTls {
    /// From PEM: the CA certificate(s) to trust, the client certificate chain and its key.
    pub fn from_pem(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs_from_pem(ca_pem)? {
            roots.add(ca)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)?;
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// From a prepared rustls configuration (e.g. one without a client certificate, in tests).
    pub fn from_config(config: rustls::ClientConfig) -> Self {
        Self {
            config: Arc::new(config),
        }
    }
}

/// Client of one cell agent.
#[derive(Debug, Clone)]
pub struct CellClient {
    addr: SocketAddr,
    tls: ClientTls,
    server_name: ServerName<'static>,
    timeout: Duration,
}

/// A connection upgraded for exec or attach: send input frames, read output frames.
pub type StreamConnection = Framed<TokioIo<hyper::upgrade::Upgraded>, FrameCodec>;

/// A byte stream to a port in the pod network (port-forward).
pub type PortForwardStream = TokioIo<hyper::upgrade::Upgraded>;

/// An exec or attach session.
#[derive(Debug)]
pub struct StreamSession {
    conn: StreamConnection,
}

/// Output of a session, as [`StreamSession::next_output`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamOutput {
    /// Bytes from stdout (or the terminal).
    Stdout(Bytes),
    /// Bytes from stderr.
    Stderr(Bytes),
    /// The process ended (or the stream failed); nothing follows.
    End(StreamEnd),
}

impl StreamSession {
    /// Sends bytes to the process's stdin.
    pub async fn write_stdin(&mut self, data: impl Into<Bytes>) -> Result<(), ClientError> {
        Ok(self.conn.send(Frame::Stdin(data.into())).await?)
    }

    /// Closes the process's stdin.
    pub async fn close_stdin(&mut self) -> Result<(), ClientError> {
        Ok(self.conn.send(Frame::CloseStdin).await?)
    }

    /// Resizes the terminal (tty sessions).
    pub async fn resize(&mut self, width: u16, height: u16) -> Result<(), ClientError> {
        Ok(self
            .conn
            .send(Frame::Resize(TerminalSize { width, height }))
            .await?)
    }

    /// The next output; `None` when the connection closed without an end frame.
    pub async fn next_output(&mut self) -> Result<Option<StreamOutput>, ClientError> {
        loop {
            match self.conn.next().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Frame::Stdout(b))) => return Ok(Some(StreamOutput::Stdout(b))),
                Some(Ok(Frame::Stderr(b))) => return Ok(Some(StreamOutput::Stderr(b))),
                Some(Ok(Frame::End(end))) => return Ok(Some(StreamOutput::End(end))),
                // Input kinds are not sent by the agent; ignore rather than fail.
                Some(Ok(_)) => {}
            }
        }
    }

    /// Reads everything until the end: (stdout, stderr, end).
    pub async fn collect(mut self) -> Result<(Vec<u8>, Vec<u8>, StreamEnd), ClientError> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match self.next_output().await? {
                Some(StreamOutput::Stdout(b)) => out.extend_from_slice(&b),
                Some(StreamOutput::Stderr(b)) => err.extend_from_slice(&b),
                Some(StreamOutput::End(end)) => return Ok((out, err, end)),
                None => {
                    return Err(ClientError::Decode(
                        "stream closed without an end frame".into(),
                    ));
                }
            }
        }
    }

    /// The underlying framed connection, e.g. to split it into a sink and a stream.
    pub fn into_inner(self) -> StreamConnection {
        self.conn
    }
}

/// Percent-encodes a query component (RFC 3986 unreserved characters stay).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Builds `a=1&b=2` from pairs.
fn query(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn flag(pairs: &mut Vec<(&'static str, String)>, name: &'static str, on: bool) {
    if on {
        pairs.push((name, "true".into()));
    }
}

impl CellClient {
    /// A client for the agent at `addr`, verifying its certificate against the CA in `tls`
    /// and the fixed name [`SERVER_NAME`].
    pub fn new(addr: SocketAddr, tls: ClientTls) -> Self {
        Self {
            addr,
            tls,
            server_name: server_name(),
            timeout: Duration::from_secs(30),
        }
    }

    /// Deadline for connecting and for the answer's headers of ordinary calls (default 30 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The agent's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let addr = self.addr;
        let connect_err = move |source| ClientError::Connect { addr, source };
        let tcp = TcpStream::connect(addr).await.map_err(connect_err)?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(self.tls.config.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(connect_err)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            // Errors surface on the request side; the connection task just ends.
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        upgrade: Option<&str>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let fut = async {
            let mut sender = self.connect().await?;
            let mut req = Request::builder()
                .method(method)
                .uri(format!("{API_PREFIX}{path_and_query}"))
                .header(header::HOST, SERVER_NAME);
            if body.is_some() {
                req = req.header(header::CONTENT_TYPE, "application/json");
            }
            if let Some(proto) = upgrade {
                req = req
                    .header(header::CONNECTION, "upgrade")
                    .header(header::UPGRADE, proto);
            }
            let req = req
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| ClientError::Decode(format!("building request: {e}")))?;
            Ok::<_, ClientError>(sender.send_request(req).await?)
        };
        let resp = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout(self.addr))??;
        let ok = if upgrade.is_some() {
            resp.status() == StatusCode::SWITCHING_PROTOCOLS
        } else {
            resp.status().is_success()
        };
        if ok {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => (e.code, e.message),
            Err(_) => (
                "Unknown".into(),
                String::from_utf8_lossy(&body).chars().take(500).collect(),
            ),
        };
        Err(ClientError::Api {
            status,
            code,
            message,
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Decode(format!("encoding request: {e}")))?;
        let resp = self.send(method, path, body, None).await?;
        let bytes = resp.into_body().collect().await?.to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `GET /v1/ping`: the agent is up and accepts this client.
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.send(Method::GET, "/ping", None, None).await.map(drop)
    }

    /// `GET /v1/version`.
    pub async fn version(&self) -> Result<VersionInfo, ClientError> {
        self.json(Method::GET, "/version", None::<&()>).await
    }

    /// `PUT /v1/pod`: makes `request` the desired pod (idempotent).
    pub async fn apply_pod(
        &self,
        request: &ApplyPodRequest,
    ) -> Result<ApplyPodResponse, ClientError> {
        self.json(Method::PUT, "/pod", Some(request)).await
    }

    /// `DELETE /v1/pod?gracePeriodSeconds=N`: stops the pod's containers (preStop hooks,
    /// SIGTERM, grace period, SIGKILL) and removes the pod. Returns when everything is gone.
    pub async fn delete_pod(&self, grace_period: Option<Duration>) -> Result<(), ClientError> {
        let q = grace_period.map_or(String::new(), |g| {
            format!("?gracePeriodSeconds={}", g.as_secs())
        });
        let client = self.clone().with_timeout(
            self.timeout
                .max(grace_period.unwrap_or_default() + Duration::from_secs(30)),
        );
        client
            .send(Method::DELETE, &format!("/pod{q}"), None, None)
            .await
            .map(drop)
    }

    /// `GET /v1/pod/status?after=V&waitSeconds=S`: the pod status; with `after`, waits (at most
    /// `wait`) until the status version is greater than `after`, then answers.
    pub async fn pod_status(
        &self,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<PodStatusResponse, ClientError> {
        let path = match after {
            Some(v) => format!("/pod/status?after={v}&waitSeconds={}", wait.as_secs()),
            None => "/pod/status".into(),
        };
        let client = self
            .clone()
            .with_timeout(self.timeout.max(wait + Duration::from_secs(10)));
        client.json(Method::GET, &path, None::<&()>).await
    }

    /// `GET /v1/stats`.
    pub async fn stats(&self) -> Result<StatsResponse, ClientError> {
        self.json(Method::GET, "/stats", None::<&()>).await
    }

    /// `PUT /v1/volumes/{name}`: replaces a file-backed volume's content atomically.
    pub async fn update_volume(
        &self,
        name: &str,
        content: &VolumeContent,
    ) -> Result<(), ClientError> {
        let body = serde_json::to_vec(content)
            .map_err(|e| ClientError::Decode(format!("encoding request: {e}")))?;
        self.send(
            Method::PUT,
            &format!("/volumes/{}", encode(name)),
            Some(body),
            None,
        )
        .await
        .map(drop)
    }

    /// `PUT /v1/services`: makes `routes` the pod's Service routes unless the agent holds a
    /// newer table; answers what is in force (a table kept but not installed is a success
    /// whose `problems` say why).
    pub async fn put_services(
        &self,
        routes: &ServiceRoutes,
    ) -> Result<ServiceRoutesStatus, ClientError> {
        self.json(Method::PUT, "/services", Some(routes)).await
    }

    /// `GET /v1/services`: the Service routes table in force and its problems.
    pub async fn services(&self) -> Result<ServiceRoutesStatus, ClientError> {
        self.json(Method::GET, "/services", None::<&()>).await
    }

    /// `GET /v1/logs/{container}`: the log as a stream of byte chunks (ends with the log, or
    /// with the container when following).
    pub async fn logs(
        &self,
        container: &str,
        options: &LogOptions,
    ) -> Result<impl Stream<Item = Result<Bytes, ClientError>> + Send + 'static, ClientError> {
        let mut q: Vec<(&str, String)> = Vec::new();
        flag(&mut q, "follow", options.follow);
        flag(&mut q, "timestamps", options.timestamps);
        flag(&mut q, "previous", options.previous);
        if let Some(n) = options.tail_lines {
            q.push(("tailLines", n.to_string()));
        }
        if let Some(n) = options.since_seconds {
            q.push(("sinceSeconds", n.to_string()));
        }
        if let Some(t) = &options.since_time {
            q.push(("sinceTime", t.clone()));
        }
        if let Some(n) = options.limit_bytes {
            q.push(("limitBytes", n.to_string()));
        }
        let resp = self
            .send(
                Method::GET,
                &format!("/logs/{}?{}", encode(container), query(&q)),
                None,
                None,
            )
            .await?;
        Ok(
            http_body_util::BodyStream::new(resp.into_body()).filter_map(|frame| async move {
                match frame {
                    Ok(f) => f.into_data().ok().map(Ok),
                    Err(e) => Some(Err(ClientError::Http(e))),
                }
            }),
        )
    }

    /// Reads the whole log (no follow) into a string.
    pub async fn logs_string(
        &self,
        container: &str,
        options: &LogOptions,
    ) -> Result<String, ClientError> {
        let mut stream = Box::pin(self.logs(container, options).await?);
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    async fn upgrade(
        &self,
        path: &str,
        protocol: &str,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, ClientError> {
        let resp = self.send(Method::POST, path, None, Some(protocol)).await?;
        let upgraded = hyper::upgrade::on(resp).await?;
        Ok(TokioIo::new(upgraded))
    }

    /// `POST /v1/exec/{container}` (upgraded): runs a command in the container.
    pub async fn exec(
        &self,
        container: &str,
        options: &ExecOptions,
    ) -> Result<StreamSession, ClientError> {
        let mut q: Vec<(&str, String)> = options
            .command
            .iter()
            .map(|c| ("command", c.clone()))
            .collect();
        flag(&mut q, "stdin", options.stdin);
        flag(&mut q, "stdout", options.stdout);
        flag(&mut q, "stderr", options.stderr);
        flag(&mut q, "tty", options.tty);
        let io = self
            .upgrade(
                &format!("/exec/{}?{}", encode(container), query(&q)),
                STREAM_PROTOCOL,
            )
            .await?;
        Ok(StreamSession {
            conn: Framed::new(io, FrameCodec),
        })
    }

    /// `POST /v1/attach/{container}` (upgraded): the running container's stdio.
    pub async fn attach(
        &self,
        container: &str,
        options: &AttachOptions,
    ) -> Result<StreamSession, ClientError> {
        let mut q: Vec<(&str, String)> = Vec::new();
        flag(&mut q, "stdin", options.stdin);
        flag(&mut q, "stdout", options.stdout);
        flag(&mut q, "stderr", options.stderr);
        let io = self
            .upgrade(
                &format!("/attach/{}?{}", encode(container), query(&q)),
                STREAM_PROTOCOL,
            )
            .await?;
        Ok(StreamSession {
            conn: Framed::new(io, FrameCodec),
        })
    }

    /// `POST /v1/portforward?port=P` (upgraded): a byte stream to `port` on the pod's
    /// loopback. The agent connects before answering, so a closed port is an error here.
    pub async fn port_forward(&self, port: u16) -> Result<PortForwardStream, ClientError> {
        self.upgrade(&format!("/portforward?port={port}"), PORT_FORWARD_PROTOCOL)
            .await
    }
}

/// [`SERVER_NAME`] as a TLS server name; it is a valid DNS name, so the fallback (which would
/// fail verification) is never used.
fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).unwrap_or(ServerName::IpAddress(
        std::net::Ipv4Addr::UNSPECIFIED.into(),
    ))
}
