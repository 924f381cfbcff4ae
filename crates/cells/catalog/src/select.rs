//! Cheapest-fit instance selection.

use std::cmp::Ordering;
use std::fmt;

use crate::annotations::{InstanceTypePattern, LaunchType};
use crate::catalog::{Arch, Catalog, InstanceType};
use crate::request::{PodRequest, format_bytes, format_cpu};

/// What AWS charges per vCPU-hour of CPU used above a burstable type's baseline with unlimited
/// credits (t3/t4g, Linux).
pub const BURST_SURCHARGE_PER_VCPU_HOUR: f64 = 0.05;

/// How many runners-up a [`Decision`] lists.
pub const RUNNERS_UP: usize = 3;

/// The provider's selection settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectionPolicy {
    /// The type for pods that request no CPU, memory or GPU (Kip's `defaultInstanceType`).
    pub default_instance_type: String,
    /// The architecture assumed for pods without a `kubernetes.io/arch` node selector and
    /// without an instance-type annotation: most images are amd64-only, so `x86_64`.
    pub default_arch: Arch,
    /// Whether burstable types whose baseline does not cover the CPU request may be chosen with
    /// the unlimited-credits surcharge added to their price (otherwise they are not candidates).
    pub allow_unlimited_burst: bool,
}

impl SelectionPolicy {
    /// A policy with the given default type, `x86_64` as the default architecture and unlimited
    /// burst allowed.
    pub fn new(default_instance_type: impl Into<String>) -> SelectionPolicy {
        SelectionPolicy {
            default_instance_type: default_instance_type.into(),
            default_arch: Arch::X86_64,
            allow_unlimited_burst: true,
        }
    }
}

/// What a pod asks for: its effective request plus the annotation constraints.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Demand {
    /// The effective resource request.
    pub request: PodRequest,
    /// The `instance-type` annotation, if any.
    pub instance_type: Option<InstanceTypePattern>,
    /// The launch type (annotation or provider default).
    pub launch_type: LaunchType,
}

/// An instance type with what it would cost for a given demand.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The instance type.
    pub instance_type: InstanceType,
    /// Hourly price for the demand's launch type, surcharge included.
    pub price_per_hour: f64,
    /// The unlimited-burst surcharge included in `price_per_hour` (0 for most types).
    pub burst_surcharge_per_hour: f64,
}

/// The outcome of a selection: what `updraft cells select` prints.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The chosen type and its price.
    pub chosen: Candidate,
    /// The launch type the price is for.
    pub launch_type: LaunchType,
    /// Why this type, in one sentence.
    pub reason: String,
    /// The next cheapest candidates (up to [`RUNNERS_UP`]), best first.
    pub runners_up: Vec<Candidate>,
    /// The catalog's currency.
    pub currency: String,
}

/// No instance type can be chosen; the pod must not be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    /// The configured default instance type is not in the catalog.
    #[error(
        "defaultInstanceType {name:?} is not in the {region} catalog; pick one of its types, e.g. {examples}"
    )]
    UnknownDefault {
        /// The configured name.
        name: String,
        /// The catalog's region.
        region: String,
        /// A few names that exist.
        examples: String,
    },
    /// No type satisfies the demand. `constraint` is what ran out (`instance-type`,
    /// `architecture`, `spot`, `GPUs`, `vCPUs`, `memory`, `burst`); the message names it and
    /// what the catalog does offer.
    #[error("{message}")]
    Unsatisfiable {
        /// The constraint no remaining type meets.
        constraint: &'static str,
        /// The full explanation.
        message: String,
    },
}

/// Chooses instance types from one catalog under one policy.
#[derive(Debug, Clone)]
pub struct Selector {
    catalog: Catalog,
    policy: SelectionPolicy,
}

/// A fitting type with its price and surcharge, borrowed from the catalog while searching.
type Priced<'a> = (f64, f64, &'a InstanceType);

/// Sort key: price, then vCPUs, then memory, then name (deterministic ties).
fn order(a: &Priced<'_>, b: &Priced<'_>) -> Ordering {
    a.0.total_cmp(&b.0)
        .then(a.2.vcpus.cmp(&b.2.vcpus))
        .then(a.2.memory_mib.cmp(&b.2.memory_mib))
        .then_with(|| a.2.name.cmp(&b.2.name))
}

fn candidate((price_per_hour, burst_surcharge_per_hour, instance_type): Priced<'_>) -> Candidate {
    Candidate {
        instance_type: instance_type.clone(),
        price_per_hour,
        burst_surcharge_per_hour,
    }
}

impl Selector {
    /// A selector; fails when the policy's default type is not in the catalog.
    pub fn new(catalog: Catalog, policy: SelectionPolicy) -> Result<Selector, SelectionError> {
        if catalog.get(&policy.default_instance_type).is_none() {
            let examples = catalog
                .instance_types
                .iter()
                .take(3)
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(SelectionError::UnknownDefault {
                name: policy.default_instance_type.clone(),
                region: catalog.region.clone(),
                examples,
            });
        }
        Ok(Selector { catalog, policy })
    }

    /// The catalog selections are made from.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The policy in force.
    pub fn policy(&self) -> &SelectionPolicy {
        &self.policy
    }

    /// The architecture a demand is restricted to: the node selector's, else the default one
    /// unless an instance-type annotation picks the types.
    fn arch_constraint(&self, demand: &Demand) -> Option<Arch> {
        demand.request.arch.or(match demand.instance_type {
            Some(_) => None,
            None => Some(self.policy.default_arch),
        })
    }

    /// The price of `instance_type` for `demand`, or `None` when it does not fit.
    pub fn price(&self, instance_type: &InstanceType, demand: &Demand) -> Option<Candidate> {
        self.cost(instance_type, demand)
            .map(|(price, surcharge)| candidate((price, surcharge, instance_type)))
    }

    /// Price and burst surcharge per hour of a fitting type, without allocating.
    fn cost(&self, instance_type: &InstanceType, demand: &Demand) -> Option<(f64, f64)> {
        let request = &demand.request;
        if let Some(pattern) = &demand.instance_type
            && !pattern.matches(&instance_type.name)
        {
            return None;
        }
        if let Some(arch) = self.arch_constraint(demand)
            && instance_type.architecture != arch
        {
            return None;
        }
        if instance_type.gpus < request.gpus
            || u64::from(instance_type.vcpus) * 1000 < request.cpu_millis
            || instance_type.memory_bytes() < request.memory_bytes
        {
            return None;
        }
        let base = match demand.launch_type {
            LaunchType::OnDemand => instance_type.on_demand_per_hour,
            LaunchType::Spot => instance_type.spot_per_hour?,
        };
        let surcharge = match instance_type.baseline_millis() {
            Some(baseline) if request.cpu_millis > baseline => {
                if !self.policy.allow_unlimited_burst {
                    return None;
                }
                (request.cpu_millis - baseline) as f64 / 1000.0 * BURST_SURCHARGE_PER_VCPU_HOUR
            }
            _ => 0.0,
        };
        Some((base + surcharge, surcharge))
    }

    /// Chooses the instance type for a demand: the default type when the pod requests nothing
    /// and names no type, else the cheapest type that fits (ties: fewer vCPUs, less memory,
    /// name).
    pub fn select(&self, demand: &Demand) -> Result<Decision, SelectionError> {
        let currency = self.catalog.currency.clone();
        if demand.request.requests_nothing()
            && demand.instance_type.is_none()
            && let Some(default) = self.catalog.get(&self.policy.default_instance_type)
            && demand
                .request
                .arch
                .is_none_or(|arch| arch == default.architecture)
        {
            // Priced like any candidate; `None` only when spot is asked and the type has none.
            let default_demand = Demand {
                instance_type: Some(InstanceTypePattern::Exact(default.name.clone())),
                ..demand.clone()
            };
            if let Some(chosen) = self.price(default, &default_demand) {
                return Ok(Decision {
                    chosen,
                    launch_type: demand.launch_type,
                    reason: format!(
                        "the pod requests no CPU, memory or GPU, so it gets the default instance type {}",
                        default.name
                    ),
                    runners_up: Vec::new(),
                    currency,
                });
            }
        }
        // Keep the best RUNNERS_UP + 1 in order: one pass, clones only for the result.
        let mut best: Vec<Priced<'_>> = Vec::with_capacity(RUNNERS_UP + 2);
        let mut fitting = 0usize;
        for instance_type in &self.catalog.instance_types {
            let Some((price, surcharge)) = self.cost(instance_type, demand) else {
                continue;
            };
            fitting += 1;
            let priced = (price, surcharge, instance_type);
            if best.len() == RUNNERS_UP + 1
                && best
                    .last()
                    .is_some_and(|last| order(&priced, last) != Ordering::Less)
            {
                continue;
            }
            let at = best.partition_point(|c| order(c, &priced) == Ordering::Less);
            best.insert(at, priced);
            best.truncate(RUNNERS_UP + 1);
        }
        let mut ranked = best.into_iter().map(candidate);
        let Some(chosen) = ranked.next() else {
            return Err(self.diagnose(demand));
        };
        let reason = self.reason(demand, &chosen, fitting);
        Ok(Decision {
            chosen,
            launch_type: demand.launch_type,
            reason,
            runners_up: ranked.collect(),
            currency,
        })
    }

    fn reason(&self, demand: &Demand, chosen: &Candidate, fitting: usize) -> String {
        let scope = match &demand.instance_type {
            Some(InstanceTypePattern::Exact(name)) => {
                format!("instance type {name} set by annotation")
            }
            Some(InstanceTypePattern::Glob(glob)) => format!(
                "cheapest of {fitting} instance type{} matching {glob} in {}",
                plural(fitting),
                self.catalog.region
            ),
            None => format!(
                "cheapest of {fitting} instance type{} in {}",
                plural(fitting),
                self.catalog.region
            ),
        };
        let mut needs = vec![
            format!("{} CPU", format_cpu(demand.request.cpu_millis)),
            format!("{} memory", format_bytes(demand.request.memory_bytes)),
        ];
        if demand.request.gpus > 0 {
            needs.push(format!("{} GPU", demand.request.gpus));
        }
        if let Some(arch) = self.arch_constraint(demand) {
            needs.push(arch.to_string());
        }
        let mut reason = format!(
            "{scope} that fit{} {} ({})",
            if fitting == 1 { "s" } else { "" },
            needs.join(", "),
            demand.launch_type
        );
        if chosen.burst_surcharge_per_hour > 0.0 {
            reason.push_str(&format!(
                "; burstable: its baseline covers {} CPU, so {:.4}/h unlimited-credit surcharge is included",
                format_cpu(chosen.instance_type.baseline_millis().unwrap_or(0)),
                chosen.burst_surcharge_per_hour
            ));
        }
        reason
    }

    /// Why nothing fits: applies the constraints one by one and reports the first that empties
    /// the set, with what the remaining types do offer.
    fn diagnose(&self, demand: &Demand) -> SelectionError {
        let request = &demand.request;
        let region = &self.catalog.region;
        let mut scope = String::new();
        let mut remaining: Vec<&InstanceType> = self.catalog.instance_types.iter().collect();
        let unsatisfiable = |constraint, message| SelectionError::Unsatisfiable {
            constraint,
            message,
        };

        if let Some(pattern) = &demand.instance_type {
            remaining.retain(|t| pattern.matches(&t.name));
            if remaining.is_empty() {
                return unsatisfiable(
                    "instance-type",
                    format!(
                        "no instance type in the {region} catalog matches {pattern} (from the instance-type annotation); types look like {}",
                        self.examples()
                    ),
                );
            }
            scope.push_str(&format!(" matching {pattern}"));
        }
        if let Some(arch) = self.arch_constraint(demand) {
            remaining.retain(|t| t.architecture == arch);
            if remaining.is_empty() {
                return unsatisfiable(
                    "architecture",
                    format!("no instance type in {region}{scope} has architecture {arch}"),
                );
            }
            scope.push_str(&format!(" for {arch}"));
        }
        if demand.launch_type == LaunchType::Spot {
            remaining.retain(|t| t.spot_per_hour.is_some());
            if remaining.is_empty() {
                return unsatisfiable(
                    "spot",
                    format!(
                        "no instance type in {region}{scope} is offered as spot; use launch-type on-demand"
                    ),
                );
            }
        }
        let largest = |types: &[&InstanceType], key: fn(&InstanceType) -> u64| {
            types
                .iter()
                .copied()
                .max_by(|a, b| {
                    key(a)
                        .cmp(&key(b))
                        .then(b.on_demand_per_hour.total_cmp(&a.on_demand_per_hour))
                        .then_with(|| b.name.cmp(&a.name))
                })
                .map(|t| (t.name.clone(), key(t)))
                .unwrap_or_default()
        };
        if request.gpus > 0 {
            let (name, most) = largest(&remaining, |t| u64::from(t.gpus));
            remaining.retain(|t| t.gpus >= request.gpus);
            if remaining.is_empty() {
                return unsatisfiable(
                    "GPUs",
                    format!(
                        "no instance type in {region}{scope} offers {} GPUs; the most is {name} with {most}",
                        request.gpus
                    ),
                );
            }
            scope.push_str(&format!(" with {} GPUs", request.gpus));
        }
        let (name, most) = largest(&remaining, |t| u64::from(t.vcpus));
        remaining.retain(|t| u64::from(t.vcpus) * 1000 >= request.cpu_millis);
        if remaining.is_empty() {
            return unsatisfiable(
                "vCPUs",
                format!(
                    "no instance type in {region}{scope} offers {} vCPUs; the largest is {name} with {most}",
                    format_cpu(request.cpu_millis)
                ),
            );
        }
        let (name, most) = largest(&remaining, InstanceType::memory_bytes);
        remaining.retain(|t| t.memory_bytes() >= request.memory_bytes);
        if remaining.is_empty() {
            let with_cpu = if request.cpu_millis > 0 {
                format!(" with {} vCPUs", format_cpu(request.cpu_millis))
            } else {
                String::new()
            };
            return unsatisfiable(
                "memory",
                format!(
                    "no instance type in {region}{scope}{with_cpu} offers {} memory; the largest is {name} with {}",
                    format_bytes(request.memory_bytes),
                    format_bytes(most)
                ),
            );
        }
        unsatisfiable(
            "burst",
            format!(
                "only burstable instance types in {region}{scope} fit {}, their baseline does not cover {} CPU, and unlimited burst is disabled",
                request,
                format_cpu(request.cpu_millis)
            ),
        )
    }

    fn examples(&self) -> String {
        let mut names: Vec<&str> = self
            .catalog
            .instance_types
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        names.sort_unstable();
        names.dedup_by_key(|name| name.split('.').next().unwrap_or(name).to_string());
        names.truncate(6);
        names.join(", ")
    }
}

fn plural(count: usize) -> &'static str {
    if count == 1 { "" } else { "s" }
}

impl fmt::Display for Decision {
    /// The report `updraft cells select` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.chosen.instance_type;
        writeln!(
            f,
            "instance type: {} ({} vCPUs, {}{}, {}) {} at {:.4} {}/h",
            t.name,
            t.vcpus,
            format_bytes(t.memory_bytes()),
            gpu_text(t),
            t.architecture,
            self.launch_type,
            self.chosen.price_per_hour,
            self.currency
        )?;
        writeln!(f, "reason: {}", self.reason)?;
        if !self.runners_up.is_empty() {
            writeln!(f, "runners-up:")?;
            for candidate in &self.runners_up {
                let t = &candidate.instance_type;
                writeln!(
                    f,
                    "  {:<16} {:>9.4} {}/h  {} vCPUs, {}{}{}",
                    t.name,
                    candidate.price_per_hour,
                    self.currency,
                    t.vcpus,
                    format_bytes(t.memory_bytes()),
                    gpu_text(t),
                    if candidate.burst_surcharge_per_hour > 0.0 {
                        format!(
                            " (incl. {:.4} burst surcharge)",
                            candidate.burst_surcharge_per_hour
                        )
                    } else {
                        String::new()
                    }
                )?;
            }
        }
        Ok(())
    }
}

fn gpu_text(t: &InstanceType) -> String {
    match (t.gpus, &t.gpu_model) {
        (0, _) => String::new(),
        (n, Some(model)) => format!(", {n}× {model}"),
        (n, None) => format!(", {n} GPU"),
    }
}
