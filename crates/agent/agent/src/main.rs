//! `updraft-cell`: the cell agent binary.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use updraft_cell_agent::images::{DirectoryImages, ImageSource, OciImages, PreparedImage};
use updraft_cell_agent::{Agent, Nft, server, tls};
use updraft_cell_api::DEFAULT_AGENT_PORT;

/// Runs one pod on this cell behind an HTTPS API with mutual TLS.
#[derive(Parser, Debug)]
#[command(name = "updraft-cell", version)]
struct Args {
    /// Address to listen on.
    #[arg(
        long,
        env = "UPDRAFT_CELL_LISTEN",
        default_value_t = SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_AGENT_PORT))
    )]
    listen: SocketAddr,
    /// Agent state directory (pod records, logs, volumes, root filesystems).
    #[arg(
        long,
        env = "UPDRAFT_CELL_DIR",
        default_value = "/var/lib/updraft-cell"
    )]
    dir: PathBuf,
    /// Server certificate (PEM) with the DNS name `updraft-cell`.
    #[arg(long, env = "UPDRAFT_CELL_TLS_CERT")]
    tls_cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, env = "UPDRAFT_CELL_TLS_KEY")]
    tls_key: PathBuf,
    /// CA whose client certificates are accepted (the provider's).
    #[arg(long, env = "UPDRAFT_CELL_CLIENT_CA")]
    client_ca: PathBuf,
    /// cgroup path for the pod (relative to the hierarchy root; the local cells backend sets
    /// the environment variable to a cgroup inside the cell's).
    #[arg(long, env = "UPDRAFT_CELL_CGROUP_ROOT", default_value = "updraft-cell")]
    cgroup_root: PathBuf,
    /// Directory images `name=/path/to/rootfs` (repeatable) instead of pulling OCI images
    /// from registries (air-gapped cells, tests).
    #[arg(long = "image-dir")]
    image_dirs: Vec<String>,
    /// The nftables command the pod's Service routes are installed with (Debian package
    /// nftables); without it the agent runs, and `PUT /v1/services` says the rules are missing.
    #[arg(long, env = "UPDRAFT_CELL_NFT", default_value = "nft")]
    nft: PathBuf,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

async fn run(args: Args) -> Result<(), String> {
    let tls = tls::server_config(
        &read(&args.client_ca)?,
        &read(&args.tls_cert)?,
        &read(&args.tls_key)?,
    )
    .map_err(|e| e.to_string())?;
    let images: Arc<dyn ImageSource> = if args.image_dirs.is_empty() {
        let store = updraft_cell_image::ImageStore::open(
            args.dir.join("images"),
            updraft_cell_image::Platform::host(),
        )
        .map_err(|e| format!("opening the image store: {e}"))?;
        Arc::new(OciImages::new(store))
    } else {
        let mut images = DirectoryImages::new(args.dir.join("rootfs"));
        for spec in &args.image_dirs {
            let (name, path) = spec
                .split_once('=')
                .ok_or_else(|| format!("--image-dir {spec:?} must be name=/path"))?;
            images = images.with_image(name, std::path::Path::new(path), PreparedImage::default());
        }
        Arc::new(images)
    };
    let agent = Agent::open(
        args.dir.clone(),
        images,
        args.cgroup_root.clone(),
        Nft::new(&args.nft),
    )
    .await
    .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", args.listen))?;
    tracing::info!(addr = %args.listen, "updraft-cell serving");
    let shutdown = CancellationToken::new();
    let serve = tokio::spawn(server::serve(
        listener,
        tls,
        agent.clone(),
        shutdown.clone(),
    ));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // The pod keeps running: the next agent adopts it.
    shutdown.cancel();
    let _ = serve.await;
    agent.detach().await;
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // The image store's registry client uses rustls with the process-wide provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("updraft-cell: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
