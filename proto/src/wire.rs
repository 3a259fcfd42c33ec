//! Messages between the control plane and the hosts, as JSON: what is stored
//! in the services and assignments buckets, and what a host reports in its
//! heartbeats.
//!
//! Unlike specs, these accept unknown fields, so a newer sender does not
//! break an older receiver.

use crate::names::{HostId, ServiceId};
use crate::spec::ServiceSpec;
use crate::latency::LatencyHistogram;
use crate::{ByteSize, Digest};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A desired service as stored in [`crate::names::SERVICES_BUCKET`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredService {
    /// The spec as last applied.
    pub spec: ServiceSpec,
    /// The KV revision this value was read at: the compare-and-set token
    /// (`If-Match`). The bucket's own revision is authoritative: readers
    /// overwrite this field, and whatever a writer puts here is ignored.
    #[serde(default)]
    pub version: u64,
    /// Bumped on every write of the record (a new template or a scale).
    pub generation: u64,
    /// The revision the spec's template is ([`Revision::number`]); 0 in a
    /// record written before revisions existed, until the control plane
    /// gives it one.
    #[serde(default)]
    pub revision: u64,
    /// The highest revision number this service has used, so that numbers
    /// never repeat once old revisions are pruned.
    #[serde(default)]
    pub last_revision: u64,
    /// A revision whose canary was promoted by hand (`wharf rollout
    /// promote`): it is rolled out without further analysis.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub promoted: u64,
    /// The numbers of the revisions kept in the revisions bucket, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<u64>,
    /// When the service was first created, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// When the record last changed, in milliseconds since the Unix epoch.
    pub updated_at_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One revision of a service: a spec it ran, immutable once written, in
/// [`crate::names::REVISIONS_BUCKET`]. Every change to the template (see
/// [`ServiceSpec::same_template`]) makes the next number; a change back to
/// a template a kept revision has reuses that revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    /// The service.
    pub service: ServiceId,
    /// Its number, from 1.
    pub number: u64,
    /// The spec as applied then; only its template matters.
    pub spec: ServiceSpec,
    /// When it was made, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Who made it: the token's name, or `admin`.
    #[serde(default)]
    pub created_by: String,
    /// Why: `deploy`, `apply`, `undo to revision 2`, ...
    #[serde(default)]
    pub cause: String,
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
    /// The KV revision this value was read at (see [`StoredService::version`]).
    #[serde(default)]
    pub version: u64,
    /// Bumped by the scheduler every time it rewrites this assignment.
    pub generation: u64,
    /// The lease epoch of the leader that wrote it ([`Lease::epoch`]). A
    /// host ignores an assignment older than the newest epoch it has seen,
    /// so a deposed leader's late write cannot undo its successor's.
    #[serde(default)]
    pub epoch: u64,
    /// The secrets the assigned replicas' specs grant, sealed to the host's
    /// own key (see [`crate::sealed`]): how a host receives secrets without
    /// reading the secrets bucket. `None`: the host announced no sealing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<SealedSecrets>,
}

/// Secrets sealed to one host, inside its [`Assignment`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedSecrets {
    /// The host's public sealing key they are sealed to, from its heartbeat
    /// ([`Heartbeat::seal_key`]); a host restarted with a new key waits for
    /// them to be sealed again.
    pub to: String,
    /// Each secret by its key in the secrets bucket
    /// ([`crate::names::secret_key`]), sealed, in hex. A granted secret
    /// that does not exist is absent.
    #[serde(default)]
    pub values: BTreeMap<String, String>,
}

/// One replica a host must run: which revision of which service, and the
/// attempt. Specs are not embedded: the host reads the revision from
/// [`crate::names::REVISIONS_BUCKET`], so an assignment's size does not
/// depend on env or config.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AssignedReplica {
    /// The service the replica belongs to.
    pub service: ServiceId,
    /// The revision it runs.
    #[serde(default)]
    pub revision: u64,
    /// The replica's index within its revision, from 0.
    pub replica: u32,
    /// Bumped by the control plane to have a failed replica tried again:
    /// a host reloads a failed replica when the attempt changes.
    #[serde(default)]
    pub attempt: u32,
}

impl AssignedReplica {
    /// The replica's identity on a host: everything but the attempt.
    pub fn key(&self) -> ReplicaKey {
        ReplicaKey { service: self.service.clone(), revision: self.revision, replica: self.replica }
    }
}

/// A replica's identity: service, revision and index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaKey {
    /// The service.
    pub service: ServiceId,
    /// The revision.
    pub revision: u64,
    /// The index within the revision.
    pub replica: u32,
}

impl std::fmt::Display for ReplicaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} revision {} replica {}", self.service, self.revision, self.replica)
    }
}

/// The control plane's leader lease, in [`crate::names::LEADER_BUCKET`]:
/// held while renewed by compare-and-set within `ttl_ms`; taken over by
/// another scheduler once it has not changed for that long.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds it: a scheduler's id.
    pub holder: String,
    /// Bumped at every change of holder; fences the leader's writes.
    pub epoch: u64,
    /// How long the lease lasts without renewal, in milliseconds.
    pub ttl_ms: u64,
    /// When the holder last renewed it, by its own clock (informative:
    /// others judge expiry by when they saw it change, not by this).
    pub renewed_at_ms: u64,
    /// The holder gave it up (shut down): another may take it at once.
    #[serde(default)]
    pub released: bool,
}

/// A host announcing that a request waits for a service with no ready
/// replica (scale from zero), on [`crate::names::ACTIVATE_SUBJECT`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    /// The service the request is for.
    pub service: ServiceId,
    /// The host holding the request.
    pub host: HostId,
}

/// A host announcing that it has a ready replica of a revision of a
/// service and listens for its requests on its own subject, on its
/// [`crate::names::service_ready_subject`]. Other hosts believe it only
/// when `host` is the host whose subject it came on, and only for a host
/// the control plane placed that revision on (its status says so): a host
/// cannot speak for another, nor draw another service's requests to itself
/// by announcing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReady {
    /// The announcing host.
    pub host: HostId,
    /// The service.
    pub service: ServiceId,
    /// The revision it has a ready replica of.
    pub revision: u64,
}

/// The control plane saying a host is lost (its connection closed, or its
/// heartbeats stopped), on [`crate::names::HOST_DOWN_SUBJECT`]: requests
/// other hosts sent there may never be answered, and safe ones are sent
/// again at once rather than left to their deadline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostDown {
    pub host: HostId,
    /// The services it ran replicas of; `None` when too many to list (any).
    #[serde(default)]
    pub services: Option<Vec<ServiceId>>,
}

impl HostDown {
    /// Whether requests for `service` may have gone to the lost host.
    pub fn affects(&self, service: &ServiceId) -> bool {
        self.services.as_ref().is_none_or(|services| services.contains(service))
    }
}

/// What a host can hold, in the units replicas reserve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Memory for instances; each replica reserves [`crate::ServiceSpec::memory_request`]
    /// (up to this times the host's [`Heartbeat::memory_overcommit`]).
    pub memory: ByteSize,
    /// Instances that may run at once, shared by the host's replicas; each
    /// reserves [`crate::ServiceSpec::instances_request`].
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
    /// Memory the host's replicas reserve (their memory requests) and its
    /// jobs (their caps).
    #[serde(default)]
    pub memory_reserved: ByteSize,
    /// Memory the host process holds (resident set), when known.
    #[serde(default)]
    pub memory_in_use: ByteSize,
    /// How far placement may overcommit the host's memory: reserved
    /// requests may add up to `capacity.memory` times this. Absent (hosts
    /// before it existed): 1, no overcommit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_overcommit: Option<crate::Overcommit>,
    /// Numbers this report's content (everything but the send time): a
    /// [`HeartbeatAlive`] naming the same version says nothing changed.
    #[serde(default)]
    pub version: u64,
    /// The public half of the host's own sealing key (64 hex digits,
    /// [`crate::sealed::HostPublicKey`]): the control plane seals the
    /// secrets of the replicas it assigns here to it. `None`: a host that
    /// reads secrets itself (`wharf up`, or an older host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal_key: Option<String>,
}

/// A heartbeat that says only "alive, and nothing changed since the full
/// heartbeat of `version`": what an idle host sends, so the control plane's
/// cost at idle does not grow with the replicas hosts run. A receiver
/// that does not hold that version asks the host for a full one
/// ([`crate::names::host_resend_subject`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAlive {
    pub host: HostId,
    pub started_at_ms: u64,
    pub version: u64,
    pub sent_at_ms: u64,
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
    /// The revision it runs.
    #[serde(default)]
    pub revision: u64,
    /// The replica's index within its revision.
    pub replica: u32,
    /// The attempt it is at ([`AssignedReplica::attempt`]).
    #[serde(default)]
    pub attempt: u32,
    /// Whether it serves requests yet.
    pub state: ReplicaState,
    /// Why it failed, when `state` is [`ReplicaState::Failed`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Attempts of this replica that failed on this host (loads and
    /// readiness checks), since it was assigned here.
    #[serde(default)]
    pub failures: u32,
    /// Requests being served right now.
    #[serde(default)]
    pub in_flight: u64,
    /// Requests served since the replica started.
    #[serde(default)]
    pub requests: u64,
    /// Of those, requests that failed: traps, exhausted fuel or memory,
    /// deadlines and 5xx answers (not requests refused for load).
    #[serde(default)]
    pub errors: u64,
    /// Sum of those requests' durations in microseconds (with `requests`,
    /// the mean latency between two heartbeats).
    #[serde(default)]
    pub latency_micros: u64,
    /// The requests' durations, counted in buckets since the replica started.
    #[serde(default, skip_serializing_if = "LatencyHistogram::is_empty")]
    pub latency: LatencyHistogram,
    /// The most linear memory one of the replica's instances held, since
    /// the replica started; absent before its first request. The control
    /// plane places new replicas of the service by at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_peak: Option<ByteSize>,
}

impl ReplicaStatus {
    /// A replica in `state` that has served nothing yet: no error, no
    /// failures, no load.
    pub fn new(key: ReplicaKey, attempt: u32, state: ReplicaState) -> ReplicaStatus {
        ReplicaStatus {
            service: key.service,
            revision: key.revision,
            replica: key.replica,
            attempt,
            state,
            error: None,
            failures: 0,
            in_flight: 0,
            requests: 0,
            errors: 0,
            latency_micros: 0,
            latency: LatencyHistogram::default(),
            memory_peak: None,
        }
    }

    /// The replica's identity.
    pub fn key(&self) -> ReplicaKey {
        ReplicaKey { service: self.service.clone(), revision: self.revision, replica: self.replica }
    }
}

/// The life of a replica on its host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    /// Fetching, checking or compiling the component.
    Loading,
    /// Loaded; its readiness check has not passed yet.
    Probing,
    /// Serving requests.
    Ready,
    /// Could not be loaded or did not become ready; see [`ReplicaStatus::error`].
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;

    #[test]
    fn quota_room_grants_what_fits_and_names_the_binding_quota() {
        let none = Quota::default();
        assert_eq!(none.room("shop", 100, 1 << 40, 3, 1 << 20), (3, None), "no quota: everything fits");
        let replicas = Quota { replicas: Some(4), ..Quota::default() };
        assert_eq!(replicas.room("shop", 2, 0, 1, 1 << 20), (1, None));
        let (granted, why) = replicas.room("shop", 3, 0, 3, 1 << 20);
        assert_eq!(granted, 1);
        assert_eq!(why.as_deref(), Some("namespace shop is at its quota replicas=4 (3 in use)"));
        assert_eq!(replicas.room("shop", 6, 0, 1, 0).0, 0, "a quota lowered below use grants nothing");
        let memory = Quota { replicas: Some(10), memory: Some(ByteSize(256 << 20)), ..Quota::default() };
        let (granted, why) = memory.room("shop", 1, 192 << 20, 2, 64 << 20);
        assert_eq!(granted, 1);
        assert_eq!(why.as_deref(), Some("namespace shop is at its quota memory=256MiB (192MiB reserved, 64MiB more per replica)"));
        assert_eq!(memory.room("shop", 1, 0, 5, 0), (5, None), "replicas reserving nothing are bounded by the replica quota only");
    }

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
            version: 7,
            generation: 3,
            revision: 2,
            last_revision: 2,
            promoted: 0,
            history: vec![1, 2],
            created_at_ms: 1,
            updated_at_ms: 2,
        };
        let json = round_trip(&stored);
        assert_eq!(json["spec"]["name"], "hello");
        let mut without_version = json;
        without_version
            .as_object_mut()
            .expect("an object")
            .remove("version");
        let read: StoredService = serde_json::from_value(without_version).expect("parses");
        assert_eq!(read.version, 0);
    }

    #[test]
    fn assignments_name_revisions_and_stay_small() {
        let mut big = spec();
        big.env.insert("BIG".into(), "x".repeat(900 * 1024));
        let assignment = Assignment {
            host: host(),
            replicas: vec![AssignedReplica {
                service: big.id(),
                revision: 3,
                replica: 2,
                attempt: 1,
            }],
            version: 0,
            generation: 9,
            epoch: 4,
            secrets: None,
        };
        let json = round_trip(&assignment);
        assert_eq!(json["replicas"][0]["service"], "default/hello");
        assert!(json.to_string().len() < 200, "an assignment does not carry specs: {json}");
    }

    #[test]
    fn messages_from_a_newer_version_are_read() {
        let mut json = serde_json::to_value(StoredService {
            spec: spec(),
            version: 0,
            generation: 1,
            revision: 1,
            last_revision: 1,
            promoted: 0,
            history: vec![1],
            created_at_ms: 1,
            updated_at_ms: 1,
        })
        .expect("serialises");
        json["added_later"] = serde_json::json!({"x": 1});
        json["spec"]["limits"]["added_later"] = serde_json::json!(true);
        let read: StoredService = serde_json::from_value(json).expect("a newer record still reads");
        assert_eq!(read.spec, spec());
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
                revision: 1,
                replica: 0,
                attempt: 2,
                state: ReplicaState::Failed,
                error: Some("trap".into()),
                failures: 2,
                in_flight: 3,
                requests: 100,
                errors: 4,
                latency_micros: 5000,
                latency: LatencyHistogram::default(),
                memory_peak: Some(ByteSize::mib(2)),
            }],
            sent_at_ms: 20,
            started_at_ms: 10,
            draining: false,
            demand: Vec::new(),
            memory_reserved: ByteSize::mib(64),
            memory_in_use: ByteSize::mib(20),
            memory_overcommit: Some(crate::Overcommit::NONE),
            version: 0,
            seal_key: Some("ab".repeat(32)),
        };
        let mut json = round_trip(&heartbeat);
        assert_eq!(json["capacity"]["memory"], "16GiB");
        assert_eq!(json["replicas"][0]["state"], "failed");
        assert_eq!(json["replicas"][0]["memory_peak"], "2MiB");
        assert_eq!(json["memory_overcommit"], 1.0);
        json["from_the_future"] = serde_json::json!(true);
        assert_eq!(
            serde_json::from_value::<Heartbeat>(json).expect("parses"),
            heartbeat
        );
    }
}

/// A namespace's record of a component it uploaded, in
/// [`crate::names::ARTIFACT_OWNERS_BUCKET`]: what its artifact quota counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// The component's size in bytes.
    pub size: u64,
    /// When the namespace first uploaded it.
    pub uploaded_at_ms: u64,
    /// Who uploaded it (`admin`, `token <id>`).
    #[serde(default)]
    pub by: String,
}

/// What a route claim owns: a host name (every path under it), or a path
/// prefix of the routes that name no host.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimTarget {
    /// A host name, lowercased, without a port.
    Host(String),
    /// A path prefix, normalized as the route table does (`/api/` is `/api`).
    #[serde(rename = "path_prefix")]
    Path(String),
}

impl ClaimTarget {
    /// The target a route needs: its host name if it names one, else its
    /// path prefix.
    pub fn of_route(route: &crate::Route) -> ClaimTarget {
        match &route.host {
            Some(host) => ClaimTarget::Host(host.to_ascii_lowercase()),
            None => ClaimTarget::Path(normalize_prefix(&route.path_prefix)),
        }
    }
}

impl std::fmt::Display for ClaimTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClaimTarget::Host(host) => write!(f, "host {host}"),
            ClaimTarget::Path(path) => write!(f, "path prefix {path}"),
        }
    }
}

/// `/api/` and `/api` are one prefix; the empty prefix is `/`.
pub fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() { "/".to_string() } else { trimmed.to_string() }
}

/// Whether path prefix `outer` covers `inner` (at a segment boundary):
/// `/` covers everything, `/api` covers `/api` and `/api/x`, not `/apix`.
pub fn prefix_covers(outer: &str, inner: &str) -> bool {
    outer == "/" || inner.strip_prefix(outer).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// A namespace's claim on a host name or path prefix, in
/// [`crate::names::ROUTE_CLAIMS_BUCKET`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteClaim {
    pub target: ClaimTarget,
    /// The namespace that owns it.
    pub namespace: String,
    /// How: `claimed` (first come, explicitly), `deployed` (first come, by
    /// a route) or `granted` (by an admin).
    pub how: String,
    /// Who (`admin`, `token <id>`).
    #[serde(default)]
    pub by: String,
    pub at_ms: u64,
}

/// A namespace and its quotas, stored in [`crate::names::NAMESPACES_BUCKET`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    /// Limits on what the namespace's services may use; absent = unlimited.
    #[serde(default)]
    pub quota: Quota,
    /// Namespaces whose services may call this one's (`http://svc.ns`);
    /// `*` is any. Calls from inside the namespace are always allowed;
    /// from others, refused unless listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_from: Vec<String>,
}

impl Namespace {
    /// Whether services of namespace `caller` may call this namespace's (named `own`).
    pub fn admits(&self, own: &str, caller: &str) -> bool {
        caller == own || self.allow_from.iter().any(|allowed| allowed == "*" || allowed == caller)
    }

    /// Checks `allow_from`: each entry a namespace name or `*`.
    pub fn validate(&self) -> Result<(), String> {
        for entry in &self.allow_from {
            if entry != "*" && crate::names::check_label(entry).is_err() {
                return Err(format!("allow_from: {entry:?} is neither a namespace name (a DNS label) nor \"*\""));
            }
        }
        Ok(())
    }
}

/// A namespace's limits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Replicas over all its services (an autoscaled service counts its `max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Memory reserved over all its replicas (their memory requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// Requests per second its services may take at each host's ingress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rps: Option<u32>,
    /// Bytes its `wasi:keyvalue` data may take (the size limit of its data
    /// bucket); absent: the cluster's default for data buckets
    /// (`--data-kv-max-bytes`, 64 MiB), not unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_bytes: Option<ByteSize>,
    /// Components it may keep uploaded (count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<u32>,
    /// Bytes of the components it keeps uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_bytes: Option<ByteSize>,
}

impl Quota {
    /// How many of `asked` more replicas, each reserving `each` bytes, fit
    /// in namespace `ns` beside what its services hold now (`used_replicas`,
    /// `used_memory`); with fewer than asked, also the quota that binds,
    /// named as an operator raises it (`replicas=4`, `memory=1GiB`) with
    /// what is in use.
    pub fn room(&self, ns: &str, used_replicas: u64, used_memory: u64, asked: u64, each: u64) -> (u64, Option<String>) {
        let mut granted = asked;
        let mut binding = None;
        if let Some(limit) = self.replicas {
            let left = u64::from(limit).saturating_sub(used_replicas);
            if left < granted {
                granted = left;
                binding = Some(format!("namespace {ns} is at its quota replicas={limit} ({used_replicas} in use)"));
            }
        }
        if let Some(limit) = self.memory
            && each > 0
        {
            let left = limit.bytes().saturating_sub(used_memory) / each;
            if left < granted {
                granted = left;
                binding = Some(format!("namespace {ns} is at its quota memory={limit} ({} reserved, {} more per replica)", ByteSize(used_memory), ByteSize(each)));
            }
        }
        (granted, binding)
    }
}

