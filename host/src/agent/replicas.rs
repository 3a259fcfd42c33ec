//! The replicas this host runs: each assigned replica's state (loading,
//! being checked, ready, failed) and the workloads of replicas being
//! stopped, which serve what reached them until they drain. One lock
//! guards the whole table, held only to read or swap entries, never across
//! an await; picking a replica for a request is a scan under it.

use crate::workload::Workload;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use wharf_proto::{AssignedReplica, ReplicaKey, ReplicaState, ReplicaStatus, ServiceId, ServiceSpec};

/// Where one replica is in its life.
#[derive(Clone)]
pub(crate) enum Slot {
    /// Fetching, checking or compiling its component.
    Loading,
    /// Loaded; its readiness check runs.
    Probing,
    /// Serving.
    Ready(Workload),
    /// Could not load or become ready, and why.
    Failed(String),
}

/// One assigned replica.
#[derive(Clone)]
pub(crate) struct Replica {
    /// The attempt being (or last) made.
    pub(crate) attempt: u32,
    pub(crate) slot: Slot,
    /// Attempts that failed on this host since it was assigned here.
    pub(crate) failures: u32,
    /// The revision's spec, once read.
    pub(crate) spec: Option<Arc<ServiceSpec>>,
}

/// A replica no longer assigned, still answering what reached it.
struct Draining {
    key: ReplicaKey,
    workload: Workload,
    since: Instant,
}

#[derive(Default)]
struct Table {
    assigned: BTreeMap<ReplicaKey, Replica>,
    draining: Vec<Draining>,
}

/// What converging on an assignment asks for.
pub(crate) struct Converged {
    /// Replicas to load (new, or failed with a new attempt).
    pub(crate) load: Vec<AssignedReplica>,
    /// Replicas that stopped being assigned.
    pub(crate) stopped: usize,
}

/// The table of replicas (see the module docs).
#[derive(Default)]
pub(crate) struct ReplicaSet {
    table: RwLock<Table>,
}

fn of_service(service: &ServiceId) -> RangeInclusive<ReplicaKey> {
    ReplicaKey { service: service.clone(), revision: 0, replica: 0 }..=ReplicaKey { service: service.clone(), revision: u64::MAX, replica: u32::MAX }
}

impl ReplicaSet {
    fn read<T>(&self, read: impl FnOnce(&Table) -> T) -> T {
        match self.table.read() {
            Ok(table) => read(&table),
            Err(poisoned) => read(&poisoned.into_inner()),
        }
    }

    fn write<T>(&self, write: impl FnOnce(&mut Table) -> T) -> T {
        match self.table.write() {
            Ok(mut table) => write(&mut table),
            Err(poisoned) => write(&mut poisoned.into_inner()),
        }
    }

    /// Makes the table match `desired`: keeps replicas at their attempt,
    /// reloads failed ones given a new attempt, starts new ones, and moves
    /// ready ones no longer assigned to draining (they keep answering what
    /// reached them until [`ReplicaSet::sweep`] drops them).
    pub(crate) fn converge(&self, desired: &[AssignedReplica]) -> Converged {
        self.write(|table| {
            let wanted: BTreeSet<ReplicaKey> = desired.iter().map(AssignedReplica::key).collect();
            let gone: Vec<ReplicaKey> = table.assigned.keys().filter(|k| !wanted.contains(*k)).cloned().collect();
            let now = Instant::now();
            for key in &gone {
                if let Some(Replica { slot: Slot::Ready(workload), .. }) = table.assigned.remove(key) {
                    table.draining.push(Draining { key: key.clone(), workload, since: now });
                }
            }
            let mut load = Vec::new();
            for assigned in desired {
                let key = assigned.key();
                match table.assigned.get_mut(&key) {
                    Some(replica) if replica.attempt == assigned.attempt => {}
                    // A new attempt of a failed replica: load it again. A
                    // working one keeps working whatever the attempt says.
                    Some(replica) if matches!(replica.slot, Slot::Failed(_)) => {
                        replica.attempt = assigned.attempt;
                        replica.slot = Slot::Loading;
                        load.push(assigned.clone());
                    }
                    Some(replica) => replica.attempt = assigned.attempt,
                    None => {
                        table.assigned.insert(key, Replica { attempt: assigned.attempt, slot: Slot::Loading, failures: 0, spec: None });
                        load.push(assigned.clone());
                    }
                }
            }
            Converged { load, stopped: gone.len() }
        })
    }

    /// Whether `key` is still assigned at `attempt` (a load in progress is still wanted).
    pub(crate) fn wants(&self, key: &ReplicaKey, attempt: u32) -> bool {
        self.read(|table| table.assigned.get(key).is_some_and(|r| r.attempt == attempt))
    }

    /// Sets the slot of `key` at `attempt`, unless the assignment moved on.
    /// A failure counts against the replica.
    pub(crate) fn settle(&self, key: &ReplicaKey, attempt: u32, slot: Slot, spec: Option<Arc<ServiceSpec>>) -> bool {
        self.write(|table| {
            let Some(replica) = table.assigned.get_mut(key) else { return false };
            if replica.attempt != attempt {
                return false;
            }
            if matches!(slot, Slot::Failed(_)) {
                replica.failures = replica.failures.saturating_add(1);
            }
            replica.slot = slot;
            if spec.is_some() {
                replica.spec = spec;
            }
            true
        })
    }

    /// Drops draining replicas with nothing in flight that have drained
    /// for at least `grace`, and any after `limit`. Returns how many went.
    pub(crate) fn sweep(&self, grace: Duration, limit: Duration) -> usize {
        self.write(|table| {
            let before = table.draining.len();
            table.draining.retain(|d| {
                let age = d.since.elapsed();
                age < grace || (d.workload.in_flight() > 0 && age < limit)
            });
            before - table.draining.len()
        })
    }

    /// The least busy ready replica of `service` (of `revision`, when given).
    pub(crate) fn least_busy(&self, service: &ServiceId, revision: Option<u64>) -> Option<Workload> {
        self.read(|table| {
            table
                .assigned
                .range(of_service(service))
                .filter(|(key, _)| revision.is_none_or(|r| key.revision == r))
                .filter_map(|(_, replica)| match &replica.slot {
                    Slot::Ready(workload) => Some(workload),
                    _ => None,
                })
                .min_by_key(|w| w.in_flight())
                .cloned()
        })
    }

    /// A replica being stopped that can still answer a request for
    /// `service` (of `revision`), for requests that reached this host over
    /// the bus before it stopped listening.
    pub(crate) fn draining(&self, service: &ServiceId, revision: Option<u64>) -> Option<Workload> {
        self.read(|table| {
            table
                .draining
                .iter()
                .filter(|d| d.key.service == *service && revision.is_none_or(|r| d.key.revision == r))
                .min_by_key(|d| d.workload.in_flight())
                .map(|d| d.workload.clone())
        })
    }

    /// The workloads of `service` here, ready or draining, with their keys:
    /// whose log lines a `wharf logs` asks this host for.
    pub(crate) fn workloads_of(&self, service: &ServiceId) -> Vec<(ReplicaKey, Workload)> {
        self.read(|table| {
            let ready = table.assigned.range(of_service(service)).filter_map(|(key, replica)| match &replica.slot {
                Slot::Ready(workload) => Some((key.clone(), workload.clone())),
                _ => None,
            });
            let draining = table.draining.iter().filter(|d| d.key.service == *service).map(|d| (d.key.clone(), d.workload.clone()));
            ready.chain(draining).collect()
        })
    }

    /// The (service, revision) pairs with a ready replica here.
    pub(crate) fn ready(&self) -> BTreeSet<(ServiceId, u64)> {
        self.read(|table| {
            table
                .assigned
                .iter()
                .filter(|(_, r)| matches!(r.slot, Slot::Ready(_)))
                .map(|(key, _)| (key.service.clone(), key.revision))
                .collect()
        })
    }

    /// The (service, revision) pairs assigned here, ready or not.
    pub(crate) fn revisions(&self) -> BTreeSet<(ServiceId, u64)> {
        self.read(|table| table.assigned.keys().map(|key| (key.service.clone(), key.revision)).collect())
    }

    /// Whether any replica of `service` is assigned here.
    pub(crate) fn has_service(&self, service: &ServiceId) -> bool {
        self.read(|table| table.assigned.range(of_service(service)).next().is_some())
    }

    /// The status of every assigned replica, for heartbeats.
    pub(crate) fn statuses(&self) -> Vec<ReplicaStatus> {
        self.read(|table| {
            table
                .assigned
                .iter()
                .map(|(key, replica)| {
                    let (state, error, load) = match &replica.slot {
                        Slot::Loading => (ReplicaState::Loading, None, None),
                        Slot::Probing => (ReplicaState::Probing, None, None),
                        Slot::Ready(w) => (ReplicaState::Ready, None, Some(w.load())),
                        Slot::Failed(e) => (ReplicaState::Failed, Some(e.clone()), None),
                    };
                    let load = load.unwrap_or_default();
                    ReplicaStatus {
                        service: key.service.clone(),
                        revision: key.revision,
                        replica: key.replica,
                        attempt: replica.attempt,
                        state,
                        error,
                        failures: replica.failures,
                        in_flight: load.in_flight,
                        requests: load.requests,
                        errors: load.errors,
                        latency_micros: load.latency_micros,
                        latency: load.latency,
                        memory_peak: (load.memory_peak > 0).then_some(wharf_proto::ByteSize(load.memory_peak)),
                    }
                })
                .collect()
        })
    }

    /// Requests in flight on every replica, draining ones included.
    pub(crate) fn in_flight(&self) -> u64 {
        self.read(|table| {
            let assigned: u64 = table
                .assigned
                .values()
                .filter_map(|r| match &r.slot {
                    Slot::Ready(w) => Some(w.in_flight()),
                    _ => None,
                })
                .sum();
            assigned + table.draining.iter().map(|d| d.workload.in_flight()).sum::<u64>()
        })
    }

    /// Memory the assigned replicas reserve (their memory requests).
    pub(crate) fn memory_reserved(&self) -> u64 {
        self.read(|table| table.assigned.values().filter_map(|r| r.spec.as_ref()).map(|s| s.memory_request().bytes()).sum())
    }

    /// Instances the assigned replicas reserve (their instance requests).
    pub(crate) fn instances_reserved(&self) -> u64 {
        self.read(|table| table.assigned.values().filter_map(|r| r.spec.as_ref()).map(|s| u64::from(s.instances_request())).sum())
    }

    /// The specs of the replicas assigned here, by service (for routes
    /// whose service the services watch has not delivered yet).
    pub(crate) fn specs(&self) -> BTreeMap<ServiceId, Arc<ServiceSpec>> {
        self.read(|table| {
            table.assigned.iter().filter_map(|(key, r)| r.spec.as_ref().map(|s| (key.service.clone(), s.clone()))).collect()
        })
    }

    /// Why `service` has no ready replica here, from its failed ones.
    pub(crate) fn why_not_ready(&self, service: &ServiceId) -> String {
        self.read(|table| {
            let errors: Vec<String> = table
                .assigned
                .range(of_service(service))
                .filter_map(|(key, r)| match &r.slot {
                    Slot::Failed(e) => Some(format!("replica {} of revision {} failed: {e}", key.replica, key.revision)),
                    _ => None,
                })
                .collect();
            errors.join("; ")
        })
    }
}
