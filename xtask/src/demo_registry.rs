//! The demo's image registry: Debian's `docker-registry` on 127.0.0.1 with a busybox image,
//! reachable from inside every local cell at the same `127.0.0.1:<port>`.
//!
//! A cell is its own network namespace, so the host's loopback is not the cell's. Rather than
//! expose the registry on a non-loopback address, the cells' cloud-init (the provider's
//! `cloudInitFile`, merged into every cell's user data) runs `socat` on the cell's loopback,
//! forwarding to a Unix socket on the shared filesystem; a host-side `socat` forwards that
//! socket to the registry. Both host processes are started detached (`cargo xtask demo --down`
//! or `cargo xtask cluster down` stops them).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::OciImageManifest;
use oci_client::secrets::RegistryAuth;
use updraft_cell_image::Platform;
use updraft_cell_image::test_support::{LayerBuilder, TestImage};
use updraft_devcluster::{Layout, cluster};

/// The registry's loopback port.
pub const PORT: u16 = 5055;
/// The registry process's name for `cluster::start_extra`.
pub const REGISTRY: &str = "demo-registry";
/// The host side of the Unix-socket bridge.
pub const BRIDGE: &str = "demo-registry-socket";
/// The image the demo pushes.
pub const IMAGE: &str = "busybox:1";

/// Where the demo keeps its files.
pub fn dir(layout: &Layout) -> PathBuf {
    layout.root().join("demo")
}

fn socket(layout: &Layout) -> PathBuf {
    dir(layout).join("registry.sock")
}

/// The cloud-init file that gives each cell the registry on its own loopback.
pub fn cloud_init(layout: &Layout) -> PathBuf {
    dir(layout).join("registry-cloud-init.yaml")
}

/// `127.0.0.1:<port>/busybox:1`.
pub fn image_reference() -> String {
    format!("127.0.0.1:{PORT}/{IMAGE}")
}

/// Starts the registry and the socket bridge, pushes busybox and writes the cells'
/// cloud-init; returns the image reference.
pub async fn start(layout: &Layout) -> anyhow::Result<String> {
    for (binary, package) in [
        ("/usr/bin/docker-registry", "docker-registry"),
        ("/usr/bin/socat", "socat"),
    ] {
        if !Path::new(binary).exists() {
            bail!(
                "{binary} is missing: apt-get install -y {package} (listed in xtask/apt-packages.txt; `cargo xtask deps` installs it)"
            );
        }
    }
    let dir = dir(layout);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    stop(layout)?;
    if TcpStream::connect(("127.0.0.1", PORT)).is_ok() {
        bail!(
            "127.0.0.1:{PORT} is in use by another program; the demo's registry needs it (stop that program, or `cargo xtask demo --down` if it is an old demo registry)"
        );
    }
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: info\n  formatter: text\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{PORT}\n  secret: updraft-demo\n",
            dir.join("registry-storage").display()
        ),
    )
    .with_context(|| format!("writing {}", config.display()))?;
    cluster::start_extra(
        layout,
        REGISTRY,
        Path::new("/usr/bin/docker-registry"),
        &["serve".into(), config.display().to_string()],
    )?;
    wait_listening(PORT, Duration::from_secs(60)).with_context(|| {
        format!(
            "the registry did not come up; see {}",
            layout.log(REGISTRY).display()
        )
    })?;

    let socket = socket(layout);
    let _ = std::fs::remove_file(&socket);
    cluster::start_extra(
        layout,
        BRIDGE,
        Path::new("/usr/bin/socat"),
        &[
            format!("UNIX-LISTEN:{},fork,unlink-early", socket.display()),
            format!("TCP:127.0.0.1:{PORT}"),
        ],
    )?;
    std::fs::write(
        cloud_init(layout),
        format!(
            "#cloud-config\n# The demo registry on the cell's loopback: socat to the host's registry socket.\nruncmd:\n  - [/usr/bin/socat, \"TCP-LISTEN:{PORT},bind=127.0.0.1,fork,reuseaddr\", \"UNIX-CONNECT:{}\"]\n",
            socket.display()
        ),
    )
    .context("writing the cells' cloud-init")?;
    push_busybox().await?;
    Ok(image_reference())
}

/// Stops the registry and the bridge (if they run) and removes the socket.
pub fn stop(layout: &Layout) -> anyhow::Result<Vec<&'static str>> {
    let mut stopped = Vec::new();
    for name in [BRIDGE, REGISTRY] {
        if cluster::down_extra(layout, name)? {
            stopped.push(name);
        }
    }
    let _ = std::fs::remove_file(socket(layout));
    Ok(stopped)
}

fn wait_listening(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Builds the busybox image (the host's static busybox, its applets, /etc basics) and pushes
/// it over plain HTTP, as one does to a loopback registry.
async fn push_busybox() -> anyhow::Result<()> {
    // reqwest's rustls needs a process-wide crypto provider even for plain HTTP clients.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let image = TestImage::new(Platform::host())
        .layer(LayerBuilder::new().busybox()?.build()?)
        .cmd(&["sh"]);
    let layers: Vec<ImageLayer> = image
        .layers
        .iter()
        .map(|layer| ImageLayer::oci_v1_gzip(layer.gzip.clone(), None))
        .collect();
    let diff_ids: Vec<String> = image
        .layers
        .iter()
        .map(|layer| updraft_cell_image::test_support::sha256_digest(&layer.tar))
        .collect();
    let config = serde_json::json!({
        "architecture": image.platform.architecture,
        "os": image.platform.os,
        "config": {
            "Cmd": image.config.cmd,
            "Env": image.config.env,
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = Config::oci_v1(serde_json::to_vec(&config)?, None);
    let manifest = OciImageManifest::build(&layers, &config, None);
    let reference: oci_client::Reference = image_reference()
        .parse()
        .context("the demo image reference")?;
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..ClientConfig::default()
    });
    client
        .push(
            &reference,
            &layers,
            config,
            &RegistryAuth::Anonymous,
            Some(manifest),
        )
        .await
        .with_context(|| format!("pushing {}", image_reference()))?;
    Ok(())
}
