//! What a reconcile reads (a [`Snapshot`] of the cluster and the desired
//! state) and what it returns (a [`Plan`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use wharf_proto::{ByteSize, Capacity, Digest, HostId, Overcommit, ServiceId, ServiceSpec};

/// One replica as assignments list it: the workload and the replica's index in it.
pub type ReplicaRef = (WorkloadId, u32);

/// What placement places: one revision of a service. Replicas of different
/// revisions of a service are placed independently, each revision spread
/// over hosts (and its spread label) on its own.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadId {
    /// The service.
    pub service: ServiceId,
    /// The revision.
    pub revision: u64,
}

impl WorkloadId {
    /// Revision `revision` of `service`.
    pub fn new(service: ServiceId, revision: u64) -> Self {
        WorkloadId { service, revision }
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.service, self.revision)
    }
}

/// A revision of a service with the number of its replicas wanted now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Which service and revision.
    pub id: WorkloadId,
    /// The revision's spec: placement reads its labels, spread, limits and
    /// component (not `replicas`: see [`Workload::replicas`]).
    pub spec: Arc<ServiceSpec>,
    /// How many replicas of this revision should run (indices `0..replicas`).
    pub replicas: u32,
    /// Hosts a replica should not run on (it failed or was ejected there),
    /// by replica index. Soft: such a replica is moved off the host, and
    /// placed elsewhere when another host has room, else back there.
    pub avoid: BTreeMap<u32, BTreeSet<HostId>>,
    /// The most linear memory one instance of the service was seen using,
    /// if known. Each replica counts the larger of this and the spec's
    /// [`ServiceSpec::memory_request`] against the new replicas placed
    /// after it; a replica already placed stays while its request alone
    /// fits, so learning a peak never moves what runs.
    pub memory_peak: Option<ByteSize>,
}

impl Workload {
    /// Revision `revision` of the service `spec` describes, with the spec's
    /// `replicas` and no host to avoid.
    pub fn new(spec: ServiceSpec, revision: u64) -> Self {
        Workload {
            id: WorkloadId::new(spec.id(), revision),
            replicas: spec.replicas,
            spec: Arc::new(spec),
            avoid: BTreeMap::new(),
            memory_peak: None,
        }
    }
}

/// Everything a reconcile decides from; the controller builds it from the
/// stores and the heartbeats.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The hosts known to the control plane, ready or not. A host id that
    /// appears twice counts once, as its first entry.
    pub hosts: Vec<HostInfo>,
    /// The desired workloads (revisions of services), each spec valid
    /// ([`ServiceSpec::validate`]). A workload id that appears twice counts
    /// once, as its first entry.
    pub services: Vec<Workload>,
    /// What each host is assigned now. Hosts missing from `hosts` are gone:
    /// their replicas are placed elsewhere.
    pub current: BTreeMap<HostId, Vec<ReplicaRef>>,
}

/// A host as the control plane last heard of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInfo {
    /// The host's id.
    pub id: HostId,
    /// Whether the host's heartbeats are current; replicas are only placed
    /// on, and only kept on, ready hosts.
    pub ready: bool,
    /// The host's labels, matched by `placement.labels` and grouped by
    /// `placement.spread`; a `zone` label also breaks ties between hosts for
    /// services without a spread label.
    pub labels: BTreeMap<String, String>,
    /// What the host can hold in total.
    pub capacity: Capacity,
    /// How far its memory may be overcommitted: the memory requests placed
    /// on it may add up to `capacity.memory` times this.
    pub memory_overcommit: Overcommit,
    /// Components the host has compiled and cached.
    pub cached: BTreeSet<Digest>,
    /// Requests the host is serving right now.
    pub in_flight: u64,
}

/// The outcome of a reconcile: the full desired assignment of every host,
/// the changes that lead there, and the replicas no host can take.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// What every host in the snapshot should run, sorted by service and
    /// replica; empty for hosts that should run nothing (including hosts
    /// that are not ready).
    pub assignments: BTreeMap<HostId, Vec<ReplicaRef>>,
    /// The differences from the current assignments: every stop first (by
    /// host, service, replica), then every start (by service, replica). A
    /// replica moved from one host to another is a stop and a start.
    pub actions: Vec<Action>,
    /// Desired replicas that no host can take now, by service and replica.
    pub unplaceable: Vec<Unplaceable>,
}

/// One change to what a host runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start replica `replica` of `service` on `host`.
    Start {
        /// The workload.
        service: WorkloadId,
        /// The replica's index.
        replica: u32,
        /// Where to start it.
        host: HostId,
    },
    /// Stop replica `replica` of `service` on `host`.
    Stop {
        /// The workload.
        service: WorkloadId,
        /// The replica's index.
        replica: u32,
        /// Where it runs now.
        host: HostId,
    },
}

/// A desired replica that could not be placed, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unplaceable {
    /// The workload.
    pub service: WorkloadId,
    /// The replica's index.
    pub replica: u32,
    /// What kept every host out, e.g. `no ready host has labels zone=b` or
    /// `insufficient memory on 3 of 3 hosts (needs 1GiB, most free 512MiB)`.
    pub reason: String,
}
