//! How a service changes and how its health is judged: readiness checks,
//! outlier ejection, the rolling-update and canary policy, and explicit
//! traffic splits between revisions. These are parts of a [`ServiceSpec`]
//! (`health:`, `rollout:`, `traffic:` in a manifest).
//!
//! `health` belongs to a revision (a new readiness path is a new revision);
//! `rollout` and `traffic` do not: they say how the service moves between
//! revisions, like `replicas` says how many run.
//!
//! [`ServiceSpec`]: crate::ServiceSpec

use crate::spec::SpecError;
use crate::units::{duration_text, format_duration};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// When a replica may take traffic, and when it is taken out.
///
/// ```yaml
/// health:
///   readiness: { path: /healthz, timeout: 1s }
///   ejection: { max_error_rate: 50, min_requests: 10 }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Health {
    /// An HTTP check a new replica must pass before it takes traffic;
    /// without one, a replica is ready once its component is loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Readiness>,
    /// Taking a replica whose requests fail much more than its siblings'
    /// out of rotation, and replacing it.
    #[serde(skip_serializing_if = "Ejection::is_default")]
    pub ejection: Ejection,
}

impl Health {
    /// Whether nothing is set (left out when serialised).
    pub fn is_default(&self) -> bool {
        *self == Health::default()
    }

    /// Checks the readiness check and the ejection thresholds.
    pub fn validate(&self) -> Result<(), SpecError> {
        if let Some(readiness) = &self.readiness {
            readiness.validate().map_err(|e| e.within("readiness"))?;
        }
        self.ejection.validate().map_err(|e| e.within("ejection"))
    }
}

/// A readiness check: `GET path` served by a fresh instance of the new
/// replica, which must answer 2xx within `timeout`. A failed check is tried
/// again every `period` until `failure_threshold` checks in a row failed;
/// then the replica has failed (and is retried with backoff, like a replica
/// that could not load).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    /// The path requested, starting with `/` (a query is allowed).
    pub path: String,
    /// How long one check may take (default 1s).
    #[serde(default = "default_probe_timeout", with = "duration_text")]
    pub timeout: Duration,
    /// The pause between failed checks (default 500ms).
    #[serde(default = "default_probe_period", with = "duration_text")]
    pub period: Duration,
    /// Failed checks in a row that fail the replica (default 3).
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
}

fn default_probe_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_probe_period() -> Duration {
    Duration::from_millis(500)
}

fn default_failure_threshold() -> u32 {
    3
}

impl Readiness {
    /// A check of `path` with the default timeout, period and threshold.
    pub fn new(path: impl Into<String>) -> Self {
        Readiness {
            path: path.into(),
            timeout: default_probe_timeout(),
            period: default_probe_period(),
            failure_threshold: default_failure_threshold(),
        }
    }

    /// Checks the path and the timings.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !self.path.starts_with('/')
            || self.path.contains(char::is_whitespace)
            || self.path.contains(['#', '\0'])
        {
            return Err(SpecError::new(
                "path",
                format!(
                    "{:?} is not a request path: it must start with '/' and hold no whitespace or '#'",
                    self.path
                ),
            ));
        }
        if self.path.len() > 2048 {
            return Err(SpecError::new("path", "is longer than 2048 characters"));
        }
        duration_in("timeout", self.timeout, Duration::from_millis(1), Duration::from_secs(60))?;
        duration_in("period", self.period, Duration::from_millis(10), Duration::from_secs(60))?;
        if !(1..=100).contains(&self.failure_threshold) {
            return Err(SpecError::new(
                "failure_threshold",
                format!("must be between 1 and 100, got {}", self.failure_threshold),
            ));
        }
        Ok(())
    }
}

/// Outlier ejection, judged by the control plane from the hosts' reports:
/// a replica whose share of failed requests (traps, exhausted fuel or
/// memory, deadlines, 5xx answers) over `window` is at least
/// `max_error_rate` percent, with at least `min_requests` requests, while
/// the service's other replicas fail less than half as often, is taken out
/// of rotation and replaced, on another host when there is one. At most
/// `max_ejected_percent` of a service's replicas are out at once, so a
/// fault shared by every replica (a dependency down) never empties the service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ejection {
    /// Whether replicas are ejected at all (default true).
    pub enabled: bool,
    /// Percent of failed requests at which a replica is an outlier (default 50).
    pub max_error_rate: u32,
    /// Requests a replica must have served in the window to be judged (default 10).
    pub min_requests: u32,
    /// The window the rates are measured over (default 10s).
    #[serde(with = "duration_text")]
    pub window: Duration,
    /// The most replicas of a service out at once, in percent, at least one (default 50).
    pub max_ejected_percent: u32,
}

impl Default for Ejection {
    fn default() -> Self {
        Ejection {
            enabled: true,
            max_error_rate: 50,
            min_requests: 10,
            window: Duration::from_secs(10),
            max_ejected_percent: 50,
        }
    }
}

impl Ejection {
    /// Whether every setting is the default.
    pub fn is_default(&self) -> bool {
        *self == Ejection::default()
    }

    /// Checks the thresholds.
    pub fn validate(&self) -> Result<(), SpecError> {
        percent_in("max_error_rate", self.max_error_rate, 1)?;
        percent_in("max_ejected_percent", self.max_ejected_percent, 1)?;
        if self.min_requests == 0 {
            return Err(SpecError::new("min_requests", "must be at least 1"));
        }
        duration_in("window", self.window, Duration::from_secs(1), Duration::from_secs(3600))
    }
}

/// How a new revision replaces the running one.
///
/// Without `canary`, a rolling update: new replicas start (at most
/// `max_surge` above the wanted count), and old ones stop only as new ones
/// become ready (at most `max_unavailable` below it). With `canary`, the new
/// revision first takes `steps` of the traffic in turn, judged after each
/// step against the stable revision, then is rolled out to every replica.
///
/// ```yaml
/// rollout:
///   max_surge: 25%          # or a count: 1
///   max_unavailable: 0
///   progress_deadline: 2m
///   canary: { steps: [10, 50], interval: 30s, max_error_rate: 5 }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RolloutPolicy {
    /// Replicas allowed above the wanted count during an update (default 25%, rounded up).
    pub max_surge: Amount,
    /// Ready replicas allowed below the wanted count during an update (default 0, rounded down).
    pub max_unavailable: Amount,
    /// How long an update may go without a new replica becoming ready
    /// before it has failed (default 2m).
    #[serde(with = "duration_text")]
    pub progress_deadline: Duration,
    /// Failed attempts of new replicas (loads, readiness checks) after which
    /// the update has failed (default 3).
    pub failure_threshold: u32,
    /// Whether a failed update goes back to the last good revision (default
    /// true). Without it the update stays where it stopped, old and new
    /// replicas side by side.
    pub auto_rollback: bool,
    /// Automatic canary analysis; without it, updates roll.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryPolicy>,
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        RolloutPolicy {
            max_surge: Amount::Percent(25),
            max_unavailable: Amount::Count(0),
            progress_deadline: Duration::from_secs(120),
            failure_threshold: 3,
            auto_rollback: true,
            canary: None,
        }
    }
}

impl RolloutPolicy {
    /// Whether every setting is the default.
    pub fn is_default(&self) -> bool {
        *self == RolloutPolicy::default()
    }

    /// Replicas allowed above `replicas` during an update: `max_surge`
    /// rounded up, and at least one when nothing may be unavailable, so an
    /// update can always move.
    pub fn surge(&self, replicas: u32) -> u32 {
        let surge = self.max_surge.of(replicas, Rounding::Up);
        if surge == 0 && self.unavailable(replicas) == 0 { 1 } else { surge }
    }

    /// Ready replicas allowed below `replicas` during an update (`max_unavailable`, rounded down).
    pub fn unavailable(&self, replicas: u32) -> u32 {
        self.max_unavailable.of(replicas, Rounding::Down).min(replicas)
    }

    /// Checks the amounts, the deadline and the canary policy.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.max_surge.validate("max_surge")?;
        self.max_unavailable.validate("max_unavailable")?;
        duration_in(
            "progress_deadline",
            self.progress_deadline,
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600),
        )?;
        if !(1..=1000).contains(&self.failure_threshold) {
            return Err(SpecError::new(
                "failure_threshold",
                format!("must be between 1 and 1000, got {}", self.failure_threshold),
            ));
        }
        if let Some(canary) = &self.canary {
            canary.validate().map_err(|e| e.within("canary"))?;
        }
        Ok(())
    }
}

/// Automatic canary analysis: the new revision takes each step's percent of
/// the traffic for `interval`; then its error rate and p99 latency are
/// compared with the stable revision's over that step. It moves to the next
/// step when both are within bounds, and the update is aborted (rolled
/// back) when either is not. After the last step it is rolled out to every
/// replica. A step with fewer than `min_requests` requests on the canary
/// waits up to four intervals for traffic, then passes on what it has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CanaryPolicy {
    /// Percent of the traffic the canary takes at each step, increasing (default [10, 50]).
    pub steps: Vec<u32>,
    /// How long each step lasts (default 30s).
    #[serde(with = "duration_text")]
    pub interval: Duration,
    /// The highest percent of failed canary requests that still passes (default 5).
    pub max_error_rate: u32,
    /// The highest canary p99 latency that still passes, in percent of the
    /// stable revision's p99 over the same step (default 200: twice as slow).
    pub max_latency_percent: u32,
    /// Canary requests a step needs before it is judged (default 20).
    pub min_requests: u32,
}

impl Default for CanaryPolicy {
    fn default() -> Self {
        CanaryPolicy {
            steps: vec![10, 50],
            interval: Duration::from_secs(30),
            max_error_rate: 5,
            max_latency_percent: 200,
            min_requests: 20,
        }
    }
}

impl CanaryPolicy {
    /// Checks the steps and the thresholds.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.steps.is_empty() || self.steps.len() > 20 {
            return Err(SpecError::new("steps", "give between 1 and 20 steps, e.g. [10, 50]"));
        }
        let mut before = 0;
        for (i, step) in self.steps.iter().enumerate() {
            if *step <= before || *step >= 100 {
                return Err(SpecError::new(
                    format!("steps[{i}]"),
                    format!("{step} must be more than the step before it ({before}) and less than 100"),
                ));
            }
            before = *step;
        }
        duration_in("interval", self.interval, Duration::from_secs(1), Duration::from_secs(24 * 3600))?;
        percent_in("max_error_rate", self.max_error_rate, 0)?;
        if !(100..=10_000).contains(&self.max_latency_percent) {
            return Err(SpecError::new(
                "max_latency_percent",
                format!("must be between 100 and 10000, got {}", self.max_latency_percent),
            ));
        }
        Ok(())
    }
}

/// A share of a service's traffic for one revision.
///
/// ```yaml
/// traffic:
///   - { revision: 3, percent: 90 }
///   - { latest: true, percent: 10 }
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficTarget {
    /// The revision, by number; leave out and set `latest` for the revision
    /// this very spec is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// The revision this spec is (its number is not known before it is stored).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub latest: bool,
    /// Percent of requests, 0 to 100; the targets add up to 100.
    pub percent: u32,
}

impl TrafficTarget {
    /// Checks a whole split: one target per revision, percents adding up to 100.
    pub fn validate_split(targets: &[TrafficTarget]) -> Result<(), SpecError> {
        if targets.is_empty() {
            return Ok(());
        }
        if targets.len() > 10 {
            return Err(SpecError::new("traffic", "split traffic between at most 10 revisions"));
        }
        let mut sum = 0;
        let mut latest = 0;
        let mut seen = std::collections::BTreeSet::new();
        for (i, target) in targets.iter().enumerate() {
            let field = format!("traffic[{i}]");
            match (target.revision, target.latest) {
                (Some(_), true) | (None, false) => {
                    return Err(SpecError::new(
                        field,
                        "name exactly one of `revision: N` or `latest: true`",
                    ));
                }
                (Some(0), false) => return Err(SpecError::new(field, "revisions are numbered from 1")),
                (Some(n), false) => {
                    if !seen.insert(n) {
                        return Err(SpecError::new(field, format!("revision {n} is listed twice")));
                    }
                }
                (None, true) => latest += 1,
            }
            if target.percent > 100 {
                return Err(SpecError::new(field, format!("percent {} is more than 100", target.percent)));
            }
            sum += target.percent;
        }
        if latest > 1 {
            return Err(SpecError::new("traffic", "`latest: true` is listed twice"));
        }
        if sum != 100 {
            return Err(SpecError::new("traffic", format!("the percents add up to {sum}, not 100")));
        }
        Ok(())
    }
}

/// A number of replicas, absolute or in percent of the wanted count:
/// written `1` or `"25%"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "AmountRepr", into = "AmountRepr")]
pub enum Amount {
    /// That many replicas.
    Count(u32),
    /// That percent of the wanted replicas.
    Percent(u32),
}

/// Which way a percent of replicas is rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rounding {
    /// Up: a surge of 25% of 2 replicas is 1.
    Up,
    /// Down: 25% unavailable of 2 replicas is 0.
    Down,
}

impl Amount {
    /// The amount for a service of `replicas` replicas.
    pub fn of(self, replicas: u32, rounding: Rounding) -> u32 {
        match self {
            Amount::Count(n) => n,
            Amount::Percent(p) => {
                let scaled = u64::from(replicas) * u64::from(p);
                let value = match rounding {
                    Rounding::Up => scaled.div_ceil(100),
                    Rounding::Down => scaled / 100,
                };
                u32::try_from(value).unwrap_or(u32::MAX)
            }
        }
    }

    fn validate(self, field: &str) -> Result<(), SpecError> {
        match self {
            Amount::Percent(p) if p > 100 => Err(SpecError::new(field, format!("{p}% is more than 100%"))),
            Amount::Count(n) if n > crate::spec::MAX_REPLICAS => {
                Err(SpecError::new(field, format!("{n} is more than {} replicas", crate::spec::MAX_REPLICAS)))
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amount::Count(n) => write!(f, "{n}"),
            Amount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for Amount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = || format!("{s:?} is not an amount: write a count such as 1 or a percent such as 25%");
        match s.strip_suffix('%') {
            Some(p) => p.trim().parse().map(Amount::Percent).map_err(|_| bad()),
            None => s.parse().map(Amount::Count).map_err(|_| bad()),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum AmountRepr {
    Count(u32),
    Text(String),
}

impl TryFrom<AmountRepr> for Amount {
    type Error = String;
    fn try_from(repr: AmountRepr) -> Result<Self, Self::Error> {
        match repr {
            AmountRepr::Count(n) => Ok(Amount::Count(n)),
            AmountRepr::Text(text) => text.parse(),
        }
    }
}

impl From<Amount> for AmountRepr {
    fn from(amount: Amount) -> Self {
        match amount {
            Amount::Count(n) => AmountRepr::Count(n),
            Amount::Percent(_) => AmountRepr::Text(amount.to_string()),
        }
    }
}

fn duration_in(field: &str, value: Duration, min: Duration, max: Duration) -> Result<(), SpecError> {
    if value < min || value > max {
        return Err(SpecError::new(
            field,
            format!(
                "must be between {} and {}, got {}",
                format_duration(min),
                format_duration(max),
                format_duration(value)
            ),
        ));
    }
    Ok(())
}

fn percent_in(field: &str, value: u32, min: u32) -> Result<(), SpecError> {
    if value < min || value > 100 {
        return Err(SpecError::new(field, format!("must be a percent between {min} and 100, got {value}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_and_round() {
        let surge: Amount = serde_json::from_str("\"25%\"").expect("percent");
        assert_eq!(surge, Amount::Percent(25));
        assert_eq!(serde_json::from_str::<Amount>("2").expect("count"), Amount::Count(2));
        assert!(serde_json::from_str::<Amount>("\"lots\"").is_err());
        assert_eq!(serde_json::to_string(&surge).expect("serialises"), "\"25%\"");
        assert_eq!(Amount::Percent(25).of(4, Rounding::Up), 1);
        assert_eq!(Amount::Percent(25).of(5, Rounding::Up), 2);
        assert_eq!(Amount::Percent(25).of(3, Rounding::Down), 0);
    }

    #[test]
    fn surge_is_never_zero_when_nothing_may_be_unavailable() {
        let policy = RolloutPolicy { max_surge: Amount::Count(0), ..RolloutPolicy::default() };
        assert_eq!(policy.surge(4), 1);
        let policy = RolloutPolicy {
            max_surge: Amount::Count(0),
            max_unavailable: Amount::Count(1),
            ..RolloutPolicy::default()
        };
        assert_eq!((policy.surge(4), policy.unavailable(4)), (0, 1));
        assert_eq!(RolloutPolicy::default().surge(30), 8);
    }

    #[test]
    fn traffic_splits_are_checked() {
        let split = |json: &str| {
            let targets: Vec<TrafficTarget> = serde_json::from_str(json).expect("parses");
            TrafficTarget::validate_split(&targets).map_err(|e| e.to_string())
        };
        assert_eq!(split(r#"[{"revision": 1, "percent": 90}, {"latest": true, "percent": 10}]"#), Ok(()));
        assert!(split(r#"[{"revision": 1, "percent": 90}]"#).expect_err("sum").contains("add up to 90"));
        assert!(split(r#"[{"revision": 1, "latest": true, "percent": 100}]"#).expect_err("both").contains("exactly one"));
        assert!(split(r#"[{"revision": 2, "percent": 50}, {"revision": 2, "percent": 50}]"#).expect_err("twice").contains("twice"));
    }

    #[test]
    fn canary_steps_must_increase() {
        let canary = CanaryPolicy { steps: vec![50, 10], ..CanaryPolicy::default() };
        assert_eq!(canary.validate().expect_err("decreasing").field, "steps[1]");
        let canary = CanaryPolicy { steps: vec![10, 100], ..CanaryPolicy::default() };
        assert!(canary.validate().is_err());
        assert!(CanaryPolicy::default().validate().is_ok());
    }

    #[test]
    fn readiness_paths_are_checked() {
        assert!(Readiness::new("/healthz?deep=1").validate().is_ok());
        assert_eq!(Readiness::new("healthz").validate().expect_err("relative").field, "path");
        let mut slow = Readiness::new("/h");
        slow.timeout = Duration::from_secs(120);
        assert_eq!(slow.validate().expect_err("too slow").field, "timeout");
    }
}
