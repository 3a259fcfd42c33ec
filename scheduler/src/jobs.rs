//! Jobs in the control plane: the jobs bucket (`wharf-jobs`, written by
//! the API) and the runs bucket (`wharf-job-runs`, written by the leader
//! only) kept in memory from KV watches, the results hosts publish, and the
//! leader's job loop.
//!
//! The loop runs only on the leader, beside the controller: a pass asks
//! the pure core (`wharf_scheduler_core::jobs`) what each job needs now,
//! writes the job's new history by compare-and-set *before* it sends any
//! start or cancel to a host, then sends them. So two schedulers never both
//! start a run (the loser's write is refused), and a new leader reads from
//! the history which schedule times were already handled: it neither fires
//! one twice nor forgets one that came due while no one led.
//!
//! A new leader first sends again the starts of every attempt the
//! histories say runs (its predecessor may have written one and died
//! before sending it); a host acknowledges a start it runs or ran without
//! running it twice.
//!
//! Every scheduler follows the hosts' results (`wharf.host.*.jobresult`,
//! each taken only from the host its subject names) and
//! keeps those not yet recorded, so a follower that takes over has heard
//! the results of attempts its predecessor started.

use crate::events::{NewEvent, Recorder};
use crate::hosts::HostTable;
use crate::store::{StoreError, now_ms};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use wharf_bus::{Bus, Kv, KvError};
use wharf_proto::job::{JobCommand, JobCommandReply, JobHistory, JobResult, RunState, StoredJob};
use wharf_proto::names::{JOB_RESULTS_WILDCARD, JOB_RUNS_BUCKET, JOBS_BUCKET, host_jobs_subject, job_result_subject, service_key};
use wharf_proto::{HostId, ServiceId};
use wharf_scheduler_core::jobs::{AttemptRef, JobHost, JobInput, cancel_runs, plan_job, running_attempts};

/// Results heard and not yet recorded, at most (oldest dropped).
const MAX_RESULTS: usize = 4096;

/// How long a host has to take a start or a cancel.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a change before a pass, so a burst makes one pass.
const COALESCE: Duration = Duration::from_millis(20);

/// The jobs and their runs as this scheduler knows them. Cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    jobs: Kv,
    runs: Kv,
    /// Written by the watch tasks (one event at a time, never across an
    /// await) and by the leader's pass after its own write; read by the API.
    state: RwLock<JobsState>,
    /// Results heard from hosts and not yet recorded in a history (its own lock).
    results: Mutex<VecDeque<JobResult>>,
    /// Bumped after every change of `state` or `results`.
    changes: watch::Sender<u64>,
    /// Buckets whose watch has replayed what existed when it started.
    synced: watch::Sender<usize>,
}

/// The jobs and their histories.
#[derive(Debug, Default, Clone)]
pub struct JobsState {
    pub jobs: BTreeMap<ServiceId, StoredJob>,
    /// Each job's history with the KV revision it was read at.
    pub runs: BTreeMap<ServiceId, (JobHistory, u64)>,
    /// Records that could not be read, by bucket/key.
    pub problems: BTreeMap<String, String>,
}

#[derive(Clone, Copy)]
enum Bucket {
    Jobs,
    Runs,
}

impl Jobs {
    /// Opens (creating when missing) the buckets, follows them and the hosts' results.
    pub async fn start(bus: &Bus) -> Result<Jobs, StoreError> {
        // A quarter of a state bucket's limit each: a job's record and its
        // history (at most 100 runs) are small, one value kept per key, and
        // JetStream reserves every bucket's limit up front.
        let state = bus.storage_limits().state;
        let quarter = wharf_bus::BucketOptions { max_bytes: state.max_bytes.map(|b| (b / 4).max(1 << 20)) };
        let jobs = Jobs {
            inner: Arc::new(Inner {
                jobs: bus.kv_with(JOBS_BUCKET, quarter).await?,
                runs: bus.kv_with(JOB_RUNS_BUCKET, quarter).await?,
                state: RwLock::default(),
                results: Mutex::default(),
                changes: watch::channel(0).0,
                synced: watch::channel(0).0,
            }),
        };
        jobs.follow(Bucket::Jobs).await?;
        jobs.follow(Bucket::Runs).await?;
        jobs.follow_results(bus).await;
        Ok(jobs)
    }

    async fn follow(&self, bucket: Bucket) -> Result<(), StoreError> {
        let kv = match bucket {
            Bucket::Jobs => &self.inner.jobs,
            Bucket::Runs => &self.inner.runs,
        };
        let newest = kv.entries().await?.iter().map(|e| e.revision).max().unwrap_or(0);
        let mut events = kv.watch(">").await?;
        if newest == 0 {
            self.inner.synced.send_modify(|n| *n += 1);
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut replayed = newest == 0;
            while let Some(event) = events.next().await {
                let Some(inner) = weak.upgrade() else { break };
                apply(&inner, bucket, &event);
                if !replayed && event.revision >= newest {
                    replayed = true;
                    inner.synced.send_modify(|n| *n += 1);
                }
                inner.changes.send_modify(|n| *n = n.wrapping_add(1));
            }
        });
        Ok(())
    }

    async fn follow_results(&self, bus: &Bus) {
        let mut results = match bus.subscribe(JOB_RESULTS_WILDCARD).await {
            Ok(subscription) => subscription,
            Err(e) => {
                tracing::error!("cannot follow jobs' results; attempts will be counted lost after their deadline: {e}");
                return;
            }
        };
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            while let Some(message) = results.next().await {
                let Some(inner) = weak.upgrade() else { break };
                match serde_json::from_slice::<JobResult>(&message.payload) {
                    // The subject is the sender's own (its NATS identity may
                    // publish no other host's): a body naming another host is a lie.
                    Ok(result) if message.subject != job_result_subject(&result.host) => {
                        tracing::warn!(subject = %message.subject, host = %result.host, job = %result.job, "ignoring a job result whose body names another host than its subject");
                    }
                    Ok(result) => Jobs { inner }.heard(result),
                    Err(e) => tracing::warn!("ignoring an unreadable job result: {e}"),
                }
            }
        });
    }

    /// Keeps a result until the leader records it.
    fn heard(&self, result: JobResult) {
        {
            let mut results = self.inner.results.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            results.push_back(result);
            while results.len() > MAX_RESULTS {
                results.pop_front();
            }
        }
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Waits until both watches have replayed the state present at start.
    pub async fn synced(&self) {
        let _ = self.inner.synced.subscribe().wait_for(|n| *n >= 2).await;
    }

    /// Reads the state under its lock (briefly).
    pub fn read<T>(&self, read: impl FnOnce(&JobsState) -> T) -> T {
        match self.inner.state.read() {
            Ok(state) => read(&state),
            Err(poisoned) => read(&poisoned.into_inner()),
        }
    }

    /// A job as stored now (not from memory), with its version.
    pub async fn job(&self, id: &ServiceId) -> Result<Option<StoredJob>, StoreError> {
        let key = service_key(&id.namespace, &id.name);
        match self.inner.jobs.get(&key).await? {
            None => Ok(None),
            Some(entry) => decode_job(&key, &entry.value, entry.revision).map(Some),
        }
    }

    /// Writes a job by compare-and-set against `expected` (0: create);
    /// returns the new version.
    pub async fn put_job(&self, job: &StoredJob, expected: u64) -> Result<u64, StoreError> {
        let key = service_key(&job.spec.namespace, &job.spec.name);
        let value = Bytes::from(serde_json::to_vec(job).map_err(|source| StoreError::Corrupt { key: key.clone(), source })?);
        let written = if expected == 0 { self.inner.jobs.create(&key, value).await } else { self.inner.jobs.update(&key, value, expected).await };
        written.map_err(|e| match e {
            KvError::RevisionMismatch { .. } | KvError::AlreadyExists { .. } => StoreError::Fenced { key, expected },
            e => StoreError::Kv(e),
        })
    }

    /// Deletes a job; the leader cancels its unfinished runs and then drops its history.
    pub async fn delete_job(&self, id: &ServiceId) -> Result<(), StoreError> {
        Ok(self.inner.jobs.delete(&service_key(&id.namespace, &id.name)).await?)
    }

    /// Runs the job loop as leader with `epoch` until `stop` turns true.
    pub(crate) async fn lead(self, bus: Bus, hosts: HostTable, events: Recorder, epoch: u64, mut stop: watch::Receiver<bool>) {
        tokio::select! {
            _ = async { tokio::join!(self.synced(), hosts.warmed_up()) } => {}
            _ = stop.changed() => return,
        }
        let mut changes = self.inner.changes.subscribe();
        self.resume(&bus, epoch);
        loop {
            let wake = self.pass(&bus, &hosts, &events, epoch).await;
            let sleep = wake.map_or(Duration::from_secs(3600), |at| Duration::from_millis(at.saturating_sub(now_ms()).max(1)));
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(sleep) => {}
                Ok(()) = changes.changed() => {}
            }
            tokio::time::sleep(COALESCE).await;
        }
    }

    /// Sends again every attempt the histories say runs: a predecessor may
    /// have recorded one and stopped before sending it. Hosts take a start
    /// they already run, or ran, without running it again (a finished one's
    /// result is published again).
    fn resume(&self, bus: &Bus, epoch: u64) {
        let attempts: Vec<(StoredJob, AttemptRef)> = self.read(|state| {
            state
                .runs
                .iter()
                .filter_map(|(id, (history, _))| state.jobs.get(id).map(|job| (job, history)))
                .flat_map(|(job, history)| running_attempts(history).into_iter().map(move |attempt| (job.clone(), attempt)))
                .collect()
        });
        for (job, attempt) in attempts {
            self.send_start(bus, &job, &attempt, epoch);
        }
    }

    /// One pass over every job; returns when to look again.
    async fn pass(&self, bus: &Bus, hosts: &HostTable, events: &Recorder, epoch: u64) -> Option<u64> {
        let now = now_ms();
        let ready: Vec<(JobHost, BTreeSet<wharf_proto::Digest>)> = hosts
            .hosts()
            .into_iter()
            .filter(|h| h.ready)
            .map(|h| {
                let hb = h.heartbeat;
                let free = wharf_proto::ByteSize(hb.capacity.memory.bytes().saturating_sub(hb.memory_reserved.bytes()));
                (JobHost { id: hb.host, labels: hb.labels, free_memory: free, cached: false }, hb.cached.into_iter().collect())
            })
            .collect();
        let (jobs, runs) = self.read(|state| (state.jobs.clone(), state.runs.clone()));
        let results: Vec<JobResult> = self.inner.results.lock().map(|r| r.iter().cloned().collect()).unwrap_or_default();
        let ids: BTreeSet<ServiceId> = jobs.keys().chain(runs.keys()).cloned().collect();
        let mut wake: Option<u64> = None;
        for id in ids {
            let (history, version) = runs.get(&id).cloned().unwrap_or_default();
            let plan = match jobs.get(&id) {
                Some(job) => {
                    let candidates: Vec<JobHost> =
                        ready.iter().map(|(host, cached)| JobHost { cached: cached.contains(&job.spec.component), ..host.clone() }).collect();
                    let mine: Vec<JobResult> = results.iter().filter(|r| r.job == id).cloned().collect();
                    plan_job(JobInput { job, history: &history, results: &mine, hosts: &candidates, now_ms: now })
                }
                None if history.runs.iter().all(|r| r.state.is_finished()) => {
                    // A deleted job with nothing running: its history goes too.
                    if let Err(e) = self.inner.runs.delete(&service_key(&id.namespace, &id.name)).await {
                        tracing::warn!(job = %id, "cannot delete the history of a deleted job: {e}");
                    }
                    continue;
                }
                None => cancel_runs(&history, now, "the job was deleted"),
            };
            if plan.history != history {
                match self.write_history(&id, &plan.history, version).await {
                    Ok(revision) => {
                        if let Ok(mut state) = self.inner.state.write() {
                            state.runs.insert(id.clone(), (plan.history.clone(), revision));
                        }
                        record_events(events, &id, &history, &plan);
                    }
                    Err(e) => {
                        // Someone else wrote it (a newer leader, or our own
                        // write the watch has not shown yet): act on nothing.
                        tracing::debug!(job = %id, "history not written: {e}");
                        continue;
                    }
                }
            }
            if let Some(job) = jobs.get(&id) {
                for start in &plan.starts {
                    self.send_start(bus, job, start, epoch);
                }
            }
            for cancel in &plan.cancels {
                send_cancel(bus, &id, cancel);
            }
            if let Some(at) = plan.wake_at_ms {
                wake = Some(wake.map_or(at, |w| w.min(at)));
            }
        }
        self.forget_recorded();
        wake
    }

    async fn write_history(&self, id: &ServiceId, history: &JobHistory, version: u64) -> Result<u64, StoreError> {
        let key = service_key(&id.namespace, &id.name);
        let value = Bytes::from(serde_json::to_vec(history).map_err(|source| StoreError::Corrupt { key: key.clone(), source })?);
        let written = if version == 0 { self.inner.runs.create(&key, value).await } else { self.inner.runs.update(&key, value, version).await };
        written.map_err(|e| match e {
            KvError::RevisionMismatch { .. } | KvError::AlreadyExists { .. } => StoreError::Fenced { key, expected: version },
            e => StoreError::Kv(e),
        })
    }

    /// Drops results whose attempt the histories no longer wait for.
    fn forget_recorded(&self) {
        let waiting: BTreeSet<(ServiceId, u64, u32)> = self.read(|state| {
            state
                .runs
                .iter()
                .flat_map(|(id, (history, _))| {
                    history.runs.iter().flat_map(move |run| {
                        run.attempts.iter().filter(|a| a.finished_ms.is_none()).map(move |a| (id.clone(), run.run, a.attempt))
                    })
                })
                .collect()
        });
        if let Ok(mut results) = self.inner.results.lock() {
            results.retain(|r| waiting.contains(&(r.job.clone(), r.run, r.attempt)));
        }
    }

    /// Sends an attempt to its host; a host that does not take it is
    /// recorded as the attempt's failure (`host_error`), retried as any.
    fn send_start(&self, bus: &Bus, job: &StoredJob, start: &AttemptRef, epoch: u64) {
        let command = JobCommand::Start { job: Box::new(job.spec.clone()), run: start.run, attempt: start.attempt, epoch };
        let jobs = self.clone();
        let bus = bus.clone();
        let start = start.clone();
        let id = job.spec.id();
        tokio::spawn(async move {
            let refusal = match send(&bus, &start.host, &command).await {
                Ok(()) => return,
                Err(e) => e,
            };
            tracing::warn!(job = %id, run = start.run, attempt = start.attempt, host = %start.host, "{refusal}");
            jobs.heard(JobResult {
                job: id,
                run: start.run,
                attempt: start.attempt,
                host: start.host,
                finished_ms: now_ms(),
                exit_code: None,
                outcome: "host_error".into(),
                error: Some(refusal),
            });
        });
    }
}

/// Records what a written plan did, as events of the job (`wharf events`):
/// attempts started, runs that ended, schedule times skipped, runs waiting
/// for a host (once per reason).
fn record_events(events: &Recorder, id: &ServiceId, before: &JobHistory, plan: &wharf_scheduler_core::jobs::JobPlan) {
    for start in &plan.starts {
        events.record(NewEvent::new(id, "Started", format!("run {} attempt {} started on {}", start.run, start.attempt, start.host)).replica(Some(&start.host), start.run, start.attempt));
    }
    for run in &plan.history.runs {
        let was = before.runs.iter().find(|r| r.run == run.run).map(|r| r.state);
        if run.state.is_finished() && was.is_none_or(|state| !state.is_finished()) {
            let last = run.attempts.last();
            let (reason, how) = match run.state {
                RunState::Succeeded => ("Succeeded", "exited 0".to_string()),
                RunState::Cancelled => ("Cancelled", last.and_then(|a| a.error.clone()).unwrap_or_default()),
                _ => ("Failed", last.and_then(|a| a.error.clone().or(a.outcome.clone())).unwrap_or_default()),
            };
            let event = NewEvent::new(id, reason, format!("run {} after {} attempt(s): {how}", run.run, run.attempts.len()));
            events.record(match last {
                Some(attempt) => event.replica(attempt.host.as_ref(), run.run, attempt.attempt),
                None => event,
            });
        }
        if let Some(pending) = &run.pending {
            events.record_once(format!("job-pending/{id}/{}/{pending}", run.run), NewEvent::new(id, "Unplaceable", format!("run {}: {pending}", run.run)));
        }
    }
    if plan.history.skipped > before.skipped {
        events.record(NewEvent::new(id, "Skipped", "a run was due while one still ran (concurrency_policy: forbid)"));
    }
}

fn send_cancel(bus: &Bus, id: &ServiceId, cancel: &AttemptRef) {
    let command = JobCommand::Cancel { job: id.clone(), run: cancel.run, attempt: cancel.attempt };
    let bus = bus.clone();
    let host = cancel.host.clone();
    tokio::spawn(async move {
        if let Err(e) = send(&bus, &host, &command).await {
            tracing::warn!("{e}");
        }
    });
}

/// Sends a command to a host and reads its answer; `Err` says why it was not taken.
async fn send(bus: &Bus, host: &HostId, command: &JobCommand) -> Result<(), String> {
    let payload = serde_json::to_vec(command).map_err(|e| format!("cannot encode a job command (a bug): {e}"))?;
    let reply = bus
        .request(&host_jobs_subject(host), Bytes::from(payload), COMMAND_TIMEOUT)
        .await
        .map_err(|e| format!("host {host} did not take the job command: {e}"))?;
    match serde_json::from_slice::<JobCommandReply>(&reply.payload) {
        Ok(JobCommandReply { accepted: true, .. }) => Ok(()),
        Ok(JobCommandReply { error, .. }) => Err(format!("host {host} refused the job command: {}", error.unwrap_or_default())),
        Err(e) => Err(format!("host {host} answered the job command unreadably: {e}")),
    }
}

fn decode_job(key: &str, value: &[u8], revision: u64) -> Result<StoredJob, StoreError> {
    let mut job: StoredJob = serde_json::from_slice(value).map_err(|source| StoreError::Corrupt { key: key.to_string(), source })?;
    job.version = revision;
    Ok(job)
}

fn apply(inner: &Inner, bucket: Bucket, event: &wharf_bus::KvEvent) {
    let Ok(mut state) = inner.state.write() else { return };
    let Some(id) = crate::informer::service_of_key(&event.key) else { return };
    let problem = format!("{}/{}", match bucket { Bucket::Jobs => JOBS_BUCKET, Bucket::Runs => JOB_RUNS_BUCKET }, event.key);
    state.problems.remove(&problem);
    let Some(value) = &event.value else {
        match bucket {
            Bucket::Jobs => {
                state.jobs.remove(&id);
            }
            Bucket::Runs => {
                state.runs.remove(&id);
            }
        }
        return;
    };
    let read = match bucket {
        Bucket::Jobs => decode_job(&event.key, value, event.revision).map(|job| {
            state.jobs.insert(id, job);
        }),
        Bucket::Runs => match serde_json::from_slice::<JobHistory>(value) {
            // The leader's own write may already be newer in memory.
            Ok(history) => {
                if state.runs.get(&id).is_none_or(|(_, seen)| *seen <= event.revision) {
                    state.runs.insert(id, (history, event.revision));
                }
                Ok(())
            }
            Err(source) => Err(StoreError::Corrupt { key: event.key.clone(), source }),
        },
    };
    if let Err(e) = read {
        state.problems.insert(problem, e.to_string());
    }
}
