//! `updraft cells`: the operator's view of the cells provider.
//!
//! - `updraft cells list`: every cell of this controller (from the backend's own listing, the
//!   source of truth) with its pod, type and price.
//! - `updraft cells describe <cell-or-pod>`: one cell in detail (by cell id, cell name, pod
//!   `namespace/name`, pod name or pod UID).
//! - `updraft cells select -f pod.yaml`: a dry run of the cost engine: which instance type the
//!   pod would get, why, what it costs, and the runners-up.
//!
//! All read the same `--provider-config cells.yaml` as `updraft run --provider cells`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::PodSpec;
use serde::{Deserialize as _, Serialize};
use updraft_cells_catalog::{
    Candidate, Catalog, Decision, InstanceType, PodRequest, format_bytes, format_cpu,
};
use updraft_provider_cells::{CellRow, CellsConfig};

/// `updraft cells`.
#[derive(Debug, Args)]
pub struct CellsArgs {
    /// The cells provider's YAML config (the file `updraft run --provider cells` uses).
    #[arg(long, env = "UPDRAFT_PROVIDER_CONFIG", global = true)]
    pub provider_config: Option<PathBuf>,
    #[command(subcommand)]
    command: CellsCommand,
}

#[derive(Debug, Subcommand)]
enum CellsCommand {
    /// List the cells of this controller: NAME, STATUS, INSTANCE-TYPE, LAUNCH-TYPE, CELL-ID,
    /// IPs, POD, PRICE/h, AGE.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Show one cell (or every cell of one pod) in detail.
    Describe {
        /// A cell id, a cell name, a pod as namespace/name, a pod name or a pod UID.
        target: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
    /// Dry run: which instance type a pod would get, why, its hourly price and the runners-up.
    Select {
        /// A Pod manifest (YAML or JSON), or a workload with a pod template (Deployment,
        /// StatefulSet, Job, …).
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: OutputFormat,
    },
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns (or `Key: value` lines for one object).
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// Why an `updraft cells` command failed; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CellsError {
    /// No config file was given.
    #[error(
        "updraft cells needs --provider-config cells.yaml (the file updraft run --provider cells uses), or UPDRAFT_PROVIDER_CONFIG"
    )]
    NoConfig,
    /// The config file is unusable.
    #[error(transparent)]
    Config(#[from] updraft_provider_cells::ConfigError),
    /// The backend could not be set up.
    #[error(transparent)]
    Backend(#[from] updraft_provider_cells::BackendSetupError),
    /// The backend's listing failed.
    #[error("listing the cells: {0}")]
    List(#[from] updraft_cells_backend::BackendError),
    /// The catalog or the selection policy is unusable.
    #[error(transparent)]
    Setup(#[from] updraft_provider_cells::SetupError),
    /// The catalog could not be loaded.
    #[error(transparent)]
    Catalog(#[from] updraft_cells_catalog::CatalogError),
    /// The pod file could not be read.
    #[error("reading {path}: {source}")]
    ReadPod {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The pod file is not a pod (or workload) manifest.
    #[error("{path}: {message}")]
    BadPod {
        /// The file.
        path: PathBuf,
        /// What is wrong and what is expected.
        message: String,
    },
    /// The pod cannot get a cell: a bad annotation, unreadable resources or no fitting type.
    #[error("pod {pod} would not get a cell: {source}")]
    Unsatisfiable {
        /// `namespace/name` of the pod.
        pod: String,
        /// The cost engine's explanation.
        #[source]
        source: Box<updraft_cells_catalog::CostError>,
    },
    /// Nothing matches `describe`'s argument.
    #[error(
        "no cell or pod {target:?} among the {count} cells of controller {controller:?}; see `updraft cells list`"
    )]
    NotFound {
        /// What was asked for.
        target: String,
        /// How many cells the controller has.
        count: usize,
        /// The controller id.
        controller: String,
    },
    /// JSON or YAML encoding failed.
    #[error("encoding the output: {0}")]
    Encode(String),
}

/// Runs an `updraft cells` command, writing its output to stdout.
pub async fn run(args: CellsArgs) -> Result<(), CellsError> {
    let path = args.provider_config.ok_or(CellsError::NoConfig)?;
    let config = CellsConfig::load(&path)?;
    let text = match args.command {
        CellsCommand::List { output } => {
            let rows = list(&config).await?;
            render_list(&rows, SystemTime::now(), output)?
        }
        CellsCommand::Describe { target, output } => {
            let rows = list(&config).await?;
            let count = rows.len();
            let matches = find(&rows, &target);
            if matches.is_empty() {
                return Err(CellsError::NotFound {
                    target,
                    count,
                    controller: config.controller_id.clone(),
                });
            }
            let catalog = updraft_provider_cells::load_catalog(&config)?;
            let console = console_tails(&config, &matches);
            render_describe(&matches, &catalog, &console, SystemTime::now(), output)?
        }
        CellsCommand::Select { file, output } => {
            let selector = updraft_provider_cells::selector(&config)?;
            let manifest = read_pod_manifest(&file)?;
            let (decision, _) = updraft_cells_catalog::decide(
                &selector,
                &manifest.spec,
                &manifest.annotations,
                config.default_launch_type(),
            )
            .map_err(|source| CellsError::Unsatisfiable {
                pod: manifest.name.clone(),
                source: Box::new(source),
            })?;
            let request = PodRequest::from_pod_spec(&manifest.spec).map_err(|e| {
                CellsError::Unsatisfiable {
                    pod: manifest.name.clone(),
                    source: Box::new(e.into()),
                }
            })?;
            let view = SelectView::new(&manifest, &request, &decision, &config.region());
            render_select(&view, output)?
        }
    };
    print!("{text}");
    Ok(())
}

async fn list(config: &CellsConfig) -> Result<Vec<CellRow>, CellsError> {
    let backend = updraft_provider_cells::connect_backend(config).await?;
    let catalog = updraft_provider_cells::load_catalog(config)?;
    Ok(updraft_provider_cells::list_cells(&*backend, &catalog, &config.controller_id).await?)
}

/// The last lines of each matched local cell's console (the bootstrap's and agent's output),
/// by cell id; empty for other backends.
fn console_tails(config: &CellsConfig, rows: &[&CellRow]) -> BTreeMap<String, String> {
    let mut tails = BTreeMap::new();
    if config.backend != updraft_provider_cells::BackendKind::Local {
        return tails;
    }
    let Ok(local) = updraft_provider_cells::local_backend(config) else {
        return tails;
    };
    for row in rows {
        if let Ok(console) = local.console_output(&row.cell.id) {
            let console = strip_terminal_escapes(&console);
            let lines: Vec<&str> = console.lines().collect();
            let tail = lines[lines.len().saturating_sub(CONSOLE_LINES)..].join("\n");
            tails.insert(row.cell.id.to_string(), tail);
        }
    }
    tails
}

/// The text without terminal escape sequences (`ESC [ … letter`), which an agent writing
/// coloured logs leaves in its console.
pub fn strip_terminal_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// How many console lines `describe` shows.
const CONSOLE_LINES: usize = 10;

/// The cells `target` names: by cell id or name, pod `namespace/name`, pod UID, or pod name.
fn find<'a>(rows: &'a [CellRow], target: &str) -> Vec<&'a CellRow> {
    let exact: Vec<&CellRow> = rows
        .iter()
        .filter(|r| {
            r.cell.id.to_string() == target
                || r.cell.name == target
                || r.pod.as_deref() == Some(target)
                || r.pod_uid.as_deref() == Some(target)
        })
        .collect();
    if !exact.is_empty() {
        return exact;
    }
    rows.iter()
        .filter(|r| {
            r.cell
                .identity
                .as_ref()
                .is_some_and(|i| !i.pod_name.is_empty() && i.pod_name == target)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// list and describe

/// A cell as `-o json|yaml` shows it.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct CellView {
    name: String,
    status: String,
    instance_type: String,
    launch_type: String,
    cell_id: String,
    management_ip: Option<String>,
    pod_ip: Option<String>,
    public_ip: Option<String>,
    /// `namespace/name`; absent for standby cells and cells without an identity.
    pod: Option<String>,
    pod_uid: Option<String>,
    node: Option<String>,
    standby: bool,
    price_per_hour: Option<f64>,
    currency: String,
    /// RFC 3339.
    launched_at: Option<String>,
    age_seconds: Option<u64>,
    tags: BTreeMap<String, String>,
}

impl CellView {
    fn new(row: &CellRow, now: SystemTime) -> CellView {
        let cell = &row.cell;
        let standby = is_standby(row);
        CellView {
            name: cell.name.clone(),
            status: cell.state.as_str().to_owned(),
            instance_type: cell.instance_type.clone(),
            launch_type: cell.launch_type.as_str().to_owned(),
            cell_id: cell.id.to_string(),
            management_ip: cell.management_ip.map(|ip| ip.to_string()),
            pod_ip: cell.pod_ip.map(|ip| ip.to_string()),
            public_ip: cell.public_ip.map(|ip| ip.to_string()),
            pod: row.pod.clone().filter(|_| !standby),
            pod_uid: row.pod_uid.clone().filter(|_| !standby),
            node: row.node.clone(),
            standby,
            price_per_hour: row.price_per_hour,
            currency: row.currency.clone(),
            launched_at: cell.launch_time.and_then(rfc3339),
            age_seconds: cell.launch_time.map(|t| age(t, now).as_secs()),
            tags: cell.tags.clone(),
        }
    }
}

fn is_standby(row: &CellRow) -> bool {
    row.cell
        .identity
        .as_ref()
        .is_some_and(|i| i.pod_name.is_empty() && i.pod_uid.is_empty())
}

fn age(launched: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(launched).unwrap_or_default()
}

fn rfc3339(time: SystemTime) -> Option<String> {
    k8s_openapi::jiff::Timestamp::try_from(time)
        .ok()
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
}

/// A duration as kubectl's AGE column writes it (`45s`, `5m3s`, `40m`, `3h5m`, `30h`, `3d4h`,
/// `45d`, `2y10d`).
pub fn human_age(age: Duration) -> String {
    let seconds = age.as_secs();
    let minutes = seconds / 60;
    let hours = minutes / 60;
    let days = hours / 24;
    let with = |major: u64, major_unit: &str, minor: u64, minor_unit: &str| {
        if minor == 0 {
            format!("{major}{major_unit}")
        } else {
            format!("{major}{major_unit}{minor}{minor_unit}")
        }
    };
    if seconds < 120 {
        format!("{seconds}s")
    } else if minutes < 10 {
        with(minutes, "m", seconds % 60, "s")
    } else if minutes < 180 {
        format!("{minutes}m")
    } else if hours < 8 {
        with(hours, "h", minutes % 60, "m")
    } else if hours < 48 {
        format!("{hours}h")
    } else if days < 8 {
        with(days, "d", hours % 24, "h")
    } else if days < 365 * 2 {
        format!("{days}d")
    } else {
        with(days / 365, "y", days % 365, "d")
    }
}

fn or_none(value: Option<&str>) -> String {
    value
        .filter(|v| !v.is_empty())
        .unwrap_or("<none>")
        .to_owned()
}

fn price(price: Option<f64>, currency: &str) -> String {
    match price {
        Some(p) => format!("{p:.4} {currency}"),
        None => "<unknown>".to_owned(),
    }
}

/// Aligned columns, kubectl style: left-aligned, three spaces between columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            text.push_str(&format!("{cell:<width$}   "));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn encode<T: Serialize>(value: &T, format: OutputFormat) -> Result<Option<String>, CellsError> {
    match format {
        OutputFormat::Table => Ok(None),
        OutputFormat::Json => serde_json::to_string_pretty(value)
            .map(|s| Some(s + "\n"))
            .map_err(|e| CellsError::Encode(e.to_string())),
        OutputFormat::Yaml => serde_yaml::to_string(value)
            .map(Some)
            .map_err(|e| CellsError::Encode(e.to_string())),
    }
}

/// `updraft cells list` in `format`.
pub fn render_list(
    rows: &[CellRow],
    now: SystemTime,
    format: OutputFormat,
) -> Result<String, CellsError> {
    let views: Vec<CellView> = rows.iter().map(|r| CellView::new(r, now)).collect();
    if let Some(text) = encode(&views, format)? {
        return Ok(text);
    }
    if views.is_empty() {
        return Ok("No cells.\n".to_owned());
    }
    let lines: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let ips: Vec<&str> = [&v.management_ip, &v.pod_ip, &v.public_ip]
                .into_iter()
                .filter_map(|ip| ip.as_deref())
                .collect();
            vec![
                v.name.clone(),
                v.status.clone(),
                v.instance_type.clone(),
                v.launch_type.clone(),
                v.cell_id.clone(),
                if ips.is_empty() {
                    "<none>".to_owned()
                } else {
                    ips.join(",")
                },
                if v.standby {
                    "<standby>".to_owned()
                } else {
                    or_none(v.pod.as_deref())
                },
                price(v.price_per_hour, &v.currency),
                v.age_seconds
                    .map(|s| human_age(Duration::from_secs(s)))
                    .unwrap_or_else(|| "<unknown>".to_owned()),
            ]
        })
        .collect();
    Ok(table(
        &[
            "NAME",
            "STATUS",
            "INSTANCE-TYPE",
            "LAUNCH-TYPE",
            "CELL-ID",
            "IPs",
            "POD",
            "PRICE/h",
            "AGE",
        ],
        &lines,
    ))
}

/// `Key: value` lines with the values aligned.
fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(key, value)| format!("{:<width$} {value}\n", format!("{key}:")))
        .collect()
}

fn describe_type(instance_type: &InstanceType) -> String {
    let mut text = format!(
        "{} vCPUs, {} memory, {}",
        instance_type.vcpus,
        format_bytes(instance_type.memory_bytes()),
        instance_type.architecture.as_str()
    );
    if instance_type.gpus > 0 {
        text.push_str(&format!(
            ", {} GPU {}",
            instance_type.gpus,
            instance_type.gpu_model.as_deref().unwrap_or("")
        ));
    }
    if let Some(baseline) = instance_type.burstable_baseline {
        text.push_str(&format!(
            ", burstable (baseline {:.0}% per vCPU)",
            baseline * 100.0
        ));
    }
    text
}

/// `updraft cells describe` of the matched rows in `format`.
pub fn render_describe(
    rows: &[&CellRow],
    catalog: &Catalog,
    console: &BTreeMap<String, String>,
    now: SystemTime,
    format: OutputFormat,
) -> Result<String, CellsError> {
    let views: Vec<CellView> = rows.iter().map(|r| CellView::new(r, now)).collect();
    if let Some(text) = encode(&views, format)? {
        return Ok(text);
    }
    let mut out = String::new();
    for (row, view) in rows.iter().zip(&views) {
        if !out.is_empty() {
            out.push('\n');
        }
        let instance_type = match catalog.get(&view.instance_type) {
            Some(t) => format!("{} ({})", view.instance_type, describe_type(t)),
            None => format!("{} (not in the catalog)", view.instance_type),
        };
        let launched = match (&view.launched_at, view.age_seconds) {
            (Some(at), Some(age)) => {
                format!("{at} ({} ago)", human_age(Duration::from_secs(age)))
            }
            _ => "<unknown>".to_owned(),
        };
        let pod = if view.standby {
            "<standby: pre-started, waiting for a pod>".to_owned()
        } else {
            match (&view.pod, &view.pod_uid) {
                (Some(pod), Some(uid)) => format!("{pod} (uid {uid})"),
                (pod, _) => or_none(pod.as_deref()),
            }
        };
        let controller = row
            .cell
            .identity
            .as_ref()
            .map(|i| i.controller_id.clone())
            .unwrap_or_else(|| "<none: the cell carries no complete identity>".to_owned());
        out.push_str(&key_values(&[
            ("Name", view.name.clone()),
            ("Cell ID", view.cell_id.clone()),
            ("Status", view.status.clone()),
            ("Instance Type", instance_type),
            ("Launch Type", view.launch_type.clone()),
            (
                "Price",
                match view.price_per_hour {
                    Some(p) => format!("{p:.4} {}/h", view.currency),
                    None => "<unknown: type not in the catalog>".to_owned(),
                },
            ),
            ("Management IP", or_none(view.management_ip.as_deref())),
            ("Pod IP", or_none(view.pod_ip.as_deref())),
            ("Public IP", or_none(view.public_ip.as_deref())),
            ("Launched", launched),
            ("Pod", pod),
            ("Node", or_none(view.node.as_deref())),
            ("Controller", controller),
        ]));
        out.push_str("Tags:\n");
        if view.tags.is_empty() {
            out.push_str("  <none>\n");
        }
        for (key, value) in &view.tags {
            out.push_str(&format!("  {key}={value}\n"));
        }
        if let Some(tail) = console.get(&view.cell_id) {
            out.push_str(&format!("Console (last {CONSOLE_LINES} lines):\n"));
            for line in tail.lines() {
                out.push_str(&format!("  {line}\n"));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// select

/// A pod read from a manifest: its name, annotations and spec.
#[derive(Debug, Clone)]
pub struct PodManifest {
    /// `namespace/name` (`default` when the manifest names no namespace).
    pub name: String,
    /// The manifest's kind (`Pod`, `Deployment`, …).
    pub kind: String,
    /// The pod's annotations (a workload's pod template's).
    pub annotations: BTreeMap<String, String>,
    /// The pod's spec.
    pub spec: PodSpec,
}

/// Reads a Pod, or the pod template of a workload, from a YAML or JSON file.
pub fn read_pod_manifest(path: &Path) -> Result<PodManifest, CellsError> {
    let text = std::fs::read_to_string(path).map_err(|source| CellsError::ReadPod {
        path: path.to_owned(),
        source,
    })?;
    parse_pod_manifest(&text).map_err(|message| CellsError::BadPod {
        path: path.to_owned(),
        message,
    })
}

/// Parses a Pod (or a workload's pod template) from YAML or JSON text; the error says what
/// is wrong.
pub fn parse_pod_manifest(text: &str) -> Result<PodManifest, String> {
    let document: serde_yaml::Value = serde_yaml::Deserializer::from_str(text)
        .next()
        .ok_or_else(|| "the file is empty: give a Pod manifest (kind: Pod)".to_owned())
        .and_then(|d| {
            serde_yaml::Value::deserialize(d).map_err(|e| format!("not YAML or JSON: {e}"))
        })?;
    let document: serde_json::Value =
        serde_json::to_value(&document).map_err(|e| format!("not a Kubernetes manifest: {e}"))?;
    if document.is_null() {
        return Err("the file is empty: give a Pod manifest (kind: Pod)".to_owned());
    }
    let kind = document
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or_else(|| {
            "no kind: give a Pod manifest (kind: Pod) or a workload with a pod template".to_owned()
        })?
        .to_owned();
    let metadata = document.get("metadata");
    let name = metadata
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>");
    let namespace = metadata
        .and_then(|m| m.get("namespace"))
        .and_then(|n| n.as_str())
        .unwrap_or("default");
    // Where the pod's metadata and spec are for each kind.
    let template = match kind.as_str() {
        "Pod" => Some(&document),
        "CronJob" => document.pointer("/spec/jobTemplate/spec/template"),
        _ => document.pointer("/spec/template"),
    };
    let Some(template) = template else {
        return Err(format!(
            "a {kind} has no pod template: give a Pod manifest (kind: Pod) or a workload with spec.template"
        ));
    };
    let spec = template
        .get("spec")
        .ok_or_else(|| format!("the {kind} has no pod spec"))?;
    let spec: PodSpec = serde_path_to_error::deserialize(spec)
        .map_err(|e| format!("the pod spec: {}: {}", e.path(), e.inner()))?;
    let annotations = match template.pointer("/metadata/annotations") {
        Some(value) => serde_json::from_value(value.clone())
            .map_err(|e| format!("metadata.annotations: {e} (values must be strings)"))?,
        None => BTreeMap::new(),
    };
    Ok(PodManifest {
        name: format!("{namespace}/{name}"),
        kind,
        annotations,
        spec,
    })
}

/// An instance type with its price, as `select` shows it.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct CandidateView {
    instance_type: String,
    vcpus: u32,
    memory: String,
    gpus: u32,
    architecture: String,
    price_per_hour: f64,
    /// The unlimited-burst surcharge included in the price.
    burst_surcharge_per_hour: f64,
}

impl CandidateView {
    fn new(candidate: &Candidate) -> CandidateView {
        let t = &candidate.instance_type;
        CandidateView {
            instance_type: t.name.clone(),
            vcpus: t.vcpus,
            memory: format_bytes(t.memory_bytes()),
            gpus: t.gpus,
            architecture: t.architecture.as_str().to_owned(),
            price_per_hour: candidate.price_per_hour,
            burst_surcharge_per_hour: candidate.burst_surcharge_per_hour,
        }
    }
}

/// What `updraft cells select` shows.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct SelectView {
    pod: String,
    kind: String,
    region: String,
    request: RequestView,
    chosen: CandidateView,
    launch_type: String,
    currency: String,
    reason: String,
    runners_up: Vec<CandidateView>,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
struct RequestView {
    cpu: String,
    memory: String,
    gpus: u32,
    architecture: Option<String>,
}

impl SelectView {
    fn new(
        manifest: &PodManifest,
        request: &PodRequest,
        decision: &Decision,
        region: &str,
    ) -> SelectView {
        SelectView {
            pod: manifest.name.clone(),
            kind: manifest.kind.clone(),
            region: region.to_owned(),
            request: RequestView {
                cpu: format_cpu(request.cpu_millis),
                memory: format_bytes(request.memory_bytes),
                gpus: request.gpus,
                architecture: request.arch.map(|a| a.as_str().to_owned()),
            },
            chosen: CandidateView::new(&decision.chosen),
            launch_type: decision.launch_type.as_str().to_owned(),
            currency: decision.currency.clone(),
            reason: decision.reason.clone(),
            runners_up: decision.runners_up.iter().map(CandidateView::new).collect(),
        }
    }
}

/// `updraft cells select`'s output in `format`.
fn render_select(view: &SelectView, format: OutputFormat) -> Result<String, CellsError> {
    {
        if let Some(text) = encode(view, format)? {
            return Ok(text);
        }
        let request = &view.request;
        let mut out = key_values(&[
            ("Pod", format!("{} ({})", view.pod, view.kind)),
            (
                "Request",
                format!(
                    "{} CPU, {} memory, {} GPU, architecture {}",
                    request.cpu,
                    request.memory,
                    request.gpus,
                    request.architecture.as_deref().unwrap_or("any")
                ),
            ),
            ("Region", view.region.clone()),
            (
                "Instance Type",
                format!(
                    "{} ({} vCPUs, {} memory, {} GPU, {})",
                    view.chosen.instance_type,
                    view.chosen.vcpus,
                    view.chosen.memory,
                    view.chosen.gpus,
                    view.chosen.architecture
                ),
            ),
            ("Launch Type", view.launch_type.clone()),
            (
                "Price",
                format!("{:.4} {}/h", view.chosen.price_per_hour, view.currency),
            ),
            ("Why", view.reason.clone()),
        ]);
        out.push('\n');
        if view.runners_up.is_empty() {
            out.push_str("Runners-up: none (no other type fits)\n");
            return Ok(out);
        }
        out.push_str("Runners-up:\n");
        let rows: Vec<Vec<String>> = view
            .runners_up
            .iter()
            .map(|c| {
                vec![
                    c.instance_type.clone(),
                    c.vcpus.to_string(),
                    c.memory.clone(),
                    c.gpus.to_string(),
                    c.architecture.clone(),
                    format!("{:.4} {}", c.price_per_hour, view.currency),
                    format!("+{:.4}", c.price_per_hour - view.chosen.price_per_hour),
                ]
            })
            .collect();
        for line in table(
            &[
                "INSTANCE-TYPE",
                "VCPUS",
                "MEMORY",
                "GPUS",
                "ARCH",
                "PRICE/h",
                "MORE/h",
            ],
            &rows,
        )
        .lines()
        {
            out.push_str(&format!("  {line}\n"));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
