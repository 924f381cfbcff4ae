//! The platform an image must be built for: the one the cell runs on.

use std::fmt;

/// An OCI platform (`os`, `architecture` and optional `variant`, with Go's spellings).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture, e.g. `amd64` or `arm64`.
    pub architecture: String,
    /// CPU variant, e.g. `v7` for 32-bit ARM; `None` when it does not matter.
    pub variant: Option<String>,
}

impl Platform {
    /// A platform from its parts.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Self {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        }
    }

    /// The platform this process was built for, in OCI (Go) spelling.
    pub fn host() -> Self {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "x86" => ("386", None),
            "aarch64" => ("arm64", None),
            "arm" => ("arm", Some("v7")),
            "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
            "loongarch64" => ("loong64", None),
            other => (other, None),
        };
        Self::new(std::env::consts::OS, architecture, variant)
    }

    /// Whether an image index entry for `os`/`architecture`/`variant` runs here.
    ///
    /// A missing variant on either side matches; `arm64` treats `v8` as no variant
    /// (that is how registries spell the baseline).
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        let normalize = |v: Option<&str>| match (architecture, v) {
            ("arm64", Some("v8")) => None,
            (_, v) => v.map(str::to_owned),
        };
        if self.os != os || self.architecture != architecture {
            return false;
        }
        match (normalize(self.variant.as_deref()), normalize(variant)) {
            (Some(ours), Some(theirs)) => ours == theirs,
            _ => true,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_matching() {
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        assert!(host.matches(&host.os, &host.architecture, None));
        let arm64 = Platform::new("linux", "arm64", None);
        assert!(arm64.matches("linux", "arm64", Some("v8")));
        assert!(!arm64.matches("linux", "amd64", None));
        assert!(!arm64.matches("windows", "arm64", None));
        let armv7 = Platform::new("linux", "arm", Some("v7"));
        assert!(!armv7.matches("linux", "arm", Some("v6")));
        assert_eq!(armv7.to_string(), "linux/arm/v7");
    }
}
