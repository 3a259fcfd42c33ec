//! Synthetic clusters for tests and benchmarks, and the placement benchmark.

use crate::cluster::{Cluster, NO_HOST, ZONE_LABEL};
use crate::index::PlacementIndex;
use crate::hash::{IntMap, SplitMix64, mix};
use crate::reconcile::reconcile;
use crate::snapshot::{HostInfo, Plan, Snapshot, Workload};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;
use wharf_proto::{ByteSize, Capacity, Digest, HostId, ServiceSpec};

/// The spec of synthetic service number `i`, named `name` (see [`simulate`]).
fn synthetic_spec(name: &str, i: usize, replicas: u32, rng: &mut SplitMix64) -> ServiceSpec {
    let mut spec = ServiceSpec::new(name, Digest::of(name.as_bytes()));
    spec.namespace = format!("ns-{}", i % 8);
    spec.replicas = replicas;
    spec.limits.memory = ByteSize::mib(*rng.pick(&[16, 32, 64, 128]));
    spec.limits.concurrency = *rng.pick(&[1, 2, 4, 8]);
    if i.is_multiple_of(10) {
        spec.placement
            .labels
            .insert(ZONE_LABEL.to_string(), format!("z{}", (i / 10) % 3));
    }
    if i.is_multiple_of(25) {
        spec.placement
            .labels
            .insert("disk".to_string(), "ssd".to_string());
    }
    if i % 7 == 3 {
        spec.placement.spread = Some("disk".to_string());
    } else if i % 3 == 1 {
        spec.placement.spread = Some(ZONE_LABEL.to_string());
    }
    spec
}

/// Builds a synthetic cluster, the same for the same arguments.
///
/// - Hosts `host-0` … are all ready, spread round-robin over zones `z0`, `z1`,
///   `z2` (the `zone` label); about a quarter also carry `disk=ssd`. Each has
///   16, 32 or 64 GiB and 512, 1024 or 2048 instance slots, a few requests in
///   flight, and the components of three services cached.
/// - Services `svc-0` … live in namespaces `ns-0` to `ns-7`, each with
///   `replicas_per_service` replicas of 16 to 128 MiB and concurrency 1 to 8.
///   Every tenth asks for one zone, every twenty-fifth for `disk=ssd`.
///   Those numbered 3 modulo 7 spread over `disk` (a label only some hosts
///   carry), the others numbered 1 modulo 3 over `zone`.
/// - Nothing is assigned yet.
pub fn simulate(hosts: usize, services: usize, replicas_per_service: u32, seed: u64) -> Snapshot {
    let mut rng = SplitMix64::new(seed);
    let specs: Vec<ServiceSpec> = (0..services)
        .map(|i| synthetic_spec(&format!("svc-{i}"), i, replicas_per_service, &mut rng))
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
                memory_overcommit: wharf_proto::Overcommit::NONE,
                cached,
                in_flight: rng.below(64),
            }
        })
        .collect();
    Snapshot {
        hosts,
        services: specs.into_iter().map(|spec| Workload::new(spec, 1)).collect(),
        current: BTreeMap::new(),
    }
}

/// The widest spread of any service in `plan` over hosts: over the hosts
/// its replicas may run on (ready, with its labels) and, for a service with
/// `placement.spread`, within each domain of the spread label, the most
/// replicas on one host less the fewest. 0 when every service is perfectly
/// even; 1 is the best possible when replicas do not divide evenly over hosts.
pub fn max_spread_imbalance(snapshot: &Snapshot, plan: &Plan) -> u32 {
    let cluster = Cluster::new(snapshot);
    spread_imbalance(&cluster, &placed_by_service(&cluster, plan))
}

/// [`max_spread_imbalance`] of `placed` (per service index, its replicas'
/// hosts in its group) over `cluster`.
fn spread_imbalance(cluster: &Cluster, placed: &[Vec<u32>]) -> u32 {
    let imbalance = |(service, hosts): (usize, &Vec<u32>)| {
        let state = &cluster.services[service];
        let mut per_host: IntMap<u32, u32> = IntMap::default();
        for &host in hosts {
            *per_host.entry(host).or_insert(0) += 1;
        }
        // Per domain (one for a service without a spread label): hosts
        // holding a replica, the most on one, the fewest on one that holds any.
        let mut per_domain: IntMap<u32, (usize, u32, u32)> = IntMap::default();
        for (&host, &count) in &per_host {
            let domain = state
                .spread
                .as_ref()
                .map_or(0, |spread| cluster.domain_of(spread.partition, host));
            let (holding, most, fewest) = per_domain.entry(domain).or_insert((0, 0, u32::MAX));
            *holding += 1;
            *most = (*most).max(count);
            *fewest = (*fewest).min(count);
        }
        let domain_size = |domain: u32| match &state.spread {
            None => cluster.groups[state.group].hosts.len(),
            Some(spread) => cluster.partitions[spread.partition].hosts_of(domain).len(),
        };
        per_domain
            .iter()
            .map(|(&domain, &(holding, most, fewest))| {
                let fewest = if holding < domain_size(domain) {
                    0
                } else {
                    fewest
                };
                most - fewest
            })
            .max()
            .unwrap_or(0)
    };
    placed.iter().enumerate().map(imbalance).max().unwrap_or(0)
}

/// The widest spread over domains of any service in `plan` with
/// `placement.spread`: over the values of its spread label among the hosts
/// its replicas may run on, the most replicas in one domain less the fewest.
/// 1 is the best possible when replicas do not divide evenly over domains;
/// 0 when no service has a spread label.
pub fn max_domain_imbalance(snapshot: &Snapshot, plan: &Plan) -> u32 {
    let cluster = Cluster::new(snapshot);
    domain_imbalance(&cluster, &placed_by_service(&cluster, plan))
}

/// [`max_domain_imbalance`] of `placed` over `cluster`.
fn domain_imbalance(cluster: &Cluster, placed: &[Vec<u32>]) -> u32 {
    let imbalance = |(service, hosts): (usize, &Vec<u32>)| {
        let Some(spread) = &cluster.services[service].spread else {
            return 0;
        };
        let mut per_domain = vec![0u32; cluster.partitions[spread.partition].domains()];
        for &host in hosts {
            per_domain[cluster.domain_of(spread.partition, host) as usize] += 1;
        }
        let most = per_domain.iter().copied().max().unwrap_or(0);
        let fewest = per_domain.iter().copied().min().unwrap_or(0);
        most - fewest
    };
    placed.iter().enumerate().map(imbalance).max().unwrap_or(0)
}

/// Per service index, the indices of the hosts of its group its replicas
/// are on in `cluster` itself, once per replica.
fn placed_in(cluster: &Cluster) -> Vec<Vec<u32>> {
    cluster
        .services
        .iter()
        .map(|service| {
            let group = &cluster.groups[service.group];
            service
                .host_of
                .iter()
                .copied()
                .filter(|&host| host != NO_HOST && group.contains(host))
                .collect()
        })
        .collect()
}

/// Per service index, the indices of the hosts of its group its replicas
/// are on in `plan`, once per replica.
fn placed_by_service(cluster: &Cluster, plan: &Plan) -> Vec<Vec<u32>> {
    let mut placed = vec![Vec::new(); cluster.services.len()];
    for (host_id, replicas) in &plan.assignments {
        let Some(host) = cluster.host(host_id) else {
            continue;
        };
        for (service_id, _) in replicas {
            if let Some(service) = cluster.service(service_id) {
                let group = &cluster.groups[cluster.services[service as usize].group];
                if group.hosts.binary_search(&host).is_ok() {
                    placed[service as usize].push(host);
                }
            }
        }
    }
    placed
}

/// A hash of where every replica of every service of `cluster` is (by
/// index), in service order.
fn fingerprint(cluster: &Cluster) -> u64 {
    cluster.services.iter().flat_map(|service| &service.host_of).fold(0, |hash, &host| mix(hash ^ u64::from(host)))
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
    /// [`max_domain_imbalance`] of the plan.
    pub max_domain_imbalance: u32,
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
        max_domain_imbalance: max_domain_imbalance(&snapshot, &plan),
    }
}

/// What [`bench_index`] measured.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexBenchResult {
    /// Simulated hosts.
    pub hosts: usize,
    /// Seconds for every host to join an empty [`PlacementIndex`] (once,
    /// when the control plane starts; not part of any pass).
    pub join_seconds: f64,
    /// Replicas placed by the bulk pass.
    pub placements: usize,
    /// Seconds of the bulk pass: every workload added, then one
    /// [`PlacementIndex::place`].
    pub seconds: f64,
    /// `placements / seconds`.
    pub per_second: f64,
    /// Seconds to make the bulk pass's owned [`crate::Changes`] (every
    /// action and host with its ids copied, as the controller does), not
    /// counted in `seconds`: the pass returns a view naming them by the
    /// index's ids.
    pub owned_seconds: f64,
    /// [`max_spread_imbalance`] after the bulk pass.
    pub max_spread_imbalance: u32,
    /// [`max_domain_imbalance`] after the bulk pass.
    pub max_domain_imbalance: u32,
    /// A hash of every decision of the bulk pass (each workload's replicas'
    /// hosts, by index): equal across builds when they decide the same.
    pub decisions: u64,
    /// Workloads of 10 replicas added one at a time to the full cluster,
    /// one pass each.
    pub added: usize,
    /// Replicas those passes placed.
    pub added_placements: usize,
    /// Milliseconds per added workload (its `set_workload` and pass), sorted.
    pub added_ms: Vec<f64>,
    /// The imbalances, as above, after the added workloads.
    pub added_max_spread_imbalance: u32,
    /// As above, over spread-label domains.
    pub added_max_domain_imbalance: u32,
    /// As [`IndexBenchResult::decisions`], after the added workloads.
    pub added_decisions: u64,
}

impl IndexBenchResult {
    /// The `q`-quantile (0..=1) of [`IndexBenchResult::added_ms`].
    pub fn added_quantile(&self, q: f64) -> f64 {
        match self.added_ms.len() {
            0 => 0.0,
            n => self.added_ms[((n as f64 * q).ceil() as usize).clamp(1, n) - 1],
        }
    }
}

/// The placement benchmark of a [`PlacementIndex`]: the hosts of a
/// [`simulate`]d cluster of `hosts` hosts join an empty index (timed
/// apart), then `replicas` replicas (whole services of 10) are added and
/// placed in one pass (the bulk figure); then `added` more services of 10
/// replicas, shaped as the simulated ones, are added to the full cluster one
/// at a time, each with its own pass, and each timed.
pub fn bench_index(hosts: usize, replicas: usize, added: usize) -> IndexBenchResult {
    const REPLICAS_PER_SERVICE: u32 = 10;
    let services = replicas.div_ceil(REPLICAS_PER_SERVICE as usize);
    let snapshot = simulate(hosts, services, REPLICAS_PER_SERVICE, 1);
    let mut index = PlacementIndex::new();
    let started = Instant::now();
    for host in snapshot.hosts {
        index.set_host(host);
    }
    let join_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    for workload in snapshot.services {
        index.set_workload(workload);
    }
    let pass = index.place();
    let seconds = started.elapsed().as_secs_f64();
    let placements = pass.len();
    // What a caller wanting owned actions (the controller) pays on top.
    let started = Instant::now();
    let owned = pass.changes();
    let owned_seconds = started.elapsed().as_secs_f64();
    drop(owned);
    let decisions = fingerprint(index.cluster());
    let placed = placed_in(index.cluster());
    let (spread, domain) = (spread_imbalance(index.cluster(), &placed), domain_imbalance(index.cluster(), &placed));
    let mut rng = SplitMix64::new(2);
    let mut added_ms = Vec::with_capacity(added);
    let mut added_placements = 0;
    for i in 0..added {
        let spec = synthetic_spec(&format!("added-{i}"), i, REPLICAS_PER_SERVICE, &mut rng);
        let workload = Workload::new(spec, 1);
        let started = Instant::now();
        index.set_workload(workload);
        let placed = index.place().len();
        added_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        added_placements += placed;
    }
    added_ms.sort_by(f64::total_cmp);
    let placed = placed_in(index.cluster());
    IndexBenchResult {
        hosts,
        join_seconds,
        placements,
        seconds,
        per_second: placements as f64 / seconds.max(f64::MIN_POSITIVE),
        owned_seconds,
        max_spread_imbalance: spread,
        max_domain_imbalance: domain,
        decisions,
        added,
        added_placements,
        added_ms,
        added_max_spread_imbalance: spread_imbalance(index.cluster(), &placed),
        added_max_domain_imbalance: domain_imbalance(index.cluster(), &placed),
        added_decisions: fingerprint(index.cluster()),
    }
}
