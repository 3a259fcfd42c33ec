//! Wharf's wire contract: ids, units, service specs, wire messages, and the
//! names of every subject and bucket. Pure data and validation; no I/O.

pub mod beats;
pub mod body_stream;
pub mod digest;
pub mod latency;
pub mod egress;
pub mod job;
pub mod manifest;
pub mod names;
pub mod observe;
pub mod rollout;
pub mod sealed;
pub mod oci;
pub mod spec;
pub mod status;
pub mod strict;
pub mod trigger;
pub mod units;
pub mod wire;

pub use digest::{Digest, DigestError};
pub use manifest::{
    ComponentRef, JobManifest, Location, Manifest, ManifestError, ManifestFormat, ServiceManifest, parse_apply_manifest, parse_job_manifest, parse_manifest,
};
pub use job::{JobSpec, StoredJob, JobHistory, JobRun, JobAttempt, RunState, ConcurrencyPolicy};
pub use names::{HostId, NameError, ServiceId};
pub use rollout::{Amount, CanaryPolicy, Ejection, Health, Readiness, RolloutPolicy, TrafficTarget};
pub use oci::{OciReference, OciReferenceError};
pub use spec::{Autoscale, Limits, Placement, Route, ServiceSpec, SpecError, Volume};
pub use trigger::{Delivery, DeliveryResult, Trigger};
pub use units::{ByteSize, ByteSizeError, DurationError, Overcommit, OvercommitError};
pub use latency::LatencyHistogram;
pub use status::{
    AutoscaleSummary, EjectedReplica, FailedRollout, PlacedRevision, RevisionCount, RolloutPhase, RolloutState, ServiceStatus, TrafficWeight,
    UnplaceableReplica,
};
pub use wire::{
    Activation, AssignedReplica, Assignment, Capacity, Demand, Heartbeat, HeartbeatAlive, HostDown, Lease, Namespace, Quota, ReplicaKey, ReplicaReady, ReplicaState,
    ReplicaStatus, Revision, SealedSecrets, StoredService,
};
