//! Invariants of `reconcile` on random small clusters: no host is ever
//! over-committed, every placed replica satisfies its constraints, every
//! desired replica is accounted for once, the actions lead from the current
//! assignments to the planned ones, and plans are deterministic and settle.

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use wharf_proto::{ByteSize, Capacity, Digest, HostId, Overcommit, ServiceId, ServiceSpec};
use wharf_scheduler_core::{Action, Changes, HostInfo, PlacementIndex, Plan, Snapshot, Workload, WorkloadId, reconcile};

const ZONES: [&str; 3] = ["a", "b", "c"];

fn labels(zone: Option<usize>, ssd: bool) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    if let Some(zone) = zone {
        labels.insert("zone".to_string(), ZONES[zone].to_string());
    }
    if ssd {
        labels.insert("disk".to_string(), "ssd".to_string());
    }
    labels
}

fn component(service: usize) -> Digest {
    Digest::of(format!("svc-{service}").as_bytes())
}

fn arb_host() -> impl Strategy<Value = (bool, Option<usize>, bool, u64, u32, Vec<usize>, u64)> {
    (
        prop::bool::weighted(0.85),
        prop::option::of(0..ZONES.len()),
        any::<bool>(),
        0..8192u64,
        0..64u32,
        prop::collection::vec(0..6usize, 0..3),
        0..100u64,
    )
}

/// The labels a service may spread over: none, one every host may carry,
/// one only some carry, one no host carries.
const SPREADS: [Option<&str>; 4] = [None, Some("zone"), Some("disk"), Some("rack")];

fn arb_service() -> impl Strategy<Value = (u32, u64, u32, Option<usize>, bool, usize)> {
    (
        0..8u32,
        prop::sample::select(vec![1u64, 16, 64, 256]),
        prop::sample::select(vec![1u32, 2, 4, 8]),
        prop::option::of(0..ZONES.len()),
        prop::bool::weighted(0.2),
        0..SPREADS.len(),
    )
}

prop_compose! {
    /// Up to 10 hosts and 6 services, with current assignments that may name
    /// hosts and services that do not exist, replicas above the desired
    /// count, duplicates, and more than a host can hold.
    fn arb_snapshot()(
        hosts in prop::collection::vec(arb_host(), 0..10),
        services in prop::collection::vec((arb_service(), 1..3u64, prop::collection::vec((0..10u32, 0..12usize), 0..4)), 0..6),
        current in prop::collection::vec((0..12usize, 0..8usize, 1..3u64, 0..10u32), 0..30),
    ) -> Snapshot {
        let hosts = hosts
            .into_iter()
            .enumerate()
            .map(|(i, (ready, zone, ssd, memory_mib, instances, cached, in_flight))| HostInfo {
                id: HostId::new(format!("h{i}")).expect("valid host id"),
                ready,
                labels: labels(zone, ssd),
                capacity: Capacity { memory: ByteSize::mib(memory_mib), instances },
                memory_overcommit: if i % 2 == 0 { Overcommit::NONE } else { "1.5".parse().expect("a ratio") },
                cached: cached.into_iter().map(component).collect(),
                in_flight,
            })
            .collect();
        // Services may appear as two revisions (two workloads), and a
        // replica may be asked to avoid hosts (that may not exist).
        let services = services
            .into_iter()
            .enumerate()
            .map(|(i, ((replicas, memory_mib, concurrency, zone, ssd, spread), revision, avoid))| {
                let mut spec = ServiceSpec::new(format!("svc-{}", i / 2), component(i));
                spec.replicas = replicas;
                spec.limits.memory = ByteSize::mib(memory_mib);
                spec.limits.concurrency = concurrency;
                spec.placement.labels = labels(zone, ssd);
                spec.placement.spread = SPREADS[spread].map(String::from);
                // Half request all they may use (memory and slots); the rest the default, with
                // a peak learned up to the cap (above the default request).
                let learned = i % 2 == 1;
                if !learned {
                    spec.limits.memory_request = Some(spec.limits.most_memory());
                    spec.limits.instances_request = Some(concurrency);
                }
                let peak = spec.limits.memory;
                let mut workload = Workload::new(spec, revision);
                workload.memory_peak = learned.then_some(peak);
                for (replica, host) in avoid {
                    let host = HostId::new(format!("h{host}")).expect("valid host id");
                    workload.avoid.entry(replica).or_default().insert(host);
                }
                workload
            })
            .collect();
        let mut assigned: BTreeMap<HostId, Vec<(WorkloadId, u32)>> = BTreeMap::new();
        for (host, service, revision, replica) in current {
            let host = HostId::new(format!("h{host}")).expect("valid host id");
            let service = ServiceId::new("default", format!("svc-{service}")).expect("valid id");
            assigned.entry(host).or_default().push((WorkloadId::new(service, revision), replica));
        }
        Snapshot { hosts, services, current: assigned }
    }
}

fn check_invariants(snapshot: &Snapshot, plan: &Plan) -> Result<(), TestCaseError> {
    let hosts: BTreeMap<&HostId, &HostInfo> =
        snapshot.hosts.iter().rev().map(|h| (&h.id, h)).collect();
    let services: BTreeMap<WorkloadId, &Workload> = snapshot
        .services
        .iter()
        .rev()
        .map(|s| (s.id.clone(), s))
        .collect();
    let mut placed = BTreeSet::new();
    for (host_id, replicas) in &plan.assignments {
        let host = hosts
            .get(host_id)
            .ok_or_else(|| TestCaseError::fail(format!("{host_id} is not in the snapshot")))?;
        prop_assert!(
            host.ready || replicas.is_empty(),
            "{host_id} is not ready but runs {replicas:?}"
        );
        let (mut memory, mut instances) = (0u64, 0u64);
        for (service, replica) in replicas {
            let workload = services
                .get(service)
                .ok_or_else(|| TestCaseError::fail(format!("{service} does not exist")))?;
            let spec = &workload.spec;
            prop_assert!(
                *replica < workload.replicas,
                "{service}/{replica} is above the desired count"
            );
            if workload.avoid.get(replica).is_some_and(|avoid| avoid.contains(host_id)) {
                // Only where no other host of its group had room for it. A
                // replica placed anew reserves the larger of its request
                // and the peak learned for the workload.
                let needs = workload.memory_peak.map_or(spec.memory_request(), |peak| peak.max(spec.memory_request()));
                let elsewhere = snapshot.hosts.iter().any(|h| {
                    h.ready && h.id != *host_id
                        && !workload.avoid[replica].contains(&h.id)
                        && spec.placement.matches(&h.labels)
                        && plan.assignments.get(&h.id).is_some_and(|on| on.is_empty())
                        && h.capacity.memory.scaled(h.memory_overcommit) >= needs
                        && u64::from(h.capacity.instances) >= u64::from(spec.instances_request())
                });
                prop_assert!(!elsewhere, "{service}/{replica} is on {host_id}, which it avoids, while an empty host could take it");
            }
            prop_assert!(
                spec.placement.matches(&host.labels),
                "{service} does not match {host_id}'s labels"
            );
            prop_assert!(
                placed.insert((service.clone(), *replica)),
                "{service}/{replica} is placed twice"
            );
            memory += spec.memory_request().bytes();
            instances += u64::from(spec.instances_request());
        }
        prop_assert!(
            memory <= host.capacity.memory.scaled(host.memory_overcommit).bytes(),
            "{host_id} over memory: {memory}"
        );
        prop_assert!(
            instances <= u64::from(host.capacity.instances),
            "{host_id} over instances: {instances}"
        );
    }
    for unplaceable in &plan.unplaceable {
        prop_assert!(!unplaceable.reason.is_empty());
        let replica = (unplaceable.service.clone(), unplaceable.replica);
        prop_assert!(
            placed.insert(replica),
            "{} is both placed and unplaceable",
            unplaceable.service
        );
    }
    let desired: BTreeSet<(WorkloadId, u32)> = services
        .iter()
        .flat_map(|(id, workload)| (0..workload.replicas).map(move |r| (id.clone(), r)))
        .collect();
    prop_assert_eq!(
        placed,
        desired,
        "every desired replica is placed or unplaceable, once"
    );

    // Applying the actions to the current assignments gives the planned
    // ones. Counted, since the current ones may hold duplicates.
    let mut after: BTreeMap<(HostId, WorkloadId, u32), usize> = BTreeMap::new();
    for (host, replicas) in &snapshot.current {
        for (service, replica) in replicas {
            *after
                .entry((host.clone(), service.clone(), *replica))
                .or_default() += 1;
        }
    }
    for action in &plan.actions {
        let (Action::Stop {
            service,
            replica,
            host,
        }
        | Action::Start {
            service,
            replica,
            host,
        }) = action;
        let count = after
            .entry((host.clone(), service.clone(), *replica))
            .or_default();
        match action {
            Action::Stop { .. } => {
                prop_assert!(*count > 0, "{action:?} stops a replica that is not running");
                *count -= 1;
            }
            Action::Start { .. } => {
                prop_assert!(*count == 0, "{action:?} starts a replica that is running");
                *count += 1;
            }
        }
    }
    after.retain(|_, count| *count > 0);
    let planned: BTreeMap<(HostId, WorkloadId, u32), usize> = plan
        .assignments
        .iter()
        .flat_map(|(host, replicas)| {
            replicas
                .iter()
                .map(move |(s, r)| ((host.clone(), s.clone(), *r), 1))
        })
        .collect();
    prop_assert_eq!(after, planned);
    Ok(())
}

/// The hosts and workloads of `snapshot` that count (the first of each id).
fn firsts(snapshot: &Snapshot) -> (Vec<HostInfo>, Vec<Workload>) {
    let mut seen = BTreeSet::new();
    let hosts = snapshot.hosts.iter().filter(|h| seen.insert(h.id.clone())).cloned().collect();
    let mut seen = BTreeSet::new();
    let workloads = snapshot.services.iter().filter(|w| seen.insert(w.id.clone())).cloned().collect();
    (hosts, workloads)
}

/// Tells `index` what changed from `before` (`None`: nothing known yet) to
/// `after`, and runs a pass.
fn apply(index: &mut PlacementIndex, before: Option<&Snapshot>, after: &Snapshot) -> Changes {
    let (hosts, workloads) = firsts(after);
    if let Some(before) = before {
        let (old_hosts, old_workloads) = firsts(before);
        for host in old_hosts.iter().filter(|h| !hosts.iter().any(|n| n.id == h.id)) {
            index.remove_host(&host.id);
        }
        for workload in old_workloads.iter().filter(|w| !workloads.iter().any(|n| n.id == w.id)) {
            index.remove_workload(&workload.id);
        }
    }
    for host in hosts {
        index.set_host(host);
    }
    for workload in workloads {
        index.set_workload(workload);
    }
    index.place().changes()
}

/// The index's state and `changes` as a plan over the hosts of `snapshot`;
/// a host the snapshot does not have must run nothing.
fn index_plan(index: &PlacementIndex, snapshot: &Snapshot, changes: Changes) -> Result<Plan, TestCaseError> {
    let mut assignments = index.assignments();
    for (host, replicas) in &assignments {
        if !snapshot.hosts.iter().any(|h| h.id == *host) {
            prop_assert!(replicas.is_empty(), "{host} left but runs {replicas:?}");
        }
    }
    assignments.retain(|host, _| snapshot.hosts.iter().any(|h| h.id == *host));
    Ok(Plan { assignments, actions: changes.actions, unplaceable: index.unplaceable() })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// A persistent index fed one state and then another, as changes,
    /// keeps every invariant of `reconcile` after each pass, settles (a
    /// pass with nothing changed does nothing), and decides the same for
    /// the same sequence of changes.
    #[test]
    fn index_follows_changes(first in arb_snapshot(), second in arb_snapshot()) {
        let first = Snapshot { current: BTreeMap::new(), ..first };
        let mut index = PlacementIndex::new();
        let changes = apply(&mut index, None, &first);
        let plan = index_plan(&index, &first, changes.clone())?;
        check_invariants(&first, &plan)?;
        prop_assert_eq!(index.place().changes(), Changes::default(), "a pass with nothing changed does nothing");

        let second = Snapshot { current: index.assignments(), ..second };
        let changes = apply(&mut index, Some(&first), &second);
        let plan = index_plan(&index, &second, changes.clone())?;
        check_invariants(&second, &plan)?;
        prop_assert_eq!(index.place().changes(), Changes::default(), "a pass with nothing changed does nothing");

        let mut again = PlacementIndex::new();
        apply(&mut again, None, &first);
        prop_assert_eq!(apply(&mut again, Some(&first), &second), changes, "the same changes give the same decisions");
        prop_assert_eq!(again.assignments(), index.assignments());

        // An index started from a reconcile of a snapshot holds its plan,
        // and follows changes from there.
        let (plan, mut started) = PlacementIndex::reconcile(&first);
        prop_assert_eq!(&plan, &reconcile(&first));
        prop_assert_eq!(started.place().changes(), Changes::default(), "a pass with nothing changed does nothing");
        let moved = Snapshot { current: plan.assignments.clone(), ..second.clone() };
        let changes = apply(&mut started, Some(&first), &moved);
        let plan = index_plan(&started, &moved, changes)?;
        check_invariants(&moved, &plan)?;
    }

    #[test]
    fn plans_respect_capacity_and_constraints(snapshot in arb_snapshot()) {
        let plan = reconcile(&snapshot);
        check_invariants(&snapshot, &plan)?;
        prop_assert_eq!(&reconcile(&snapshot), &plan, "the same snapshot gives the same plan");
        let applied = Snapshot { current: plan.assignments.clone(), ..snapshot };
        let again = reconcile(&applied);
        prop_assert_eq!(again.actions, vec![]);
        prop_assert_eq!(again.assignments, plan.assignments);
    }

    /// With room everywhere and nothing running yet, a service with a spread
    /// label has replicas per value that differ by at most one, and replicas
    /// per host within each value that differ by at most one.
    #[test]
    fn spread_is_exact_when_capacity_allows(
        hosts in prop::collection::vec(
            (prop::bool::weighted(0.85), prop::option::of(0..ZONES.len()), any::<bool>()),
            0..24,
        ),
        services in prop::collection::vec(
            (0..40u32, prop::option::of(0..ZONES.len()), prop::bool::weighted(0.3), 1..SPREADS.len()),
            0..5,
        ),
    ) {
        let hosts: Vec<HostInfo> = hosts
            .into_iter()
            .enumerate()
            .map(|(i, (ready, zone, ssd))| HostInfo {
                id: HostId::new(format!("h{i}")).expect("valid host id"),
                ready,
                labels: labels(zone, ssd),
                capacity: Capacity { memory: ByteSize::gib(1024), instances: 1_000_000 },
                memory_overcommit: Overcommit::NONE,
                cached: BTreeSet::new(),
                in_flight: 0,
            })
            .collect();
        let services: Vec<ServiceSpec> = services
            .into_iter()
            .enumerate()
            .map(|(i, (replicas, zone, ssd, spread))| {
                let mut spec = ServiceSpec::new(format!("svc-{i}"), component(i));
                spec.replicas = replicas;
                spec.placement.labels = labels(zone, ssd);
                spec.placement.spread = SPREADS[spread].map(String::from);
                spec
            })
            .collect();
        let snapshot = Snapshot { hosts, services: services.into_iter().map(|spec| Workload::new(spec, 1)).collect(), current: BTreeMap::new() };
        let plan = reconcile(&snapshot);
        for workload in &snapshot.services {
            let spec = &workload.spec;
            let label = spec.placement.spread.as_deref().expect("every service spreads");
            let qualifying: Vec<&HostInfo> = snapshot
                .hosts
                .iter()
                .filter(|h| h.ready && spec.placement.matches(&h.labels))
                .collect();
            if qualifying.is_empty() {
                continue;
            }
            // Replicas per host, grouped by the host's value of the label.
            let mut per_value: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
            for host in qualifying {
                let on_host = plan.assignments[&host.id]
                    .iter()
                    .filter(|(service, _)| service.service.name == spec.name)
                    .count();
                let value = host.labels.get(label).map_or("", String::as_str);
                per_value.entry(value).or_default().push(on_host);
            }
            let totals: Vec<usize> = per_value.values().map(|hosts| hosts.iter().sum()).collect();
            let spread = |counts: &[usize]| {
                counts.iter().max().copied().unwrap_or(0) - counts.iter().min().copied().unwrap_or(0)
            };
            prop_assert!(spread(&totals) <= 1, "{}: per {label} value {per_value:?}", spec.name);
            for (value, hosts) in &per_value {
                prop_assert!(spread(hosts) <= 1, "{}: {label}={value} hosts {hosts:?}", spec.name);
            }
        }
        prop_assert!(plan.unplaceable.iter().all(|u| u.reason.starts_with("no ready host")));
    }
}
