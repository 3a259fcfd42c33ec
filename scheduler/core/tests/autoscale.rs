//! Table tests for the autoscaler: synthetic load, one sample and one
//! decision a second, each decision applied as the next current count.

use std::time::Duration;
use wharf_proto::ServiceId;
use wharf_proto::spec::Autoscale;
use wharf_scheduler_core::{Autoscaler, Decision};

fn service() -> ServiceId {
    ServiceId::new("default", "hello").expect("valid id")
}

/// The default policy (target 10 in flight, 30s stable window so a 3s panic
/// window, 10s scale-down delay, 30s to zero) between `min` and `max`.
fn policy(min: u32, max: u32) -> Autoscale {
    Autoscale::new(min, max)
}

/// Each request takes 100 ms, so requests per second are ten times the
/// requests in flight (Little's law).
const RPS_PER_IN_FLIGHT: f64 = 10.0;

/// Runs `seconds` seconds from `start` replicas: at second `s` it observes
/// `load(s)` in flight, decides, and takes the decision as the count.
/// Returns the decision of every second.
fn simulate(policy: &Autoscale, start: u32, seconds: u64, load: fn(u64) -> f64) -> Vec<Decision> {
    let mut autoscaler = Autoscaler::new();
    let id = service();
    let mut current = start;
    (0..seconds)
        .map(|s| {
            let in_flight = load(s);
            autoscaler.observe(&id, s * 1000, in_flight, in_flight * RPS_PER_IN_FLIGHT);
            let decision = autoscaler.decide(&id, policy, s * 1000, current);
            current = decision.replicas;
            decision
        })
        .collect()
}

/// Checks a simulation against `expect`: from each `(second, replicas)` on,
/// until the next entry, the count is `replicas`.
#[track_caller]
fn check(
    name: &str,
    policy: &Autoscale,
    start: u32,
    seconds: u64,
    load: fn(u64) -> f64,
    expect: &[(u64, u32)],
) {
    let trace = simulate(policy, start, seconds, load);
    let counts: Vec<u32> = trace.iter().map(|d| d.replicas).collect();
    let mut want = Vec::new();
    for (i, &(from, replicas)) in expect.iter().enumerate() {
        let until = expect.get(i + 1).map_or(seconds, |&(next, _)| next);
        want.extend((from..until).map(|_| replicas));
    }
    if counts != want {
        let changes: Vec<(usize, u32, &str)> = trace
            .iter()
            .enumerate()
            .filter(|&(s, d)| s == 0 || trace[s - 1].replicas != d.replicas)
            .map(|(s, d)| (s, d.replicas, d.reason.as_str()))
            .collect();
        panic!("{name}: got changes {changes:#?}\nwant {expect:?}");
    }
}

#[test]
fn steady_load_stays() {
    check("steady", &policy(1, 10), 3, 120, |_| 30.0, &[(0, 3)]);
    check(
        "steady, just under",
        &policy(1, 10),
        3,
        120,
        |_| 29.9,
        &[(0, 3)],
    );
}

#[test]
fn step_up_rises_at_once() {
    // Under twice the current count: the stable average rises, and every
    // higher count it wants is taken the same second.
    check(
        "small step",
        &policy(1, 10),
        4,
        60,
        |s| if s < 30 { 40.0 } else { 60.0 },
        &[(0, 4), (30, 5), (45, 6)],
    );
    // Twice the current count or more: the panic window sees it first.
    check(
        "big step",
        &policy(1, 10),
        2,
        90,
        |s| if s < 30 { 20.0 } else { 60.0 },
        &[(0, 2), (30, 4), (31, 5), (32, 6)],
    );
}

#[test]
fn burst_panics_and_does_not_scale_down_while_panicking() {
    check(
        "burst",
        &policy(1, 50),
        2,
        100,
        |s| if (30..35).contains(&s) { 200.0 } else { 20.0 },
        // Panic ends at 60, a stable window after the burst began; from then
        // on the count follows the stable average's wants (5, 4, 3, 2 from
        // seconds 60, 61, 63, 64) one scale-down delay late.
        &[
            (0, 2),
            (30, 8),
            (31, 14),
            (32, 20),
            (70, 5),
            (71, 4),
            (73, 3),
            (74, 2),
        ],
    );
    let trace = simulate(&policy(1, 50), 2, 100, |s| {
        if (30..35).contains(&s) { 200.0 } else { 20.0 }
    });
    let panicking: Vec<u64> = (0..100).filter(|&s| trace[s as usize].panicking).collect();
    assert_eq!(
        panicking,
        (30..60).collect::<Vec<_>>(),
        "panic lasts a stable window after the burst"
    );
    assert!(
        trace[30].reason.starts_with("panicking"),
        "{}",
        trace[30].reason
    );
}

#[test]
fn idle_falls_after_the_delay_to_min() {
    check(
        "idle",
        &policy(1, 10),
        5,
        80,
        |s| if s < 30 { 50.0 } else { 0.0 },
        // The stable average wants 4 from second 35, 3 from 41, 2 from 47 and
        // 1 from 53; each is taken one scale-down delay later.
        &[(0, 5), (45, 4), (51, 3), (57, 2), (63, 1)],
    );
    check(
        "idle, min 2",
        &policy(2, 10),
        5,
        120,
        |s| if s < 30 { 50.0 } else { 0.0 },
        &[(0, 5), (45, 4), (51, 3), (57, 2)],
    );
}

#[test]
fn scales_to_zero_after_the_idle_time_and_not_before() {
    // The last request is at second 29: idle from 30, zero at 60.
    check(
        "to zero",
        &policy(0, 10),
        1,
        120,
        |s| if s < 30 { 5.0 } else { 0.0 },
        &[(0, 1), (60, 0)],
    );
    let short = Autoscale {
        scale_to_zero_after: Duration::from_secs(5),
        ..policy(0, 10)
    };
    check(
        "short idle time",
        &short,
        1,
        60,
        |s| if s < 30 { 5.0 } else { 0.0 },
        &[(0, 1), (35, 0)],
    );
    // One request every 20 s keeps the service from ever being idle for 30 s.
    check(
        "sparse requests",
        &policy(0, 10),
        1,
        200,
        |s| if s % 20 == 0 { 1.0 } else { 0.0 },
        &[(0, 1)],
    );
}

#[test]
fn from_zero_demand_wants_a_replica_at_once() {
    // Requests held by the activator while no replica is ready count as load.
    check(
        "one request",
        &policy(0, 10),
        0,
        60,
        |s| if s < 10 { 0.0 } else { 1.0 },
        &[(0, 0), (10, 1)],
    );
    check(
        "burst from zero",
        &policy(0, 10),
        0,
        60,
        |s| if s < 10 { 0.0 } else { 50.0 },
        &[(0, 0), (10, 2), (11, 4), (12, 5)],
    );
    check(
        "idle at zero stays",
        &policy(0, 10),
        0,
        60,
        |_| 0.0,
        &[(0, 0)],
    );
    check("min above zero", &policy(2, 10), 0, 10, |_| 0.0, &[(0, 2)]);
}

#[test]
fn flapping_input_does_not_flap_the_count() {
    // After a steady start, load alternates around the same mean of 45.
    check(
        "flapping",
        &policy(1, 10),
        5,
        300,
        |s| match s {
            ..30 => 45.0,
            _ if s % 2 == 0 => 90.0,
            _ => 0.0,
        },
        &[(0, 5)],
    );
    check(
        "flapping in threes",
        &policy(1, 10),
        5,
        300,
        |s| match s {
            ..30 => 45.0,
            _ if s % 6 < 3 => 70.0,
            _ => 20.0,
        },
        &[(0, 5)],
    );
    // A mean right on a boundary (50 at 10 per replica): while the window
    // fills, the average swings between 50 and 51.7, so 6 is wanted every
    // other second. The count steps up once and, a delay after the window
    // settles on exactly 50, back down once; it does not follow the input.
    check(
        "flapping on a boundary",
        &policy(1, 10),
        5,
        300,
        |s| match s {
            ..30 => 50.0,
            _ if s % 2 == 0 => 100.0,
            _ => 0.0,
        },
        &[(0, 5), (30, 6), (69, 5)],
    );
    // A wide swing (150, 0, 150, ...; mean 75) from a steady 50: the count
    // climbs with the stable average as the window fills (6, 7, 8 when it
    // passes 50, 60, 70) and then never moves; the panic window's 100 is
    // less than twice the 6 already running, so it never panics.
    check(
        "flapping wildly",
        &policy(1, 50),
        5,
        300,
        |s| match s {
            ..30 => 50.0,
            _ if s % 2 == 0 => 150.0,
            _ => 0.0,
        },
        &[(0, 5), (30, 6), (40, 7), (52, 8)],
    );
}

#[test]
fn a_host_vanishing_mid_window_does_not_scale_down_at_once() {
    // Three hosts share 60 in flight; one stops reporting for 8 seconds.
    check(
        "host gone and back",
        &policy(1, 10),
        6,
        120,
        |s| if (40..48).contains(&s) { 40.0 } else { 60.0 },
        &[(0, 6)],
    );
    // Two of the three hosts are gone for good, and their load with them:
    // nothing happens for the delay after the average first wants fewer.
    check(
        "hosts gone",
        &policy(1, 10),
        6,
        120,
        |s| if s < 40 { 60.0 } else { 20.0 },
        &[(0, 6), (57, 5), (64, 4), (72, 3), (79, 2)],
    );
}

#[test]
fn counts_are_clamped_to_min_and_max() {
    check("at max", &policy(1, 4), 2, 60, |_| 100.0, &[(0, 4)]);
    check(
        "over a lowered max",
        &policy(1, 4),
        8,
        10,
        |_| 80.0,
        &[(0, 4)],
    );
    check(
        "under a raised min",
        &policy(3, 10),
        1,
        10,
        |_| 10.0,
        &[(0, 3)],
    );
    let trace = simulate(&policy(1, 4), 2, 5, |_| 100.0);
    assert!(
        trace[0].reason.contains("clamped to 1..=4"),
        "{}",
        trace[0].reason
    );
}

#[test]
fn either_target_reads_its_own_metric() {
    // 30 in flight is 300 requests/s.
    let concurrency = Autoscale {
        target_concurrency: Some(10),
        ..policy(1, 20)
    };
    let rps = Autoscale {
        target_rps: Some(50),
        ..policy(1, 20)
    };
    check("concurrency", &concurrency, 3, 60, |_| 30.0, &[(0, 3)]);
    check("rps", &rps, 6, 60, |_| 30.0, &[(0, 6)]);
    check("rps step up", &rps, 3, 60, |_| 30.0, &[(0, 6)]);
    let trace = simulate(&rps, 6, 3, |_| 30.0);
    assert_eq!(trace[2].stable_load, 300.0);
    assert!(
        trace[2].reason.contains("requests/s"),
        "{}",
        trace[2].reason
    );
}

#[test]
fn without_samples_the_current_count_is_kept() {
    let mut autoscaler = Autoscaler::new();
    let id = service();
    let decision = autoscaler.decide(&id, &policy(1, 10), 0, 3);
    assert_eq!(decision.replicas, 3);
    assert_eq!(
        (
            decision.stable_load,
            decision.panic_load,
            decision.panicking
        ),
        (0.0, 0.0, false)
    );
    assert_eq!(autoscaler.decide(&id, &policy(1, 2), 0, 3).replicas, 2);
    assert_eq!(autoscaler.decide(&id, &policy(0, 10), 0, 0).replicas, 0);
    // Samples older than the stable window no longer count.
    autoscaler.observe(&id, 0, 100.0, 1000.0);
    assert_eq!(
        autoscaler.decide(&id, &policy(1, 10), 30_000, 3).replicas,
        3
    );
}

#[test]
fn services_are_independent_and_forgotten() {
    let mut autoscaler = Autoscaler::new();
    let (a, b) = (
        service(),
        ServiceId::new("default", "other").expect("valid id"),
    );
    autoscaler.observe(&a, 0, 50.0, 500.0);
    assert_eq!(autoscaler.decide(&a, &policy(1, 10), 0, 5).replicas, 5);
    assert_eq!(autoscaler.decide(&b, &policy(1, 10), 0, 2).replicas, 2);
    autoscaler.forget(&a);
    assert_eq!(autoscaler.decide(&a, &policy(1, 10), 1000, 3).replicas, 3);
}

#[test]
fn odd_samples_are_harmless() {
    let mut autoscaler = Autoscaler::new();
    let id = service();
    autoscaler.observe(&id, 0, f64::NAN, -5.0);
    let decision = autoscaler.decide(&id, &policy(1, 10), 0, 2);
    assert_eq!((decision.replicas, decision.stable_load), (2, 0.0));
    autoscaler.observe(&id, 1000, f64::INFINITY, 0.0);
    assert_eq!(autoscaler.decide(&id, &policy(1, 10), 1000, 2).replicas, 10);
}
