//! Jobs: components that export `wasi:cli/run` and run to completion,
//! once (`wharf run`) or on a schedule (`schedule: "*/5 * * * *"` with a
//! time zone, or `every: 30s`), with retries and a concurrency policy as
//! Kubernetes CronJobs have. Their specs, the record of their runs, and the
//! messages between the leader and the host that runs an attempt.
//!
//! Schedules are computed here from a time the caller passes: nothing in
//! this module reads a clock.

use crate::Digest;
use crate::names::{HostId, ServiceId};
use crate::spec::{Placement, SpecError, check_config, check_env, check_keyvalue, check_outbound, check_placement, default_namespace, fuel_text, in_range, label};
use crate::units::{ByteSize, duration_text, format_duration};
use chrono::TimeZone;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// The export a job's component must have: the command world's entry point.
pub const RUN_EXPORT: &str = "wasi:cli/run";

/// Whether an export name is [`RUN_EXPORT`] of WASI 0.2 (any patch version).
pub fn is_run_export(name: &str) -> bool {
    name.strip_prefix(RUN_EXPORT).is_some_and(|rest| rest.starts_with("@0.2"))
}

/// The longest deadline of one attempt.
pub const MAX_JOB_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The most retries of one run.
pub const MAX_RETRIES: u32 = 100;
/// The most finished runs kept in a job's history.
pub const MAX_HISTORY: u32 = 100;
/// The shortest `every` period.
pub const MIN_EVERY: Duration = Duration::from_secs(1);
/// The longest `every` period.
pub const MAX_EVERY: Duration = Duration::from_secs(366 * 24 * 3600);
/// The longest backoff between attempts (doubling stops here).
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// The most arguments, and bytes of each, a job passes its component.
pub const MAX_ARGS: usize = 256;

/// A job as the control plane stores it. `C` names the component as
/// [`crate::ServiceSpec`]'s does: a digest once stored, a file in a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec<C = Digest> {
    /// The namespace, a DNS label (default `default`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The job's name, a DNS label unique within its namespace (services
    /// and jobs share the names of a namespace).
    pub name: String,
    /// The component, exporting `wasi:cli/run`.
    pub component: C,
    /// The arguments the component sees after its name (`argv[1..]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables the component sees.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Memory cap, fuel and deadline of each attempt.
    #[serde(default)]
    pub limits: JobLimits,
    /// Constraints on the hosts an attempt may run on.
    #[serde(default, skip_serializing_if = "Placement::is_unconstrained")]
    pub placement: Placement,
    /// Hosts the component may call over `wasi:http`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_outbound: Vec<String>,
    /// `wasi:keyvalue` buckets the component may open (in its namespace, as a service's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keyvalue: Vec<String>,
    /// Runtime configuration the component reads through `wasi:config`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// Attempts after the first when an attempt fails (default 0).
    #[serde(default)]
    pub retries: u32,
    /// The wait before the first retry, doubling for each further one up
    /// to [`MAX_BACKOFF`] (default 1s).
    #[serde(default = "default_backoff", with = "duration_text")]
    pub backoff: Duration,
    /// A cron schedule that makes the job periodic: five fields (minute,
    /// hour, day of month, month, day of week) or six with seconds first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The IANA time zone `schedule` is read in (default `UTC`).
    #[serde(default = "default_time_zone", skip_serializing_if = "is_utc")]
    pub time_zone: String,
    /// A fixed period instead of `schedule` (`2s`, `10m`), aligned to the
    /// Unix epoch: runs at every multiple of it.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "optional_duration")]
    pub every: Option<Duration>,
    /// What a periodic job does when a run is due while another still runs.
    #[serde(default, skip_serializing_if = "ConcurrencyPolicy::is_default")]
    pub concurrency_policy: ConcurrencyPolicy,
    /// Finished runs kept in the job's history (default 10).
    #[serde(default = "default_history")]
    pub history: u32,
}

fn default_backoff() -> Duration {
    Duration::from_secs(1)
}

fn default_time_zone() -> String {
    "UTC".to_string()
}

fn is_utc(zone: &String) -> bool {
    zone == "UTC"
}

fn default_history() -> u32 {
    10
}

/// Limits of each attempt of a job. Unlike a request's, a job's fuel is
/// unmetered by default and its deadline long: a job is bounded by its
/// wall-clock deadline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobLimits {
    /// Linear-memory cap of the instance (default 64MiB).
    pub memory: ByteSize,
    /// Fuel for the whole attempt; `unlimited` (the default) turns metering off.
    #[serde(with = "fuel_text")]
    pub fuel: Option<u64>,
    /// Wall-clock deadline of one attempt (default 10m, at most 24h).
    #[serde(with = "duration_text")]
    pub timeout: Duration,
}

impl Default for JobLimits {
    fn default() -> Self {
        JobLimits { memory: ByteSize::mib(64), fuel: None, timeout: Duration::from_secs(600) }
    }
}

/// What a periodic job does when a run is due while an earlier one still
/// runs, as Kubernetes CronJobs' `concurrencyPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyPolicy {
    /// Skip the new run (the default).
    #[default]
    Forbid,
    /// Start it beside the running one.
    Allow,
    /// Stop the running one and start the new one.
    Replace,
}

impl ConcurrencyPolicy {
    fn is_default(&self) -> bool {
        *self == ConcurrencyPolicy::Forbid
    }
}

/// When a periodic job runs.
#[derive(Clone, Debug)]
pub enum Schedule {
    /// A cron expression in a time zone.
    Cron { cron: Box<croner::Cron>, zone: chrono_tz::Tz },
    /// Every multiple of a period since the Unix epoch.
    Every(Duration),
}

impl Schedule {
    /// The latest time the schedule fires at or before `at_ms` (ms since the epoch).
    pub fn latest_at_or_before(&self, at_ms: u64) -> Option<u64> {
        match self {
            Schedule::Every(period) => {
                let period = u64::try_from(period.as_millis()).ok()?.max(1);
                Some(at_ms - at_ms % period)
            }
            Schedule::Cron { cron, zone } => {
                let at = zone.timestamp_millis_opt(i64::try_from(at_ms).ok()?).single()?;
                let found = cron.find_previous_occurrence(&at, true).ok()?;
                u64::try_from(found.timestamp_millis()).ok()
            }
        }
    }

    /// The first time the schedule fires after `at_ms`.
    pub fn next_after(&self, at_ms: u64) -> Option<u64> {
        match self {
            Schedule::Every(period) => {
                let period = u64::try_from(period.as_millis()).ok()?.max(1);
                Some(at_ms - at_ms % period + period)
            }
            Schedule::Cron { cron, zone } => {
                let at = zone.timestamp_millis_opt(i64::try_from(at_ms).ok()?).single()?;
                let found = cron.find_next_occurrence(&at, false).ok()?;
                u64::try_from(found.timestamp_millis()).ok()
            }
        }
    }
}

impl<C> JobSpec<C> {
    /// A one-off job for `name` in the default namespace with every other setting at its default.
    pub fn new(name: impl Into<String>, component: C) -> Self {
        JobSpec {
            namespace: default_namespace(),
            name: name.into(),
            component,
            args: Vec::new(),
            env: BTreeMap::new(),
            limits: JobLimits::default(),
            placement: Placement::default(),
            allow_outbound: Vec::new(),
            keyvalue: Vec::new(),
            config: BTreeMap::new(),
            retries: 0,
            backoff: default_backoff(),
            schedule: None,
            time_zone: default_time_zone(),
            every: None,
            concurrency_policy: ConcurrencyPolicy::default(),
            history: default_history(),
        }
    }

    /// The job's id (`namespace/name`).
    pub fn id(&self) -> ServiceId {
        ServiceId { namespace: self.namespace.clone(), name: self.name.clone() }
    }

    /// The same job with its component named another way.
    pub fn with_component<D>(self, component: D) -> JobSpec<D> {
        JobSpec {
            namespace: self.namespace,
            name: self.name,
            component,
            args: self.args,
            env: self.env,
            limits: self.limits,
            placement: self.placement,
            allow_outbound: self.allow_outbound,
            keyvalue: self.keyvalue,
            config: self.config,
            retries: self.retries,
            backoff: self.backoff,
            schedule: self.schedule,
            time_zone: self.time_zone,
            every: self.every,
            concurrency_policy: self.concurrency_policy,
            history: self.history,
        }
    }

    /// Whether the job runs on a schedule (rather than once per request).
    pub fn is_periodic(&self) -> bool {
        self.schedule.is_some() || self.every.is_some()
    }

    /// The job's schedule, `None` for a one-off job; an error names the
    /// field (`schedule`, `time_zone`, `every`) and what to write instead.
    pub fn parsed_schedule(&self) -> Result<Option<Schedule>, SpecError> {
        let zone: chrono_tz::Tz = self.time_zone.parse().map_err(|_| {
            SpecError::new("time_zone", format!("{:?} is not a time zone: use an IANA name such as UTC, Europe/Berlin or America/New_York", self.time_zone))
        })?;
        match (&self.schedule, self.every) {
            (Some(_), Some(_)) => Err(SpecError::new("every", "give `schedule` (cron) or `every` (a period), not both")),
            (None, Some(period)) => {
                if !is_utc(&self.time_zone) {
                    return Err(SpecError::new("time_zone", "applies only to `schedule`; `every` counts from the Unix epoch"));
                }
                in_range("every", period, MIN_EVERY, MAX_EVERY, |d| format_duration(*d))?;
                Ok(Some(Schedule::Every(period)))
            }
            (Some(expression), None) => {
                let cron = croner::parser::CronParser::builder()
                    .seconds(croner::parser::Seconds::Optional)
                    .year(croner::parser::Year::Disallowed)
                    .build()
                    .parse(expression)
                    .map_err(|e| {
                        SpecError::new(
                            "schedule",
                            format!("{expression:?} is not a cron schedule ({e}): write five fields (minute hour day-of-month month day-of-week, e.g. \"*/5 * * * *\") or six with seconds first (\"*/2 * * * * *\")"),
                        )
                    })?;
                Ok(Some(Schedule::Cron { cron: Box::new(cron), zone }))
            }
            (None, None) => {
                if !is_utc(&self.time_zone) {
                    return Err(SpecError::new("time_zone", "applies only to `schedule`"));
                }
                Ok(None)
            }
        }
    }

    /// Checks every rule of job specs; the error names the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        label("namespace", &self.namespace)?;
        label("name", &self.name)?;
        self.limits.validate().map_err(|e| e.within("limits"))?;
        if self.args.len() > MAX_ARGS {
            return Err(SpecError::new("args", format!("{} arguments; at most {MAX_ARGS}", self.args.len())));
        }
        for (i, arg) in self.args.iter().enumerate() {
            if arg.contains('\0') {
                return Err(SpecError::new(format!("args[{i}]"), "an argument must not contain NUL"));
            }
        }
        check_env(&self.env)?;
        check_placement(&self.placement)?;
        check_outbound(&self.allow_outbound)?;
        check_keyvalue(&self.keyvalue)?;
        check_config(&self.config)?;
        in_range("retries", self.retries, 0, MAX_RETRIES, u32::to_string)?;
        in_range("backoff", self.backoff, Duration::from_millis(10), MAX_BACKOFF, |d| format_duration(*d))?;
        in_range("history", self.history, 1, MAX_HISTORY, u32::to_string)?;
        if let Some(schedule) = &self.schedule
            && schedule.len() > 256
        {
            return Err(SpecError::new("schedule", "at most 256 bytes"));
        }
        self.parsed_schedule()?;
        if !self.is_periodic() && !self.concurrency_policy.is_default() {
            return Err(SpecError::new("concurrency_policy", "applies only to a periodic job (with `schedule` or `every`)"));
        }
        Ok(())
    }

    /// The wait before attempt `attempt` (2, 3, ...) of a run: `backoff`,
    /// doubling per attempt, at most [`MAX_BACKOFF`].
    pub fn backoff_before(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(2).min(20);
        self.backoff.saturating_mul(1 << doublings).min(MAX_BACKOFF)
    }
}

impl JobLimits {
    /// Checks the limits; the error names the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        in_range("memory", self.memory, crate::spec::MIN_MEMORY, crate::spec::MAX_MEMORY, ByteSize::to_string)?;
        if self.fuel == Some(0) {
            return Err(SpecError::new("fuel", "must be at least 1 (or `unlimited`)"));
        }
        in_range("timeout", self.timeout, crate::spec::MIN_TIMEOUT, MAX_JOB_TIMEOUT, |d| format_duration(*d))
    }
}

/// Serde for an optional duration written as text.
mod optional_duration {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => serializer.serialize_str(&crate::units::format_duration(*d)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(deserializer)? {
            Some(text) => crate::units::parse_duration(&text).map(Some).map_err(D::Error::custom),
            None => Ok(None),
        }
    }
}

/// A job as stored in [`crate::names::JOBS_BUCKET`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredJob {
    /// The job.
    pub spec: JobSpec,
    /// The KV revision of this record (set when read; the compare-and-set token).
    #[serde(default)]
    pub version: u64,
    /// When the job was first written, ms since the epoch: a periodic job
    /// fires only at times after it.
    pub created_ms: u64,
    /// Runs asked for (`wharf run`, `POST .../runs`): the leader starts a
    /// run for each one its history has not started yet.
    #[serde(default)]
    pub requested: u64,
}

/// Where a run stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// No attempt runs yet: no host can take one now (see [`JobRun::pending`]).
    Pending,
    /// An attempt runs (or is being started).
    Running,
    /// The last attempt failed; the next starts after the backoff.
    BackingOff,
    /// An attempt exited 0.
    Succeeded,
    /// Every attempt failed.
    Failed,
    /// A newer run replaced it (`concurrency_policy: replace`), or its job was deleted.
    Cancelled,
}

impl RunState {
    /// Whether the run is over.
    pub fn is_finished(self) -> bool {
        matches!(self, RunState::Succeeded | RunState::Failed | RunState::Cancelled)
    }
}

/// Why a run exists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunCause {
    /// The schedule fired at this time (ms since the epoch).
    Schedule { at_ms: u64 },
    /// The job's `requested` reached this number.
    Request { number: u64 },
}

/// One run of a job: one or more attempts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRun {
    /// Numbered from 1 per job.
    pub run: u64,
    pub cause: RunCause,
    pub state: RunState,
    /// When the run was created, ms since the epoch.
    pub created_ms: u64,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Its attempts, oldest first.
    #[serde(default)]
    pub attempts: Vec<JobAttempt>,
    /// Why no attempt could start yet (no host fits), while [`RunState::Pending`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
}

impl JobRun {
    /// The exit code of its last attempt, if that attempt exited.
    pub fn exit_code(&self) -> Option<i32> {
        self.attempts.last().and_then(|a| a.exit_code)
    }
}

/// One attempt of a run on one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobAttempt {
    /// Numbered from 1 per run.
    pub attempt: u32,
    /// Where it ran; `None` if no host could take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostId>,
    /// When it was started, ms since the epoch.
    pub started_ms: u64,
    /// When it ended (the host's report, or when the leader gave up on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// The component's exit code, when it exited (0: success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// How it ended: `exited`, `trap`, `fuel_exhausted`, `memory_limit`,
    /// `deadline`, `host_error`, `lost`, `unplaceable`, `cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// What went wrong, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl JobAttempt {
    /// Whether it ended in success (exit code 0).
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// A job's runs, in [`crate::names::JOB_RUNS_BUCKET`]; only the leader
/// writes it, by compare-and-set, *before* it acts (a run is recorded
/// before its attempt is sent to a host), so a new leader neither fires a
/// schedule time twice nor forgets one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobHistory {
    /// Runs, oldest first: every unfinished one and the last `history` finished.
    #[serde(default)]
    pub runs: Vec<JobRun>,
    /// The number the next run gets (runs start at 1).
    #[serde(default)]
    pub last_run: u64,
    /// Requests ([`StoredJob::requested`]) already turned into runs.
    #[serde(default)]
    pub requests_started: u64,
    /// The latest schedule time handled (run, or skipped under `forbid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fire_ms: Option<u64>,
    /// Schedule times skipped because a run was still running (`forbid`).
    #[serde(default)]
    pub skipped: u64,
}

/// The leader asks a host to run, or stop, one attempt of a job, by
/// request/reply on [`crate::names::host_jobs_subject`]. The spec travels
/// with the start: an attempt is one message, and hosts need not read the
/// jobs bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum JobCommand {
    Start { job: Box<JobSpec>, run: u64, attempt: u32, epoch: u64 },
    Cancel { job: ServiceId, run: u64, attempt: u32 },
}

/// A host's answer to a [`JobCommand`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCommandReply {
    /// Whether the host took the command.
    pub accepted: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How an attempt ended, published by its host on
/// [`crate::names::job_result_subject`]; every scheduler listens, the
/// leader records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub job: ServiceId,
    pub run: u64,
    pub attempt: u32,
    pub host: HostId,
    pub finished_ms: u64,
    /// The exit code, when the component exited (0: success).
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// `exited` or what stopped it (see [`JobAttempt::outcome`]).
    pub outcome: String,
    #[serde(default)]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(f: impl FnOnce(&mut JobSpec<()>)) -> JobSpec<()> {
        let mut spec = JobSpec::new("nightly", ());
        f(&mut spec);
        spec
    }

    #[track_caller]
    fn check(spec: JobSpec<()>, expected: Result<(), &str>) {
        match (spec.validate(), expected) {
            (Ok(()), Ok(())) => {}
            (Err(got), Err(want)) => assert!(got.to_string().contains(want), "got {got}, want {want}"),
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn specs_are_checked_by_field() {
        check(job(|_| {}), Ok(()));
        check(job(|j| j.schedule = Some("*/5 * * * *".into())), Ok(()));
        check(job(|j| j.schedule = Some("*/2 * * * * *".into())), Ok(()));
        check(job(|j| j.every = Some(Duration::from_secs(2))), Ok(()));
        check(job(|j| j.schedule = Some("*/5 * * *".into())), Err("schedule: \"*/5 * * *\" is not a cron schedule"));
        check(job(|j| j.schedule = Some("61 * * * *".into())), Err("schedule:"));
        check(
            job(|j| {
                j.schedule = Some("0 3 * * *".into());
                j.time_zone = "Mars/Olympus".into();
            }),
            Err("time_zone: \"Mars/Olympus\" is not a time zone"),
        );
        check(job(|j| j.time_zone = "Europe/Berlin".into()), Err("time_zone: applies only to `schedule`"));
        check(
            job(|j| {
                j.schedule = Some("* * * * *".into());
                j.every = Some(Duration::from_secs(5));
            }),
            Err("every: give `schedule` (cron) or `every`"),
        );
        check(job(|j| j.every = Some(Duration::from_millis(10))), Err("every: must be between 1s"));
        check(job(|j| j.concurrency_policy = ConcurrencyPolicy::Replace), Err("concurrency_policy: applies only to a periodic job"));
        check(job(|j| j.retries = 101), Err("retries: must be between 0 and 100"));
        check(job(|j| j.limits.timeout = Duration::from_secs(25 * 3600)), Err("limits.timeout"));
        check(job(|j| j.name = "Bad_Name".into()), Err("name:"));
    }

    #[test]
    fn cron_schedules_fire_in_their_time_zone() {
        let spec = job(|j| {
            j.schedule = Some("0 3 * * *".into());
            j.time_zone = "Europe/Berlin".into();
        });
        let schedule = spec.parsed_schedule().expect("valid").expect("a schedule");
        // 2026-01-15 12:00:00 UTC; 03:00 in Berlin (UTC+1 in winter) is 02:00 UTC.
        let noon = 1_768_478_400_000;
        let next = schedule.next_after(noon).expect("a next time");
        assert_eq!(next, 1_768_528_800_000, "2026-01-16 02:00 UTC");
        let latest = schedule.latest_at_or_before(noon).expect("a latest time");
        assert_eq!(latest, 1_768_442_400_000, "2026-01-15 02:00 UTC");
        assert_eq!(schedule.latest_at_or_before(latest), Some(latest), "inclusive");
    }

    #[test]
    fn every_counts_from_the_epoch() {
        let schedule = Schedule::Every(Duration::from_secs(2));
        assert_eq!(schedule.latest_at_or_before(5_500), Some(4_000));
        assert_eq!(schedule.next_after(5_500), Some(6_000));
        assert_eq!(schedule.next_after(6_000), Some(8_000));
        let seconds = job(|j| j.schedule = Some("*/2 * * * * *".into())).parsed_schedule().expect("valid").expect("a schedule");
        assert_eq!(seconds.next_after(5_500), Some(6_000));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let spec = job(|j| j.backoff = Duration::from_millis(500));
        assert_eq!(spec.backoff_before(2), Duration::from_millis(500));
        assert_eq!(spec.backoff_before(3), Duration::from_secs(1));
        assert_eq!(spec.backoff_before(4), Duration::from_secs(2));
        assert_eq!(spec.backoff_before(60), MAX_BACKOFF);
    }
}
