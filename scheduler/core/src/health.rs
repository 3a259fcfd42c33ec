//! What to do about replicas that fail, as pure decisions: retry a replica
//! that could not load or become ready after a backoff, move it to another
//! host after repeated failures on one, and eject replicas whose requests
//! fail far more than their siblings'. The controller feeds these from the
//! hosts' heartbeats and acts on the answers (bumping an assignment's
//! attempt, adding a host to a replica's hosts to avoid).

use std::time::Duration;
use wharf_proto::Ejection;

/// How failed replicas are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The pause before the first retry; it doubles with each failure.
    pub initial: Duration,
    /// The longest pause.
    pub max: Duration,
    /// Failures on one host after which a replica is moved to another.
    pub move_after: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { initial: Duration::from_secs(1), max: Duration::from_secs(60), move_after: 3 }
    }
}

impl RetryPolicy {
    /// The pause after the `failures`-th failure: `initial` doubling, at most `max`.
    pub fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        self.initial.saturating_mul(1u32 << doublings).min(self.max)
    }
}

/// A replica that failed on its host, as the controller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailedReplica {
    /// Failed attempts on its current host.
    pub failures: u32,
    /// When the controller first saw the last failure.
    pub since_ms: u64,
    /// The attempt its assignment asks for.
    pub assigned_attempt: u32,
    /// The attempt its host reports as failed.
    pub reported_attempt: u32,
    /// Whether some other host could take it (one it does not avoid).
    pub elsewhere: bool,
}

/// What to do about a [`FailedReplica`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryAction {
    /// Nothing yet: its host has not acted on the last attempt, or the
    /// backoff runs until `until_ms` (`None`: wait for the host).
    Wait {
        /// When to look again.
        until_ms: Option<u64>,
    },
    /// Load it again on the same host: assign this attempt.
    Retry {
        /// The next attempt.
        attempt: u32,
    },
    /// Move it off its host (which it should avoid from now on).
    Move,
}

/// Decides what to do about one failed replica (see the module docs).
pub fn retry(policy: &RetryPolicy, failed: &FailedReplica, now_ms: u64) -> RetryAction {
    if failed.reported_attempt != failed.assigned_attempt {
        return RetryAction::Wait { until_ms: None };
    }
    let backoff = u64::try_from(policy.backoff(failed.failures).as_millis()).unwrap_or(u64::MAX);
    let due = failed.since_ms.saturating_add(backoff);
    if now_ms < due {
        return RetryAction::Wait { until_ms: Some(due) };
    }
    if failed.failures >= policy.move_after && failed.elsewhere {
        RetryAction::Move
    } else {
        RetryAction::Retry { attempt: failed.assigned_attempt.wrapping_add(1) }
    }
}

/// Requests one replica of a service served over the ejection window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaTraffic {
    /// Requests served in the window.
    pub requests: u64,
    /// Of those, failed.
    pub errors: u64,
    /// Whether it was already ejected in this window (it counts against the cap).
    pub ejected: bool,
}

/// Which replicas of one service to eject now, by index into `replicas`,
/// with the reason (see [`Ejection`]): those failing at least
/// `max_error_rate` percent of at least `min_requests` requests while the
/// rest fail less than half as often, worst first, within
/// `max_ejected_percent` of the service's replicas (at least one; counting
/// those already ejected). A service of one replica is never ejected from:
/// there is no sibling to compare with, nor to take its traffic.
pub fn outliers(policy: &Ejection, replicas: &[ReplicaTraffic]) -> Vec<(usize, String)> {
    if !policy.enabled || replicas.len() < 2 {
        return Vec::new();
    }
    let cap = (replicas.len() * policy.max_ejected_percent as usize / 100).max(1);
    let already = replicas.iter().filter(|r| r.ejected).count();
    let total_requests: u64 = replicas.iter().map(|r| r.requests).sum();
    let total_errors: u64 = replicas.iter().map(|r| r.errors).sum();
    let mut candidates: Vec<(usize, f64, f64)> = replicas
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.ejected && r.requests >= u64::from(policy.min_requests))
        .filter_map(|(i, r)| {
            let rate = r.errors as f64 * 100.0 / r.requests as f64;
            let rest_requests = total_requests - r.requests;
            let rest_rate = if rest_requests == 0 { 0.0 } else { (total_errors - r.errors) as f64 * 100.0 / rest_requests as f64 };
            (rate >= f64::from(policy.max_error_rate) && rest_rate * 2.0 < rate).then_some((i, rate, rest_rate))
        })
        .collect();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    candidates
        .into_iter()
        .take(cap.saturating_sub(already))
        .map(|(i, rate, rest_rate)| {
            let r = &replicas[i];
            (
                i,
                format!(
                    "{} of its {} requests failed ({rate:.0}%) against {rest_rate:.0}% for the service's other replicas",
                    r.errors, r.requests
                ),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap() {
        let policy = RetryPolicy::default();
        let secs: Vec<u64> = (1..=9).map(|n| policy.backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(policy.backoff(u32::MAX), Duration::from_secs(60));
    }
}
