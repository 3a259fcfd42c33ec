//! Rollouts as a pure decision: from what runs (each replica's revision and
//! state), the policy, the persisted [`RolloutState`] and `now`, how many
//! replicas each revision of a service should run, how traffic is split
//! between them, and the next state. The controller persists the state,
//! places the replicas and writes the split; it calls [`plan_rollout`] again
//! on every change and at the [`RolloutPlan::wake_at_ms`] it asks for.
//!
//! The shapes, in the order [`plan_rollout`] tries them:
//!
//! - **Split**: the spec names a traffic split (`traffic:`); each revision
//!   named gets its share of the replicas (at least one) and of the
//!   requests. Nothing rolls on its own.
//! - **Failed**: the rollout to `latest` failed. With `auto_rollback` (the
//!   default) and a stable revision to go back to, the stable revision runs
//!   every replica and takes all traffic; when the failure was one of
//!   loading or readiness, one replica of `latest` is kept and retried with
//!   backoff, and the rollout resumes by itself once it becomes ready.
//! - **Canary** (`rollout.canary` set): `latest` takes each step's percent
//!   of the requests on replicas of its own, beside a full stable revision;
//!   after each step its error rate and p99 latency are judged against the
//!   stable revision's; a step that fails aborts and rolls back; after the
//!   last step, the rest is rolled.
//! - **Rolling**: as a Kubernetes Deployment: new replicas start while the
//!   total stays within `replicas + max_surge`; old ones stop only while
//!   `replicas - max_unavailable` replicas stay ready. Old revisions lose
//!   their highest indices first, so a count can only drop where every
//!   replica kept is counted as it is (a failed old replica with a low index
//!   waits for its revision to empty).
//!
//! A rollout fails when `failure_threshold` attempts of `latest`'s replicas
//! have failed (loads, readiness checks), or when no replica of `latest`
//! became ready for `progress_deadline`.

use std::collections::BTreeMap;
use wharf_proto::{
    CanaryPolicy, FailedRollout, HostId, LatencyHistogram, RolloutPhase, RolloutPolicy, RolloutState, TrafficTarget,
    TrafficWeight,
};

/// One replica of a service as the controller sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedReplica {
    /// Its revision.
    pub revision: u64,
    /// Its index in the revision.
    pub replica: u32,
    /// The host it is assigned to, if any.
    pub host: Option<HostId>,
    /// How it is doing.
    pub state: ObservedState,
}

/// How a replica is doing, from its host's heartbeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObservedState {
    /// Assigned, and loading or being checked (or not reported yet).
    Starting,
    /// Serving.
    Ready,
    /// Failed `failures` times on its host (loads or readiness checks);
    /// the last failure was first seen at `since_ms`.
    Failed {
        /// Failed attempts on its host.
        failures: u32,
        /// When the controller first saw the last failure.
        since_ms: u64,
        /// What failed.
        error: String,
    },
    /// Its host is down, or no host can take it (`reason`).
    Lost {
        /// Why.
        reason: String,
    },
}

/// Requests one revision served over a canary step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepTraffic {
    /// Requests served.
    pub requests: u64,
    /// Of those, failed (traps, limits, deadlines, 5xx).
    pub errors: u64,
    /// Their durations.
    pub latency: LatencyHistogram,
}

/// What [`plan_rollout`] reads.
#[derive(Clone, Debug)]
pub struct RolloutInput<'a> {
    /// Now, in milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// The revision the spec asks for.
    pub latest: u64,
    /// Replicas wanted (the spec's count, or the autoscaler's).
    pub replicas: u32,
    /// The spec's rollout policy.
    pub policy: &'a RolloutPolicy,
    /// The spec's explicit traffic split, if any.
    pub traffic: &'a [TrafficTarget],
    /// `latest`'s canary was promoted by hand: roll it out without more analysis.
    pub promoted: bool,
    /// The state as last planned (the default for a new service).
    pub state: &'a RolloutState,
    /// Every replica of the service that is assigned or wanted, any revision.
    pub observed: &'a [ObservedReplica],
    /// For a canary step that has started: the canary's and the stable
    /// revision's requests since it started.
    pub step_traffic: Option<(&'a StepTraffic, &'a StepTraffic)>,
}

/// What [`plan_rollout`] decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutPlan {
    /// Replicas each revision should run; revisions not listed run none.
    pub wanted: BTreeMap<u64, u32>,
    /// The next state (persist it when it differs from the input's).
    pub state: RolloutState,
    /// What changed and why, one sentence each, for logs and events.
    pub events: Vec<String>,
    /// When to plan again even if nothing changes (a deadline, a backoff, a step's end).
    pub wake_at_ms: Option<u64>,
}

/// How many replicas of each revision there are, and how they do.
#[derive(Clone, Debug, Default)]
struct Census {
    assigned: u32,
    ready: u32,
    /// Failed attempts over its replicas.
    failures: u32,
    /// The error of one failed replica, for messages.
    last_error: Option<String>,
    /// Why one replica is lost, for messages.
    lost: Option<String>,
    /// Ready replicas among the lowest `n` indices, by `n`: `ready_below[n]`.
    ready_below: Vec<u32>,
}

fn census(observed: &[ObservedReplica]) -> BTreeMap<u64, Census> {
    let mut by_revision: BTreeMap<u64, Census> = BTreeMap::new();
    let mut ready_at: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for replica in observed {
        let entry = by_revision.entry(replica.revision).or_default();
        entry.assigned += 1;
        match &replica.state {
            ObservedState::Ready => {
                entry.ready += 1;
                ready_at.entry(replica.revision).or_default().push(replica.replica);
            }
            ObservedState::Failed { failures, error, .. } => {
                entry.failures += failures;
                entry.last_error = Some(error.clone());
            }
            ObservedState::Lost { reason } => entry.lost = Some(reason.clone()),
            ObservedState::Starting => {}
        }
    }
    for (revision, entry) in &mut by_revision {
        let ready = ready_at.remove(revision).unwrap_or_default();
        let top = ready.iter().copied().max().map_or(0, |m| m as usize + 1).max(entry.assigned as usize);
        entry.ready_below = (0..=top).map(|n| ready.iter().filter(|&&r| (r as usize) < n).count() as u32).collect();
    }
    by_revision
}

impl Census {
    /// Ready replicas kept when the revision runs only `count` (its lowest indices).
    fn ready_if_kept(&self, count: u32) -> u32 {
        let n = (count as usize).min(self.ready_below.len().saturating_sub(1));
        self.ready_below.get(n).copied().unwrap_or(0)
    }
}

/// Plans the next step of a service's rollout (see the module docs).
pub fn plan_rollout(input: &RolloutInput<'_>) -> RolloutPlan {
    let mut planner = Planner {
        input,
        census: census(input.observed),
        state: input.state.clone(),
        events: Vec::new(),
        wake_at_ms: None,
        resumed: false,
    };
    let wanted = planner.plan();
    RolloutPlan { wanted, state: planner.state, events: planner.events, wake_at_ms: planner.wake_at_ms }
}

struct Planner<'a, 'b> {
    input: &'b RolloutInput<'a>,
    census: BTreeMap<u64, Census>,
    state: RolloutState,
    events: Vec<String>,
    wake_at_ms: Option<u64>,
    /// A failed rollout resumed in this plan (at most once).
    resumed: bool,
}

impl Planner<'_, '_> {
    fn plan(&mut self) -> BTreeMap<u64, u32> {
        let latest = self.input.latest;
        let now = self.input.now_ms;
        if self.state.latest != latest {
            self.begin();
        }
        let ready_latest = self.of(latest).ready;
        if ready_latest > self.state_ready_latest() {
            self.state.progressed_at_ms = now;
        }
        if !self.input.traffic.is_empty() {
            return self.split();
        }
        if self.state.phase == RolloutPhase::Failed && self.state.failed.as_ref().is_some_and(|f| f.revision == latest) {
            return self.failed();
        }
        if self.state.stable == latest {
            return self.settle();
        }
        if let Some(canary) = &self.input.policy.canary
            && !self.input.promoted
            && self.state.stable != 0
            && self.input.replicas > 0
            && self.state.phase != RolloutPhase::Progressing
        {
            return self.canary(canary);
        }
        self.rolling()
    }

    /// A new rollout to `latest` begins.
    fn begin(&mut self) {
        let now = self.input.now_ms;
        let latest = self.input.latest;
        let from = self.state.stable;
        self.state.latest = latest;
        self.state.started_at_ms = now;
        self.state.progressed_at_ms = now;
        self.state.failed = None;
        self.state.step = 0;
        self.state.step_started_at_ms = 0;
        self.state.ready = 0;
        self.state.phase = if from == latest { RolloutPhase::Complete } else { RolloutPhase::Progressing };
        let canary = self.input.policy.canary.is_some() && from != 0 && from != latest && self.input.traffic.is_empty();
        if canary {
            self.state.phase = RolloutPhase::Canary;
        }
        if from == 0 {
            self.event(format!("rolling out revision {latest} (the first)"));
        } else if from != latest {
            let how = if canary { "canary" } else { "rolling update" };
            self.event(format!("{how} from revision {from} to revision {latest} started"));
        }
    }

    fn state_ready_latest(&self) -> u32 {
        self.state.ready
    }

    fn of(&self, revision: u64) -> Census {
        self.census.get(&revision).cloned().unwrap_or_default()
    }

    fn event(&mut self, text: String) {
        self.events.push(text);
    }

    fn wake(&mut self, at_ms: u64) {
        self.wake_at_ms = Some(self.wake_at_ms.map_or(at_ms, |w| w.min(at_ms)));
    }

    /// Records what the plan leaves and returns `wanted`.
    fn finish(&mut self, wanted: BTreeMap<u64, u32>, phase: RolloutPhase, message: String) -> BTreeMap<u64, u32> {
        self.state.ready = self.of(self.input.latest).ready;
        self.state.phase = phase;
        self.state.message = message;
        wanted.into_iter().filter(|(_, count)| *count > 0).collect()
    }

    /// The spec splits traffic explicitly.
    fn split(&mut self) -> BTreeMap<u64, u32> {
        let replicas = self.input.replicas;
        let mut wanted = BTreeMap::new();
        let mut weights = Vec::new();
        for target in self.input.traffic {
            let revision = if target.latest { self.input.latest } else { target.revision.unwrap_or(self.input.latest) };
            let count = if target.percent == 0 || replicas == 0 {
                0
            } else {
                (u64::from(replicas) * u64::from(target.percent)).div_ceil(100).max(1) as u32
            };
            *wanted.entry(revision).or_insert(0) += count;
            weights.push(TrafficWeight { revision, percent: target.percent });
        }
        // Only revisions with a ready replica take requests; the others'
        // share goes to the rest until they are ready, so no request is sent
        // where nothing can answer it.
        let serving: Vec<TrafficWeight> =
            weights.iter().copied().filter(|w| w.percent > 0 && self.of(w.revision).ready > 0).collect();
        self.state.traffic = normalise(serving);
        self.state.failed = None;
        let described: Vec<String> = weights.iter().map(|w| format!("revision {} {}%", w.revision, w.percent)).collect();
        let waiting: Vec<String> = weights
            .iter()
            .filter(|w| w.percent > 0 && self.of(w.revision).ready == 0)
            .map(|w| format!("revision {} has no ready replica yet", w.revision))
            .collect();
        let mut message = format!("traffic split: {}", described.join(", "));
        if !waiting.is_empty() {
            message.push_str(&format!(" ({})", waiting.join("; ")));
        }
        self.finish(wanted, RolloutPhase::Split, message)
    }

    /// `latest` is what runs: every replica, all traffic.
    fn settle(&mut self) -> BTreeMap<u64, u32> {
        let latest = self.input.latest;
        let replicas = self.input.replicas;
        let ready = self.of(latest).ready;
        self.state.traffic.clear();
        self.state.failed = None;
        // Other revisions' replicas left over (from a rollback, an undo)
        // stop only while enough of `latest` stays ready.
        let keep = BTreeMap::from([(latest, replicas)]);
        let mut wanted = self.scale_down_old(&keep, replicas, ready);
        wanted.extend(keep);
        let message = if ready >= replicas {
            format!("revision {latest}: {ready} of {replicas} replicas ready")
        } else {
            format!("revision {latest}: {ready} of {replicas} replicas ready{}", self.why_not_ready(latest))
        };
        self.finish(wanted, RolloutPhase::Complete, message)
    }

    /// The rollout to `latest` failed: hold the stable revision (see the module docs).
    fn failed(&mut self) -> BTreeMap<u64, u32> {
        let latest = self.input.latest;
        let stable = self.state.stable;
        let replicas = self.input.replicas;
        let Some(failed) = self.state.failed.clone() else { return self.rolling() };
        let now_latest = self.of(latest);
        let ready_latest = now_latest.ready;
        // The retried replica is ready and none is failing: the cause is
        // gone. (Once per plan: a rollout that fails again stays failed.)
        if failed.retrying && ready_latest > 0 && now_latest.failures == 0 && !self.resumed {
            self.resumed = true;
            self.event(format!("revision {latest} has a ready replica again; resuming its rollout"));
            self.state.failed = None;
            self.state.progressed_at_ms = self.input.now_ms;
            self.state.started_at_ms = self.input.now_ms;
            self.state.phase = RolloutPhase::Progressing;
            return self.rolling();
        }
        if stable == 0 && ready_latest >= replicas {
            return self.promote_to_stable();
        }
        // Rolled back: every request to the stable revision, even while a
        // replica of the failed one is still stopping or being retried.
        self.state.traffic =
            if failed.rolled_back { vec![TrafficWeight { revision: stable, percent: 100 }] } else { Vec::new() };
        let wanted = if failed.rolled_back {
            let mut wanted = BTreeMap::from([(stable, replicas)]);
            if failed.retrying {
                wanted.insert(latest, 1);
            }
            wanted
        } else {
            // Stopped where it failed: keep every replica as it is.
            let mut wanted: BTreeMap<u64, u32> = self.census.iter().map(|(r, c)| (*r, c.assigned)).collect();
            if stable == 0 || wanted.is_empty() {
                wanted.insert(latest, replicas);
            }
            wanted
        };
        let message = if failed.rolled_back {
            format!(
                "rollout of revision {latest} failed: {}; rolled back to revision {stable}{}",
                failed.reason,
                if failed.retrying { format!(" (retrying one replica of revision {latest})") } else { String::new() }
            )
        } else {
            format!("rollout of revision {latest} failed: {}", failed.reason)
        };
        self.finish(wanted, RolloutPhase::Failed, message)
    }

    /// Every replica of `latest` is ready and no other revision runs: it is the stable revision now.
    fn promote_to_stable(&mut self) -> BTreeMap<u64, u32> {
        let latest = self.input.latest;
        let replicas = self.input.replicas;
        let from = self.state.stable;
        self.state.stable = latest;
        self.state.failed = None;
        self.state.traffic.clear();
        if from != latest {
            self.event(format!("revision {latest} is rolled out: {replicas} replica(s) ready"));
        }
        let ready = self.of(latest).ready;
        self.finish(BTreeMap::from([(latest, replicas)]), RolloutPhase::Complete, format!("revision {latest}: {ready} of {replicas} replicas ready"))
    }

    /// A rolling update from every other revision to `latest`.
    fn rolling(&mut self) -> BTreeMap<u64, u32> {
        let latest = self.input.latest;
        let replicas = self.input.replicas;
        let policy = self.input.policy;
        let new = self.of(latest);
        let old_assigned: u32 = self.census.iter().filter(|(r, _)| **r != latest).map(|(_, c)| c.assigned).sum();
        if new.ready >= replicas && old_assigned == 0 && new.assigned <= replicas {
            return self.promote_to_stable();
        }
        if let Some(failure) = self.failure() {
            return self.fail(failure);
        }
        // Old revisions shrink first, while enough replicas stay ready;
        // then the new one grows into the room left under the surge.
        let keep = BTreeMap::from([(latest, new.assigned.min(replicas))]);
        let old = self.scale_down_old(&keep, replicas, new.ready);
        let old_total: u32 = old.values().sum();
        let max_total = replicas + policy.surge(replicas);
        let room = max_total.saturating_sub(old_total + new.assigned);
        let new_target = (new.assigned + room).min(replicas).max(new.assigned.min(replicas));
        let mut wanted = BTreeMap::from([(latest, new_target)]);
        wanted.extend(old);
        self.state.traffic.clear();
        let message = format!(
            "rolling update to revision {latest}: {} of {replicas} new replicas ready, {} old replica(s) left{}",
            new.ready,
            wanted.iter().filter(|(r, _)| **r != latest).map(|(_, c)| c).sum::<u32>(),
            if new.ready < new_target { self.why_not_ready(latest) } else { String::new() }
        );
        self.wake(self.state.progressed_at_ms.saturating_add(duration_ms(policy.progress_deadline)));
        self.finish(wanted, RolloutPhase::Progressing, message)
    }

    /// How far the revisions not in `keep` may shrink while `replicas -
    /// max_unavailable` replicas stay ready, counting `new_ready` ready
    /// replicas of the revisions kept. Each loses its highest indices first;
    /// intermediate revisions shrink before the stable one. A replica that
    /// is not ready always goes; a ready one only while enough stay ready.
    fn scale_down_old(&self, keep: &BTreeMap<u64, u32>, replicas: u32, new_ready: u32) -> BTreeMap<u64, u32> {
        let min_available = replicas.saturating_sub(self.input.policy.unavailable(replicas));
        let stable = self.state.stable;
        let mut old: Vec<(u64, &Census, u32)> =
            self.census.iter().filter(|(r, _)| !keep.contains_key(r)).map(|(r, c)| (*r, c, c.assigned)).collect();
        old.sort_by_key(|(revision, _, _)| (*revision == stable, *revision));
        let mut old_ready: u32 = old.iter().map(|(_, c, n)| c.ready_if_kept(*n)).sum();
        for (_, census, count) in &mut old {
            while *count > 0 {
                let lost = census.ready_if_kept(*count) - census.ready_if_kept(*count - 1);
                if lost > 0 && new_ready + old_ready - lost < min_available {
                    break;
                }
                *count -= 1;
                old_ready -= lost;
            }
        }
        old.into_iter().map(|(revision, _, count)| (revision, count)).collect()
    }

    /// Whether the rollout to `latest` has failed, and why.
    fn failure(&self) -> Option<String> {
        let latest = self.input.latest;
        let policy = self.input.policy;
        let new = self.of(latest);
        if new.failures >= policy.failure_threshold {
            return Some(format!(
                "{} attempt(s) of its replicas failed (the limit is {}): {}",
                new.failures,
                policy.failure_threshold,
                new.last_error.as_deref().unwrap_or("no error reported")
            ));
        }
        let deadline = self.state.progressed_at_ms.saturating_add(duration_ms(policy.progress_deadline));
        if self.input.now_ms >= deadline && new.ready < self.input.replicas {
            return Some(format!(
                "no new replica became ready for {} ({} of {} ready){}",
                wharf_proto::units::format_duration(policy.progress_deadline),
                new.ready,
                self.input.replicas,
                self.why_not_ready(latest)
            ));
        }
        None
    }

    /// Fails the rollout to `latest` with `reason` (see the module docs).
    fn fail(&mut self, reason: String) -> BTreeMap<u64, u32> {
        let latest = self.input.latest;
        let stable = self.state.stable;
        let rolled_back = self.input.policy.auto_rollback && stable != 0 && stable != latest;
        // A failure to load or become ready may go away by itself (a secret
        // created, a host back): keep trying one replica.
        let retrying = true;
        self.state.failed = Some(FailedRollout { revision: latest, reason: reason.clone(), at_ms: self.input.now_ms, rolled_back, retrying });
        self.state.phase = RolloutPhase::Failed;
        if rolled_back {
            self.event(format!("rollout of revision {latest} failed: {reason}; rolling back to revision {stable}"));
        } else {
            self.event(format!("rollout of revision {latest} failed: {reason}"));
        }
        self.failed()
    }

    /// Aborts a canary that failed its analysis: back to the stable
    /// revision, not retried (its requests failed, not its start).
    fn abort_canary(&mut self, reason: String) -> BTreeMap<u64, u32> {
        let latest = self.input.latest;
        let stable = self.state.stable;
        self.state.failed =
            Some(FailedRollout { revision: latest, reason: reason.clone(), at_ms: self.input.now_ms, rolled_back: true, retrying: false });
        self.state.phase = RolloutPhase::Failed;
        self.event(format!("canary of revision {latest} aborted: {reason}; back to revision {stable}"));
        self.failed()
    }

    /// One canary step (see the module docs).
    fn canary(&mut self, policy: &CanaryPolicy) -> BTreeMap<u64, u32> {
        let latest = self.input.latest;
        let stable = self.state.stable;
        let replicas = self.input.replicas;
        let now = self.input.now_ms;
        if let Some(failure) = self.failure() {
            return self.fail(failure);
        }
        let step = (self.state.step as usize).min(policy.steps.len().saturating_sub(1));
        let percent = policy.steps[step];
        let canaries = (u64::from(replicas) * u64::from(percent)).div_ceil(100).max(1) as u32;
        let new = self.of(latest);
        let wanted = BTreeMap::from([(stable, replicas), (latest, canaries)]);
        if new.ready < canaries {
            // The step starts once its canary replicas are ready; until
            // then the last step's split holds (all to the stable revision
            // before the first), so no unjudged share reaches the canary.
            self.state.step_started_at_ms = 0;
            let before = if step == 0 || new.ready == 0 { 0 } else { policy.steps[step - 1] };
            self.state.traffic = normalise(
                [TrafficWeight { revision: stable, percent: 100 - before }, TrafficWeight { revision: latest, percent: before }]
                    .into_iter()
                    .filter(|w| w.percent > 0)
                    .collect(),
            );
            self.wake(self.state.progressed_at_ms.saturating_add(duration_ms(self.input.policy.progress_deadline)));
            let message = format!(
                "canary step {} of {} ({percent}%): waiting for {canaries} replica(s) of revision {latest} ({} ready){}",
                step + 1,
                policy.steps.len(),
                new.ready,
                self.why_not_ready(latest)
            );
            return self.finish(wanted, RolloutPhase::Canary, message);
        }
        self.state.traffic =
            vec![TrafficWeight { revision: stable, percent: 100 - percent }, TrafficWeight { revision: latest, percent }];
        if self.state.step_started_at_ms == 0 {
            self.state.step_started_at_ms = now;
            self.event(format!("canary step {} of {}: revision {latest} takes {percent}% of requests", step + 1, policy.steps.len()));
        }
        let interval = duration_ms(policy.interval);
        let step_end = self.state.step_started_at_ms.saturating_add(interval);
        let message = format!("canary step {} of {}: revision {latest} takes {percent}% of requests", step + 1, policy.steps.len());
        if now < step_end {
            self.wake(step_end);
            return self.finish(wanted, RolloutPhase::Canary, message);
        }
        let Some((canary, baseline)) = self.input.step_traffic else {
            // Nothing measured (a new leader): measure from now.
            self.state.step_started_at_ms = now;
            self.wake(now.saturating_add(interval));
            return self.finish(wanted, RolloutPhase::Canary, message);
        };
        if canary.requests < u64::from(policy.min_requests) && now < self.state.step_started_at_ms.saturating_add(4 * interval) {
            self.wake(now.saturating_add(interval));
            let message = format!("{message}; waiting for traffic ({} of {} requests)", canary.requests, policy.min_requests);
            return self.finish(wanted, RolloutPhase::Canary, message);
        }
        if let Some(reason) = judge(policy, canary, baseline) {
            return self.abort_canary(format!("step {} ({percent}%): {reason}", step + 1));
        }
        self.event(format!("canary step {} ({percent}%) passed: {}", step + 1, describe_step(canary, baseline)));
        self.state.step += 1;
        self.state.step_started_at_ms = 0;
        self.state.progressed_at_ms = now;
        if self.state.step as usize >= policy.steps.len() {
            self.event(format!("canary of revision {latest} passed every step; rolling it out"));
            self.state.phase = RolloutPhase::Progressing;
            return self.rolling();
        }
        self.canary(policy)
    }

    /// Why `revision`'s replicas are not ready, for messages: `; <reason>`.
    fn why_not_ready(&self, revision: u64) -> String {
        let census = self.of(revision);
        match (census.last_error, census.lost) {
            (Some(error), _) => format!("; a replica failed: {error}"),
            (None, Some(lost)) => format!("; {lost}"),
            (None, None) => String::new(),
        }
    }
}

/// Whether a canary step fails, and why: its error rate above the limit, or
/// its p99 latency above the limit relative to the stable revision's.
fn judge(policy: &CanaryPolicy, canary: &StepTraffic, stable: &StepTraffic) -> Option<String> {
    if canary.requests > 0 {
        let rate = canary.errors as f64 * 100.0 / canary.requests as f64;
        if rate > f64::from(policy.max_error_rate) {
            return Some(format!(
                "error rate {rate:.1}% is over the limit of {}% ({} of {} requests failed; stable revision {})",
                policy.max_error_rate,
                canary.errors,
                canary.requests,
                error_rate(stable)
            ));
        }
    }
    if stable.requests >= u64::from(policy.min_requests)
        && let (Some(canary_p99), Some(stable_p99)) = (canary.latency.quantile_micros(0.99), stable.latency.quantile_micros(0.99))
        && canary_p99 * 100 > stable_p99 * u64::from(policy.max_latency_percent)
    {
        return Some(format!(
            "p99 latency {} is over {}% of the stable revision's {}",
            millis(canary_p99),
            policy.max_latency_percent,
            millis(stable_p99)
        ));
    }
    None
}

fn describe_step(canary: &StepTraffic, stable: &StepTraffic) -> String {
    let p99 = |t: &StepTraffic| t.latency.quantile_micros(0.99).map_or("n/a".to_string(), millis);
    format!(
        "{} requests, error rate {} (stable {}), p99 {} (stable {})",
        canary.requests,
        error_rate(canary),
        error_rate(stable),
        p99(canary),
        p99(stable)
    )
}

fn error_rate(traffic: &StepTraffic) -> String {
    if traffic.requests == 0 {
        "n/a".to_string()
    } else {
        format!("{:.1}%", traffic.errors as f64 * 100.0 / traffic.requests as f64)
    }
}

fn millis(micros: u64) -> String {
    format!("{:.1}ms", micros as f64 / 1000.0)
}

/// Weights rescaled to add up to 100 (the largest absorbs rounding).
fn normalise(weights: Vec<TrafficWeight>) -> Vec<TrafficWeight> {
    let total: u32 = weights.iter().map(|w| w.percent).sum();
    if total == 0 || total == 100 {
        return weights;
    }
    let mut scaled: Vec<TrafficWeight> =
        weights.iter().map(|w| TrafficWeight { revision: w.revision, percent: w.percent * 100 / total }).collect();
    let sum: u32 = scaled.iter().map(|w| w.percent).sum();
    if let Some(largest) = scaled.iter_mut().max_by_key(|w| w.percent) {
        largest.percent += 100 - sum;
    }
    scaled
}

fn duration_ms(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
