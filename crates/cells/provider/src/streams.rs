//! The optional capabilities through each cell's agent: logs, exec, attach, port-forward,
//! stats, node health.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use updraft_cell_api::{
    AttachOptions, ExecOptions, Frame, LogOptions as AgentLogOptions, StreamSession,
    TerminalSize as AgentTerminalSize,
};
use updraft_provider::{
    ContainerAttach, ContainerExec, ContainerLogs, ContainerStats, Duplex, ExecRequest, ExitStatus,
    LogOptions, LogStream, NodeHealth, PodRef, PodStats, PortForward, ProviderError, ProviderStats,
    Result, StreamIo,
};

use crate::errors::client_error;
use crate::provider::CellsProvider;

fn rfc3339(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    k8s_openapi::jiff::Timestamp::new(
        i64::try_from(since.as_secs()).unwrap_or(0),
        i32::try_from(since.subsec_nanos()).unwrap_or(0),
    )
    .map(|t| t.to_string())
    .unwrap_or_default()
}

fn system_time(text: &str) -> Option<SystemTime> {
    let timestamp: k8s_openapi::jiff::Timestamp = text.parse().ok()?;
    Some(to_system_time(timestamp))
}

fn to_system_time(timestamp: k8s_openapi::jiff::Timestamp) -> SystemTime {
    let seconds = u64::try_from(timestamp.as_second()).unwrap_or(0);
    let nanos = u32::try_from(timestamp.subsec_nanosecond()).unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::new(seconds, nanos)
}

#[async_trait::async_trait]
impl ContainerLogs for CellsProvider {
    async fn logs(&self, pod: &PodRef, container: &str, options: LogOptions) -> Result<LogStream> {
        let client = self.client_of(pod)?;
        let agent_options = AgentLogOptions {
            follow: options.follow,
            tail_lines: options.tail_lines,
            since_seconds: None,
            since_time: options.since.map(rfc3339),
            timestamps: options.timestamps,
            previous: options.previous,
            limit_bytes: options.limit_bytes,
        };
        let stream = client
            .logs(container, &agent_options)
            .await
            .map_err(|e| client_error(&format!("logs of {pod} {container}"), e))?;
        let stream = stream.map(|chunk| chunk.map_err(std::io::Error::other));
        Ok(Box::new(tokio_util::io::StreamReader::new(Box::pin(
            stream,
        ))))
    }
}

/// Connects a client's streams to an agent exec/attach session until the process ends.
async fn bridge(session: StreamSession, io: StreamIo) -> Result<ExitStatus> {
    let (mut sink, mut frames) = session.into_inner().split();
    let StreamIo {
        stdin,
        stdout,
        stderr,
        resize,
        ..
    } = io;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Frame>(16);
    let stdin_tx = tx.clone();
    let read_stdin = async move {
        let Some(mut stdin) = stdin else { return };
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let chunk = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
                    if stdin_tx.send(Frame::Stdin(chunk)).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = stdin_tx.send(Frame::CloseStdin).await;
    };
    let resize_tx = tx;
    let forward_resize = async move {
        let Some(mut resize) = resize else { return };
        while let Some(size) = resize.recv().await {
            let frame = Frame::Resize(AgentTerminalSize {
                width: size.width,
                height: size.height,
            });
            if resize_tx.send(frame).await.is_err() {
                return;
            }
        }
    };
    let send = async move {
        while let Some(frame) = rx.recv().await {
            if sink.send(frame).await.is_err() {
                break;
            }
        }
    };
    let input = async move {
        futures::join!(read_stdin, forward_resize, send);
        // Input is done; the session ends with the process.
        std::future::pending::<()>().await;
    };
    let output = async move {
        let (mut stdout, mut stderr) = (stdout, stderr);
        let result = loop {
            match frames.next().await {
                Some(Ok(Frame::Stdout(bytes))) => {
                    if let Some(out) = stdout.as_mut()
                        && (out.write_all(&bytes).await.is_err() || out.flush().await.is_err())
                    {
                        stdout = None;
                    }
                }
                Some(Ok(Frame::Stderr(bytes))) => {
                    if let Some(err) = stderr.as_mut()
                        && (err.write_all(&bytes).await.is_err() || err.flush().await.is_err())
                    {
                        stderr = None;
                    }
                }
                Some(Ok(Frame::End(end))) => {
                    break match (end.exit_code, end.error) {
                        (Some(code), _) => Ok(ExitStatus::Code(code)),
                        (None, Some(error)) => Err(ProviderError::invalid_input(error)),
                        (None, None) => Err(ProviderError::transient(
                            "the cell agent ended the stream without an exit status",
                        )),
                    };
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    break Err(ProviderError::transient(format!(
                        "the stream from the cell agent broke: {e}"
                    )));
                }
                None => {
                    break Err(ProviderError::transient(
                        "the cell agent closed the stream without an exit status",
                    ));
                }
            }
        };
        // The client sees the end of output before the exit status.
        if let Some(mut out) = stdout {
            let _ = out.shutdown().await;
        }
        if let Some(mut err) = stderr {
            let _ = err.shutdown().await;
        }
        result
    };
    tokio::select! {
        () = input => Err(ProviderError::transient("input ended the session")),
        result = output => result,
    }
}

#[async_trait::async_trait]
impl ContainerExec for CellsProvider {
    async fn exec(&self, request: ExecRequest, io: StreamIo) -> Result<ExitStatus> {
        if request.command.is_empty() {
            return Err(ProviderError::invalid_input(
                "exec needs a command: none was given",
            ));
        }
        let client = self.client_of(&request.pod)?;
        let options = ExecOptions {
            command: request.command.clone(),
            stdin: io.stdin.is_some(),
            stdout: io.stdout.is_some(),
            stderr: io.stderr.is_some(),
            tty: io.tty,
        };
        let session = client
            .exec(&request.container, &options)
            .await
            .map_err(|e| {
                client_error(&format!("exec in {} {}", request.pod, request.container), e)
            })?;
        bridge(session, io).await
    }
}

#[async_trait::async_trait]
impl ContainerAttach for CellsProvider {
    async fn attach(&self, pod: &PodRef, container: &str, io: StreamIo) -> Result<ExitStatus> {
        let client = self.client_of(pod)?;
        let options = AttachOptions {
            stdin: io.stdin.is_some(),
            stdout: io.stdout.is_some(),
            stderr: io.stderr.is_some(),
        };
        let session = client
            .attach(container, &options)
            .await
            .map_err(|e| client_error(&format!("attach to {pod} {container}"), e))?;
        bridge(session, io).await
    }
}

#[async_trait::async_trait]
impl PortForward for CellsProvider {
    async fn port_forward(
        &self,
        pod: &PodRef,
        port: u16,
        mut stream: Box<dyn Duplex>,
    ) -> Result<()> {
        let client = self.client_of(pod)?;
        let mut upstream = client
            .port_forward(port)
            .await
            .map_err(|e| client_error(&format!("port-forward to {pod} port {port}"), e))?;
        // Once connected, either side breaking off ends forwarding normally.
        let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
        Ok(())
    }
}

#[async_trait::async_trait]
impl ProviderStats for CellsProvider {
    async fn pod_stats(&self) -> Result<Vec<PodStats>> {
        let pods = self.running_pods();
        let queries = pods.into_iter().map(|(pod, client, status)| async move {
            let client = client.with_timeout(Duration::from_secs(5));
            let stats = client.stats().await.ok()?;
            let status = status.unwrap_or_default();
            let start_time = status
                .start_time
                .as_ref()
                .map_or(SystemTime::UNIX_EPOCH, |t| to_system_time(t.0));
            let started = |name: &str| {
                status
                    .container_statuses
                    .iter()
                    .flatten()
                    .find(|c| c.name == name)
                    .and_then(|c| c.state.as_ref()?.running.as_ref()?.started_at.as_ref())
                    .map_or(start_time, |t| to_system_time(t.0))
            };
            Some(PodStats {
                time: system_time(&stats.time).unwrap_or_else(SystemTime::now),
                start_time,
                cpu_usage_core_nanoseconds: stats.pod.cpu_usage_nanos,
                cpu_usage_nano_cores: None,
                memory_working_set_bytes: stats.pod.memory_working_set_bytes,
                containers: stats
                    .containers
                    .iter()
                    .map(|c| ContainerStats {
                        name: c.name.clone(),
                        start_time: started(&c.name),
                        cpu_usage_core_nanoseconds: c.usage.cpu_usage_nanos,
                        cpu_usage_nano_cores: None,
                        memory_working_set_bytes: c.usage.memory_working_set_bytes,
                        memory_usage_bytes: Some(c.usage.memory_usage_bytes),
                    })
                    .collect(),
                pod,
            })
        });
        Ok(futures::future::join_all(queries)
            .await
            .into_iter()
            .flatten()
            .collect())
    }
}

#[async_trait::async_trait]
impl NodeHealth for CellsProvider {
    async fn check(&self) -> Result<()> {
        // The garbage collector lists the backend every gcInterval and records the outcome:
        // health costs no extra cloud calls.
        updraft_common::sync::lock(&self.inner.backend_healthy)
            .clone()
            .map_err(ProviderError::transient)
    }
}
