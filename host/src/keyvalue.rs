//! `wasi:keyvalue` (store, atomics, batch; 0.2.0-draft) for components,
//! backed by the bus: a JetStream KV bucket per namespace over NATS, the
//! embedded store in single-node mode.
//!
//! A service may open only the buckets its spec declares (`keyvalue:`), by
//! any identifier; they live inside its namespace's KV bucket
//! (`wharf-kv-<ns>`), each key stored as `<bucket token>.<encoded key>`
//! ([`wharf_proto::names::kv_bucket_token`]). Opening anything else fails
//! with an error that says which buckets the service may open.
//!
//! Every call is bounded before it reaches the bus ([`KeyValueLimits`]):
//! keys by length (a key too long for a NATS subject would close the host's
//! connection), `list-keys` by page (the guest gets a page and a cursor; the
//! host reads no more of the bucket than the page), and the batch calls by
//! count and, for `get-many`, by the bytes they return.

use crate::logs::LogBuffer;
use bytes::Bytes;
use tracing::Instrument;
use std::sync::Arc;
use wasmtime::component::{HasData, Resource, ResourceTable};
use wharf_bus::{Bus, Kv, KvError};
use wharf_proto::names::{check_kv_key, kv_bucket_token, kv_key, kv_key_decode};

/// Bounds on each `wasi:keyvalue` call a component makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyValueLimits {
    /// Keys in one `list-keys` page. 1,000: with keys of at most 1 KiB, a
    /// page is at most about 1 MiB.
    pub page_keys: usize,
    /// Keys in one `get-many`, `set-many` or `delete-many`. 1,000.
    pub batch_keys: usize,
    /// Bytes of values one `get-many` may return. 16 MiB, the ingress's body limit.
    pub batch_bytes: u64,
}

impl Default for KeyValueLimits {
    fn default() -> Self {
        KeyValueLimits { page_keys: 1000, batch_keys: 1000, batch_bytes: 16 * 1024 * 1024 }
    }
}

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

/// An open bucket: the namespace's KV bucket and this bucket's token, the
/// first part of its keys.
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
        StoreError::Other(match e {
            KvError::BucketFull { max_bytes, .. } => format!(
                "this namespace's data is full (its quota kv_bytes allows {}); the write changed nothing: delete data, or ask an admin to raise the quota (wharf namespace set NS --kv-bytes SIZE)",
                wharf_proto::ByteSize(max_bytes)
            ),
            e => e.to_string(),
        })
    }
}

/// Refuses a key over [`wharf_proto::names::MAX_KV_KEY`] before it reaches the bus.
fn checked(key: &str) -> Result<(), StoreError> {
    check_kv_key(key).map_err(StoreError::Other)
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
    limits: KeyValueLimits,
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
            limits: KeyValueLimits::default(),
        }
    }

    /// The same access within the host's `limits` (the runtime's config).
    pub fn with_limits(mut self, limits: KeyValueLimits) -> Self {
        self.limits = limits;
        self
    }

    async fn namespace_kv(&self) -> Result<Kv, StoreError> {
        let kv = self
            .kv
            .get_or_try_init(|| async {
                // Over NATS a host's bus makes the calls through the control
                // plane's data broker: its own identity may not touch the bucket.
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
    fn limits(&self) -> KeyValueLimits {
        self.access.map(|access| access.limits).unwrap_or_default()
    }

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
        Ok(self.table.push(Bucket { kv, name: kv_bucket_token(&identifier) })?)
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

/// The span of one key-value host call (see `crate::trace`), a child of the guest's.
fn call_span(operation: &'static str) -> tracing::Span {
    tracing::trace_span!(target: crate::trace::TARGET, "keyvalue", operation)
}

impl store::HostBucket for KeyValue<'_> {
    async fn get(&mut self, bucket: Resource<Bucket>, key: String) -> Result<Option<Vec<u8>>, StoreError> {
        checked(&key)?;
        let (kv, name) = self.bucket(&bucket)?;
        Ok(Instrument::instrument(kv.get(&kv_key(&name, &key)), call_span("get")).await?.map(|e| e.value.to_vec()))
    }

    async fn set(&mut self, bucket: Resource<Bucket>, key: String, value: Vec<u8>) -> Result<(), StoreError> {
        checked(&key)?;
        let (kv, name) = self.bucket(&bucket)?;
        Instrument::instrument(kv.put(&kv_key(&name, &key), Bytes::from(value)), call_span("set")).await?;
        Ok(())
    }

    async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), StoreError> {
        checked(&key)?;
        let (kv, name) = self.bucket(&bucket)?;
        Instrument::instrument(kv.delete(&kv_key(&name, &key)), call_span("delete")).await?;
        Ok(())
    }

    async fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, StoreError> {
        checked(&key)?;
        let (kv, name) = self.bucket(&bucket)?;
        Ok(Instrument::instrument(kv.get(&kv_key(&name, &key)), call_span("exists")).await?.is_some())
    }

    /// One page of keys, oldest change first; the cursor is where the next
    /// page starts (a revision of the namespace's bucket).
    async fn list_keys(&mut self, bucket: Resource<Bucket>, cursor: Option<u64>) -> Result<store::KeyResponse, StoreError> {
        let (kv, name) = self.bucket(&bucket)?;
        let page = kv.keys_page(&format!("{name}."), cursor.unwrap_or(0), self.limits().page_keys).await?;
        let keys = page.keys.iter().filter_map(|k| kv_key_decode(&name, k)).collect();
        Ok(store::KeyResponse { keys, cursor: page.next })
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for KeyValue<'_> {
    /// Compare-and-set on the stored revision, retried while other writers
    /// win (`Kv::increment`; over NATS the control plane's data broker runs
    /// the loop, next to the store).
    async fn increment(&mut self, bucket: Resource<Bucket>, key: String, delta: u64) -> Result<u64, StoreError> {
        checked(&key)?;
        let (kv, name) = self.bucket(&bucket)?;
        let stored = kv_key(&name, &key);
        match Instrument::instrument(kv.increment(&stored, delta), call_span("increment")).await {
            Ok(next) => Ok(next),
            Err(KvError::Increment { why, .. }) => Err(StoreError::Other(format!("cannot increment `{key}`: {why}"))),
            Err(e) => Err(e.into()),
        }
    }
}

impl KeyValue<'_> {
    /// Refuses a batch of more keys than a call may carry, or with a key too long.
    fn check_batch<'k>(&self, keys: impl ExactSizeIterator<Item = &'k String>) -> Result<(), StoreError> {
        let count = keys.len();
        if count > self.limits().batch_keys {
            return Err(StoreError::Other(format!("{count} keys in one call; a batch call takes at most {} (split it)", self.limits().batch_keys)));
        }
        keys.into_iter().try_for_each(|key| checked(key))
    }
}

impl batch::Host for KeyValue<'_> {
    /// Values in the order asked; fails, returning nothing, once their
    /// bytes pass the per-call budget.
    async fn get_many(&mut self, bucket: Resource<Bucket>, keys: Vec<String>) -> Result<Vec<Option<(String, Vec<u8>)>>, StoreError> {
        self.check_batch(keys.iter())?;
        let (kv, name) = self.bucket(&bucket)?;
        let budget = self.limits().batch_bytes;
        let mut out = Vec::with_capacity(keys.len());
        let mut bytes = 0u64;
        for key in keys {
            let value = kv.get(&kv_key(&name, &key)).await?;
            bytes = bytes.saturating_add(value.as_ref().map_or(0, |e| e.value.len() as u64));
            if bytes > budget {
                return Err(StoreError::Other(format!(
                    "get-many would return more than {} of values; one call returns at most that (ask for fewer keys at a time)",
                    wharf_proto::ByteSize(budget)
                )));
            }
            out.push(value.map(|e| (key, e.value.to_vec())));
        }
        Ok(out)
    }

    async fn set_many(&mut self, bucket: Resource<Bucket>, key_values: Vec<(String, Vec<u8>)>) -> Result<(), StoreError> {
        self.check_batch(key_values.iter().map(|(key, _)| key))?;
        let (kv, name) = self.bucket(&bucket)?;
        for (key, value) in key_values {
            kv.put(&kv_key(&name, &key), Bytes::from(value)).await?;
        }
        Ok(())
    }

    async fn delete_many(&mut self, bucket: Resource<Bucket>, keys: Vec<String>) -> Result<(), StoreError> {
        self.check_batch(keys.iter())?;
        let (kv, name) = self.bucket(&bucket)?;
        for key in keys {
            kv.delete(&kv_key(&name, &key)).await?;
        }
        Ok(())
    }
}
