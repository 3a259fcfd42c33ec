//! Jobs' decisions: from a job, the record of its runs, the results hosts
//! reported and `now`, which runs to create (requested, or due on the
//! schedule under the concurrency policy), which attempts to start where,
//! retry after a backoff, give up on, or cancel; and when to look again.
//!
//! The leader writes the new history *before* it acts on the starts and
//! cancels (so a successor sees what was started), and feeds the next pass
//! what hosts report. Level-triggered: the same input gives the same plan,
//! and a plan whose history was written gives no new actions next time.

use crate::hash::hash_text;
use std::collections::BTreeMap;
use std::time::Duration;
use wharf_proto::job::{ConcurrencyPolicy, JobAttempt, JobHistory, JobResult, JobRun, RunCause, RunState, StoredJob};
use wharf_proto::{ByteSize, HostId};

/// How long past an attempt's deadline the leader waits for its result
/// before it counts the attempt as lost (its host died, or the result was
/// lost on the way).
pub const LOST_AFTER: Duration = Duration::from_secs(30);

/// How often a run no host can take is tried again.
pub const PENDING_RETRY: Duration = Duration::from_secs(1);

/// A host as job placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobHost {
    pub id: HostId,
    pub labels: BTreeMap<String, String>,
    /// Memory not reserved by replicas (capacity less reservations).
    pub free_memory: ByteSize,
    /// Whether the host has the job's component compiled.
    pub cached: bool,
}

/// What one pass over one job decides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobPlan {
    /// The job's runs after the pass; to be written if it differs from the input.
    pub history: JobHistory,
    /// Attempts to start, after the history is written.
    pub starts: Vec<AttemptRef>,
    /// Attempts to stop on their hosts (replaced or cancelled runs).
    pub cancels: Vec<AttemptRef>,
    /// When to look at the job again if nothing else changes (ms since the epoch).
    pub wake_at_ms: Option<u64>,
}

/// One attempt of one run, on a host.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AttemptRef {
    pub run: u64,
    pub attempt: u32,
    pub host: HostId,
}

/// Everything one pass over a job reads.
#[derive(Clone, Copy, Debug)]
pub struct JobInput<'a> {
    pub job: &'a StoredJob,
    pub history: &'a JobHistory,
    /// Results hosts reported for this job (any run; already-recorded ones are ignored).
    pub results: &'a [JobResult],
    /// Ready hosts that take work.
    pub hosts: &'a [JobHost],
    pub now_ms: u64,
}

/// Decides one pass over a job (see the module docs).
pub fn plan_job(input: JobInput<'_>) -> JobPlan {
    let JobInput { job, results, now_ms, .. } = input;
    let spec = &job.spec;
    let mut plan = JobPlan { history: input.history.clone(), ..JobPlan::default() };
    record_results(&mut plan.history, results);
    let lost_after = ms(spec.limits.timeout + LOST_AFTER);
    for run in plan.history.runs.iter_mut().filter(|r| !r.state.is_finished()) {
        for attempt in run.attempts.iter_mut().filter(|a| a.finished_ms.is_none()) {
            if now_ms >= attempt.started_ms.saturating_add(lost_after) {
                attempt.finished_ms = Some(now_ms);
                attempt.outcome = Some("lost".into());
                attempt.error = Some(format!(
                    "no result from host {} within the deadline ({}) and {}s: the host died or the result was lost",
                    attempt.host.as_ref().map_or("?", HostId::as_str),
                    wharf_proto::units::format_duration(spec.limits.timeout),
                    LOST_AFTER.as_secs()
                ));
            }
        }
    }
    // Settle the runs there are (finished, backing off, retried) first:
    // whether one is still active decides what a due schedule time does.
    step_runs(&mut plan, input, lost_after);
    // Requested runs (one-off jobs, `wharf run`, POST .../runs).
    while plan.history.requests_started < job.requested {
        plan.history.requests_started += 1;
        let number = plan.history.requests_started;
        new_run(&mut plan.history, RunCause::Request { number }, now_ms);
    }
    // Scheduled runs: only the latest time due is fired, so a leader that
    // was away for many periods starts one run, not a burst.
    if let Ok(Some(schedule)) = spec.parsed_schedule() {
        let after = plan.history.last_fire_ms.unwrap_or(job.created_ms);
        if let Some(due) = schedule.latest_at_or_before(now_ms).filter(|due| *due > after) {
            plan.history.last_fire_ms = Some(due);
            let active = plan.history.runs.iter().any(|r| !r.state.is_finished());
            match spec.concurrency_policy {
                ConcurrencyPolicy::Forbid if active => plan.history.skipped += 1,
                ConcurrencyPolicy::Replace => {
                    cancel_active(&mut plan, now_ms, "replaced by a newer run (concurrency_policy: replace)");
                    new_run(&mut plan.history, RunCause::Schedule { at_ms: due }, now_ms);
                }
                _ => new_run(&mut plan.history, RunCause::Schedule { at_ms: due }, now_ms),
            }
        }
        if let Some(next) = schedule.next_after(now_ms) {
            plan.wake_at_ms = Some(plan.wake_at_ms.map_or(next, |w| w.min(next)));
        }
    }
    // Start the new runs' first attempts.
    step_runs(&mut plan, input, lost_after);
    trim(&mut plan.history, spec.history);
    plan
}

/// Cancels every unfinished run of a job (it was deleted, or a newer run
/// replaces them): the attempts running are to be stopped on their hosts.
pub fn cancel_runs(history: &JobHistory, now_ms: u64, why: &str) -> JobPlan {
    let mut plan = JobPlan { history: history.clone(), ..JobPlan::default() };
    cancel_active(&mut plan, now_ms, why);
    plan
}

/// The attempts a history says run now, on their hosts: what a new leader
/// sends again (a start is idempotent on the host), in case its
/// predecessor recorded an attempt and stopped before sending it.
pub fn running_attempts(history: &JobHistory) -> Vec<AttemptRef> {
    history
        .runs
        .iter()
        .filter(|run| !run.state.is_finished())
        .flat_map(|run| {
            run.attempts.iter().filter(|a| a.finished_ms.is_none()).filter_map(|a| a.host.clone().map(|host| AttemptRef { run: run.run, attempt: a.attempt, host }))
        })
        .collect()
}

fn cancel_active(plan: &mut JobPlan, now_ms: u64, why: &str) {
    for run in plan.history.runs.iter_mut().filter(|r| !r.state.is_finished()) {
        for attempt in run.attempts.iter_mut().filter(|a| a.finished_ms.is_none()) {
            attempt.finished_ms = Some(now_ms);
            attempt.outcome = Some("cancelled".into());
            attempt.error = Some(why.to_string());
            if let Some(host) = &attempt.host {
                plan.cancels.push(AttemptRef { run: run.run, attempt: attempt.attempt, host: host.clone() });
            }
        }
        run.state = RunState::Cancelled;
        run.finished_ms = Some(now_ms);
    }
}

fn new_run(history: &mut JobHistory, cause: RunCause, now_ms: u64) {
    history.last_run += 1;
    history.runs.push(JobRun { run: history.last_run, cause, state: RunState::Pending, created_ms: now_ms, finished_ms: None, attempts: Vec::new(), pending: None });
}

/// Copies each result into its attempt, if the attempt still waits for one
/// and the result comes from the host the attempt was started on (another
/// host cannot end an attempt it does not run).
fn record_results(history: &mut JobHistory, results: &[JobResult]) {
    for result in results {
        let Some(run) = history.runs.iter_mut().find(|r| r.run == result.run) else { continue };
        let waiting = |a: &&mut JobAttempt| a.attempt == result.attempt && a.finished_ms.is_none();
        let Some(attempt) = run.attempts.iter_mut().find(waiting) else { continue };
        if attempt.host.as_ref().is_some_and(|host| *host != result.host) {
            continue;
        }
        attempt.finished_ms = Some(result.finished_ms);
        attempt.exit_code = result.exit_code;
        attempt.outcome = Some(result.outcome.clone());
        attempt.error = result.error.clone();
        if attempt.host.is_none() {
            attempt.host = Some(result.host.clone());
        }
    }
}

/// Moves every unfinished run on: start its first attempt, finish it, or
/// retry it after the backoff.
fn step_runs(plan: &mut JobPlan, input: JobInput<'_>, lost_after: u64) {
    let JobInput { job, hosts, now_ms, .. } = input;
    let spec = &job.spec;
    let mut wake = plan.wake_at_ms;
    let mut soon = |at: u64| wake = Some(wake.map_or(at, |w| w.min(at)));
    for run in plan.history.runs.iter_mut().filter(|r| !r.state.is_finished()) {
        let next = match run.attempts.last() {
            None => Some(1),
            Some(last) => match last.finished_ms {
                None => {
                    run.state = RunState::Running;
                    soon(last.started_ms.saturating_add(lost_after));
                    None
                }
                Some(_) if last.succeeded() => {
                    run.state = RunState::Succeeded;
                    run.finished_ms = last.finished_ms;
                    None
                }
                Some(finished) => {
                    let tried = u32::try_from(run.attempts.len()).unwrap_or(u32::MAX);
                    if tried > spec.retries {
                        run.state = RunState::Failed;
                        run.finished_ms = Some(finished);
                        None
                    } else {
                        let retry_at = finished.saturating_add(ms(spec.backoff_before(tried + 1)));
                        if now_ms >= retry_at {
                            Some(tried + 1)
                        } else {
                            run.state = RunState::BackingOff;
                            soon(retry_at);
                            None
                        }
                    }
                }
            },
        };
        let Some(attempt) = next else { continue };
        let avoid = run.attempts.last().and_then(|a| a.host.clone());
        match place(job, hosts, run.run, attempt, avoid.as_ref()) {
            Ok(host) => {
                run.state = RunState::Running;
                run.pending = None;
                run.attempts.push(JobAttempt {
                    attempt,
                    host: Some(host.clone()),
                    started_ms: now_ms,
                    finished_ms: None,
                    exit_code: None,
                    outcome: None,
                    error: None,
                });
                plan.starts.push(AttemptRef { run: run.run, attempt, host });
                soon(now_ms.saturating_add(lost_after));
            }
            Err(reason) => {
                run.state = RunState::Pending;
                run.pending = Some(reason);
                soon(now_ms.saturating_add(ms(PENDING_RETRY)));
            }
        }
    }
    plan.wake_at_ms = wake;
}

/// Where an attempt runs: filter (labels, free memory) → score (cached
/// first, then most free memory; a retry prefers another host than the
/// last attempt's) → pick, ties broken by a hash of (job, run, attempt,
/// host) so attempts spread and the same input picks the same host.
pub fn place(job: &StoredJob, hosts: &[JobHost], run: u64, attempt: u32, avoid: Option<&HostId>) -> Result<HostId, String> {
    let spec = &job.spec;
    let memory = spec.limits.memory;
    let labelled: Vec<&JobHost> = hosts.iter().filter(|h| spec.placement.labels.iter().all(|(k, v)| h.labels.get(k) == Some(v))).collect();
    if labelled.is_empty() {
        let labels: Vec<String> = spec.placement.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        return Err(if hosts.is_empty() {
            "no ready host".to_string()
        } else {
            format!("none of {} ready host(s) has the labels {}", hosts.len(), labels.join(","))
        });
    }
    let fitting: Vec<&JobHost> = labelled.iter().copied().filter(|h| h.free_memory >= memory).collect();
    if fitting.is_empty() {
        let most = labelled.iter().map(|h| h.free_memory).max().unwrap_or_default();
        return Err(format!("insufficient memory on {} of {} ready host(s) (needs {memory}, most free {most})", labelled.len(), labelled.len()));
    }
    let key = format!("{}/{run}/{attempt}", spec.id());
    fitting
        .iter()
        .min_by_key(|h| (avoid == Some(&h.id) && fitting.len() > 1, !h.cached, std::cmp::Reverse(h.free_memory), hash_text(&format!("{key}/{}", h.id))))
        .map(|h| h.id.clone())
        .ok_or_else(|| "no host fits (a bug)".to_string())
}

/// Keeps every unfinished run and the newest `keep` finished ones.
fn trim(history: &mut JobHistory, keep: u32) {
    let finished = history.runs.iter().filter(|r| r.state.is_finished()).count();
    let mut drop = finished.saturating_sub(keep as usize);
    history.runs.retain(|r| {
        if drop > 0 && r.state.is_finished() {
            drop -= 1;
            false
        } else {
            true
        }
    });
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_proto::JobSpec;

    fn host(id: &str, free_mib: u64) -> JobHost {
        JobHost { id: HostId::new(id).expect("a host id"), labels: BTreeMap::new(), free_memory: ByteSize::mib(free_mib), cached: false }
    }

    fn job(f: impl FnOnce(&mut JobSpec)) -> StoredJob {
        let mut spec = JobSpec::new("report", wharf_proto::Digest::of(b"job"));
        f(&mut spec);
        StoredJob { spec, version: 1, created_ms: 10_500, requested: 0 }
    }

    fn pass(job: &StoredJob, history: &JobHistory, results: &[JobResult], hosts: &[JobHost], now_ms: u64) -> JobPlan {
        plan_job(JobInput { job, history, results, hosts, now_ms })
    }

    fn result(run: u64, attempt: u32, exit: Option<i32>, at: u64) -> JobResult {
        JobResult {
            job: "default/report".parse().expect("a job id"),
            run,
            attempt,
            host: HostId::new("a").expect("a host id"),
            finished_ms: at,
            exit_code: exit,
            outcome: if exit.is_some() { "exited".into() } else { "deadline".into() },
            error: None,
        }
    }

    #[test]
    fn a_requested_run_starts_and_a_success_finishes_it() {
        let mut job = job(|_| {});
        job.requested = 1;
        let hosts = [host("a", 512)];
        let plan = pass(&job, &JobHistory::default(), &[], &hosts, 20_000);
        assert_eq!(plan.starts, vec![AttemptRef { run: 1, attempt: 1, host: HostId::new("a").expect("a host id") }]);
        assert_eq!(plan.history.runs[0].state, RunState::Running);
        let again = pass(&job, &plan.history, &[], &hosts, 20_100);
        assert!(again.starts.is_empty(), "level-triggered: nothing new to start");
        let done = pass(&job, &plan.history, &[result(1, 1, Some(0), 21_000)], &hosts, 21_001);
        assert_eq!(done.history.runs[0].state, RunState::Succeeded);
        assert_eq!(done.history.runs[0].finished_ms, Some(21_000));
    }

    #[test]
    fn only_the_host_an_attempt_runs_on_can_end_it() {
        let mut job = job(|_| {});
        job.requested = 1;
        let hosts = [host("a", 512)];
        let plan = pass(&job, &JobHistory::default(), &[], &hosts, 20_000);
        let forged = JobResult { host: HostId::new("b").expect("a host id"), ..result(1, 1, Some(0), 21_000) };
        let ignored = pass(&job, &plan.history, &[forged], &hosts, 21_001);
        assert_eq!(ignored.history.runs[0].state, RunState::Running, "host b cannot end an attempt host a runs");
        assert_eq!(ignored.history.runs[0].attempts[0].finished_ms, None);
        let done = pass(&job, &plan.history, &[result(1, 1, Some(0), 21_000)], &hosts, 21_001);
        assert_eq!(done.history.runs[0].state, RunState::Succeeded);
    }

    #[test]
    fn a_failed_attempt_is_retried_after_the_backoff_then_the_run_fails() {
        let mut job = job(|j| {
            j.retries = 1;
            j.backoff = Duration::from_secs(2);
        });
        job.requested = 1;
        let hosts = [host("a", 512), host("b", 512)];
        let first = pass(&job, &JobHistory::default(), &[], &hosts, 20_000);
        let first_host = first.starts[0].host.clone();
        let on = |host: &HostId, r: JobResult| JobResult { host: host.clone(), ..r };
        let failed = pass(&job, &first.history, &[on(&first_host, result(1, 1, Some(1), 21_000))], &hosts, 21_000);
        assert!(failed.starts.is_empty());
        assert_eq!(failed.history.runs[0].state, RunState::BackingOff);
        assert_eq!(failed.wake_at_ms, Some(23_000));
        let retried = pass(&job, &failed.history, &[], &hosts, 23_000);
        assert_eq!(retried.starts.len(), 1);
        assert_eq!(retried.starts[0].attempt, 2);
        assert_ne!(retried.starts[0].host, first_host, "a retry prefers another host");
        let over = pass(&job, &retried.history, &[on(&retried.starts[0].host, result(1, 2, Some(3), 24_000))], &hosts, 24_000);
        assert_eq!(over.history.runs[0].state, RunState::Failed);
        assert_eq!(over.history.runs[0].exit_code(), Some(3));
        assert!(over.starts.is_empty());
    }

    #[test]
    fn forbid_skips_a_due_time_while_a_run_runs_and_fires_each_time_once() {
        let job = job(|j| j.every = Some(Duration::from_secs(2)));
        let hosts = [host("a", 512)];
        let plan = pass(&job, &JobHistory::default(), &[], &hosts, 12_100);
        assert_eq!(plan.starts.len(), 1, "12s is due (created at 10.5s)");
        assert_eq!(plan.history.last_fire_ms, Some(12_000));
        assert_eq!(plan.wake_at_ms, Some(14_000));
        let same = pass(&job, &plan.history, &[], &hosts, 13_900);
        assert!(same.starts.is_empty() && same.history == plan.history, "12s fires once");
        let busy = pass(&job, &plan.history, &[], &hosts, 14_050);
        assert!(busy.starts.is_empty(), "forbid: run 1 still runs");
        assert_eq!(busy.history.skipped, 1);
        assert_eq!(busy.history.runs.len(), 1);
        let free = pass(&job, &busy.history, &[result(1, 1, Some(0), 15_000)], &hosts, 16_000);
        assert_eq!(free.starts, vec![AttemptRef { run: 2, attempt: 1, host: HostId::new("a").expect("a host id") }]);
    }

    #[test]
    fn allow_and_replace_start_beside_or_instead_of_the_running_run() {
        let hosts = [host("a", 512)];
        let allow = job(|j| {
            j.every = Some(Duration::from_secs(2));
            j.concurrency_policy = ConcurrencyPolicy::Allow;
        });
        let first = pass(&allow, &JobHistory::default(), &[], &hosts, 12_000);
        let second = pass(&allow, &first.history, &[], &hosts, 14_000);
        assert_eq!(second.starts.len(), 1);
        assert_eq!(second.history.runs.iter().filter(|r| r.state == RunState::Running).count(), 2);
        let replace = job(|j| {
            j.every = Some(Duration::from_secs(2));
            j.concurrency_policy = ConcurrencyPolicy::Replace;
        });
        let first = pass(&replace, &JobHistory::default(), &[], &hosts, 12_000);
        let second = pass(&replace, &first.history, &[], &hosts, 14_000);
        assert_eq!(second.cancels, vec![AttemptRef { run: 1, attempt: 1, host: HostId::new("a").expect("a host id") }]);
        assert_eq!(second.history.runs[0].state, RunState::Cancelled);
        assert_eq!(second.starts[0].run, 2);
    }

    #[test]
    fn a_leader_back_after_many_periods_fires_only_the_latest() {
        let job = job(|j| j.every = Some(Duration::from_secs(2)));
        let history = JobHistory { last_fire_ms: Some(12_000), last_run: 0, ..JobHistory::default() };
        let plan = pass(&job, &history, &[], &[host("a", 512)], 31_000);
        assert_eq!(plan.history.runs.len(), 1);
        assert_eq!(plan.history.runs[0].cause, RunCause::Schedule { at_ms: 30_000 });
    }

    #[test]
    fn an_attempt_without_a_result_is_lost_after_its_deadline_and_grace() {
        let mut job = job(|j| j.limits.timeout = Duration::from_secs(1));
        job.requested = 1;
        let hosts = [host("a", 512)];
        let started = pass(&job, &JobHistory::default(), &[], &hosts, 20_000);
        assert_eq!(started.wake_at_ms, Some(20_000 + 1_000 + 30_000));
        let lost = pass(&job, &started.history, &[], &hosts, 51_000);
        assert_eq!(lost.history.runs[0].state, RunState::Failed);
        assert_eq!(lost.history.runs[0].attempts[0].outcome.as_deref(), Some("lost"));
    }

    #[test]
    fn a_new_leader_sends_again_exactly_the_running_attempts() {
        let mut job = job(|j| j.retries = 1);
        job.requested = 2;
        let hosts = [host("a", 512)];
        let started = pass(&job, &JobHistory::default(), &[], &hosts, 20_000);
        let one_done = pass(&job, &started.history, &[result(1, 1, Some(0), 21_000)], &hosts, 21_000);
        assert_eq!(running_attempts(&one_done.history), vec![AttemptRef { run: 2, attempt: 1, host: HostId::new("a").expect("a host id") }]);
    }

    #[test]
    fn no_fitting_host_leaves_the_run_pending_with_the_reason() {
        let mut job = job(|j| j.limits.memory = ByteSize::mib(256));
        job.requested = 1;
        let plan = pass(&job, &JobHistory::default(), &[], &[host("a", 128)], 20_000);
        assert!(plan.starts.is_empty());
        assert_eq!(plan.history.runs[0].state, RunState::Pending);
        let reason = plan.history.runs[0].pending.clone().unwrap_or_default();
        assert!(reason.contains("insufficient memory on 1 of 1 ready host(s) (needs 256MiB, most free 128MiB)"), "{reason}");
        assert_eq!(plan.wake_at_ms, Some(21_000));
        let later = pass(&job, &plan.history, &[], &[host("a", 128), host("b", 512)], 21_000);
        assert_eq!(later.starts[0].host.as_str(), "b");
    }

    #[test]
    fn the_history_keeps_the_newest_finished_runs() {
        let mut job = job(|j| j.history = 2);
        job.requested = 4;
        let hosts = [host("a", 512)];
        let plan = pass(&job, &JobHistory::default(), &[], &hosts, 20_000);
        let results: Vec<JobResult> = (1..=4).map(|run| result(run, 1, Some(0), 21_000)).collect();
        let done = pass(&job, &plan.history, &results, &hosts, 21_000);
        let kept: Vec<u64> = done.history.runs.iter().map(|r| r.run).collect();
        assert_eq!(kept, vec![3, 4]);
    }
}
