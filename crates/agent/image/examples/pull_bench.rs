//! Measures `ensure()` of the busybox image cold (empty cache) and warm, and
//! `create_rootfs()`/`remove_rootfs()` in overlay and copy mode, against a real
//! `docker-registry` on loopback. Run as root:
//!
//! ```sh
//! cargo run --release -p updraft-cell-image --features test-support --example pull_bench -- [rounds]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark: a panic is a failure report

use std::time::{Duration, Instant};

use updraft_cell_image::test_support::TestRegistry;
use updraft_cell_image::{ImageStore, Platform, PullAuth, PullPolicy, RootfsMode, StoreOptions};

fn summary(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "| {name} | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
        samples.len(),
        ms(p(0.5)),
        ms(p(0.9)),
        ms(samples[samples.len() - 1])
    );
}

fn store(dir: &std::path::Path, mode: RootfsMode) -> ImageStore {
    let options = StoreOptions {
        rootfs_mode: mode,
        ..StoreOptions::default()
    };
    ImageStore::open_with(dir.to_path_buf(), Platform::host(), options).unwrap()
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args().nth(1).map_or(10, |n| n.parse().unwrap());
    let (_registry, busybox) = TestRegistry::start_with_busybox("bench/busybox:1")
        .await
        .unwrap();
    let reference = &busybox.reference;
    let auth = PullAuth::Anonymous;
    let (mut cold, mut cold_copy, mut warm, mut warm_always) = (vec![], vec![], vec![], vec![]);
    let (mut overlay_create, mut overlay_remove, mut copy_create, mut copy_remove) =
        (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        for (mode, cold_samples) in [
            (RootfsMode::Overlay, &mut cold),
            (RootfsMode::Copy, &mut cold_copy),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let store = store(dir.path(), mode);
            let start = Instant::now();
            let image = store
                .ensure(reference, PullPolicy::IfNotPresent, &auth)
                .await
                .unwrap();
            cold_samples.push(start.elapsed());
            if mode == RootfsMode::Overlay {
                let start = Instant::now();
                store
                    .ensure(reference, PullPolicy::IfNotPresent, &auth)
                    .await
                    .unwrap();
                warm.push(start.elapsed());
                let start = Instant::now();
                store
                    .ensure(reference, PullPolicy::Always, &auth)
                    .await
                    .unwrap();
                warm_always.push(start.elapsed());
            }
            let (create, remove) = match mode {
                RootfsMode::Overlay => (&mut overlay_create, &mut overlay_remove),
                _ => (&mut copy_create, &mut copy_remove),
            };
            let id = format!("bench-{round}");
            let start = Instant::now();
            store.create_rootfs(&image, &id).unwrap();
            create.push(start.elapsed());
            let start = Instant::now();
            store.remove_rootfs(&id).unwrap();
            remove.push(start.elapsed());
        }
    }
    println!(
        "busybox image: 1 layer, {} bytes gzip",
        std::fs::metadata(_registry.blob_data_path(&busybox.layer_digests[0]))
            .unwrap()
            .len()
    );
    println!("| operation | n | p50 | p90 | max |");
    println!("|---|---|---|---|---|");
    summary(
        "ensure, cold (empty cache), overlay store: pull + verify + unpack",
        cold,
    );
    summary("ensure, cold, copy store: pull + verify", cold_copy);
    summary("ensure IfNotPresent, warm", warm);
    summary("ensure Always, warm (manifest request only)", warm_always);
    summary("create_rootfs, overlay", overlay_create);
    summary("remove_rootfs, overlay", overlay_remove);
    summary("create_rootfs, copy (extract)", copy_create);
    summary("remove_rootfs, copy", copy_remove);
}
