//! The control loop: read the desired state and the hosts, let the pure core
//! decide, write each host's assignment. Level-triggered and idempotent: it
//! runs on every change and on a timer, and an unchanged world writes nothing.

use crate::autoscale::Autoscaling;
use crate::hosts::HostTable;
use crate::store::{Store, StoreError};
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use wharf_proto::{AssignedReplica, Assignment, HostId, ServiceId, StoredService};
use wharf_scheduler_core::{HostInfo, Snapshot, Unplaceable, reconcile};

/// How often the loop runs even when nothing announced a change; also the
/// autoscaler's sampling period.
const RESYNC: Duration = Duration::from_millis(500);

/// Replicas the last reconcile could not place, by service, for status.
pub type UnplaceableMap = Arc<Mutex<BTreeMap<ServiceId, Vec<Unplaceable>>>>;

/// Runs the control loop until `stop` turns true.
pub async fn run(
    bus: wharf_bus::Bus,
    store: Store,
    hosts: HostTable,
    unplaceable: UnplaceableMap,
    autoscaling: Autoscaling,
    mut stop: watch::Receiver<bool>,
) {
    // Hosts that were up before a restart need a heartbeat interval or two to
    // be heard again; deciding earlier would move their replicas away.
    tokio::select! {
        _ = tokio::time::sleep(hosts.timeout()) => {}
        _ = stop.changed() => return,
    }
    let mut host_changes = hosts.changes();
    let mut service_changes = match store.services_kv().watch(">").await {
        Ok(watch) => Some(watch),
        Err(e) => {
            tracing::error!("cannot watch services, reconciling on a timer only: {e}");
            None
        }
    };
    let mut activations = match bus.subscribe(wharf_proto::names::ACTIVATE_SUBJECT).await {
        Ok(subscription) => Some(subscription),
        Err(e) => {
            tracing::error!("cannot follow activation requests; scale from zero waits for the autoscaler's next sample: {e}");
            None
        }
    };
    loop {
        if let Err(e) = reconcile_once(&store, &hosts, &unplaceable, &autoscaling).await {
            tracing::warn!("reconcile failed, retrying: {e}");
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(RESYNC) => {}
            _ = host_changes.changed() => {}
            Some(_) = next_event(&mut service_changes) => {}
            Some(message) = next_message(&mut activations) => {
                match serde_json::from_slice::<serde_json::Value>(&message.payload).ok().and_then(|v| v["service"].as_str().and_then(|s| s.parse::<ServiceId>().ok())) {
                    Some(service) => autoscaling.announce(&service),
                    None => tracing::warn!("ignoring an unreadable activation request"),
                }
                continue;
            }
        }
        // Coalesce a burst of changes (an apply of many services) into one pass.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next_message(subscription: &mut Option<wharf_bus::Subscription>) -> Option<wharf_bus::Message> {
    match subscription {
        Some(subscription) => subscription.next().await,
        None => std::future::pending().await,
    }
}

async fn next_event(watch: &mut Option<wharf_bus::KvWatch>) -> Option<wharf_bus::KvEvent> {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}

/// One pass: snapshot, decide, write the assignments that changed.
pub async fn reconcile_once(store: &Store, hosts: &HostTable, unplaceable: &UnplaceableMap, autoscaling: &Autoscaling) -> Result<(), StoreError> {
    let services = store.services().await?;
    let assignments = store.assignments().await?;
    let pins = store.volume_pins().await?;
    let known = hosts.hosts();
    autoscaling.tick(&services, &assignments, &known);
    let snapshot = Snapshot {
        hosts: known
            .iter()
            .map(|h| HostInfo {
                id: h.heartbeat.host.clone(),
                ready: h.ready,
                labels: {
                    let mut labels = h.heartbeat.labels.clone();
                    labels.insert(wharf_proto::names::HOST_LABEL.to_string(), h.heartbeat.host.to_string());
                    labels
                },
                capacity: h.heartbeat.capacity,
                cached: h.heartbeat.cached.iter().cloned().collect(),
                in_flight: h.heartbeat.replicas.iter().map(|r| r.in_flight).sum(),
            })
            .collect(),
        services: services.iter().map(|s| effective(&s.spec, &assignments, autoscaling, pins.get(&s.spec.id()))).collect(),
        current: assignments.iter().map(|a| (a.host.clone(), a.replicas.iter().map(|r| (r.service.clone(), r.replica)).collect())).collect(),
    };
    let plan = reconcile(&snapshot);
    if let Ok(mut map) = unplaceable.lock() {
        map.clear();
        for mut u in plan.unplaceable {
            if let Some(host) = pins.get(&u.service) {
                u.reason = format!("its volumes are on host {host}, which is not ready; it waits for that host rather than start empty elsewhere ({})", u.reason);
            }
            map.entry(u.service.clone()).or_default().push(u);
        }
    }
    // A service with volumes is pinned to the host where its first replica
    // became ready (not merely placed: a host that dies before reporting
    // would otherwise keep the volume forever).
    for stored in services.iter().filter(|s| !s.spec.volumes.is_empty()) {
        let id = stored.spec.id();
        if pins.contains_key(&id) {
            continue;
        }
        let serving = known.iter().filter(|h| h.ready).find(|h| {
            h.heartbeat.replicas.iter().any(|r| r.service == id && r.state == wharf_proto::ReplicaState::Ready && r.generation == stored.generation)
        });
        if let Some(host) = serving {
            tracing::info!(service = %id, host = %host.heartbeat.host, "volumes pinned to host");
            store.pin_volumes(&id, &host.heartbeat.host).await?;
        }
    }
    let by_id: BTreeMap<ServiceId, &StoredService> = services.iter().map(|s| (s.spec.id(), s)).collect();
    let current: BTreeMap<&HostId, &Assignment> = assignments.iter().map(|a| (&a.host, a)).collect();
    let mut hosts_to_write: BTreeSet<&HostId> = plan.assignments.keys().collect();
    hosts_to_write.extend(current.keys().copied());
    for host in hosts_to_write {
        let wanted: Vec<AssignedReplica> = plan
            .assignments
            .get(host)
            .into_iter()
            .flatten()
            .filter_map(|(service, replica)| {
                by_id.get(service).map(|stored| AssignedReplica {
                    service: service.clone(),
                    replica: *replica,
                    spec: stored.spec.clone(),
                    generation: stored.generation,
                })
            })
            .collect();
        let existing = current.get(host);
        if existing.is_some_and(|a| a.replicas == wanted) {
            continue;
        }
        let generation = existing.map_or(1, |a| a.generation + 1);
        tracing::info!(host = %host, replicas = wanted.len(), "writing assignment");
        store.put_assignment(&Assignment { host: host.clone(), replicas: wanted, revision: 0, generation }).await?;
    }
    Ok(())
}

/// The spec as placement sees it: an autoscaled service's replica count is
/// the autoscaler's decision (or, before its first, what runs now, within
/// the policy's bounds).
fn effective(spec: &wharf_proto::ServiceSpec, assignments: &[Assignment], autoscaling: &Autoscaling, pin: Option<&HostId>) -> wharf_proto::ServiceSpec {
    let mut spec = spec.clone();
    if let Some(policy) = &spec.autoscale {
        let id = spec.id();
        spec.replicas = autoscaling.replicas(&id).unwrap_or_else(|| {
            let current = assignments.iter().flat_map(|a| &a.replicas).filter(|r| r.service == id).count();
            u32::try_from(current).unwrap_or(u32::MAX).clamp(policy.min, policy.max.max(policy.min))
        });
    }
    // Volumes stay with their host: pinned services go only there; an
    // unpinned one is placed once (one replica) to choose that host.
    if !spec.volumes.is_empty() {
        match pin {
            Some(host) => {
                spec.placement.labels.insert(wharf_proto::names::HOST_LABEL.to_string(), host.to_string());
            }
            None => spec.replicas = spec.replicas.min(1),
        }
    }
    spec
}
