//! Table tests of `reconcile` on small synthetic clusters, checked against a
//! text rendering of the plan, plus larger checks of spread, stability and
//! idempotence on simulated clusters.

use std::collections::{BTreeMap, BTreeSet};
use wharf_proto::{ByteSize, Capacity, Digest, HostId, Overcommit, ServiceId, ServiceSpec};
use wharf_scheduler_core::{
    Action, HostInfo, Plan, Snapshot, Workload, WorkloadId, max_domain_imbalance, max_spread_imbalance, reconcile,
    simulate,
};

/// A ready host with 16GiB and 1024 instance slots, and `labels` written `key=value`.
fn host(id: &str, labels: &[&str]) -> HostInfo {
    HostInfo {
        id: HostId::new(id).expect("valid host id"),
        ready: true,
        labels: labels
            .iter()
            .map(|label| {
                let (key, value) = label.split_once('=').expect("labels are key=value");
                (key.to_string(), value.to_string())
            })
            .collect(),
        capacity: Capacity {
            memory: ByteSize::gib(16),
            instances: 1024,
        },
        memory_overcommit: Overcommit::NONE,
        cached: BTreeSet::new(),
        in_flight: 0,
    }
}

/// A service with `replicas` replicas, each requesting 1GiB (its most,
/// 64MiB × 16), so that a 16GiB host holds 16.
fn service(name: &str, replicas: u32) -> ServiceSpec {
    let mut spec = ServiceSpec::new(name, Digest::of(name.as_bytes()));
    spec.replicas = replicas;
    spec.limits.memory_request = Some(ByteSize::gib(1));
    // Each replica reserves 16 slots, so a few hosts run out of them.
    spec.limits.instances_request = Some(16);
    spec
}

fn snapshot(hosts: Vec<HostInfo>, services: Vec<ServiceSpec>) -> Snapshot {
    Snapshot {
        hosts,
        services: services.into_iter().map(|spec| Workload::new(spec, 1)).collect(),
        current: BTreeMap::new(),
    }
}

/// `snapshot` with `current` written `host: svc/replica ...; host: ...` (default namespace).
fn with_current(mut snapshot: Snapshot, current: &str) -> Snapshot {
    for entry in current.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (host, replicas) = entry.split_once(':').expect("host: replicas");
        let replicas = replicas
            .split_whitespace()
            .map(|r| {
                let (name, index) = r.split_once('/').expect("name/replica");
                (
                    WorkloadId::new(ServiceId::new("default", name).expect("valid name"), 1),
                    index.parse().expect("replica index"),
                )
            })
            .collect();
        snapshot
            .current
            .insert(HostId::new(host.trim()).expect("valid host id"), replicas);
    }
    snapshot
}

/// The plan as text: each host's assignment, then the actions, then the
/// unplaceable replicas, one per line.
fn render(plan: &Plan) -> String {
    let replica = |service: &WorkloadId, index: u32| format!("{}/{index}", service.service.name);
    let mut lines = Vec::new();
    for (host, replicas) in &plan.assignments {
        let replicas: Vec<String> = replicas.iter().map(|(s, r)| replica(s, *r)).collect();
        lines.push(
            format!("{host}: {}", replicas.join(" "))
                .trim_end()
                .to_string(),
        );
    }
    for action in &plan.actions {
        lines.push(match action {
            Action::Start {
                service,
                replica: r,
                host,
            } => format!("start {} on {host}", replica(service, *r)),
            Action::Stop {
                service,
                replica: r,
                host,
            } => format!("stop {} on {host}", replica(service, *r)),
        });
    }
    for unplaceable in &plan.unplaceable {
        lines.push(format!(
            "unplaceable {}: {}",
            replica(&unplaceable.service, unplaceable.replica),
            unplaceable.reason
        ));
    }
    lines.join("\n")
}

/// Reconciles `snapshot`, compares the rendered plan with `expected` (whose
/// lines are trimmed), and checks that applying the plan settles it.
#[track_caller]
fn check(snapshot: &Snapshot, expected: &str) -> Plan {
    let plan = reconcile(snapshot);
    let expected: Vec<&str> = expected
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(render(&plan), expected.join("\n"));
    assert_settles(snapshot, &plan);
    plan
}

/// Applying `plan` and reconciling again gives no actions and the same assignments.
#[track_caller]
fn assert_settles(snapshot: &Snapshot, plan: &Plan) {
    let applied = Snapshot {
        current: plan.assignments.clone(),
        ..snapshot.clone()
    };
    let again = reconcile(&applied);
    assert_eq!(again.actions, vec![], "a settled cluster needs no actions");
    assert_eq!(again.assignments, plan.assignments);
    assert_eq!(again.unplaceable, plan.unplaceable);
}

/// Replicas of `name` per host, for every host of the plan.
fn counts(plan: &Plan, name: &str) -> Vec<usize> {
    plan.assignments
        .values()
        .map(|replicas| replicas.iter().filter(|(s, _)| s.service.name == name).count())
        .collect()
}

#[test]
fn spreads_replicas_over_equal_hosts() {
    let hosts = || vec![host("h1", &[]), host("h2", &[]), host("h3", &[])];
    check(
        &snapshot(hosts(), vec![service("a", 3)]),
        "h1: a/0
         h2: a/1
         h3: a/2
         start a/0 on h1
         start a/1 on h2
         start a/2 on h3",
    );
    let plan = reconcile(&snapshot(hosts(), vec![service("a", 7)]));
    let mut spread = counts(&plan, "a");
    spread.sort_unstable();
    assert_eq!(spread, [2, 2, 3]);
}

#[test]
fn spreads_over_zones() {
    let hosts = vec![
        host("h1", &["zone=a"]),
        host("h2", &["zone=a"]),
        host("h3", &["zone=a"]),
        host("h4", &["zone=b"]),
        host("h5", &["zone=c"]),
        host("h6", &["zone=c"]),
    ];
    let plan = reconcile(&snapshot(hosts, vec![service("a", 3)]));
    let zones: BTreeSet<&str> = plan
        .assignments
        .iter()
        .filter(|(_, replicas)| !replicas.is_empty())
        .map(|(host, _)| match host.as_str() {
            "h1" | "h2" | "h3" => "a",
            "h4" => "b",
            _ => "c",
        })
        .collect();
    assert_eq!(zones, BTreeSet::from(["a", "b", "c"]));
}

#[test]
fn places_only_on_hosts_with_the_labels() {
    let mut zoned = service("a", 2);
    zoned.placement.labels.insert("zone".into(), "b".into());
    let mut nowhere = service("c", 1);
    nowhere.placement.labels.insert("zone".into(), "z".into());
    check(
        &snapshot(
            vec![
                host("h1", &["zone=a"]),
                host("h2", &["zone=b"]),
                host("h3", &["zone=b"]),
            ],
            vec![zoned, nowhere],
        ),
        "h1:
         h2: a/0
         h3: a/1
         start a/0 on h2
         start a/1 on h3
         unplaceable c/0: no ready host has labels zone=z",
    );
}

#[test]
fn never_exceeds_memory_or_instances() {
    let mut small = host("h1", &[]);
    small.capacity.memory = ByteSize::mib(2560);
    check(
        &snapshot(vec![small], vec![service("a", 3)]),
        "h1: a/0 a/1
         start a/0 on h1
         start a/1 on h1
         unplaceable a/2: insufficient memory on 1 of 1 ready hosts (needs 1GiB, most free 512MiB)",
    );
    let mut few_slots = host("h1", &["zone=a"]);
    few_slots.capacity.instances = 20;
    let mut a = service("a", 2);
    a.placement.labels.insert("zone".into(), "a".into());
    check(
        &snapshot(vec![few_slots, host("h2", &["zone=b"])], vec![a]),
        "h1: a/0
         h2:
         start a/0 on h1
         unplaceable a/1: insufficient instance slots on 1 of 1 ready hosts with labels zone=a (needs 16, most free 4)",
    );
}

#[test]
fn reports_every_reason_a_host_was_refused() {
    let mut short_of_memory = host("h1", &[]);
    short_of_memory.capacity.memory = ByteSize::mib(512);
    let mut short_of_slots = host("h2", &[]);
    short_of_slots.capacity.instances = 8;
    check(
        &snapshot(vec![short_of_memory, short_of_slots], vec![service("a", 1)]),
        "h1:
         h2:
         unplaceable a/0: insufficient memory on 1 of 2 ready hosts (needs 1GiB, most free 512MiB); \
         insufficient instance slots on 1 of 2 ready hosts (needs 16, most free 8)",
    );
    let mut down = host("h1", &[]);
    down.ready = false;
    check(
        &snapshot(vec![down], vec![service("a", 2)]),
        "h1:
         unplaceable a/0: no ready host
         unplaceable a/1: no ready host",
    );
}

#[test]
fn short_capacity_goes_round_robin_over_services() {
    let mut small = host("h1", &[]);
    small.capacity.memory = ByteSize::gib(2);
    let plan = reconcile(&snapshot(
        vec![small],
        vec![service("a", 2), service("b", 2)],
    ));
    let placed: Vec<String> = plan
        .assignments
        .values()
        .flatten()
        .map(|(s, r)| format!("{}/{r}", s.service.name))
        .collect();
    assert_eq!(placed, ["a/0", "b/0"]);
    assert_eq!(plan.unplaceable.len(), 2);
}

#[test]
fn moves_replicas_off_down_and_gone_hosts() {
    let mut hosts = vec![host("h1", &[]), host("h2", &[]), host("h3", &[])];
    hosts[0].ready = false;
    check(
        &with_current(snapshot(hosts, vec![service("a", 2)]), "h1: a/0; h2: a/1"),
        "h1:
         h2: a/1
         h3: a/0
         stop a/0 on h1
         start a/0 on h3",
    );
    check(
        &with_current(
            snapshot(
                vec![host("h2", &[]), host("h3", &[])],
                vec![service("a", 2)],
            ),
            "h1: a/0; h2: a/1",
        ),
        "h2: a/1
         h3: a/0
         stop a/0 on h1
         start a/0 on h3",
    );
}

#[test]
fn scale_down_removes_the_highest_indices_and_deleted_services() {
    check(
        &with_current(
            snapshot(
                vec![host("h1", &[]), host("h2", &[])],
                vec![service("a", 2)],
            ),
            "h1: a/0 a/2 gone/0; h2: a/1 a/3",
        ),
        "h1: a/0
         h2: a/1
         stop a/2 on h1
         stop gone/0 on h1
         stop a/3 on h2",
    );
}

#[test]
fn keeps_placements_that_still_fit() {
    // h1 is fuller and the component is cached on h2, but a/0 stays on h1.
    let mut cached = host("h2", &[]);
    cached.cached.insert(Digest::of(b"a"));
    check(
        &with_current(
            snapshot(
                vec![host("h1", &[]), cached],
                vec![service("a", 1), service("b", 1)],
            ),
            "h1: a/0 b/0",
        ),
        "h1: a/0 b/0
         h2:",
    );
}

#[test]
fn moves_replicas_whose_host_no_longer_qualifies() {
    let mut zoned = service("a", 1);
    zoned.placement.labels.insert("zone".into(), "b".into());
    check(
        &with_current(
            snapshot(
                vec![host("h1", &["zone=a"]), host("h2", &["zone=b"])],
                vec![zoned],
            ),
            "h1: a/0",
        ),
        "h1:
         h2: a/0
         stop a/0 on h1
         start a/0 on h2",
    );
    // h1 shrank to 1.5GiB: the first replica (by service, replica) stays.
    let mut shrunk = host("h1", &[]);
    shrunk.capacity.memory = ByteSize::mib(1536);
    check(
        &with_current(
            snapshot(vec![shrunk, host("h2", &[])], vec![service("a", 2)]),
            "h1: a/1 a/0",
        ),
        "h1: a/0
         h2: a/1
         stop a/1 on h1
         start a/1 on h2",
    );
}

#[test]
fn stops_duplicates() {
    check(
        &with_current(
            snapshot(
                vec![host("h1", &[]), host("h2", &[])],
                vec![service("a", 1)],
            ),
            "h1: a/0; h2: a/0",
        ),
        "h1: a/0
         h2:
         stop a/0 on h2",
    );
}

#[test]
fn prefers_cached_idle_and_empty_hosts() {
    let mut cached = host("h2", &[]);
    cached.cached.insert(Digest::of(b"a"));
    check(
        &snapshot(vec![host("h1", &[]), cached], vec![service("a", 1)]),
        "h1:\nh2: a/0\nstart a/0 on h2",
    );
    let mut busy = host("h1", &[]);
    busy.in_flight = 500;
    check(
        &snapshot(vec![busy, host("h2", &[])], vec![service("a", 1)]),
        "h1:\nh2: a/0\nstart a/0 on h2",
    );
    check(
        &with_current(
            snapshot(
                vec![host("h1", &[]), host("h2", &[])],
                vec![service("a", 1), service("b", 1)],
            ),
            "h1: b/0",
        ),
        "h1: b/0
         h2: a/0
         start a/0 on h2",
    );
}

#[test]
fn ties_break_by_host_id() {
    check(
        &snapshot(
            vec![host("h2", &[]), host("h1", &[])],
            vec![service("a", 1)],
        ),
        "h1: a/0
         h2:
         start a/0 on h1",
    );
}

#[test]
fn equal_hosts_hold_replicas_within_one_of_each_other() {
    let hosts = |n: usize| {
        (0..n)
            .map(|i| host(&format!("h{i}"), &[]))
            .collect::<Vec<_>>()
    };
    for (host_count, replicas) in [(1000, 1000), (1000, 999), (300, 1000), (50, 3)] {
        let snapshot = snapshot(hosts(host_count), vec![service("a", replicas)]);
        let plan = reconcile(&snapshot);
        let spread = counts(&plan, "a");
        let (most, fewest) = (spread.iter().max().copied(), spread.iter().min().copied());
        assert!(
            most.zip(fewest)
                .is_some_and(|(most, fewest)| most - fewest <= 1),
            "{host_count} hosts, {replicas}"
        );
        let even = (replicas as usize).is_multiple_of(host_count);
        assert_eq!(
            max_spread_imbalance(&snapshot, &plan),
            u32::from(!even),
            "{host_count} hosts, {replicas}"
        );
        assert!(plan.unplaceable.is_empty());
    }
}

#[test]
fn simulated_clusters_spread_evenly_and_settle() {
    let snapshot = simulate(500, 400, 5, 7);
    let plan = reconcile(&snapshot);
    assert_eq!(plan.actions.len(), 2000);
    assert!(plan.unplaceable.is_empty());
    assert_eq!(max_spread_imbalance(&snapshot, &plan), 1);
    assert_eq!(
        reconcile(&snapshot),
        plan,
        "the same snapshot gives the same plan"
    );
    assert_settles(&snapshot, &plan);

    // A tenth of the hosts go down: only their replicas move, and evenly.
    let mut degraded = Snapshot {
        current: plan.assignments.clone(),
        ..snapshot
    };
    for host in degraded.hosts.iter_mut().step_by(10) {
        host.ready = false;
    }
    let moved: usize = degraded
        .hosts
        .iter()
        .filter(|h| !h.ready)
        .map(|h| plan.assignments[&h.id].len())
        .sum();
    let replan = reconcile(&degraded);
    assert_eq!(replan.actions.len(), 2 * moved);
    assert!(max_spread_imbalance(&degraded, &replan) <= 1);
    assert_settles(&degraded, &replan);
}

/// `service` with its replicas spread over the values of `label`.
fn spread(name: &str, replicas: u32, label: &str) -> ServiceSpec {
    let mut spec = service(name, replicas);
    spec.placement.spread = Some(label.to_string());
    spec
}

/// Replicas of `name` per value of `label` among the hosts of `snapshot`
/// (`-` for hosts without it), as `value=count` in value order.
fn per_value(snapshot: &Snapshot, plan: &Plan, name: &str, label: &str) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for host in &snapshot.hosts {
        let value = host.labels.get(label).map_or("-", String::as_str);
        let replicas = plan.assignments[&host.id]
            .iter()
            .filter(|(s, _)| s.service.name == name)
            .count();
        *counts.entry(value).or_default() += replicas;
    }
    let pairs: Vec<String> = counts.iter().map(|(v, n)| format!("{v}={n}")).collect();
    pairs.join(" ")
}

#[test]
fn spread_zone_puts_one_replica_in_each_zone() {
    let hosts = vec![
        host("h1", &["zone=a"]),
        host("h2", &["zone=b"]),
        host("h3", &["zone=c"]),
    ];
    check(
        &snapshot(hosts, vec![spread("a", 3, "zone")]),
        "h1: a/0
         h2: a/1
         h3: a/2
         start a/0 on h1
         start a/1 on h2
         start a/2 on h3",
    );
}

fn two_hosts_per_zone() -> Vec<HostInfo> {
    vec![
        host("h1", &["zone=a"]),
        host("h2", &["zone=a"]),
        host("h3", &["zone=b"]),
        host("h4", &["zone=b"]),
        host("h5", &["zone=c"]),
        host("h6", &["zone=c"]),
    ]
}

#[test]
fn spread_zone_over_two_hosts_per_zone() {
    let three = snapshot(two_hosts_per_zone(), vec![spread("a", 3, "zone")]);
    let plan = check(
        &three,
        "h1: a/0
         h2:
         h3: a/1
         h4:
         h5: a/2
         h6:
         start a/0 on h1
         start a/1 on h3
         start a/2 on h5",
    );
    assert_eq!(per_value(&three, &plan, "a", "zone"), "a=1 b=1 c=1");
}

#[test]
fn four_replicas_over_three_zones_go_two_one_one() {
    let four = snapshot(two_hosts_per_zone(), vec![spread("a", 4, "zone")]);
    let plan = check(
        &four,
        "h1: a/0
         h2: a/3
         h3: a/1
         h4:
         h5: a/2
         h6:
         start a/0 on h1
         start a/1 on h3
         start a/2 on h5
         start a/3 on h2",
    );
    let mut zones: Vec<String> = per_value(&four, &plan, "a", "zone")
        .split(' ')
        .map(|pair| pair[2..].to_string())
        .collect();
    zones.sort();
    assert_eq!(zones, ["1", "1", "2"]);
    // Within the zone holding two, they are on different hosts.
    assert!(counts(&plan, "a").iter().all(|&n| n <= 1));
    assert_eq!(max_domain_imbalance(&four, &plan), 1);
    assert_eq!(max_spread_imbalance(&four, &plan), 1);
}

#[test]
fn spread_over_zones_comes_before_spread_over_hosts() {
    // Zone b has one host, so it takes two replicas while hosts elsewhere
    // hold none: the label's values count first, hosts within each value.
    let hosts = vec![
        host("h1", &["zone=a"]),
        host("h2", &["zone=a"]),
        host("h3", &["zone=a"]),
        host("h4", &["zone=b"]),
        host("h5", &["zone=c"]),
        host("h6", &["zone=c"]),
    ];
    let six = snapshot(hosts, vec![spread("a", 6, "zone")]);
    let plan = check(
        &six,
        "h1: a/3
         h2: a/0
         h3:
         h4: a/1 a/5
         h5: a/2
         h6: a/4
         start a/0 on h2
         start a/1 on h4
         start a/2 on h5
         start a/3 on h1
         start a/4 on h6
         start a/5 on h4",
    );
    assert_eq!(per_value(&six, &plan, "a", "zone"), "a=2 b=2 c=2");
    assert_eq!(max_domain_imbalance(&six, &plan), 0);
    // Without `spread`, hosts count first and the zone only breaks ties.
    let plain = snapshot(six.hosts.clone(), vec![service("a", 6)]);
    let plan = reconcile(&plain);
    assert_eq!(per_value(&plain, &plan, "a", "zone"), "a=3 b=1 c=2");
}

#[test]
fn spread_over_a_label_only_some_hosts_have() {
    // Hosts without `rack` count together as one more value.
    let hosts = || {
        vec![
            host("h1", &["rack=r1"]),
            host("h2", &["rack=r2"]),
            host("h3", &[]),
            host("h4", &["zone=a"]),
        ]
    };
    let three = snapshot(hosts(), vec![spread("a", 3, "rack")]);
    let plan = check(
        &three,
        "h1: a/0
         h2: a/2
         h3:
         h4: a/1
         start a/0 on h1
         start a/1 on h4
         start a/2 on h2",
    );
    assert_eq!(per_value(&three, &plan, "a", "rack"), "-=1 r1=1 r2=1");
    let six = snapshot(hosts(), vec![spread("a", 6, "rack")]);
    let plan = check(
        &six,
        "h1: a/0 a/4
         h2: a/2 a/5
         h3: a/3
         h4: a/1
         start a/0 on h1
         start a/1 on h4
         start a/2 on h2
         start a/3 on h3
         start a/4 on h1
         start a/5 on h2",
    );
    assert_eq!(per_value(&six, &plan, "a", "rack"), "-=2 r1=2 r2=2");
}

#[test]
fn spread_with_a_label_constraint_counts_only_qualifying_hosts() {
    let mut ssd = spread("a", 4, "zone");
    ssd.placement.labels.insert("disk".into(), "ssd".into());
    let four = snapshot(
        vec![
            host("h1", &["zone=a", "disk=ssd"]),
            host("h2", &["zone=a"]),
            host("h3", &["zone=b", "disk=ssd"]),
            host("h4", &["zone=b", "disk=ssd"]),
            host("h5", &["zone=c"]),
        ],
        vec![ssd],
    );
    // Zone c has no ssd host, so the replicas split over zones a and b.
    let plan = check(
        &four,
        "h1: a/1 a/3
         h2:
         h3: a/0
         h4: a/2
         h5:
         start a/0 on h3
         start a/1 on h1
         start a/2 on h4
         start a/3 on h1",
    );
    assert_eq!(per_value(&four, &plan, "a", "zone"), "a=2 b=2 c=0");
}

#[test]
fn a_replica_on_a_down_host_moves_within_its_zone() {
    let mut hosts = two_hosts_per_zone();
    hosts[0].ready = false;
    check(
        &with_current(
            snapshot(hosts, vec![spread("a", 3, "zone")]),
            "h1: a/0; h3: a/1; h5: a/2",
        ),
        "h1:
         h2: a/0
         h3: a/1
         h4:
         h5: a/2
         h6:
         stop a/0 on h1
         start a/0 on h2",
    );
    // No other host in zone a: the replica goes to another zone (zone a is
    // no longer among the values of qualifying hosts).
    let mut down = vec![
        host("h1", &["zone=a"]),
        host("h3", &["zone=b"]),
        host("h4", &["zone=b"]),
        host("h5", &["zone=c"]),
    ];
    down[0].ready = false;
    let plan = check(
        &with_current(
            snapshot(down, vec![spread("a", 3, "zone")]),
            "h1: a/0; h3: a/1; h5: a/2",
        ),
        "h1:
         h3: a/1
         h4: a/0
         h5: a/2
         stop a/0 on h1
         start a/0 on h4",
    );
    assert!(plan.unplaceable.is_empty());
}

#[test]
fn a_full_zone_overflows_into_the_others() {
    let mut small = host("h1", &["zone=a"]);
    small.capacity.memory = ByteSize::gib(1);
    let mut medium = host("h2", &["zone=b"]);
    medium.capacity.memory = ByteSize::gib(3);
    check(
        &snapshot(vec![small, medium], vec![spread("a", 5, "zone")]),
        "h1: a/1
         h2: a/0 a/2 a/3
         start a/0 on h2
         start a/1 on h1
         start a/2 on h2
         start a/3 on h2
         unplaceable a/4: insufficient memory on 2 of 2 ready hosts (needs 1GiB, most free 0B)",
    );
}

#[test]
fn spread_keeps_running_replicas_where_they_are() {
    // Spread is honoured when placing; replicas that fit are never moved
    // to even the zones out.
    let hosts = vec![
        host("h1", &["zone=a"]),
        host("h2", &["zone=a"]),
        host("h3", &["zone=b"]),
    ];
    check(
        &with_current(
            snapshot(hosts.clone(), vec![spread("a", 2, "zone")]),
            "h1: a/0; h2: a/1",
        ),
        "h1: a/0
         h2: a/1
         h3:",
    );
    check(
        &with_current(
            snapshot(hosts, vec![spread("a", 3, "zone")]),
            "h1: a/0; h2: a/1",
        ),
        "h1: a/0
         h2: a/1
         h3: a/2
         start a/2 on h3",
    );
}

#[test]
fn simulated_spread_services_are_even_over_their_domains() {
    let snapshot = simulate(300, 300, 7, 3);
    assert!(
        snapshot
            .services
            .iter()
            .any(|s| s.spec.placement.spread.is_some())
    );
    let plan = reconcile(&snapshot);
    assert!(plan.unplaceable.is_empty());
    assert_eq!(max_domain_imbalance(&snapshot, &plan), 1);
    assert_eq!(max_spread_imbalance(&snapshot, &plan), 1);
    assert_settles(&snapshot, &plan);
}

/// A service with the default limits and memory request (8MiB).
fn default_service(name: &str, replicas: u32) -> ServiceSpec {
    let mut spec = ServiceSpec::new(name, Digest::of(name.as_bytes()));
    spec.replicas = replicas;
    spec
}

#[test]
fn default_requests_pack_many_services_where_caps_fit_two() {
    let mut two_gib = host("h1", &[]);
    two_gib.capacity.memory = ByteSize::gib(2);
    let defaults: Vec<ServiceSpec> = (0..60).map(|i| default_service(&format!("s{i}"), 1)).collect();
    let plan = reconcile(&snapshot(vec![two_gib.clone()], defaults));
    assert_eq!(plan.unplaceable, vec![], "60 services at 8MiB each fit in 2GiB (and 960 of 1024 slots)");
    assert_eq!(plan.assignments[&two_gib.id].len(), 60);
    // Requesting the cap times the concurrency, as every replica did before requests.
    let capped: Vec<ServiceSpec> = (0..60).map(|i| service(&format!("s{i}"), 1)).collect();
    let plan = reconcile(&snapshot(vec![two_gib.clone()], capped));
    assert_eq!(plan.assignments[&two_gib.id].len(), 2);
    assert_eq!(plan.unplaceable.len(), 58);
    assert_eq!(plan.unplaceable[0].reason, "insufficient memory on 1 of 1 ready hosts (needs 1GiB, most free 0B)");
}

#[test]
fn an_overcommit_ratio_scales_what_requests_may_add_up_to() {
    let mut h1 = host("h1", &[]);
    h1.capacity.memory = ByteSize::gib(2);
    check(
        &snapshot(vec![h1.clone()], vec![service("a", 3)]),
        "h1: a/0 a/1
         start a/0 on h1
         start a/1 on h1
         unplaceable a/2: insufficient memory on 1 of 1 ready hosts (needs 1GiB, most free 0B)",
    );
    h1.memory_overcommit = "1.5".parse().expect("a ratio");
    check(
        &snapshot(vec![h1.clone()], vec![service("a", 4)]),
        "h1: a/0 a/1 a/2
         start a/0 on h1
         start a/1 on h1
         start a/2 on h1
         unplaceable a/3: insufficient memory on 1 of 1 ready hosts (needs 1GiB, most free 0B)",
    );
}

#[test]
fn a_learned_peak_sizes_new_replicas_but_never_moves_kept_ones() {
    let mut h1 = host("h1", &[]);
    h1.capacity.memory = ByteSize::mib(100);
    let mut snap = snapshot(vec![h1], vec![default_service("a", 3)]);
    snap.services[0].memory_peak = Some(ByteSize::mib(40));
    // New replicas reserve the 40MiB peak, not the 8MiB request.
    check(
        &snap,
        "h1: a/0 a/1
         start a/0 on h1
         start a/1 on h1
         unplaceable a/2: insufficient memory on 1 of 1 ready hosts (needs 40MiB, most free 20MiB)",
    );
    // Replicas already running stay while their requests fit: three stay
    // where 3 x 40MiB would not fit, but a fourth is not placed beside them.
    let mut running = with_current(snap, "h1: a/0 a/1 a/2");
    running.services[0].replicas = 4;
    check(
        &running,
        "h1: a/0 a/1 a/2
         unplaceable a/3: insufficient memory on 1 of 1 ready hosts (needs 40MiB, most free 0B)",
    );
    // A peak below the request changes nothing: the request is the floor.
    let mut h1 = host("h1", &[]);
    h1.capacity.memory = ByteSize::mib(16);
    let mut low = snapshot(vec![h1], vec![default_service("a", 3)]);
    low.services[0].memory_peak = Some(ByteSize::mib(1));
    check(
        &low,
        "h1: a/0 a/1
         start a/0 on h1
         start a/1 on h1
         unplaceable a/2: insufficient memory on 1 of 1 ready hosts (needs 8MiB, most free 0B)",
    );
}

#[test]
fn placement_messages_print_sizes_in_human_units() {
    let mut h1 = host("h1", &[]);
    h1.capacity.memory = ByteSize(893_855_334);
    check(
        &snapshot(vec![h1], vec![service("a", 1)]),
        "h1:
         unplaceable a/0: insufficient memory on 1 of 1 ready hosts (needs 1GiB, most free 852.4MiB)",
    );
}

#[test]
fn services_at_zero_reserve_nothing() {
    let mut h1 = host("h1", &[]);
    h1.capacity.memory = ByteSize::gib(1);
    check(
        &snapshot(vec![h1], vec![service("idle", 0), service("b", 1)]),
        "h1: b/0
         start b/0 on h1",
    );
}
