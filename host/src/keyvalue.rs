//! `wasi:keyvalue` (store, atomics, batch; 0.2.0-draft) for components,
//! backed by the bus: a JetStream KV bucket per namespace over NATS, the
//! embedded store in single-node mode.
//!
//! A service may open only the buckets its spec declares (`keyvalue:`);
//! they live inside its namespace's KV bucket (`wharf-kv-<ns>`), each key
//! stored as `<bucket>.<encoded key>`. Opening anything else fails with an
//! error that says which buckets the service may open.

use crate::logs::LogBuffer;
use bytes::Bytes;
use std::sync::Arc;
use wasmtime::component::{HasData, Resource, ResourceTable};
use wharf_bus::{Bus, Kv, KvError};
use wharf_proto::names::{kv_key, kv_key_decode};

mod generated {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "wharf:host/keyvalue",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": super::Bucket,
        },
        trappable_error_type: {
            "wasi:keyvalue/store.error" => super::StoreError,
        },
    });
}

use generated::wasi::keyvalue::{atomics, batch, store};

/// The most attempts an atomic increment makes against concurrent writers.
const CAS_ATTEMPTS: u32 = 1000;

/// An open bucket: the namespace's KV bucket and this bucket's key prefix.
pub struct Bucket {
    kv: Kv,
    name: String,
}

/// A failure the guest sees as `wasi:keyvalue/store.error`.
pub enum StoreError {
    NoSuchStore,
    AccessDenied(String),
    Other(String),
}

impl From<wasmtime::component::ResourceTableError> for StoreError {
    fn from(e: wasmtime::component::ResourceTableError) -> Self {
        StoreError::Other(e.to_string())
    }
}

impl From<KvError> for StoreError {
    fn from(e: KvError) -> Self {
        StoreError::Other(e.to_string())
    }
}

/// What one workload may reach: the bus, its namespace and its declared buckets.
/// Cheap to clone; the namespace bucket's handle is opened once and shared.
#[derive(Clone)]
pub struct KeyValueAccess {
    bus: Bus,
    namespace: String,
    service: String,
    buckets: Arc<[String]>,
    kv: Arc<tokio::sync::OnceCell<Kv>>,
}

impl std::fmt::Debug for KeyValueAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyValueAccess").field("namespace", &self.namespace).field("buckets", &self.buckets).finish_non_exhaustive()
    }
}

impl KeyValueAccess {
    /// Access for `service` in `namespace` to `buckets`, over `bus`.
    pub fn new(bus: Bus, namespace: &str, service: &str, buckets: impl IntoIterator<Item = String>) -> Self {
        KeyValueAccess {
            bus,
            namespace: namespace.to_string(),
            service: service.to_string(),
            buckets: buckets.into_iter().collect(),
            kv: Arc::new(tokio::sync::OnceCell::new()),
        }
    }

    async fn namespace_kv(&self) -> Result<Kv, StoreError> {
        let kv = self
            .kv
            .get_or_try_init(|| async {
                let bucket = wharf_proto::names::kv_bucket(&self.namespace);
                self.bus.kv(&bucket).await
            })
            .await?;
        Ok(kv.clone())
    }
}

/// The per-instance view the generated bindings call into.
pub struct KeyValue<'a> {
    pub(crate) access: Option<&'a KeyValueAccess>,
    pub(crate) table: &'a mut ResourceTable,
    pub(crate) logs: &'a LogBuffer,
}

/// Marks [`KeyValue`] as the data of the keyvalue host functions.
pub(crate) struct HasKeyValue;

impl HasData for HasKeyValue {
    type Data<'a> = KeyValue<'a>;
}

/// Adds the `wasi:keyvalue` interfaces to a linker.
pub(crate) fn add_to_linker<T: Send + 'static>(linker: &mut wasmtime::component::Linker<T>, f: fn(&mut T) -> KeyValue<'_>) -> wasmtime::Result<()> {
    store::add_to_linker::<_, HasKeyValue>(linker, f)?;
    atomics::add_to_linker::<_, HasKeyValue>(linker, f)?;
    batch::add_to_linker::<_, HasKeyValue>(linker, f)?;
    Ok(())
}

impl KeyValue<'_> {
    fn bucket(&self, bucket: &Resource<Bucket>) -> Result<(Kv, String), StoreError> {
        let bucket = self.table.get(bucket)?;
        Ok((bucket.kv.clone(), bucket.name.clone()))
    }
}

impl store::Host for KeyValue<'_> {
    async fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, StoreError> {
        let Some(access) = self.access else {
            return Err(StoreError::NoSuchStore);
        };
        if !access.buckets.contains(&identifier) {
            let declared = if access.buckets.is_empty() { "none".to_string() } else { access.buckets.join(", ") };
            let message = format!(
                "bucket `{identifier}` is not declared by service {} (it may open: {declared}; declare buckets under `keyvalue:` in the spec)",
                access.service
            );
            self.logs.push_host_note(&format!("wharf: {message}"));
            return Err(StoreError::AccessDenied(message));
        }
        let kv = access.namespace_kv().await?;
        Ok(self.table.push(Bucket { kv, name: identifier })?)
    }

    fn convert_error(&mut self, err: StoreError) -> wasmtime::Result<store::Error> {
        Ok(match err {
            StoreError::NoSuchStore => store::Error::NoSuchStore,
            // The enum's access-denied carries no text; the message is worth more.
            StoreError::AccessDenied(message) => store::Error::Other(format!("access denied: {message}")),
            StoreError::Other(message) => store::Error::Other(message),
        })
    }
}

impl store::HostBucket for KeyValue<'_> {
    async fn get(&mut self, bucket: Resource<Bucket>, key: String) -> Result<Option<Vec<u8>>, StoreError> {
        let (kv, name) = self.bucket(&bucket)?;
        Ok(kv.get(&kv_key(&name, &key)).await?.map(|e| e.value.to_vec()))
    }

    async fn set(&mut self, bucket: Resource<Bucket>, key: String, value: Vec<u8>) -> Result<(), StoreError> {
        let (kv, name) = self.bucket(&bucket)?;
        kv.put(&kv_key(&name, &key), Bytes::from(value)).await?;
        Ok(())
    }

    async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), StoreError> {
        let (kv, name) = self.bucket(&bucket)?;
        kv.delete(&kv_key(&name, &key)).await?;
        Ok(())
    }

    async fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, StoreError> {
        let (kv, name) = self.bucket(&bucket)?;
        Ok(kv.get(&kv_key(&name, &key)).await?.is_some())
    }

    async fn list_keys(&mut self, bucket: Resource<Bucket>, cursor: Option<u64>) -> Result<store::KeyResponse, StoreError> {
        let (kv, name) = self.bucket(&bucket)?;
        let mut keys: Vec<String> = kv.keys().await?.iter().filter_map(|k| kv_key_decode(&name, k)).collect();
        keys.sort();
        let start = usize::try_from(cursor.unwrap_or(0)).unwrap_or(usize::MAX).min(keys.len());
        Ok(store::KeyResponse { keys: keys[start..].to_vec(), cursor: None })
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for KeyValue<'_> {
    /// Compare-and-set on the stored revision, retried while other writers win.
    async fn increment(&mut self, bucket: Resource<Bucket>, key: String, delta: u64) -> Result<u64, StoreError> {
        let (kv, name) = self.bucket(&bucket)?;
        let stored = kv_key(&name, &key);
        for _ in 0..CAS_ATTEMPTS {
            let current = kv.get(&stored).await?;
            let value = match &current {
                Some(entry) => std::str::from_utf8(&entry.value)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| StoreError::Other(format!("the value of `{key}` is not a decimal number, so it cannot be incremented")))?,
                None => 0,
            };
            let next = value.checked_add(delta).ok_or_else(|| StoreError::Other(format!("incrementing `{key}` would overflow u64")))?;
            let text = Bytes::from(next.to_string());
            let written = match &current {
                Some(entry) => kv.update(&stored, text, entry.revision).await,
                None => kv.create(&stored, text).await,
            };
            match written {
                Ok(_) => return Ok(next),
                Err(KvError::RevisionMismatch { .. } | KvError::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Other(format!("incrementing `{key}` lost to other writers {CAS_ATTEMPTS} times")))
    }
}

impl batch::Host for KeyValue<'_> {
    async fn get_many(&mut self, bucket: Resource<Bucket>, keys: Vec<String>) -> Result<Vec<Option<(String, Vec<u8>)>>, StoreError> {
        let (kv, name) = self.bucket(&bucket)?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let value = kv.get(&kv_key(&name, &key)).await?;
            out.push(value.map(|e| (key, e.value.to_vec())));
        }
        Ok(out)
    }

    async fn set_many(&mut self, bucket: Resource<Bucket>, key_values: Vec<(String, Vec<u8>)>) -> Result<(), StoreError> {
        let (kv, name) = self.bucket(&bucket)?;
        for (key, value) in key_values {
            kv.put(&kv_key(&name, &key), Bytes::from(value)).await?;
        }
        Ok(())
    }

    async fn delete_many(&mut self, bucket: Resource<Bucket>, keys: Vec<String>) -> Result<(), StoreError> {
        let (kv, name) = self.bucket(&bucket)?;
        for key in keys {
            kv.delete(&kv_key(&name, &key)).await?;
        }
        Ok(())
    }
}
