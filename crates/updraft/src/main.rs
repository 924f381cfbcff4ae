//! `updraft`: the Updraft virtual kubelet.
//!
//! `updraft run --provider mock` registers a virtual node with the API server, serves the
//! kubelet API on the kubelet port and runs the pods bound to the node through the provider.
//! `updraft cells list|describe|select` shows the cells provider's cells and instance choices.
//! Every flag can also be set by an environment variable; the Go virtual-kubelet's variable
//! names (`KUBELET_PORT`, `VKUBELET_POD_IP`, `VKUBELET_TAINT_*`, `DEFAULT_NODE_NAME`,
//! `APISERVER_*_LOCATION`, `KUBECONFIG`) work too.
#![forbid(unsafe_code)]

mod cells;
mod config;
mod metrics;
mod serve;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use updraft_common::error_chain;

use crate::config::RunArgs;

#[derive(Parser)]
#[command(name = "updraft", version, about = "The Updraft virtual kubelet")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register the virtual node and run its pods until SIGTERM or SIGINT.
    Run(Box<RunArgs>),
    /// The cells provider's cells (list, describe) and a dry run of its instance selection.
    Cells(cells::CellsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Run(args) => args,
        Command::Cells(args) => return run_cells(args),
    };
    if let Err(err) = config::init_logging(&args) {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Runtime::new().context("starting the runtime") {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve::run(*args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `updraft cells …`: prints its result, or the error and exit status 1.
fn run_cells(args: cells::CellsArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cells::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}
