//! Names of things on the bus: ids of hosts and services, and every subject,
//! bucket and key Wharf uses. Nothing outside this module spells them by hand.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The namespace a service lives in when its spec names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Every host publishes its heartbeat here; the scheduler subscribes to [`HEARTBEAT_WILDCARD`].
pub fn host_heartbeat_subject(host: &HostId) -> String {
    format!("wharf.host.{host}.heartbeat")
}

/// The name a host gives its NATS connection, so the control plane can
/// tell from a disconnect advisory which host went away.
pub fn host_connection_name(host: &HostId) -> String {
    format!("wharf-host-{host}")
}

/// The host a NATS connection name of [`host_connection_name`] belongs to.
pub fn host_of_connection(name: &str) -> Option<HostId> {
    HostId::new(name.strip_prefix("wharf-host-")?).ok()
}

/// The host whose own subject `subject` is (`wharf.host.<id>.…`: its
/// heartbeat, alive beat, resend, logs or jobs subject), if it is one.
pub fn host_of_subject(subject: &str) -> Option<HostId> {
    let rest = subject.strip_prefix("wharf.host.")?;
    let (id, what) = rest.split_once('.')?;
    if what.is_empty() {
        return None;
    }
    HostId::new(id).ok()
}

/// The prefix of a host's request inboxes (`_INBOX.host-<id>`), where
/// replies to its requests and its JetStream watches are delivered. Each
/// host's NATS identity may subscribe only under its own, so it cannot read
/// replies meant for another host or for the control plane (whose inboxes
/// are `_INBOX.<nuid>`: a NUID has no `-`, so none is ever `host-…`).
pub fn host_inbox_prefix(host: &HostId) -> String {
    format!("_INBOX.host-{host}")
}

/// Where a host asks the control plane to make a JetStream consumer for
/// it (a watch, a key listing, a pull of a trigger stream): a host may not
/// make consumers itself, since a consumer may deliver onto any subject.
/// The last token names the asker, and each host may publish only its own.
pub fn consumer_broker_subject(host: &HostId) -> String {
    format!("{CONSUMER_BROKER_PREFIX}.{host}")
}

/// The prefix of [`consumer_broker_subject`].
pub const CONSUMER_BROKER_PREFIX: &str = "wharf.ctl.consumers";

/// Matches [`consumer_broker_subject`] of every host.
pub const CONSUMER_BROKER_WILDCARD: &str = "wharf.ctl.consumers.*";

/// Where a host asks the control plane to read or write a namespace's
/// key-value data for it (its NATS identity may not touch the buckets):
/// the control plane allows only namespaces the host runs. The last token
/// names the asker, and each host may publish only its own.
pub fn data_broker_subject(host: &HostId) -> String {
    format!("wharf.ctl.data.{host}")
}

/// The prefix of [`kv_bucket`]: `wharf-kv-`.
pub const KV_BUCKET_PREFIX: &str = "wharf-kv-";

/// Matches [`data_broker_subject`] of every host.
pub const DATA_BROKER_WILDCARD: &str = "wharf.ctl.data.*";

/// Matches the heartbeat subject of every host.
pub const HEARTBEAT_WILDCARD: &str = "wharf.host.*.heartbeat";

/// Where a host says "alive, nothing changed" ([`crate::HeartbeatAlive`]).
pub fn host_alive_subject(host: &HostId) -> String {
    format!("wharf.host.{host}.alive")
}

/// Matches the alive subject of every host.
pub const ALIVE_WILDCARD: &str = "wharf.host.*.alive";

/// A message here asks the host for a full heartbeat at once (a control
/// plane that missed one, or just started, heard only "nothing changed").
pub fn host_resend_subject(host: &HostId) -> String {
    format!("wharf.host.{host}.resend")
}

/// Requests for a service with no ready replica go here; the activator answers.
pub const ACTIVATE_SUBJECT: &str = "wharf.ctl.activate";

/// The control plane announces lost hosts here ([`crate::HostDown`]).
pub const HOST_DOWN_SUBJECT: &str = "wharf.ctl.host-down";

/// Requests for revision `revision` of a service, sent to one host that
/// has a ready replica of it: each host listens only on its own (its NATS
/// identity may subscribe to no other host's `wharf.host.<id>.>`), for the
/// revisions it has ready replicas of, so a host receives requests only
/// for services it runs. The sender picks the host (see the host's
/// routing); a request for any revision picks one of the revisions too.
pub fn host_request_subject(host: &HostId, namespace: &str, name: &str, revision: u64) -> String {
    format!("wharf.host.{host}.svc.{namespace}.{name}.{revision}")
}

/// Matches [`host_request_subject`] of every host: what a host may publish
/// to (requests to other hosts), never subscribe to.
pub const HOST_REQUESTS_WILDCARD: &str = "wharf.host.*.svc.>";

/// The queue group a host listens in on its [`host_request_subject`]: only
/// that host listens there, but a listener starting while the previous one
/// for the same revision drains must not take a request the other took too.
pub fn revision_queue_group(namespace: &str, name: &str, revision: u64) -> String {
    format!("{namespace}.{name}.{revision}")
}

/// Host `host` announces here that it has a ready replica of a revision
/// of a service ([`crate::ReplicaReady`]: it started listening on its
/// [`host_request_subject`]), so that other hosts may send it requests
/// before the control plane's status says so, and requests held for the
/// service's activation wake at once. Under the host's own subjects, which
/// no other host may publish to: an announcement is believed only when the
/// host it names is the one its subject names ([`host_of_subject`]).
pub fn service_ready_subject(host: &HostId, namespace: &str, name: &str) -> String {
    format!("wharf.host.{host}.ready.{namespace}.{name}")
}

/// Matches [`service_ready_subject`] of one service, from every host.
pub fn service_ready_wildcard(namespace: &str, name: &str) -> String {
    format!("wharf.host.*.ready.{namespace}.{name}")
}

/// Matches [`service_ready_subject`] of `host`, for every service: what it may publish.
pub fn host_ready_wildcard(host: &HostId) -> String {
    format!("wharf.host.{host}.ready.>")
}

/// Matches [`service_ready_subject`] of every host and service.
pub const READY_WILDCARD: &str = "wharf.host.*.ready.>";

/// Where `host` publishes its replicas' log lines of a service, for `wharf
/// logs --follow`: under the host's own subjects, which no other host may
/// publish to, so a follower learns which host sent a line from the
/// subject ([`host_of_subject`]) rather than from what the line says.
pub fn host_log_lines_subject(host: &HostId, namespace: &str, name: &str) -> String {
    format!("wharf.host.{host}.loglines.{namespace}.{name}")
}

/// Matches every [`host_log_lines_subject`] of `host`: what its NATS
/// identity may publish log lines on.
pub fn host_log_lines_wildcard(host: &HostId) -> String {
    format!("wharf.host.{host}.loglines.>")
}

/// Matches [`host_log_lines_subject`] of every host for one service.
pub fn log_lines_wildcard(namespace: &str, name: &str) -> String {
    format!("wharf.host.*.loglines.{namespace}.{name}")
}

/// A host answers requests for the recent log lines of the replicas it runs here
/// ([`crate::observe::LogQuery`]).
pub fn host_logs_subject(host: &HostId) -> String {
    format!("wharf.host.{host}.logs")
}

/// A host takes [`crate::job::JobCommand`]s (start or stop an attempt of a
/// job) by request/reply here.
pub fn host_jobs_subject(host: &HostId) -> String {
    format!("wharf.host.{host}.jobs")
}

/// A host publishes how an attempt it ran ended ([`crate::job::JobResult`])
/// on its own subject, so that its NATS identity may publish no other
/// host's; schedulers follow [`JOB_RESULTS_WILDCARD`] and take a result
/// only from the host its subject names.
pub fn job_result_subject(host: &HostId) -> String {
    format!("wharf.host.{host}.jobresult")
}

/// Matches every host's job-result subject.
pub const JOB_RESULTS_WILDCARD: &str = "wharf.host.*.jobresult";

/// KV bucket of jobs ([`crate::job::StoredJob`]), keyed by [`service_key`].
pub const JOBS_BUCKET: &str = "wharf-jobs";

/// KV bucket of jobs' runs ([`crate::job::JobHistory`]), keyed by
/// [`service_key`]; only the leader writes it.
pub const JOB_RUNS_BUCKET: &str = "wharf-job-runs";

/// KV bucket of the control plane's events ([`crate::observe::Event`]),
/// keyed by [`event_key`]: a ring of slots per namespace.
pub const EVENTS_BUCKET: &str = "wharf-events";

/// The key of event `seq` of `namespace` in [`EVENTS_BUCKET`]: its slot in
/// the namespace's ring of [`crate::observe::EVENTS_PER_NAMESPACE`].
pub fn event_key(namespace: &str, seq: u64) -> String {
    format!("{namespace}.{}", seq % crate::observe::EVENTS_PER_NAMESPACE)
}

/// Matches every event key of `namespace` (for a watch).
pub fn events_pattern(namespace: &str) -> String {
    format!("{namespace}.*")
}

/// KV bucket of desired services ([`crate::StoredService`]), keyed by [`service_key`].
pub const SERVICES_BUCKET: &str = "wharf-services";

/// KV bucket of assignments ([`crate::Assignment`]), keyed by [`assignment_key`].
pub const ASSIGNMENTS_BUCKET: &str = "wharf-assignments";

/// KV bucket of revisions ([`crate::Revision`]): every spec a service has
/// run, immutable, keyed by [`revision_key`].
pub const REVISIONS_BUCKET: &str = "wharf-revisions";

/// The key of one revision of a service in [`REVISIONS_BUCKET`]: `<ns>.<name>.<number>`.
pub fn revision_key(service: &ServiceId, number: u64) -> String {
    format!("{}.{}.{number}", service.namespace, service.name)
}

/// The pattern matching every revision key of a service.
pub fn revision_pattern(service: &ServiceId) -> String {
    format!("{}.{}.*", service.namespace, service.name)
}

/// KV bucket the control plane's leader writes each service's observed
/// state and rollout in ([`crate::ServiceStatus`]), keyed by [`service_key`].
/// Every scheduler's API reads it; hosts read the traffic split from it.
pub const STATUS_BUCKET: &str = "wharf-status";

/// KV bucket holding the control plane's leader lease ([`crate::Lease`]) under [`LEADER_KEY`].
pub const LEADER_BUCKET: &str = "wharf-leader";

/// The key of the controller's lease in [`LEADER_BUCKET`].
pub const LEADER_KEY: &str = "controller";

/// Object store of component artifacts, keyed by digest.
pub const ARTIFACTS_BUCKET: &str = "wharf-artifacts";

/// The longest `wasi:keyvalue` bucket identifier a spec may declare, in bytes.
pub const MAX_KV_IDENTIFIER: usize = 256;

/// The longest `wasi:keyvalue` key, in bytes. Stored, a key may take three
/// times its length ([`kv_key`]); at this bound the NATS subject that
/// carries it stays well inside the server's 4 KiB control line, whose
/// overrun closes the whole connection.
pub const MAX_KV_KEY: usize = 1024;

/// Checks a `wasi:keyvalue` key (from a component or the API) before it is
/// stored: at most [`MAX_KV_KEY`] bytes.
pub fn check_kv_key(key: &str) -> Result<(), String> {
    if key.len() > MAX_KV_KEY {
        return Err(format!("the key is {} bytes long; keys are at most {MAX_KV_KEY} bytes", key.len()));
    }
    Ok(())
}

/// The token a `wasi:keyvalue` bucket identifier becomes inside its
/// namespace's KV bucket, the first part of every key of [`kv_key`].
///
/// `wasi:keyvalue`'s `open` takes any string. A DNS label (what Wharf
/// accepted before) is its own token, so data stored under it stays where
/// it is; anything else becomes a readable part (letters, digits and `-`,
/// others as `-`, at most 32) plus `_` and 32 hex digits of its SHA-256.
/// The `_` never appears in a label, so the two forms cannot collide, and
/// two identifiers share a token only if their hashes' first 128 bits do.
pub fn kv_bucket_token(identifier: &str) -> String {
    let is_label = !identifier.is_empty()
        && identifier.len() <= 63
        && identifier.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !identifier.starts_with('-')
        && !identifier.ends_with('-');
    if is_label {
        return identifier.to_string();
    }
    use sha2::Digest as _;
    let readable: String = identifier.chars().take(32).map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
    let hash = hex::encode(sha2::Sha256::digest(identifier.as_bytes()));
    format!("{readable}_{}", &hash[..32])
}

/// A `wasi:keyvalue` key as stored in its namespace's KV bucket ([`kv_bucket`]): `<bucket token>.<key>`, where bytes outside `[A-Za-z0-9_-]` become
/// `=XX`, so any key fits NATS' key alphabet and decoding is exact. `bucket`
/// is the identifier's [`kv_bucket_token`].
pub fn kv_key(bucket: &str, key: &str) -> String {
    let mut out = String::with_capacity(bucket.len() + 1 + key.len());
    out.push_str(bucket);
    out.push('.');
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("={byte:02X}"));
        }
    }
    out
}

/// The `(bucket, key)` a stored key of [`kv_key`] names, if it is in `bucket`.
pub fn kv_key_decode(bucket: &str, stored: &str) -> Option<String> {
    let encoded = stored.strip_prefix(bucket)?.strip_prefix('.')?;
    let mut bytes = Vec::with_capacity(encoded.len());
    let mut chars = encoded.bytes();
    while let Some(b) = chars.next() {
        if b == b'=' {
            let hi = chars.next()?;
            let lo = chars.next()?;
            bytes.push(u8::from_str_radix(std::str::from_utf8(&[hi, lo]).ok()?, 16).ok()?);
        } else {
            bytes.push(b);
        }
    }
    String::from_utf8(bytes).ok()
}

/// The name of a component's object in [`ARTIFACTS_BUCKET`]: its digest's hex.
pub fn artifact_object(digest: &crate::Digest) -> String {
    digest.hex()
}

/// KV bucket of the hosts the control plane has seen, keyed by host id.
pub const HOSTS_BUCKET: &str = "wharf-hosts";

/// KV bucket of namespaces and their quotas (key: the namespace).
pub const NAMESPACES_BUCKET: &str = "wharf-namespaces";

/// KV bucket of secrets (key: [`secret_key`]); values never leave it except
/// into the components granted them.
pub const SECRETS_BUCKET: &str = "wharf-secrets";

/// A secret's key in [`SECRETS_BUCKET`]: `<namespace>.<name>`.
pub fn secret_key(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

/// KV bucket of which namespace uploaded which component (key:
/// [`artifact_owner_key`], value: [`crate::wire::ArtifactRecord`]). The
/// bytes are stored once in [`ARTIFACTS_BUCKET`] whoever uploaded them.
pub const ARTIFACT_OWNERS_BUCKET: &str = "wharf-artifact-owners";

/// A namespace's record of a component in [`ARTIFACT_OWNERS_BUCKET`]: `<namespace>.<sha256 hex>`.
pub fn artifact_owner_key(namespace: &str, digest: &crate::Digest) -> String {
    format!("{namespace}.{}", digest.hex())
}

/// KV bucket of route claims: which namespace owns a host name or a
/// path-only prefix (key: [`route_claim_key`], value:
/// [`crate::wire::RouteClaim`]).
pub const ROUTE_CLAIMS_BUCKET: &str = "wharf-route-claims";

/// The key of a claim: `host.<hex of the lowercased host name>` or
/// `path.<hex of the normalized prefix>` (hex, because NATS keys allow
/// few characters and paths may hold any).
pub fn route_claim_key(target: &crate::wire::ClaimTarget) -> String {
    match target {
        crate::wire::ClaimTarget::Host(host) => format!("host.{}", hex::encode(host.as_bytes())),
        crate::wire::ClaimTarget::Path(path) => format!("path.{}", hex::encode(path.as_bytes())),
    }
}

/// KV bucket recording which host holds each service's volumes (key: the
/// service key, value: the host id).
pub const VOLUMES_BUCKET: &str = "wharf-volumes";

/// The label every host carries implicitly with its own id; the control
/// plane pins services with volumes to their host with it.
pub const HOST_LABEL: &str = "wharf.host";

/// The `wasi:keyvalue` bucket shared by the services of one namespace.
pub fn kv_bucket(namespace: &str) -> String {
    format!("{KV_BUCKET_PREFIX}{namespace}")
}

/// The key of a service in [`SERVICES_BUCKET`]. NATS KV keys allow
/// `[-/_=.a-zA-Z0-9]`, and namespaces and names are DNS labels, so the dot
/// cannot be ambiguous.
pub fn service_key(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

/// The key of a host's assignment in [`ASSIGNMENTS_BUCKET`].
pub fn assignment_key(host: &HostId) -> String {
    host.to_string()
}

/// Why a string is not a valid name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    /// The name is empty.
    #[error("must not be empty")]
    Empty,
    /// The name is longer than a DNS label may be.
    #[error("{0:?} is {len} characters long; at most 63 are allowed", len = .0.len())]
    TooLong(String),
    /// The name has a character outside `a-z`, `0-9` and `-`, or starts or ends with `-`.
    #[error(
        "{0:?} is not a DNS label: use lowercase letters, digits and '-', and start and end with a letter or digit"
    )]
    NotLabel(String),
    /// A service id without the `/` between namespace and name.
    #[error("{0:?} is not a service id: write <namespace>/<name>")]
    NotServiceId(String),
}

/// Checks that `s` is a DNS label: 1 to 63 of `a-z`, `0-9` and `-`, neither
/// first nor last a `-`. Namespaces, service names and host ids are labels,
/// so they can stand in subjects, bucket names, keys and host names unescaped.
pub fn check_label(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > 63 {
        return Err(NameError::TooLong(s.to_string()));
    }
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
    if !s.bytes().all(allowed) || s.starts_with('-') || s.ends_with('-') {
        return Err(NameError::NotLabel(s.to_string()));
    }
    Ok(())
}

/// The id of a worker host: a DNS label, chosen by the host at start-up.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostId(String);

impl HostId {
    /// `id` as a host id, if it is a DNS label.
    pub fn new(id: impl Into<String>) -> Result<Self, NameError> {
        let id = id.into();
        check_label(&id)?;
        Ok(HostId(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for HostId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostId::new(s)
    }
}

impl TryFrom<String> for HostId {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        HostId::new(value)
    }
}

impl From<HostId> for String {
    fn from(value: HostId) -> Self {
        value.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostId({})", self.0)
    }
}

/// A service, named by namespace and name; written `namespace/name`.
///
/// Parsing checks both parts are DNS labels and accepts a bare `name` for the
/// default namespace. Ordered by namespace, then name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceId {
    /// The namespace, a DNS label.
    pub namespace: String,
    /// The service's name within its namespace, a DNS label.
    pub name: String,
}

impl ServiceId {
    /// The id of `name` in `namespace`, if both are DNS labels.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Result<Self, NameError> {
        let id = ServiceId {
            namespace: namespace.into(),
            name: name.into(),
        };
        check_label(&id.namespace)?;
        check_label(&id.name)?;
        Ok(id)
    }

    /// This service's key in [`SERVICES_BUCKET`].
    pub fn key(&self) -> String {
        service_key(&self.namespace, &self.name)
    }
}

impl FromStr for ServiceId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((namespace, name)) => ServiceId::new(namespace, name),
            None if s.is_empty() => Err(NameError::NotServiceId(s.to_string())),
            None => ServiceId::new(DEFAULT_NAMESPACE, s),
        }
    }
}

impl TryFrom<String> for ServiceId {
    type Error = NameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<ServiceId> for String {
    fn from(value: ServiceId) -> Self {
        value.to_string()
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl fmt::Debug for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceId({self})")
    }
}

#[cfg(test)]
mod kv_key_tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_the_nats_alphabet() {
        for key in ["hits", "a.b/c d", "ünï=cødé", "", "=41"] {
            let stored = kv_key("counter", key);
            assert!(stored.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_=.".contains(&b)), "{stored}");
            assert_eq!(kv_key_decode("counter", &stored).as_deref(), Some(key));
        }
        assert_eq!(kv_key_decode("other", &kv_key("counter", "k")), None);
        assert_eq!(kv_key_decode("count", &kv_key("counter", "k")), None, "a prefix of another bucket's name");
    }

    #[test]
    fn any_bucket_identifier_gets_a_distinct_token_in_the_key_alphabet() {
        assert_eq!(kv_bucket_token("counter"), "counter", "labels keep their stored data");
        let identifiers = ["my_bucket", "my.bucket", "My-Bucket", "my-bucket_", "data/2024", "ünï", " ", "a".repeat(MAX_KV_IDENTIFIER).leak()];
        let mut tokens = std::collections::BTreeSet::new();
        for identifier in identifiers {
            let token = kv_bucket_token(identifier);
            assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)) && token.len() <= 65, "{identifier:?} -> {token}");
            assert!(token.contains('_'), "{identifier:?} -> {token} cannot collide with a label");
            assert!(tokens.insert(token), "{identifier:?} collides");
        }
        assert!(kv_bucket_token("my.bucket").starts_with("my-bucket_"));
        assert_ne!(kv_bucket_token("my.bucket"), kv_bucket_token("my-bucket_"));
    }

    #[test]
    fn keys_are_bounded() {
        assert!(check_kv_key(&"k".repeat(MAX_KV_KEY)).is_ok());
        let message = check_kv_key(&"k".repeat(5000)).expect_err("too long");
        assert!(message.contains("5000 bytes") && message.contains("1024"), "{message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str) -> HostId {
        HostId::new(id).expect("valid host id")
    }

    #[test]
    fn builds_subjects_buckets_and_keys() {
        assert_eq!(host_request_subject(&host("edge-1"), "default", "hello", 3), "wharf.host.edge-1.svc.default.hello.3");
        let edge = HostId::new("edge-a").expect("valid");
        assert_eq!(service_ready_subject(&edge, "shop", "cart"), "wharf.host.edge-a.ready.shop.cart");
        assert_eq!(host_of_subject(&service_ready_subject(&edge, "shop", "cart")), Some(edge.clone()));
        assert!(crate::trigger::subject_matches(&service_ready_wildcard("shop", "cart"), &service_ready_subject(&edge, "shop", "cart")));
        assert!(crate::trigger::subject_matches(READY_WILDCARD, &service_ready_subject(&edge, "shop", "cart")));
        assert!(crate::trigger::subject_matches(&host_ready_wildcard(&edge), &service_ready_subject(&edge, "shop", "cart")));
        let edge = host("edge-a");
        assert_eq!(host_log_lines_subject(&edge, "shop", "cart"), "wharf.host.edge-a.loglines.shop.cart");
        assert_eq!(host_of_subject(&host_log_lines_subject(&edge, "shop", "cart")), Some(edge));
        assert_eq!(log_lines_wildcard("shop", "cart"), "wharf.host.*.loglines.shop.cart");
        assert_eq!(host_log_lines_wildcard(&host("edge-a")), "wharf.host.edge-a.loglines.>");
        assert_eq!(host_logs_subject(&host("edge-1")), "wharf.host.edge-1.logs");
        assert_eq!(event_key("shop", 7), "shop.7");
        assert_eq!(event_key("shop", crate::observe::EVENTS_PER_NAMESPACE + 7), "shop.7", "a ring: the slot repeats");
        assert_eq!(events_pattern("shop"), "shop.*");
        assert_eq!(
            host_heartbeat_subject(&host("h-1")),
            "wharf.host.h-1.heartbeat"
        );
        assert_eq!(HEARTBEAT_WILDCARD, "wharf.host.*.heartbeat");
        assert_eq!(ACTIVATE_SUBJECT, "wharf.ctl.activate");
        assert_eq!(SERVICES_BUCKET, "wharf-services");
        assert_eq!(ASSIGNMENTS_BUCKET, "wharf-assignments");
        assert_eq!(ARTIFACTS_BUCKET, "wharf-artifacts");
        assert_eq!(HOSTS_BUCKET, "wharf-hosts");
        assert_eq!(kv_bucket("shop"), "wharf-kv-shop");
        assert_eq!(service_key("shop", "cart"), "shop.cart");
        assert_eq!(assignment_key(&host("h-1")), "h-1");
        let digest = crate::Digest::of(b"hello");
        assert_eq!(artifact_object(&digest), digest.hex());
        let id: ServiceId = "shop/cart".parse().expect("valid id");
        assert_eq!(id.key(), "shop.cart");
    }

    #[test]
    fn host_subjects_name_their_host() {
        let a = host("edge-a");
        let requests = host_request_subject(&a, "shop", "cart", 2);
        for subject in [host_heartbeat_subject(&a), host_alive_subject(&a), host_resend_subject(&a), host_logs_subject(&a), host_jobs_subject(&a), requests] {
            assert_eq!(host_of_subject(&subject), Some(a.clone()), "{subject}");
        }
        for other in ["wharf.host.edge-a", "wharf.host.edge-a.", "wharf.host.Edge.heartbeat", "wharf.svc.edge-a.heartbeat", "wharf.host..heartbeat"] {
            assert_eq!(host_of_subject(other), None, "{other}");
        }
        assert_eq!(host_inbox_prefix(&a), "_INBOX.host-edge-a");
    }

    #[test]
    fn checks_labels() {
        for good in ["a", "default", "h-1", "0abc", &"x".repeat(63)] {
            assert_eq!(check_label(good), Ok(()), "{good}");
        }
        assert_eq!(check_label(""), Err(NameError::Empty));
        assert!(matches!(
            check_label(&"x".repeat(64)),
            Err(NameError::TooLong(_))
        ));
        for bad in ["-a", "a-", "A", "a.b", "a_b", "a b", "é"] {
            assert!(
                matches!(check_label(bad), Err(NameError::NotLabel(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn host_ids_are_labels() {
        assert_eq!(host("worker-7").as_str(), "worker-7");
        assert!(HostId::new("Worker.7").is_err());
        assert!(serde_json::from_str::<HostId>("\"a.b\"").is_err());
        let json = serde_json::to_string(&host("h-1")).expect("serialises");
        assert_eq!(json, "\"h-1\"");
        assert_eq!(
            serde_json::from_str::<HostId>(&json).expect("parses"),
            host("h-1")
        );
    }

    #[test]
    fn service_ids_parse_and_display() {
        let id: ServiceId = "shop/cart".parse().expect("valid id");
        assert_eq!(id, ServiceId::new("shop", "cart").expect("valid id"));
        assert_eq!(id.to_string(), "shop/cart");
        assert_eq!(
            "cart".parse::<ServiceId>(),
            ServiceId::new("default", "cart")
        );
        assert!(matches!(
            "".parse::<ServiceId>(),
            Err(NameError::NotServiceId(_))
        ));
        assert!(matches!(
            "shop/Cart".parse::<ServiceId>(),
            Err(NameError::NotLabel(_))
        ));
        assert!(matches!(
            "/cart".parse::<ServiceId>(),
            Err(NameError::Empty)
        ));
        let json = serde_json::to_string(&id).expect("serialises");
        assert_eq!(json, "\"shop/cart\"");
        assert_eq!(
            serde_json::from_str::<ServiceId>(&json).expect("parses"),
            id
        );
    }
}
