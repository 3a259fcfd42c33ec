//! The control loop of the leader: read the informer's state and the hosts'
//! heartbeats, let the pure core decide (autoscale, rollout, retries,
//! placement), write what changed: each host's assignment and each
//! service's status, by compare-and-set, carrying the lease epoch.
//!
//! Level-triggered and idempotent: a pass runs on every change the
//! informer or the host table announces (bursts coalesced), on an
//! activation, and when a decision asked to look again at a given time (a
//! backoff, a deadline, a canary step's end). With nothing changing, no
//! pass runs at all, whatever the number of services; with autoscaled
//! services, their load is sampled every 500 ms.
//!
//! State kept here, lost (and rebuilt) when leadership moves: when each
//! failure was first seen (for backoffs), hosts each replica should avoid,
//! canary baselines, outlier windows. A new leader starts the backoffs and
//! windows afresh from what the heartbeats say.

use crate::autoscale::Autoscaling;
use crate::events::NewEvent;
use crate::hosts::{HostEntry, HostTable};
use crate::informer::{Informer, problems_of};
use crate::store::{Store, StoreError};
use futures::{FutureExt, StreamExt};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use wharf_proto::sealed::{HostPublicKey, NONCE_LEN, SecretKey};
use wharf_proto::status::MAX_LISTED;
use wharf_proto::{
    Activation, AssignedReplica, Assignment, AutoscaleSummary, ByteSize, EjectedReplica, HostId, Namespace, PlacedRevision, ReplicaKey, ReplicaState,
    ReplicaStatus, RevisionCount, RolloutPhase, SealedSecrets, ServiceId, ServiceSpec, ServiceStatus, StoredService, UnplaceableReplica,
};
use wharf_scheduler_core::{
    FailedReplica, HostInfo, ObservedReplica, ObservedState, PlacementIndex, Plan, ReplicaTraffic, RetryAction, RetryPolicy, RolloutInput,
    Snapshot, StepTraffic, Workload, WorkloadId, outliers, plan_rollout, retry,
};

/// How often autoscaled services' load is sampled (the autoscaler's tick).
const AUTOSCALE_TICK: Duration = Duration::from_millis(500);

/// How often replicas' failure rates are checked for outliers.
const HEALTH_TICK: Duration = Duration::from_secs(1);

/// Pause after a trigger before a pass, so a burst (an apply of many
/// services, heartbeats of many hosts) makes one pass. At least as long as
/// the last pass took to decide: a pass covers every service, so with
/// thousands of them the loop takes at most half a core, and the API
/// (which shares the process) keeps the rest, however fast changes come.
/// Time spent waiting on the store does not count (a pass that rode over
/// a lost NATS node did not use the CPU).
const COALESCE: Duration = Duration::from_millis(20);

/// What the controller needs from the control plane.
#[derive(Clone)]
pub struct Context {
    pub bus: wharf_bus::Bus,
    pub store: Store,
    pub informer: Informer,
    pub hosts: HostTable,
    pub autoscaling: Autoscaling,
    /// How to retry failed replicas.
    pub retry: RetryPolicy,
    /// Where what the controller decides, and why, is recorded (`events.rs`).
    pub events: crate::events::Recorder,
    /// Opens the secrets bucket's values (the control plane's key), to seal
    /// them to each host's own key in its assignment; `None`: stored plain.
    pub secret_key: Option<SecretKey>,
    /// Derives the ephemeral keys and nonces of values sealed to hosts (the
    /// control plane's key, or a random one), so that sealing the same value
    /// to the same host again gives the same bytes and no rewrite.
    pub seal_salt: SecretKey,
    /// What the passes cost, for `/metrics`.
    pub pass_stats: PassStats,
    /// The versions this process's control loops wrote last.
    pub own_writes: OwnWrites,
}

/// How long a control loop starting on a new epoch of leadership waits for
/// the informer to hold what this process's previous loop wrote.
const OWN_WRITES_WAIT: Duration = Duration::from_secs(5);

/// The version of each status and assignment this process's control loops
/// wrote last. A loop started on a new epoch of leadership (the lease
/// lapsed under load and was taken again) starts from the informer, which
/// can lag its predecessor's last writes by a moment; deciding from older
/// records would undo them (a rollout its predecessor marked complete, seen
/// as still rolling, is rolled back past its new stable revision). So it
/// first waits until the informer holds at least these. Shared; cheap to clone.
#[derive(Clone, Default)]
pub struct OwnWrites {
    inner: Arc<std::sync::Mutex<OwnVersions>>,
}

#[derive(Default)]
struct OwnVersions {
    statuses: HashMap<ServiceId, u64>,
    assignments: HashMap<HostId, u64>,
}

impl OwnWrites {
    fn status(&self, id: &ServiceId, version: Option<u64>) {
        if let Ok(mut own) = self.inner.lock() {
            match version {
                Some(version) => own.statuses.insert(id.clone(), version),
                None => own.statuses.remove(id),
            };
        }
    }

    fn assignment(&self, host: &HostId, version: u64) {
        if let Ok(mut own) = self.inner.lock() {
            own.assignments.insert(host.clone(), version);
        }
    }

    /// Whether `state` holds every status and assignment written here, at
    /// its version or a later one.
    fn seen_in(&self, state: &crate::informer::State) -> bool {
        let Ok(own) = self.inner.lock() else { return true };
        own.statuses.iter().all(|(id, version)| state.statuses.get(id).is_some_and(|s| s.version >= *version))
            && own.assignments.iter().all(|(host, version)| state.assignments.get(host).is_some_and(|a| a.version >= *version))
    }

    /// Waits (up to [`OWN_WRITES_WAIT`]) until `informer` holds what was written here.
    async fn seen_by(&self, informer: &Informer) {
        let mut changes = informer.changes();
        let caught_up = async {
            while !informer.read(|state| self.seen_in(state)) {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(OWN_WRITES_WAIT, caught_up).await.is_err() {
            tracing::warn!("the informer does not yet hold the previous control loop's last writes after {OWN_WRITES_WAIT:?}; deciding from what it holds");
        }
    }
}

/// What the control loop's passes have cost in this process, for
/// `/metrics`: how often it ran, and how long it spent deciding (CPU taken
/// from the API and, in `wharf up`, from serving) and on the store. Shared;
/// cheap to clone.
#[derive(Clone, Default)]
pub struct PassStats {
    inner: Arc<std::sync::Mutex<PassTotals>>,
}

#[derive(Default)]
struct PassTotals {
    passes: u64,
    deciding: Duration,
    store: Duration,
    /// Services the last pass went over.
    services: usize,
}

impl PassStats {
    fn record(&self, deciding: Duration, store: Duration, services: usize) {
        if let Ok(mut totals) = self.inner.lock() {
            totals.passes += 1;
            totals.deciding += deciding;
            totals.store += store;
            totals.services = services;
        }
    }

    /// OpenMetrics text (without the closing `# EOF`).
    pub fn metrics(&self) -> String {
        let Ok(totals) = self.inner.lock() else { return String::new() };
        format!(
            "# HELP wharf_controller_passes Passes of the control loop while leading (each goes over every service).\n\
             # TYPE wharf_controller_passes counter\n\
             wharf_controller_passes_total {}\n\
             # HELP wharf_controller_pass_seconds Time the control loop's passes spent, deciding (CPU) or waiting on the store (revisions read, assignments and statuses written).\n\
             # TYPE wharf_controller_pass_seconds counter\n\
             wharf_controller_pass_seconds_total{{part=\"deciding\"}} {:.6}\n\
             wharf_controller_pass_seconds_total{{part=\"store\"}} {:.6}\n\
             # HELP wharf_controller_services Services the last pass went over.\n\
             # TYPE wharf_controller_services gauge\n\
             wharf_controller_services {}\n",
            totals.passes,
            totals.deciding.as_secs_f64(),
            totals.store.as_secs_f64(),
            totals.services
        )
    }
}

/// Runs the control loop as leader with `epoch` until `stop` turns true.
pub async fn run(context: Context, epoch: u64, mut stop: watch::Receiver<bool>) {
    // Decide only on the whole state: every record replayed, and every host
    // alive before this process started heard at least once (deciding
    // earlier would move their replicas away).
    tokio::select! {
        _ = async { tokio::join!(context.informer.synced(), context.hosts.warmed_up()) } => {}
        _ = stop.changed() => return,
    }
    tokio::select! {
        () = context.own_writes.seen_by(&context.informer) => {}
        _ = stop.changed() => return,
    }
    let mut controller = Controller::new(context, epoch);
    let mut informer_changes = controller.context.informer.changes();
    let mut host_changes = controller.context.hosts.changes();
    let mut activations = match controller.context.bus.subscribe(wharf_proto::names::ACTIVATE_SUBJECT).await {
        Ok(subscription) => Some(subscription),
        Err(e) => {
            tracing::error!("cannot follow activation requests; scale from zero waits for the autoscaler's next sample: {e}");
            None
        }
    };
    let mut health = tokio::time::interval(HEALTH_TICK);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut autoscale = tokio::time::interval(AUTOSCALE_TICK);
    autoscale.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wake = controller.pass().await;
        let sleep = match wake {
            Some(at_ms) => Duration::from_millis(at_ms.saturating_sub(crate::store::now_ms()).max(1)),
            None => Duration::from_secs(3600),
        };
        let sleep = tokio::time::sleep(sleep);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                () = &mut sleep => break,
                Ok(()) = informer_changes.changed() => break,
                Ok(()) = host_changes.changed() => break,
                // The autoscaler samples load every tick, but a pass runs
                // only when a decision changed: with thousands of
                // autoscaled services and nothing changing, the loop is idle.
                _ = autoscale.tick(), if controller.autoscaled => {
                    if controller.autoscale() {
                        break;
                    }
                }
                _ = health.tick() => {
                    if controller.check_outliers() {
                        break;
                    }
                }
                Some(message) = next_message(&mut activations) => {
                    // Every announcement queued meanwhile (a burst of wakes
                    // during a pass) goes into the next pass too: taking one
                    // per pass left the later wakes waiting a pass each, so
                    // their activation replicas expired unadopted.
                    if let Some(subscription) = activations.as_mut()
                        && take_announcements(&controller.context.autoscaling, &message, subscription)
                    {
                        controller.autoscale();
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(COALESCE.max(controller.deciding)).await;
    }
}

/// Records the activation announcement `first` and every one queued behind
/// it on `subscription`; false if none could be read.
fn take_announcements(autoscaling: &crate::autoscale::Autoscaling, first: &wharf_bus::Message, subscription: &mut wharf_bus::Subscription) -> bool {
    let mut announced = announce(autoscaling, first);
    while let Some(Some(message)) = subscription.next().now_or_never() {
        announced |= announce(autoscaling, &message);
    }
    announced
}

/// Records an activation announcement; false if it cannot be read.
fn announce(autoscaling: &crate::autoscale::Autoscaling, message: &wharf_bus::Message) -> bool {
    match serde_json::from_slice::<Activation>(&message.payload) {
        Ok(activation) => {
            autoscaling.announce(&activation.service);
            true
        }
        Err(e) => {
            tracing::warn!("ignoring an unreadable activation request: {e}");
            false
        }
    }
}

async fn next_message(subscription: &mut Option<wharf_bus::Subscription>) -> Option<wharf_bus::Message> {
    match subscription {
        Some(subscription) => subscription.next().await,
        None => std::future::pending().await,
    }
}

/// What was last written (or read, at the start of leadership) under a key,
/// with its version: the next write is compare-and-set against it.
#[derive(Clone)]
struct Written<T> {
    value: T,
    version: u64,
}

/// A failure of a replica on a host, as first seen.
#[derive(Clone, Copy)]
struct FailureSeen {
    attempt: u32,
    failures: u32,
    since_ms: u64,
}

/// A replica's request counters at one moment, for outlier windows.
#[derive(Clone, Copy)]
struct Sample {
    at_ms: u64,
    requests: u64,
    errors: u64,
}

/// The controller's memory (see the module docs).
struct Controller {
    context: Context,
    epoch: u64,
    assignments: BTreeMap<HostId, Written<Assignment>>,
    statuses: BTreeMap<ServiceId, Written<ServiceStatus>>,
    failures: HashMap<(ReplicaKey, HostId), FailureSeen>,
    avoid: HashMap<ReplicaKey, BTreeSet<HostId>>,
    /// Replicas no host could take at the last pass.
    unplaceable: BTreeMap<ServiceId, Vec<UnplaceableReplica>>,
    /// Per (service, canary revision, step): each replica's counters when the step started.
    baselines: HashMap<(ServiceId, u64, u32), HashMap<ReplicaKey, StepTraffic>>,
    /// Per replica, request counters over the outlier window.
    samples: HashMap<ReplicaKey, VecDeque<Sample>>,
    /// Replicas ejected recently, per service.
    ejected: BTreeMap<ServiceId, Vec<EjectedReplica>>,
    /// Services whose records could not be written at the last pass, and why.
    write_problems: BTreeMap<ServiceId, String>,
    /// The replicas each service's spec asked for at the last pass, to
    /// record a change of it (`wharf scale`, a deploy) as an event.
    spec_replicas: HashMap<ServiceId, u32>,
    /// Per host, the sealing key and process start its assignment's secrets
    /// were last sealed for: they are read and sealed again when either
    /// changes or its replicas do, not at every pass.
    sealed_for: HashMap<HostId, (Option<String>, u64)>,
    /// Per service, the most linear memory one instance was reported to use
    /// since this leader took over; new replicas reserve at least this.
    /// Kept here rather than read from the current reports, so that a
    /// service scaled to zero still wakes with what it was seen to need.
    memory_peaks: HashMap<ServiceId, ByteSize>,
    /// Placement's view of the cluster, kept between passes and told what
    /// changed, so a pass places what changed rather than rebuilding the
    /// view of every host. `None` at the start of leadership and after an
    /// assignment could not be written (the index would then disagree with
    /// what is written): the next pass starts it again from a reconcile of
    /// the whole state.
    placement: Option<Placement>,
    /// How long the last pass spent deciding (not waiting on the store).
    deciding: Duration,
    /// Whether any service autoscales (at the last pass): then the
    /// autoscaler samples load on its tick.
    autoscaled: bool,
}

/// A [`PlacementIndex`] and the hosts and workloads it was told of, to
/// tell it which left.
struct Placement {
    index: PlacementIndex,
    hosts: HashSet<HostId>,
    workloads: HashSet<WorkloadId>,
}

impl Placement {
    /// Starts from a reconcile of `snapshot`, returning its plan.
    fn start(snapshot: &Snapshot) -> (Plan, Placement) {
        let (plan, index) = PlacementIndex::reconcile(snapshot);
        let hosts = snapshot.hosts.iter().map(|h| h.id.clone()).collect();
        let workloads = snapshot.services.iter().map(|w| w.id.clone()).collect();
        (plan, Placement { index, hosts, workloads })
    }

    /// Whether every host's assignment in the index is the one `written`
    /// (hosts written nothing run nothing): visits every written replica.
    fn agrees_with(&self, written: &BTreeMap<HostId, Written<Assignment>>) -> bool {
        let same = |host: &HostId, replicas: &[AssignedReplica]| {
            let mut wanted: Vec<(WorkloadId, u32)> = replicas.iter().map(|r| (WorkloadId::new(r.service.clone(), r.revision), r.replica)).collect();
            wanted.sort_unstable();
            self.index.assignment(host).unwrap_or_default() == wanted
        };
        written.iter().all(|(host, w)| same(host, &w.value.replicas)) && self.hosts.iter().filter(|h| !written.contains_key(*h)).all(|h| same(h, &[]))
    }

    /// Tells the index what changed since the last pass (hosts and
    /// workloads now: those missing left) and runs a pass. The plan's
    /// assignments cover `hosts`, as a reconcile's would; its actions are
    /// left empty (see inside).
    fn update(&mut self, hosts: Vec<HostInfo>, workloads: Vec<Workload>) -> Plan {
        let host_ids: HashSet<HostId> = hosts.iter().map(|h| h.id.clone()).collect();
        let workload_ids: HashSet<WorkloadId> = workloads.iter().map(|w| w.id.clone()).collect();
        // In id order, so that the same changes give the same decisions.
        let gone_hosts: BTreeSet<&HostId> = self.hosts.difference(&host_ids).collect();
        for gone in gone_hosts {
            self.index.remove_host(gone);
        }
        let gone_workloads: BTreeSet<&WorkloadId> = self.workloads.difference(&workload_ids).collect();
        for gone in gone_workloads {
            self.index.remove_workload(gone);
        }
        let order: Vec<HostId> = hosts.iter().map(|h| h.id.clone()).collect();
        for host in hosts {
            self.index.set_host(host);
        }
        for workload in workloads {
            self.index.set_workload(workload);
        }
        self.hosts = host_ids;
        self.workloads = workload_ids;
        // The controller writes assignments and never reads a plan's
        // actions, so the pass's starts are not made into owned actions:
        // that copies three ids per start (1.5 s at a million replicas).
        let started = self.index.place().started();
        tracing::debug!(started, "placement pass");
        let assignments = order.into_iter().map(|id| {
            let replicas = self.index.assignment(&id).unwrap_or_default();
            (id, replicas)
        });
        Plan { assignments: assignments.collect(), actions: Vec::new(), unplaceable: self.index.unplaceable() }
    }
}

impl Controller {
    fn new(context: Context, epoch: u64) -> Controller {
        let (assignments, statuses) = context.informer.read(|state| {
            let assignments = state
                .assignments
                .iter()
                .map(|(host, a)| (host.clone(), Written { value: (**a).clone(), version: a.version }))
                .collect();
            let statuses = state
                .statuses
                .iter()
                .map(|(id, s)| (id.clone(), Written { value: (**s).clone(), version: s.version }))
                .collect();
            (assignments, statuses)
        });
        Controller {
            context,
            epoch,
            assignments,
            statuses,
            failures: HashMap::new(),
            avoid: HashMap::new(),
            unplaceable: BTreeMap::new(),
            baselines: HashMap::new(),
            samples: HashMap::new(),
            ejected: BTreeMap::new(),
            write_problems: BTreeMap::new(),
            spec_replicas: HashMap::new(),
            sealed_for: HashMap::new(),
            memory_peaks: HashMap::new(),
            placement: None,
            deciding: Duration::ZERO,
            autoscaled: false,
        }
    }

    /// One pass; returns when to run again at the latest.
    async fn pass(&mut self) -> Option<u64> {
        let started = tokio::time::Instant::now();
        let now = crate::store::now_ms();
        let hosts = self.context.hosts.hosts();
        let (services, pins, problems, namespaces) = self.context.informer.read(|state| {
            let quotas = state.namespaces.iter().filter(|(_, n)| n.quota.replicas.is_some() || n.quota.memory.is_some());
            let quotas: BTreeMap<String, Arc<Namespace>> = quotas.map(|(ns, n)| (ns.clone(), n.clone())).collect();
            (state.services.values().cloned().collect::<Vec<Arc<StoredService>>>(), state.pins.clone(), problems_of(state), quotas)
        });
        self.adopt_legacy(&services).await;
        let ready: HashMap<&HostId, &HostEntry> = hosts.iter().filter(|h| h.ready).map(|h| (&h.heartbeat.host, h)).collect();
        let reports: HashMap<(ReplicaKey, &HostId), &ReplicaStatus> = hosts
            .iter()
            .filter(|h| h.ready)
            .flat_map(|h| h.heartbeat.replicas.iter().map(move |r| ((r.key(), &h.heartbeat.host), r)))
            .collect();
        self.note_failures(&reports, now);
        let existing: HashSet<ServiceId> = services.iter().map(|s| s.spec.id()).collect();
        self.memory_peaks.retain(|id, _| existing.contains(id));
        for report in reports.values() {
            if let Some(peak) = report.memory_peak
                && existing.contains(&report.service)
            {
                let known = self.memory_peaks.entry(report.service.clone()).or_default();
                *known = (*known).max(peak);
            }
        }

        // What each service runs now, from the assignments.
        let mut by_service: HashMap<ServiceId, Vec<(HostId, AssignedReplica)>> = HashMap::new();
        for (host, written) in &self.assignments {
            for replica in &written.value.replicas {
                by_service.entry(replica.service.clone()).or_default().push((host.clone(), replica.clone()));
            }
        }
        let current: HashMap<ServiceId, u32> = by_service.iter().map(|(id, r)| (id.clone(), r.len() as u32)).collect();
        let mut in_use = namespace_use(&services, &current, &namespaces);
        // The autoscaler decides on its own tick and on activations
        // (`autoscale`); a pass places what it decided last.
        self.autoscaled = services.iter().any(|s| s.spec.autoscale.is_some());

        // Old revisions' specs, fetched before deciding.
        let fetching = tokio::time::Instant::now();
        self.prefetch_revisions(&services, &by_service).await;
        let fetched = tokio::time::Instant::now();

        let mut wake: Option<u64> = None;
        let mut workloads = Vec::new();
        let mut next_statuses: BTreeMap<ServiceId, ServiceStatus> = BTreeMap::new();
        let mut attempts: HashMap<ReplicaKey, u32> = HashMap::new();
        for stored in &services {
            let id = stored.spec.id();
            if stored.revision == 0 {
                continue;
            }
            let assigned = by_service.get(&id).map(Vec::as_slice).unwrap_or(&[]);
            let observed = self.observe(&id, assigned, &ready, &reports, now);
            let wanted = self.desired_replicas(stored, assigned.len());
            let (replicas, held) = self.within_quota(stored, assigned.len(), wanted, &namespaces, &mut in_use);
            let previous = self.statuses.get(&id).map(|w| w.value.rollout.clone()).unwrap_or_default();
            let step = self.step_traffic(&id, &previous, assigned, &reports);
            let plan = plan_rollout(&RolloutInput {
                now_ms: now,
                latest: stored.revision,
                replicas,
                policy: &stored.spec.rollout,
                traffic: &stored.spec.traffic,
                promoted: stored.promoted == stored.revision,
                state: &previous,
                observed: &observed,
                step_traffic: step.as_ref().map(|(canary, stable)| (canary, stable)),
            });
            for event in &plan.events {
                tracing::info!(service = %id, "{event}");
                self.context.events.record(NewEvent::new(&id, "Rollout", event.clone()));
            }
            crate::events::scaled(&self.context.events, &id, self.statuses.get(&id).and_then(|w| w.value.autoscale.as_ref()), self.context.autoscaling.decision(&id).as_ref());
            if stored.spec.autoscale.is_none()
                && let Some(before) = self.spec_replicas.insert(id.clone(), stored.spec.replicas)
                && before != stored.spec.replicas
            {
                let message = format!("scaled {before} → {} by its spec (`wharf scale`, or a deploy or apply that set replicas)", stored.spec.replicas);
                self.context.events.record(NewEvent::new(&id, "Scaled", message));
            }
            wake = earliest(wake, plan.wake_at_ms);
            if plan.state.phase == RolloutPhase::Canary && plan.state.step_started_at_ms != 0 {
                self.baseline(&id, &plan.state, assigned, &reports);
            }
            wake = earliest(wake, self.retries(assigned, &reports, &ready, &mut attempts, now));
            let mut problem = problems.get(&id).cloned().or_else(|| self.write_problems.get(&id).cloned());
            for (revision, count) in &plan.wanted {
                match self.spec_of(stored, *revision) {
                    Some(spec) => workloads.push(self.workload(&id, *revision, *count, spec, pins.get(&id))),
                    None => {
                        problem = Some(format!("revision {revision} is missing from the store; its replicas cannot run"));
                    }
                }
            }
            let status = ServiceStatus {
                service: id.clone(),
                rollout: plan.state,
                wanted: plan.wanted.iter().map(|(revision, replicas)| RevisionCount { revision: *revision, replicas: *replicas }).collect(),
                unplaceable: Vec::new(),
                unplaceable_more: 0,
                autoscale: self.context.autoscaling.decision(&id).map(|d| AutoscaleSummary {
                    replicas: d.replicas,
                    reason: d.reason,
                    held: held.clone().map(|why| (replicas, why)),
                }),
                ejected: self.ejected.get(&id).cloned().unwrap_or_default(),
                placed: placed(&observed, &ready),
                memory_peak: self.memory_peaks.get(&id).copied(),
                problem,
                observed_generation: stored.generation,
                epoch: self.epoch,
                version: 0,
            };
            next_statuses.insert(id, status);
        }

        // A deleted service's count is forgotten: created again, it starts afresh.
        self.spec_replicas.retain(|id, _| next_statuses.contains_key(id));
        let host_infos: Vec<HostInfo> = hosts.iter().map(host_info).collect();
        // The index is trusted only while what it decided is what is
        // written: anything else (a pass whose plan was not written, a
        // write lost) and it starts again from what is written.
        if self.placement.as_ref().is_some_and(|placement| !placement.agrees_with(&self.assignments)) {
            tracing::info!("the placement index differs from the written assignments; starting it again from them");
            self.placement = None;
        }
        let plan = match &mut self.placement {
            Some(placement) => placement.update(host_infos, workloads),
            None => {
                let snapshot = Snapshot {
                    hosts: host_infos,
                    services: workloads,
                    current: self
                        .assignments
                        .iter()
                        .map(|(host, a)| {
                            let replicas =
                                a.value.replicas.iter().map(|r| (WorkloadId::new(r.service.clone(), r.revision), r.replica)).collect();
                            (host.clone(), replicas)
                        })
                        .collect(),
                };
                let (plan, placement) = Placement::start(&snapshot);
                self.placement = Some(placement);
                plan
            }
        };
        self.unplaceable.clear();
        for u in &plan.unplaceable {
            let reason = match pins.get(&u.service.service) {
                Some(host) => format!(
                    "its volumes are on host {host}, which is not ready; it waits for that host rather than start empty elsewhere ({})",
                    u.reason
                ),
                None => u.reason.clone(),
            };
            self.context.events.record_once(
                format!("unplaceable/{}/{}/{}/{reason}", u.service.service, u.service.revision, u.replica),
                NewEvent::new(&u.service.service, "Unplaceable", format!("replica {} of revision {} cannot be placed: {reason}", u.replica, u.service.revision))
                    .replica(None, u.service.revision, u.replica),
            );
            self.unplaceable.entry(u.service.service.clone()).or_default().push(UnplaceableReplica {
                revision: u.service.revision,
                replica: u.replica,
                reason,
            });
        }
        for (id, status) in &mut next_statuses {
            if let Some(list) = self.unplaceable.get(id) {
                status.unplaceable = list.iter().take(MAX_LISTED).cloned().collect();
                status.unplaceable_more = list.len().saturating_sub(MAX_LISTED) as u32;
            }
        }
        self.deciding = (fetching - started) + fetched.elapsed();
        let writing = tokio::time::Instant::now();
        self.write_assignments(&plan.assignments, &attempts).await;
        self.write_statuses(next_statuses).await;
        self.pin_volumes(&services, &hosts).await;
        self.context.pass_stats.record(self.deciding, (fetched - fetching) + writing.elapsed(), services.len());
        wake
    }

    /// Samples every autoscaled service's load and decides its replica
    /// count (on the autoscale tick and on activation announcements).
    /// Returns whether a decision changed, which a pass must then place.
    fn autoscale(&self) -> bool {
        let hosts = self.context.hosts.hosts();
        let services = self.context.informer.read(|state| state.services.values().cloned().collect::<Vec<Arc<StoredService>>>());
        let mut current: HashMap<ServiceId, u32> = HashMap::new();
        for written in self.assignments.values() {
            for replica in &written.value.replicas {
                *current.entry(replica.service.clone()).or_default() += 1;
            }
        }
        self.context.autoscaling.tick(services.iter().map(|s| s.as_ref()), &current, &hosts)
    }

    /// Gives a service stored before revisions existed its first revision.
    async fn adopt_legacy(&self, services: &[Arc<StoredService>]) {
        for stored in services.iter().filter(|s| s.revision == 0) {
            let change = crate::store::Change { by: "control plane".to_string(), cause: "adopted (stored before revisions)".to_string() };
            match self.context.store.put_service(stored.spec.clone(), Some(stored.version), &change, None).await {
                Ok(_) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => tracing::warn!(service = %stored.spec.id(), "cannot give the service its first revision: {e}"),
            }
        }
    }

    /// Records when each failure (replica, host, attempt) was first seen,
    /// and forgets those that are over.
    fn note_failures(&mut self, reports: &HashMap<(ReplicaKey, &HostId), &ReplicaStatus>, now: u64) {
        let mut seen = HashSet::new();
        for ((key, host), report) in reports {
            if report.state != ReplicaState::Failed {
                continue;
            }
            let id = (key.clone(), (*host).clone());
            let entry = self
                .failures
                .entry(id.clone())
                .or_insert(FailureSeen { attempt: report.attempt, failures: report.failures, since_ms: now });
            if entry.attempt != report.attempt || entry.failures != report.failures {
                *entry = FailureSeen { attempt: report.attempt, failures: report.failures, since_ms: now };
            }
            seen.insert(id);
        }
        self.failures.retain(|id, _| seen.contains(id));
    }

    /// Each assigned replica of a service and how it is doing.
    fn observe(
        &self,
        id: &ServiceId,
        assigned: &[(HostId, AssignedReplica)],
        ready: &HashMap<&HostId, &HostEntry>,
        reports: &HashMap<(ReplicaKey, &HostId), &ReplicaStatus>,
        now: u64,
    ) -> Vec<ObservedReplica> {
        let mut observed: Vec<ObservedReplica> = assigned
            .iter()
            .map(|(host, replica)| {
                let key = replica.key();
                let state = if !ready.contains_key(host) {
                    ObservedState::Lost { reason: format!("host {host} is not ready") }
                } else {
                    match reports.get(&(key.clone(), host)) {
                        Some(report) if report.attempt == replica.attempt => match report.state {
                            ReplicaState::Ready => ObservedState::Ready,
                            ReplicaState::Loading | ReplicaState::Probing => ObservedState::Starting,
                            ReplicaState::Failed => ObservedState::Failed {
                                failures: report.failures.max(1),
                                since_ms: self.failures.get(&(key, host.clone())).map_or(now, |f| f.since_ms),
                                error: report.error.clone().unwrap_or_else(|| "failed".to_string()),
                            },
                        },
                        _ => ObservedState::Starting,
                    }
                };
                ObservedReplica { revision: replica.revision, replica: replica.replica, host: Some(host.clone()), state }
            })
            .collect();
        for u in self.unplaceable.get(id).into_iter().flatten() {
            if !observed.iter().any(|o| o.revision == u.revision && o.replica == u.replica) {
                observed.push(ObservedReplica {
                    revision: u.revision,
                    replica: u.replica,
                    host: None,
                    state: ObservedState::Lost { reason: format!("replica {} cannot be placed: {}", u.replica, u.reason) },
                });
            }
        }
        observed
    }

    /// Replicas a service should run now: the autoscaler's decision or the spec's count.
    fn desired_replicas(&self, stored: &StoredService, running: usize) -> u32 {
        let spec = &stored.spec;
        let mut replicas = match &spec.autoscale {
            Some(policy) => self.context.autoscaling.replicas(&spec.id()).unwrap_or_else(|| {
                u32::try_from(running).unwrap_or(u32::MAX).clamp(policy.min, policy.max.max(policy.min))
            }),
            None => spec.replicas,
        };
        // A service with volumes is placed once (one replica) until its
        // volumes are pinned to a host.
        if !spec.volumes.is_empty() && !self.context.informer.read(|s| s.pins.contains_key(&spec.id())) {
            replicas = replicas.min(1);
        }
        replicas
    }

    /// Holds an autoscaled service's growth from `running` to `wanted`
    /// replicas within its namespace's quota, counting what the
    /// namespace's services hold (`in_use`, which takes what is granted).
    /// Never takes away what runs: a quota lowered below use stops growth
    /// only. With less than wanted, also why, recorded once as an event.
    fn within_quota(
        &self,
        stored: &StoredService,
        running: usize,
        wanted: u32,
        namespaces: &BTreeMap<String, Arc<Namespace>>,
        in_use: &mut HashMap<String, (u64, u64)>,
    ) -> (u32, Option<String>) {
        let spec = &stored.spec;
        let running = u32::try_from(running).unwrap_or(u32::MAX);
        let Some(record) = namespaces.get(&spec.namespace) else { return (wanted, None) };
        if spec.autoscale.is_none() || wanted <= running {
            return (wanted, None);
        }
        let each = spec.memory_request().bytes();
        let (replicas, memory) = in_use.entry(spec.namespace.clone()).or_default();
        let (granted, binding) = record.quota.room(&spec.namespace, *replicas, *memory, u64::from(wanted - running), each);
        *replicas += granted;
        *memory += granted.saturating_mul(each);
        let replicas = running + u32::try_from(granted).unwrap_or(0);
        let Some(why) = binding else { return (replicas, None) };
        self.context.events.record_once(
            format!("quota/{}/{replicas}/{wanted}/{why}", spec.id()),
            NewEvent::new(&spec.id(), "ScaleHeld", format!("the autoscaler wants {wanted} replicas; held at {replicas}: {why}")),
        );
        (replicas, Some(why))
    }

    /// Fetches the specs of the revisions a pass may need that are not cached.
    async fn prefetch_revisions(&self, services: &[Arc<StoredService>], by_service: &HashMap<ServiceId, Vec<(HostId, AssignedReplica)>>) {
        for stored in services {
            let id = stored.spec.id();
            let mut needed: BTreeSet<u64> = by_service.get(&id).into_iter().flatten().map(|(_, r)| r.revision).collect();
            if let Some(status) = self.statuses.get(&id) {
                needed.insert(status.value.rollout.stable);
            }
            needed.extend(stored.spec.traffic.iter().filter_map(|t| t.revision));
            needed.remove(&stored.revision);
            needed.remove(&0);
            for number in needed {
                if self.context.informer.cached_revision(&id, number).is_none()
                    && let Err(e) = self.context.informer.revision(&id, number).await
                {
                    tracing::warn!(service = %id, number, "cannot read a revision: {e}");
                }
            }
        }
    }

    /// The spec of revision `revision` of `stored`'s service.
    fn spec_of(&self, stored: &StoredService, revision: u64) -> Option<Arc<ServiceSpec>> {
        if revision == stored.revision {
            return Some(Arc::new(stored.spec.clone()));
        }
        self.context.informer.cached_revision(&stored.spec.id(), revision).map(|r| Arc::new(r.spec.clone()))
    }

    /// A revision as placement sees it: its volume pin applied, its hosts to avoid.
    fn workload(&self, id: &ServiceId, revision: u64, replicas: u32, spec: Arc<ServiceSpec>, pin: Option<&HostId>) -> Workload {
        let spec = match pin {
            Some(host) if !spec.volumes.is_empty() => {
                let mut pinned = (*spec).clone();
                pinned.placement.labels.insert(wharf_proto::names::HOST_LABEL.to_string(), host.to_string());
                Arc::new(pinned)
            }
            _ => spec,
        };
        let avoid = (0..replicas)
            .filter_map(|replica| {
                let key = ReplicaKey { service: id.clone(), revision, replica };
                self.avoid.get(&key).map(|hosts| (replica, hosts.clone()))
            })
            .collect();
        // A peak learned under a larger cap counts up to what this revision may use.
        let memory_peak = self.memory_peaks.get(id).map(|peak| (*peak).min(spec.limits.most_memory()));
        Workload { id: WorkloadId::new(id.clone(), revision), spec, replicas, avoid, memory_peak }
    }

    /// Retry decisions for a service's failed replicas: attempts to bump go
    /// into `attempts`, hosts to leave into the avoid sets. Returns when to
    /// look again.
    fn retries(
        &mut self,
        assigned: &[(HostId, AssignedReplica)],
        reports: &HashMap<(ReplicaKey, &HostId), &ReplicaStatus>,
        ready: &HashMap<&HostId, &HostEntry>,
        attempts: &mut HashMap<ReplicaKey, u32>,
        now: u64,
    ) -> Option<u64> {
        let mut wake = None;
        for (host, replica) in assigned {
            let key = replica.key();
            let Some(report) = reports.get(&(key.clone(), host)) else { continue };
            if report.state != ReplicaState::Failed {
                continue;
            }
            let Some(seen) = self.failures.get(&(key.clone(), host.clone())) else { continue };
            let avoided = self.avoid.get(&key);
            let elsewhere = ready.keys().any(|h| *h != host && avoided.is_none_or(|a| !a.contains(*h)));
            let failed = FailedReplica {
                failures: report.failures.max(1),
                since_ms: seen.since_ms,
                assigned_attempt: replica.attempt,
                reported_attempt: report.attempt,
                elsewhere,
            };
            let error = report.error.as_deref().unwrap_or("no reason reported");
            let about = |reason, message: String| NewEvent::new(&key.service, reason, message).replica(Some(host), key.revision, key.replica);
            match retry(&self.context.retry, &failed, now) {
                RetryAction::Wait { until_ms } => {
                    wake = earliest(wake, until_ms);
                    // `None`: the host has not acted on the last attempt yet; its failure is told once it has.
                    let Some(until_ms) = until_ms else { continue };
                    let retry_in = wharf_proto::units::format_duration(Duration::from_millis(until_ms.saturating_sub(now).div_ceil(1000) * 1000));
                    self.context.events.record_once(
                        format!("failed/{key}/{host}/{}/{}", report.attempt, report.failures),
                        about("Failed", format!("replica {} failed on host {host} (attempt {}): {error}; retry in {retry_in}", key.replica, report.attempt)),
                    );
                }
                RetryAction::Retry { attempt } => {
                    tracing::info!(replica = %key, %host, attempt, "retrying a failed replica: {}", report.error.as_deref().unwrap_or(""));
                    self.context.events.record(about("Retrying", format!("replica {} retried on host {host} as attempt {attempt} (it failed: {error})", key.replica)));
                    attempts.insert(key, attempt);
                }
                RetryAction::Move => {
                    tracing::info!(replica = %key, %host, "moving a replica that failed {} times on its host", report.failures);
                    self.context.events.record_once(
                        format!("moving/{key}/{host}"),
                        about("Moving", format!("replica {} failed {} times on host {host} (last: {error}); placing it on another host", key.replica, report.failures)),
                    );
                    self.avoid.entry(key).or_default().insert(host.clone());
                }
            }
        }
        wake
    }

    /// For a canary step under way: the canary's and the stable revision's
    /// requests since the step began.
    fn step_traffic(
        &self,
        id: &ServiceId,
        state: &wharf_proto::RolloutState,
        assigned: &[(HostId, AssignedReplica)],
        reports: &HashMap<(ReplicaKey, &HostId), &ReplicaStatus>,
    ) -> Option<(StepTraffic, StepTraffic)> {
        if state.phase != RolloutPhase::Canary || state.step_started_at_ms == 0 {
            return None;
        }
        let baseline = self.baselines.get(&(id.clone(), state.latest, state.step))?;
        let mut canary = StepTraffic::default();
        let mut stable = StepTraffic::default();
        for (host, replica) in assigned {
            let key = replica.key();
            let Some(report) = reports.get(&(key.clone(), host)) else { continue };
            let into = if replica.revision == state.latest {
                &mut canary
            } else if replica.revision == state.stable {
                &mut stable
            } else {
                continue;
            };
            let delta = since(report, baseline.get(&key));
            into.requests += delta.requests;
            into.errors += delta.errors;
            into.latency.merge(&delta.latency);
        }
        Some((canary, stable))
    }

    /// Records each replica's counters when a canary step starts.
    fn baseline(
        &mut self,
        id: &ServiceId,
        state: &wharf_proto::RolloutState,
        assigned: &[(HostId, AssignedReplica)],
        reports: &HashMap<(ReplicaKey, &HostId), &ReplicaStatus>,
    ) {
        let key = (id.clone(), state.latest, state.step);
        if self.baselines.contains_key(&key) {
            return;
        }
        self.baselines.retain(|(service, _, _), _| service != id);
        let counters = assigned
            .iter()
            .filter_map(|(host, replica)| {
                let report = reports.get(&(replica.key(), host))?;
                Some((replica.key(), StepTraffic { requests: report.requests, errors: report.errors, latency: report.latency.clone() }))
            })
            .collect();
        self.baselines.insert(key, counters);
    }

    /// Samples replicas' request counters and ejects outliers (see
    /// [`wharf_scheduler_core::outliers`]): the replica's host is added to
    /// those it avoids, so the next pass moves it. Returns whether it ejected any.
    fn check_outliers(&mut self) -> bool {
        let now = crate::store::now_ms();
        let hosts = self.context.hosts.serving_hosts();
        let mut per_service: BTreeMap<ServiceId, Vec<(ReplicaKey, HostId, u64, u64)>> = BTreeMap::new();
        let mut live = HashSet::new();
        // Only hosts that served requests: at idle this costs nothing per service.
        for host in &hosts {
            for report in host.heartbeat.replicas.iter().filter(|r| r.state == ReplicaState::Ready) {
                let key = report.key();
                let Some(window) = self
                    .context
                    .informer
                    .service(&report.service)
                    .map(|s| s.spec.health.ejection.clone())
                    .filter(|e| e.enabled)
                else {
                    continue;
                };
                let samples = self.samples.entry(key.clone()).or_default();
                samples.push_back(Sample { at_ms: now, requests: report.requests, errors: report.errors });
                let horizon = now.saturating_sub(u64::try_from(window.window.as_millis()).unwrap_or(u64::MAX));
                while samples.len() > 1 && samples.front().is_some_and(|s| s.at_ms < horizon) {
                    samples.pop_front();
                }
                let (first, last) = (samples.front().copied(), samples.back().copied());
                if let (Some(first), Some(last)) = (first, last) {
                    let requests = last.requests.saturating_sub(first.requests);
                    let errors = last.errors.saturating_sub(first.errors);
                    per_service.entry(report.service.clone()).or_default().push((key.clone(), host.heartbeat.host.clone(), requests, errors));
                }
                live.insert(key);
            }
        }
        self.samples.retain(|key, _| live.contains(key));
        let mut ejected_any = false;
        for (service, replicas) in per_service {
            let Some(stored) = self.context.informer.service(&service) else { continue };
            let policy = &stored.spec.health.ejection;
            let window_ms = u64::try_from(policy.window.as_millis()).unwrap_or(u64::MAX);
            let recent = self.ejected.entry(service.clone()).or_default();
            recent.retain(|e| now.saturating_sub(e.at_ms) < window_ms.max(60_000));
            let traffic: Vec<ReplicaTraffic> = replicas
                .iter()
                .map(|(key, _, requests, errors)| ReplicaTraffic {
                    requests: *requests,
                    errors: *errors,
                    ejected: recent.iter().any(|e| e.revision == key.revision && e.replica == key.replica && now.saturating_sub(e.at_ms) < window_ms),
                })
                .collect();
            for (index, reason) in outliers(policy, &traffic) {
                let (key, host, _, _) = &replicas[index];
                tracing::warn!(replica = %key, %host, "ejecting an outlier: {reason}");
                let message = format!("replica {} ejected on host {host} and replaced on another host: {reason}", key.replica);
                self.context.events.record(NewEvent::new(&service, "Ejected", message).replica(Some(host), key.revision, key.replica));
                self.avoid.entry(key.clone()).or_default().insert(host.clone());
                self.samples.remove(key);
                recent.push(EjectedReplica { revision: key.revision, replica: key.replica, host: host.clone(), reason, at_ms: now });
                if recent.len() > MAX_LISTED {
                    recent.remove(0);
                }
                ejected_any = true;
            }
        }
        ejected_any
    }

    /// Writes the assignments that changed, each compare-and-set.
    async fn write_assignments(&mut self, planned: &BTreeMap<HostId, Vec<(WorkloadId, u32)>>, attempts: &HashMap<ReplicaKey, u32>) {
        let mut hosts: BTreeSet<HostId> = planned.keys().cloned().collect();
        hosts.extend(self.assignments.keys().cloned());
        let beats: HashMap<HostId, (Option<String>, u64)> =
            self.context.hosts.hosts().into_iter().map(|h| (h.heartbeat.host, (h.heartbeat.seal_key, h.heartbeat.started_at_ms))).collect();
        for host in hosts {
            let existing = self.assignments.get(&host);
            let current_attempt: HashMap<ReplicaKey, u32> =
                existing.map(|w| w.value.replicas.iter().map(|r| (r.key(), r.attempt)).collect()).unwrap_or_default();
            let mut wanted: Vec<AssignedReplica> = planned
                .get(&host)
                .into_iter()
                .flatten()
                .map(|(workload, replica)| {
                    let key = ReplicaKey { service: workload.service.clone(), revision: workload.revision, replica: *replica };
                    let attempt = attempts.get(&key).copied().or_else(|| current_attempt.get(&key).copied()).unwrap_or(0);
                    AssignedReplica { service: key.service, revision: key.revision, replica: key.replica, attempt }
                })
                .collect();
            wanted.sort();
            // The secrets the replicas' specs grant, sealed to the host's
            // own key: read and sealed again only when the replicas, the
            // host's key or its process changed.
            let beat = beats.get(&host).cloned().unwrap_or((None, 0));
            let same_replicas = existing.is_some_and(|w| w.value.replicas == wanted);
            let secrets = if same_replicas && self.sealed_for.get(&host) == Some(&beat) {
                existing.and_then(|w| w.value.secrets.clone())
            } else {
                match beat.0.as_deref().map(HostPublicKey::parse) {
                    Some(Ok(to)) => self.seal_secrets(&host, &to, &wanted, existing.and_then(|w| w.value.secrets.as_ref())).await,
                    Some(Err(e)) => {
                        tracing::warn!(%host, "the host's heartbeat announces an unreadable sealing key; no secrets are sealed to it: {e}");
                        None
                    }
                    None => None,
                }
            };
            if existing.is_some_and(|w| w.value.replicas == wanted && w.value.secrets == secrets) {
                self.sealed_for.insert(host.clone(), beat);
                continue;
            }
            // Recorded once written: a failed write has them sealed again at the next pass.
            self.sealed_for.remove(&host);
            let (generation, expected) = existing.map_or((1, 0), |w| (w.value.generation + 1, w.version));
            let assignment = Assignment { host: host.clone(), replicas: wanted, version: 0, generation, epoch: self.epoch, secrets };
            match self.context.store.put_assignment(&assignment, expected).await {
                Ok(version) => {
                    tracing::info!(host = %host, replicas = assignment.replicas.len(), "wrote assignment");
                    crate::events::assignment_changed(&self.context.events, &host, existing.map_or(&[][..], |w| &w.value.replicas), &assignment.replicas);
                    self.sealed_for.insert(host.clone(), beat);
                    self.context.own_writes.assignment(&host, version);
                    self.assignments.insert(host, Written { value: assignment, version });
                }
                Err(e) => {
                    // What is written is no longer what the index decided:
                    // the next pass starts placement again from it.
                    self.placement = None;
                    self.write_failed(&format!("the assignment of host {host}"), e, |c| {
                        if let Some(current) = c.context.informer.read(|s| s.assignments.get(&host).cloned()) {
                            c.assignments.insert(host.clone(), Written { value: (*current).clone(), version: current.version });
                        }
                    });
                }
            }
        }
    }

    /// The secrets the specs of `replicas` grant, opened with the control
    /// plane's key and sealed to `to`, the host's own key (`None` when they
    /// grant none). A secret that does not exist is left out (the host's
    /// replica fails saying so); one that cannot be read now keeps its
    /// value from `existing` if that was sealed to the same key.
    async fn seal_secrets(&self, host: &HostId, to: &HostPublicKey, replicas: &[AssignedReplica], existing: Option<&SealedSecrets>) -> Option<SealedSecrets> {
        let mut keys = BTreeSet::new();
        for replica in replicas {
            match self.context.informer.revision(&replica.service, replica.revision).await {
                Ok(Some(revision)) => {
                    keys.extend(revision.spec.secrets.iter().map(|name| wharf_proto::names::secret_key(&replica.service.namespace, name)));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(replica = %replica.key(), "cannot read the revision's spec to seal its secrets: {e}"),
            }
        }
        if keys.is_empty() {
            return None;
        }
        let to_text = to.to_string();
        let kept = existing.filter(|s| s.to == to_text);
        let mut values = BTreeMap::new();
        for key in keys {
            match self.context.store.secrets_kv().get(&key).await {
                Ok(Some(entry)) => match wharf_proto::sealed::open(self.context.secret_key.as_ref(), &key, &entry.value) {
                    Ok(plain) => {
                        let parts: [&[u8]; 3] = [to_text.as_bytes(), key.as_bytes(), &plain];
                        let ephemeral = self.context.seal_salt.derive("host-seal-ephemeral", &parts);
                        let mut nonce = [0u8; NONCE_LEN];
                        nonce.copy_from_slice(&self.context.seal_salt.derive("host-seal-nonce", &parts)[..NONCE_LEN]);
                        values.insert(key.clone(), hex::encode(to.seal(&key, &plain, ephemeral, nonce)));
                    }
                    Err(e) => tracing::warn!(%host, secret = %key, "cannot open the secret to seal it to the host: {e}"),
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%host, secret = %key, "cannot read the secret to seal it to the host: {e}");
                    if let Some(value) = kept.and_then(|s| s.values.get(&key)) {
                        values.insert(key, value.clone());
                    }
                }
            }
        }
        Some(SealedSecrets { to: to_text, values })
    }

    /// Writes the statuses that changed, and deletes those of services gone.
    async fn write_statuses(&mut self, next: BTreeMap<ServiceId, ServiceStatus>) {
        self.write_problems.clear();
        let gone: Vec<ServiceId> = self.statuses.keys().filter(|id| !next.contains_key(*id)).cloned().collect();
        for id in gone {
            let still_running = self.assignments.values().any(|a| a.value.replicas.iter().any(|r| r.service == id));
            if still_running {
                continue;
            }
            match self.context.store.delete_status(&id).await {
                Ok(()) => {
                    self.context.own_writes.status(&id, None);
                    self.statuses.remove(&id);
                    self.ejected.remove(&id);
                    self.avoid.retain(|key, _| key.service != id);
                }
                Err(e) => tracing::warn!(service = %id, "cannot delete the status of a deleted service: {e}"),
            }
        }
        for (id, status) in next {
            let existing = self.statuses.get(&id);
            if existing.is_some_and(|w| same_status(&w.value, &status)) {
                continue;
            }
            let expected = existing.map_or(0, |w| w.version);
            match self.context.store.put_status(&status, expected).await {
                Ok(version) => {
                    self.context.own_writes.status(&id, Some(version));
                    self.statuses.insert(id, Written { value: status, version });
                }
                Err(e) => {
                    self.write_problems.insert(id.clone(), format!("its status could not be written: {e}"));
                    self.write_failed(&format!("the status of {id}"), e, |c| {
                        if let Some(current) = c.context.informer.status(&id) {
                            c.statuses.insert(id.clone(), Written { value: (*current).clone(), version: current.version });
                        }
                    });
                }
            }
        }
    }

    /// A write that failed: logged; a fenced one re-reads the record from
    /// the informer (another leader may have written it; the lease will tell).
    fn write_failed(&mut self, what: &str, error: StoreError, reread: impl FnOnce(&mut Controller)) {
        match &error {
            StoreError::Fenced { .. } => {
                tracing::warn!("{what} changed under this leader: {error}");
                reread(self);
            }
            _ => tracing::warn!("cannot write {what}: {error}"),
        }
    }

    /// Pins each service with volumes to the host where its current
    /// revision first became ready (not merely placed: a host that dies
    /// before reporting would otherwise keep the volume forever).
    async fn pin_volumes(&self, services: &[Arc<StoredService>], hosts: &[HostEntry]) {
        for stored in services.iter().filter(|s| !s.spec.volumes.is_empty()) {
            let id = stored.spec.id();
            if self.context.informer.read(|s| s.pins.contains_key(&id)) {
                continue;
            }
            let serving = hosts.iter().filter(|h| h.ready).find(|h| {
                h.heartbeat.replicas.iter().any(|r| r.service == id && r.state == ReplicaState::Ready && r.revision == stored.revision)
            });
            if let Some(host) = serving {
                tracing::info!(service = %id, host = %host.heartbeat.host, "volumes pinned to host");
                if let Err(e) = self.context.store.pin_volumes(&id, &host.heartbeat.host).await {
                    tracing::warn!(service = %id, "cannot pin volumes: {e}");
                }
            }
        }
    }
}


/// Where a service runs, per host and revision, and whether a replica is
/// ready there on a ready host that is not draining: what hosts route
/// requests by ([`ServiceStatus::placed`]).
fn placed(observed: &[ObservedReplica], ready: &HashMap<&HostId, &HostEntry>) -> Vec<PlacedRevision> {
    let mut placed: BTreeMap<(HostId, u64), bool> = BTreeMap::new();
    for replica in observed {
        let Some(host) = &replica.host else { continue };
        let serving = matches!(replica.state, ObservedState::Ready) && ready.get(host).is_some_and(|h| !h.heartbeat.draining);
        *placed.entry((host.clone(), replica.revision)).or_default() |= serving;
    }
    placed.into_iter().map(|((host, revision), ready)| PlacedRevision { host, revision, ready }).collect()
}

/// Whether two statuses say the same (their versions aside).
fn same_status(a: &ServiceStatus, b: &ServiceStatus) -> bool {
    ServiceStatus { version: 0, ..a.clone() } == ServiceStatus { version: 0, ..b.clone() }
}

/// A replica's requests since `baseline` (all of them when there is none,
/// or when it restarted since).
fn since(report: &ReplicaStatus, baseline: Option<&StepTraffic>) -> StepTraffic {
    match baseline {
        Some(b) if report.requests >= b.requests => StepTraffic {
            requests: report.requests - b.requests,
            errors: report.errors.saturating_sub(b.errors),
            latency: report.latency.since(&b.latency),
        },
        _ => StepTraffic { requests: report.requests, errors: report.errors, latency: report.latency.clone() },
    }
}

fn host_info(h: &HostEntry) -> HostInfo {
    let mut labels = h.heartbeat.labels.clone();
    labels.insert(wharf_proto::names::HOST_LABEL.to_string(), h.heartbeat.host.to_string());
    HostInfo {
        id: h.heartbeat.host.clone(),
        ready: h.ready,
        labels,
        capacity: h.heartbeat.capacity,
        memory_overcommit: h.heartbeat.memory_overcommit.unwrap_or_default(),
        cached: h.heartbeat.cached.iter().cloned().collect(),
        in_flight: h.heartbeat.replicas.iter().map(|r| r.in_flight).sum(),
    }
}

/// Replicas and reserved memory the services of each namespace with a
/// quota hold now (`current`: replicas assigned per service).
fn namespace_use(services: &[Arc<StoredService>], current: &HashMap<ServiceId, u32>, quotas: &BTreeMap<String, Arc<Namespace>>) -> HashMap<String, (u64, u64)> {
    let mut in_use: HashMap<String, (u64, u64)> = HashMap::new();
    for stored in services.iter().filter(|s| quotas.contains_key(&s.spec.namespace)) {
        let count = u64::from(current.get(&stored.spec.id()).copied().unwrap_or(0));
        let (replicas, memory) = in_use.entry(stored.spec.namespace.clone()).or_default();
        *replicas += count;
        *memory += count.saturating_mul(stored.spec.memory_request().bytes());
    }
    in_use
}

fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_loop_waits_for_the_versions_its_predecessor_wrote() {
        let own = OwnWrites::default();
        let id = ServiceId::new("default", "web").expect("an id");
        let mut state = crate::informer::State::default();
        assert!(own.seen_in(&state), "nothing written: nothing to wait for");
        own.status(&id, Some(7));
        assert!(!own.seen_in(&state), "the status is not in the informer yet");
        let mut status = ServiceStatus::new(id.clone());
        status.version = 6;
        state.statuses.insert(id.clone(), Arc::new(status.clone()));
        assert!(!own.seen_in(&state), "an older version of it");
        status.version = 9;
        state.statuses.insert(id.clone(), Arc::new(status));
        assert!(own.seen_in(&state), "that version or a later one");
        let host = HostId::new("a").expect("a host id");
        own.assignment(&host, 3);
        assert!(!own.seen_in(&state), "the assignment is not in the informer yet");
        state.assignments.insert(host.clone(), Arc::new(Assignment { host, replicas: Vec::new(), version: 3, generation: 1, epoch: 1, secrets: Default::default() }));
        assert!(own.seen_in(&state));
        own.status(&id, None);
        state.statuses.clear();
        assert!(own.seen_in(&state), "a status deleted here is not waited for");
    }

    fn host(n: usize) -> HostInfo {
        HostInfo {
            id: HostId::new(format!("host-{n}")).expect("a host id"),
            ready: true,
            labels: BTreeMap::new(),
            capacity: wharf_proto::Capacity { memory: ByteSize::gib(4), instances: 64 },
            memory_overcommit: wharf_proto::Overcommit::NONE,
            cached: BTreeSet::new(),
            in_flight: 0,
        }
    }

    fn workload(name: &str, replicas: u32) -> Workload {
        let mut spec = ServiceSpec::new(name, wharf_proto::Digest::of(name.as_bytes()));
        spec.replicas = replicas;
        Workload::new(spec, 1)
    }

    /// The assignments as the controller would have written `plan`.
    fn written(plan: &Plan) -> BTreeMap<HostId, Written<Assignment>> {
        let assignment = |host: &HostId, replicas: &[(WorkloadId, u32)]| Assignment {
            host: host.clone(),
            replicas: replicas.iter().map(|(w, replica)| AssignedReplica { service: w.service.clone(), revision: w.revision, replica: *replica, attempt: 0 }).collect(),
            version: 1,
            generation: 1,
            epoch: 1,
            secrets: None,
        };
        plan.assignments.iter().map(|(host, replicas)| (host.clone(), Written { value: assignment(host, replicas), version: 1 })).collect()
    }

    /// The index is kept between passes only while it decided what is
    /// written: a lost write, a replica written elsewhere, or an
    /// assignment for a host it does not know, and the controller must
    /// start it again from the written state.
    #[test]
    fn the_placement_index_agrees_only_with_what_it_decided() {
        let snapshot = Snapshot { hosts: (0..3).map(host).collect(), services: vec![workload("web", 3), workload("api", 2)], current: BTreeMap::new() };
        let (plan, mut placement) = Placement::start(&snapshot);
        let mut stored = written(&plan);
        assert!(placement.agrees_with(&stored), "what it decided, written");

        // A host's write was lost: it still runs nothing.
        let (lost, _) = stored.iter().find(|(_, w)| !w.value.replicas.is_empty()).map(|(h, w)| (h.clone(), w.clone())).expect("a host runs something");
        let mut without = stored.clone();
        without.remove(&lost);
        assert!(!placement.agrees_with(&without), "a lost write");

        // A replica written on another host than decided.
        let mut moved = stored.clone();
        let replica = moved.get_mut(&lost).expect("the host").value.replicas.pop().expect("a replica");
        let other = moved.keys().find(|h| **h != lost).cloned().expect("another host");
        moved.get_mut(&other).expect("the other host").value.replicas.push(replica);
        assert!(!placement.agrees_with(&moved), "a replica elsewhere");

        // An assignment for a host the index never heard of.
        let stranger = host(9).id;
        stored.insert(stranger.clone(), Written { value: Assignment { host: stranger, replicas: Vec::new(), version: 1, generation: 1, epoch: 1, secrets: None }, version: 1 });
        assert!(placement.agrees_with(&stored), "an empty assignment for an unknown host runs nothing, as the index says");
        let replica = stored.get_mut(&lost).expect("the host").value.replicas[0].clone();
        stored.get_mut(&host(9).id).expect("the stranger").value.replicas.push(replica);
        assert!(!placement.agrees_with(&stored), "a replica on a host the index does not know");

        // After an update that changes nothing, it agrees with the same writes again.
        let plan = placement.update((0..3).map(host).collect(), vec![workload("web", 3), workload("api", 2)]);
        assert!(placement.agrees_with(&written(&plan)), "an update's plan, written");
    }

    /// A burst of wakes announced while a pass runs is taken in whole by the
    /// next pass: each woken service is scaled up then, not one per pass.
    #[tokio::test]
    async fn every_activation_queued_during_a_pass_reaches_the_next_one() {
        let bus = wharf_bus::Bus::local(wharf_bus::LocalStore::in_memory().expect("an in-memory store"));
        let mut subscription = bus.subscribe(wharf_proto::names::ACTIVATE_SUBJECT).await.expect("subscribed");
        let services: Vec<wharf_proto::StoredService> = (0..5)
            .map(|n| {
                let mut spec = ServiceSpec::new(format!("s{n}"), wharf_proto::Digest::of(b"hello"));
                spec.autoscale = Some(serde_json::from_str(r#"{"min": 0, "max": 1}"#).expect("a policy"));
                serde_json::from_value(serde_json::json!({ "spec": spec, "generation": 1, "created_at_ms": 0, "updated_at_ms": 0 })).expect("a stored service")
            })
            .collect();
        let host = HostId::new("h1").expect("a host id");
        for stored in &services {
            let payload = serde_json::to_vec(&Activation { service: stored.spec.id(), host: host.clone() }).expect("encoded");
            bus.publish(wharf_proto::names::ACTIVATE_SUBJECT, payload.into()).await.expect("published");
        }
        bus.publish(wharf_proto::names::ACTIVATE_SUBJECT, bytes::Bytes::from_static(b"not json")).await.expect("published");
        let first = subscription.next().await.expect("the first announcement");
        let autoscaling = crate::autoscale::Autoscaling::default();
        assert!(take_announcements(&autoscaling, &first, &mut subscription), "announcements were read");
        autoscaling.tick(services.iter(), &HashMap::new(), &[]);
        for stored in &services {
            assert_eq!(autoscaling.replicas(&stored.spec.id()), Some(1), "{} was woken by its announcement", stored.spec.id());
        }
        // Nothing is left queued for a later pass.
        assert!(subscription.next().now_or_never().is_none(), "every announcement was taken");
        // An unreadable one alone wakes no pass.
        bus.publish(wharf_proto::names::ACTIVATE_SUBJECT, bytes::Bytes::from_static(b"{}")).await.expect("published");
        let unreadable = subscription.next().await.expect("the message");
        assert!(!take_announcements(&autoscaling, &unreadable, &mut subscription), "nothing readable");
    }
}
