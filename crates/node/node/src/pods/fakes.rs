//! In-memory fakes for the pod controller's unit tests: an API server behind a
//! `kube::Client`, and a provider that records its calls.
//!
//! [`FakeApi`] is a `tower::Service` that answers each request by method and path from a map
//! of JSON objects (no HTTP, no sockets): GET reads an object or lists a collection, POST
//! stores (and issues a numbered token for a `TokenRequest`), PATCH merges (RFC 7386), DELETE
//! removes. Watches never answer, so a watcher lists once and then waits, which is what the
//! Services cache and the reference watches need to become ready. Every request is
//! recorded for the tests to assert on, and a refusal (an error status) can be queued for
//! the next request to a path.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::client::Body;
use serde_json::{Value, json};
use updraft_common::sync::lock;
use updraft_provider::{PodRef, Provider, ProviderError, ProviderPod, ResolvedPod};

/// One request the fake API server received.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    /// Its method.
    pub method: Method,
    /// Its path, without the query.
    pub path: String,
    /// Its body as JSON (`Null` when empty).
    pub body: Value,
}

#[derive(Default)]
struct ApiState {
    /// Objects by path (`/api/v1/namespaces/ns/configmaps/cm`).
    objects: BTreeMap<String, Value>,
    requests: Vec<Recorded>,
    /// Tokens issued so far (tokens are `token-1`, `token-2`, …).
    tokens: u64,
    /// Error codes to answer the next requests with, by method and path.
    refusals: HashMap<(Method, String), VecDeque<u16>>,
}

/// A fake API server (see the module doc).
#[derive(Clone, Default)]
pub(crate) struct FakeApi {
    state: Arc<Mutex<ApiState>>,
}

impl FakeApi {
    /// A client whose requests this fake answers.
    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |request: Request<Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.answer(request).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Stores `object` at `path` (replacing what was there).
    pub fn put(&self, path: &str, object: Value) {
        lock(&self.state).objects.insert(path.to_owned(), object);
    }

    /// The object at `path`, if any.
    pub fn get(&self, path: &str) -> Option<Value> {
        lock(&self.state).objects.get(path).cloned()
    }

    /// Answers the next `method` request to `path` with the error `code`.
    pub fn refuse_next(&self, method: Method, path: &str, code: u16) {
        lock(&self.state)
            .refusals
            .entry((method, path.to_owned()))
            .or_default()
            .push_back(code);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state).requests.clone()
    }

    /// The bodies of the `method` requests to exactly `path`.
    pub fn sent(&self, method: &Method, path: &str) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == *method && r.path == path)
            .map(|r| r.body)
            .collect()
    }

    /// The reasons of the Events published so far, in order (a repeat counts again).
    pub fn events(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r.path.starts_with("/apis/events.k8s.io/")
                    && (r.method == Method::POST || r.method == Method::PATCH)
            })
            .map(|r| r.body["reason"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    async fn answer(&self, request: Request<Body>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let body = body.collect_bytes().await.unwrap_or_default();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or_default().to_owned();
        let watch = query.split('&').any(|pair| pair == "watch=true");
        let (code, reply) = {
            let mut state = lock(&self.state);
            state.requests.push(Recorded {
                method: parts.method.clone(),
                path: path.clone(),
                body: body.clone(),
            });
            let refusal = state
                .refusals
                .get_mut(&(parts.method.clone(), path.clone()))
                .and_then(VecDeque::pop_front);
            match refusal {
                Some(code) => (code, failure(code, &path)),
                None if watch => (0, Value::Null),
                None => state.reply(&parts.method, &path, &query, body),
            }
        };
        if code == 0 {
            // A watch: nothing ever changes, and nothing times out (no timers).
            return std::future::pending().await;
        }
        let mut response = Response::new(Body::from(serde_json::to_vec(&reply).unwrap()));
        *response.status_mut() = StatusCode::from_u16(code).unwrap();
        response
    }
}

impl ApiState {
    fn reply(&mut self, method: &Method, path: &str, query: &str, body: Value) -> (u16, Value) {
        match *method {
            Method::GET => {
                if let Some(object) = self.objects.get(path) {
                    return (200, object.clone());
                }
                if !is_collection(path) {
                    return (404, failure(404, path));
                }
                let prefix = format!("{path}/");
                let only = field_selector_name(query);
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|(p, _)| {
                        p.strip_prefix(&prefix).is_some_and(|name| {
                            !name.contains('/') && only.as_deref().is_none_or(|o| o == name)
                        })
                    })
                    .map(|(_, object)| object.clone())
                    .collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
                )
            }
            Method::POST if path.ends_with("/token") => {
                self.tokens += 1;
                let mut issued = body;
                issued["status"] = json!({
                    "token": format!("token-{}", self.tokens),
                    "expirationTimestamp": "2099-01-01T00:00:00Z",
                });
                (201, issued)
            }
            Method::POST => {
                let name = body["metadata"]["name"].as_str().unwrap_or("unnamed");
                self.objects.insert(format!("{path}/{name}"), body.clone());
                (201, body)
            }
            Method::PATCH => {
                let target = path.strip_suffix("/status").unwrap_or(path);
                match self.objects.get_mut(target) {
                    Some(object) => {
                        merge(object, &body);
                        (200, object.clone())
                    }
                    None => (404, failure(404, path)),
                }
            }
            Method::DELETE => match self.objects.remove(path) {
                Some(_) => (
                    200,
                    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success"}),
                ),
                None => (404, failure(404, path)),
            },
            _ => (405, failure(405, path)),
        }
    }
}

/// Whether `path` names a collection (`/api/v1/services`, `/api/v1/namespaces/ns/pods`)
/// rather than one object.
fn is_collection(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let rest = match parts.first() {
        Some(&"api") => parts.get(2..),
        Some(&"apis") => parts.get(3..),
        _ => None,
    }
    .unwrap_or_default();
    let rest = match rest {
        ["namespaces", _, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    rest.len() == 1
}

/// The name in a `fieldSelector=metadata.name=…` query, if any.
fn field_selector_name(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let value = pair.strip_prefix("fieldSelector=")?;
        let value = value.replace("%3D", "=").replace("%3d", "=");
        value.strip_prefix("metadata.name=").map(str::to_owned)
    })
}

/// An API error status.
fn failure(code: u16, path: &str) -> Value {
    let reason = match code {
        404 => "NotFound",
        409 => "Conflict",
        403 => "Forbidden",
        _ => "InternalError",
    };
    json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": format!("{reason}: {path}"), "reason": reason, "code": code,
    })
}

/// A JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

#[derive(Default)]
struct ProviderState {
    /// What each running pod was last handed, by namespace and name.
    running: BTreeMap<(String, String), ResolvedPod>,
    calls: Vec<String>,
    /// Errors to answer the next calls with, by operation.
    failures: HashMap<&'static str, VecDeque<ProviderError>>,
}

/// A provider that runs nothing and records every call as `"<operation> <ns>/<name>"`
/// (`"delete <ns>/<name> <grace>"` for deletes).
#[derive(Default)]
pub(crate) struct FakeProvider {
    state: Mutex<ProviderState>,
}

impl FakeProvider {
    /// Makes the provider run `pod` already (as before a restart of the node), with nothing
    /// resolved.
    pub fn runs(&self, pod: &Pod) {
        let key = key(&PodRef::of(pod));
        lock(&self.state)
            .running
            .insert(key, ResolvedPod::unresolved(pod.clone()));
    }

    /// Answers the next `operation` (`create`, `update`, `delete`, `status`) with `error`.
    pub fn fail_next(&self, operation: &'static str, error: ProviderError) {
        lock(&self.state)
            .failures
            .entry(operation)
            .or_default()
            .push_back(error);
    }

    /// The calls since the last time they were taken.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut lock(&self.state).calls)
    }

    /// What the provider was last handed for `namespace/name`, if it runs it.
    pub fn handed(&self, namespace: &str, name: &str) -> Option<ResolvedPod> {
        lock(&self.state)
            .running
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Records the call and returns the failure queued for it, if any.
    fn call(&self, operation: &'static str, what: String) -> Result<(), ProviderError> {
        let mut state = lock(&self.state);
        state.calls.push(format!("{operation} {what}"));
        match state
            .failures
            .get_mut(operation)
            .and_then(VecDeque::pop_front)
        {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn hand(&self, operation: &'static str, pod: &ResolvedPod) -> Result<(), ProviderError> {
        let pod_ref = PodRef::of(&pod.pod);
        self.call(operation, pod_ref.to_string())?;
        lock(&self.state).running.insert(key(&pod_ref), pod.clone());
        Ok(())
    }
}

fn key(pod: &PodRef) -> (String, String) {
    (pod.namespace.clone(), pod.name.clone())
}

#[async_trait::async_trait]
impl Provider for FakeProvider {
    async fn create_pod(&self, pod: &ResolvedPod) -> updraft_provider::Result<()> {
        self.hand("create", pod)
    }

    async fn update_pod(&self, pod: &ResolvedPod) -> updraft_provider::Result<()> {
        self.hand("update", pod)
    }

    async fn delete_pod(&self, pod: &PodRef, grace: i64) -> updraft_provider::Result<()> {
        self.call("delete", format!("{pod} {grace}"))?;
        lock(&self.state).running.remove(&key(pod));
        Ok(())
    }

    async fn pod_status(&self, pod: &PodRef) -> updraft_provider::Result<Option<PodStatus>> {
        self.call("status", pod.to_string())?;
        Ok(lock(&self.state)
            .running
            .contains_key(&key(pod))
            .then(|| PodStatus {
                phase: Some("Running".into()),
                ..PodStatus::default()
            }))
    }

    async fn list_pods(&self) -> updraft_provider::Result<Vec<ProviderPod>> {
        Ok(lock(&self.state)
            .running
            .values()
            .map(|resolved| ProviderPod {
                pod: PodRef::of(&resolved.pod),
                status: PodStatus::default(),
            })
            .collect())
    }
}
