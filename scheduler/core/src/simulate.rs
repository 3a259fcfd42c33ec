//! Synthetic clusters for tests and benchmarks, and the placement benchmark.

use crate::cluster::{Cluster, ZONE_LABEL};
use crate::hash::{FixedMap, SplitMix64};
use crate::reconcile::reconcile;
use crate::snapshot::{HostInfo, Plan, Snapshot};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;
use wharf_proto::{ByteSize, Capacity, Digest, HostId, ServiceSpec};

/// Builds a synthetic cluster, the same for the same arguments.
///
/// - Hosts `host-0` … are all ready, spread round-robin over zones `z0`, `z1`,
///   `z2` (the `zone` label); about a quarter also carry `disk=ssd`. Each has
///   16, 32 or 64 GiB and 512, 1024 or 2048 instance slots, a few requests in
///   flight, and the components of three services cached.
/// - Services `svc-0` … live in namespaces `ns-0` to `ns-7`, each with
///   `replicas_per_service` replicas of 16 to 128 MiB and concurrency 1 to 8.
///   Every tenth asks for one zone, every twenty-fifth for `disk=ssd`.
/// - Nothing is assigned yet.
pub fn simulate(hosts: usize, services: usize, replicas_per_service: u32, seed: u64) -> Snapshot {
    let mut rng = SplitMix64::new(seed);
    let specs: Vec<ServiceSpec> = (0..services)
        .map(|i| {
            let name = format!("svc-{i}");
            let mut spec = ServiceSpec::new(name.clone(), Digest::of(name.as_bytes()));
            spec.namespace = format!("ns-{}", i % 8);
            spec.replicas = replicas_per_service;
            spec.limits.memory = ByteSize::mib(*rng.pick(&[16, 32, 64, 128]));
            spec.limits.concurrency = *rng.pick(&[1, 2, 4, 8]);
            if i % 10 == 0 {
                spec.placement
                    .labels
                    .insert(ZONE_LABEL.to_string(), format!("z{}", (i / 10) % 3));
            }
            if i % 25 == 0 {
                spec.placement
                    .labels
                    .insert("disk".to_string(), "ssd".to_string());
            }
            spec
        })
        .collect();
    let hosts = (0..hosts)
        .map(|i| {
            let mut labels = BTreeMap::from([(ZONE_LABEL.to_string(), format!("z{}", i % 3))]);
            if rng.below(4) == 0 {
                labels.insert("disk".to_string(), "ssd".to_string());
            }
            let cached: BTreeSet<Digest> = match specs.len() as u64 {
                0 => BTreeSet::new(),
                n => (0..3)
                    .map(|_| specs[rng.below(n) as usize].component.clone())
                    .collect(),
            };
            HostInfo {
                id: HostId::new(format!("host-{i}")).expect("host-N is a DNS label"),
                ready: true,
                labels,
                capacity: Capacity {
                    memory: ByteSize::gib(*rng.pick(&[16, 32, 64])),
                    instances: *rng.pick(&[512, 1024, 2048]),
                },
                cached,
                in_flight: rng.below(64),
            }
        })
        .collect();
    Snapshot {
        hosts,
        services: specs,
        current: BTreeMap::new(),
    }
}

/// The widest spread of any service in `plan`: over the hosts its replicas
/// may run on (ready, with its labels), the most replicas on one host less
/// the fewest. 0 when every service is perfectly even; 1 is the best possible
/// when replicas do not divide evenly over hosts.
pub fn max_spread_imbalance(snapshot: &Snapshot, plan: &Plan) -> u32 {
    let cluster = Cluster::new(snapshot);
    let mut per_service: Vec<FixedMap<&HostId, u32>> = cluster
        .services
        .iter()
        .map(|_| FixedMap::default())
        .collect();
    for (host, replicas) in &plan.assignments {
        for (service, _) in replicas {
            if let Some(index) = cluster.service(service) {
                *per_service[index as usize].entry(host).or_insert(0) += 1;
            }
        }
    }
    let imbalance = |(service, counts): (usize, &FixedMap<&HostId, u32>)| {
        let group_size = cluster.groups[cluster.services[service].group].hosts.len();
        let most = counts.values().copied().max().unwrap_or(0);
        let fewest = if counts.len() < group_size {
            0
        } else {
            counts.values().copied().min().unwrap_or(0)
        };
        most - fewest
    };
    per_service
        .iter()
        .enumerate()
        .map(imbalance)
        .max()
        .unwrap_or(0)
}

/// What [`bench_placement`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchResult {
    /// Replicas placed.
    pub placements: usize,
    /// Wall-clock time of the reconcile, in seconds.
    pub seconds: f64,
    /// `placements / seconds`.
    pub per_second: f64,
    /// [`max_spread_imbalance`] of the plan.
    pub max_spread_imbalance: u32,
}

/// The placement benchmark: places `replicas` replicas (rounded up to whole
/// services of 10) on an empty [`simulate`]d cluster of `hosts` hosts in one
/// reconcile, and times it.
///
/// This is the crate's only clock read, and nothing in [`reconcile()`] calls
/// it: it exists for `wharf-bench` and the `placement` example.
pub fn bench_placement(hosts: usize, replicas: usize) -> BenchResult {
    const REPLICAS_PER_SERVICE: u32 = 10;
    let snapshot = simulate(
        hosts,
        replicas.div_ceil(REPLICAS_PER_SERVICE as usize),
        REPLICAS_PER_SERVICE,
        1,
    );
    let started = Instant::now();
    let plan = reconcile(&snapshot);
    let seconds = started.elapsed().as_secs_f64();
    let placements = plan.actions.len();
    BenchResult {
        placements,
        seconds,
        per_second: placements as f64 / seconds.max(f64::MIN_POSITIVE),
        max_spread_imbalance: max_spread_imbalance(&snapshot, &plan),
    }
}
