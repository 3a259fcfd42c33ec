//! Table tests of the rollout planner and the failure decisions: each case
//! is a little cluster (replicas per revision and how they do), a policy
//! and a time, and the plan rendered as text. Sequences replay a whole
//! update: each plan's wanted counts are applied (new replicas start, then
//! become ready as the script says) and planned again.

use std::collections::BTreeMap;
use std::time::Duration;
use wharf_proto::{
    Amount, CanaryPolicy, Ejection, LatencyHistogram, RolloutPhase, RolloutPolicy, RolloutState, TrafficTarget,
};
use wharf_scheduler_core::{
    FailedReplica, ObservedReplica, ObservedState, ReplicaTraffic, RetryAction, RetryPolicy, RolloutInput, RolloutPlan,
    StepTraffic, outliers, plan_rollout, retry,
};

/// Replicas written `rev:state...` per revision, e.g. `1:RRRR 2:S` (R ready,
/// S starting, F failed once, 3 failed three times, L lost), index by position.
fn observed(text: &str) -> Vec<ObservedReplica> {
    let mut out = Vec::new();
    for group in text.split_whitespace() {
        let (revision, states) = group.split_once(':').expect("rev:states");
        let revision: u64 = revision.parse().expect("revision");
        for (replica, state) in states.chars().enumerate() {
            let state = match state {
                'R' => ObservedState::Ready,
                'S' => ObservedState::Starting,
                'L' => ObservedState::Lost { reason: "host h1 is down".into() },
                'F' | '1'..='9' => ObservedState::Failed {
                    failures: state.to_digit(10).unwrap_or(1),
                    since_ms: 0,
                    error: "secret db is granted to the service but does not exist".into(),
                },
                other => panic!("unknown state {other}"),
            };
            out.push(ObservedReplica { revision, replica: replica as u32, host: None, state });
        }
    }
    out
}

fn render(plan: &RolloutPlan) -> String {
    let wanted: Vec<String> = plan.wanted.iter().map(|(r, n)| format!("{r}:{n}")).collect();
    let traffic: Vec<String> = plan.state.traffic.iter().map(|w| format!("{}:{}%", w.revision, w.percent)).collect();
    let mut lines = vec![format!(
        "wanted {} | {} | stable {} | traffic {}",
        wanted.join(" "),
        plan.state.phase.as_str(),
        plan.state.stable,
        if traffic.is_empty() { "any".to_string() } else { traffic.join(" ") }
    )];
    lines.push(format!("message: {}", plan.state.message));
    lines.extend(plan.events.iter().map(|e| format!("event: {e}")));
    lines.join("\n")
}

struct Case {
    latest: u64,
    replicas: u32,
    policy: RolloutPolicy,
    traffic: Vec<TrafficTarget>,
    state: RolloutState,
    now_ms: u64,
}

impl Case {
    fn new(latest: u64, replicas: u32, stable: u64) -> Case {
        Case {
            latest,
            replicas,
            policy: RolloutPolicy::default(),
            traffic: Vec::new(),
            state: RolloutState { stable, latest: stable, ..RolloutState::default() },
            now_ms: 1_000,
        }
    }

    fn plan(&self, replicas: &str) -> RolloutPlan {
        self.plan_with(replicas, None)
    }

    fn plan_with(&self, replicas: &str, step: Option<(&StepTraffic, &StepTraffic)>) -> RolloutPlan {
        let observed = observed(replicas);
        plan_rollout(&RolloutInput {
            now_ms: self.now_ms,
            latest: self.latest,
            replicas: self.replicas,
            policy: &self.policy,
            traffic: &self.traffic,
            promoted: false,
            state: &self.state,
            observed: &observed,
            step_traffic: step,
        })
    }

    /// Plans, checks the rendering, and carries the state on.
    #[track_caller]
    fn check(&mut self, replicas: &str, expected: &str) -> RolloutPlan {
        let plan = self.plan(replicas);
        assert_eq!(render(&plan), trim(expected));
        self.state = plan.state.clone();
        plan
    }
}

fn trim(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("\n")
}

/// Replays a rolling update from `old` to `new` where every started replica
/// becomes ready before the next plan; returns each plan's wanted counts.
fn replay(case: &mut Case, ready: bool) -> Vec<String> {
    let mut running: BTreeMap<u64, u32> = BTreeMap::from([(case.state.stable, case.replicas)]);
    let mut steps = Vec::new();
    for _ in 0..20 {
        let text: Vec<String> = running
            .iter()
            .map(|(r, n)| format!("{r}:{}", (0..*n).map(|_| if ready || *r != case.latest { 'R' } else { 'S' }).collect::<String>()))
            .collect();
        let plan = case.plan(&text.join(" "));
        case.state = plan.state.clone();
        let wanted: Vec<String> = plan.wanted.iter().map(|(r, n)| format!("{r}:{n}")).collect();
        steps.push(wanted.join(" "));
        // Availability never drops below the wanted count (max_unavailable 0).
        let available: u32 = plan.wanted.iter().map(|(r, n)| if *r == case.latest { (*n).min(running.get(r).copied().unwrap_or(0)) } else { *n }).sum();
        assert!(available >= case.replicas - case.policy.unavailable(case.replicas), "{steps:?}");
        if plan.state.phase == RolloutPhase::Complete && plan.wanted.len() == 1 {
            break;
        }
        running = plan.wanted.clone();
    }
    steps
}

#[test]
fn a_first_deploy_starts_every_replica_then_completes() {
    let mut case = Case::new(1, 3, 0);
    case.check(
        "",
        "wanted 1:3 | progressing | stable 0 | traffic any
         message: rolling update to revision 1: 0 of 3 new replicas ready, 0 old replica(s) left
         event: rolling out revision 1 (the first)",
    );
    case.check(
        "1:RRR",
        "wanted 1:3 | complete | stable 1 | traffic any
         message: revision 1: 3 of 3 replicas ready
         event: revision 1 is rolled out: 3 replica(s) ready",
    );
    case.check("1:RRR", "wanted 1:3 | complete | stable 1 | traffic any\nmessage: revision 1: 3 of 3 replicas ready");
}

#[test]
fn a_rolling_update_surges_by_one_and_never_drops_below_the_count() {
    let mut case = Case::new(2, 4, 1);
    let steps = replay(&mut case, true);
    assert_eq!(steps, ["1:4 2:1", "1:3 2:2", "1:2 2:3", "1:1 2:4", "2:4", "2:4"][..steps.len()].to_vec());
    assert_eq!(case.state.stable, 2);
    assert_eq!(case.state.phase, RolloutPhase::Complete);
}

#[test]
fn surge_and_unavailability_follow_the_policy() {
    // 30 replicas: 25% surge is 8.
    let mut case = Case::new(2, 30, 1);
    let steps = replay(&mut case, true);
    assert_eq!(steps[0], "1:30 2:8");
    assert_eq!(steps[1], "1:22 2:16");
    // max_unavailable 2, no surge: two old go at once, two new take their place.
    let mut case = Case::new(2, 4, 1);
    case.policy.max_surge = Amount::Count(0);
    case.policy.max_unavailable = Amount::Count(2);
    let steps = replay(&mut case, true);
    assert_eq!(steps[0], "1:2 2:2");
    assert_eq!(steps[1], "2:4");
}

#[test]
fn new_replicas_that_are_not_ready_hold_the_old_ones() {
    let mut case = Case::new(2, 4, 1);
    case.check(
        "1:RRRR",
        "wanted 1:4 2:1 | progressing | stable 1 | traffic any
         message: rolling update to revision 2: 0 of 4 new replicas ready, 4 old replica(s) left
         event: rolling update from revision 1 to revision 2 started",
    );
    // Still starting: nothing more moves.
    case.check("1:RRRR 2:S", "wanted 1:4 2:1 | progressing | stable 1 | traffic any\nmessage: rolling update to revision 2: 0 of 4 new replicas ready, 4 old replica(s) left");
    // An old replica that is not ready is removed first, without waiting.
    case.check("1:RRRS 2:S", "wanted 1:3 2:2 | progressing | stable 1 | traffic any\nmessage: rolling update to revision 2: 0 of 4 new replicas ready, 3 old replica(s) left");
}

#[test]
fn a_failing_update_rolls_back_and_keeps_retrying_one_replica() {
    let mut case = Case::new(2, 4, 1);
    case.check("1:RRRR", "wanted 1:4 2:1 | progressing | stable 1 | traffic any\nmessage: rolling update to revision 2: 0 of 4 new replicas ready, 4 old replica(s) left\nevent: rolling update from revision 1 to revision 2 started");
    case.check(
        "1:RRRR 2:F",
        "wanted 1:4 2:1 | progressing | stable 1 | traffic any
         message: rolling update to revision 2: 0 of 4 new replicas ready, 4 old replica(s) left; a replica failed: secret db is granted to the service but does not exist",
    );
    case.check(
        "1:RRRR 2:3",
        "wanted 1:4 2:1 | failed | stable 1 | traffic 1:100%
         message: rollout of revision 2 failed: 3 attempt(s) of its replicas failed (the limit is 3): secret db is granted to the service but does not exist; rolled back to revision 1 (retrying one replica of revision 2)
         event: rollout of revision 2 failed: 3 attempt(s) of its replicas failed (the limit is 3): secret db is granted to the service but does not exist; rolling back to revision 1",
    );
    let failed = case.state.failed.clone().expect("failed");
    assert!(failed.rolled_back && failed.retrying);
    // Still failing: stays rolled back.
    case.now_ms += 60_000;
    let plan = case.check(
        "1:RRRR 2:5",
        "wanted 1:4 2:1 | failed | stable 1 | traffic 1:100%
         message: rollout of revision 2 failed: 3 attempt(s) of its replicas failed (the limit is 3): secret db is granted to the service but does not exist; rolled back to revision 1 (retrying one replica of revision 2)",
    );
    assert!(plan.events.is_empty());
    // The secret exists now: the retried replica is ready and the rollout resumes.
    case.check(
        "1:RRRR 2:R",
        "wanted 1:3 2:2 | progressing | stable 1 | traffic any
         message: rolling update to revision 2: 1 of 4 new replicas ready, 3 old replica(s) left
         event: revision 2 has a ready replica again; resuming its rollout",
    );
}

#[test]
fn a_rollout_that_makes_no_progress_fails_at_its_deadline() {
    let mut case = Case::new(2, 2, 1);
    case.policy.progress_deadline = Duration::from_secs(30);
    let plan = case.check("1:RR", "wanted 1:2 2:1 | progressing | stable 1 | traffic any\nmessage: rolling update to revision 2: 0 of 2 new replicas ready, 2 old replica(s) left\nevent: rolling update from revision 1 to revision 2 started");
    assert_eq!(plan.wake_at_ms, Some(31_000));
    case.now_ms = 31_000;
    case.check(
        "1:RR 2:L",
        "wanted 1:2 2:1 | failed | stable 1 | traffic 1:100%
         message: rollout of revision 2 failed: no new replica became ready for 30s (0 of 2 ready); host h1 is down; rolled back to revision 1 (retrying one replica of revision 2)
         event: rollout of revision 2 failed: no new replica became ready for 30s (0 of 2 ready); host h1 is down; rolling back to revision 1",
    );
}

#[test]
fn without_auto_rollback_a_failed_update_stays_where_it_stopped() {
    let mut case = Case::new(2, 4, 1);
    case.policy.auto_rollback = false;
    case.state.latest = 2;
    case.state.phase = RolloutPhase::Progressing;
    case.check(
        "1:RRR 2:R3",
        "wanted 1:3 2:2 | failed | stable 1 | traffic any
         message: rollout of revision 2 failed: 3 attempt(s) of its replicas failed (the limit is 3): secret db is granted to the service but does not exist
         event: rollout of revision 2 failed: 3 attempt(s) of its replicas failed (the limit is 3): secret db is granted to the service but does not exist",
    );
}

#[test]
fn going_back_to_the_stable_revision_drains_the_new_one_safely() {
    // An undo mid-update: the spec asks for revision 1 again.
    let mut case = Case::new(1, 4, 1);
    case.state.latest = 2;
    case.state.phase = RolloutPhase::Progressing;
    case.check(
        "1:RR 2:RRR",
        "wanted 1:4 2:2 | complete | stable 1 | traffic any
         message: revision 1: 2 of 4 replicas ready",
    );
    case.check("1:RRRR 2:RR", "wanted 1:4 | complete | stable 1 | traffic any\nmessage: revision 1: 4 of 4 replicas ready");
}

fn canary_case() -> Case {
    let mut case = Case::new(2, 4, 1);
    case.policy.canary = Some(CanaryPolicy { steps: vec![10, 50], interval: Duration::from_secs(10), ..CanaryPolicy::default() });
    case
}

fn traffic(requests: u64, errors: u64, micros: u64) -> StepTraffic {
    let mut latency = LatencyHistogram::default();
    for _ in 0..requests {
        latency.record(micros);
    }
    StepTraffic { requests, errors, latency }
}

#[test]
fn a_healthy_canary_is_promoted_step_by_step() {
    let mut case = canary_case();
    case.check(
        "1:RRRR",
        "wanted 1:4 2:1 | canary | stable 1 | traffic 1:100%
         message: canary step 1 of 2 (10%): waiting for 1 replica(s) of revision 2 (0 ready)
         event: canary from revision 1 to revision 2 started",
    );
    let plan = case.check(
        "1:RRRR 2:R",
        "wanted 1:4 2:1 | canary | stable 1 | traffic 1:90% 2:10%
         message: canary step 1 of 2: revision 2 takes 10% of requests
         event: canary step 1 of 2: revision 2 takes 10% of requests",
    );
    assert_eq!(plan.wake_at_ms, Some(11_000));
    case.now_ms = 11_000;
    let (canary, stable) = (traffic(50, 0, 1_000), traffic(450, 1, 1_000));
    let plan = case.plan_with("1:RRRR 2:R", Some((&canary, &stable)));
    assert_eq!(
        render(&plan),
        trim(
            "wanted 1:4 2:2 | canary | stable 1 | traffic 1:90% 2:10%
             message: canary step 2 of 2 (50%): waiting for 2 replica(s) of revision 2 (1 ready)
             event: canary step 1 (10%) passed: 50 requests, error rate 0.0% (stable 0.2%), p99 1.0ms (stable 1.0ms)"
        )
    );
    case.state = plan.state;
    case.check(
        "1:RRRR 2:RR",
        "wanted 1:4 2:2 | canary | stable 1 | traffic 1:50% 2:50%
         message: canary step 2 of 2: revision 2 takes 50% of requests
         event: canary step 2 of 2: revision 2 takes 50% of requests",
    );
    case.now_ms = 21_000;
    let (canary, stable) = (traffic(200, 0, 900), traffic(200, 0, 1_000));
    let plan = case.plan_with("1:RRRR 2:RR", Some((&canary, &stable)));
    assert_eq!(plan.state.phase, RolloutPhase::Progressing);
    assert_eq!(plan.state.traffic, vec![]);
    assert!(plan.events.iter().any(|e| e.contains("passed every step")), "{:?}", plan.events);
}

#[test]
fn a_canary_that_fails_its_requests_is_aborted_and_not_retried() {
    let mut case = canary_case();
    case.check("1:RRRR", "wanted 1:4 2:1 | canary | stable 1 | traffic 1:100%\nmessage: canary step 1 of 2 (10%): waiting for 1 replica(s) of revision 2 (0 ready)\nevent: canary from revision 1 to revision 2 started");
    case.check("1:RRRR 2:R", "wanted 1:4 2:1 | canary | stable 1 | traffic 1:90% 2:10%\nmessage: canary step 1 of 2: revision 2 takes 10% of requests\nevent: canary step 1 of 2: revision 2 takes 10% of requests");
    case.now_ms = 11_000;
    let (canary, stable) = (traffic(40, 40, 1_000), traffic(400, 0, 1_000));
    let plan = case.plan_with("1:RRRR 2:R", Some((&canary, &stable)));
    assert_eq!(
        render(&plan),
        trim(
            "wanted 1:4 | failed | stable 1 | traffic 1:100%
             message: rollout of revision 2 failed: step 1 (10%): error rate 100.0% is over the limit of 5% (40 of 40 requests failed; stable revision 0.0%); rolled back to revision 1
             event: canary of revision 2 aborted: step 1 (10%): error rate 100.0% is over the limit of 5% (40 of 40 requests failed; stable revision 0.0%); back to revision 1"
        )
    );
    let failed = plan.state.failed.clone().expect("failed");
    assert!(failed.rolled_back && !failed.retrying);
}

#[test]
fn a_slow_canary_is_aborted_on_latency() {
    let mut case = canary_case();
    case.state.latest = 2;
    case.state.phase = RolloutPhase::Canary;
    case.state.step_started_at_ms = 1_000;
    case.now_ms = 11_000;
    let (canary, stable) = (traffic(100, 0, 50_000), traffic(900, 0, 1_000));
    let plan = case.plan_with("1:RRRR 2:R", Some((&canary, &stable)));
    assert_eq!(plan.state.phase, RolloutPhase::Failed);
    assert!(plan.state.message.contains("p99 latency 64.0ms is over 200% of the stable revision's 1.0ms"), "{}", plan.state.message);
}

#[test]
fn an_explicit_split_gives_each_revision_its_share() {
    let mut case = Case::new(2, 10, 1);
    case.traffic = vec![
        TrafficTarget { revision: Some(1), latest: false, percent: 90 },
        TrafficTarget { revision: None, latest: true, percent: 10 },
    ];
    case.check(
        "1:RRRRRRRRRR",
        "wanted 1:9 2:1 | split | stable 1 | traffic 1:100%
         message: traffic split: revision 1 90%, revision 2 10% (revision 2 has no ready replica yet)
         event: rolling update from revision 1 to revision 2 started",
    );
    case.check(
        "1:RRRRRRRRRR 2:R",
        "wanted 1:9 2:1 | split | stable 1 | traffic 1:90% 2:10%
         message: traffic split: revision 1 90%, revision 2 10%",
    );
}

#[test]
fn retries_back_off_then_move_to_another_host() {
    let policy = RetryPolicy::default();
    let failed = |failures, since_ms, elsewhere| FailedReplica { failures, since_ms, assigned_attempt: 4, reported_attempt: 4, elsewhere };
    assert_eq!(retry(&policy, &failed(1, 10_000, true), 10_500), RetryAction::Wait { until_ms: Some(11_000) });
    assert_eq!(retry(&policy, &failed(1, 10_000, true), 11_000), RetryAction::Retry { attempt: 5 });
    assert_eq!(retry(&policy, &failed(2, 10_000, true), 11_500), RetryAction::Wait { until_ms: Some(12_000) });
    assert_eq!(retry(&policy, &failed(3, 10_000, true), 14_000), RetryAction::Move);
    assert_eq!(retry(&policy, &failed(3, 10_000, false), 14_000), RetryAction::Retry { attempt: 5 });
    // The host has not acted on the attempt yet: wait for it.
    let behind = FailedReplica { reported_attempt: 3, ..failed(1, 0, true) };
    assert_eq!(retry(&policy, &behind, 100_000), RetryAction::Wait { until_ms: None });
}

#[test]
fn outliers_are_ejected_only_against_healthy_siblings() {
    let policy = Ejection::default();
    let r = |requests, errors| ReplicaTraffic { requests, errors, ejected: false };
    // One replica fails everything, its siblings nothing.
    let ejected = outliers(&policy, &[r(30, 0), r(30, 30), r(30, 1)]);
    assert_eq!(ejected.len(), 1);
    assert_eq!(ejected[0].0, 1);
    assert_eq!(ejected[0].1, "30 of its 30 requests failed (100%) against 2% for the service's other replicas");
    // Every replica fails (a dependency is down): nobody is an outlier.
    assert_eq!(outliers(&policy, &[r(30, 30), r(30, 29), r(30, 30)]), vec![]);
    // Too few requests to judge.
    assert_eq!(outliers(&policy, &[r(30, 0), r(5, 5)]), vec![]);
    // A single replica has no sibling to compare with.
    assert_eq!(outliers(&policy, &[r(100, 100)]), vec![]);
    // At most half of the replicas, counting those already out.
    let out = ReplicaTraffic { ejected: true, ..r(30, 30) };
    assert_eq!(outliers(&policy, &[out, r(30, 30), r(100, 0)]), vec![]);
    assert_eq!(outliers(&policy, &[out, r(30, 30), r(100, 0), r(100, 0)]).len(), 1);
    // Off.
    assert_eq!(outliers(&Ejection { enabled: false, ..policy }, &[r(30, 0), r(30, 30)]), vec![]);
}
