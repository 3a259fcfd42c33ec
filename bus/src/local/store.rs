//! The embedded store of the in-process bus: KV buckets and objects in one redb database, in a file or in memory.
//!
//! Layout, one redb table each:
//! - `kv-revisions`: bucket → its last revision. Every change to a bucket,
//!   deletes included, takes the next one, like the sequence of the
//!   JetStream stream behind a NATS KV bucket.
//! - `kv/<bucket>`: key → (revision, value). A deleted key keeps its entry
//!   with no value, as NATS keeps a delete marker, so compare-and-set
//!   against a delete's revision behaves as over NATS.
//! - `objects/<bucket>`: name → content.
//! - `bucket-limits`: `kv/<bucket>` or `objects/<bucket>` → the bucket's
//!   size limit (`None`: none). A row means the bucket exists; stores written
//!   before limits existed have buckets without one, which have no limit.
//! - `bucket-sizes`: the same names → the bytes the bucket holds, counted as
//!   NATS counts a stream's bytes (see [`kv_record_size`]), so that a bucket
//!   fills up at about the same write in both implementations. A bucket
//!   without a row (from an older store) is counted once, on its next write.
//!
//! redb commits are durable when they return (fsync) and crash safe, so the
//! file survives `kill -9` mid-write. Every redb call may block, so each runs
//! on tokio's blocking pool. A table that does not exist yet reads as empty
//! and is created by its first write.

use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::Stream;
use redb::backends::InMemoryBackend;
use redb::{
    Database, DatabaseError, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    TableError, TableHandle, WriteTransaction,
};
use tokio::sync::mpsc;

use crate::error::{KvError, ObjectError, OpenStoreError, describe_bytes};
use crate::{BucketOptions, Entry, KeyPage, KvEvent, subject};

const REVISIONS: TableDefinition<&str, u64> = TableDefinition::new("kv-revisions");

const BUCKET_LIMITS: TableDefinition<&str, Option<u64>> = TableDefinition::new("bucket-limits");

const BUCKET_SIZES: TableDefinition<&str, u64> = TableDefinition::new("bucket-sizes");

/// nats-server's file store counts each message as 30 bytes of record
/// (length, sequence, timestamp, hash) plus its subject, headers and payload.
const RECORD_OVERHEAD: u64 = 30;

/// A KV entry's subject is `$KV.<bucket>.<key>`: the bucket and key plus these.
const KV_SUBJECT_EXTRA: u64 = 5;

/// A delete marker's headers (`KV-Operation: DEL`) and their length field.
const DELETE_MARKER_HEADERS: u64 = 35;

/// (revision, value); no value means the key was deleted at that revision.
type KvRow = (u64, Option<&'static [u8]>);

/// The state of the in-process bus: a redb database in a file, or in memory.
/// Cheap to clone; clones share the database.
#[derive(Clone)]
pub struct LocalStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    db: Database,
    /// Held from the start of a KV write until its watchers have been told,
    /// so that watchers receive changes in revision order. (redb runs one
    /// write transaction at a time anyway, so this costs no concurrency.)
    kv_writer: Mutex<()>,
    /// The open watches. Locked briefly: to register a watch, and by KV
    /// writers (holding `kv_writer`) to notify them.
    watchers: Mutex<Vec<Watcher>>,
}

struct Watcher {
    bucket: String,
    pattern: String,
    /// Unbounded: a watch must never miss a change, and KV changes are few;
    /// a watch that is not read only holds memory until it is dropped.
    events: mpsc::UnboundedSender<KvEvent>,
}

impl LocalStore {
    /// Opens the store in the redb file at `path`, creating the file (and its directory) if missing.
    ///
    /// Blocks while the file is opened, and after a crash while redb repairs it.
    pub fn open(path: impl AsRef<Path>) -> Result<LocalStore, OpenStoreError> {
        let path = path.as_ref();
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| OpenStoreError::Open {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|err| failed(Box::new(err)))?;
        }
        let db = Database::create(path).map_err(|err| match err {
            DatabaseError::DatabaseAlreadyOpen => OpenStoreError::InUse {
                path: path.to_owned(),
            },
            err => failed(Box::new(err)),
        })?;
        Ok(LocalStore::with(db))
    }

    /// A store that lives in memory and is gone with its last handle, for tests.
    pub fn in_memory() -> Result<LocalStore, OpenStoreError> {
        let db = Database::builder()
            .create_with_backend(InMemoryBackend::new())
            .map_err(|err| OpenStoreError::Open {
                path: PathBuf::from("(in memory)"),
                source: Box::new(err),
            })?;
        Ok(LocalStore::with(db))
    }

    fn with(db: Database) -> LocalStore {
        LocalStore {
            inner: Arc::new(StoreInner {
                db,
                kv_writer: Mutex::new(()),
                watchers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Opens KV bucket `bucket`: creates it with `options` if missing, and
    /// with `update` sets an existing bucket's limit to `options`.
    pub(crate) async fn open_kv(
        &self,
        bucket: &str,
        options: BucketOptions,
        update: bool,
    ) -> Result<LocalKv, KvError> {
        let name = kv_table_name(bucket);
        let kv = LocalKv {
            store: self.clone(),
            bucket: bucket.to_owned(),
        };
        kv.run(move |store| store.open_bucket(&name, options, update))
            .await?;
        Ok(kv)
    }

    /// Opens object bucket `bucket`, as [`LocalStore::open_kv`] does KV buckets.
    pub(crate) async fn open_objects(
        &self,
        bucket: &str,
        options: BucketOptions,
        update: bool,
    ) -> Result<LocalObjects, ObjectError> {
        let name = objects_table_name(bucket);
        let objects = LocalObjects {
            store: self.clone(),
            bucket: bucket.to_owned(),
        };
        objects
            .run(move |store| store.open_bucket(&name, options, update))
            .await?;
        Ok(objects)
    }

    /// Runs `task` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        task: impl FnOnce(&StoreInner) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, Box<dyn std::error::Error + Send + Sync>> {
        let inner = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || task(&inner)).await {
            Ok(result) => result.map_err(Into::into),
            // Only a panic in the task gets here: it fails this one operation.
            Err(err) => Err(Box::new(err)),
        }
    }
}

/// What a conditional KV write requires of the key's current state.
#[derive(Clone, Copy)]
enum Condition {
    Always,
    /// No value: never written, or deleted (as `create` over NATS).
    Vacant,
    /// The key's last change has this revision, 0 if it was never written.
    Revision(u64),
}

/// The outcome of a KV write that redb carried out without error.
#[derive(Clone, Copy)]
enum Written {
    Revision(u64),
    /// The condition did not hold.
    Refused,
    /// The bucket would have grown past this limit.
    Full(u64),
}

impl StoreInner {
    /// Creates bucket `name` (a table name) with `options` if it does not
    /// exist; with `update`, sets an existing bucket's limit to `options`.
    fn open_bucket(
        &self,
        name: &str,
        options: BucketOptions,
        update: bool,
    ) -> Result<(), redb::Error> {
        // Opening is frequent and changes nothing but the first time: read first.
        let read = self.db.begin_read()?;
        let current = match open_read(&read, BUCKET_LIMITS)? {
            Some(limits) => limits.get(name)?.map(|row| row.value()),
            None => None,
        };
        let exists = current.is_some() || bucket_predates_limits(&read, name)?;
        drop(read);
        let limit = current.flatten();
        if exists && (!update || limit == options.max_bytes) {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        txn.open_table(BUCKET_LIMITS)?
            .insert(name, options.max_bytes)?;
        let held = txn
            .open_table(BUCKET_SIZES)?
            .get(name)?
            .map(|row| row.value());
        txn.commit()?;
        if exists {
            let describe =
                |limit: Option<u64>| limit.map_or_else(|| "no limit".to_owned(), describe_bytes);
            tracing::info!(
                bucket = name,
                "bucket `{name}` limit changed from {} to {}",
                describe(limit),
                describe(options.max_bytes)
            );
            if let (Some(held), Some(max)) = (held, options.max_bytes)
                && held > max
            {
                tracing::warn!(
                    bucket = name,
                    "bucket `{name}` holds {held} bytes, more than its new limit of {}: writes are refused until data is deleted",
                    describe_bytes(max)
                );
            }
        }
        Ok(())
    }

    fn kv_get(&self, bucket: &str, key: &str) -> Result<Option<(u64, Bytes)>, redb::Error> {
        let txn = self.db.begin_read()?;
        let Some(table) = open_read(&txn, kv_table(&kv_table_name(bucket)))? else {
            return Ok(None);
        };
        let row = table.get(key)?;
        Ok(row.and_then(|row| {
            let (revision, value) = row.value();
            value.map(|value| (revision, Bytes::copy_from_slice(value)))
        }))
    }

    /// The live entries of `bucket` whose key matches `pattern`, and the
    /// bucket's revision, read in one transaction so they agree.
    fn kv_scan(&self, bucket: &str, pattern: &str) -> Result<(Vec<Entry>, u64), redb::Error> {
        let txn = self.db.begin_read()?;
        let revision = match open_read(&txn, REVISIONS)? {
            Some(revisions) => revisions.get(bucket)?.map_or(0, |row| row.value()),
            None => 0,
        };
        let mut entries = Vec::new();
        if let Some(table) = open_read(&txn, kv_table(&kv_table_name(bucket)))? {
            for row in table.iter()? {
                let (key, row) = row?;
                let key = key.value();
                if let (revision, Some(value)) = row.value()
                    && subject::matches(pattern, key)
                {
                    entries.push(Entry {
                        key: key.to_owned(),
                        value: Bytes::copy_from_slice(value),
                        revision,
                    });
                }
            }
        }
        Ok((entries, revision))
    }

    /// At most `limit` live keys under `prefix` changed after `after`,
    /// oldest first: a range scan of the prefix that keeps only the `limit`
    /// oldest candidates in memory.
    fn kv_keys_page(&self, bucket: &str, prefix: &str, after: u64, limit: usize) -> Result<KeyPage, redb::Error> {
        let txn = self.db.begin_read()?;
        let mut oldest = std::collections::BinaryHeap::new();
        if let Some(table) = open_read(&txn, kv_table(&kv_table_name(bucket)))? {
            for row in table.range(prefix..)? {
                let (key, row) = row?;
                let key = key.value();
                if !key.starts_with(prefix) {
                    break;
                }
                if let (revision, Some(_)) = row.value()
                    && revision > after
                {
                    oldest.push((revision, key.to_owned()));
                    // One past the page, to know whether another follows.
                    if oldest.len() > limit + 1 {
                        oldest.pop();
                    }
                }
            }
        }
        let mut keys = oldest.into_sorted_vec();
        let next = (keys.len() > limit).then(|| keys[limit - 1].0);
        keys.truncate(limit);
        Ok(KeyPage { keys: keys.into_iter().map(|(_, key)| key).collect(), next })
    }

    /// Writes `value` (`None` deletes) to `key` if `condition` holds and the
    /// bucket has room, then tells the watchers.
    fn kv_write(
        &self,
        bucket: &str,
        key: &str,
        value: Option<Bytes>,
        condition: Condition,
    ) -> Result<Written, redb::Error> {
        let _writer = lock(&self.kv_writer);
        let txn = self.db.begin_write()?;
        let name = kv_table_name(bucket);
        let written = {
            let mut table = txn.open_table(kv_table(&name))?;
            let current = table.get(key)?.map(|row| {
                let (revision, value) = row.value();
                (revision, value.map(<[u8]>::len))
            });
            let allowed = match condition {
                Condition::Always => true,
                Condition::Vacant => !matches!(current, Some((_, Some(_)))),
                Condition::Revision(expected) => {
                    current.map_or(0, |(revision, _)| revision) == expected
                }
            };
            let replaced = current.map_or(0, |(_, old)| kv_record_size(bucket, key, old));
            let added = kv_record_size(bucket, key, value.as_deref().map(<[u8]>::len));
            let held = bucket_size(&txn, &name, || kv_table_size(bucket, &table))?;
            let after = held.saturating_sub(replaced) + added;
            match (allowed, bucket_limit(&txn, &name)?) {
                (false, _) => Written::Refused,
                // As in NATS, a write that does not grow the bucket is
                // allowed even past the limit (e.g. after it was lowered).
                (true, Some(max)) if after > max && after > held => Written::Full(max),
                (true, _) => {
                    let mut revisions = txn.open_table(REVISIONS)?;
                    let revision = revisions.get(bucket)?.map_or(0, |row| row.value()) + 1;
                    revisions.insert(bucket, revision)?;
                    table.insert(key, (revision, value.as_deref()))?;
                    txn.open_table(BUCKET_SIZES)?.insert(name.as_str(), after)?;
                    Written::Revision(revision)
                }
            }
        };
        match written {
            Written::Revision(revision) => {
                txn.commit()?;
                self.notify(
                    bucket,
                    KvEvent {
                        key: key.to_owned(),
                        value,
                        revision,
                    },
                );
            }
            Written::Refused | Written::Full(_) => txn.abort()?,
        }
        Ok(written)
    }

    /// Sends `event` to the watches of `bucket` it matches, forgetting watches that were dropped.
    fn notify(&self, bucket: &str, event: KvEvent) {
        lock(&self.watchers).retain(|watcher| {
            if watcher.bucket == bucket && subject::matches(&watcher.pattern, &event.key) {
                watcher.events.send(event.clone()).is_ok()
            } else {
                !watcher.events.is_closed()
            }
        });
    }

    /// Stores object `name`, unless that would take the bucket past its
    /// limit: then returns the limit. As over NATS, the new object needs room
    /// beside the one it replaces.
    fn object_put(
        &self,
        bucket: &str,
        name: &str,
        data: &[u8],
    ) -> Result<Option<u64>, redb::Error> {
        let txn = self.db.begin_write()?;
        let table_name = objects_table_name(bucket);
        {
            let mut table = txn.open_table(objects_table(&table_name))?;
            let held = bucket_size(&txn, &table_name, || objects_table_size(&table))?;
            let replaced = table
                .get(name)?
                .map_or(0, |old| object_size(name, old.value().len()));
            let added = object_size(name, data.len());
            if let Some(max) = bucket_limit(&txn, &table_name)?
                && held + added > max
            {
                return Ok(Some(max));
            }
            table.insert(name, data)?;
            txn.open_table(BUCKET_SIZES)?
                .insert(table_name.as_str(), held - replaced + added)?;
        }
        txn.commit()?;
        Ok(None)
    }

    fn object_get(&self, bucket: &str, name: &str) -> Result<Option<Bytes>, redb::Error> {
        let txn = self.db.begin_read()?;
        let Some(table) = open_read(&txn, objects_table(&objects_table_name(bucket)))? else {
            return Ok(None);
        };
        let data = table.get(name)?;
        Ok(data.map(|data| Bytes::copy_from_slice(data.value())))
    }

    fn object_exists(&self, bucket: &str, name: &str) -> Result<bool, redb::Error> {
        let txn = self.db.begin_read()?;
        match open_read(&txn, objects_table(&objects_table_name(bucket)))? {
            Some(table) => Ok(table.get(name)?.is_some()),
            None => Ok(false),
        }
    }

    fn object_delete(&self, bucket: &str, name: &str) -> Result<(), redb::Error> {
        let txn = self.db.begin_write()?;
        let table_name = objects_table_name(bucket);
        {
            let mut table = txn.open_table(objects_table(&table_name))?;
            let held = bucket_size(&txn, &table_name, || objects_table_size(&table))?;
            let removed = table
                .remove(name)?
                .map_or(0, |old| object_size(name, old.value().len()));
            txn.open_table(BUCKET_SIZES)?
                .insert(table_name.as_str(), held.saturating_sub(removed))?;
        }
        txn.commit()?;
        Ok(())
    }

    fn object_list(&self, bucket: &str) -> Result<Vec<String>, redb::Error> {
        let txn = self.db.begin_read()?;
        let Some(table) = open_read(&txn, objects_table(&objects_table_name(bucket)))? else {
            return Ok(Vec::new());
        };
        let mut names = Vec::new();
        for row in table.iter()? {
            names.push(row?.0.value().to_owned());
        }
        Ok(names)
    }
}

/// The bytes a KV entry takes, as NATS counts its message: `value_len` bytes
/// of value, or a delete marker (`None`). The headers of a conditional write
/// (some 60 bytes) are left out, as the stored row does not say how it was written.
fn kv_record_size(bucket: &str, key: &str, value_len: Option<usize>) -> u64 {
    let base = RECORD_OVERHEAD + KV_SUBJECT_EXTRA + (bucket.len() + key.len()) as u64;
    match value_len {
        Some(len) => base + len as u64,
        None => base + DELETE_MARKER_HEADERS,
    }
}

/// The bytes an object takes: its name and content.
fn object_size(name: &str, len: usize) -> u64 {
    (name.len() + len) as u64
}

/// The limit of bucket `name`, if it has one.
fn bucket_limit(txn: &WriteTransaction, name: &str) -> Result<Option<u64>, redb::Error> {
    let limits = txn.open_table(BUCKET_LIMITS)?;
    let limit = limits.get(name)?.and_then(|row| row.value());
    Ok(limit)
}

/// The bytes bucket `name` holds; `count` adds them up for a bucket not counted before.
fn bucket_size(
    txn: &WriteTransaction,
    name: &str,
    count: impl FnOnce() -> Result<u64, redb::Error>,
) -> Result<u64, redb::Error> {
    let held = txn
        .open_table(BUCKET_SIZES)?
        .get(name)?
        .map(|row| row.value());
    match held {
        Some(held) => Ok(held),
        None => count(),
    }
}

fn kv_table_size(
    bucket: &str,
    table: &redb::Table<'_, &'static str, KvRow>,
) -> Result<u64, redb::Error> {
    let mut total = 0;
    for row in table.iter()? {
        let (key, row) = row?;
        let (_, value) = row.value();
        total += kv_record_size(bucket, key.value(), value.map(<[u8]>::len));
    }
    Ok(total)
}

fn objects_table_size(
    table: &redb::Table<'_, &'static str, &'static [u8]>,
) -> Result<u64, redb::Error> {
    let mut total = 0;
    for row in table.iter()? {
        let (name, data) = row?;
        total += object_size(name.value(), data.value().len());
    }
    Ok(total)
}

/// Whether bucket `name` (a table name) was written before limits were kept: it has a table.
fn bucket_predates_limits(txn: &ReadTransaction, name: &str) -> Result<bool, redb::Error> {
    let exists = txn.list_tables()?.any(|table| table.name() == name);
    Ok(exists)
}

fn kv_table_name(bucket: &str) -> String {
    format!("kv/{bucket}")
}

fn kv_table(name: &str) -> TableDefinition<'_, &'static str, KvRow> {
    TableDefinition::new(name)
}

fn objects_table_name(bucket: &str) -> String {
    format!("objects/{bucket}")
}

fn objects_table(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}

/// Opens a table for reading; `None` if nothing was ever written to it.
fn open_read<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    table: TableDefinition<'_, K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, redb::Error> {
    match txn.open_table(table) {
        Ok(table) => Ok(Some(table)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked
/// (the writer token, or a list only ever retained or pushed to).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A KV bucket in the store.
#[derive(Clone)]
pub(crate) struct LocalKv {
    store: LocalStore,
    bucket: String,
}

impl LocalKv {
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Entry>, KvError> {
        let (bucket, owned_key) = (self.bucket.clone(), key.to_owned());
        let row = self
            .run(move |store| store.kv_get(&bucket, &owned_key))
            .await?;
        Ok(row.map(|(revision, value)| Entry {
            key: key.to_owned(),
            value,
            revision,
        }))
    }

    pub(crate) async fn put(&self, key: &str, value: Bytes) -> Result<u64, KvError> {
        self.write(key, Some(value), Condition::Always).await
    }

    pub(crate) async fn create(&self, key: &str, value: Bytes) -> Result<u64, KvError> {
        self.write(key, Some(value), Condition::Vacant).await
    }

    pub(crate) async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: u64,
    ) -> Result<u64, KvError> {
        self.write(key, Some(value), Condition::Revision(expected))
            .await
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), KvError> {
        self.write(key, None, Condition::Always).await.map(drop)
    }

    pub(crate) async fn keys(&self) -> Result<Vec<String>, KvError> {
        let entries = self.entries().await?;
        Ok(entries.into_iter().map(|entry| entry.key).collect())
    }

    pub(crate) async fn keys_page(&self, prefix: &str, after: u64, limit: usize) -> Result<KeyPage, KvError> {
        let (bucket, prefix) = (self.bucket.clone(), prefix.to_owned());
        self.run(move |store| store.kv_keys_page(&bucket, &prefix, after, limit)).await
    }

    pub(crate) async fn entries(&self) -> Result<Vec<Entry>, KvError> {
        let bucket = self.bucket.clone();
        let (entries, _) = self.run(move |store| store.kv_scan(&bucket, ">")).await?;
        Ok(entries)
    }

    pub(crate) async fn watch(&self, pattern: &str) -> Result<LocalWatch, KvError> {
        let (events, receiver) = mpsc::unbounded_channel();
        // Registered before the current values are read, so that no change
        // can fall between the two; changes that are already part of what
        // was read are skipped by revision.
        lock(&self.store.inner.watchers).push(Watcher {
            bucket: self.bucket.clone(),
            pattern: pattern.to_owned(),
            events,
        });
        let (bucket, pattern) = (self.bucket.clone(), pattern.to_owned());
        let (mut entries, revision) = self
            .run(move |store| store.kv_scan(&bucket, &pattern))
            .await?;
        // Oldest first, the order in which NATS replays them.
        entries.sort_unstable_by_key(|entry| entry.revision);
        Ok(LocalWatch {
            replay: entries
                .into_iter()
                .map(|entry| KvEvent {
                    key: entry.key,
                    value: Some(entry.value),
                    revision: entry.revision,
                })
                .collect(),
            replayed_up_to: revision,
            receiver,
        })
    }

    async fn write(
        &self,
        key: &str,
        value: Option<Bytes>,
        condition: Condition,
    ) -> Result<u64, KvError> {
        let (bucket, owned_key) = (self.bucket.clone(), key.to_owned());
        let written = self
            .run(move |store| store.kv_write(&bucket, &owned_key, value, condition))
            .await?;
        let (bucket, key) = (self.bucket.clone(), key.to_owned());
        match (written, condition) {
            (Written::Revision(revision), _) => Ok(revision),
            (Written::Full(max_bytes), _) => Err(KvError::BucketFull { bucket, max_bytes }),
            (Written::Refused, Condition::Revision(expected)) => Err(KvError::RevisionMismatch {
                bucket,
                key,
                expected,
            }),
            (Written::Refused, _) => Err(KvError::AlreadyExists { bucket, key }),
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        task: impl FnOnce(&StoreInner) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, KvError> {
        self.store
            .blocking(task)
            .await
            .map_err(|source| KvError::Unavailable {
                bucket: self.bucket.clone(),
                source,
            })
    }
}

/// A watch on the store: the current values, then the changes.
pub(crate) struct LocalWatch {
    /// The current values at the start, oldest first, yielded before any change.
    replay: VecDeque<KvEvent>,
    /// The bucket's revision when `replay` was read; changes up to it are in `replay` already.
    replayed_up_to: u64,
    receiver: mpsc::UnboundedReceiver<KvEvent>,
}

impl Stream for LocalWatch {
    type Item = KvEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<KvEvent>> {
        if let Some(event) = self.replay.pop_front() {
            return Poll::Ready(Some(event));
        }
        loop {
            match ready!(self.receiver.poll_recv(cx)) {
                Some(event) if event.revision <= self.replayed_up_to => continue,
                event => return Poll::Ready(event),
            }
        }
    }
}

/// An object bucket in the store.
#[derive(Clone)]
pub(crate) struct LocalObjects {
    store: LocalStore,
    bucket: String,
}

impl LocalObjects {
    pub(crate) async fn put(&self, name: &str, data: Bytes) -> Result<(), ObjectError> {
        let (bucket, name) = (self.bucket.clone(), name.to_owned());
        let size = data.len() as u64;
        match self
            .run(move |store| store.object_put(&bucket, &name, &data))
            .await?
        {
            None => Ok(()),
            Some(max_bytes) => Err(ObjectError::BucketFull {
                bucket: self.bucket.clone(),
                max_bytes,
                size,
            }),
        }
    }

    pub(crate) async fn get(&self, name: &str) -> Result<Option<Bytes>, ObjectError> {
        let (bucket, name) = (self.bucket.clone(), name.to_owned());
        self.run(move |store| store.object_get(&bucket, &name))
            .await
    }

    pub(crate) async fn exists(&self, name: &str) -> Result<bool, ObjectError> {
        let (bucket, name) = (self.bucket.clone(), name.to_owned());
        self.run(move |store| store.object_exists(&bucket, &name))
            .await
    }

    pub(crate) async fn delete(&self, name: &str) -> Result<(), ObjectError> {
        let (bucket, name) = (self.bucket.clone(), name.to_owned());
        self.run(move |store| store.object_delete(&bucket, &name))
            .await
    }

    pub(crate) async fn list(&self) -> Result<Vec<String>, ObjectError> {
        let bucket = self.bucket.clone();
        self.run(move |store| store.object_list(&bucket)).await
    }

    async fn run<T: Send + 'static>(
        &self,
        task: impl FnOnce(&StoreInner) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, ObjectError> {
        self.store
            .blocking(task)
            .await
            .map_err(|source| ObjectError::Unavailable {
                bucket: self.bucket.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kib() -> Bytes {
        Bytes::from(vec![b'x'; 1024])
    }

    /// Makes `bucket` look as a store written before limits were kept left it:
    /// no limit row, no size row.
    fn forget_limits(store: &LocalStore, bucket: &str) {
        let name = kv_table_name(bucket);
        let txn = store.inner.db.begin_write().expect("write");
        txn.open_table(BUCKET_LIMITS)
            .expect("limits")
            .remove(name.as_str())
            .expect("remove");
        txn.open_table(BUCKET_SIZES)
            .expect("sizes")
            .remove(name.as_str())
            .expect("remove");
        txn.commit().expect("commit");
    }

    #[tokio::test]
    async fn buckets_from_before_limits_keep_no_limit_until_their_owner_sets_one() {
        let store = LocalStore::in_memory().expect("store");
        let kv = store
            .open_kv("legacy", BucketOptions::default(), false)
            .await
            .expect("open");
        for index in 0..8 {
            kv.put(&format!("k{index}"), kib()).await.expect("put");
        }
        forget_limits(&store, "legacy");

        // Opened as it is, the old bucket keeps having no limit.
        let kv = store
            .open_kv("legacy", BucketOptions::max_bytes(4096), false)
            .await
            .expect("open");
        kv.put("k8", kib()).await.expect("no limit yet");

        // Its owner sets one; its size is counted from its entries.
        let kv = store
            .open_kv("legacy", BucketOptions::max_bytes(16 * 1024), true)
            .await
            .expect("open");
        let mut stored = 9;
        let err = loop {
            match kv.put(&format!("k{stored}"), kib()).await {
                Ok(_) => stored += 1,
                Err(err) => break err,
            }
        };
        assert!(
            matches!(
                err,
                KvError::BucketFull {
                    max_bytes: 16384,
                    ..
                }
            ),
            "{err:?}"
        );
        // The same number fit as in a bucket counted from the start.
        assert_eq!(stored, 15);
    }

    #[test]
    fn entries_are_counted_as_nats_counts_them() {
        // Measured on nats-server 2.15: a put of 1 KiB to key `k0` of bucket
        // `cap` takes 1064 bytes; a delete marker of `a` in bucket `sz`, 73.
        assert_eq!(kv_record_size("cap", "k0", Some(1024)), 1064);
        assert_eq!(kv_record_size("sz", "a", None), 73);
    }
}
