//! Time per instance-selection decision over the full built-in AWS catalog.
//!
//! `cargo run --release -p updraft-cells-catalog --example select_bench [decisions]`
//!
//! Prints the median and the spread of five rounds. Mixed demands (small and large requests,
//! GPUs, arm64, globs, spot, unsatisfiable ones that pay for the diagnosis) from a fixed seed.

use std::time::Instant;

use updraft_cells_catalog::{
    Arch, Catalog, Demand, InstanceTypePattern, LaunchType, PodRequest, SelectionPolicy, Selector,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let decisions: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(200_000);
    let catalog = Catalog::aws_us_east_1()?;
    let types = catalog.instance_types.len();
    let selector = Selector::new(catalog, SelectionPolicy::new("t3.small"))?;
    let mut state = 0x5EED_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let demands: Vec<Demand> = (0..1024)
        .map(|_| {
            let r = next();
            Demand {
                request: PodRequest {
                    cpu_millis: [250, 1000, 2000, 8000, 64_000, 200_000][(r % 6) as usize],
                    memory_bytes: [512u64 << 20, 4 << 30, 15 << 30, 256 << 30]
                        [(r >> 8) as usize % 4],
                    gpus: [0, 0, 0, 1][(r >> 16) as usize % 4],
                    arch: [None, None, Some(Arch::Arm64)][(r >> 24) as usize % 3],
                },
                instance_type: [None, None, InstanceTypePattern::parse("c5*")]
                    [(r >> 32) as usize % 3]
                    .clone(),
                launch_type: [LaunchType::OnDemand, LaunchType::Spot][(r >> 40) as usize % 2],
            }
        })
        .collect();
    let mut rounds = Vec::new();
    let mut chosen = 0usize;
    for _ in 0..5 {
        let start = Instant::now();
        for i in 0..decisions {
            if selector.select(&demands[i % demands.len()]).is_ok() {
                chosen += 1;
            }
        }
        rounds.push(start.elapsed().as_nanos() as f64 / decisions as f64);
    }
    rounds.sort_by(f64::total_cmp);
    println!(
        "instance selection over {types} types: median {:.0} ns/decision (min {:.0}, max {:.0}; {} decisions × 5 rounds, {:.0}% satisfiable)",
        rounds[2],
        rounds[0],
        rounds[4],
        decisions,
        chosen as f64 * 100.0 / (decisions * 5) as f64
    );
    Ok(())
}
