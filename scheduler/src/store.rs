//! The desired state: services in a KV bucket (with revisions for
//! compare-and-set), component artifacts in the object store by digest, and
//! the assignments the controller writes for each host.

use bytes::Bytes;
use std::time::{SystemTime, UNIX_EPOCH};
use wharf_bus::{Bus, Kv, KvError, ObjectError, Objects};
use wharf_proto::names::{ARTIFACTS_BUCKET, ASSIGNMENTS_BUCKET, SERVICES_BUCKET, VOLUMES_BUCKET, artifact_object, assignment_key};
use wharf_proto::{Assignment, Digest, HostId, ServiceId, ServiceSpec, StoredService};

/// Handles to the buckets holding the cluster's desired state.
#[derive(Clone)]
pub struct Store {
    services: Kv,
    assignments: Kv,
    artifacts: Objects,
    volumes: Kv,
    namespaces: Kv,
    secrets: Kv,
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
    /// The revision given does not match the stored one.
    #[error("{service} was changed meanwhile (your revision {given}, current {current}); read it again and retry")]
    Conflict { service: ServiceId, given: u64, current: u64 },
    /// Create-only, but the service exists.
    #[error("{0} already exists")]
    Exists(ServiceId),
    #[error("{0} not found")]
    NotFound(ServiceId),
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Created,
    Updated,
    /// The spec was already exactly this; nothing was written.
    Unchanged,
}

impl Store {
    /// Opens (creating when missing) the buckets on `bus`.
    pub async fn open(bus: &Bus) -> Result<Store, StoreError> {
        // The control plane creates every bucket it owns, so hosts (which
        // may not create buckets under the shipped NATS roles) only open them.
        Ok(Store {
            services: bus.kv(SERVICES_BUCKET).await?,
            assignments: bus.kv(ASSIGNMENTS_BUCKET).await?,
            artifacts: bus.objects(ARTIFACTS_BUCKET).await?,
            volumes: bus.kv(VOLUMES_BUCKET).await?,
            namespaces: bus.kv(wharf_proto::names::NAMESPACES_BUCKET).await?,
            secrets: bus.kv(wharf_proto::names::SECRETS_BUCKET).await?,
        })
    }

    /// The namespaces bucket (quotas).
    pub fn namespaces_kv(&self) -> &Kv {
        &self.namespaces
    }

    /// The secrets bucket.
    pub fn secrets_kv(&self) -> &Kv {
        &self.secrets
    }

    /// The services bucket, for watching.
    pub fn services_kv(&self) -> &Kv {
        &self.services
    }

    /// Every stored service, by namespace and name.
    pub async fn services(&self) -> Result<Vec<StoredService>, StoreError> {
        let mut services = Vec::new();
        for entry in self.services.entries().await? {
            services.push(decode_service(&entry.key, &entry.value, entry.revision)?);
        }
        services.sort_by_key(|s| s.spec.id());
        Ok(services)
    }

    /// One service, if stored.
    pub async fn service(&self, id: &ServiceId) -> Result<Option<StoredService>, StoreError> {
        match self.services.get(&id.key()).await? {
            Some(entry) => Ok(Some(decode_service(&entry.key, &entry.value, entry.revision)?)),
            None => Ok(None),
        }
    }

    /// Creates or replaces a service. `expected`: `None` writes regardless,
    /// `Some(0)` only creates, `Some(rev)` only replaces revision `rev`.
    /// A spec identical to the stored one is left alone (idempotent apply).
    pub async fn put_service(&self, spec: ServiceSpec, expected: Option<u64>) -> Result<(StoredService, Written), StoreError> {
        let id = spec.id();
        let key = id.key();
        let current = self.service(&id).await?;
        let now = now_ms();
        match (&current, expected) {
            (Some(_), Some(0)) => return Err(StoreError::Exists(id)),
            (Some(stored), Some(rev)) if stored.revision != rev => {
                return Err(StoreError::Conflict { service: id, given: rev, current: stored.revision });
            }
            (None, Some(rev)) if rev != 0 => return Err(StoreError::NotFound(id)),
            _ => {}
        }
        match current {
            Some(stored) if stored.spec == spec => Ok((stored, Written::Unchanged)),
            Some(stored) => {
                let mut next = StoredService { spec, revision: 0, generation: stored.generation + 1, created_at_ms: stored.created_at_ms, updated_at_ms: now };
                let value = encode(&next);
                next.revision = match self.services.update(&key, value, stored.revision).await {
                    Ok(rev) => rev,
                    Err(KvError::RevisionMismatch { .. }) => {
                        let current = self.service(&id).await?.map_or(0, |s| s.revision);
                        return Err(StoreError::Conflict { service: id, given: stored.revision, current });
                    }
                    Err(e) => return Err(e.into()),
                };
                Ok((next, Written::Updated))
            }
            None => {
                let mut next = StoredService { spec, revision: 0, generation: 1, created_at_ms: now, updated_at_ms: now };
                next.revision = match self.services.create(&key, encode(&next)).await {
                    Ok(rev) => rev,
                    Err(KvError::AlreadyExists { .. }) => return Err(StoreError::Exists(id)),
                    Err(e) => return Err(e.into()),
                };
                Ok((next, Written::Created))
            }
        }
    }

    /// Deletes a service (only at revision `expected`, when given).
    pub async fn delete_service(&self, id: &ServiceId, expected: Option<u64>) -> Result<StoredService, StoreError> {
        let Some(stored) = self.service(id).await? else { return Err(StoreError::NotFound(id.clone())) };
        if let Some(rev) = expected
            && rev != stored.revision
        {
            return Err(StoreError::Conflict { service: id.clone(), given: rev, current: stored.revision });
        }
        self.services.delete(&id.key()).await?;
        if !stored.spec.volumes.is_empty() {
            self.unpin_volumes(id).await?;
        }
        Ok(stored)
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

    /// Whether a component is stored.
    pub async fn has_artifact(&self, digest: &Digest) -> Result<bool, StoreError> {
        Ok(self.artifacts.exists(&artifact_object(digest)).await?)
    }

    /// Digests of every stored component.
    pub async fn artifacts(&self) -> Result<Vec<String>, StoreError> {
        let mut names = self.artifacts.list().await?;
        names.sort();
        Ok(names)
    }

    /// Every host's current assignment.
    pub async fn assignments(&self) -> Result<Vec<Assignment>, StoreError> {
        let mut out = Vec::new();
        for entry in self.assignments.entries().await? {
            let mut assignment: Assignment =
                serde_json::from_slice(&entry.value).map_err(|source| StoreError::Corrupt { key: entry.key.clone(), source })?;
            assignment.revision = entry.revision;
            out.push(assignment);
        }
        Ok(out)
    }

    /// Writes one host's whole assignment.
    pub async fn put_assignment(&self, assignment: &Assignment) -> Result<(), StoreError> {
        self.assignments.put(&assignment_key(&assignment.host), encode(assignment)).await?;
        Ok(())
    }

    /// The host each service with volumes is pinned to.
    pub async fn volume_pins(&self) -> Result<std::collections::BTreeMap<ServiceId, HostId>, StoreError> {
        let mut pins = std::collections::BTreeMap::new();
        for entry in self.volumes.entries().await? {
            let host = String::from_utf8_lossy(&entry.value).to_string();
            match (entry.key.split_once('.'), HostId::new(host)) {
                (Some((ns, name)), Ok(host)) => {
                    if let Ok(id) = ServiceId::new(ns, name) {
                        pins.insert(id, host);
                    }
                }
                _ => tracing::warn!(key = %entry.key, "ignoring an unreadable volume pin"),
            }
        }
        Ok(pins)
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

fn decode_service(key: &str, value: &[u8], revision: u64) -> Result<StoredService, StoreError> {
    let mut stored: StoredService = serde_json::from_slice(value).map_err(|source| StoreError::Corrupt { key: key.to_string(), source })?;
    stored.revision = revision;
    Ok(stored)
}

fn encode<T: serde::Serialize>(value: &T) -> Bytes {
    // Our own plain data types always serialize.
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}
