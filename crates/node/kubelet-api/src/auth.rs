//! Kubelet-style authentication and authorization.
//!
//! Authentication, in order: a verified client certificate (CN = user, O = groups); a bearer
//! token checked with a TokenReview; otherwise anonymous — rejected with 401 unless anonymous
//! access was explicitly enabled. Authorization: a SubjectAccessReview for the user on
//! `nodes/<subresource>` of this node, with the kubelet's mapping of paths to subresources
//! and of HTTP methods to verbs. Decisions are cached (tokens 2 min, allow 5 min,
//! deny 30 s, like the kubelet's defaults); tokens are cached by their SHA-256, never stored.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderMap, Method};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use sha2::{Digest as _, Sha256};

use crate::ttl_cache::TtlCache;

/// An authenticated caller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct UserInfo {
    /// User name, e.g. `kube-apiserver-kubelet-client` or `system:serviceaccount:ns:name`.
    pub name: String,
    /// User UID, when the authenticator knows it.
    pub uid: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Extra attributes from a TokenReview (e.g. the pod a token is bound to).
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    fn anonymous() -> Self {
        Self {
            name: "system:anonymous".into(),
            groups: vec!["system:unauthenticated".into()],
            ..Self::default()
        }
    }
}

/// The authorization attributes of a request on the kubelet API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attributes {
    /// The verb, from the HTTP method.
    pub verb: &'static str,
    /// The `nodes` subresource, from the path.
    pub subresource: &'static str,
}

impl Attributes {
    /// The kubelet's mapping: `/stats/*` → stats, `/metrics/*` → metrics, `/logs/*` → log,
    /// `/spec/*` → spec, `/checkpoint/*` → checkpoint, `/pods` and `/runningpods/` → pods,
    /// `/healthz` → healthz, everything else (exec, attach, portForward, containerLogs …) →
    /// proxy. GET/HEAD → get, POST → create, PUT → update, PATCH → patch, DELETE → delete.
    pub fn of(method: &Method, path: &str) -> Self {
        let verb = match *method {
            Method::POST => "create",
            Method::PUT => "update",
            Method::PATCH => "patch",
            Method::DELETE => "delete",
            _ => "get",
        };
        let under = |prefix: &str| {
            path == prefix
                || path
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('/'))
        };
        let subresource = if under("/stats") {
            "stats"
        } else if under("/metrics") {
            "metrics"
        } else if under("/logs") {
            "log"
        } else if under("/spec") {
            "spec"
        } else if under("/checkpoint") {
            "checkpoint"
        } else if under("/pods") || under("/runningpods") {
            "pods"
        } else if under("/healthz") {
            "healthz"
        } else {
            "proxy"
        };
        Self { verb, subresource }
    }

    /// Fine-grained subresources (`pods`, `healthz`) fall back to `proxy`, as the kubelet's
    /// fine-grained authorization does, so existing `nodes/proxy` grants keep working.
    fn fallback(self) -> Option<Self> {
        matches!(self.subresource, "pods" | "healthz").then_some(Self {
            verb: self.verb,
            subresource: "proxy",
        })
    }
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// No acceptable credentials (401).
    #[error("Unauthorized: {0}")]
    Unauthenticated(String),
    /// The authorizer said no (403).
    #[error(
        "Forbidden (user={user}, verb={verb}, resource=nodes, subresource={subresource}): {reason}"
    )]
    Forbidden {
        /// The user.
        user: String,
        /// The verb.
        verb: &'static str,
        /// The subresource.
        subresource: &'static str,
        /// The authorizer's reason, if it gave one.
        reason: String,
    },
    /// A review could not be made (the API server did not answer) (500 for authorization,
    /// 401 for authentication, as the kubelet does).
    #[error("{stage} failed: {source}")]
    Review {
        /// "authentication" or "authorization".
        stage: &'static str,
        /// The API error.
        source: kube::Error,
    },
}

impl Rejection {
    /// The HTTP status the kubelet answers with.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Self::Unauthenticated(_)
            | Self::Review {
                stage: "authentication",
                ..
            } => http::StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => http::StatusCode::FORBIDDEN,
            Self::Review { .. } => http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Settings of [`Auth`].
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// This node's name: the `nodes/<name>` that requests are authorized against.
    pub node_name: String,
    /// Let requests without credentials through as `system:anonymous` (then authorized).
    pub allow_anonymous: bool,
    /// How long a TokenReview result is trusted.
    pub token_ttl: Duration,
    /// How long an allow decision is trusted.
    pub allow_ttl: Duration,
    /// How long a deny decision is trusted.
    pub deny_ttl: Duration,
}

impl AuthConfig {
    /// The kubelet's defaults for `node_name`, anonymous access off.
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            allow_anonymous: false,
            token_ttl: Duration::from_secs(120),
            allow_ttl: Duration::from_secs(300),
            deny_ttl: Duration::from_secs(30),
        }
    }
}

type DecisionKey = (UserInfo, Attributes);

/// Authenticates and authorizes requests through the API server, with caches.
pub struct Auth {
    client: kube::Client,
    config: AuthConfig,
    tokens: TtlCache<[u8; 32], Option<UserInfo>>,
    decisions: TtlCache<DecisionKey, Result<(), String>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// How many distinct tokens / decisions are remembered at most.
const CACHE_CAPACITY: usize = 4096;

impl Auth {
    /// Reviews through `client` (which needs `create` on tokenreviews and
    /// subjectaccessreviews — the `system:node` role has both).
    pub fn new(client: kube::Client, config: AuthConfig) -> Self {
        Self {
            client,
            config,
            tokens: TtlCache::new(CACHE_CAPACITY),
            decisions: TtlCache::new(CACHE_CAPACITY),
        }
    }

    /// Who is calling: the client certificate's user if one was verified, else the bearer
    /// token's, else anonymous if allowed.
    pub async fn authenticate(
        &self,
        certificate_user: Option<&UserInfo>,
        headers: &HeaderMap,
    ) -> Result<UserInfo, Rejection> {
        if let Some(user) = certificate_user {
            return Ok(user.clone());
        }
        if let Some(token) = bearer_token(headers) {
            return self.review_token(token).await;
        }
        if self.config.allow_anonymous {
            Ok(UserInfo::anonymous())
        } else {
            Err(Rejection::Unauthenticated(
                "no client certificate or bearer token".into(),
            ))
        }
    }

    async fn review_token(&self, token: &str) -> Result<UserInfo, Rejection> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let user = match self.tokens.get(&key) {
            Some(cached) => cached,
            None => {
                let review = TokenReview {
                    spec: TokenReviewSpec {
                        token: token.to_owned(),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let reviewed = Api::<TokenReview>::all(self.client.clone())
                    .create(&PostParams::default(), &review)
                    .await
                    .map_err(|source| Rejection::Review {
                        stage: "authentication",
                        source,
                    })?;
                let user = reviewed
                    .status
                    .filter(|s| s.authenticated == Some(true))
                    .and_then(|s| s.user)
                    .map(|u| UserInfo {
                        name: u.username.unwrap_or_default(),
                        uid: u.uid.unwrap_or_default(),
                        groups: u.groups.unwrap_or_default(),
                        extra: u.extra.unwrap_or_default(),
                    });
                self.tokens.insert(key, user.clone(), self.config.token_ttl);
                user
            }
        };
        user.ok_or_else(|| Rejection::Unauthenticated("invalid bearer token".into()))
    }

    /// Whether `user` may do `attributes` on this node.
    pub async fn authorize(
        &self,
        user: &UserInfo,
        attributes: Attributes,
    ) -> Result<(), Rejection> {
        let decision = match self.decide(user, attributes).await? {
            Err(_) if attributes.fallback().is_some() => {
                let fallback = attributes.fallback().unwrap_or(attributes);
                self.decide(user, fallback).await?
            }
            decision => decision,
        };
        decision.map_err(|reason| Rejection::Forbidden {
            user: user.name.clone(),
            verb: attributes.verb,
            subresource: attributes.subresource,
            reason,
        })
    }

    async fn decide(
        &self,
        user: &UserInfo,
        attributes: Attributes,
    ) -> Result<Result<(), String>, Rejection> {
        let key = (user.clone(), attributes);
        if let Some(cached) = self.decisions.get(&key) {
            return Ok(cached);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                uid: (!user.uid.is_empty()).then(|| user.uid.clone()),
                groups: Some(user.groups.clone()),
                extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(attributes.verb.into()),
                    resource: Some("nodes".into()),
                    subresource: Some(attributes.subresource.into()),
                    name: Some(self.config.node_name.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviewed = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|source| Rejection::Review {
                stage: "authorization",
                source,
            })?;
        let status = reviewed.status.unwrap_or_default();
        let decision = if status.allowed {
            Ok(())
        } else {
            Err(status.reason.unwrap_or_default())
        };
        let ttl = if decision.is_ok() {
            self.config.allow_ttl
        } else {
            self.config.deny_ttl
        };
        self.decisions.insert(key, decision.clone(), ttl);
        Ok(decision)
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_the_kubelets_subresources() {
        let of = |m: Method, p: &str| Attributes::of(&m, p);
        assert_eq!(
            of(Method::GET, "/stats/summary"),
            Attributes {
                verb: "get",
                subresource: "stats"
            }
        );
        assert_eq!(of(Method::GET, "/metrics/resource").subresource, "metrics");
        assert_eq!(of(Method::GET, "/metrics").subresource, "metrics");
        assert_eq!(of(Method::GET, "/metricsfoo").subresource, "proxy");
        assert_eq!(of(Method::GET, "/logs/").subresource, "log");
        assert_eq!(of(Method::GET, "/pods").subresource, "pods");
        assert_eq!(of(Method::GET, "/runningpods/").subresource, "pods");
        assert_eq!(of(Method::GET, "/healthz").subresource, "healthz");
        assert_eq!(
            of(Method::POST, "/exec/ns/pod/c"),
            Attributes {
                verb: "create",
                subresource: "proxy"
            }
        );
        assert_eq!(
            of(Method::GET, "/containerLogs/ns/pod/c").subresource,
            "proxy"
        );
        assert_eq!(of(Method::DELETE, "/x").verb, "delete");
    }

    #[test]
    fn only_fine_grained_subresources_fall_back_to_proxy() {
        let pods = Attributes {
            verb: "get",
            subresource: "pods",
        };
        assert_eq!(
            pods.fallback(),
            Some(Attributes {
                verb: "get",
                subresource: "proxy"
            })
        );
        assert_eq!(
            Attributes {
                verb: "get",
                subresource: "stats"
            }
            .fallback(),
            None
        );
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively_and_blank_ones_ignored() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), Some("abc"));
        headers.insert(http::header::AUTHORIZATION, "Bearer  ".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
        headers.insert(http::header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
    }
}
