//! The host agent: keeps this host running exactly what its assignment says.
//!
//! It watches the host's key in the assignments bucket (level-triggered: every
//! value is the whole desired set, so a missed message never loses work),
//! loads and unloads workloads to match, routes ingress requests to them, and
//! publishes a heartbeat with what it actually runs.

use crate::egress::{EgressPolicy, ServiceCalls, ServiceLink};
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use wharf_bus::Bus;
use wharf_proto::names::{ARTIFACTS_BUCKET, ASSIGNMENTS_BUCKET, SERVICES_BUCKET, artifact_object, assignment_key, host_heartbeat_subject};
use crate::remote::NoReplica;
use wharf_proto::{AssignedReplica, Assignment, Capacity, Demand, Digest, Heartbeat, HostId, ReplicaState, ReplicaStatus, ServiceId, ServiceSpec, StoredService};

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
    /// How long a request for a service scaled to zero is held before it gets 503.
    pub activation_timeout: Duration,
    /// Where services' volumes live on this host (`<dir>/<ns>/<service>/<volume>`);
    /// `None`: this host cannot run services with volumes.
    pub volumes_dir: Option<std::path::PathBuf>,
}

/// How long an activation replica may serve before the control plane has
/// placed the service on this host; after that the placement elsewhere wins.
const ACTIVATION_GRACE: Duration = Duration::from_secs(10);

/// A token bucket: `rps` tokens a second, bursts of up to `rps`.
struct RateBucket {
    rps: u32,
    tokens: f64,
    last: std::time::Instant,
}

impl RateBucket {
    fn new(rps: u32) -> Self {
        RateBucket { rps, tokens: f64::from(rps), last: std::time::Instant::now() }
    }

    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let rate = f64::from(self.rps);
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate.max(1.0));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts a request as held for activation while it waits.
struct Held<'a> {
    agent: &'a HostAgent,
    service: ServiceId,
}

impl<'a> Held<'a> {
    fn enter(agent: &'a HostAgent, service: &ServiceId) -> Self {
        if let Ok(mut held) = agent.inner.held.lock() {
            *held.entry(service.clone()).or_default() += 1;
        }
        Held { agent, service: service.clone() }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Ok(mut held) = self.agent.inner.held.lock()
            && let Some(count) = held.get_mut(&self.service)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.service);
            }
        }
    }
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

/// One service's activation replica, if started, and when; locked while it starts.
type ActivationSlot = Arc<tokio::sync::Mutex<Option<(Workload, std::time::Instant)>>>;

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
    /// Every service in the cluster, from the services bucket: any host's
    /// ingress serves every route, locally or over the bus.
    services: RwLock<BTreeMap<ServiceId, ServiceSpec>>,
    routes: RwLock<RouteTable>,
    /// Services this host answers on the bus (it has a ready replica), with
    /// the task that listens in the service's queue group.
    listening: Mutex<BTreeMap<ServiceId, tokio::task::JoinHandle<()>>>,
    /// Set when the host is draining: it takes no new work.
    draining: AtomicBool,
    /// Replicas started to serve requests held for activation, per service.
    activations: Mutex<BTreeMap<ServiceId, ActivationSlot>>,
    /// Requests held for activation right now, per service (reported as demand).
    held: Mutex<BTreeMap<ServiceId, u64>>,
    /// Namespaces' request-rate quotas at this ingress, and their token buckets.
    rates: Mutex<BTreeMap<String, RateBucket>>,
    /// Taken while precompiling, so at most one compile runs in the background.
    precompiling: tokio::sync::Mutex<()>,
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
        let assignments = open_kv(&bus, ASSIGNMENTS_BUCKET).await.map_err(|e| AgentError::Bus { what: "the assignments bucket", source: Box::new(e) })?;
        let watch = assignments
            .watch(&assignment_key(&config.host))
            .await
            .map_err(|e| AgentError::Bus { what: "a watch on this host's assignment", source: Box::new(e) })?;
        let services = open_kv(&bus, SERVICES_BUCKET).await.map_err(|e| AgentError::Bus { what: "the services bucket", source: Box::new(e) })?;
        let service_watch = services.watch(">").await.map_err(|e| AgentError::Bus { what: "a watch on the services", source: Box::new(e) })?;
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
                services: RwLock::new(BTreeMap::new()),
                routes: RwLock::new(RouteTable::default()),
                listening: Mutex::new(BTreeMap::new()),
                draining: AtomicBool::new(false),
                activations: Mutex::new(BTreeMap::new()),
                held: Mutex::new(BTreeMap::new()),
                rates: Mutex::new(BTreeMap::new()),
                precompiling: tokio::sync::Mutex::new(()),
                changes,
                stop,
            }),
        };
        agent.follow(watch, |agent, event| match event.value {
            None => agent.converge(Vec::new()),
            Some(bytes) => match serde_json::from_slice::<Assignment>(&bytes) {
                Ok(assignment) => agent.converge(assignment.replicas),
                Err(e) => tracing::error!(revision = event.revision, "ignoring an unreadable assignment: {e}"),
            },
        });
        agent.follow(service_watch, |agent, event| agent.service_changed(&event.key, event.value.as_deref()));
        let namespaces = open_kv(&agent.inner.bus, wharf_proto::names::NAMESPACES_BUCKET).await.map_err(|e| AgentError::Bus { what: "the namespaces bucket", source: Box::new(e) })?;
        let namespace_watch = namespaces.watch(">").await.map_err(|e| AgentError::Bus { what: "a watch on the namespaces", source: Box::new(e) })?;
        agent.follow(namespace_watch, |agent, event| agent.namespace_changed(&event.key, event.value.as_deref()));
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

    /// Applies every event of a KV watch until the agent stops.
    fn follow(&self, mut watch: wharf_bus::KvWatch, apply: impl Fn(&HostAgent, wharf_bus::KvEvent) + Send + 'static) {
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
                apply(&HostAgent { inner }, event);
            }
        });
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
        let Ok(replicas) = self.inner.replicas.read() else { return Vec::new() };
        replicas
            .iter()
            .map(|((service, replica), r)| {
                let (state, error, load) = match &r.slot {
                    Slot::Loading => (ReplicaState::Loading, None, None),
                    Slot::Ready(w) => (ReplicaState::Ready, None, Some(w.load())),
                    Slot::Failed(e) => (ReplicaState::Failed, Some(e.clone()), None),
                };
                ReplicaStatus {
                    service: service.clone(),
                    replica: *replica,
                    generation: r.generation,
                    state,
                    error,
                    in_flight: load.as_ref().map_or(0, |l| l.in_flight),
                    requests: load.as_ref().map_or(0, |l| l.requests),
                    latency_micros: load.as_ref().map_or(0, |l| l.latency_micros),
                }
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
        // Compiled here before: no need to fetch the artifact again.
        let runtime = self.inner.runtime.clone();
        let cached = {
            let digest = digest.clone();
            tokio::task::spawn_blocking(move || runtime.load_compiled(&digest)).await.map_err(|e| format!("the load task failed: {e}"))?
        };
        let component = match cached {
            Some(loaded) => loaded.map_err(|e| e.to_string())?,
            None => {
                let bytes = self.fetch_artifact(&digest).await?;
                let runtime = self.inner.runtime.clone();
                let expected = digest.clone();
                tokio::task::spawn_blocking(move || runtime.load(&bytes, Some(&expected)))
                    .await
                    .map_err(|e| format!("the compile task failed: {e}"))?
                    .map_err(|e| e.to_string())?
            }
        };
        let mut workload = workload_spec(&assigned.service, spec);
        workload.services = Some(ServiceLink { calls: Arc::new(AgentCalls(Arc::downgrade(&self.inner))), namespace: assigned.service.namespace.clone() });
        for volume in &spec.volumes {
            let Some(root) = &self.inner.config.volumes_dir else {
                return Err(format!("volume {} needs a data directory, and host {} has none", volume.name, self.inner.config.host));
            };
            let dir = root.join(&assigned.service.namespace).join(&assigned.service.name).join(&volume.name);
            std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create volume {} at {}: {e}", volume.name, dir.display()))?;
            workload.volumes.push((dir, volume.path.clone()));
        }
        workload.config.0 = spec.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if !spec.secrets.is_empty() {
            let secrets = self.inner.bus.kv(wharf_proto::names::SECRETS_BUCKET).await.map_err(|e| format!("cannot open the secret store: {e}"))?;
            let namespace = &assigned.service.namespace;
            for name in &spec.secrets {
                match secrets.get(&wharf_proto::names::secret_key(namespace, name)).await {
                    Ok(Some(entry)) => workload.config.0.push((name.clone(), String::from_utf8_lossy(&entry.value).into_owned())),
                    Ok(None) => return Err(format!("secret {name} is granted to the service but does not exist in namespace {namespace}; create it with `wharf secret set {name} ...`")),
                    Err(e) => return Err(format!("cannot read secret {name}: {e}")),
                }
            }
        }
        workload.keyvalue = Some(crate::keyvalue::KeyValueAccess::new(
            self.inner.bus.clone(),
            &assigned.service.namespace,
            &assigned.service.to_string(),
            spec.keyvalue.iter().cloned(),
        ));
        Workload::new(&self.inner.runtime, component, workload, &self.inner.metrics).map_err(|e| e.to_string())
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

    /// A namespace's quota changed: keep its ingress rate limit.
    fn namespace_changed(&self, namespace: &str, value: Option<&[u8]>) {
        let rps = value.and_then(|v| serde_json::from_slice::<wharf_proto::Namespace>(v).ok()).and_then(|n| n.quota.rps);
        if let Ok(mut rates) = self.inner.rates.lock() {
            match rps {
                Some(rps) => {
                    rates.insert(namespace.to_string(), RateBucket::new(rps));
                }
                None => {
                    rates.remove(namespace);
                }
            }
        }
    }

    /// Takes one request from the namespace's rate quota; false when it is spent.
    fn admit(&self, namespace: &str) -> Option<u32> {
        let mut rates = self.inner.rates.lock().ok()?;
        let bucket = rates.get_mut(namespace)?;
        if bucket.take() { None } else { Some(bucket.rps) }
    }

    /// A service was created, changed or deleted in the services bucket.
    fn service_changed(&self, key: &str, value: Option<&[u8]>) {
        let parsed = value.map(serde_json::from_slice::<StoredService>);
        if let Ok(mut services) = self.inner.services.write() {
            match parsed {
                Some(Ok(stored)) => {
                    self.precompile(stored.spec.component.clone());
                    services.insert(stored.spec.id(), stored.spec);
                }
                Some(Err(e)) => tracing::error!(key, "ignoring an unreadable service: {e}"),
                None => services.retain(|id, _| id.key() != key),
            }
        }
        self.rebuild_routes();
    }

    /// Compiles a service's component into the disk cache in the
    /// background (one at a time), so that if a replica lands here later,
    /// after a failover say, it starts without compiling.
    fn precompile(&self, digest: Digest) {
        let agent = self.clone();
        tokio::spawn(async move {
            let _turn = agent.inner.precompiling.lock().await;
            if agent.inner.runtime.has_compiled(&digest) {
                return;
            }
            let bytes = match agent.fetch_artifact(&digest).await {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::debug!(%digest, "not precompiled: {e}");
                    return;
                }
            };
            let runtime = agent.inner.runtime.clone();
            let result = tokio::task::spawn_blocking(move || runtime.precompile(&bytes, &digest)).await;
            if let Ok(Err(e)) = result {
                tracing::debug!("precompile failed: {e}");
            }
        });
    }

    fn rebuild_routes(&self) {
        let table = {
            let Ok(services) = self.inner.services.read() else { return };
            let Ok(local) = self.inner.replicas.read() else { return };
            // Routes of every service, and of local replicas whose service the
            // watch has not delivered yet (so a fresh host serves at once).
            let mut by_service: BTreeMap<&ServiceId, &[wharf_proto::Route]> =
                services.iter().map(|(id, spec)| (id, spec.routes.as_slice())).collect();
            for ((id, _), replica) in local.iter() {
                by_service.entry(id).or_insert(replica.spec.routes.as_slice());
            }
            RouteTable::new(by_service)
        };
        if let Ok(mut routes) = self.inner.routes.write() {
            *routes = table;
        }
    }

    fn replicas_changed(&self) {
        self.rebuild_routes();
        self.update_listening();
        self.inner.changes.send_modify(|n| *n += 1);
    }

    /// Listens on the bus for exactly the services with a ready local replica.
    fn update_listening(&self) {
        let ready: BTreeSet<ServiceId> = if self.inner.draining.load(Ordering::Relaxed) {
            BTreeSet::new()
        } else {
            self.inner
                .replicas
                .read()
                .map(|r| r.iter().filter(|(_, r)| matches!(r.slot, Slot::Ready(_))).map(|((id, _), _)| id.clone()).collect())
                .unwrap_or_default()
        };
        let Ok(mut listening) = self.inner.listening.lock() else { return };
        listening.retain(|id, task| {
            let keep = ready.contains(id) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for id in ready {
            if listening.contains_key(&id) {
                continue;
            }
            let weak = Arc::downgrade(&self.inner);
            let bus = self.inner.bus.clone();
            let service = id.clone();
            let task = tokio::spawn(async move {
                let mut subscription = match bus.queue_subscribe(&service.subject(), &service.key()).await {
                    Ok(subscription) => subscription,
                    Err(e) => {
                        tracing::error!(%service, "cannot listen for requests on the bus: {e}");
                        return;
                    }
                };
                while let Some(message) = subscription.next().await {
                    let Some(inner) = weak.upgrade() else { break };
                    let agent = HostAgent { inner };
                    let service = service.clone();
                    tokio::spawn(async move { agent.answer(&service, message).await });
                }
            });
            listening.insert(id, task);
        }
    }

    /// Serves one request that came over the bus, always locally.
    async fn answer(&self, service: &ServiceId, message: wharf_bus::Message) {
        let response = match crate::remote::decode_request(&message) {
            Ok(request) => match self.least_busy(service) {
                Some(workload) => workload.handle(request).await,
                None => error_response(StatusCode::SERVICE_UNAVAILABLE, "not_ready", format!("service {service} has no ready replica on host {}", self.inner.config.host)),
            },
            Err(e) => error_response(StatusCode::BAD_REQUEST, "bad_request", format!("unreadable request from the bus: {e}")),
        };
        let payload = crate::remote::encode_reply(&self.inner.bus, response).await;
        if let Err(e) = self.inner.bus.respond(&message, payload).await {
            tracing::debug!(%service, "could not answer a bus request: {e}");
        }
    }

    fn least_busy(&self, service: &ServiceId) -> Option<Workload> {
        // Scanned under the lock: this is on every request's path.
        let assigned = self.inner.replicas.read().ok().and_then(|replicas| {
            replicas
                .range((service.clone(), 0)..=(service.clone(), u32::MAX))
                .filter_map(|(_, r)| match &r.slot {
                    Slot::Ready(w) => Some(w),
                    _ => None,
                })
                .min_by_key(|w| w.load().in_flight)
                .cloned()
        });
        assigned.or_else(|| {
            let slot = self.inner.activations.lock().ok()?.get(service)?.clone();
            let activated = slot.try_lock().ok()?;
            activated.as_ref().map(|(w, _)| w.clone())
        })
    }

    /// Memory reserved by the replicas assigned here.
    fn memory_reserved(&self) -> wharf_proto::ByteSize {
        let Ok(replicas) = self.inner.replicas.read() else { return wharf_proto::ByteSize::default() };
        wharf_proto::ByteSize(replicas.values().map(|r| r.spec.reservation().bytes()).sum())
    }

    /// Requests held for activation plus those in flight on activation
    /// replicas: load the control plane's autoscaler does not see elsewhere.
    fn demand(&self) -> Vec<Demand> {
        let mut demand: BTreeMap<ServiceId, u64> = self.inner.held.lock().map(|h| h.clone()).unwrap_or_default();
        if let Ok(slots) = self.inner.activations.lock() {
            for (service, slot) in slots.iter() {
                if let Ok(activated) = slot.try_lock()
                    && let Some((workload, _)) = activated.as_ref()
                {
                    *demand.entry(service.clone()).or_default() += workload.load().in_flight;
                }
            }
        }
        demand.into_iter().map(|(service, waiting)| Demand { service, waiting }).collect()
    }

    /// Stops taking work: leaves every queue group and reports itself
    /// draining, so the control plane places its replicas elsewhere; then
    /// waits (up to `timeout`) for requests in flight to finish.
    pub async fn drain(&self, timeout: Duration) {
        self.inner.draining.store(true, Ordering::Relaxed);
        self.update_listening();
        self.send_heartbeat().await;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let in_flight: u64 = self.statuses().iter().map(|s| s.in_flight).sum();
            if in_flight == 0 || tokio::time::Instant::now() >= deadline {
                if in_flight > 0 {
                    tracing::warn!("{in_flight} request(s) still in flight after {timeout:?}; stopping anyway");
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn send_heartbeat(&self) {
        self.expire_activations();
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
            draining: self.inner.draining.load(Ordering::Relaxed),
            demand: self.demand(),
            memory_reserved: self.memory_reserved(),
            memory_in_use: resident_memory(),
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
        let host = request.headers().get(http::header::HOST).and_then(|h| h.to_str().ok());
        let host = host.or_else(|| request.uri().authority().map(|a| a.as_str()));
        let path = request.uri().path();
        let service = self.inner.routes.read().ok().and_then(|routes| routes.lookup(host, path).cloned());
        let Some(service) = service else {
            return error_response(StatusCode::NOT_FOUND, "no_route", format!("no service is routed at {path} (host {})", host.unwrap_or("any")));
        };
        if let Some(rps) = self.admit(&service.namespace) {
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("namespace {} is over its quota of {rps} requests/s at this ingress", service.namespace),
            );
            response.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
            return response;
        }
        self.call(&service, request).await
    }

    /// Sends a request to `service`: to a ready local replica if there is
    /// one (the least busy), else over the bus to a host that has one.
    pub async fn call(&self, service: &ServiceId, request: Request<RequestBody>) -> Response<ResponseBody> {
        if let Some(workload) = self.least_busy(service) {
            return workload.handle(request).await;
        }
        let timeout = self.inner.services.read().ok().and_then(|s| s.get(service).map(|spec| spec.limits.timeout));
        let timeout = timeout.unwrap_or(Duration::from_secs(5));
        // The deadline runs on the serving host; allow for a full queue wait and the hop.
        let timeout = timeout + WorkloadLimits::default().queue_timeout + Duration::from_millis(500);
        let payload = match crate::remote::prepare(&self.inner.bus, request).await {
            Ok(payload) => payload,
            Err(response) => return response,
        };
        match crate::remote::send(&self.inner.bus, service, payload.clone(), timeout).await {
            Ok(response) => response,
            // Only now is the whole spec needed (and cloned).
            Err(NoReplica) => match self.inner.services.read().ok().and_then(|s| s.get(service).cloned()) {
                Some(spec) if spec.autoscale.is_some() => self.activate(service, &spec, payload, timeout).await,
                _ => {
                    let local = self.why_not_ready(service);
                    let why = if local.is_empty() { "has no ready replica on any host".to_string() } else { format!("has no ready replica: {local}") };
                    crate::remote::not_ready(service, &why)
                }
            },
        }
    }

    /// Serves a request held for activation on `workload`, now ready.
    async fn serve_held(&self, workload: &Workload, payload: &Bytes, started: std::time::Instant) -> Response<ResponseBody> {
        self.inner.metrics.activation(started.elapsed());
        match crate::remote::decode_request_bytes(payload) {
            Ok(request) => workload.handle(request).await,
            Err(e) => error_response(StatusCode::BAD_REQUEST, "bad_request", e),
        }
    }

    /// Scale from zero: holds a request for a service with no ready replica
    /// while one starts, then serves it. The control plane is told at once;
    /// if this host may run the service, it starts a replica itself (from
    /// its compile cache, in milliseconds) rather than wait for a placement.
    async fn activate(&self, service: &ServiceId, spec: &ServiceSpec, payload: Bytes, timeout: Duration) -> Response<ResponseBody> {
        let started = std::time::Instant::now();
        let _held = Held::enter(self, service);
        self.announce_activation(service).await;
        // A service with volumes runs only where its volumes are: never here by activation.
        let may_run_here = !self.inner.draining.load(Ordering::Relaxed)
            && spec.volumes.is_empty()
            && spec.placement.labels.iter().all(|(k, v)| self.inner.config.labels.get(k) == Some(v));
        if may_run_here {
            match self.activate_locally(service, spec).await {
                Ok(workload) => return self.serve_held(&workload, &payload, started).await,
                Err(e) => tracing::warn!(%service, "cannot start a replica here for activation: {e}"),
            }
        }
        // Wait for a replica anywhere, polling with a growing pause.
        let deadline = started + self.inner.config.activation_timeout;
        let mut pause = Duration::from_millis(5);
        while std::time::Instant::now() < deadline {
            if let Some(workload) = self.least_busy(service) {
                return self.serve_held(&workload, &payload, started).await;
            }
            if let Ok(response) = crate::remote::send(&self.inner.bus, service, payload.clone(), timeout).await {
                self.inner.metrics.activation(started.elapsed());
                return response;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
        crate::remote::not_ready(service, &format!("is starting (scaled to zero) but no replica was ready within {:?}; try again", self.inner.config.activation_timeout))
    }

    /// Tells the control plane a request is waiting for `service`.
    async fn announce_activation(&self, service: &ServiceId) {
        let message = serde_json::json!({"service": service, "host": self.inner.config.host});
        let payload = Bytes::from(message.to_string());
        if let Err(e) = self.inner.bus.publish(wharf_proto::names::ACTIVATE_SUBJECT, payload).await {
            tracing::debug!(%service, "could not announce activation: {e}");
        }
    }

    /// Starts (once, however many requests wait) a replica of `service` on
    /// this host outside its assignment. It serves until an assigned replica
    /// is ready here, or is dropped if the control plane places the service elsewhere.
    async fn activate_locally(&self, service: &ServiceId, spec: &ServiceSpec) -> Result<Workload, String> {
        let slot = {
            let mut slots = self.inner.activations.lock().map_err(|_| "poisoned".to_string())?;
            slots.entry(service.clone()).or_default().clone()
        };
        let mut activated = slot.lock().await;
        if let Some((workload, _)) = activated.as_ref() {
            return Ok(workload.clone());
        }
        let assigned = AssignedReplica { service: service.clone(), replica: u32::MAX, spec: spec.clone(), generation: 0 };
        let workload = self.build_workload(&assigned).await?;
        self.inner.metrics.cold_start();
        tracing::info!(%service, "started a replica to serve requests held for activation");
        *activated = Some((workload.clone(), std::time::Instant::now()));
        Ok(workload)
    }

    /// Drops activation replicas that an assigned replica has replaced, or
    /// that the control plane did not place here within the grace period.
    fn expire_activations(&self) {
        let Ok(mut slots) = self.inner.activations.lock() else { return };
        slots.retain(|service, slot| {
            let Ok(activated) = slot.try_lock() else { return true };
            let Some((_, since)) = activated.as_ref() else { return false };
            let replaced = !self.ready_workloads(service).is_empty();
            let assigned_here = self.inner.replicas.read().is_ok_and(|r| r.keys().any(|(id, _)| id == service));
            let stale = since.elapsed() > ACTIVATION_GRACE && !assigned_here;
            !(replaced || stale)
        });
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
        let known = self.inner.services.read().ok().is_some_and(|s| s.contains_key(&id));
        known.then_some(id)
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
        errors.join("; ")
    }
}

/// Service-to-service calls through the agent. Weak, so workloads (which
/// the agent owns) do not keep the agent alive.
struct AgentCalls(std::sync::Weak<Inner>);

impl ServiceCalls for AgentCalls {
    fn resolve(&self, host: &str, namespace: &str) -> Option<ServiceId> {
        self.0.upgrade().and_then(|inner| HostAgent { inner }.resolve(host, namespace))
    }

    fn call(&self, service: ServiceId, request: Request<RequestBody>) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>> {
        let agent = self.0.upgrade().map(|inner| HostAgent { inner });
        Box::pin(async move {
            match agent {
                Some(agent) => agent.call(&service, request).await,
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

/// This process's resident set, from /proc (0 where there is none).
fn resident_memory() -> wharf_proto::ByteSize {
    let kib = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    wharf_proto::ByteSize(kib.unwrap_or(0) * 1024)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}
