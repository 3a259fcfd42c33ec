//! Messages between the control plane and the hosts, as JSON: what is stored
//! in the services and assignments buckets, and what a host reports in its
//! heartbeats.
//!
//! Unlike specs, these accept unknown fields, so a newer sender does not
//! break an older receiver.

use crate::names::{HostId, ServiceId};
use crate::spec::ServiceSpec;
use crate::{ByteSize, Digest};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A desired service as stored in [`crate::names::SERVICES_BUCKET`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredService {
    /// The spec as last applied.
    pub spec: ServiceSpec,
    /// The KV revision this value was read at, for compare-and-set. The
    /// bucket's own revision is authoritative: readers overwrite this field,
    /// and whatever a writer puts here is ignored.
    #[serde(default)]
    pub revision: u64,
    /// Bumped on every change to the spec, so hosts can tell a replica of
    /// the old spec from one of the new.
    pub generation: u64,
    /// When the service was first created, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// When the spec last changed, in milliseconds since the Unix epoch.
    pub updated_at_ms: u64,
}

/// Everything one host must run: the full desired set, not a change to it,
/// so a host that missed a message converges on the next one it reads.
/// Stored in [`crate::names::ASSIGNMENTS_BUCKET`] under the host's key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The host this assignment is for.
    pub host: HostId,
    /// The replicas the host must run; any other it runs, it stops.
    #[serde(default)]
    pub replicas: Vec<AssignedReplica>,
    /// The KV revision this value was read at (see [`StoredService::revision`]).
    #[serde(default)]
    pub revision: u64,
    /// Bumped by the scheduler every time it rewrites this assignment.
    pub generation: u64,
}

/// One replica a host must run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedReplica {
    /// The service the replica belongs to.
    pub service: ServiceId,
    /// The replica's index within its service, from 0.
    pub replica: u32,
    /// The spec to run it with.
    pub spec: ServiceSpec,
    /// The spec's generation ([`StoredService::generation`]).
    pub generation: u64,
}

/// What a host can hold, in the units replicas reserve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Memory for instances; each replica reserves [`ServiceSpec::reservation`].
    pub memory: ByteSize,
    /// Instances that may run at once; each replica reserves its `concurrency`.
    pub instances: u32,
}

/// A host's periodic report: that it is alive, what it can hold, and how its
/// replicas are doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The reporting host.
    pub host: HostId,
    /// Where the host's HTTP ingress listens, if it has one.
    #[serde(default)]
    pub addr: Option<String>,
    /// The host's labels, matched against [`crate::Placement::labels`].
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// What the host can hold in total (not what is free).
    pub capacity: Capacity,
    /// Components the host has compiled and cached, so placing them there starts faster.
    #[serde(default)]
    pub cached: Vec<Digest>,
    /// The replicas the host runs and how each is doing.
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
    /// When this heartbeat was sent, in milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
    /// When the host process started, in milliseconds since the Unix epoch;
    /// a change means the host restarted.
    pub started_at_ms: u64,
    /// The host is shutting down: it takes no new work, and its replicas
    /// should be placed elsewhere now rather than after it goes silent.
    #[serde(default)]
    pub draining: bool,
    /// Per service, requests this host holds for activation or serves on a
    /// replica it started for them: demand the replicas' own load misses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub demand: Vec<Demand>,
    /// Memory the host's replicas reserve (memory cap x concurrency each).
    #[serde(default)]
    pub memory_reserved: ByteSize,
    /// Memory the host process holds (resident set), when known.
    #[serde(default)]
    pub memory_in_use: ByteSize,
}

/// Requests waiting for (or served by an activation replica of) one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand {
    /// The service.
    pub service: ServiceId,
    /// Requests waiting or in flight.
    pub waiting: u64,
}

/// How one replica on a host is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// The service the replica belongs to.
    pub service: ServiceId,
    /// The replica's index within its service.
    pub replica: u32,
    /// The generation of the spec the replica runs.
    pub generation: u64,
    /// Whether it serves requests yet.
    pub state: ReplicaState,
    /// Why it failed, when `state` is [`ReplicaState::Failed`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Requests being served right now.
    #[serde(default)]
    pub in_flight: u64,
    /// Requests served since the replica started.
    #[serde(default)]
    pub requests: u64,
    /// Sum of those requests' durations in microseconds (with `requests`,
    /// the mean latency between two heartbeats).
    #[serde(default)]
    pub latency_micros: u64,
}

/// The life of a replica on its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Fetching, checking or compiling the component.
    Loading,
    /// Serving requests.
    Ready,
    /// Could not be loaded; see [`ReplicaStatus::error`].
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;

    #[track_caller]
    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
        value: &T,
    ) -> serde_json::Value {
        let json = serde_json::to_value(value).expect("serialises");
        let back: T = serde_json::from_value(json.clone()).expect("parses");
        assert_eq!(&back, value);
        json
    }

    fn host() -> HostId {
        HostId::new("h-1").expect("valid host id")
    }

    fn spec() -> ServiceSpec {
        ServiceSpec::new("hello", Digest::of(b"hello"))
    }

    #[test]
    fn stored_service_round_trips() {
        let stored = StoredService {
            spec: spec(),
            revision: 7,
            generation: 3,
            created_at_ms: 1,
            updated_at_ms: 2,
        };
        let json = round_trip(&stored);
        assert_eq!(json["spec"]["name"], "hello");
        let mut without_revision = json;
        without_revision
            .as_object_mut()
            .expect("an object")
            .remove("revision");
        let read: StoredService = serde_json::from_value(without_revision).expect("parses");
        assert_eq!(read.revision, 0);
    }

    #[test]
    fn assignment_round_trips() {
        let assignment = Assignment {
            host: host(),
            replicas: vec![AssignedReplica {
                service: spec().id(),
                replica: 2,
                spec: spec(),
                generation: 4,
            }],
            revision: 0,
            generation: 9,
        };
        let json = round_trip(&assignment);
        assert_eq!(json["replicas"][0]["service"], "default/hello");
    }

    #[test]
    fn heartbeat_round_trips_and_tolerates_unknown_fields() {
        let heartbeat = Heartbeat {
            host: host(),
            addr: Some("127.0.0.1:8080".into()),
            labels: [("zone".to_string(), "a".to_string())].into(),
            capacity: Capacity {
                memory: ByteSize::gib(16),
                instances: 1024,
            },
            cached: vec![Digest::of(b"hello")],
            replicas: vec![ReplicaStatus {
                service: spec().id(),
                replica: 0,
                generation: 1,
                state: ReplicaState::Failed,
                error: Some("trap".into()),
                in_flight: 3,
                requests: 100,
                latency_micros: 5000,
            }],
            sent_at_ms: 20,
            started_at_ms: 10,
            draining: false,
            demand: Vec::new(),
            memory_reserved: ByteSize::mib(64),
            memory_in_use: ByteSize::mib(20),
        };
        let mut json = round_trip(&heartbeat);
        assert_eq!(json["capacity"]["memory"], "16GiB");
        assert_eq!(json["replicas"][0]["state"], "failed");
        json["from_the_future"] = serde_json::json!(true);
        assert_eq!(
            serde_json::from_value::<Heartbeat>(json).expect("parses"),
            heartbeat
        );
    }
}

/// A namespace and its quotas, stored in [`crate::names::NAMESPACES_BUCKET`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    /// Limits on what the namespace's services may use; absent = unlimited.
    #[serde(default)]
    pub quota: Quota,
}

/// A namespace's limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Replicas over all its services (an autoscaled service counts its `max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Memory reserved over all its replicas (memory cap x concurrency each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// Requests per second its services may take at each host's ingress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rps: Option<u32>,
    /// Bytes its `wasi:keyvalue` data may take (the size limit of its data
    /// bucket); absent: [`Quota::DEFAULT_KV_BYTES`], not unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_bytes: Option<ByteSize>,
}

impl Quota {
    /// A namespace's data limit when its quota sets none: 1 GiB.
    pub const DEFAULT_KV_BYTES: ByteSize = ByteSize(1 << 30);

    /// The size limit of the namespace's data bucket.
    pub fn kv_bytes(&self) -> ByteSize {
        self.kv_bytes.unwrap_or(Self::DEFAULT_KV_BYTES)
    }
}
