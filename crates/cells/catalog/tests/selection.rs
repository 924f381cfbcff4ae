//! Instance selection over the shipped AWS catalog: checked against a brute-force search for
//! many generated demands, plus the cases users meet (8 CPU / 15 GiB, GPU, arm64, globs, spot,
//! errors).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a panic is a failure report

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use updraft_cells_catalog::{
    Arch, Catalog, CostError, Demand, InstanceType, InstanceTypePattern, LaunchType, PodRequest,
    SelectionError, SelectionPolicy, Selector, decide,
};

fn selector() -> Selector {
    Selector::new(
        Catalog::aws_us_east_1().expect("catalog"),
        SelectionPolicy::new("t3.small"),
    )
    .expect("selector")
}

fn demand(cpu_millis: u64, memory_gib: u64) -> Demand {
    Demand {
        request: PodRequest {
            cpu_millis,
            memory_bytes: memory_gib << 30,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The reference: price every type independently, sort everything, take the head.
fn brute_force(catalog: &Catalog, policy: &SelectionPolicy, demand: &Demand) -> Vec<(String, f64)> {
    let request = &demand.request;
    let arch = request.arch.or(if demand.instance_type.is_some() {
        None
    } else {
        Some(policy.default_arch)
    });
    let price = |t: &InstanceType| -> Option<f64> {
        let pattern_ok = demand
            .instance_type
            .as_ref()
            .is_none_or(|p| p.matches(&t.name));
        let fits = pattern_ok
            && arch.is_none_or(|a| a == t.architecture)
            && t.vcpus as u64 * 1000 >= request.cpu_millis
            && t.memory_mib * 1024 * 1024 >= request.memory_bytes
            && t.gpus >= request.gpus;
        if !fits {
            return None;
        }
        let base = match demand.launch_type {
            LaunchType::OnDemand => t.on_demand_per_hour,
            LaunchType::Spot => t.spot_per_hour?,
        };
        let surcharge = match t.burstable_baseline {
            Some(fraction) => {
                let baseline = (fraction * t.vcpus as f64 * 1000.0).round() as u64;
                if request.cpu_millis > baseline {
                    (request.cpu_millis - baseline) as f64 / 1000.0 * 0.05
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        Some(base + surcharge)
    };
    let nothing = request.cpu_millis == 0 && request.memory_bytes == 0 && request.gpus == 0;
    if nothing && demand.instance_type.is_none() {
        let default = catalog
            .instance_types
            .iter()
            .find(|t| t.name == policy.default_instance_type)
            .expect("default type");
        if request.arch.is_none_or(|a| a == default.architecture) {
            let base = match demand.launch_type {
                LaunchType::OnDemand => Some(default.on_demand_per_hour),
                LaunchType::Spot => default.spot_per_hour,
            };
            if let Some(base) = base {
                return vec![(default.name.clone(), base)];
            }
        }
    }
    let mut all: Vec<(&InstanceType, f64)> = catalog
        .instance_types
        .iter()
        .filter_map(|t| price(t).map(|p| (t, p)))
        .collect();
    all.sort_by(|(a, pa), (b, pb)| {
        pa.total_cmp(pb)
            .then(a.vcpus.cmp(&b.vcpus))
            .then(a.memory_mib.cmp(&b.memory_mib))
            .then(a.name.cmp(&b.name))
    });
    all.into_iter()
        .take(4)
        .map(|(t, p)| (t.name.clone(), p))
        .collect()
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

#[test]
fn selection_matches_brute_force_for_generated_demands() {
    let selector = selector();
    let catalog = selector.catalog().clone();
    let policy = selector.policy().clone();
    let patterns = [
        None,
        Some("c5*"),
        Some("*.large"),
        Some("m?g.*"),
        Some("t3.micro"),
        Some("g*"),
        Some("x9*"),
    ];
    let mut rng = Rng(0x5EED_CE11_5EED_CE11);
    let (mut chosen, mut refused) = (0, 0);
    for case in 0..20_000 {
        let cpu_millis = match rng.below(4) {
            0 => 0,
            1 => *rng.pick(&[100, 250, 500, 1000, 1500, 2000, 3200, 4000, 8000]),
            2 => rng.below(16_000),
            _ => rng.below(220_000),
        };
        let memory_bytes = match rng.below(4) {
            0 => 0,
            1 => *rng.pick(&[256u64 << 20, 1 << 30, 4 << 30, 15 << 30, 16 << 30, 61 << 30]),
            2 => rng.below(64 << 30),
            _ => rng.below(1200 << 30),
        };
        let gpus = *rng.pick(&[0, 0, 0, 0, 1, 2, 4, 8, 9]);
        let arch = *rng.pick(&[None, None, Some(Arch::X86_64), Some(Arch::Arm64)]);
        let launch_type = *rng.pick(&[LaunchType::OnDemand, LaunchType::Spot]);
        let pattern = rng
            .pick(&patterns)
            .map(|p| InstanceTypePattern::parse(p).expect("pattern"));
        let demand = Demand {
            request: PodRequest {
                cpu_millis,
                memory_bytes,
                gpus,
                arch,
            },
            instance_type: pattern,
            launch_type,
        };
        let expected = brute_force(&catalog, &policy, &demand);
        match selector.select(&demand) {
            Ok(decision) => {
                chosen += 1;
                let got: Vec<(String, f64)> = std::iter::once(&decision.chosen)
                    .chain(&decision.runners_up)
                    .map(|c| (c.instance_type.name.clone(), c.price_per_hour))
                    .collect();
                assert_eq!(got, expected, "case {case}: {demand:?}");
            }
            Err(SelectionError::Unsatisfiable { .. }) => {
                refused += 1;
                assert!(
                    expected.is_empty(),
                    "case {case}: refused but {expected:?} fit: {demand:?}"
                );
            }
            Err(other) => panic!("case {case}: unexpected {other}"),
        }
    }
    // The generator must exercise both outcomes substantially, or the comparison proves little.
    assert!(
        chosen > 5000 && refused > 2000,
        "chosen {chosen}, refused {refused}"
    );
}

#[test]
fn eight_cpu_fifteen_gib_gets_the_cheapest_compute_type() {
    let decision = selector().select(&demand(8000, 15)).expect("decision");
    assert_eq!(decision.chosen.instance_type.name, "c5a.2xlarge");
    assert!((decision.chosen.price_per_hour - 0.308).abs() < 1e-9);
    let runners: Vec<&str> = decision
        .runners_up
        .iter()
        .map(|c| c.instance_type.name.as_str())
        .collect();
    // c5 and c6i tie on price, vCPUs and memory: the name decides.
    assert_eq!(runners, ["c5.2xlarge", "c6i.2xlarge", "m5.2xlarge"]);
    assert!(
        decision.reason.contains("8 CPU, 15 GiB memory"),
        "{}",
        decision.reason
    );
    let printed = decision.to_string();
    assert!(
        printed.starts_with(
            "instance type: c5a.2xlarge (8 vCPUs, 16 GiB, x86_64) on-demand at 0.3080 USD/h"
        ),
        "{printed}"
    );
    assert!(printed.contains("runners-up:"), "{printed}");
}

#[test]
fn burstable_types_need_baseline_or_pay_the_surcharge() {
    let selector = selector();
    // 200m fits t3.micro's 0.2 vCPU baseline: no surcharge, cheapest with 512 MiB.
    let small = selector.select(&demand(200, 0)).expect("small");
    assert_eq!(small.chosen.instance_type.name, "t3.nano");
    assert!(
        small.chosen.burst_surcharge_per_hour > 0.0,
        "t3.nano's baseline is 0.1 vCPU"
    );
    let within = Demand {
        request: PodRequest {
            cpu_millis: 100,
            memory_bytes: 400 << 20,
            ..Default::default()
        },
        ..Default::default()
    };
    let within = selector.select(&within).expect("within");
    assert_eq!(within.chosen.instance_type.name, "t3.nano");
    assert_eq!(within.chosen.burst_surcharge_per_hour, 0.0);
    // 2 full CPUs on a t3.large (0.6 vCPU baseline) would cost 0.0832 + 1.4 × 0.05.
    let two = selector.select(&demand(2000, 4)).expect("two");
    assert_eq!(two.chosen.instance_type.name, "c5a.large");
    let t3_large = selector
        .price(
            selector.catalog().get("t3.large").expect("t3.large"),
            &demand(2000, 4),
        )
        .expect("fits");
    assert!((t3_large.burst_surcharge_per_hour - 0.07).abs() < 1e-9);

    let strict = Selector::new(
        Catalog::aws_us_east_1().expect("catalog"),
        SelectionPolicy {
            allow_unlimited_burst: false,
            ..SelectionPolicy::new("t3.small")
        },
    )
    .expect("selector");
    let only_burstable = Demand {
        instance_type: InstanceTypePattern::parse("t3.*"),
        // 4 CPUs: more than any t3's baseline (t3.2xlarge: 40% of 8 = 3.2).
        ..demand(4000, 1)
    };
    let error = strict.select(&only_burstable).expect_err("no burst");
    assert!(
        matches!(
            error,
            SelectionError::Unsatisfiable {
                constraint: "burst",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn gpu_and_arm64() {
    let selector = selector();
    let gpu = Demand {
        request: PodRequest {
            cpu_millis: 4000,
            memory_bytes: 16 << 30,
            gpus: 1,
            arch: None,
        },
        ..Default::default()
    };
    assert_eq!(
        selector
            .select(&gpu)
            .expect("gpu")
            .chosen
            .instance_type
            .name,
        "g4dn.xlarge"
    );
    let four = Demand {
        request: PodRequest {
            gpus: 4,
            ..gpu.request
        },
        ..Default::default()
    };
    assert_eq!(
        selector
            .select(&four)
            .expect("4 gpus")
            .chosen
            .instance_type
            .name,
        "g4dn.12xlarge"
    );
    let arm_gpu = Demand {
        request: PodRequest {
            arch: Some(Arch::Arm64),
            memory_bytes: 8 << 30,
            ..gpu.request
        },
        ..Default::default()
    };
    assert_eq!(
        selector
            .select(&arm_gpu)
            .expect("arm gpu")
            .chosen
            .instance_type
            .name,
        "g5g.xlarge"
    );

    let arm = Demand {
        request: PodRequest {
            cpu_millis: 8000,
            memory_bytes: 15 << 30,
            gpus: 0,
            arch: Some(Arch::Arm64),
        },
        ..Default::default()
    };
    let decision = selector.select(&arm).expect("arm");
    assert_eq!(decision.chosen.instance_type.name, "c6g.2xlarge");
    assert_eq!(decision.chosen.instance_type.architecture, Arch::Arm64);
    assert!(
        decision
            .runners_up
            .iter()
            .all(|c| c.instance_type.architecture == Arch::Arm64)
    );
}

#[test]
fn globs_exact_names_and_spot() {
    let selector = selector();
    let c5 = Demand {
        instance_type: InstanceTypePattern::parse("c5*"),
        ..demand(8000, 15)
    };
    let decision = selector.select(&c5).expect("c5");
    assert_eq!(decision.chosen.instance_type.name, "c5a.2xlarge");
    assert!(
        decision
            .runners_up
            .iter()
            .all(|c| c.instance_type.name.starts_with("c5"))
    );
    let exact = Demand {
        instance_type: InstanceTypePattern::parse("m6i.4xlarge"),
        ..demand(8000, 15)
    };
    let decision = selector.select(&exact).expect("exact");
    assert_eq!(decision.chosen.instance_type.name, "m6i.4xlarge");
    assert!(
        decision.reason.contains("set by annotation"),
        "{}",
        decision.reason
    );
    // A glob without arch selector may pick arm64 types: the user chose the family.
    let graviton = Demand {
        instance_type: InstanceTypePattern::parse("m7g.*"),
        ..demand(1000, 2)
    };
    assert_eq!(
        selector
            .select(&graviton)
            .expect("m7g")
            .chosen
            .instance_type
            .name,
        "m7g.medium"
    );

    let spot = Demand {
        launch_type: LaunchType::Spot,
        ..demand(8000, 15)
    };
    let decision = selector.select(&spot).expect("spot");
    let expected_price = decision
        .chosen
        .instance_type
        .spot_per_hour
        .expect("spot price");
    assert_eq!(decision.chosen.price_per_hour, expected_price);
    assert_eq!(decision.launch_type, LaunchType::Spot);
    assert!(decision.chosen.price_per_hour < decision.chosen.instance_type.on_demand_per_hour);
    assert!(decision.to_string().contains(" spot at "));
}

#[test]
fn no_requests_get_the_default_type() {
    let selector = selector();
    let decision = selector.select(&Demand::default()).expect("default");
    assert_eq!(decision.chosen.instance_type.name, "t3.small");
    assert!(
        decision.reason.contains("default instance type"),
        "{}",
        decision.reason
    );
    assert!(decision.runners_up.is_empty());
    // An arm64 pod cannot run on the x86_64 default: the cheapest arm64 type instead.
    let arm = Demand {
        request: PodRequest {
            arch: Some(Arch::Arm64),
            ..Default::default()
        },
        ..Default::default()
    };
    assert_eq!(
        selector
            .select(&arm)
            .expect("arm")
            .chosen
            .instance_type
            .name,
        "t4g.nano"
    );
    let error = Selector::new(
        Catalog::local().expect("local"),
        SelectionPolicy::new("t3.small"),
    )
    .expect_err("t3.small is not local");
    assert!(
        error
            .to_string()
            .contains("defaultInstanceType \"t3.small\""),
        "{error}"
    );
}

#[test]
fn unsatisfiable_requests_say_what_exists() {
    let selector = selector();
    let error = selector
        .select(&demand(200_000, 1))
        .expect_err("200 vCPUs")
        .to_string();
    assert_eq!(
        error,
        "no instance type in us-east-1 for x86_64 offers 200 vCPUs; the largest is g5.48xlarge with 192"
    );
    let error = selector
        .select(&demand(4000, 2000))
        .expect_err("2000 GiB")
        .to_string();
    assert!(
        error.contains("offers 2000 GiB memory; the largest is r6i.32xlarge with 1024 GiB"),
        "{error}"
    );
    let gpus = Demand {
        request: PodRequest {
            gpus: 16,
            ..Default::default()
        },
        ..Default::default()
    };
    let error = selector.select(&gpus).expect_err("16 GPUs").to_string();
    assert!(
        error.contains("offers 16 GPUs; the most is g4dn.metal with 8"),
        "{error}"
    );
    let error = selector
        .select(&Demand {
            instance_type: InstanceTypePattern::parse("z9*"),
            ..demand(1000, 1)
        })
        .expect_err("no match")
        .to_string();
    assert!(error.contains("matches z9*"), "{error}");
    let error = selector
        .select(&Demand {
            instance_type: InstanceTypePattern::parse("c5.large"),
            ..demand(8000, 1)
        })
        .expect_err("too small")
        .to_string();
    assert!(
        error.contains("matching c5.large offers 8 vCPUs; the largest is c5.large with 2"),
        "{error}"
    );
}

fn pod_spec(requests: &[(&str, &str)], node_selector: &[(&str, &str)]) -> PodSpec {
    PodSpec {
        containers: vec![Container {
            name: "app".into(),
            resources: Some(ResourceRequirements {
                requests: Some(
                    requests
                        .iter()
                        .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }],
        node_selector: Some(
            node_selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Default::default()
    }
}

#[test]
fn decide_combines_annotations_requests_and_selection() {
    let selector = selector();
    let spec = pod_spec(&[("cpu", "8"), ("memory", "15Gi")], &[]);
    let annotations: BTreeMap<String, String> = [
        ("pod.elotl.co/launch-type".to_string(), "spot".to_string()),
        (
            "cells.updraft.dev/volume-size".to_string(),
            "30Gi".to_string(),
        ),
    ]
    .into();
    let (decision, cell) =
        decide(&selector, &spec, &annotations, LaunchType::OnDemand).expect("decide");
    assert_eq!(decision.launch_type, LaunchType::Spot);
    assert_eq!(cell.volume_size_bytes, Some(30 << 30));

    let bad: BTreeMap<String, String> = [(
        "cells.updraft.dev/launch-type".to_string(),
        "cheap".to_string(),
    )]
    .into();
    let error = decide(&selector, &spec, &bad, LaunchType::OnDemand).expect_err("bad");
    assert!(matches!(error, CostError::Annotation(_)));
    assert!(
        error.to_string().contains("cells.updraft.dev/launch-type"),
        "{error}"
    );

    let huge = pod_spec(&[("cpu", "200")], &[("kubernetes.io/arch", "arm64")]);
    let error = decide(&selector, &huge, &BTreeMap::new(), LaunchType::OnDemand).expect_err("huge");
    assert_eq!(
        error.to_string(),
        "no instance type in us-east-1 for arm64 offers 200 vCPUs; the largest is c6g.16xlarge with 64"
    );
}
