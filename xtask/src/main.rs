//! `cargo xtask`: the one entry point for Updraft's developer tasks.
//!
//! - `cargo xtask deps`: install what a fresh machine lacks (Debian packages, the pinned
//!   control plane built from its Go modules, kubectl).
//! - `cargo xtask cluster up|down|status|env|kubeconfig`: the local control plane.
//! - `cargo xtask test`: everything the tests need, then the whole test suite.
//! - `cargo xtask demo [--down]`: a local control plane, Updraft with local cells and a
//!   Deployment whose replicas run on their own cells (`--down` terminates it all).
#![forbid(unsafe_code)]

mod bench;
mod bench_cells;
mod bench_exec;
mod bench_forward;
mod bench_services;
mod demo;
mod demo_registry;
mod deps;
mod node_process;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use updraft_devcluster::{Layout, cluster, toolchain::Toolchain};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Updraft developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks: Debian packages, the control plane, kubectl.
    Deps,
    /// The local Kubernetes control plane on 127.0.0.1.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Bring up the control plane, then run the whole test suite (extra args go to cargo test).
    Test {
        /// Arguments passed through to `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
    /// Run the demo: a local control plane, Updraft as a virtual node with local cells, a
    /// Deployment whose replicas each run on their own cell.
    Demo {
        /// Tear the demo down instead: delete the Deployment, terminate every cell, stop
        /// Updraft and the registry (the control plane stays up).
        #[arg(long)]
        down: bool,
    },
    /// Benchmarks (results go to BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Pods on a mock-provider node: time to Ready, latency, memory, CPU, API writes per pod.
    Pods {
        /// How many pods.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Pods created per second; 0 creates them as a burst.
        #[arg(long, default_value_t = 0)]
        rate: u32,
    },
    /// Concurrent exec sessions into one pod while the Lease renews: time to open, memory.
    Exec {
        /// Concurrent exec sessions.
        #[arg(long, default_value_t = 200)]
        sessions: usize,
        /// Seconds every session stays open.
        #[arg(long, default_value_t = 20)]
        hold: u64,
    },
    /// Concurrent kubectl port-forwards into one pod while the Lease renews: throughput,
    /// heartbeat gaps, memory before/after.
    Forward {
        /// Concurrent kubectl port-forward sessions.
        #[arg(long, default_value_t = 50)]
        sessions: usize,
        /// Concurrent connections per session.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// MiB each connection sends and reads back.
        #[arg(long, default_value_t = 4)]
        mib: usize,
    },
    /// Pods on local cells with the cells provider: time from binding to Ready for one pod
    /// and for a burst, cold or with a standby pool; the memory the cells take.
    Cells {
        /// Pods in the burst.
        #[arg(long, default_value_t = 50)]
        count: usize,
        /// Idle cells the provider keeps pre-started (its standby pool); 0 measures cold
        /// starts.
        #[arg(long, default_value_t = 0)]
        standby: u32,
        /// Updraft's pod workers (pods started at once).
        #[arg(long, default_value_t = 64)]
        pod_workers: usize,
    },
    /// ClusterIP Services for pods on cells (issue 13), without the control plane: the
    /// node's derivation of the route table (time, memory), installing it in a network
    /// namespace with nft (first time and updates), and connections through a ClusterIP
    /// against the pod IP directly. Runs as root.
    Services {
        /// Smaller repetitions and shorter phases.
        #[arg(long)]
        quick: bool,
        /// Table updates installed per size (default 50, --quick 10).
        #[arg(long)]
        updates: Option<usize>,
        /// Interleaved rounds of the connection-rate test (default 10, --quick 4).
        #[arg(long)]
        rounds: Option<usize>,
        /// Seconds per target and round of the connection-rate test (default 1, --quick 0.5).
        #[arg(long)]
        phase_seconds: Option<f64>,
        /// MiB per bulk transfer (default 256, --quick 32).
        #[arg(long)]
        bulk_mib: Option<usize>,
        /// Network namespaces the table is installed in at once, as on a host of local
        /// cells (default 50, --quick 10).
        #[arg(long)]
        cells: Option<usize>,
        /// Run only this part (1 derivation and memory, 2 install, 3 throughput); repeatable.
        #[arg(long = "part", value_parser = clap::value_parser!(u8).range(1..=3))]
        parts: Vec<u8>,
    },
    /// Part of `bench services`: derives one size's table in this fresh process and prints
    /// its time and memory as one JSON line.
    #[command(hide = true)]
    ServicesProbe {
        /// Services (one port, 5 endpoints each).
        #[arg(long)]
        services: usize,
        /// Timed derivations.
        #[arg(long)]
        runs: usize,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Build (once) and start whatever is not running; idempotent.
    Up,
    /// Stop every process `up` started.
    Down {
        /// Also delete the cluster's state (etcd data, PKI, logs).
        #[arg(long)]
        purge: bool,
    },
    /// Show what runs and where its logs are.
    Status,
    /// Print shell exports for the admin kubeconfig and the pinned kubectl.
    Env,
    /// Mint a kubeconfig for another identity and print it (or write it to --out).
    Kubeconfig {
        /// A node identity: user `system:node:NODE` in group `system:nodes`.
        #[arg(long, conflicts_with = "service_account")]
        node: Option<String>,
        /// A service account, as NAMESPACE/NAME (token from the TokenRequest API).
        #[arg(long)]
        service_account: Option<String>,
        /// Lifetime of a service account token, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
        /// Write the kubeconfig here instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    let layout = Layout::for_workspace();
    match cli.task {
        Task::Deps => {
            deps::install_packages()?;
            Toolchain::ensure()?;
        }
        Task::Cluster { action } => runtime.block_on(cluster_task(&layout, action))?,
        Task::Test { cargo_args } => return test(&runtime, &layout, &cargo_args),
        Task::Bench {
            bench: Bench::Pods { count, rate },
        } => runtime.block_on(bench::run(&layout, bench::PodBench { count, rate }))?,
        Task::Bench {
            bench: Bench::Exec { sessions, hold },
        } => runtime.block_on(bench_exec::run(
            &layout,
            bench_exec::ExecBench { sessions, hold },
        ))?,
        Task::Bench {
            bench:
                Bench::Cells {
                    count,
                    standby,
                    pod_workers,
                },
        } => runtime.block_on(bench_cells::run(
            &layout,
            bench_cells::CellsBench {
                count,
                standby,
                pod_workers,
            },
        ))?,
        Task::Bench {
            bench:
                Bench::Forward {
                    sessions,
                    connections,
                    mib,
                },
        } => runtime.block_on(bench_forward::run(
            &layout,
            bench_forward::ForwardBench {
                sessions,
                connections,
                mib,
            },
        ))?,
        Task::Bench {
            bench:
                Bench::Services {
                    quick,
                    updates,
                    rounds,
                    phase_seconds,
                    bulk_mib,
                    cells,
                    parts,
                },
        } => runtime.block_on(bench_services::run(bench_services::ServicesBench {
            quick,
            updates,
            rounds,
            phase_seconds,
            bulk_mib,
            cells,
            parts,
        }))?,
        Task::Bench {
            bench: Bench::ServicesProbe { services, runs },
        } => bench_services::probe(&bench_services::Probe { services, runs })?,
        Task::Demo { down: true } => runtime.block_on(demo::down(&layout))?,
        Task::Demo { down: false } => {
            deps::install_packages()?;
            runtime.block_on(demo::run(&layout))?
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn cluster_task(layout: &Layout, action: ClusterAction) -> Result<()> {
    match action {
        ClusterAction::Up => {
            cluster::up(layout).await?;
            println!(
                "control plane ready on https://127.0.0.1:{}",
                cluster::APISERVER_PORT
            );
            print_env(layout);
        }
        ClusterAction::Down { purge } => {
            let stopped = cluster::down(layout)?;
            if stopped.is_empty() {
                println!("nothing was running");
            }
            for name in stopped {
                println!("stopped {name}");
            }
            if purge && layout.root().exists() {
                std::fs::remove_dir_all(layout.root())
                    .with_context(|| format!("removing {}", layout.root().display()))?;
                println!("removed {}", layout.root().display());
            }
        }
        ClusterAction::Status => {
            for status in cluster::status(layout) {
                let state = match status.pid {
                    Some(pid) => format!("running (pid {pid})"),
                    None => "stopped".to_owned(),
                };
                println!(
                    "{:<24} {:<22} 127.0.0.1:{:<6} {}",
                    status.component.name(),
                    state,
                    status.component.port(),
                    status.log.display()
                );
            }
            match cluster::readyz(layout).await {
                Ok(()) => println!("API server: ready"),
                Err(err) => println!("API server: not ready: {err}"),
            }
        }
        ClusterAction::Env => print_env(layout),
        ClusterAction::Kubeconfig {
            node,
            service_account,
            ttl,
            out,
        } => {
            let text = match (node, service_account) {
                (Some(node), _) => cluster::node_kubeconfig(layout, &node)?,
                (None, Some(sa)) => {
                    let Some((namespace, name)) = sa.split_once('/') else {
                        bail!("--service-account takes NAMESPACE/NAME, got {sa:?}");
                    };
                    cluster::service_account_kubeconfig(layout, namespace, name, ttl).await?
                }
                (None, None) => {
                    bail!("say which identity: --node NAME or --service-account NS/NAME")
                }
            };
            match out {
                Some(path) => {
                    std::fs::write(&path, text)
                        .with_context(|| format!("writing {}", path.display()))?;
                    println!("wrote {}", path.display());
                }
                None => print!("{text}"),
            }
        }
    }
    Ok(())
}

fn print_env(layout: &Layout) {
    println!("export KUBECONFIG={}", layout.admin_kubeconfig().display());
    println!("export PATH={}:$PATH", layout.bin().display());
}

fn test(
    runtime: &tokio::runtime::Runtime,
    layout: &Layout,
    cargo_args: &[String],
) -> Result<ExitCode> {
    deps::install_packages()?;
    runtime.block_on(cluster::up(layout))?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        // Every failing test binary is reported, not only the first.
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(cargo_args)
        .env("UPDRAFT_CLUSTER_DIR", layout.root())
        .status()
        .context("running cargo test")?;
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
