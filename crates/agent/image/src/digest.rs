//! Streaming digest verification of registry blobs.

use sha2::{Digest as _, Sha256};

/// A blob whose content does not match its digest, or a digest we cannot check.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    /// The content hashed to a different value.
    #[error("blob digest mismatch: expected {expected}, got {actual}")]
    Mismatch {
        /// The digest the manifest or reference names.
        expected: String,
        /// The digest of the bytes received.
        actual: String,
    },
    /// The digest's algorithm is not `sha256`.
    #[error("unsupported digest {0:?}: only sha256 is supported")]
    Unsupported(String),
}

/// Hashes a blob as it streams and checks it against the expected digest.
pub struct DigestVerifier {
    expected: String,
    hasher: Sha256,
}

impl DigestVerifier {
    /// Starts verifying against `expected` (`sha256:<64 hex>`).
    pub fn new(expected: &str) -> Result<Self, DigestError> {
        let valid = expected
            .strip_prefix("sha256:")
            .is_some_and(|hex| hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()));
        if !valid {
            return Err(DigestError::Unsupported(expected.to_owned()));
        }
        Ok(Self {
            expected: expected.to_ascii_lowercase(),
            hasher: Sha256::new(),
        })
    }

    /// Feeds the next chunk of the blob.
    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
    }

    /// Checks the whole blob's digest.
    pub fn finish(self) -> Result<(), DigestError> {
        let actual = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        if actual == self.expected {
            Ok(())
        } else {
            Err(DigestError::Mismatch {
                expected: self.expected,
                actual,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn chunks_verify_and_corruption_names_both_digests() {
        let mut ok = DigestVerifier::new(HELLO).unwrap();
        ok.update(b"hel");
        ok.update(b"lo");
        assert_eq!(ok.finish(), Ok(()));
        let mut bad = DigestVerifier::new(HELLO).unwrap();
        bad.update(b"hellO");
        let err = bad.finish().unwrap_err().to_string();
        assert!(err.contains(HELLO) && err.contains("got sha256:"), "{err}");
        assert!(DigestVerifier::new("md5:abc").is_err());
    }
}
