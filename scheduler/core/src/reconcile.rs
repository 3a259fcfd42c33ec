//! Reconciliation: from a snapshot of what runs and what is wanted, the full
//! assignment every host should have and the actions that lead there.

use crate::cluster::{Cluster, NO_HOST};
use crate::placement::{place, place_avoiding};
use crate::snapshot::{Action, Plan, ReplicaRef, Snapshot, Unplaceable};
use wharf_proto::HostId;

/// Computes the plan for `snapshot`.
///
/// Level-triggered and idempotent: the same snapshot always gives the same
/// plan, and once a plan's assignments are current, the next reconcile has
/// no actions (unless something else changed). It works in two passes:
///
/// 1. Keep: every current replica stays where it is if its host is ready,
///    its service still exists and still wants that many replicas, the host
///    still carries the labels the placement asks for, it is not a duplicate
///    of a replica already kept, the replica is not asked to avoid the host
///    (see [`crate::Workload::avoid`]), and the host has room for its memory
///    request and instance slots after the replicas kept before it (in
///    service, replica order). A kept replica must fit by its request
///    alone, not by a peak learned since ([`crate::Workload::memory_peak`]):
///    learning never moves what runs. It still counts its peak against
///    new replicas (see `Host::reserved_memory`), which keeps the plan
///    idempotent: what a pass could not place, the next cannot either. Everything else
///    is stopped. Keeping what fits is what makes plans stable: a replica is
///    never moved just because a better host appeared, nor to even out the
///    domains of a spread label.
/// 2. Place: every desired replica without a host is placed (see
///    the crate docs, *Placement*; a replica with hosts to avoid is placed
///    on the best other host with room, else as any replica), round-robin over the services
///    by replica index, so that when capacity runs short every service gets
///    its first replicas before any gets its last.
pub fn reconcile(snapshot: &Snapshot) -> Plan {
    reconcile_into(snapshot).0
}

/// [`reconcile`], returning also the state it built, with the plan applied.
pub(crate) fn reconcile_into(snapshot: &Snapshot) -> (Plan, Cluster) {
    let mut cluster = Cluster::new(snapshot);
    let stops = keep_current(&mut cluster, snapshot);
    let (starts, unplaceable) = place_missing(&mut cluster);
    (build_plan(&cluster, stops, starts, unplaceable), cluster)
}

/// Keeps what may stay (see [`reconcile`]) and returns the stops for the rest.
fn keep_current(cluster: &mut Cluster, snapshot: &Snapshot) -> Vec<Action> {
    let mut stops = Vec::new();
    for (host_id, replicas) in &snapshot.current {
        let host = cluster.host(host_id);
        let mut replicas: Vec<&ReplicaRef> = replicas.iter().collect();
        replicas.sort();
        for (service_id, replica) in replicas {
            match host.zip(cluster.service(service_id)) {
                Some((host, service)) if may_stay(cluster, host, service, *replica) => {
                    cluster.commit(host, service, *replica);
                }
                _ => stops.push(Action::Stop {
                    service: service_id.clone(),
                    replica: *replica,
                    host: host_id.clone(),
                }),
            }
        }
    }
    stops
}

/// Whether replica `replica` of workload `service` may stay on host `host`.
pub(crate) fn may_stay(cluster: &Cluster, host: u32, service: u32, replica: u32) -> bool {
    let host = &cluster.hosts[host as usize];
    let service = &cluster.services[service as usize];
    host.ready
        && service.host_of.get(replica as usize) == Some(&NO_HOST)
        && service.spec.placement.matches(&host.info.labels)
        && !service.avoid.get(&replica).is_some_and(|avoid| avoid.contains(&host.info.id))
        && service.request <= host.free_for_requests()
        && service.instances <= host.free_instances()
}

/// A replica placed by this reconcile: (service, replica, host), by index.
type Placed = (u32, u32, u32);

/// Places every desired replica that has no host yet.
fn place_missing(cluster: &mut Cluster) -> (Vec<Placed>, Vec<(u32, u32, String)>) {
    let mut missing: Vec<(u32, u32)> = Vec::new();
    for (service, state) in cluster.services.iter().enumerate() {
        let unassigned = state
            .host_of
            .iter()
            .enumerate()
            .filter(|(_, host)| **host == NO_HOST);
        missing.extend(unassigned.map(|(replica, _)| (replica as u32, service as u32)));
    }
    // Round-robin: every service's replica 0, then every replica 1, ...
    missing.sort_unstable();
    let mut starts = Vec::with_capacity(missing.len());
    let mut unplaceable = Vec::new();
    for (replica, service) in missing {
        let placed = match place_avoiding(cluster, service, replica) {
            Some(host) => Ok(host),
            None => place(cluster, service, replica),
        };
        match placed {
            Ok(host) => starts.push((service, replica, host)),
            Err(reason) => unplaceable.push((service, replica, reason)),
        }
    }
    starts.sort_unstable();
    unplaceable.sort_unstable_by_key(|&(service, replica, _)| (service, replica));
    (starts, unplaceable)
}

fn build_plan(
    cluster: &Cluster,
    mut actions: Vec<Action>,
    starts: Vec<Placed>,
    unplaceable: Vec<(u32, u32, String)>,
) -> Plan {
    let service_id = |service: u32| cluster.services[service as usize].id.clone();
    let host_id = |host: u32| -> HostId { cluster.hosts[host as usize].info.id.clone() };
    let assignments = cluster
        .hosts
        .iter()
        .map(|host| {
            let mut replicas = host.replicas.clone();
            replicas.sort_unstable();
            (
                host.info.id.clone(),
                replicas
                    .into_iter()
                    .map(|(service, replica)| (service_id(service), replica))
                    .collect(),
            )
        })
        .collect();
    // A replica stopped on a host it should avoid and placed back there
    // (no other host had room) did not move: neither action happens.
    let starts: Vec<Placed> = starts
        .into_iter()
        .filter(|&(service, replica, host)| {
            let avoided = cluster.services[service as usize]
                .avoid
                .get(&replica)
                .is_some_and(|avoid| avoid.contains(&cluster.hosts[host as usize].info.id));
            if !avoided {
                return true;
            }
            let stop = Action::Stop { service: service_id(service), replica, host: host_id(host) };
            match actions.iter().position(|action| *action == stop) {
                Some(at) => {
                    actions.remove(at);
                    false
                }
                None => true,
            }
        })
        .collect();
    actions.extend(
        starts
            .into_iter()
            .map(|(service, replica, host)| Action::Start {
                service: service_id(service),
                replica,
                host: host_id(host),
            }),
    );
    let unplaceable = unplaceable
        .into_iter()
        .map(|(service, replica, reason)| Unplaceable {
            service: service_id(service),
            replica,
            reason,
        })
        .collect();
    Plan {
        assignments,
        actions,
        unplaceable,
    }
}
