//! Waiting for conditions, with failure messages that say what was last seen.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use futures::StreamExt as _;
use kube::Resource;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;

/// Watches object `name` until `condition` holds for it, and returns that version.
///
/// Panics after `timeout` with `what` and the last version of the object seen (or that it
/// never existed), so a failing test says where it stood.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
    timeout: Duration,
    condition: impl Fn(&K) -> bool,
) -> K
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + serde::Serialize + 'static,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api.clone(), config).boxed();
    let mut last_seen: Option<K> = None;
    let outcome = tokio::time::timeout(timeout, async {
        while let Some(event) = events.next().await {
            let object = match event {
                Ok(Event::Apply(object) | Event::InitApply(object)) => object,
                Ok(Event::Delete(_)) => {
                    last_seen = None;
                    continue;
                }
                Ok(Event::Init | Event::InitDone) => continue,
                // The watcher retries by itself; a transient error is not the test's failure.
                Err(_) => continue,
            };
            if condition(&object) {
                return Some(object);
            }
            last_seen = Some(object);
        }
        None
    })
    .await;
    match outcome {
        Ok(Some(object)) => object,
        _ => panic!(
            "timed out after {timeout:?} waiting for {what} ({name}); last seen: {}",
            last_seen
                .map(|o| serde_json::to_string_pretty(&o).unwrap_or_default())
                .unwrap_or_else(|| "the object did not exist".into())
        ),
    }
}

/// Waits until object `name` no longer exists.
pub async fn wait_for_deletion<K>(api: &Api<K>, name: &str, timeout: Duration)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + serde::Serialize + 'static,
{
    eventually(timeout, || async {
        match api.get_opt(name).await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(format!("{name} still exists")),
            Err(err) => Err(format!("reading {name}: {err}")),
        }
    })
    .await;
}

/// Retries `check` with a short backoff until it returns `Ok`, for conditions that cannot be
/// watched (a command's output, a port answering). Panics after `timeout` with the last error.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if tokio::time::Instant::now() >= deadline => {
                panic!("timed out after {timeout:?}; last: {last}")
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}
