//! The host agent: keeps this host running exactly what its assignment
//! says, serves every route, and reports.
//!
//! One concern per module, each over its own state:
//!
//! - [`replicas`]: the replicas assigned here and their states, and those
//!   draining (one lock).
//! - [`converge`]: following the assignment (level-triggered: every value
//!   is the whole desired set), loading replicas with their readiness
//!   checks; fenced by the leader's epoch.
//! - [`directory`]: every service's latest spec, traffic split and routes;
//!   revisions' specs (one lock, plus a cache).
//! - [`routing`]: ingress and service-to-service requests, local or over
//!   the bus to a host the directory says has a ready replica; answering
//!   bus requests; the subscriptions on this host's own request subjects.
//! - [`activation`]: holding requests for services at zero while a replica starts.
//! - [`triggers`]: taking in triggered services' messages and handing each
//!   to a replica (its own locks).
//! - [`heartbeat`]: the heartbeat tick and draining.
//! - [`rates`]: namespaces' request-rate quotas at this ingress.
//! - [`logs`]: replicas' log lines for `wharf logs`, published and asked for.
//! - [`jobs`]: attempts of jobs the leader starts here, run to completion
//!   (their own lock).
//!
//! What may change what: assignment events change `replicas` (and through
//! it `listening` and the route table); service and status events, other
//! hosts' ready announcements and lost hosts change `directory`; namespace
//! events change `rates`; requests only read.

mod activation;
mod converge;
mod directory;
mod heartbeat;
mod jobs;
mod logs;
mod rates;
mod replicas;
mod routing;
mod triggers;

pub use jobs::{ATTEMPT_ENV, JOB_ENV, RUN_ENV};
pub use routing::REVISION_HEADER;

use crate::egress::{EgressPolicy, ServiceCalls};
use crate::ingress::{Handler, RequestBody};
use crate::limits::WorkloadLimits;
use crate::metrics::HostMetrics;
use crate::runtime::Runtime;
use crate::workload::{ResponseBody, Workload, WorkloadSpec, error_response};
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Semaphore, watch};
use wharf_bus::Bus;
use wharf_proto::names::{ASSIGNMENTS_BUCKET, REVISIONS_BUCKET, SERVICES_BUCKET, STATUS_BUCKET, assignment_key};
use wharf_proto::{Capacity, HostId, ReplicaStatus, ServiceId, ServiceSpec};

/// How a host presents itself to the control plane.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This host's id, unique in the cluster.
    pub host: HostId,
    /// Labels matched against services' placement constraints.
    pub labels: BTreeMap<String, String>,
    /// What this host offers to replicas.
    pub capacity: Capacity,
    /// How far replicas' memory requests may overcommit `capacity.memory`
    /// (`--memory-overcommit`), reported in heartbeats for placement and
    /// applied to activations here.
    pub memory_overcommit: wharf_proto::Overcommit,
    /// Where this host's ingress listens, reported in heartbeats.
    pub ingress_addr: Option<String>,
    /// How often to send a heartbeat.
    pub heartbeat_interval: Duration,
    /// How long a request for a service scaled to zero is held before it gets 503.
    pub activation_timeout: Duration,
    /// Where services' volumes live on this host (`<dir>/<ns>/<service>/<volume>`);
    /// `None`: this host cannot run services with volumes.
    pub volumes_dir: Option<std::path::PathBuf>,
    /// Requests from the bus answered at once; past it, the host reads no
    /// more from the bus until one finishes (NATS buffers, then drops).
    pub max_bus_handlers: usize,
    /// This host's own sealing key: with one, the host announces its public
    /// half in its heartbeats and takes secrets only from its assignment,
    /// sealed to it by the control plane (it never reads the secrets
    /// bucket). `None`: it reads the bucket itself, with `secret_key`
    /// (`wharf up`, one process).
    pub seal_key: Option<wharf_proto::sealed::HostKey>,
    /// Without `seal_key`: opens secrets sealed at rest (the control
    /// plane's key); `None`: only secrets written before sealing existed
    /// can be read, a sealed one fails its replica with an error saying so.
    pub secret_key: Option<wharf_proto::sealed::SecretKey>,
}

/// The default bound on bus requests answered at once.
pub const DEFAULT_MAX_BUS_HANDLERS: usize = 1024;

/// The running agent. Cheap to clone; the background tasks stop when
/// [`HostAgent::shutdown`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct HostAgent {
    inner: Arc<Inner>,
}

struct Inner {
    bus: Bus,
    runtime: Runtime,
    metrics: HostMetrics,
    config: AgentConfig,
    started_at_ms: u64,
    /// The replicas assigned here (its own lock).
    replicas: replicas::ReplicaSet,
    /// What this host knows of every service (its own lock).
    directory: directory::Directory,
    /// The subscriptions this host listens on for requests, by service and
    /// revision; changed only by `update_listening`.
    listening: Mutex<BTreeMap<routing::Listen, routing::Listener>>,
    /// Bounds the bus requests answered at once.
    handlers: Arc<Semaphore>,
    /// Scale from zero (its own locks).
    activations: activation::Activations,
    /// Message triggers' intakes and delivery listeners (their own locks).
    triggers: triggers::Triggers,
    /// Namespaces' rate quotas (its own lock).
    rates: rates::Rates,
    /// Lost hosts, as the control plane announces them, for requests in
    /// flight to them ([`routing`]).
    hosts_down: tokio::sync::broadcast::Sender<Arc<wharf_proto::HostDown>>,
    /// Which heartbeat goes next: full, or "nothing changed" (its own lock).
    beats: Mutex<wharf_proto::beats::Beats>,
    /// Jobs' attempts running here, and recent ones' logs (its own lock).
    jobs: jobs::Jobs,
    /// Set when the host is draining: it takes no new work.
    draining: AtomicBool,
    /// The newest leader epoch seen on an assignment (fencing).
    epoch: AtomicU64,
    /// The secrets of the newest assignment, sealed to this host's key.
    sealed: watch::Sender<Option<Arc<wharf_proto::SealedSecrets>>>,
    /// Taken while precompiling, so at most one compile runs in the background.
    precompiling: tokio::sync::Mutex<()>,
    /// Bumped whenever a replica changes state, so waiters (held requests,
    /// tests, the CLI) can watch.
    changes: watch::Sender<u64>,
    stop: watch::Sender<bool>,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A bucket or a watch could not be opened.
    #[error("cannot open {what} on the bus: {source}")]
    Bus { what: &'static str, source: Box<dyn std::error::Error + Send + Sync> },
}

fn bus_error(what: &'static str) -> impl FnOnce(wharf_bus::KvError) -> AgentError {
    move |e| AgentError::Bus { what, source: Box::new(e) }
}

impl HostAgent {
    /// Starts following this host's assignment, the services, their
    /// statuses and the namespaces, and sending heartbeats.
    pub async fn start(bus: Bus, runtime: Runtime, metrics: HostMetrics, config: AgentConfig) -> Result<HostAgent, AgentError> {
        let assignments = open_kv(&bus, ASSIGNMENTS_BUCKET).await.map_err(bus_error("the assignments bucket"))?;
        let assignment = assignments.watch(&assignment_key(&config.host)).await.map_err(bus_error("a watch on this host's assignment"))?;
        let services = open_kv(&bus, SERVICES_BUCKET).await.map_err(bus_error("the services bucket"))?;
        let service_watch = services.watch(">").await.map_err(bus_error("a watch on the services"))?;
        let statuses = open_kv(&bus, STATUS_BUCKET).await.map_err(bus_error("the status bucket"))?;
        let status_watch = statuses.watch(">").await.map_err(bus_error("a watch on the services' statuses"))?;
        let revisions = open_kv(&bus, REVISIONS_BUCKET).await.map_err(bus_error("the revisions bucket"))?;
        let namespaces = open_kv(&bus, wharf_proto::names::NAMESPACES_BUCKET).await.map_err(bus_error("the namespaces bucket"))?;
        let namespace_watch = namespaces.watch(">").await.map_err(bus_error("a watch on the namespaces"))?;
        let (stop, _) = watch::channel(false);
        let (changes, _) = watch::channel(0);
        let handlers = Arc::new(Semaphore::new(config.max_bus_handlers.max(1)));
        let agent = HostAgent {
            inner: Arc::new(Inner {
                bus,
                runtime,
                metrics,
                config,
                started_at_ms: now_ms(),
                replicas: replicas::ReplicaSet::default(),
                directory: directory::Directory::new(revisions),
                listening: Mutex::new(BTreeMap::new()),
                handlers,
                activations: activation::Activations::default(),
                triggers: triggers::Triggers::default(),
                rates: rates::Rates::default(),
                beats: Mutex::new(wharf_proto::beats::Beats::new()),
                hosts_down: tokio::sync::broadcast::channel(64).0,
                jobs: jobs::Jobs::default(),
                draining: AtomicBool::new(false),
                epoch: AtomicU64::new(0),
                sealed: watch::channel(None).0,
                precompiling: tokio::sync::Mutex::new(()),
                changes,
                stop,
            }),
        };
        agent.follow(assignment, |agent, event| agent.assignment_changed(event.value.as_deref(), event.revision));
        agent.follow_in_batches(
            service_watch,
            |agent, event| {
                if let Some(component) = agent.inner.directory.service_changed(&event.key, event.value.as_deref()) {
                    agent.precompile(component);
                }
            },
            HostAgent::sync_triggers,
        );
        agent.follow(status_watch, |agent, event| agent.inner.directory.status_changed(event.value.as_deref()));
        agent.follow(namespace_watch, |agent, event| agent.inner.rates.set(&event.key, event.value.as_deref()));
        agent.answer_log_queries().await.map_err(|e| AgentError::Bus { what: "the subscription for log queries", source: Box::new(e) })?;
        agent.follow_lost_hosts().await.map_err(|e| AgentError::Bus { what: "the subscription for lost hosts", source: Box::new(e) })?;
        agent.follow_ready_replicas().await.map_err(|e| AgentError::Bus { what: "the subscription for ready replicas", source: Box::new(e) })?;
        agent.answer_resend_requests().await.map_err(|e| AgentError::Bus { what: "the subscription for heartbeat requests", source: Box::new(e) })?;
        agent.answer_intake().await.map_err(|e| AgentError::Bus { what: "the subscription for messages the control plane takes in", source: Box::new(e) })?;
        agent.answer_job_commands().await.map_err(|e| AgentError::Bus { what: "the subscription for job commands", source: Box::new(e) })?;
        let weak = Arc::downgrade(&agent.inner);
        let mut stop = agent.inner.stop.subscribe();
        let interval = agent.inner.config.heartbeat_interval;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = ticker.tick() => {}
                }
                let Some(inner) = weak.upgrade() else { break };
                HostAgent { inner }.tick().await;
            }
        });
        Ok(agent)
    }

    /// Hands every message on `subject` to `handle`, one at a time, until
    /// the agent stops.
    async fn each_message<F, Fut>(&self, subject: &str, handle: F) -> Result<(), wharf_bus::SubscribeError>
    where
        F: Fn(HostAgent, wharf_bus::Message) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let mut messages = self.inner.bus.subscribe(subject).await?;
        let weak = Arc::downgrade(&self.inner);
        let mut stop = self.inner.stop.subscribe();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = stop.changed() => return,
                    message = messages.next() => message,
                };
                let Some(message) = message else { return };
                let Some(inner) = weak.upgrade() else { return };
                handle(HostAgent { inner }, message).await;
            }
        });
        Ok(())
    }

    /// Applies every event of a KV watch until the agent stops.
    fn follow(&self, watch: wharf_bus::KvWatch, apply: impl Fn(&HostAgent, wharf_bus::KvEvent) + Send + 'static) {
        self.follow_in_batches(watch, apply, |_| {});
    }

    /// Like [`HostAgent::follow`], and runs `settle` once after each batch:
    /// the events that had already arrived when the first was applied
    /// (at most [`BATCH`]), so work that covers every service (the route
    /// table) is done once per burst of changes rather than per change.
    fn follow_in_batches(
        &self,
        mut watch: wharf_bus::KvWatch,
        apply: impl Fn(&HostAgent, wharf_bus::KvEvent) + Send + 'static,
        settle: impl Fn(&HostAgent) + Send + 'static,
    ) {
        /// The most events applied before settling: a long replay still
        /// shows its progress in routes.
        const BATCH: usize = 1024;
        let weak = Arc::downgrade(&self.inner);
        let mut stop = self.inner.stop.subscribe();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = stop.changed() => break,
                    event = watch.next() => event,
                };
                let Some(event) = event else { break };
                let Some(inner) = weak.upgrade() else { break };
                let agent = HostAgent { inner };
                apply(&agent, event);
                let mut ended = false;
                for _ in 1..BATCH {
                    // A stream keeps its state between polls, so a next()
                    // given up when nothing is ready loses no event.
                    match futures::FutureExt::now_or_never(watch.next()) {
                        Some(Some(event)) => apply(&agent, event),
                        Some(None) => {
                            ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                settle(&agent);
                if ended {
                    break;
                }
            }
        });
    }

    /// Answers every request on `subject` with what `answer` makes of its
    /// payload, one at a time, until the agent stops.
    async fn answer_requests(
        &self,
        subject: String,
        answer: impl Fn(&HostAgent, &[u8]) -> Vec<u8> + Send + Sync + 'static,
    ) -> Result<(), wharf_bus::SubscribeError> {
        let answer = Arc::new(answer);
        self.each_message(&subject.clone(), move |agent, message| {
            let (answer, subject) = (answer.clone(), subject.clone());
            async move {
                let reply = answer(&agent, &message.payload);
                if let Err(e) = agent.inner.bus.respond(&message, bytes::Bytes::from(reply)).await {
                    tracing::debug!(%subject, "request not answered: {e}");
                }
            }
        })
        .await
    }

    /// Stops the background tasks; workloads serving requests finish them.
    pub fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
    }

    /// This host's id.
    pub fn host(&self) -> &HostId {
        &self.inner.config.host
    }

    /// The host's metrics.
    pub fn metrics(&self) -> &HostMetrics {
        &self.inner.metrics
    }

    /// The current status of every replica on this host.
    pub fn statuses(&self) -> Vec<ReplicaStatus> {
        self.inner.replicas.statuses()
    }

    /// A receiver that changes whenever a replica changes state.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// The ready workloads of `service` on this host (any revision).
    pub fn ready_workload(&self, service: &ServiceId) -> Option<Workload> {
        self.inner.replicas.least_busy(service, None)
    }

    /// Resolves the host part of an outgoing URL to a service: `name` (in
    /// `namespace`) or `name.namespace`, if such a service exists.
    pub fn resolve(&self, host: &str, namespace: &str) -> Option<ServiceId> {
        let host = host.to_ascii_lowercase();
        let (name, ns) = match host.split_once('.') {
            Some((name, ns)) if !ns.contains('.') => (name.to_string(), ns.to_string()),
            Some(_) => return None,
            None => (host.clone(), namespace.to_string()),
        };
        let id = ServiceId::new(ns, name).ok()?;
        self.inner.directory.exists(&id).then_some(id)
    }

    /// A replica changed state: routes, queue groups and waiters follow.
    fn replicas_changed(&self) {
        self.inner.directory.local_replicas_changed(self.inner.replicas.specs());
        self.update_listening();
        self.sync_triggers();
        self.inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Service-to-service calls through the agent. Weak, so workloads (which
/// the agent owns) do not keep the agent alive.
struct AgentCalls(std::sync::Weak<Inner>);

impl ServiceCalls for AgentCalls {
    fn resolve(&self, host: &str, namespace: &str) -> Option<ServiceId> {
        self.0.upgrade().and_then(|inner| HostAgent { inner }.resolve(host, namespace))
    }

    fn call(&self, caller: &str, service: ServiceId, request: Request<RequestBody>) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>> {
        let agent = self.0.upgrade().map(|inner| HostAgent { inner });
        let caller = caller.to_string();
        Box::pin(async move {
            match agent {
                Some(agent) => agent.call_from(&caller, &service, request).await,
                None => error_response(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the host is shutting down".into()),
            }
        })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Handler for HostAgent {
    fn handle(&self, mut request: Request<RequestBody>) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send + '_>> {
        let span = tracing::trace_span!(target: crate::trace::TARGET, "ingress", host = %self.inner.config.host, method = %request.method(), path = %request.uri().path());
        crate::trace::continue_from(&span, request.headers());
        crate::trace::inject(&span, request.headers_mut());
        Box::pin(tracing::Instrument::instrument(self.route(request), span))
    }
}

/// Environment variables every instance sees besides its spec's, as
/// Kubernetes' downward API gives a pod its node's name: which host,
/// service and revision serve it. They win over the spec's own.
pub const HOST_ENV: &str = "WHARF_HOST";
/// See [`HOST_ENV`].
pub const SERVICE_ENV: &str = "WHARF_SERVICE";
/// See [`HOST_ENV`].
pub const REVISION_ENV: &str = "WHARF_REVISION";

/// What a workload runs with, from its revision's spec, on `host`.
pub fn workload_spec(service: &ServiceId, revision: u64, spec: &ServiceSpec, host: &HostId) -> WorkloadSpec {
    let mut workload = WorkloadSpec::new(service.to_string());
    workload.limits = WorkloadLimits {
        memory: spec.limits.memory,
        fuel: spec.limits.fuel,
        timeout: spec.limits.timeout,
        concurrency: spec.limits.concurrency,
        memory_request: Some(spec.memory_request()),
        instances_request: spec.instances_request(),
        ..WorkloadLimits::default()
    };
    workload.env = spec
        .env
        .iter()
        .filter(|(k, _)| ![HOST_ENV, SERVICE_ENV, REVISION_ENV].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    workload.env.push((HOST_ENV.to_string(), host.to_string()));
    workload.env.push((SERVICE_ENV.to_string(), service.to_string()));
    workload.env.push((REVISION_ENV.to_string(), revision.to_string()));
    workload.egress = EgressPolicy::allow(spec.allow_outbound.iter().cloned());
    workload
}

/// Opens a bucket the control plane owns, waiting for the control plane to
/// create it if the host may not (as under the shipped NATS roles).
async fn open_kv(bus: &Bus, bucket: &str) -> Result<wharf_bus::Kv, wharf_bus::KvError> {
    let mut waited = Duration::ZERO;
    loop {
        match bus.kv(bucket).await {
            Ok(kv) => return Ok(kv),
            Err(e) if waited < Duration::from_secs(60) => {
                if waited.is_zero() {
                    tracing::warn!("waiting for the control plane to create bucket {bucket}: {e}");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                waited += Duration::from_millis(500);
            }
            Err(e) => return Err(e),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}
