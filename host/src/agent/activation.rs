//! Scale from zero: a request for an autoscaled service with no ready
//! replica anywhere is held while one starts. The control plane is told at
//! once (an [`Activation`] on the bus); if this host may run the service,
//! it starts a replica itself from its compile cache (milliseconds) rather
//! than wait for a placement. Held requests wake when a replica becomes
//! ready here, or when another host announces one on the service's ready
//! subject (naming itself and the revision, so the request goes straight
//! there); a slow poll is only the fallback for a lost announcement.

use super::HostAgent;
use crate::remote::Prepared;
use crate::workload::{ResponseBody, Workload, error_response};
use bytes::Bytes;
use futures::StreamExt;
use http::{Response, StatusCode};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use wharf_proto::names::service_ready_wildcard;
use wharf_proto::{Activation, Demand, ServiceId, ServiceSpec};

/// How long an activation replica may serve before the control plane has
/// placed the service on this host; after that the placement elsewhere wins.
const ACTIVATION_GRACE: Duration = Duration::from_secs(10);

/// How often a held request looks for a replica elsewhere when no
/// announcement came (announcements are published at most once).
const FALLBACK_POLL: Duration = Duration::from_millis(500);

/// An activation replica.
struct Activated {
    workload: Workload,
    /// The revision it runs, and that revision's spec.
    revision: u64,
    spec: Arc<ServiceSpec>,
    since: Instant,
    /// Whether an assigned replica took it over ([`Activations::adopt`]).
    adopted: bool,
}

/// One service's activation replica, if started; locked while it starts.
type ActivationSlot = Arc<tokio::sync::Mutex<Option<Activated>>>;

/// Activation state of this host.
#[derive(Default)]
pub(crate) struct Activations {
    /// Replicas started to serve held requests, per service. Held only to
    /// find or insert a slot; a slot's own lock is held while it starts.
    slots: Mutex<BTreeMap<ServiceId, ActivationSlot>>,
    /// Requests held right now, per service (reported as demand).
    held: Mutex<BTreeMap<ServiceId, u64>>,
}

/// Counts a request as held for activation while it waits.
pub(super) struct Held<'a> {
    activations: &'a Activations,
    service: ServiceId,
}

impl<'a> Held<'a> {
    pub(super) fn enter(activations: &'a Activations, service: &ServiceId) -> Self {
        if let Ok(mut held) = activations.held.lock() {
            *held.entry(service.clone()).or_default() += 1;
        }
        Held { activations, service: service.clone() }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Ok(mut held) = self.activations.held.lock()
            && let Some(count) = held.get_mut(&self.service)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.service);
            }
        }
    }
}

impl Activations {
    /// The activation replica of `service`, if one serves.
    pub(crate) fn replica(&self, service: &ServiceId) -> Option<Workload> {
        let slot = self.slots.lock().ok()?.get(service)?.clone();
        let activated = slot.try_lock().ok()?;
        activated.as_ref().map(|a| a.workload.clone())
    }

    /// The activation replica of `service`, for the first replica the
    /// control plane then assigns here to take over, if it runs `revision`
    /// with `spec`: its code is loaded already, so a wake loads it once
    /// rather than again for the assigned replica while its first requests
    /// are served. It keeps serving as the activation replica until the
    /// assigned one is ready, then is dropped from here
    /// ([`Activations::expire`]) and lives on as that replica. `None`:
    /// none here, another revision or spec, failed to start, already taken,
    /// or the spec grants secrets (the assigned replica reads them afresh).
    pub(crate) async fn adopt(&self, service: &ServiceId, revision: u64, spec: &ServiceSpec) -> Option<Workload> {
        let not = |why: &str| {
            tracing::debug!(%service, revision, "no activation replica to adopt: {why}");
            None
        };
        let Some(slot) = self.slots.lock().ok()?.get(service).cloned() else { return not("none was started here") };
        // Held only while the activation replica starts (milliseconds):
        // an assignment that comes that fast waits for it.
        let mut activated = slot.lock().await;
        let Some(activated) = activated.as_mut() else { return not("it failed to start") };
        if activated.adopted {
            return not("it was adopted already");
        }
        if activated.revision != revision || *activated.spec != *spec {
            return not("it runs another revision or spec");
        }
        if !spec.secrets.is_empty() {
            return not("the spec grants secrets");
        }
        activated.adopted = true;
        Some(activated.workload.clone())
    }

    /// Requests held plus those in flight on activation replicas: load the
    /// control plane's autoscaler does not see elsewhere.
    pub(crate) fn demand(&self) -> Vec<Demand> {
        let mut demand: BTreeMap<ServiceId, u64> = self.held.lock().map(|h| h.clone()).unwrap_or_default();
        if let Ok(slots) = self.slots.lock() {
            for (service, slot) in slots.iter() {
                if let Ok(activated) = slot.try_lock()
                    && let Some(activated) = activated.as_ref()
                {
                    *demand.entry(service.clone()).or_default() += activated.workload.in_flight();
                }
            }
        }
        demand.into_iter().map(|(service, waiting)| Demand { service, waiting }).collect()
    }

    /// Memory and instances the activation replicas reserve (their memory
    /// requests, given by `request_of`, and instance requests, as assigned
    /// replicas do).
    pub(crate) fn reserved(&self, request_of: impl Fn(&ServiceId) -> u64) -> (u64, u64) {
        let Ok(slots) = self.slots.lock() else { return (0, 0) };
        slots
            .iter()
            .filter_map(|(service, slot)| {
                let activated = slot.try_lock().ok()?;
                let limits = &activated.as_ref()?.workload.spec().limits;
                Some((request_of(service), u64::from(limits.instances_request)))
            })
            .fold((0, 0), |(m, i), (dm, di)| (m + dm, i + di))
    }

    /// Drops activation replicas that an assigned replica has replaced
    /// (`replaced`), or that the control plane did not place here within
    /// the grace period (`assigned_here` false).
    pub(crate) fn expire(&self, replaced: impl Fn(&ServiceId) -> bool, assigned_here: impl Fn(&ServiceId) -> bool) {
        let Ok(mut slots) = self.slots.lock() else { return };
        slots.retain(|service, slot| {
            let Ok(activated) = slot.try_lock() else { return true };
            let Some(activated) = activated.as_ref() else { return false };
            let stale = activated.since.elapsed() > ACTIVATION_GRACE && !assigned_here(service);
            !(replaced(service) || stale)
        });
    }
}

impl HostAgent {
    /// Holds a request for a service with no ready replica while one
    /// starts, then serves it (see the module docs).
    ///
    /// A streamed body is held unread (only what the decision to stream
    /// read is in memory), and is read as the replica that serves it reads it.
    pub(super) async fn activate(&self, service: &ServiceId, payload: Prepared, timeout: Duration) -> Response<ResponseBody> {
        let started = Instant::now();
        let activations = &self.inner.activations;
        let _held = Held::enter(activations, service);
        // Listen for announcements before announcing, so none is missed.
        let mut announcements = match self.inner.bus.subscribe(&service_ready_wildcard(&service.namespace, &service.name)).await {
            Ok(subscription) => Some(subscription),
            Err(e) => {
                tracing::debug!(%service, "cannot follow ready announcements; polling: {e}");
                None
            }
        };
        self.announce_activation(service).await;
        if let Some(why) = self.quota_full(service) {
            // The control plane holds the scale at the quota too: waiting
            // would only end in the same answer, later.
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "quota_exceeded",
                format!(
                    "service {service} is scaled to zero and cannot start: {why}; an admin raises it with `wharf namespace set {} --max-replicas N` (or --max-memory)",
                    service.namespace
                ),
            );
        }
        // Why this host did not start one itself, for the answer if none comes.
        let not_here = match self.may_activate_here(service) {
            Ok(()) => match self.activate_locally(service).await {
                Ok(workload) => return self.serve_held(&workload, payload, started).await,
                Err(e) => {
                    tracing::warn!(%service, "cannot start a replica here for activation: {e}");
                    e
                }
            },
            Err(why) => {
                tracing::debug!(%service, "not starting a replica here for activation: {why}");
                why
            }
        };
        let deadline = started + self.inner.config.activation_timeout;
        let mut changes = self.changes();
        loop {
            if let Some(workload) = self.inner.replicas.least_busy(service, None) {
                return self.serve_held(&workload, payload, started).await;
            }
            if let Ok(response) = self.send(service, None, payload.clone(), timeout).await {
                self.inner.metrics.activation(started.elapsed());
                return response;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let wait = (deadline - now).min(FALLBACK_POLL);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = changes.changed() => {}
                Some(message) = async { match &mut announcements { Some(s) => s.next().await, None => std::future::pending().await } } => {
                    // Into the directory now, whichever of this and the
                    // agent's own subscription sees it first.
                    self.replica_announced(&message.subject, &message.payload);
                }
            }
        }
        let here = format!(" (host {} did not start one: {not_here})", self.inner.config.host);
        crate::remote::not_ready(
            service,
            &format!("is starting (scaled to zero) but no replica was ready within {:?}{here}; try again", self.inner.config.activation_timeout),
        )
    }

    /// Whether this host may start a replica of `service` for activation:
    /// not draining, no volumes (they live where they are), its labels
    /// match, and the replica fits in what the host's replicas (assigned and
    /// activated) leave of its capacity, as the control plane would place it.
    pub(super) fn may_activate_here(&self, service: &ServiceId) -> Result<(), String> {
        let Some(spec) = self.inner.directory.spec(service) else { return Err(format!("service {service} is unknown here")) };
        if self.inner.draining.load(Ordering::Relaxed) {
            return Err("it is draining".into());
        }
        if !spec.volumes.is_empty() {
            return Err("the service has volumes, which live on their own host".into());
        }
        if let Some((key, value)) = spec.placement.labels.iter().find(|(k, v)| self.inner.config.labels.get(*k) != Some(*v)) {
            return Err(format!("it lacks the label {key}={value} the service is placed by"));
        }
        let capacity = self.inner.config.capacity;
        let (activated_memory, activated_instances) = self.inner.activations.reserved(|id| self.inner.directory.memory_request(id));
        let memory = self.inner.replicas.memory_reserved().saturating_add(activated_memory);
        let needs = spec.memory_request();
        let offered = capacity.memory.scaled(self.inner.config.memory_overcommit);
        if memory.saturating_add(needs.bytes()) > offered.bytes() {
            return Err(format!(
                "insufficient memory: a replica requests {}, and {} of the host's {} is reserved",
                needs.human(),
                wharf_proto::ByteSize(memory).human(),
                offered.human()
            ));
        }
        let instances = self.inner.replicas.instances_reserved().saturating_add(activated_instances);
        if instances.saturating_add(u64::from(spec.instances_request())) > u64::from(capacity.instances) {
            return Err(format!(
                "insufficient instances: a replica reserves {}, and {instances} of the host's {} are reserved",
                spec.instances_request(), capacity.instances
            ));
        }
        Ok(())
    }

    /// Why one more replica of `service` would take its namespace past a
    /// replica or memory quota, counting the replicas the control plane
    /// wants of the namespace's other services; `None` when it fits.
    pub(super) fn quota_full(&self, service: &ServiceId) -> Option<String> {
        let quota = self.inner.rates.quota(&service.namespace)?;
        let each = self.inner.directory.spec(service)?.memory_request().bytes();
        let (replicas, memory) = self.inner.directory.namespace_use(&service.namespace, service);
        let (granted, why) = quota.room(&service.namespace, replicas, memory, 1, each);
        if granted == 0 { why } else { None }
    }

    /// Serves a request held for activation on `workload`, now ready.
    async fn serve_held(&self, workload: &Workload, payload: Prepared, started: Instant) -> Response<ResponseBody> {
        self.inner.metrics.activation(started.elapsed());
        match payload.into_request() {
            Ok(request) => workload.handle(request).await,
            Err(e) => error_response(StatusCode::BAD_REQUEST, "bad_request", e),
        }
    }

    /// Tells the control plane a request is waiting for `service`.
    pub(super) async fn announce_activation(&self, service: &ServiceId) {
        let message = Activation { service: service.clone(), host: self.inner.config.host.clone() };
        let payload = match serde_json::to_vec(&message) {
            Ok(payload) => Bytes::from(payload),
            Err(e) => {
                tracing::error!("cannot encode an activation (a bug): {e}");
                return;
            }
        };
        if let Err(e) = self.inner.bus.publish(wharf_proto::names::ACTIVATE_SUBJECT, payload).await {
            tracing::debug!(%service, "could not announce activation: {e}");
        }
    }

    /// Starts (once, however many requests wait) a replica of `service` on
    /// this host outside its assignment, running the revision that takes
    /// most of its traffic. It serves until an assigned replica is ready
    /// here, or is dropped if the control plane places the service elsewhere.
    pub(super) async fn activate_locally(&self, service: &ServiceId) -> Result<Workload, String> {
        let slot = {
            let mut slots = self.inner.activations.slots.lock().map_err(|_| "poisoned".to_string())?;
            slots.entry(service.clone()).or_default().clone()
        };
        let mut activated = slot.lock().await;
        if let Some(activated) = activated.as_ref() {
            return Ok(activated.workload.clone());
        }
        let revision = self.inner.directory.serving_revision(service).ok_or_else(|| format!("service {service} is unknown here"))?;
        let spec = self.inner.directory.revision(service, revision).await?;
        let workload = self.build_workload(service, revision, &spec).await?;
        self.inner.metrics.cold_start();
        tracing::info!(%service, revision, "started a replica to serve requests held for activation");
        *activated = Some(Activated { workload: workload.clone(), revision, spec, since: Instant::now(), adopted: false });
        Ok(workload)
    }
}
