//! Image references: `[registry/]repository[:tag][@digest]`.

use std::fmt;

/// The registry that short names resolve to.
pub const DOCKER_HUB: &str = "docker.io";

/// A reference that could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// The reference string is empty.
    #[error("image reference is empty")]
    Empty,
    /// The repository path has an empty or invalid component.
    #[error("image reference {reference:?}: invalid repository {repository:?}")]
    InvalidRepository {
        /// The whole reference as given.
        reference: String,
        /// The repository part that was rejected.
        repository: String,
    },
    /// The tag has characters a tag may not have, or is too long.
    #[error("image reference {reference:?}: invalid tag {tag:?}")]
    InvalidTag {
        /// The whole reference as given.
        reference: String,
        /// The tag that was rejected.
        tag: String,
    },
    /// The digest is not `algorithm:hex`.
    #[error("image reference {reference:?}: invalid digest {digest:?}")]
    InvalidDigest {
        /// The whole reference as given.
        reference: String,
        /// The digest that was rejected.
        digest: String,
    },
}

/// A fully qualified image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageReference {
    /// Registry host (and port), e.g. `docker.io` or `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path, e.g. `library/busybox`.
    pub repository: String,
    /// Tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// Content digest, e.g. `sha256:…`.
    pub digest: Option<String>,
}

impl ImageReference {
    /// Parses a reference, applying Docker Hub defaults to short names.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (name_and_tag, digest) = match input.split_once('@') {
            Some((name, digest)) => (name, Some(digest)),
            None => (input, None),
        };
        if let Some(d) = digest {
            let valid = d.split_once(':').is_some_and(|(alg, hex)| {
                !alg.is_empty()
                    && alg
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c))
                    && hex.len() >= 32
                    && hex.chars().all(|c| c.is_ascii_hexdigit())
            });
            if !valid {
                return Err(ReferenceError::InvalidDigest {
                    reference: input.to_owned(),
                    digest: d.to_owned(),
                });
            }
        }
        // A tag is a ':' after the last '/', so a registry port is not one.
        let last_slash = name_and_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_and_tag[last_slash..].rfind(':') {
            Some(i) => (
                &name_and_tag[..last_slash + i],
                Some(&name_and_tag[last_slash + i + 1..]),
            ),
            None => (name_and_tag, None),
        };
        if let Some(t) = tag {
            let valid = !t.is_empty()
                && t.len() <= 128
                && !t.starts_with(['.', '-'])
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if !valid {
                return Err(ReferenceError::InvalidTag {
                    reference: input.to_owned(),
                    tag: t.to_owned(),
                });
            }
        }
        // The first component is a registry only if it looks like a host.
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_owned(), rest.to_owned())
            }
            _ => (DOCKER_HUB.to_owned(), name.to_owned()),
        };
        let registry = if registry == "index.docker.io" || registry == "registry-1.docker.io" {
            DOCKER_HUB.to_owned()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let repo_valid = repository.split('/').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
        });
        if !repo_valid {
            return Err(ReferenceError::InvalidRepository {
                reference: input.to_owned(),
                repository,
            });
        }
        let tag = match (tag, digest) {
            (None, None) => Some("latest".to_owned()),
            (t, _) => t.map(str::to_owned),
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest: digest.map(str::to_owned),
        })
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn short_name_is_docker_hub_library_latest() {
        let r = ImageReference::parse("busybox").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
    }

    #[test]
    fn registry_port_is_not_a_tag() {
        let r = ImageReference::parse("127.0.0.1:5000/a/b").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "a/b");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = ImageReference::parse("localhost:5000/b:v1").unwrap();
        assert_eq!(r.tag.as_deref(), Some("v1"));
    }

    #[test]
    fn user_repo_and_digest() {
        let r = ImageReference::parse(&format!("user/app@sha256:{HEX}")).unwrap();
        assert_eq!(r.registry, DOCKER_HUB);
        assert_eq!(r.repository, "user/app");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest, Some(format!("sha256:{HEX}")));
        let r = ImageReference::parse("index.docker.io/nginx:1.27").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/nginx:1.27");
    }

    #[test]
    fn bad_references_name_the_problem() {
        assert_eq!(ImageReference::parse(""), Err(ReferenceError::Empty));
        assert!(matches!(
            ImageReference::parse("a@sha256:zz"),
            Err(ReferenceError::InvalidDigest { .. })
        ));
        assert!(matches!(
            ImageReference::parse("a:b$c"),
            Err(ReferenceError::InvalidTag { .. })
        ));
        assert!(matches!(
            ImageReference::parse("Busy/Box"),
            Err(ReferenceError::InvalidRepository { .. })
        ));
        assert!(matches!(
            ImageReference::parse("a//b"),
            Err(ReferenceError::InvalidRepository { .. })
        ));
    }
}
