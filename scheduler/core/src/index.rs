//! Placement that keeps its view of the cluster between passes: a
//! [`PlacementIndex`] is told what changed (hosts joining, leaving or
//! changing; workloads added, scaled, changed or removed) and a pass places
//! only what those changes left without a host, so its cost follows the
//! changes, not the size of the cluster.

use crate::cluster::{Cluster, NO_HOST};
use crate::placement::{place, place_avoiding};
use crate::reconcile::reconcile_into;
use crate::snapshot::{Action, HostInfo, Plan, ReplicaRef, Snapshot, Unplaceable, Workload, WorkloadId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use wharf_proto::HostId;

/// The hosts, the workloads and where every replica runs, kept between
/// passes and updated from changes.
///
/// Decisions are those of [`crate::reconcile()`] (the same filters, scores,
/// sampling and spread), applied to what changed:
///
/// - A host that leaves, stops being ready, or changes its labels, capacity
///   or overcommit releases its replicas; those that may stay (as
///   `reconcile` keeps replicas: ready, labels, room, not avoided) are
///   kept, in (service, replica) order, the others stopped. A change in
///   requests in flight or cached components only changes scores.
/// - A workload scaled down stops its replicas above the count; removed,
///   all of them; changed otherwise (spec, hosts to avoid, learned peak),
///   its replicas are released and kept where they may stay.
/// - [`PlacementIndex::place`] places every replica without a host of the
///   workloads that changed, and of those left waiting for room when room
///   may have appeared (a host joined or grew, a replica stopped),
///   round-robin by replica index as `reconcile` does.
///
/// Deterministic: the same sequence of calls gives the same decisions.
/// Hosts and workloads added to an index are numbered in the order they
/// were added, where a snapshot numbers them in id order; so an index
/// built up by changes may break ties between equal hosts differently from
/// a `reconcile` of the same state, with the same guarantees (capacity,
/// labels, spread within one replica while capacity allows).
#[derive(Default)]
pub struct PlacementIndex {
    cluster: Cluster,
    /// Workloads (by index) with replicas to place at the next pass.
    dirty: BTreeSet<u32>,
    /// Workloads (by index) with replicas no host could take at the last
    /// pass that placed them, with the reasons, by replica.
    waiting: BTreeMap<u32, BTreeMap<u32, String>>,
    /// Room may have appeared since the last pass: waiting workloads are tried again.
    grew: bool,
    /// Replicas stopped since the last pass, as (host, workload, replica).
    stops: Vec<(HostId, WorkloadId, u32)>,
    /// Hosts whose replicas changed since the last pass, each once.
    touched: Vec<u32>,
    /// One bit per host index: whether it is in `touched`.
    touched_bits: Vec<u64>,
}

/// What one [`PlacementIndex::place`] pass decided, owned (see [`Pass::changes`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Every stop since the last pass (by host, service, replica), then
    /// every start of this pass (by service, replica). A replica stopped on
    /// a host and placed back there in the same pass has neither.
    pub actions: Vec<Action>,
    /// The hosts whose assignment changed, each once: only these need
    /// writing. In the index's order of hosts (a snapshot's: by id; added
    /// later: as added).
    pub hosts: Vec<HostId>,
}

/// What one [`PlacementIndex::place`] pass decided, as a view of the index:
/// its starts and the hosts it changed name hosts and workloads by the
/// index's own ids, borrowed, so a pass placing a million replicas copies
/// no id. [`Pass::changes`] makes the owned [`Changes`]; the view borrows
/// the index until it is dropped.
pub struct Pass<'a> {
    cluster: &'a Cluster,
    /// Stops since the last pass that were not placed back, by host, service, replica.
    stops: Vec<Action>,
    /// Starts, as (workload index, replica, host index), by workload index then replica.
    starts: Vec<(u32, u32, u32)>,
    /// Hosts whose assignment changed, by index.
    hosts: Vec<u32>,
}

impl<'a> Pass<'a> {
    /// How many actions the pass has: stops, then starts.
    pub fn len(&self) -> usize {
        self.stops.len() + self.starts.len()
    }

    /// Whether the pass changed nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0 && self.hosts.is_empty()
    }

    /// How many replicas the pass started.
    pub fn started(&self) -> usize {
        self.starts.len()
    }

    /// The starts, as (workload, replica, host), borrowed from the index, in
    /// the order of [`Changes::actions`].
    pub fn starts(&self) -> impl Iterator<Item = (&'a WorkloadId, u32, &'a HostId)> + '_ {
        let cluster = self.cluster;
        self.starts.iter().map(move |&(service, replica, host)| {
            (&cluster.services[service as usize].id, replica, &cluster.hosts[host as usize].info.id)
        })
    }

    /// The hosts whose assignment changed (see [`Changes::hosts`]).
    pub fn hosts(&self) -> impl Iterator<Item = &'a HostId> + '_ {
        let cluster = self.cluster;
        self.hosts.iter().map(move |&host| &cluster.hosts[host as usize].info.id)
    }

    /// Every action, owned (see [`Changes::actions`]).
    pub fn actions(&self) -> impl Iterator<Item = Action> + '_ {
        let starts = self.starts().map(|(service, replica, host)| Action::Start {
            service: service.clone(),
            replica,
            host: host.clone(),
        });
        self.stops.iter().cloned().chain(starts)
    }

    /// The pass as owned [`Changes`]: it copies every id it names.
    pub fn changes(&self) -> Changes {
        Changes { actions: self.actions().collect(), hosts: self.hosts().cloned().collect() }
    }
}

impl PlacementIndex {
    /// An index with no host and no workload.
    pub fn new() -> Self {
        PlacementIndex::default()
    }

    /// The plan of a [`crate::reconcile()`] of `snapshot`, and an index
    /// holding its outcome (the plan's assignments, its unplaceable
    /// replicas waiting for room): where a controller starts, and starts
    /// again when what it wrote differs from what the index decided.
    pub fn reconcile(snapshot: &Snapshot) -> (Plan, PlacementIndex) {
        let (plan, cluster) = reconcile_into(snapshot);
        let mut waiting: BTreeMap<u32, BTreeMap<u32, String>> = BTreeMap::new();
        for unplaceable in &plan.unplaceable {
            if let Some(service) = cluster.service(&unplaceable.service) {
                waiting.entry(service).or_default().insert(unplaceable.replica, unplaceable.reason.clone());
            }
        }
        let index = PlacementIndex { cluster, waiting, ..PlacementIndex::default() };
        (plan, index)
    }

    /// A host joined, or changed (ready or not, labels, capacity,
    /// overcommit, cached components, requests in flight); a host that
    /// left comes back.
    pub fn set_host(&mut self, info: HostInfo) {
        let Some(index) = self.cluster.host(&info.id) else {
            self.cluster.add_host(info);
            self.grew = true;
            return;
        };
        let host = &self.cluster.hosts[index as usize];
        let known = &host.info;
        let same_room = host.ready == info.ready
            && known.ready == info.ready
            && known.labels == info.labels
            && known.capacity == info.capacity
            && known.memory_overcommit == info.memory_overcommit;
        if same_room {
            if **known != info {
                self.cluster.refresh_host(index, info);
            }
            return;
        }
        let replicas = self.release_host(index);
        self.cluster.update_host(index, info);
        self.grew = true;
        self.keep(index, replicas);
    }

    /// A host left: its replicas are stopped and placed elsewhere at the next pass.
    pub fn remove_host(&mut self, id: &HostId) {
        let Some(index) = self.cluster.host(id) else {
            return;
        };
        let replicas = self.release_host(index);
        self.cluster.remove_host(index);
        self.keep(index, replicas);
    }

    /// A workload was added, or changed (replicas wanted, spec, hosts to
    /// avoid, learned memory peak).
    pub fn set_workload(&mut self, workload: Workload) {
        let Some(index) = self.cluster.service(&workload.id) else {
            let index = self.cluster.add_service(workload);
            self.dirty.insert(index);
            return;
        };
        let service = &self.cluster.services[index as usize];
        let same_spec = Arc::ptr_eq(&service.spec, &workload.spec) || service.spec == workload.spec;
        if same_spec && service.avoid == workload.avoid && service.memory_peak == workload.memory_peak {
            self.scale(index, workload.replicas);
            return;
        }
        // Released and kept again under the new terms.
        let placed: Vec<(u32, u32)> = service
            .host_of
            .iter()
            .enumerate()
            .filter(|&(_, &host)| host != NO_HOST)
            .map(|(replica, &host)| (replica as u32, host))
            .collect();
        for &(replica, host) in &placed {
            self.cluster.release(host, index, replica);
            self.touch(host);
        }
        self.cluster.remove_service(index);
        // A lower peak leaves room that may take a replica that waits.
        self.grew = true;
        let replicas = workload.replicas;
        let index = self.cluster.add_service(workload);
        self.waiting.remove(&index);
        self.dirty.insert(index);
        for (replica, host) in placed {
            if replica < replicas && self.may_stay(host, index, replica) {
                self.cluster.commit(host, index, replica);
            } else {
                self.stop(host, index, replica);
            }
        }
    }

    /// A workload was removed: its replicas are stopped.
    pub fn remove_workload(&mut self, id: &WorkloadId) {
        let Some(index) = self.cluster.service(id) else {
            return;
        };
        self.scale(index, 0);
        self.dirty.remove(&index);
        self.waiting.remove(&index);
        self.cluster.remove_service(index);
    }

    /// Places every replica without a host of the workloads that changed
    /// (and of the waiting ones, when room may have appeared), and returns
    /// what changed since the last pass, as a view of the index
    /// ([`Pass::changes`] for an owned copy).
    pub fn place(&mut self) -> Pass<'_> {
        self.cluster.no_room.clear();
        if std::mem::take(&mut self.grew) {
            self.dirty.extend(self.waiting.keys().copied());
        }
        let dirty = std::mem::take(&mut self.dirty);
        let mut missing: Vec<(u32, u32)> = Vec::new();
        for &service in &dirty {
            if !self.cluster.is_service(service) {
                continue;
            }
            let state = &mut self.cluster.services[service as usize];
            state.forget_pass();
            missing.extend(
                state
                    .host_of
                    .iter()
                    .enumerate()
                    .filter(|(_, host)| **host == NO_HOST)
                    .map(|(replica, _)| (replica as u32, service)),
            );
            self.waiting.remove(&service);
        }
        // Round-robin: every workload's replica 0, then every replica 1, ...
        missing.sort_unstable();
        let mut starts: Vec<(u32, u32, u32)> = Vec::with_capacity(missing.len());
        for (replica, service) in missing {
            let placed = match place_avoiding(&mut self.cluster, service, replica) {
                Some(host) => Ok(host),
                None => place(&mut self.cluster, service, replica),
            };
            match placed {
                Ok(host) => {
                    self.touch(host);
                    starts.push((service, replica, host));
                }
                Err(reason) => {
                    self.waiting.entry(service).or_default().insert(replica, reason);
                }
            }
        }
        starts.sort_unstable();
        let cluster = &self.cluster;
        let mut stops = std::mem::take(&mut self.stops);
        stops.sort();
        if !stops.is_empty() {
            // A replica stopped and placed back on the same host did not move.
            let mut back = vec![false; stops.len()];
            starts.retain(|&(service, replica, host)| {
                let key = (&cluster.hosts[host as usize].info.id, &cluster.services[service as usize].id, replica);
                match stops.binary_search_by(|(host, service, replica)| (host, service, *replica).cmp(&key)) {
                    Ok(at) if !back[at] => {
                        back[at] = true;
                        false
                    }
                    _ => true,
                }
            });
            let mut back = back.into_iter();
            stops.retain(|_| !back.next().unwrap_or(false));
        }
        let stops = stops.into_iter().map(|(host, service, replica)| Action::Stop { service, replica, host }).collect();
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        for &host in &touched {
            self.touched_bits[host as usize / 64] = 0;
        }
        Pass { cluster: &self.cluster, stops, starts, hosts: touched }
    }

    /// What host `id` should run now, sorted by workload and replica
    /// (empty for a host that is not ready or left); `None` for a host
    /// never known.
    pub fn assignment(&self, id: &HostId) -> Option<Vec<ReplicaRef>> {
        let index = self.cluster.host(id)?;
        let mut replicas: Vec<ReplicaRef> = self.cluster.hosts[index as usize]
            .replicas
            .iter()
            .map(|&(service, replica)| (self.cluster.services[service as usize].id.clone(), replica))
            .collect();
        replicas.sort_unstable();
        Some(replicas)
    }

    /// What every host known should run (see [`PlacementIndex::assignment`]).
    /// It visits every host: for tests and measurements, not for a pass.
    pub fn assignments(&self) -> BTreeMap<HostId, Vec<ReplicaRef>> {
        self.cluster
            .hosts
            .iter()
            .filter_map(|host| Some((host.info.id.clone(), self.assignment(&host.info.id)?)))
            .collect()
    }

    /// The replicas no host could take at the last pass that tried them,
    /// by workload and replica.
    pub fn unplaceable(&self) -> Vec<Unplaceable> {
        let mut list: Vec<Unplaceable> = self
            .waiting
            .iter()
            .flat_map(|(&service, replicas)| {
                let id = &self.cluster.services[service as usize].id;
                replicas.iter().map(move |(&replica, reason)| Unplaceable {
                    service: id.clone(),
                    replica,
                    reason: reason.clone(),
                })
            })
            .collect();
        list.sort_by(|a, b| (&a.service, a.replica).cmp(&(&b.service, b.replica)));
        list
    }

    /// The state itself, for measurements.
    pub(crate) fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// How many hosts the index knows (those that left included).
    pub fn hosts(&self) -> usize {
        self.cluster.hosts.len()
    }

    /// Sets the replicas wanted of workload `index`: those above the count
    /// are stopped, and any missing are placed at the next pass.
    fn scale(&mut self, index: u32, replicas: u32) {
        let service = &self.cluster.services[index as usize];
        let had = service.host_of.len() as u32;
        if replicas == had {
            return;
        }
        let above: Vec<(u32, u32)> = service
            .host_of
            .iter()
            .enumerate()
            .skip(replicas as usize)
            .filter(|&(_, &host)| host != NO_HOST)
            .map(|(replica, &host)| (replica as u32, host))
            .collect();
        for (replica, host) in above {
            self.cluster.release(host, index, replica);
            self.stop(host, index, replica);
        }
        let service = &mut self.cluster.services[index as usize];
        service.host_of.resize(replicas as usize, NO_HOST);
        if let Some(waiting) = self.waiting.get_mut(&index) {
            waiting.retain(|&replica, _| replica < replicas);
        }
        if replicas > had {
            self.dirty.insert(index);
        }
    }

    /// Releases every replica on host `index`, returning them as
    /// (workload, replica) in that order.
    fn release_host(&mut self, index: u32) -> Vec<(u32, u32)> {
        let mut replicas = std::mem::take(&mut self.cluster.hosts[index as usize].replicas);
        replicas.sort_unstable();
        for &(service, replica) in &replicas {
            // `release` finds nothing left in the host's list, and undoes the rest.
            self.cluster.release(index, service, replica);
        }
        if !replicas.is_empty() {
            self.touch(index);
        }
        replicas
    }

    /// Keeps each of `replicas` (workload, replica), just released from
    /// host `host`, there if it may stay, in order; stops the others.
    fn keep(&mut self, host: u32, replicas: Vec<(u32, u32)>) {
        for (service, replica) in replicas {
            if self.may_stay(host, service, replica) {
                self.cluster.commit(host, service, replica);
            } else {
                self.stop(host, service, replica);
            }
        }
    }

    /// Whether replica `replica` of workload `service` may stay on host
    /// `host` (as `reconcile` keeps replicas).
    fn may_stay(&self, host: u32, service: u32, replica: u32) -> bool {
        crate::reconcile::may_stay(&self.cluster, host, service, replica)
    }

    /// Records that the replicas of host `host` changed.
    fn touch(&mut self, host: u32) {
        let (word, bit) = (host as usize / 64, 1 << (host % 64));
        if self.touched_bits.len() <= word {
            self.touched_bits.resize(word + 1, 0);
        }
        if self.touched_bits[word] & bit == 0 {
            self.touched_bits[word] |= bit;
            self.touched.push(host);
        }
    }

    /// Records that replica `replica` of workload `service` stopped on host
    /// `host` (already released) and is to be placed again.
    fn stop(&mut self, host: u32, service: u32, replica: u32) {
        let cluster = &self.cluster;
        self.stops.push((
            cluster.hosts[host as usize].info.id.clone(),
            cluster.services[service as usize].id.clone(),
            replica,
        ));
        self.touch(host);
        self.dirty.insert(service);
        // Its room may take a replica that waits.
        self.grew = true;
    }
}
