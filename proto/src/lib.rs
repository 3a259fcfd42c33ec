//! Wharf's wire contract: ids, units, service specs, wire messages, and the
//! names of every subject and bucket. Pure data and validation; no I/O.

pub mod digest;
pub mod egress;
pub mod manifest;
pub mod names;
pub mod spec;
pub mod units;
pub mod wire;

pub use digest::{Digest, DigestError};
pub use manifest::{
    ComponentRef, Location, ManifestError, ManifestFormat, ServiceManifest, parse_manifest,
};
pub use names::{HostId, NameError, ServiceId};
pub use spec::{Autoscale, Limits, Placement, Route, ServiceSpec, SpecError, Volume};
pub use units::{ByteSize, ByteSizeError, DurationError};
pub use wire::{
    AssignedReplica, Assignment, Capacity, Demand, Heartbeat, Namespace, Quota, ReplicaState, ReplicaStatus, StoredService,
};
