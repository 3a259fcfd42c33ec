//! The host agent: keeps this host running exactly what its assignment says.
//!
//! It watches the host's key in the assignments bucket (level-triggered: every
//! value is the whole desired set, so a missed message never loses work),
//! loads and unloads workloads to match, routes ingress requests to them, and
//! publishes a heartbeat with what it actually runs.

use crate::egress::EgressPolicy;
use crate::ingress::{Handler, RequestBody};
use crate::limits::WorkloadLimits;
use crate::metrics::HostMetrics;
use crate::routes::RouteTable;
use crate::runtime::Runtime;
use crate::workload::{ResponseBody, Workload, WorkloadSpec, error_response};
use bytes::Bytes;
use futures::StreamExt;
use http::{Request, Response, StatusCode};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use wharf_bus::Bus;
use wharf_proto::names::{ARTIFACTS_BUCKET, ASSIGNMENTS_BUCKET, artifact_object, assignment_key, host_heartbeat_subject};
use wharf_proto::{AssignedReplica, Assignment, Capacity, Digest, Heartbeat, HostId, ReplicaState, ReplicaStatus, ServiceId, ServiceSpec};

/// How a host presents itself to the control plane.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This host's id, unique in the cluster.
    pub host: HostId,
    /// Labels matched against services' placement constraints.
    pub labels: BTreeMap<String, String>,
    /// What this host offers to replicas.
    pub capacity: Capacity,
    /// Where this host's ingress listens, reported in heartbeats.
    pub ingress_addr: Option<String>,
    /// How often to send a heartbeat.
    pub heartbeat_interval: Duration,
}

/// One replica this host has been assigned: loading, serving or failed.
#[derive(Clone)]
enum Slot {
    Loading,
    Ready(Workload),
    Failed(String),
}

#[derive(Clone)]
struct Replica {
    generation: u64,
    spec: ServiceSpec,
    slot: Slot,
}

type ReplicaKey = (ServiceId, u32);

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
    /// std locks: held only to read or swap entries, never across an await.
    replicas: RwLock<BTreeMap<ReplicaKey, Replica>>,
    routes: RwLock<RouteTable>,
    /// Bumped whenever a replica changes state, so waiters (tests, the CLI) can watch.
    changes: watch::Sender<u64>,
    stop: watch::Sender<bool>,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The assignments bucket or artifact store could not be opened.
    #[error("cannot open {what} on the bus: {source}")]
    Bus { what: &'static str, source: Box<dyn std::error::Error + Send + Sync> },
}

impl HostAgent {
    /// Starts watching this host's assignment and sending heartbeats.
    pub async fn start(bus: Bus, runtime: Runtime, metrics: HostMetrics, config: AgentConfig) -> Result<HostAgent, AgentError> {
        let assignments = bus.kv(ASSIGNMENTS_BUCKET).await.map_err(|e| AgentError::Bus { what: "the assignments bucket", source: Box::new(e) })?;
        let watch = assignments
            .watch(&assignment_key(&config.host))
            .await
            .map_err(|e| AgentError::Bus { what: "a watch on this host's assignment", source: Box::new(e) })?;
        let (stop, _) = watch::channel(false);
        let (changes, _) = watch::channel(0);
        let agent = HostAgent {
            inner: Arc::new(Inner {
                bus,
                runtime,
                metrics,
                config,
                started_at_ms: now_ms(),
                replicas: RwLock::new(BTreeMap::new()),
                routes: RwLock::new(RouteTable::default()),
                changes,
                stop,
            }),
        };
        let weak = Arc::downgrade(&agent.inner);
        let mut stop = agent.inner.stop.subscribe();
        tokio::spawn(async move {
            let mut watch = watch;
            loop {
                let event = tokio::select! {
                    _ = stop.changed() => break,
                    event = watch.next() => event,
                };
                let Some(event) = event else { break };
                let Some(inner) = weak.upgrade() else { break };
                let agent = HostAgent { inner };
                match event.value {
                    None => agent.converge(Vec::new()),
                    Some(bytes) => match serde_json::from_slice::<Assignment>(&bytes) {
                        Ok(assignment) => agent.converge(assignment.replicas),
                        Err(e) => tracing::error!(revision = event.revision, "ignoring an unreadable assignment: {e}"),
                    },
                }
            }
        });
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
                HostAgent { inner }.send_heartbeat().await;
            }
        });
        Ok(agent)
    }

    /// Stops the background tasks; workloads serving requests finish them.
    pub fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
    }

    /// This host's id.
    pub fn host(&self) -> &HostId {
        &self.inner.config.host
    }

    /// The host's metrics (served by its ingress at `/metrics`).
    pub fn metrics(&self) -> &HostMetrics {
        &self.inner.metrics
    }

    /// The current status of every replica on this host.
    pub fn statuses(&self) -> Vec<ReplicaStatus> {
        let replicas = self.inner.replicas.read().map(|r| r.clone()).unwrap_or_default();
        replicas
            .into_iter()
            .map(|((service, replica), r)| {
                let (state, error, in_flight, requests) = match &r.slot {
                    Slot::Loading => (ReplicaState::Loading, None, 0, 0),
                    Slot::Ready(w) => {
                        let load = w.load();
                        (ReplicaState::Ready, None, load.in_flight, load.requests)
                    }
                    Slot::Failed(e) => (ReplicaState::Failed, Some(e.clone()), 0, 0),
                };
                ReplicaStatus { service, replica, generation: r.generation, state, error, in_flight, requests }
            })
            .collect()
    }

    /// A receiver that changes whenever a replica changes state.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// The ready workloads of `service` on this host.
    pub fn ready_workloads(&self, service: &ServiceId) -> Vec<Workload> {
        let Ok(replicas) = self.inner.replicas.read() else { return Vec::new() };
        replicas
            .range((service.clone(), 0)..=(service.clone(), u32::MAX))
            .filter_map(|(_, r)| match &r.slot {
                Slot::Ready(w) => Some(w.clone()),
                _ => None,
            })
            .collect()
    }

    /// Makes the set of replicas match `desired`: keeps those already at the
    /// right generation, starts loading new or changed ones, drops the rest.
    fn converge(&self, desired: Vec<AssignedReplica>) {
        let mut to_load = Vec::new();
        {
            let Ok(mut replicas) = self.inner.replicas.write() else { return };
            let wanted: BTreeSet<ReplicaKey> = desired.iter().map(|r| (r.service.clone(), r.replica)).collect();
            let before = replicas.len();
            replicas.retain(|key, _| wanted.contains(key));
            if replicas.len() != before {
                tracing::info!(host = %self.inner.config.host, "stopped {} replica(s)", before - replicas.len());
            }
            for assigned in desired {
                let key = (assigned.service.clone(), assigned.replica);
                let current = replicas.get(&key);
                if current.is_some_and(|r| r.generation == assigned.generation && r.spec == assigned.spec) {
                    continue;
                }
                // A changed spec keeps serving from the old workload until the new one is ready.
                let slot = match current.map(|r| &r.slot) {
                    Some(Slot::Ready(old)) => Slot::Ready(old.clone()),
                    _ => Slot::Loading,
                };
                replicas.insert(key.clone(), Replica { generation: assigned.generation, spec: assigned.spec.clone(), slot });
                to_load.push(assigned);
            }
        }
        self.replicas_changed();
        for assigned in to_load {
            let agent = self.clone();
            tokio::spawn(async move { agent.load(assigned).await });
        }
    }

    /// Fetches, checks and compiles one replica's component, then marks it
    /// ready (or failed), unless the assignment moved on meanwhile.
    async fn load(&self, assigned: AssignedReplica) {
        let key = (assigned.service.clone(), assigned.replica);
        let result = self.build_workload(&assigned).await;
        {
            let Ok(mut replicas) = self.inner.replicas.write() else { return };
            let Some(replica) = replicas.get_mut(&key) else { return };
            if replica.generation != assigned.generation || replica.spec != assigned.spec {
                return;
            }
            replica.slot = match result {
                Ok(workload) => {
                    tracing::info!(service = %assigned.service, replica = assigned.replica, "replica ready");
                    Slot::Ready(workload)
                }
                Err(error) => {
                    tracing::warn!(service = %assigned.service, replica = assigned.replica, "replica failed: {error}");
                    Slot::Failed(error)
                }
            };
        }
        self.replicas_changed();
    }

    async fn build_workload(&self, assigned: &AssignedReplica) -> Result<Workload, String> {
        let spec = &assigned.spec;
        let digest = spec.component.clone();
        let bytes = self.fetch_artifact(&digest).await?;
        let runtime = self.inner.runtime.clone();
        let expected = digest.clone();
        let component = tokio::task::spawn_blocking(move || runtime.load(&bytes, Some(&expected)))
            .await
            .map_err(|e| format!("the compile task failed: {e}"))?
            .map_err(|e| e.to_string())?;
        Workload::new(&self.inner.runtime, component, workload_spec(&assigned.service, spec), &self.inner.metrics).map_err(|e| e.to_string())
    }

    async fn fetch_artifact(&self, digest: &Digest) -> Result<Vec<u8>, String> {
        let objects = self.inner.bus.objects(ARTIFACTS_BUCKET).await.map_err(|e| format!("cannot open the artifact store: {e}"))?;
        // The store may be briefly unreachable (NATS restarting): retry a few times.
        let mut last = String::new();
        for attempt in 0..5u32 {
            match objects.get(&artifact_object(digest)).await {
                Ok(Some(bytes)) => return Ok(bytes.to_vec()),
                Ok(None) => return Err(format!("component {digest} is not in the artifact store")),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await;
        }
        Err(format!("cannot fetch component {digest}: {last}"))
    }

    fn replicas_changed(&self) {
        let table = {
            let Ok(replicas) = self.inner.replicas.read() else { return };
            let mut by_service: BTreeMap<&ServiceId, &[wharf_proto::Route]> = BTreeMap::new();
            for ((service, _), replica) in replicas.iter() {
                by_service.entry(service).or_insert(replica.spec.routes.as_slice());
            }
            RouteTable::new(by_service)
        };
        if let Ok(mut routes) = self.inner.routes.write() {
            *routes = table;
        }
        self.inner.changes.send_modify(|n| *n += 1);
    }

    async fn send_heartbeat(&self) {
        let config = &self.inner.config;
        let heartbeat = Heartbeat {
            host: config.host.clone(),
            addr: config.ingress_addr.clone(),
            labels: config.labels.clone(),
            capacity: config.capacity,
            cached: self.inner.runtime.compiled_digests(),
            replicas: self.statuses(),
            sent_at_ms: now_ms(),
            started_at_ms: self.inner.started_at_ms,
        };
        let payload = match serde_json::to_vec(&heartbeat) {
            Ok(payload) => Bytes::from(payload),
            Err(e) => {
                tracing::error!("cannot encode a heartbeat (a bug): {e}");
                return;
            }
        };
        if let Err(e) = self.inner.bus.publish(&host_heartbeat_subject(&config.host), payload).await {
            tracing::debug!("heartbeat not sent: {e}");
        }
    }

    /// Routes one ingress request to a ready local replica.
    pub async fn route(&self, request: Request<RequestBody>) -> Response<ResponseBody> {
        let host = request.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string);
        let host = host.or_else(|| request.uri().authority().map(|a| a.to_string()));
        let path = request.uri().path().to_string();
        let service = self.inner.routes.read().ok().and_then(|routes| routes.lookup(host.as_deref(), &path).cloned());
        let Some(service) = service else {
            return error_response(StatusCode::NOT_FOUND, "no_route", format!("no service is routed at {path} (host {})", host.as_deref().unwrap_or("any")));
        };
        let ready = self.ready_workloads(&service);
        // The least busy replica; ties go to the lowest index.
        match ready.into_iter().min_by_key(|w| w.load().in_flight) {
            Some(workload) => workload.handle(request).await,
            None => {
                let why = self.why_not_ready(&service);
                let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, "not_ready", format!("service {service} has no ready replica: {why}"));
                response.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                response
            }
        }
    }

    fn why_not_ready(&self, service: &ServiceId) -> String {
        let Ok(replicas) = self.inner.replicas.read() else { return "unknown".into() };
        let errors: Vec<String> = replicas
            .range((service.clone(), 0)..=(service.clone(), u32::MAX))
            .filter_map(|((_, index), r)| match &r.slot {
                Slot::Failed(e) => Some(format!("replica {index} failed: {e}")),
                _ => None,
            })
            .collect();
        if errors.is_empty() { "still loading".into() } else { errors.join("; ") }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Handler for HostAgent {
    fn handle(&self, request: Request<RequestBody>) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send + '_>> {
        Box::pin(self.route(request))
    }
}

/// What a workload runs with, from its service spec.
pub fn workload_spec(service: &ServiceId, spec: &ServiceSpec) -> WorkloadSpec {
    let mut workload = WorkloadSpec::new(service.to_string());
    workload.limits = WorkloadLimits {
        memory: spec.limits.memory,
        fuel: spec.limits.fuel,
        timeout: spec.limits.timeout,
        concurrency: spec.limits.concurrency,
        ..WorkloadLimits::default()
    };
    workload.env = spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    workload.egress = EgressPolicy::allow(spec.allow_outbound.iter().cloned());
    workload
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}
