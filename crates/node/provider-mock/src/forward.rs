//! Port-forwarding into mock pods.
//!
//! The mock has no pod network of its own: its "pod network" is the host's loopback. A
//! forward to port P of any running mock pod connects to `127.0.0.1:P`, so a test starts its
//! own TCP server on a free loopback port and hands that port to `kubectl port-forward`.

use std::net::Ipv4Addr;

use tokio::net::TcpStream;
use updraft_provider::{Duplex, PodRef, PortForward, ProviderError, Result};

use crate::MockProvider;

/// Buffer per direction: large enough that a bulk transfer is not syscall-bound.
const COPY_BUFFER: usize = 64 * 1024;

#[async_trait::async_trait]
impl PortForward for MockProvider {
    async fn port_forward(
        &self,
        pod: &PodRef,
        port: u16,
        mut stream: Box<dyn Duplex>,
    ) -> Result<()> {
        let runs = self
            .lock()
            .pods
            .get(&(pod.namespace.clone(), pod.name.clone()))
            .is_some_and(|p| p.pod.uid == pod.uid || pod.uid.is_empty());
        if !runs {
            return Err(ProviderError::not_found(format!(
                "pod {pod} does not run in the mock provider"
            )));
        }
        let mut upstream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .map_err(|err| {
                ProviderError::transient(format!(
                    "connecting to port {port} of pod {pod} (the mock's pod network is 127.0.0.1): {err}"
                ))
            })?;
        let _ = upstream.set_nodelay(true);
        // Once connected, a side breaking off (kubectl resets its data stream when it is done)
        // is the normal end of a forward, not an error to report to the client.
        let _ = tokio::io::copy_bidirectional_with_sizes(
            &mut stream,
            &mut upstream,
            COPY_BUFFER,
            COPY_BUFFER,
        )
        .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use updraft_provider::{Provider as _, ResolvedPod};

    use super::*;
    use crate::MockConfig;

    fn pod() -> k8s_openapi::api::core::v1::Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "web", "uid": "u1"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn a_forward_reaches_a_loopback_server_and_passes_half_closes_on() {
        let mock = MockProvider::new(MockConfig::default());
        let p = pod();
        mock.create_pod(&ResolvedPod::unresolved(p.clone()))
            .await
            .unwrap();
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        let echo = tokio::spawn(async move {
            let (mut conn, _) = server.accept().await.unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).await.unwrap();
            got.reverse();
            conn.write_all(&got).await.unwrap();
        });
        let (client, provider_side) = tokio::io::duplex(1024);
        let pod_ref = PodRef::of(&p);
        let forward = PortForward::port_forward(&mock, &pod_ref, port, Box::new(provider_side));
        let talk = async move {
            let (mut rx, mut tx) = tokio::io::split(client);
            tx.write_all(b"hello").await.unwrap();
            tx.shutdown().await.unwrap();
            let mut answer = Vec::new();
            rx.read_to_end(&mut answer).await.unwrap();
            answer
        };
        let (result, answer) = tokio::join!(forward, talk);
        result.unwrap();
        assert_eq!(answer, b"olleh");
        echo.await.unwrap();
    }

    #[tokio::test]
    async fn a_closed_port_is_an_error_naming_it_and_an_unknown_pod_is_not_found() {
        let mock = MockProvider::new(MockConfig::default());
        let p = pod();
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let (_client, side) = tokio::io::duplex(16);
        let err = PortForward::port_forward(&mock, &PodRef::of(&p), closed, Box::new(side))
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::NotFound { .. }), "{err}");

        mock.create_pod(&ResolvedPod::unresolved(p.clone()))
            .await
            .unwrap();
        let (_client, side) = tokio::io::duplex(16);
        let err = PortForward::port_forward(&mock, &PodRef::of(&p), closed, Box::new(side))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&format!("port {closed}")), "{err}");
    }
}
