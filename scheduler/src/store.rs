//! The desired state and what the leader writes, over the bus: services in
//! a KV bucket (with KV revisions for compare-and-set), their revisions
//! (immutable specs, numbered), component artifacts in the object store by
//! digest, each service's status, each host's assignment, volume pins and
//! the leader's lease.
//!
//! Reads of the whole state go through the [`crate::informer::Informer`],
//! which keeps it in memory from watches; this module reads single records
//! and writes. Every write a leader makes is compare-and-set against the
//! version it last saw, so a deposed leader's late write is refused
//! ([`StoreError::Fenced`]) when its successor has written since; hosts
//! also ignore assignments from an older lease epoch.

use bytes::Bytes;
use std::time::{SystemTime, UNIX_EPOCH};
use wharf_bus::{Bus, Kv, KvError, ObjectError, Objects};
use wharf_proto::names::{
    ARTIFACTS_BUCKET, ASSIGNMENTS_BUCKET, LEADER_BUCKET, REVISIONS_BUCKET, SERVICES_BUCKET, STATUS_BUCKET, VOLUMES_BUCKET,
    artifact_object, assignment_key, revision_key,
};
use wharf_proto::{Assignment, Digest, HostId, Revision, ServiceId, ServiceSpec, ServiceStatus, StoredService};

/// How many revisions of a service are kept by default (besides the one
/// the service serves as stable, which is never pruned).
pub const DEFAULT_REVISION_HISTORY: usize = 10;

/// How many times a state bucket's limit the revisions bucket may hold.
const REVISIONS_ROOM: u64 = 8;

/// The size limit of the buckets of route claims and component records
/// (tens of thousands of records), or the state limit if lower.
const RECORDS_BYTES: u64 = 8 * 1024 * 1024;

/// Handles to the buckets holding the cluster's state.
#[derive(Clone)]
pub struct Store {
    services: Kv,
    revisions: Kv,
    status: Kv,
    assignments: Kv,
    leader: Kv,
    artifacts: Objects,
    volumes: Kv,
    namespaces: Kv,
    secrets: Kv,
    artifact_owners: Kv,
    route_claims: Kv,
    /// Revisions kept per service.
    history: usize,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the state store failed: {0}")]
    Kv(#[from] KvError),
    #[error("the artifact store failed: {0}")]
    Objects(#[from] ObjectError),
    #[error("a stored value is unreadable ({key}): {source}")]
    Corrupt { key: String, source: serde_json::Error },
    /// The version given does not match the stored one.
    #[error("{service} was changed meanwhile (your version {given}, current {current}); read it again and retry")]
    Conflict { service: ServiceId, given: u64, current: u64 },
    /// Create-only, but the service exists.
    #[error("{0} already exists")]
    Exists(ServiceId),
    #[error("{0} not found")]
    NotFound(ServiceId),
    /// A leader's compare-and-set write found a newer value: someone else
    /// (a newer leader) wrote it. The writer should stop and re-read.
    #[error("{key} was written by someone else since version {expected}; this scheduler may no longer lead")]
    Fenced { key: String, expected: u64 },
    /// The record does not fit in one bus message.
    #[error("{what} is {size} bytes, more than the {max} bytes a record may hold: {hint}")]
    TooLarge { what: String, size: usize, max: usize, hint: &'static str },
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Created,
    Updated,
    /// The spec was already exactly this; nothing was written.
    Unchanged,
}

/// Who asks for a change, and why: recorded in the revision it makes.
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// The token's name, or `admin`.
    pub by: String,
    /// `deploy`, `apply`, `undo to revision 2`, ...
    pub cause: String,
}

impl Store {
    /// Opens (creating when missing) the buckets on `bus`.
    pub async fn open(bus: &Bus) -> Result<Store, StoreError> {
        // The control plane creates every bucket it owns, so hosts (which
        // may not create buckets under the shipped NATS roles) only open
        // them; opened with their options, an existing bucket takes the
        // copies and limits configured now.
        let limits = bus.storage_limits();
        let state = limits.state;
        // Revisions hold up to `history` specs per service: room for more.
        let revisions = wharf_bus::BucketOptions { max_bytes: state.max_bytes.map(|b| b.saturating_mul(REVISIONS_ROOM)) };
        // Route claims and component records are a few hundred bytes each:
        // JetStream reserves a bucket's whole limit, so these stay small.
        let records = wharf_bus::BucketOptions { max_bytes: state.max_bytes.map(|b| b.min(RECORDS_BYTES)) };
        Ok(Store {
            services: bus.kv_with(SERVICES_BUCKET, state).await?,
            revisions: bus.kv_with(REVISIONS_BUCKET, revisions).await?,
            status: bus.kv_with(STATUS_BUCKET, state).await?,
            assignments: bus.kv_with(ASSIGNMENTS_BUCKET, state).await?,
            leader: bus.kv_with(LEADER_BUCKET, state).await?,
            artifacts: bus.objects_with(ARTIFACTS_BUCKET, limits.objects).await?,
            volumes: bus.kv_with(VOLUMES_BUCKET, state).await?,
            namespaces: bus.kv_with(wharf_proto::names::NAMESPACES_BUCKET, state).await?,
            secrets: bus.kv_with(wharf_proto::names::SECRETS_BUCKET, state).await?,
            artifact_owners: bus.kv_with(wharf_proto::names::ARTIFACT_OWNERS_BUCKET, records).await?,
            route_claims: bus.kv_with(wharf_proto::names::ROUTE_CLAIMS_BUCKET, records).await?,
            history: DEFAULT_REVISION_HISTORY,
        })
    }

    /// Keeps `history` revisions per service (at least 1).
    pub fn with_history(mut self, history: usize) -> Store {
        self.history = history.max(1);
        self
    }

    /// The namespaces bucket (quotas).
    pub fn namespaces_kv(&self) -> &Kv {
        &self.namespaces
    }

    /// The secrets bucket.
    pub fn secrets_kv(&self) -> &Kv {
        &self.secrets
    }

    /// Which namespace uploaded which component.
    pub fn artifact_owners_kv(&self) -> &Kv {
        &self.artifact_owners
    }

    /// Which namespace owns which host name or path prefix.
    pub fn route_claims_kv(&self) -> &Kv {
        &self.route_claims
    }

    /// The services bucket, for watching.
    pub fn services_kv(&self) -> &Kv {
        &self.services
    }

    /// The status bucket, for watching.
    pub fn status_kv(&self) -> &Kv {
        &self.status
    }

    /// The assignments bucket, for watching.
    pub fn assignments_kv(&self) -> &Kv {
        &self.assignments
    }

    /// The volume pins bucket, for watching.
    pub fn volumes_kv(&self) -> &Kv {
        &self.volumes
    }

    /// The leader lease bucket.
    pub fn leader_kv(&self) -> &Kv {
        &self.leader
    }

    /// One service, if stored.
    pub async fn service(&self, id: &ServiceId) -> Result<Option<StoredService>, StoreError> {
        match self.services.get(&id.key()).await? {
            Some(entry) => Ok(Some(decode_service(&entry.key, &entry.value, entry.revision)?)),
            None => Ok(None),
        }
    }

    /// One revision of a service, if kept.
    pub async fn revision(&self, id: &ServiceId, number: u64) -> Result<Option<Revision>, StoreError> {
        let key = revision_key(id, number);
        match self.revisions.get(&key).await? {
            Some(entry) => Ok(Some(serde_json::from_slice(&entry.value).map_err(|source| StoreError::Corrupt { key, source })?)),
            None => Ok(None),
        }
    }

    /// Every kept revision of `stored`, oldest first (unreadable ones left out).
    pub async fn revisions(&self, stored: &StoredService) -> Result<Vec<Revision>, StoreError> {
        let id = stored.spec.id();
        let mut out = Vec::new();
        for number in kept(stored) {
            if let Some(revision) = self.revision(&id, number).await? {
                out.push(revision);
            }
        }
        Ok(out)
    }

    /// Creates or replaces a service. `expected`: `None` writes regardless,
    /// `Some(0)` only creates, `Some(v)` only replaces version `v`. A spec
    /// identical to the stored one is left alone (idempotent apply).
    ///
    /// A new template (see [`ServiceSpec::same_template`]) is a new revision,
    /// stored before the service points at it; a template one of the kept
    /// revisions has already reuses that revision (an undo does not renumber).
    /// Revisions beyond the history are pruned, except `keep` (the revision
    /// the service serves as stable).
    pub async fn put_service(
        &self,
        spec: ServiceSpec,
        expected: Option<u64>,
        change: &Change,
        keep: Option<u64>,
    ) -> Result<(StoredService, Written), StoreError> {
        let id = spec.id();
        let key = id.key();
        let current = self.service(&id).await?;
        let now = now_ms();
        match (&current, expected) {
            (Some(_), Some(0)) => return Err(StoreError::Exists(id)),
            (Some(stored), Some(version)) if stored.version != version => {
                return Err(StoreError::Conflict { service: id, given: version, current: stored.version });
            }
            (None, Some(version)) if version != 0 => return Err(StoreError::NotFound(id)),
            _ => {}
        }
        if let Some(stored) = &current
            && stored.spec == spec
            && stored.revision != 0
        {
            return Ok((stored.clone(), Written::Unchanged));
        }
        let (revision, last_revision, history) = self.revision_for(&spec, current.as_ref(), change, keep).await?;
        let mut next = StoredService {
            spec,
            version: 0,
            generation: current.as_ref().map_or(1, |s| s.generation + 1),
            revision,
            last_revision,
            promoted: current.as_ref().map_or(0, |s| s.promoted),
            history,
            created_at_ms: current.as_ref().map_or(now, |s| s.created_at_ms),
            updated_at_ms: now,
        };
        let value = encode(&next);
        if value.len() > self.services.max_value() {
            return Err(StoreError::TooLarge {
                what: format!("service {id}"),
                size: value.len(),
                max: self.services.max_value(),
                hint: "make env and config smaller (large data belongs in a key-value bucket)",
            });
        }
        next.version = match &current {
            Some(stored) => match self.services.update(&key, value, stored.version).await {
                Ok(version) => version,
                Err(KvError::RevisionMismatch { .. }) => {
                    let now = self.service(&id).await?.map_or(0, |s| s.version);
                    return Err(StoreError::Conflict { service: id, given: stored.version, current: now });
                }
                Err(e) => return Err(e.into()),
            },
            None => match self.services.create(&key, value).await {
                Ok(version) => version,
                Err(KvError::AlreadyExists { .. }) => return Err(StoreError::Exists(id)),
                Err(e) => return Err(e.into()),
            },
        };
        self.prune(&next, current.as_ref(), keep).await;
        let written = if current.is_some() { Written::Updated } else { Written::Created };
        Ok((next, written))
    }

    /// The revision `spec` is for a service stored as `current`: the same
    /// as now for an unchanged template, a kept revision with the same
    /// template, or a new one (written here). Returns it, the highest number
    /// used, and the kept numbers.
    async fn revision_for(
        &self,
        spec: &ServiceSpec,
        current: Option<&StoredService>,
        change: &Change,
        keep: Option<u64>,
    ) -> Result<(u64, u64, Vec<u64>), StoreError> {
        let id = spec.id();
        let (last, mut history) = current.map_or((0, Vec::new()), |s| (s.last_revision.max(s.revision), kept(s)));
        if let Some(stored) = current
            && stored.revision != 0
            && stored.spec.same_template(spec)
        {
            return Ok((stored.revision, last, history));
        }
        // Newest first: an undo finds the revision it goes back to.
        for number in history.iter().rev() {
            if let Some(revision) = self.revision(&id, *number).await?
                && revision.spec.same_template(spec)
            {
                return Ok((*number, last, history));
            }
        }
        let number = last + 1;
        let revision = Revision {
            service: id.clone(),
            number,
            spec: spec.clone(),
            created_at_ms: now_ms(),
            created_by: change.by.clone(),
            cause: change.cause.clone(),
        };
        let value = encode(&revision);
        if value.len() > self.revisions.max_value() {
            return Err(StoreError::TooLarge {
                what: format!("revision {number} of {id}"),
                size: value.len(),
                max: self.revisions.max_value(),
                hint: "make env and config smaller (large data belongs in a key-value bucket)",
            });
        }
        self.revisions.put(&revision_key(&id, number), value).await?;
        history.push(number);
        let history = self.trim_history(history, number, keep);
        Ok((number, number, history))
    }

    /// Deletes the revisions `next` no longer keeps. Best effort: a
    /// revision left behind is only storage, never served.
    async fn prune(&self, next: &StoredService, before: Option<&StoredService>, _keep: Option<u64>) {
        let Some(before) = before else { return };
        let id = next.spec.id();
        for number in kept(before).into_iter().filter(|n| !next.history.contains(n)) {
            if let Err(e) = self.revisions.delete(&revision_key(&id, number)).await {
                tracing::debug!(service = %id, number, "could not prune revision: {e}");
            }
        }
    }

    /// The numbers a service keeps after adding `number` to `history`: the
    /// last `self.history`, plus `keep` and the current revision.
    pub fn trim_history(&self, mut history: Vec<u64>, current: u64, keep: Option<u64>) -> Vec<u64> {
        history.sort_unstable();
        history.dedup();
        let cut = history.len().saturating_sub(self.history);
        let (old, recent) = history.split_at(cut);
        let mut kept: Vec<u64> = old.iter().copied().filter(|n| Some(*n) == keep || *n == current).collect();
        kept.extend_from_slice(recent);
        kept
    }

    /// Marks `revision`'s canary as promoted by hand (compare-and-set, retried).
    pub async fn set_promoted(&self, id: &ServiceId, revision: u64) -> Result<(), StoreError> {
        for _ in 0..5 {
            let Some(mut stored) = self.service(id).await? else { return Err(StoreError::NotFound(id.clone())) };
            if stored.promoted == revision {
                return Ok(());
            }
            let version = stored.version;
            stored.promoted = revision;
            stored.generation += 1;
            stored.updated_at_ms = now_ms();
            match self.services.update(&id.key(), encode(&stored), version).await {
                Ok(_) => return Ok(()),
                Err(KvError::RevisionMismatch { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Conflict { service: id.clone(), given: 0, current: 0 })
    }

    /// Deletes a service, its revisions and its status (only at version
    /// `expected`, when given).
    pub async fn delete_service(&self, id: &ServiceId, expected: Option<u64>) -> Result<StoredService, StoreError> {
        let Some(stored) = self.service(id).await? else { return Err(StoreError::NotFound(id.clone())) };
        if let Some(version) = expected
            && version != stored.version
        {
            return Err(StoreError::Conflict { service: id.clone(), given: version, current: stored.version });
        }
        self.services.delete(&id.key()).await?;
        for number in kept(&stored) {
            if let Err(e) = self.revisions.delete(&revision_key(id, number)).await {
                tracing::debug!(service = %id, number, "could not delete revision: {e}");
            }
        }
        if !stored.spec.volumes.is_empty() {
            self.unpin_volumes(id).await?;
        }
        Ok(stored)
    }

    /// Removes a deleted service's status (the leader does, once it has stopped its replicas).
    pub async fn delete_status(&self, id: &ServiceId) -> Result<(), StoreError> {
        self.status.delete(&id.key()).await?;
        Ok(())
    }

    /// Writes a service's status, compare-and-set against `expected` (the
    /// version last read; 0 for none). Returns the new version.
    pub async fn put_status(&self, status: &ServiceStatus, expected: u64) -> Result<u64, StoreError> {
        let key = status.service.key();
        let value = encode(status);
        if value.len() > self.status.max_value() {
            return Err(StoreError::TooLarge { what: format!("status of {}", status.service), size: value.len(), max: self.status.max_value(), hint: "a bug: statuses list a bounded number of entries" });
        }
        fenced_write(&self.status, &key, value, expected).await
    }

    /// Writes one host's whole assignment, compare-and-set against
    /// `expected` (the version last read; 0 for none). Returns the new version.
    pub async fn put_assignment(&self, assignment: &Assignment, expected: u64) -> Result<u64, StoreError> {
        let key = assignment_key(&assignment.host);
        let value = encode(assignment);
        if value.len() > self.assignments.max_value() {
            return Err(StoreError::TooLarge {
                what: format!("the assignment of host {}", assignment.host),
                size: value.len(),
                max: self.assignments.max_value(),
                hint: "the host runs too many replicas (or their secrets are too large) for one record; add hosts or raise the bus's max payload",
            });
        }
        fenced_write(&self.assignments, &key, value, expected).await
    }

    /// Stores a component's bytes under their digest (once).
    pub async fn put_artifact(&self, digest: &Digest, bytes: Bytes) -> Result<bool, StoreError> {
        let name = artifact_object(digest);
        if self.artifacts.exists(&name).await? {
            return Ok(false);
        }
        self.artifacts.put(&name, bytes).await?;
        Ok(true)
    }

    /// A stored component's bytes.
    pub async fn artifact(&self, digest: &Digest) -> Result<Option<Bytes>, StoreError> {
        Ok(self.artifacts.get(&artifact_object(digest)).await?)
    }

    /// Whether a component is stored.
    pub async fn has_artifact(&self, digest: &Digest) -> Result<bool, StoreError> {
        Ok(self.artifacts.exists(&artifact_object(digest)).await?)
    }

    /// Deletes a stored component's bytes.
    pub async fn delete_artifact(&self, digest: &Digest) -> Result<(), StoreError> {
        Ok(self.artifacts.delete(&artifact_object(digest)).await?)
    }

    /// Records that namespace `ns` uploaded `digest` (once; an existing
    /// record stays). Returns whether the record is new.
    pub async fn own_artifact(&self, ns: &str, digest: &Digest, record: &wharf_proto::wire::ArtifactRecord) -> Result<bool, StoreError> {
        match self.artifact_owners.create(&wharf_proto::names::artifact_owner_key(ns, digest), encode(record)).await {
            Ok(_) => Ok(true),
            Err(KvError::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether namespace `ns` uploaded `digest`.
    pub async fn owns_artifact(&self, ns: &str, digest: &Digest) -> Result<bool, StoreError> {
        Ok(self.artifact_owners.get(&wharf_proto::names::artifact_owner_key(ns, digest)).await?.is_some())
    }

    /// Every namespace's record of every component: (namespace, digest, record).
    /// A record that cannot be read is skipped (it grants nothing).
    pub async fn artifact_records(&self) -> Result<Vec<(String, Digest, wharf_proto::wire::ArtifactRecord)>, StoreError> {
        let entries = self.artifact_owners.entries().await?;
        Ok(entries
            .into_iter()
            .filter_map(|entry| {
                let (ns, hex) = entry.key.split_once('.')?;
                let digest = format!("sha256:{hex}").parse().ok()?;
                let record = serde_json::from_slice(&entry.value).ok()?;
                Some((ns.to_string(), digest, record))
            })
            .collect())
    }

    /// Drops namespace `ns`'s record of `digest` (the bytes stay).
    pub async fn disown_artifact(&self, ns: &str, digest: &Digest) -> Result<(), StoreError> {
        Ok(self.artifact_owners.delete(&wharf_proto::names::artifact_owner_key(ns, digest)).await?)
    }

    /// Digests of every stored component.
    pub async fn artifacts(&self) -> Result<Vec<String>, StoreError> {
        let mut names = self.artifacts.list().await?;
        names.sort();
        Ok(names)
    }

    /// Pins a service's volumes to `host` (once; an existing pin stays).
    pub async fn pin_volumes(&self, service: &ServiceId, host: &HostId) -> Result<(), StoreError> {
        match self.volumes.create(&service.key(), Bytes::from(host.as_str().to_string())).await {
            Ok(_) | Err(KvError::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Forgets where a deleted service's volumes were (their data stays on that host's disk).
    pub async fn unpin_volumes(&self, service: &ServiceId) -> Result<(), StoreError> {
        self.volumes.delete(&service.key()).await?;
        Ok(())
    }
}

/// The revision numbers a stored service keeps (older records: its current one).
pub fn kept(stored: &StoredService) -> Vec<u64> {
    let mut numbers = stored.history.clone();
    if stored.revision != 0 && !numbers.contains(&stored.revision) {
        numbers.push(stored.revision);
    }
    numbers.sort_unstable();
    numbers.dedup();
    numbers
}

/// Compare-and-set: creates `key` when `expected` is 0, else replaces
/// version `expected`; anything newer is [`StoreError::Fenced`].
async fn fenced_write(kv: &Kv, key: &str, value: Bytes, expected: u64) -> Result<u64, StoreError> {
    let result = if expected == 0 { kv.create(key, value).await } else { kv.update(key, value, expected).await };
    match result {
        Ok(version) => Ok(version),
        Err(KvError::RevisionMismatch { .. } | KvError::AlreadyExists { .. }) => {
            Err(StoreError::Fenced { key: key.to_string(), expected })
        }
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn decode_service(key: &str, value: &[u8], version: u64) -> Result<StoredService, StoreError> {
    let mut stored: StoredService = serde_json::from_slice(value).map_err(|source| StoreError::Corrupt { key: key.to_string(), source })?;
    stored.version = version;
    Ok(stored)
}

fn encode<T: serde::Serialize>(value: &T) -> Bytes {
    // Our own plain data types always serialize.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// A time in ms since the epoch, as people read it (RFC 3339, UTC).
pub(crate) fn format_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}
