//! Instance-type catalogs: the built-in ones shipped in `data/` and overrides loaded from a file.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The AWS us-east-1 catalog shipped with Updraft (see the `source` field of the file).
const AWS_US_EAST_1: &str = include_str!("../data/aws-us-east-1.json");
/// The synthetic catalog of the local backend.
const LOCAL: &str = include_str!("../data/local.json");

/// CPU architecture of an instance type, spelled as the catalogs spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Arch {
    /// 64-bit x86 (Kubernetes `amd64`).
    #[serde(rename = "x86_64")]
    X86_64,
    /// 64-bit ARM (Kubernetes `arm64`), e.g. AWS Graviton.
    #[serde(rename = "arm64")]
    Arm64,
}

impl Arch {
    /// The architecture named by a `kubernetes.io/arch` node-selector value (`amd64`, `arm64`).
    pub fn from_kubernetes(value: &str) -> Option<Arch> {
        match value {
            "amd64" => Some(Arch::X86_64),
            "arm64" => Some(Arch::Arm64),
            _ => None,
        }
    }

    /// The catalog spelling: `x86_64` or `arm64`.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One instance type of a catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceType {
    /// The cloud's name, e.g. `c5.2xlarge`.
    pub name: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Number of GPUs (0 for none).
    #[serde(default)]
    pub gpus: u32,
    /// The GPU model when `gpus > 0`, e.g. `NVIDIA T4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_model: Option<String>,
    /// CPU architecture.
    pub architecture: Arch,
    /// For burstable types: the sustained fraction of each vCPU (t3.micro: 0.10). `None` for
    /// fixed-performance types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burstable_baseline: Option<f64>,
    /// On-demand price in the catalog's currency per hour.
    pub on_demand_per_hour: f64,
    /// Spot price per hour; `None` where the type is not offered as spot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spot_per_hour: Option<f64>,
}

impl InstanceType {
    /// Memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib.saturating_mul(1024 * 1024)
    }

    /// The sustained CPU of a burstable type in millicores (baseline × vCPUs), `None` otherwise.
    pub fn baseline_millis(&self) -> Option<u64> {
        self.burstable_baseline
            .map(|fraction| (fraction * f64::from(self.vcpus) * 1000.0).round() as u64)
    }
}

/// A catalog of instance types for one provider and region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Catalog {
    /// The cloud or backend the catalog describes (`aws`, `local`).
    pub provider: String,
    /// The region the prices are for (`us-east-1`); named in selection errors.
    pub region: String,
    /// Currency of the prices (`USD`).
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Where the numbers come from and when.
    #[serde(default)]
    pub source: String,
    /// The instance types, in any order.
    pub instance_types: Vec<InstanceType>,
}

fn default_currency() -> String {
    "USD".to_string()
}

/// A catalog that could not be loaded; the message names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The file could not be read.
    #[error("cannot read instance catalog {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not valid JSON/YAML or a field has the wrong type or is missing.
    #[error("instance catalog {origin}: at {field}: {message}")]
    Parse {
        /// The file (or built-in catalog name).
        origin: String,
        /// The path of the field in the document, e.g. `instanceTypes[3].vcpus`.
        field: String,
        /// What is wrong, from the parser.
        message: String,
    },
    /// The document parsed but a value is impossible (zero vCPUs, negative price, duplicate name…).
    #[error("instance catalog {origin}: {field}: {message}")]
    Invalid {
        /// The file (or built-in catalog name).
        origin: String,
        /// The field, e.g. `instanceTypes[3] (m5.large).onDemandPerHour`.
        field: String,
        /// What is wrong and what is expected.
        message: String,
    },
    /// No built-in catalog has that name.
    #[error("no built-in instance catalog named {name:?}; built-in catalogs: {known}")]
    UnknownBuiltin {
        /// The requested name.
        name: String,
        /// The names that exist, comma separated.
        known: String,
    },
}

/// Names of the catalogs compiled into Updraft.
pub const BUILTIN_CATALOGS: [&str; 2] = ["aws-us-east-1", "local"];

impl Catalog {
    /// A built-in catalog by name: `aws-us-east-1` or `local`.
    pub fn builtin(name: &str) -> Result<Catalog, CatalogError> {
        let text = match name {
            "aws-us-east-1" => AWS_US_EAST_1,
            "local" => LOCAL,
            _ => {
                return Err(CatalogError::UnknownBuiltin {
                    name: name.to_string(),
                    known: BUILTIN_CATALOGS.join(", "),
                });
            }
        };
        Catalog::from_json_str(text, &format!("built-in catalog {name}"))
    }

    /// The built-in AWS us-east-1 catalog (approximate prices; see its `source`).
    pub fn aws_us_east_1() -> Result<Catalog, CatalogError> {
        Catalog::builtin("aws-us-east-1")
    }

    /// The built-in catalog of the local backend.
    pub fn local() -> Result<Catalog, CatalogError> {
        Catalog::builtin("local")
    }

    /// Loads a catalog override from a file: YAML when the name ends in `.yaml`/`.yml`, JSON
    /// otherwise. Same schema as the files in `data/`.
    pub fn from_path(path: &Path) -> Result<Catalog, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let origin = path.display().to_string();
        let yaml = matches!(
            path.extension().and_then(|ext| ext.to_str()),
            Some("yaml" | "yml")
        );
        if yaml {
            Catalog::from_yaml_str(&text, &origin)
        } else {
            Catalog::from_json_str(&text, &origin)
        }
    }

    /// Parses and validates a JSON catalog; `origin` names it in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Catalog, CatalogError> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let catalog: Catalog =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
                CatalogError::Parse {
                    origin: origin.to_string(),
                    field: field_path(error.path()),
                    message: error.inner().to_string(),
                }
            })?;
        catalog.validated(origin)
    }

    /// Parses and validates a YAML catalog; `origin` names it in errors.
    pub fn from_yaml_str(text: &str, origin: &str) -> Result<Catalog, CatalogError> {
        let deserializer = serde_yaml::Deserializer::from_str(text);
        let catalog: Catalog = serde_path_to_error::deserialize(deserializer).map_err(|error| {
            CatalogError::Parse {
                origin: origin.to_string(),
                field: field_path(error.path()),
                message: error.inner().to_string(),
            }
        })?;
        catalog.validated(origin)
    }

    /// The instance type with exactly this name.
    pub fn get(&self, name: &str) -> Option<&InstanceType> {
        self.instance_types.iter().find(|t| t.name == name)
    }

    fn validated(self, origin: &str) -> Result<Catalog, CatalogError> {
        let invalid = |field: String, message: &str| CatalogError::Invalid {
            origin: origin.to_string(),
            field,
            message: message.to_string(),
        };
        if self.region.trim().is_empty() {
            return Err(invalid("region".into(), "must not be empty"));
        }
        if self.instance_types.is_empty() {
            return Err(invalid(
                "instanceTypes".into(),
                "must list at least one instance type",
            ));
        }
        let mut names = BTreeSet::new();
        for (index, t) in self.instance_types.iter().enumerate() {
            let field = |name: &str| format!("instanceTypes[{index}] ({}).{name}", t.name);
            if t.name.trim().is_empty() {
                return Err(invalid(
                    format!("instanceTypes[{index}].name"),
                    "must not be empty",
                ));
            }
            if !names.insert(t.name.as_str()) {
                return Err(invalid(
                    field("name"),
                    "appears twice; each instance type may be listed once",
                ));
            }
            if t.vcpus == 0 {
                return Err(invalid(field("vcpus"), "must be at least 1"));
            }
            if t.memory_mib == 0 {
                return Err(invalid(field("memoryMiB"), "must be at least 1"));
            }
            if !(t.on_demand_per_hour.is_finite() && t.on_demand_per_hour >= 0.0) {
                return Err(invalid(
                    field("onDemandPerHour"),
                    "must be a price of zero or more",
                ));
            }
            if let Some(spot) = t.spot_per_hour
                && !(spot.is_finite() && spot >= 0.0)
            {
                return Err(invalid(
                    field("spotPerHour"),
                    "must be a price of zero or more (or be left out)",
                ));
            }
            if let Some(baseline) = t.burstable_baseline
                && !(baseline.is_finite() && baseline > 0.0 && baseline <= 1.0)
            {
                return Err(invalid(
                    field("burstableBaseline"),
                    "must be a fraction of a vCPU in (0, 1] (or be left out for fixed-performance types)",
                ));
            }
            if t.gpus == 0 && t.gpu_model.is_some() {
                return Err(invalid(
                    field("gpuModel"),
                    "is set but gpus is 0; set gpus or remove gpuModel",
                ));
            }
        }
        Ok(self)
    }
}

/// `instanceTypes[3].vcpus` from serde_path_to_error's path (`instanceTypes[3].vcpus` already,
/// or `.` for the document itself).
fn field_path(path: &serde_path_to_error::Path) -> String {
    let text = path.to_string();
    if text == "." {
        "the top level".to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_load_and_validate() {
        let aws = Catalog::aws_us_east_1().expect("aws catalog");
        assert_eq!(aws.region, "us-east-1");
        assert!((60..=150).contains(&aws.instance_types.len()));
        assert!(aws.source.contains("ILLUSTRATIVE"));
        let c5 = aws.get("c5.2xlarge").expect("c5.2xlarge");
        assert_eq!((c5.vcpus, c5.memory_mib), (8, 16 * 1024));
        let local = Catalog::local().expect("local catalog");
        assert_eq!(local.provider, "local");
        assert!(Catalog::builtin("gce-europe-west1").is_err());
    }

    #[test]
    fn errors_name_the_field() {
        let text = r#"{"provider":"aws","region":"r","instanceTypes":[
            {"name":"a.large","vcpus":2,"memoryMiB":1,"architecture":"x86_64","onDemandPerHour":1},
            {"name":"b.large","vcpus":"two","memoryMiB":1,"architecture":"x86_64","onDemandPerHour":1}]}"#;
        let message = Catalog::from_json_str(text, "my.json")
            .expect_err("bad vcpus")
            .to_string();
        assert!(message.contains("my.json"), "{message}");
        assert!(message.contains("instanceTypes[1].vcpus"), "{message}");

        let text = r#"{"provider":"aws","region":"r","instanceTypes":[
            {"name":"a.large","vcpus":2,"memoryMiB":1,"architecture":"x86_64","onDemandPerHour":-1}]}"#;
        let message = Catalog::from_json_str(text, "my.json")
            .expect_err("negative price")
            .to_string();
        assert!(
            message.contains("instanceTypes[0] (a.large).onDemandPerHour"),
            "{message}"
        );

        let text = "provider: aws\nregion: r\ninstanceTypes:\n- name: a\n  vcpus: 1\n  memoryMiB: 1\n  architecture: sparc\n  onDemandPerHour: 1\n";
        let message = Catalog::from_yaml_str(text, "c.yaml")
            .expect_err("bad arch")
            .to_string();
        assert!(
            message.contains("instanceTypes[0].architecture"),
            "{message}"
        );
    }

    #[test]
    fn from_path_reads_yaml_and_names_missing_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.yaml");
        std::fs::write(
            &path,
            "provider: aws\nregion: eu-west-1\ninstanceTypes:\n- {name: x.large, vcpus: 2, memoryMiB: 4096, architecture: arm64, onDemandPerHour: 0.1}\n",
        )
        .expect("write");
        let catalog = Catalog::from_path(&path).expect("load");
        assert_eq!(catalog.region, "eu-west-1");
        assert_eq!(catalog.instance_types[0].architecture, Arch::Arm64);
        let missing = dir.path().join("nope.json");
        let message = Catalog::from_path(&missing)
            .expect_err("missing")
            .to_string();
        assert!(message.contains("nope.json"), "{message}");
    }
}
