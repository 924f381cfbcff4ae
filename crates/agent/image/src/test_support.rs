//! A real registry on loopback with generated test images, for integration tests
//! (this crate's and the cell agent's). Feature `test-support`.
//!
//! [`TestRegistry::start`] runs Debian's `docker-registry` (package
//! `docker-registry`) on `127.0.0.1:<free port>` with its storage in a temporary
//! directory; [`TestRegistry::start_with_basic_auth`] adds an htpasswd file
//! (made with `htpasswd` from `apache2-utils`). Images are built here — tar +
//! gzip + sha256 + OCI manifest JSON — from [`LayerBuilder`]s, and pushed through
//! the registry's HTTP API. Dropping the registry stops it and deletes its storage.
//!
//! ```no_run
//! # async fn example() -> Result<(), updraft_cell_image::test_support::TestSupportError> {
//! use updraft_cell_image::test_support::TestRegistry;
//! let registry = TestRegistry::start()?;
//! let busybox = registry.push_busybox("busybox:1").await?;
//! // busybox.reference is 127.0.0.1:<port>/busybox:1; pull it with PullAuth::Anonymous.
//! # Ok(()) }
//! ```

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use sha2::{Digest as _, Sha256};

use crate::{ImageConfig, ImageReference, Platform, PullAuth};

/// The registry binary from Debian's `docker-registry` package.
pub const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";
/// The busybox binary from Debian's `busybox-static` package.
pub const BUSYBOX_BINARY: &str = "/bin/busybox";

/// Applets linked to busybox in [`LayerBuilder::busybox`] (`sh` is a hardlink, the rest symlinks).
pub const BUSYBOX_APPLETS: &[&str] = &[
    "cat", "chmod", "chown", "cp", "cut", "date", "dd", "df", "du", "echo", "env", "false", "find",
    "grep", "head", "hostname", "id", "kill", "ln", "ls", "mkdir", "mount", "mv", "nc", "nslookup",
    "ping", "printf", "ps", "pwd", "readlink", "rm", "sed", "seq", "sleep", "sort", "stat", "tail",
    "tee", "test", "timeout", "top", "touch", "tr", "true", "uname", "uniq", "wc", "wget",
    "whoami", "xargs",
];

/// What went wrong setting up a test registry or image.
#[derive(Debug, thiserror::Error)]
pub enum TestSupportError {
    /// A needed program is not installed.
    #[error(
        "{binary} is missing: apt-get install -y {package} (it is listed in xtask/apt-packages.txt; `cargo xtask deps` installs it)"
    )]
    MissingBinary {
        /// The program's path.
        binary: String,
        /// The Debian package that has it.
        package: String,
    },
    /// The registry exited or did not listen in time.
    #[error("docker-registry did not start: {0}")]
    RegistryStart(String),
    /// A push to the registry failed.
    #[error("pushing {what}: {message}")]
    Push {
        /// What was pushed.
        what: String,
        /// The error.
        message: String,
    },
    /// Local I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A running `docker-registry` on loopback.
pub struct TestRegistry {
    host: String,
    dir: tempfile::TempDir,
    child: Child,
    credentials: Option<(String, String)>,
}

impl std::fmt::Debug for TestRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestRegistry")
            .field("host", &self.host)
            .field("storage", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// An image pushed to a [`TestRegistry`].
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// `127.0.0.1:<port>/<name>:<tag>`.
    pub reference: ImageReference,
    /// Digest of the pushed manifest (for an index: the index's digest).
    pub manifest_digest: String,
    /// Layer blob digests, bottom first (for an index: the first image's).
    pub layer_digests: Vec<String>,
    /// Digest of the config blob (for an index: the first image's).
    pub config_digest: String,
}

impl TestRegistry {
    /// Starts an anonymous registry.
    pub fn start() -> Result<Self, TestSupportError> {
        Self::spawn(None)
    }

    /// Starts a registry that wants HTTP basic auth with these credentials.
    pub fn start_with_basic_auth(username: &str, password: &str) -> Result<Self, TestSupportError> {
        Self::spawn(Some((username.to_owned(), password.to_owned())))
    }

    /// Starts an anonymous registry and pushes the busybox image as `name_tag`.
    pub async fn start_with_busybox(
        name_tag: &str,
    ) -> Result<(Self, PushedImage), TestSupportError> {
        let registry = Self::start()?;
        let image = registry.push_busybox(name_tag).await?;
        Ok((registry, image))
    }

    fn spawn(credentials: Option<(String, String)>) -> Result<Self, TestSupportError> {
        require(REGISTRY_BINARY, "docker-registry")?;
        let dir = tempfile::Builder::new()
            .prefix("updraft-registry-")
            .tempdir()?;
        let auth_section = match &credentials {
            Some((username, password)) => {
                require("/usr/bin/htpasswd", "apache2-utils")?;
                let output = Command::new("/usr/bin/htpasswd")
                    .args(["-Bbn", username, password])
                    .output()?;
                if !output.status.success() {
                    return Err(TestSupportError::RegistryStart(format!(
                        "htpasswd failed: {}",
                        String::from_utf8_lossy(&output.stderr)
                    )));
                }
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, &output.stdout)?;
                format!(
                    "auth:\n  htpasswd:\n    realm: updraft-test\n    path: {}\n",
                    htpasswd.display()
                )
            }
            None => String::new(),
        };
        // The port is free now; another process could take it before the registry
        // binds, so a failed start is retried on a new port.
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: info\n  formatter: text\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: updraft-test-secret\n{auth_section}",
                    dir.path().join("storage").display()
                ),
            )?;
            let log_path = dir.path().join("registry.log");
            let log = std::fs::File::create(&log_path)?;
            let mut child = Command::new(REGISTRY_BINARY)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            let addr = format!("127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if TcpStream::connect(&addr).is_ok() {
                    return Ok(Self {
                        host: addr,
                        dir,
                        child,
                        credentials,
                    });
                }
                if let Some(status) = child.try_wait()? {
                    last_error = format!(
                        "exited with {status}: {}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = "not listening after 30 s".to_owned();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(TestSupportError::RegistryStart(last_error))
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `127.0.0.1:<port>/<name_tag>`.
    pub fn reference(&self, name_tag: &str) -> ImageReference {
        let (repository, tag) = match name_tag.rsplit_once(':') {
            Some((repository, tag)) if !tag.contains('/') => (repository, tag),
            _ => (name_tag, "latest"),
        };
        ImageReference {
            registry: self.host.clone(),
            repository: repository.to_owned(),
            tag: Some(tag.to_owned()),
            digest: None,
        }
    }

    /// The credentials this registry wants ([`PullAuth::Anonymous`] if none).
    pub fn auth(&self) -> PullAuth {
        match &self.credentials {
            Some((username, password)) => PullAuth::Basic {
                username: username.clone(),
                password: password.clone(),
            },
            None => PullAuth::Anonymous,
        }
    }

    /// A `.dockerconfigjson` secret value for this registry's credentials.
    pub fn docker_config_json(&self) -> String {
        use base64::Engine as _;
        let (username, password) = self.credentials.clone().unwrap_or_default();
        let auth =
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, self.host)
    }

    /// Where the registry stores a blob's content (to corrupt it in a test).
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or_default())
            .join(hex)
            .join("data")
    }

    /// The registry's log (access log included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many successful `GET`s of this blob the registry served.
    pub fn blob_downloads(&self, digest: &str) -> usize {
        let needle = format!("/blobs/{digest} HTTP");
        self.log()
            .lines()
            .filter(|line| {
                line.contains("\"GET ") && line.contains(&needle) && line.contains("\" 200 ")
            })
            .count()
    }

    /// Pushes the busybox image (one layer, see [`LayerBuilder::busybox`]) for the host platform.
    pub async fn push_busybox(&self, name_tag: &str) -> Result<PushedImage, TestSupportError> {
        let image = TestImage::new(Platform::host())
            .layer(LayerBuilder::new().busybox()?.build()?)
            .cmd(&["sh"]);
        self.push(name_tag, &image).await
    }

    /// Pushes an image: its layers and config as blobs, then its manifest under the tag.
    pub async fn push(
        &self,
        name_tag: &str,
        image: &TestImage,
    ) -> Result<PushedImage, TestSupportError> {
        let reference = self.reference(name_tag);
        let (manifest, pushed) = self.push_image_parts(&reference, image).await?;
        let manifest_digest = self
            .push_manifest(
                &reference,
                &manifest,
                "application/vnd.oci.image.manifest.v1+json",
            )
            .await?;
        Ok(PushedImage {
            reference,
            manifest_digest,
            ..pushed
        })
    }

    /// Pushes an image index over `images` (each for its own platform) under the tag.
    pub async fn push_index(
        &self,
        name_tag: &str,
        images: &[TestImage],
    ) -> Result<PushedImage, TestSupportError> {
        let reference = self.reference(name_tag);
        let mut entries = Vec::new();
        let mut first = None;
        for image in images {
            let (manifest, pushed) = self.push_image_parts(&reference, image).await?;
            let by_digest = ImageReference {
                tag: None,
                digest: Some(sha256_digest(&manifest)),
                ..reference.clone()
            };
            let digest = self
                .push_manifest(
                    &by_digest,
                    &manifest,
                    "application/vnd.oci.image.manifest.v1+json",
                )
                .await?;
            let mut platform = serde_json::json!({
                "os": image.platform.os,
                "architecture": image.platform.architecture,
            });
            if let Some(variant) = &image.platform.variant {
                platform["variant"] = serde_json::json!(variant);
            }
            entries.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest,
                "size": manifest.len(),
                "platform": platform,
            }));
            first.get_or_insert(pushed);
        }
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries,
        }))
        .map_err(std::io::Error::other)?;
        let manifest_digest = self
            .push_manifest(
                &reference,
                &index,
                "application/vnd.oci.image.index.v1+json",
            )
            .await?;
        let first = first.ok_or_else(|| TestSupportError::Push {
            what: name_tag.to_owned(),
            message: "an index needs at least one image".to_owned(),
        })?;
        Ok(PushedImage {
            reference,
            manifest_digest,
            ..first
        })
    }

    /// Pushes layers and config; returns the manifest bytes (not pushed yet).
    async fn push_image_parts(
        &self,
        reference: &ImageReference,
        image: &TestImage,
    ) -> Result<(Vec<u8>, PushedImage), TestSupportError> {
        let mut layer_descriptors = Vec::new();
        let mut diff_ids = Vec::new();
        let mut layer_digests = Vec::new();
        for layer in &image.layers {
            let digest = sha256_digest(&layer.gzip);
            self.push_blob(reference, &layer.gzip, &digest).await?;
            layer_descriptors.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest,
                "size": layer.gzip.len(),
            }));
            diff_ids.push(sha256_digest(&layer.tar));
            layer_digests.push(digest);
        }
        let mut config = serde_json::json!({
            "architecture": image.platform.architecture,
            "os": image.platform.os,
            "config": {
                "Entrypoint": image.config.entrypoint,
                "Cmd": image.config.cmd,
                "Env": image.config.env,
                "WorkingDir": image.config.working_dir.clone().unwrap_or_default(),
                "User": image.config.user.clone().unwrap_or_default(),
            },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        if let Some(variant) = &image.platform.variant {
            config["variant"] = serde_json::json!(variant);
        }
        let config = serde_json::to_vec(&config).map_err(std::io::Error::other)?;
        let config_digest = sha256_digest(&config);
        self.push_blob(reference, &config, &config_digest).await?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layer_descriptors,
        }))
        .map_err(std::io::Error::other)?;
        Ok((
            manifest,
            PushedImage {
                reference: reference.clone(),
                manifest_digest: String::new(),
                layer_digests,
                config_digest,
            },
        ))
    }

    fn client(&self) -> (oci_client::Client, RegistryAuth) {
        crate::registry::install_crypto_provider();
        let client = oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..ClientConfig::default()
        });
        let auth = match &self.credentials {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        (client, auth)
    }

    async fn push_blob(
        &self,
        reference: &ImageReference,
        data: &[u8],
        digest: &str,
    ) -> Result<(), TestSupportError> {
        let (client, auth) = self.client();
        let oci_ref = oci_reference(reference);
        client
            .auth(&oci_ref, &auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(|e| push_error(digest, e))?;
        client
            .push_blob(&oci_ref, data.to_vec(), digest)
            .await
            .map_err(|e| push_error(digest, e))?;
        Ok(())
    }

    async fn push_manifest(
        &self,
        reference: &ImageReference,
        body: &[u8],
        media_type: &'static str,
    ) -> Result<String, TestSupportError> {
        let (client, auth) = self.client();
        let oci_ref = oci_reference(reference);
        let what = reference.to_string();
        client
            .auth(&oci_ref, &auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(|e| push_error(&what, e))?;
        client
            .push_manifest_raw(
                &oci_ref,
                body.to_vec(),
                http::HeaderValue::from_static(media_type),
            )
            .await
            .map_err(|e| push_error(&what, e))?;
        Ok(sha256_digest(body))
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn push_error(what: &str, error: impl std::fmt::Display) -> TestSupportError {
    TestSupportError::Push {
        what: what.to_owned(),
        message: error.to_string(),
    }
}

fn oci_reference(reference: &ImageReference) -> oci_client::Reference {
    match &reference.digest {
        Some(digest) => oci_client::Reference::with_digest(
            reference.registry.clone(),
            reference.repository.clone(),
            digest.clone(),
        ),
        None => oci_client::Reference::with_tag(
            reference.registry.clone(),
            reference.repository.clone(),
            reference.tag.clone().unwrap_or_else(|| "latest".to_owned()),
        ),
    }
}

fn require(binary: &str, package: &str) -> Result<(), TestSupportError> {
    if Path::new(binary).exists() {
        Ok(())
    } else {
        Err(TestSupportError::MissingBinary {
            binary: binary.to_owned(),
            package: package.to_owned(),
        })
    }
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// An image to push: layers, config, platform.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// The platform written into the config (and the index entry).
    pub platform: Platform,
    /// Layers, bottom first.
    pub layers: Vec<TestLayer>,
    /// Entrypoint, cmd, env, working dir, user.
    pub config: ImageConfig,
}

impl TestImage {
    /// An image without layers for `platform`, with busybox's `PATH`.
    pub fn new(platform: Platform) -> Self {
        Self {
            platform,
            layers: Vec::new(),
            config: ImageConfig {
                env: vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ],
                ..ImageConfig::default()
            },
        }
    }

    /// Adds a layer on top.
    pub fn layer(mut self, layer: TestLayer) -> Self {
        self.layers.push(layer);
        self
    }

    /// Sets `Cmd`.
    pub fn cmd(mut self, cmd: &[&str]) -> Self {
        self.config.cmd = cmd.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Sets the whole config.
    pub fn config(mut self, config: ImageConfig) -> Self {
        self.config = config;
        self
    }
}

/// A built layer: the tar and its gzip.
#[derive(Debug, Clone)]
pub struct TestLayer {
    /// The uncompressed tar (its sha256 is the diff ID).
    pub tar: Vec<u8>,
    /// The gzip-compressed tar (its sha256 is the blob digest).
    pub gzip: Vec<u8>,
}

/// Builds a layer tar entry by entry (all entries mtime 2023-11-14).
pub struct LayerBuilder {
    builder: tar::Builder<Vec<u8>>,
    error: Option<std::io::Error>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
            error: None,
        }
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_size(size);
        header.set_mtime(1_700_000_000);
        header
    }

    fn record(&mut self, result: std::io::Result<()>) {
        if let Err(e) = result {
            self.error.get_or_insert(e);
        }
    }

    /// A directory owned by root.
    pub fn dir(self, path: &str, mode: u32) -> Self {
        self.dir_owned(path, mode, 0, 0)
    }

    /// A directory with an owner.
    pub fn dir_owned(mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Self {
        let mut header = Self::header(tar::EntryType::Directory, mode, uid, gid, 0);
        let result = self
            .builder
            .append_data(&mut header, path, std::io::empty());
        self.record(result);
        self
    }

    /// A regular file owned by root.
    pub fn file(self, path: &str, content: &[u8], mode: u32) -> Self {
        self.file_owned(path, content, mode, 0, 0)
    }

    /// A regular file with an owner.
    pub fn file_owned(mut self, path: &str, content: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut header = Self::header(
            tar::EntryType::Regular,
            mode,
            uid,
            gid,
            content.len() as u64,
        );
        let result = self.builder.append_data(&mut header, path, content);
        self.record(result);
        self
    }

    /// A symlink `path` → `target`.
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut header = Self::header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
        let result = self.builder.append_link(&mut header, path, target);
        self.record(result);
        self
    }

    /// A hardlink `path` → `target` (a path in the image).
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut header = Self::header(tar::EntryType::Link, 0o644, 0, 0, 0);
        let result = self.builder.append_link(&mut header, path, target);
        self.record(result);
        self
    }

    /// A whiteout: deletes `path` of the lower layers (`dir/.wh.name`).
    pub fn whiteout(self, path: &str) -> Self {
        let (parent, name) = match path.rsplit_once('/') {
            Some((parent, name)) => (format!("{parent}/"), name),
            None => (String::new(), path),
        };
        self.file(&format!("{parent}.wh.{name}"), b"", 0o644)
    }

    /// An opaque directory: hides the lower layers' content of `dir` (`dir/.wh..wh..opq`).
    pub fn opaque(self, dir: &str) -> Self {
        self.file(
            &format!("{}/.wh..wh..opq", dir.trim_end_matches('/')),
            b"",
            0o644,
        )
    }

    /// A busybox root: `/bin/busybox` from the host, applets, `/etc/passwd` and
    /// `/etc/group`, empty `/etc/hosts`, `/etc/resolv.conf` and `/etc/hostname`,
    /// mount points `/proc`, `/sys`, `/dev`, `/tmp` (1777), `/root` (0700) and
    /// `/home/user` owned by 1000:1000.
    pub fn busybox(self) -> Result<Self, TestSupportError> {
        require(BUSYBOX_BINARY, "busybox-static")?;
        let busybox = std::fs::read(BUSYBOX_BINARY)?;
        let mut layer = self
            .dir("bin", 0o755)
            .file("bin/busybox", &busybox, 0o755)
            .hardlink("bin/sh", "bin/busybox");
        for applet in BUSYBOX_APPLETS {
            layer = layer.symlink(&format!("bin/{applet}"), "busybox");
        }
        Ok(layer
            .dir("etc", 0o755)
            .file(
                "etc/passwd",
                b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
                0o644,
            )
            .file("etc/group", b"root:x:0:\nuser:x:1000:\nnogroup:x:65534:\n", 0o644)
            .file("etc/hosts", b"", 0o644)
            .file("etc/resolv.conf", b"", 0o644)
            .file("etc/hostname", b"", 0o644)
            .dir("proc", 0o555)
            .dir("sys", 0o555)
            .dir("dev", 0o755)
            .dir("tmp", 0o1777)
            .dir("root", 0o700)
            .dir("home", 0o755)
            .dir_owned("home/user", 0o750, 1000, 1000)
            .dir("usr", 0o755)
            .dir("usr/bin", 0o755)
            .dir("var", 0o755))
    }

    /// The finished layer (tar and gzip).
    pub fn build(self) -> Result<TestLayer, TestSupportError> {
        if let Some(e) = self.error {
            return Err(e.into());
        }
        let tar = self.builder.into_inner()?;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar)?;
        let gzip = gz.finish()?;
        Ok(TestLayer { tar, gzip })
    }
}

impl TryFrom<LayerBuilder> for TestLayer {
    type Error = TestSupportError;
    fn try_from(builder: LayerBuilder) -> Result<Self, Self::Error> {
        builder.build()
    }
}
