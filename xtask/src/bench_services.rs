//! `cargo xtask bench services`: issue 13's measurements of ClusterIP routing for pods on
//! cells, without the control plane.
//!
//! 1. *Derivation and memory in Updraft*: synthetic Services and EndpointSlices (one port,
//!    5 endpoints per Service) in kube-runtime reflector stores like the node's, the table
//!    derived with `updraft_node::service_routes::routes`; time per derivation (p50/p99) and
//!    memory (the anonymous RSS, `RssAnon`, of a fresh child process before and after the
//!    inputs and the table; the peak during a derivation; the table's exact heap; the JSON
//!    sizes). The node keeps its Services and EndpointSlices
//!    slimmed (`slim` in services.rs, `slim_slice` in service_routes.rs, both private): the
//!    synthetic objects carry exactly the fields those keep.
//! 2. *Install time on a cell*: in a fresh network namespace, `updraft_cell_proxy::render`
//!    and `Nft::apply` (one `nft -f` transaction) of the whole table, then updates that each
//!    change one endpoint of one Service, derived, rendered and installed again.
//! 3. *Throughput through a ClusterIP against the pod IP*: two network namespaces joined by a
//!    veth pair, a TCP server in the "pod" one, the 200 × 5 table in the "client" one with
//!    a cluster IP routed to the pod's five addresses; new connections per second and bulk
//!    throughput, against the cluster IP and the pod IPs directly, interleaved in one run.
//!
//! Runs as root; everything it makes (namespaces, the veth pair inside them, the nftables
//! tables inside those) is removed at the end, on error and on Ctrl-C. All traffic stays in
//! the bench's own namespaces (10.252.0.0/29 on the veth pair; the cluster IPs are
//! translated in the client namespace before a packet leaves it).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use updraft_cell_proxy::{Nft, ServiceRoute, render};
use updraft_node::service_routes::{self, SERVICE_NAME_LABEL};

/// The node the synthetic endpoints are on (no Service here is `internalTrafficPolicy: Local`).
const NODE: &str = "updraft-cells";
/// Endpoints per Service.
const ENDPOINTS: usize = 5;
/// The sizes of issue 13: 200 Services, and 2,000 (10,000 endpoints) for memory.
const SIZES: [usize; 2] = [200, 2000];
/// Every network namespace of the bench is named `{PREFIX}{pid}-{role}`.
const PREFIX: &str = "updraft-bench-svc-";
/// The Service the throughput part measures: the first one, `bench-0/svc-0000:http`.
const CLUSTER_IP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 100, 1), 80);
/// The pod's server port (the Services' target port).
const POD_PORT: u16 = 8080;
/// The client's end of the veth pair.
const CLIENT_ADDR: &str = "10.252.0.1/29";
/// The bench pod's addresses: the first Service's five endpoints.
const POD_ADDRS: [Ipv4Addr; ENDPOINTS] = [
    Ipv4Addr::new(10, 252, 0, 2),
    Ipv4Addr::new(10, 252, 0, 3),
    Ipv4Addr::new(10, 252, 0, 4),
    Ipv4Addr::new(10, 252, 0, 5),
    Ipv4Addr::new(10, 252, 0, 6),
];

/// What to measure.
pub struct ServicesBench {
    /// Fewer repetitions and shorter phases.
    pub quick: bool,
    /// Table updates installed per size (default 50, quick 10).
    pub updates: Option<usize>,
    /// Interleaved rounds of the connection-rate test (default 10, quick 4).
    pub rounds: Option<usize>,
    /// Seconds per target and round of the connection-rate test (default 1, quick 0.5).
    pub phase_seconds: Option<f64>,
    /// MiB per bulk transfer (default 256, quick 32).
    pub bulk_mib: Option<usize>,
    /// Namespaces the table is installed in at once (default 50, quick 10).
    pub cells: Option<usize>,
    /// The parts to run (1–3); empty: all.
    pub parts: Vec<u8>,
}

/// What the child process of part 1 measures (`bench services-probe`).
pub struct Probe {
    /// Services (each one port, `ENDPOINTS` endpoints in one EndpointSlice).
    pub services: usize,
    /// Timed derivations.
    pub runs: usize,
}

// ---------------------------------------------------------------------------------------
// Synthetic inputs

/// The cluster IP of Service `i`: 10.96.100.1 onwards.
fn cluster_ip(i: usize) -> Ipv4Addr {
    let high = u8::try_from(100 + i / 250).unwrap_or(u8::MAX);
    Ipv4Addr::new(10, 96, high, (i % 250 + 1) as u8)
}

/// Endpoint `j` of Service `i`: Service 0's are the bench pod's addresses, the others
/// 10.252.1.1 onwards (never connected to).
fn endpoint_ip(i: usize, j: usize) -> Ipv4Addr {
    if i == 0 {
        return POD_ADDRS[j % ENDPOINTS];
    }
    let k = i * ENDPOINTS + j;
    let high = u8::try_from(1 + k / 250).unwrap_or(u8::MAX);
    Ipv4Addr::new(10, 252, high, (k % 250 + 1) as u8)
}

fn namespace(i: usize) -> String {
    format!("bench-{}", i % 20)
}

fn uid(kind: u8, i: usize) -> String {
    format!("0000000{kind}-0000-4000-8000-{i:012}")
}

/// Service `i` as the node keeps it (what `slim` in services.rs leaves).
fn service(i: usize) -> Service {
    let ip = cluster_ip(i).to_string();
    Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i:04}")),
            namespace: Some(namespace(i)),
            resource_version: Some((100_000 + i).to_string()),
            uid: Some(uid(1, i)),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(ip.clone()),
            cluster_ips: Some(vec![ip]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::Int(i32::from(POD_PORT))),
                ..ServicePort::default()
            }]),
            session_affinity: Some("None".into()),
            internal_traffic_policy: Some("Cluster".into()),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Service `i`'s EndpointSlice as the node keeps it (what `slim_slice` leaves).
fn slice(i: usize) -> EndpointSlice {
    EndpointSlice {
        address_type: "IPv4".into(),
        endpoints: Some(
            (0..ENDPOINTS)
                .map(|j| Endpoint {
                    addresses: vec![endpoint_ip(i, j).to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    node_name: Some(NODE.into()),
                    ..Endpoint::default()
                })
                .collect(),
        ),
        metadata: ObjectMeta {
            name: Some(format!("svc-{i:04}-x7k2p")),
            namespace: Some(namespace(i)),
            resource_version: Some((200_000 + i).to_string()),
            uid: Some(uid(2, i)),
            labels: Some(BTreeMap::from([(
                SERVICE_NAME_LABEL.to_owned(),
                format!("svc-{i:04}"),
            )])),
            ..ObjectMeta::default()
        },
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(i32::from(POD_PORT)),
            protocol: Some("TCP".into()),
            app_protocol: None,
        }]),
    }
}

/// What the node does on every change: snapshot both stores, derive the table.
fn derive(services: &Store<Service>, slices: &Store<EndpointSlice>) -> Vec<ServiceRoute> {
    let all_services = services.state();
    let all_slices = slices.state();
    service_routes::routes(
        all_services.iter().map(AsRef::as_ref),
        all_slices.iter().map(AsRef::as_ref),
        NODE,
    )
    .0
}

/// The heap a table asks for (bytes requested from the allocator, and allocations).
fn table_heap(table: &Vec<ServiceRoute>) -> (usize, usize) {
    let mut bytes = table.capacity() * size_of::<ServiceRoute>();
    let mut allocations = 1;
    for route in table {
        bytes += route.service.capacity();
        bytes += route.endpoints.capacity() * size_of::<SocketAddrV4>();
        allocations +=
            usize::from(route.service.capacity() > 0) + usize::from(route.endpoints.capacity() > 0);
    }
    (bytes, allocations)
}

// ---------------------------------------------------------------------------------------
// Part 1, in a child process of its own

/// A field of /proc/self/status, in bytes (`VmRSS`, `RssAnon`, `VmHWM`: all in kB there).
fn status_bytes(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("reading {field} from /proc/self/status"))?;
    Ok(kib * 1024)
}

/// This process's anonymous resident memory (its heap; not the code pages it touches).
fn rss() -> anyhow::Result<u64> {
    status_bytes("RssAnon")
}

/// Resets `VmHWM` to the current RSS.
fn reset_peak() -> anyhow::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("resetting VmHWM (/proc/self/clear_refs)")
}

/// Part 1 for one size, in a fresh process (so that no earlier allocation is reused): prints
/// one JSON line of measurements.
pub fn probe(probe: &Probe) -> anyhow::Result<()> {
    // Once on two Services first, so that what the measured run allocates for the first
    // time (the stores' statics, the formatting machinery) is not counted as the inputs'.
    {
        let (services, mut services_writer) = reflector::store::<Service>();
        let (slices, mut slices_writer) = reflector::store::<EndpointSlice>();
        for i in 0..2 {
            services_writer.apply_watcher_event(&watcher::Event::Apply(service(i)));
            slices_writer.apply_watcher_event(&watcher::Event::Apply(slice(i)));
        }
        drop(std::hint::black_box(derive(&services, &slices)));
    }
    let base = rss()?;
    let (services, mut services_writer) = reflector::store::<Service>();
    let (slices, mut slices_writer) = reflector::store::<EndpointSlice>();
    for i in 0..probe.services {
        services_writer.apply_watcher_event(&watcher::Event::Apply(service(i)));
        slices_writer.apply_watcher_event(&watcher::Event::Apply(slice(i)));
    }
    let with_inputs = rss()?;

    // VmHWM counts all resident pages: its rise above VmRSS is the derivation's transient.
    reset_peak()?;
    let resident = status_bytes("VmRSS")?;
    let table = derive(&services, &slices);
    let with_table = rss()?;
    let derive_peak = status_bytes("VmHWM")?.saturating_sub(resident);

    let mut times = Vec::with_capacity(probe.runs);
    for _ in 0..probe.runs {
        let start = Instant::now();
        let again = std::hint::black_box(derive(&services, &slices));
        times.push(start.elapsed());
        drop(again);
    }
    times.sort();

    let (heap, allocations) = table_heap(&table);
    let endpoints: usize = table.iter().map(|r| r.endpoints.len()).sum();
    let table_json = serde_json::to_vec(&updraft_cell_proxy::ServiceRoutes {
        version: 1_765_000_000_000,
        routes: table.clone(),
    })?
    .len();
    let services_json: usize = services
        .state()
        .iter()
        .map(|s| serde_json::to_vec(s.as_ref()).map(|v| v.len()))
        .sum::<Result<_, _>>()?;
    let slices_json: usize = slices
        .state()
        .iter()
        .map(|s| serde_json::to_vec(s.as_ref()).map(|v| v.len()))
        .sum::<Result<_, _>>()?;
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{}",
        serde_json::json!({
            "services": probe.services,
            "routes": table.len(),
            "endpoints": endpoints,
            "rss_base": base,
            "rss_inputs": with_inputs.saturating_sub(base),
            "rss_table": with_table.saturating_sub(with_inputs),
            "derive_peak_above_inputs": derive_peak,
            "table_heap": heap,
            "table_allocations": allocations,
            "table_json": table_json,
            "services_json": services_json,
            "slices_json": slices_json,
            "size_of_service": size_of::<Service>(),
            "size_of_slice": size_of::<EndpointSlice>(),
            "runs": times.len(),
            "p50_us": micros(percentile(&times, 0.5)),
            "p99_us": micros(percentile(&times, 0.99)),
            "max_us": micros(times.last().copied().unwrap_or_default()),
        })
    );
    drop(table);
    Ok(())
}

fn run_probe(services: usize, runs: usize) -> anyhow::Result<serde_json::Value> {
    let exe = std::env::current_exe().context("finding the xtask binary")?;
    let output = Command::new(&exe)
        .args(["bench", "services-probe", "--services"])
        .arg(services.to_string())
        .arg("--runs")
        .arg(runs.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if !output.status.success() {
        bail!("the measuring child process failed ({})", output.status);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().last().context("the child printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("reading the child's line {line:?}"))
}

fn part_derivation(quick: bool) -> anyhow::Result<Vec<serde_json::Value>> {
    println!();
    println!("## 1. Derivation and memory in Updraft (each size in a fresh process)");
    println!();
    println!(
        "| Services × endpoints | routes | derivation runs | p50 | p99 | max | inputs (slim objects' JSON) | inputs RssAnon | table RssAnon | table heap (exact) | derivation peak above inputs | table JSON (PUT body) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut all = Vec::new();
    for services in SIZES {
        let runs = match (services, quick) {
            (200, false) => 500,
            (_, false) => 100,
            (200, true) => 100,
            (_, true) => 20,
        };
        let m = run_probe(services, runs)?;
        let n = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {services} × {ENDPOINTS} | {} | {} | {} | {} | {} | {} + {} | {} | {} | {} in {} allocations | {} | {} |",
            n("routes"),
            n("runs"),
            micros(n("p50_us")),
            micros(n("p99_us")),
            micros(n("max_us")),
            mib(n("services_json")),
            mib(n("slices_json")),
            mib(n("rss_inputs")),
            mib(n("rss_table")),
            mib(n("table_heap")),
            n("table_allocations"),
            mib(n("derive_peak_above_inputs")),
            mib(n("table_json")),
        );
        all.push(m);
    }
    println!();
    for m in &all {
        let n = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
        // The node holds the inputs (two stores), the last table it published (`last` in
        // `service_routes::run`) and the provider the published copy (an Arc of a clone).
        let held = n("rss_inputs") + 2.0 * n("rss_table");
        println!(
            "{} endpoints: Updraft holds inputs + 2 tables (its last and the published copy) ≈ {} by RSS; during a derivation a third table and the snapshots come on top (peak {} above the inputs). size_of Service {} B, EndpointSlice {} B.",
            n("endpoints"),
            mib(held),
            mib(n("derive_peak_above_inputs")),
            n("size_of_service"),
            n("size_of_slice"),
        );
    }
    Ok(all)
}

// ---------------------------------------------------------------------------------------
// Network namespaces

/// A network namespace of the bench (`ip netns add`), deleted on drop with what is in it.
struct Netns {
    name: String,
    file: Option<File>,
}

impl Netns {
    fn create(role: &str) -> anyhow::Result<Netns> {
        let name = format!("{PREFIX}{}-{role}", std::process::id());
        run_ip(&["netns", "add", &name])?;
        let mut ns = Netns { name, file: None };
        ns.file = Some(
            File::open(format!("/run/netns/{}", ns.name))
                .with_context(|| format!("opening /run/netns/{}", ns.name))?,
        );
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn file(&self) -> anyhow::Result<&File> {
        self.file.as_ref().context("the namespace is not open")
    }

    /// `ip -n NAME …`.
    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run_ip(&all)
    }

    /// Runs `f` on a thread that joined the namespace (sockets it creates stay there).
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        let ns = self.file()?.try_clone()?;
        std::thread::Builder::new()
            .name("bench-netns".into())
            .spawn(move || -> anyhow::Result<T> {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .context("joining the network namespace")?;
                Ok(f())
            })?
            .join()
            .map_err(|_| anyhow!("the thread in the network namespace panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.file = None;
        if let Err(err) = run_ip(&["netns", "del", &self.name]) {
            eprintln!("warning: removing network namespace {}: {err:#}", self.name);
        }
    }
}

fn run_ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (Debian package iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The bench's namespaces under /run/netns whose process is `pid`, or any bench's whose
/// process is gone (`pid` None).
fn bench_namespaces(pid: Option<u32>) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| {
            let Some(rest) = name.strip_prefix(PREFIX) else {
                return false;
            };
            let owner: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
            match (pid, owner) {
                (Some(pid), Some(owner)) => owner == pid,
                (None, Some(owner)) => !std::path::Path::new(&format!("/proc/{owner}")).exists(),
                (_, None) => false,
            }
        })
        .collect()
}

fn remove_namespaces(names: &[String]) {
    for name in names {
        if let Err(err) = run_ip(&["netns", "del", name]) {
            eprintln!("warning: removing network namespace {name}: {err:#}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Part 2

struct Install {
    script_bytes: usize,
    first: [Duration; 3],
    /// Per update: derive, render, apply.
    updates: Vec<[Duration; 3]>,
}

fn install(services_count: usize, updates: usize, nft: &Nft) -> anyhow::Result<Install> {
    let ns = Netns::create("install")?;
    let services: Vec<Service> = (0..services_count).map(service).collect();
    let mut slices: Vec<EndpointSlice> = (0..services_count).map(slice).collect();
    let step = |slices: &[EndpointSlice]| -> anyhow::Result<([Duration; 3], usize)> {
        let start = Instant::now();
        let (table, problems) = service_routes::routes(&services, slices, NODE);
        let derived = start.elapsed();
        if !problems.is_empty() {
            bail!("the synthetic Services have problems: {problems:?}");
        }
        let start = Instant::now();
        let rules = render(&table);
        let rendered = start.elapsed();
        if !rules.problems.is_empty() {
            bail!("the table rendered with problems: {:?}", rules.problems);
        }
        let start = Instant::now();
        nft.apply(Some(ns.file()?), &rules.script)
            .context("installing the table")?;
        Ok(([derived, rendered, start.elapsed()], rules.script.len()))
    };
    let (first, script_bytes) = step(&slices)?;
    let mut times = Vec::with_capacity(updates);
    let mut last_address = None;
    for u in 0..updates {
        // One endpoint of one Service is replaced (a pod of a Deployment rolled).
        let s = (u * 37 + 1) % services_count;
        let address = Ipv4Addr::new(10, 253, (u / 250) as u8, (u % 250 + 1) as u8);
        if let Some(endpoint) = slices[s].endpoints.as_mut().and_then(|e| e.first_mut()) {
            endpoint.addresses = vec![address.to_string()];
        }
        last_address = Some(address);
        times.push(step(&slices)?.0);
    }
    // Not timed: the namespace holds the last table, whole.
    let listing = ns
        .run(|| {
            Command::new("nft")
                .args(["list", "table", "ip", "updraft-proxy"])
                .output()
        })?
        .context("running nft list")?;
    let text = String::from_utf8_lossy(&listing.stdout);
    let dnats = text.matches("dnat to").count();
    if dnats != services_count * ENDPOINTS {
        bail!(
            "the installed table has {dnats} endpoints, not {}",
            services_count * ENDPOINTS
        );
    }
    if let Some(address) = last_address
        && !text.contains(&format!("dnat to {address}:{POD_PORT}"))
    {
        bail!("the last update ({address}) is not in the installed table");
    }
    Ok(Install {
        script_bytes,
        first,
        updates: times,
    })
}

fn part_install(updates: usize, nft: &Nft) -> anyhow::Result<()> {
    println!();
    println!(
        "## 2. Install time on a cell (fresh network namespace; each update changes one endpoint of one Service and replaces the whole table)"
    );
    println!();
    println!(
        "| Services × endpoints | script | first install: derive / render / nft apply | updates | update p50: derive / render / apply / total | update p99 total | max total |"
    );
    println!("|---|---|---|---|---|---|---|");
    for services in SIZES {
        let result = install(services, updates, nft)?;
        let mut totals: Vec<Duration> = result
            .updates
            .iter()
            .map(|t| t.iter().sum::<Duration>())
            .collect();
        totals.sort();
        let column = |i: usize| {
            let mut v: Vec<Duration> = result.updates.iter().map(|t| t[i]).collect();
            v.sort();
            percentile(&v, 0.5)
        };
        println!(
            "| {services} × {ENDPOINTS} | {} | {} / {} / {} | {} | {} / {} / {} / {} | {} | {} |",
            mib(result.script_bytes as f64),
            duration(result.first[0]),
            duration(result.first[1]),
            duration(result.first[2]),
            result.updates.len(),
            duration(column(0)),
            duration(column(1)),
            duration(column(2)),
            duration(percentile(&totals, 0.5)),
            duration(percentile(&totals, 0.99)),
            duration(totals.last().copied().unwrap_or_default()),
        );
    }
    Ok(())
}

/// The 200 × 5 table's updates installed in `cells` namespaces at once, each rendered and
/// applied on its own thread as each cell's agent does (local cells share one host): the
/// time from the derived table to the last namespace done, per update.
fn fan_out(cells: usize, updates: usize, nft: &Nft) -> anyhow::Result<Vec<Duration>> {
    let namespaces = (0..cells)
        .map(|c| Netns::create(&format!("cell{c}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let files = namespaces
        .iter()
        .map(Netns::file)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let services: Vec<Service> = (0..SIZES[0]).map(service).collect();
    let mut slices: Vec<EndpointSlice> = (0..SIZES[0]).map(slice).collect();
    let install_everywhere = |table: &[ServiceRoute]| -> anyhow::Result<Duration> {
        let start = Instant::now();
        let results: Vec<Result<(), updraft_cell_proxy::ApplyError>> =
            std::thread::scope(|scope| {
                let running: Vec<_> = files
                    .iter()
                    .map(|file| scope.spawn(move || nft.apply(Some(*file), &render(table).script)))
                    .collect();
                running
                    .into_iter()
                    .map(|t| {
                        t.join().unwrap_or_else(|_| {
                            Err(updraft_cell_proxy::ApplyError::Run {
                                program: "nft".into(),
                                source: std::io::Error::other("the install thread panicked"),
                            })
                        })
                    })
                    .collect()
            });
        let elapsed = start.elapsed();
        for result in results {
            result.context("installing the table in a cell's namespace")?;
        }
        Ok(elapsed)
    };
    install_everywhere(&service_routes::routes(&services, &slices, NODE).0)?;
    let mut times = Vec::with_capacity(updates);
    for u in 0..updates {
        let s = (u * 37 + 1) % SIZES[0];
        let address = Ipv4Addr::new(10, 254, (u / 250) as u8, (u % 250 + 1) as u8);
        if let Some(endpoint) = slices[s].endpoints.as_mut().and_then(|e| e.first_mut()) {
            endpoint.addresses = vec![address.to_string()];
        }
        let start = Instant::now();
        let (table, _) = service_routes::routes(&services, &slices, NODE);
        let derived = start.elapsed();
        times.push(derived + install_everywhere(&table)?);
    }
    drop(files);
    drop(namespaces);
    Ok(times)
}

fn part_fan_out(cells: usize, updates: usize, nft: &Nft) -> anyhow::Result<()> {
    let mut times = fan_out(cells, updates, nft)?;
    times.sort();
    println!();
    println!(
        "The 200 × {ENDPOINTS} table's updates installed in {cells} namespaces at once (each rendered and applied on its own thread, as every local cell's agent does on one host): derived table → the last namespace done, {} updates: p50 {}, max {}",
        times.len(),
        duration(percentile(&times, 0.5)),
        duration(times.last().copied().unwrap_or_default()),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Part 3

/// The bench pod's server: one thread accepting on 0.0.0.0:8080 in the pod namespace.
/// Requests: `C` + 15 bytes → 16 bytes (the first the last octet of the address it was
/// reached at), then close; `U` + data until EOF → the byte count (8 bytes); `D` + a count
/// (8 bytes) → that many bytes, then close.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
    /// The client namespace, to wake the accept with a last connection.
    client: File,
}

impl Server {
    fn start(pod: &Netns, client: &Netns) -> anyhow::Result<Server> {
        let listener = pod
            .run(|| TcpListener::bind(("0.0.0.0", POD_PORT)))?
            .context("binding the pod's server")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("bench-pod-server".into())
            .spawn(move || {
                let mut errors = 0;
                for stream in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    let served = stream.and_then(|mut s| serve(&mut s));
                    if served.is_err() {
                        errors += 1;
                    }
                }
                errors
            })?;
        Ok(Server {
            stop,
            thread: Some(thread),
            client: client.file()?.try_clone()?,
        })
    }

    /// Stops the server; returns how many connections failed on its side.
    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let Some(thread) = self.thread.take() else {
            return 0;
        };
        let Ok(ns) = self.client.try_clone() else {
            return 0;
        };
        // A last connection wakes the accept, which then sees the flag.
        let woke = std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).is_ok()
                && TcpStream::connect_timeout(
                    &SocketAddr::from((POD_ADDRS[0], POD_PORT)),
                    Duration::from_secs(2),
                )
                .is_ok()
        })
        .join()
        .unwrap_or(false);
        if woke { thread.join().unwrap_or(0) } else { 0 }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut mode = [0u8; 1];
    if stream.read(&mut mode)? == 0 {
        return Ok(()); // the stop connection
    }
    match mode[0] {
        b'C' => {
            let mut rest = [0u8; 15];
            stream.read_exact(&mut rest)?;
            let octet = match stream.local_addr()? {
                SocketAddr::V4(a) => a.ip().octets()[3],
                SocketAddr::V6(_) => 0,
            };
            let mut reply = [b'.'; 16];
            reply[0] = octet;
            stream.write_all(&reply)?;
            // The client closes first, with a reset (see `connection_rate`).
            match stream.read(&mut [0u8; 1]) {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
                Err(e) => Err(e),
            }
        }
        b'U' => {
            let total = drain(stream)?;
            stream.write_all(&total.to_be_bytes())
        }
        b'D' => {
            let mut count = [0u8; 8];
            stream.read_exact(&mut count)?;
            let mut left = u64::from_be_bytes(count);
            let buf = vec![0x5au8; 256 * 1024];
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                stream.write_all(&buf[..n])?;
                left -= n as u64;
            }
            Ok(())
        }
        other => Err(std::io::Error::other(format!("unknown request {other}"))),
    }
}

/// Sequential connections (connect, 16 bytes each way, the client closes) for `duration`,
/// cycling through `targets`: how many, how long, and how many reached each pod address (by
/// its last octet).
///
/// The client closes with a reset (`SO_LINGER` 0), so that no side keeps a TIME_WAIT socket.
/// With a graceful close the loop reuses every ephemeral port within seconds against 4-tuples
/// the server still holds in TIME_WAIT, and the connections of the two paths share the
/// client's address with different TCP timestamp clocks (the offset is per source and
/// destination address, and the ClusterIP's destination is not the pod's): the server's
/// PAWS check refuses some reused 4-tuples and the client waits a 1 s SYN retransmit. The
/// first run of this bench, closing gracefully, stalled that way on both paths.
fn connection_rate(
    targets: &[SocketAddr],
    duration: Duration,
) -> std::io::Result<(u64, Duration, BTreeMap<u8, u64>)> {
    let mut reached = BTreeMap::new();
    let mut count = 0u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        let target = targets[count as usize % targets.len()];
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))
            .map_err(|e| std::io::Error::new(e.kind(), format!("connecting to {target}: {e}")))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"Cping-updraft-01")?;
        let mut reply = [0u8; 16];
        stream.read_exact(&mut reply)?;
        nix::sys::socket::setsockopt(
            &stream,
            nix::sys::socket::sockopt::Linger,
            &nix::libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )
        .map_err(std::io::Error::from)?;
        drop(stream);
        *reached.entry(reply[0]).or_insert(0) += 1;
        count += 1;
    }
    Ok((count, start.elapsed(), reached))
}

/// The calling thread's network namespace's TCP counters (`/proc/thread-self/net/snmp` and
/// `netstat`), as `Tcp:RetransSegs`, `TcpExt:PAWSEstab`, ….
fn tcp_counters() -> std::io::Result<BTreeMap<String, i64>> {
    let mut counters = BTreeMap::new();
    for file in ["snmp", "netstat"] {
        let text = std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))?;
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let mut names = names.split_whitespace();
            let mut values = values.split_whitespace();
            let (Some(prefix), Some(_)) = (names.next(), values.next()) else {
                continue;
            };
            if !prefix.starts_with("Tcp") {
                continue;
            }
            for (name, value) in names.zip(values) {
                if let Ok(value) = value.parse() {
                    counters.insert(format!("{prefix}{name}"), value);
                }
            }
        }
    }
    Ok(counters)
}

/// The counters that tell a stalled connection loop: SYNs sent again, segments retransmitted,
/// SYNs a TIME_WAIT socket refused (PAWS), listen queue drops.
const WATCHED: [&str; 5] = [
    "TcpExt:TCPSynRetrans",
    "Tcp:RetransSegs",
    "TcpExt:PAWSEstab",
    "TcpExt:ListenDrops",
    "TcpExt:TCPTimeWaitOverflow",
];

fn counter_changes(before: &BTreeMap<String, i64>, after: &BTreeMap<String, i64>) -> String {
    WATCHED
        .iter()
        .map(|name| {
            let delta =
                after.get(*name).copied().unwrap_or(0) - before.get(*name).copied().unwrap_or(0);
            format!("{} {delta}", name.split(':').nth(1).unwrap_or(name))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client to pod.
    Up,
    /// Pod to client.
    Down,
}

/// One bulk transfer of `bytes` over one connection; the time from the first byte sent to
/// the last byte (or the count) received.
fn transfer(target: SocketAddr, direction: Direction, bytes: u64) -> std::io::Result<Duration> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let start = Instant::now();
    match direction {
        Direction::Up => {
            stream.write_all(b"U")?;
            let buf = vec![0x5au8; 256 * 1024];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                stream.write_all(&buf[..n])?;
                left -= n as u64;
            }
            stream.shutdown(Shutdown::Write)?;
            let mut count = [0u8; 8];
            stream.read_exact(&mut count)?;
            if u64::from_be_bytes(count) != bytes {
                return Err(std::io::Error::other("the server counted other bytes"));
            }
        }
        Direction::Down => {
            let mut request = [0u8; 9];
            request[0] = b'D';
            request[1..].copy_from_slice(&bytes.to_be_bytes());
            stream.write_all(&request)?;
            let total = drain(&mut stream)?;
            if total != bytes {
                return Err(std::io::Error::other(format!(
                    "received {total} bytes of {bytes}"
                )));
            }
        }
    }
    Ok(start.elapsed())
}

struct Throughput {
    rounds: usize,
    phase: Duration,
    bulk_bytes: u64,
    bulk_rounds: usize,
}

fn part_throughput(nft: &Nft, settings: &Throughput) -> anyhow::Result<()> {
    println!();
    println!(
        "## 3. Connections through the ClusterIP {CLUSTER_IP} against the pod IPs directly (veth pair between two namespaces, the 200 × {ENDPOINTS} table in the client's)"
    );
    let client = Netns::create("client")?;
    let pod = Netns::create("pod")?;
    client.ip(&[
        "link", "add", "vc", "type", "veth", "peer", "name", "vp", "netns", &pod.name,
    ])?;
    client.ip(&["addr", "add", CLIENT_ADDR, "dev", "vc"])?;
    client.ip(&["link", "set", "vc", "up"])?;
    for address in POD_ADDRS {
        pod.ip(&["addr", "add", &format!("{address}/29"), "dev", "vp"])?;
    }
    pod.ip(&["link", "set", "vp", "up"])?;
    // The cluster IPs need a route for the first lookup; the output hook's DNAT re-routes
    // to the pod's address on the link.
    client.ip(&[
        "route",
        "add",
        "10.96.0.0/16",
        "via",
        &POD_ADDRS[0].to_string(),
        "dev",
        "vc",
    ])?;
    let services: Vec<Service> = (0..SIZES[0]).map(service).collect();
    let slices: Vec<EndpointSlice> = (0..SIZES[0]).map(slice).collect();
    let (table, _) = service_routes::routes(&services, &slices, NODE);
    let rules = render(&table);
    nft.apply(Some(client.file()?), &rules.script)
        .context("installing the table in the client namespace")?;
    let mut server = Server::start(&pod, &client)?;

    let cluster: Vec<SocketAddr> = vec![CLUSTER_IP.into()];
    let direct: Vec<SocketAddr> = POD_ADDRS
        .iter()
        .map(|a| SocketAddr::from((*a, POD_PORT)))
        .collect();
    // Warm-up (neighbour entries, first connections), not counted.
    for targets in [&cluster, &direct] {
        let targets = targets.clone();
        client
            .run(move || connection_rate(&targets, Duration::from_millis(200)))?
            .context("warming up")?;
    }
    let counters_before = (
        client.run(tcp_counters)?.context("reading TCP counters")?,
        pod.run(tcp_counters)?.context("reading TCP counters")?,
    );
    let mut totals = [(0u64, Duration::ZERO); 2];
    let mut per_round = [Vec::new(), Vec::new()];
    let mut reached = BTreeMap::new();
    for round in 0..settings.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let targets = if which == 0 {
                cluster.clone()
            } else {
                direct.clone()
            };
            let phase = settings.phase;
            let (count, elapsed, by_address) = client
                .run(move || connection_rate(&targets, phase))?
                .with_context(|| {
                    format!(
                        "round {round}, {}",
                        if which == 0 { "ClusterIP" } else { "pod IP" }
                    )
                })?;
            totals[which].0 += count;
            totals[which].1 += elapsed;
            per_round[which].push(count as f64 / elapsed.as_secs_f64());
            if which == 0 {
                for (octet, n) in by_address {
                    *reached.entry(octet).or_insert(0u64) += n;
                }
            }
        }
    }
    let counters_after = (
        client.run(tcp_counters)?.context("reading TCP counters")?,
        pod.run(tcp_counters)?.context("reading TCP counters")?,
    );
    let rate = |t: (u64, Duration)| t.0 as f64 / t.1.as_secs_f64();
    println!();
    println!(
        "New connections per second, one client thread, sequential (connect, 16 bytes each way, close with a reset), {} interleaved rounds of {:.1} s per target:",
        settings.rounds,
        settings.phase.as_secs_f64()
    );
    println!();
    println!("| target | connections | seconds | conn/s | per round min – max |");
    println!("|---|---|---|---|---|");
    for (which, label) in [
        (0, format!("ClusterIP {CLUSTER_IP}")),
        (
            1,
            format!(
                "pod IPs {}–{}:{POD_PORT} directly",
                POD_ADDRS[0],
                POD_ADDRS[ENDPOINTS - 1]
            ),
        ),
    ] {
        let rounds = &per_round[which];
        let min = rounds.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rounds.iter().copied().fold(0.0, f64::max);
        println!(
            "| {label} | {} | {:.1} | {:.0} | {min:.0} – {max:.0} |",
            totals[which].0,
            totals[which].1.as_secs_f64(),
            rate(totals[which]),
        );
    }
    let mut ratios: Vec<f64> = per_round[0]
        .iter()
        .zip(&per_round[1])
        .map(|(c, d)| c / d)
        .collect();
    ratios.sort_by(f64::total_cmp);
    println!();
    println!(
        "ratio ClusterIP / pod IP: {:.3} (per round: min {:.3}, median {:.3}, max {:.3}; target ≥ 0.9)",
        rate(totals[0]) / rate(totals[1]),
        ratios.first().copied().unwrap_or(f64::NAN),
        ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN),
        ratios.last().copied().unwrap_or(f64::NAN),
    );
    let spread: Vec<String> = reached
        .iter()
        .map(|(octet, n)| format!("10.252.0.{octet}: {n}"))
        .collect();
    println!("the ClusterIP's connections reached: {}", spread.join(", "));
    println!(
        "TCP counters during the connection test: client namespace: {}; pod namespace: {}",
        counter_changes(&counters_before.0, &counters_after.0),
        counter_changes(&counters_before.1, &counters_after.1),
    );

    // Bulk throughput over one connection.
    let mut bulk: BTreeMap<(u8, u8), Vec<f64>> = BTreeMap::new();
    let direct_one: SocketAddr = SocketAddr::from((POD_ADDRS[0], POD_PORT));
    for round in 0..settings.bulk_rounds {
        for (d, direction) in [(0u8, Direction::Up), (1, Direction::Down)] {
            let order = if round % 2 == 0 { [0u8, 1] } else { [1, 0] };
            for which in order {
                let target = if which == 0 {
                    SocketAddr::from(CLUSTER_IP)
                } else {
                    direct_one
                };
                let bytes = settings.bulk_bytes;
                let elapsed = client
                    .run(move || transfer(target, direction, bytes))?
                    .with_context(|| format!("bulk transfer to {target}"))?;
                bulk.entry((d, which))
                    .or_default()
                    .push(bytes as f64 / elapsed.as_secs_f64() / 1e6);
            }
        }
    }
    println!();
    println!(
        "Bulk throughput over one connection, {} MiB per transfer, {} interleaved rounds (median MB/s):",
        settings.bulk_bytes / (1024 * 1024),
        settings.bulk_rounds
    );
    println!();
    println!("| direction | ClusterIP | pod IP | ratio |");
    println!("|---|---|---|---|");
    for (d, label) in [(0u8, "client → pod"), (1, "pod → client")] {
        let median = |which: u8| {
            let mut v = bulk.get(&(d, which)).cloned().unwrap_or_default();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let (c, p) = (median(0), median(1));
        println!("| {label} | {c:.0} | {p:.0} | {:.3} |", c / p);
    }

    let server_errors = server.stop();
    let conntrack = client
        .run(|| std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count"))?
        .map(|t| t.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    println!();
    println!(
        "server-side failures: {server_errors}; conntrack entries in the client namespace at the end: {conntrack}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------

/// Runs the benchmark and prints its results.
pub async fn run(bench: ServicesBench) -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "the services bench makes network namespaces and installs nftables rules: run it as root"
        );
    }
    let nft_version = Command::new("nft")
        .arg("--version")
        .output()
        .map_err(|e| anyhow!("{e}"))
        .and_then(|o| {
            if o.status.success() {
                Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
            } else {
                Err(anyhow!("{}", o.status))
            }
        })
        .map_err(|e| {
            anyhow!("the services bench needs nft (apt-get install nftables): nft --version: {e}")
        })?;
    let leftovers = bench_namespaces(None);
    if !leftovers.is_empty() {
        remove_namespaces(&leftovers);
        println!(
            "removed {} network namespaces an earlier run left",
            leftovers.len()
        );
    }
    print_machine(&nft_version);
    let work = tokio::task::spawn_blocking(move || run_parts(&bench));
    tokio::select! {
        result = work => result.context("the bench thread panicked")?,
        _ = tokio::signal::ctrl_c() => {
            remove_namespaces(&bench_namespaces(Some(std::process::id())));
            eprintln!("interrupted: removed the bench's network namespaces");
            std::process::exit(130);
        }
    }
}

fn run_parts(bench: &ServicesBench) -> anyhow::Result<()> {
    let quick = bench.quick;
    let nft = Nft::new("nft");
    let runs = |part: u8| bench.parts.is_empty() || bench.parts.contains(&part);
    if runs(1) {
        part_derivation(quick)?;
    }
    if runs(2) {
        part_install(bench.updates.unwrap_or(if quick { 10 } else { 50 }), &nft)?;
        part_fan_out(
            bench.cells.unwrap_or(if quick { 10 } else { 50 }).max(1),
            if quick { 3 } else { 10 },
            &nft,
        )?;
    }
    if !runs(3) {
        return Ok(());
    }
    part_throughput(
        &nft,
        &Throughput {
            rounds: bench.rounds.unwrap_or(if quick { 4 } else { 10 }).max(1),
            phase: Duration::from_secs_f64(
                bench
                    .phase_seconds
                    .unwrap_or(if quick { 0.5 } else { 1.0 })
                    .max(0.05),
            ),
            bulk_bytes: bench
                .bulk_mib
                .unwrap_or(if quick { 32 } else { 256 })
                .max(1) as u64
                * 1024
                * 1024,
            bulk_rounds: if quick { 2 } else { 3 },
        },
    )?;
    println!();
    println!(
        "4. End-to-end propagation (EndpointSlice change → rule active in every cell) is not measured here: it needs the control plane and local cells."
    );
    Ok(())
}

/// The machine and the build, for BENCHMARKS.md.
fn print_machine(nft_version: &str) {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    println!(
        "# cargo xtask bench services — commit {commit}, {cpus} CPUs ({model}), load {load}, {} build of xtask, {nft_version}",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn duration(d: Duration) -> String {
    micros(d.as_secs_f64() * 1e6)
}

fn micros(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn mib(bytes: f64) -> String {
    if bytes < 1024.0 * 1024.0 {
        format!("{:.0} KiB", bytes / 1024.0)
    } else {
        format!("{:.2} MiB", bytes / (1024.0 * 1024.0))
    }
}

/// Reads `stream` to its end in 256 KiB reads (the bulk phases' read size); the bytes read.
fn drain(stream: &mut impl std::io::Read) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}
