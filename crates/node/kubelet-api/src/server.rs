//! The accept loop: TLS, then authentication and authorization, then the router.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::auth::{Attributes, Auth, UserInfo};
use crate::tls::user_from_certificate;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections get to finish after shutdown is requested.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The user named by the connection's verified client certificate, if any.
#[derive(Debug, Clone)]
struct CertificateUser(Option<UserInfo>);

/// Wraps `router` so that every request is authenticated and authorized first; the
/// authenticated [`UserInfo`] is in the request's extensions for handlers that want it.
pub fn protect(router: Router, auth: Arc<Auth>) -> Router {
    router.layer(middleware::from_fn_with_state(
        auth,
        authenticate_and_authorize,
    ))
}

async fn authenticate_and_authorize(
    State(auth): State<Arc<Auth>>,
    mut request: Request,
    next: Next,
) -> Response {
    let certificate_user = request
        .extensions()
        .get::<CertificateUser>()
        .and_then(|c| c.0.clone());
    let user = match auth
        .authenticate(certificate_user.as_ref(), request.headers())
        .await
    {
        Ok(user) => user,
        Err(rejection) => return reject(rejection),
    };
    let attributes = Attributes::of(request.method(), request.uri().path());
    if let Err(rejection) = auth.authorize(&user, attributes).await {
        tracing::info!(user = %user.name, path = request.uri().path(), "{rejection}");
        return reject(rejection);
    }
    request.extensions_mut().insert(user);
    next.run(request).await
}

fn reject(rejection: crate::auth::Rejection) -> Response {
    (rejection.status(), rejection.to_string()).into_response()
}

/// Serves `app` over TLS on `listener` until `shutdown` completes, then lets open
/// connections finish (streams included) for up to 30 s.
///
/// `app` should already be wrapped with [`protect`]; the connection's verified client
/// certificate is made available to it.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    app: Router,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    tracing::warn!("accepting a kubelet API connection: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(err)) => {
                    tracing::debug!(%peer, "TLS handshake failed: {err}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let certificate_user = CertificateUser(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(user_from_certificate),
            );
            let service = app.map_request(move |mut request: Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(certificate_user.clone());
                request.map(Body::new)
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let connection = builder.serve_connection_with_upgrades(
                TokioIo::new(tls),
                TowerToHyperService::new(service),
            );
            if let Err(err) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(%peer, "kubelet API connection ended: {err}");
            }
        });
    }
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("kubelet API connections still open after {DRAIN_TIMEOUT:?}; closing them");
    }
}
