//! Pulls from a real Debian `docker-registry` on loopback into real overlayfs and
//! extracted root filesystems (as root).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;

use updraft_cell_image::test_support::{LayerBuilder, TestImage, TestRegistry};
use updraft_cell_image::{
    ImageError, ImageReference, ImageStore, Keyring, Platform, PullAuth, PullPolicy, RootfsMode,
    StoreOptions,
};

fn store(dir: &Path, mode: RootfsMode) -> ImageStore {
    ImageStore::open_with(
        dir.to_path_buf(),
        Platform::host(),
        StoreOptions {
            rootfs_mode: mode,
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

/// Runs `sh -c script` chrooted into the root filesystem and returns its stdout.
fn run_in(rootfs: &Path, script: &str) -> String {
    let output = std::process::Command::new("chroot")
        .arg(rootfs)
        .args(["/bin/sh", "-c", script])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn busybox_pulls_into_an_overlay_rootfs_that_runs() {
    let (registry, pushed) = TestRegistry::start_with_busybox("library/busybox:1.36")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path(), RootfsMode::Auto);
    assert_eq!(
        store.rootfs_mode(),
        RootfsMode::Overlay,
        "overlayfs works as root here"
    );

    let image = store
        .ensure(
            &pushed.reference,
            PullPolicy::IfNotPresent,
            &PullAuth::Anonymous,
        )
        .await
        .unwrap();
    assert_eq!(image.digest, pushed.manifest_digest);
    assert_eq!(image.config.cmd, vec!["sh"]);
    assert!(image.config.env.iter().any(|e| e.starts_with("PATH=")));
    assert_eq!(
        image.layer_digests().collect::<Vec<_>>(),
        pushed
            .layer_digests
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );

    let rootfs = store.create_rootfs(&image, "pod1-app").unwrap();
    assert_eq!(rootfs.mode, RootfsMode::Overlay);
    let root = &rootfs.path;
    assert_eq!(
        std::fs::read(root.join("bin/busybox")).unwrap(),
        std::fs::read("/bin/busybox").unwrap()
    );
    assert_eq!(
        std::fs::metadata(root.join("bin/sh")).unwrap().ino(),
        std::fs::metadata(root.join("bin/busybox")).unwrap().ino(),
        "hardlink preserved"
    );
    assert_eq!(
        std::fs::read_link(root.join("bin/ls")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        std::fs::metadata(root.join("tmp"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o1777
    );
    assert_eq!(
        std::fs::metadata(root.join("root"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o700
    );
    let home = std::fs::metadata(root.join("home/user")).unwrap();
    assert_eq!((home.uid(), home.gid()), (1000, 1000));
    assert_eq!(
        run_in(root, "echo hello from $(id -u) > /tmp/out; cat /tmp/out"),
        "hello from 0\n"
    );

    // The container's writes land in its upper directory, not in the shared layer.
    let layer_dir = dir
        .path()
        .join("layers/sha256")
        .join(pushed.layer_digests[0].trim_start_matches("sha256:"));
    assert!(!layer_dir.join("tmp/out").exists());

    // Asking again (an agent restarted) gives the same mounted rootfs with the writes.
    let again = store.create_rootfs(&image, "pod1-app").unwrap();
    assert_eq!(again.path, rootfs.path);
    assert!(again.path.join("tmp/out").exists());

    store.remove_rootfs("pod1-app").unwrap();
    assert!(!dir.path().join("containers/pod1-app").exists());
    store.remove_rootfs("pod1-app").unwrap();
    let bad = store.create_rootfs(&image, "../escape").unwrap_err();
    assert!(bad.to_string().contains("invalid container id"), "{bad}");
    drop(registry);
}

/// layer 1: busybox + /etc/motd + /data/{old1,old2}; layer 2: whiteout of
/// /etc/motd, /data opaque with a new file, /etc/added.
fn layered_image() -> TestImage {
    TestImage::new(Platform::host())
        .layer(
            LayerBuilder::new()
                .busybox()
                .unwrap()
                .file("etc/motd", b"old motd\n", 0o644)
                .dir("data", 0o755)
                .file("data/old1", b"1", 0o644)
                .file("data/old2", b"2", 0o600)
                .build()
                .unwrap(),
        )
        .layer(
            LayerBuilder::new()
                .dir("etc", 0o755)
                .whiteout("etc/motd")
                .file("etc/added", b"added\n", 0o644)
                .dir("data", 0o755)
                .opaque("data")
                .file("data/new", b"new\n", 0o640)
                .build()
                .unwrap(),
        )
        .cmd(&["sh"])
}

#[tokio::test]
async fn whiteouts_and_opaque_dirs_hide_lower_content_in_overlay_and_copy() {
    let registry = TestRegistry::start().unwrap();
    let pushed = registry.push("layered:v1", &layered_image()).await.unwrap();
    for mode in [RootfsMode::Overlay, RootfsMode::Copy] {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), mode);
        let image = store
            .ensure(&pushed.reference, PullPolicy::Always, &PullAuth::Anonymous)
            .await
            .unwrap();
        let rootfs = store.create_rootfs(&image, "c1").unwrap();
        assert_eq!(rootfs.mode, mode);
        let listing = run_in(
            &rootfs.path,
            "ls /data; test -e /etc/motd && echo motd-present; cat /etc/added",
        );
        assert_eq!(listing, "new\nadded\n", "{mode:?}");
        assert_eq!(
            std::fs::metadata(rootfs.path.join("data/new"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o640
        );
        store.remove_rootfs("c1").unwrap();
    }
}

#[tokio::test]
async fn basic_auth_right_credentials_pull_and_wrong_ones_are_named_without_the_password() {
    let registry = TestRegistry::start_with_basic_auth("puller", "s3cret-pw").unwrap();
    let pushed = registry.push_busybox("private/app:v1").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path(), RootfsMode::Auto);

    // Credentials as the agent gets them: a dockerconfigjson pull secret.
    let mut keyring = Keyring::default();
    keyring
        .add_docker_config_json(registry.docker_config_json().as_bytes())
        .unwrap();
    let auth = keyring.lookup(&pushed.reference);
    assert_eq!(auth, registry.auth());
    let image = store
        .ensure(&pushed.reference, PullPolicy::Always, &auth)
        .await
        .unwrap();
    assert_eq!(image.digest, pushed.manifest_digest);
    let wrong = PullAuth::Basic {
        username: "puller".into(),
        password: "wrong-pw".into(),
    };
    // The store's client for the right credentials is not reused for wrong ones.
    let err = store
        .ensure(&pushed.reference, PullPolicy::Always, &wrong)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err:?}");
    store
        .ensure(&pushed.reference, PullPolicy::Always, &auth)
        .await
        .unwrap();

    let fresh = tempfile::tempdir().unwrap();
    let store = self::store(fresh.path(), RootfsMode::Auto);
    let err = store
        .ensure(&pushed.reference, PullPolicy::IfNotPresent, &wrong)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ImageError::Unauthorized { .. }), "{err:?}");
    assert_eq!(err.reason(), "ErrImagePull");
    assert!(
        message.contains(&format!(
            "registry {} refused the credentials for {}",
            registry.host(),
            pushed.reference
        )),
        "{message}"
    );
    assert!(!message.contains("wrong-pw") && !format!("{err:?}").contains("wrong-pw"));

    let err = store
        .ensure(
            &pushed.reference,
            PullPolicy::IfNotPresent,
            &PullAuth::Anonymous,
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("refused anonymous access"),
        "{err}"
    );
}

fn platform_image(architecture: &str) -> TestImage {
    TestImage::new(Platform::new("linux", architecture, None))
        .layer(
            LayerBuilder::new()
                .busybox()
                .unwrap()
                .file("platform", architecture.as_bytes(), 0o644)
                .build()
                .unwrap(),
        )
        .cmd(&["sh"])
}

#[tokio::test]
async fn an_image_index_resolves_to_the_stores_platform() {
    let registry = TestRegistry::start().unwrap();
    let pushed = registry
        .push_index(
            "multi:v1",
            &[platform_image("amd64"), platform_image("arm64")],
        )
        .await
        .unwrap();
    for architecture in ["amd64", "arm64"] {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(
            dir.path().to_path_buf(),
            Platform::new("linux", architecture, None),
        )
        .unwrap();
        let image = store
            .ensure(
                &pushed.reference,
                PullPolicy::IfNotPresent,
                &PullAuth::Anonymous,
            )
            .await
            .unwrap();
        assert_ne!(
            image.digest, pushed.manifest_digest,
            "the platform manifest, not the index"
        );
        let rootfs = store.create_rootfs(&image, "c").unwrap();
        assert_eq!(
            std::fs::read_to_string(rootfs.path.join("platform")).unwrap(),
            architecture
        );
        store.remove_rootfs("c").unwrap();
    }
    // The host's own platform is one of the two on the machines we run on.
    let host = Platform::host();
    if ["amd64", "arm64"].contains(&host.architecture.as_str()) {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path().to_path_buf(), host.clone()).unwrap();
        let image = store
            .ensure(
                &pushed.reference,
                PullPolicy::IfNotPresent,
                &PullAuth::Anonymous,
            )
            .await
            .unwrap();
        let rootfs = store.create_rootfs(&image, "c").unwrap();
        assert_eq!(
            std::fs::read_to_string(rootfs.path.join("platform")).unwrap(),
            host.architecture
        );
        store.remove_rootfs("c").unwrap();
    }

    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(
        dir.path().to_path_buf(),
        Platform::new("linux", "s390x", None),
    )
    .unwrap();
    let err = store
        .ensure(
            &pushed.reference,
            PullPolicy::IfNotPresent,
            &PullAuth::Anonymous,
        )
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("no manifest for platform linux/s390x")
            && message.contains("linux/amd64, linux/arm64"),
        "{message}"
    );
}

#[tokio::test]
async fn a_corrupted_blob_is_rejected_naming_both_digests_and_not_cached() {
    let registry = TestRegistry::start().unwrap();
    let pushed = registry.push_busybox("corrupt:v1").await.unwrap();
    let layer = &pushed.layer_digests[0];
    let data_path = registry.blob_data_path(layer);
    let mut data = std::fs::read(&data_path).unwrap();
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    std::fs::write(&data_path, &data).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path(), RootfsMode::Auto);
    for _ in 0..2 {
        let err = store
            .ensure(
                &pushed.reference,
                PullPolicy::IfNotPresent,
                &PullAuth::Anonymous,
            )
            .await
            .unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err:?}");
        assert!(
            message.contains(&format!("expected {layer}, got sha256:")),
            "{message}"
        );
        assert!(message.contains(&pushed.reference.to_string()), "{message}");
        assert_eq!(err.reason(), "ErrImagePull");
    }
    let err = store
        .ensure(&pushed.reference, PullPolicy::Never, &PullAuth::Anonymous)
        .await
        .unwrap_err();
    assert_eq!(
        err.reason(),
        "ErrImageNeverPull",
        "nothing half-pulled counts as present"
    );
}

#[tokio::test]
async fn pull_policies_never_if_not_present_always_and_registry_answers() {
    let registry = TestRegistry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path(), RootfsMode::Auto);
    let reference = registry.reference("policy:v1");

    let err = store
        .ensure(&reference, PullPolicy::Never, &PullAuth::Anonymous)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "ErrImageNeverPull");
    let err = store
        .ensure(&reference, PullPolicy::IfNotPresent, &PullAuth::Anonymous)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("manifest unknown"), "{err}");

    let first = registry.push_busybox("policy:v1").await.unwrap();
    let pulled = store
        .ensure(&reference, PullPolicy::IfNotPresent, &PullAuth::Anonymous)
        .await
        .unwrap();
    assert_eq!(pulled.digest, first.manifest_digest);

    // A new image under the same tag: IfNotPresent keeps the stored one, Always resolves again.
    let second = registry.push("policy:v1", &layered_image()).await.unwrap();
    assert_ne!(second.manifest_digest, first.manifest_digest);
    let kept = store
        .ensure(&reference, PullPolicy::IfNotPresent, &PullAuth::Anonymous)
        .await
        .unwrap();
    assert_eq!(kept.digest, first.manifest_digest);
    let fresh = store
        .ensure(&reference, PullPolicy::Always, &PullAuth::Anonymous)
        .await
        .unwrap();
    assert_eq!(fresh.digest, second.manifest_digest);

    // Without the registry: stored images still resolve under Never and IfNotPresent;
    // Always cannot reach it.
    let host = registry.host().to_owned();
    drop(registry);
    let never = store
        .ensure(&reference, PullPolicy::Never, &PullAuth::Anonymous)
        .await
        .unwrap();
    assert_eq!(never.digest, second.manifest_digest);
    let err = store
        .ensure(&reference, PullPolicy::Always, &PullAuth::Anonymous)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Unreachable { .. }), "{err:?}");
    assert!(err.is_transient());
    assert!(err.to_string().contains(&host), "{err}");

    let by_digest =
        ImageReference::parse(&format!("{reference}@{}", first.manifest_digest)).unwrap();
    assert_eq!(
        by_digest.digest.as_deref(),
        Some(first.manifest_digest.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_share_layers_downloaded_once_and_containers_are_separate() {
    let registry = TestRegistry::start().unwrap();
    let base = LayerBuilder::new().busybox().unwrap().build().unwrap();
    let app_a = TestImage::new(Platform::host()).layer(base.clone()).layer(
        LayerBuilder::new()
            .file("app", b"a", 0o755)
            .build()
            .unwrap(),
    );
    let app_b = TestImage::new(Platform::host()).layer(base).layer(
        LayerBuilder::new()
            .file("app", b"b", 0o755)
            .build()
            .unwrap(),
    );
    let a = registry.push("app-a:v1", &app_a).await.unwrap();
    let b = registry.push("app-b:v1", &app_b).await.unwrap();
    assert_eq!(a.layer_digests[0], b.layer_digests[0]);
    let base_digest = a.layer_digests[0].clone();

    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(store(dir.path(), RootfsMode::Auto));
    let pulls = [&a, &a, &b, &b].map(|image| {
        let store = store.clone();
        let reference = image.reference.clone();
        tokio::spawn(async move {
            store
                .ensure(&reference, PullPolicy::Always, &PullAuth::Anonymous)
                .await
        })
    });
    let mut images = Vec::new();
    for pull in pulls {
        images.push(pull.await.unwrap().unwrap());
    }
    assert_eq!(
        registry.blob_downloads(&base_digest),
        1,
        "{}",
        registry.log()
    );
    assert_eq!(registry.blob_downloads(&a.layer_digests[1]), 1);
    assert_eq!(registry.blob_downloads(&b.layer_digests[1]), 1);
    assert_eq!(store.stats().layers_unpacked, 3);

    let one = store.create_rootfs(&images[0], "one").unwrap();
    let two = store.create_rootfs(&images[1], "two").unwrap();
    let three = store.create_rootfs(&images[2], "three").unwrap();
    std::fs::write(one.path.join("tmp/mine"), b"1").unwrap();
    assert!(!two.path.join("tmp/mine").exists());
    assert_eq!(std::fs::read(two.path.join("app")).unwrap(), b"a");
    assert_eq!(std::fs::read(three.path.join("app")).unwrap(), b"b");
    for id in ["one", "two", "three"] {
        store.remove_rootfs(id).unwrap();
    }
    assert!(
        dir.path()
            .join("layers/sha256")
            .join(base_digest.trim_start_matches("sha256:"))
            .is_dir()
    );
}

#[tokio::test]
async fn a_layer_writing_through_a_symlink_out_of_the_root_is_refused() {
    let outside = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start().unwrap();
    let evil = TestImage::new(Platform::host()).layer(
        LayerBuilder::new()
            .symlink("escape", outside.path().to_str().unwrap())
            .file("escape/pwned", b"x", 0o644)
            .build()
            .unwrap(),
    );
    let pushed = registry.push("evil:v1", &evil).await.unwrap();
    for mode in [RootfsMode::Overlay, RootfsMode::Copy] {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), mode);
        let result = match store
            .ensure(
                &pushed.reference,
                PullPolicy::IfNotPresent,
                &PullAuth::Anonymous,
            )
            .await
        {
            // Copy mode extracts per container.
            Ok(image) => store.create_rootfs(&image, "c").map(|_| ()),
            Err(e) => Err(e),
        };
        let err = result.unwrap_err();
        assert!(matches!(err, ImageError::Layer { .. }), "{mode:?}: {err:?}");
        let message = err.to_string();
        assert!(
            message.contains(&pushed.layer_digests[0]) && message.contains("symlink escape"),
            "{message}"
        );
        assert!(!outside.path().join("pwned").exists(), "{mode:?}");
    }
}
