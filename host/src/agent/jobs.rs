//! Jobs on this host: the leader sends a [`JobCommand`] by request/reply on
//! the host's jobs subject; a start is answered at once, the attempt runs
//! in a task of its own (a fresh instance of the component's `wasi:cli/run`
//! under the job's limits) and its end is published as a [`JobResult`].
//! The attempt's log lines are published and kept like a replica's, under
//! the key (job, revision = run, replica = attempt), so `wharf logs` reads
//! them; the last [`FINISHED_KEPT`] finished attempts' rings are kept.

use super::HostAgent;
use crate::egress::EgressPolicy;
use crate::limits::WorkloadLimits;
use crate::logs::LogBuffer;
use crate::workload::{Outcome, Workload, WorkloadSpec};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use wharf_proto::job::{JobCommand, JobCommandReply, JobResult, JobSpec};
use wharf_proto::names::{host_jobs_subject, job_result_subject};
use wharf_proto::{ReplicaKey, ServiceId};

/// Finished attempts whose log lines this host keeps for `wharf logs`.
const FINISHED_KEPT: usize = 64;

/// Environment variables a job's instance sees besides its spec's, as a
/// replica sees [`super::HOST_ENV`]: which job, run and attempt it is.
pub const JOB_ENV: &str = "WHARF_JOB";
/// See [`JOB_ENV`].
pub const RUN_ENV: &str = "WHARF_RUN";
/// See [`JOB_ENV`].
pub const ATTEMPT_ENV: &str = "WHARF_ATTEMPT";

/// The attempts running here and the logs of recent ones (one lock: both
/// change together when an attempt starts or ends; nothing awaits under it).
#[derive(Default)]
pub(super) struct Jobs {
    state: Mutex<JobsState>,
}

#[derive(Default)]
struct JobsState {
    /// Running attempts, to stop them on a cancel, with the memory each may use.
    running: BTreeMap<ReplicaKey, (tokio::task::AbortHandle, u64)>,
    /// Log rings of running and recent attempts, oldest first.
    logs: VecDeque<(ReplicaKey, LogBuffer)>,
    /// How recent attempts ended, oldest first: a start sent again (by a
    /// new leader) for one of them publishes its result again rather than
    /// running it twice.
    finished: VecDeque<(ReplicaKey, JobResult)>,
}

impl Jobs {
    fn lock(&self) -> std::sync::MutexGuard<'_, JobsState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The log rings of `job`'s attempts kept here.
    pub(super) fn logs_of(&self, job: &ServiceId) -> Vec<(ReplicaKey, LogBuffer)> {
        self.lock().logs.iter().filter(|(key, _)| key.service == *job).cloned().collect()
    }

    /// Memory the running attempts may use (their caps), reported in
    /// heartbeats beside the replicas' reservations, so job placement
    /// counts it.
    pub(super) fn memory_reserved(&self) -> u64 {
        self.lock().running.values().map(|(_, memory)| memory).sum()
    }

    fn finish(&self, key: &ReplicaKey, result: &JobResult) {
        let mut state = self.lock();
        state.running.remove(key);
        state.finished.push_back((key.clone(), result.clone()));
        while state.finished.len() > FINISHED_KEPT {
            state.finished.pop_front();
        }
    }

    fn keep_logs(&self, key: ReplicaKey, logs: LogBuffer) {
        let mut state = self.lock();
        state.logs.push_back((key, logs));
        // Keep every running attempt's ring, and the newest finished ones.
        while state.logs.len() > FINISHED_KEPT + state.running.len() {
            state.logs.pop_front();
        }
    }
}

impl HostAgent {
    /// Takes [`JobCommand`]s on this host's jobs subject until the agent stops.
    pub(super) async fn answer_job_commands(&self) -> Result<(), wharf_bus::SubscribeError> {
        self.answer_requests(host_jobs_subject(&self.inner.config.host), |agent, payload| {
            let reply = match serde_json::from_slice::<JobCommand>(payload) {
                Ok(command) => agent.job_command(command),
                Err(e) => refused(format!("unreadable job command: {e}")),
            };
            serde_json::to_vec(&reply).unwrap_or_default()
        })
        .await
    }

    fn job_command(&self, command: JobCommand) -> JobCommandReply {
        match command {
            JobCommand::Start { job, run, attempt, epoch } => {
                let key = ReplicaKey { service: job.id(), revision: run, replica: attempt };
                let mut state = self.inner.jobs.lock();
                // A start is idempotent: a new leader sends again the starts
                // its predecessor recorded, which may have run already.
                if state.running.contains_key(&key) {
                    return JobCommandReply { accepted: true, error: None };
                }
                if let Some((_, result)) = state.finished.iter().find(|(k, _)| *k == key) {
                    let (agent, result) = (self.clone(), result.clone());
                    tokio::spawn(async move { agent.publish_result(&result).await });
                    return JobCommandReply { accepted: true, error: None };
                }
                if self.inner.draining.load(Ordering::Relaxed) {
                    return refused(format!("host {} is draining", self.inner.config.host));
                }
                let newest = self.inner.epoch.fetch_max(epoch, Ordering::Relaxed);
                if epoch < newest {
                    return refused(format!("the start comes from leader epoch {epoch}, older than {newest} (a deposed leader)"));
                }
                let memory = job.limits.memory.bytes();
                let agent = self.clone();
                let task_key = key.clone();
                let task = tokio::spawn(async move {
                    let result = agent.run_attempt(*job, task_key.clone()).await;
                    agent.inner.jobs.finish(&task_key, &result);
                    agent.publish_result(&result).await;
                });
                state.running.insert(key, (task.abort_handle(), memory));
                JobCommandReply { accepted: true, error: None }
            }
            JobCommand::Cancel { job, run, attempt } => {
                let key = ReplicaKey { service: job, revision: run, replica: attempt };
                if let Some((task, _)) = self.inner.jobs.lock().running.remove(&key) {
                    task.abort();
                    tracing::info!(job = %key.service, run, attempt, "job attempt cancelled");
                }
                JobCommandReply { accepted: true, error: None }
            }
        }
    }

    /// Loads the job's component and runs it to completion.
    async fn run_attempt(&self, job: JobSpec, key: ReplicaKey) -> JobResult {
        let host = self.inner.config.host.clone();
        let (exit_code, outcome, error) = match self.job_workload(&job, &key).await {
            Err(e) => (None, "host_error".to_string(), Some(e)),
            Ok(workload) => {
                self.inner.jobs.keep_logs(key.clone(), workload.logs().clone());
                self.publish_logs(key.clone(), &workload);
                tracing::info!(job = %key.service, run = key.revision, attempt = key.replica, "job attempt started");
                match workload.run_to_completion().await {
                    Outcome::Ok => (Some(0), "exited".to_string(), None),
                    Outcome::Exited(code) => (Some(code), "exited".to_string(), Some(Outcome::Exited(code).message(workload.service()))),
                    outcome => (None, outcome.label().to_string(), Some(outcome.message(workload.service()))),
                }
            }
        };
        JobResult {
            job: key.service,
            run: key.revision,
            attempt: key.replica,
            host,
            finished_ms: super::now_ms(),
            exit_code,
            outcome,
            error,
        }
    }

    /// The workload one attempt runs: concurrency 1, the job's limits,
    /// env, egress, key-value buckets and config, and `argv` = the job's
    /// name, then its args.
    async fn job_workload(&self, job: &JobSpec, key: &ReplicaKey) -> Result<Workload, String> {
        let component = self.load_component(&job.component).await?;
        if !component.runs_to_completion() {
            return Err(format!("the component does not export `{}`, which a job runs", wharf_proto::job::RUN_EXPORT));
        }
        let id = &key.service;
        let mut spec = WorkloadSpec::new(id.to_string());
        spec.limits = WorkloadLimits { memory: job.limits.memory, fuel: job.limits.fuel, timeout: job.limits.timeout, concurrency: 1, ..WorkloadLimits::default() };
        spec.env = job.env.iter().filter(|(k, _)| !reserved_env(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
        spec.env.push((super::HOST_ENV.to_string(), self.inner.config.host.to_string()));
        spec.env.push((JOB_ENV.to_string(), id.to_string()));
        spec.env.push((RUN_ENV.to_string(), key.revision.to_string()));
        spec.env.push((ATTEMPT_ENV.to_string(), key.replica.to_string()));
        spec.egress = EgressPolicy::allow(job.allow_outbound.iter().cloned());
        spec.messaging = Some(crate::messaging::MessagingAccess::new(self.inner.bus.clone(), &id.namespace, &id.to_string()));
        spec.keyvalue = Some(crate::keyvalue::KeyValueAccess::new(self.inner.bus.clone(), &id.namespace, &id.to_string(), job.keyvalue.iter().cloned()));
        spec.config.0 = job.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        spec.args = std::iter::once(id.name.clone()).chain(job.args.iter().cloned()).collect();
        Workload::new(&self.inner.runtime, component, spec, &self.inner.metrics).map_err(|e| e.to_string())
    }

    async fn publish_result(&self, result: &JobResult) {
        let subject = job_result_subject(&result.host);
        let Ok(payload) = serde_json::to_vec(result) else { return };
        // The leader gives up on an attempt it hears nothing of only after
        // its deadline, so a lost result is worth a few tries.
        for attempt in 0..5u64 {
            match self.inner.bus.publish(&subject, Bytes::from(payload.clone())).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(job = %result.job, run = result.run, "job result not published (try {}): {e}", attempt + 1),
            }
            tokio::time::sleep(std::time::Duration::from_millis(200 * (attempt + 1))).await;
        }
    }
}

fn reserved_env(key: &str) -> bool {
    [super::HOST_ENV, JOB_ENV, RUN_ENV, ATTEMPT_ENV].contains(&key)
}

fn refused(error: String) -> JobCommandReply {
    JobCommandReply { accepted: false, error: Some(error) }
}
