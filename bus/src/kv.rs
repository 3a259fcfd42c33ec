//! KV buckets: values by key, with per-bucket revisions for compare-and-set, and level-triggered watches.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;

use crate::error::KvError;
use crate::{local, nats, subject};

/// Bytes of [`Bus::max_payload`](crate::Bus::max_payload) kept free of a KV
/// value for the headers NATS adds to a write (about 60 bytes for an expected revision).
pub(crate) const HEADER_ROOM: usize = 1024;

/// How many times [`Kv::increment`] tries its compare-and-set.
pub const INCREMENT_ATTEMPTS: usize = 1000;

/// A handle to one KV bucket; cheap to clone.
///
/// Every change to a bucket (put, create, update, delete) gets the next
/// revision of the bucket, so a key's revision says which write it saw, and
/// [`Kv::update`] can refuse a write based on a stale read.
#[derive(Clone)]
pub struct Kv {
    inner: KvInner,
    /// The largest value accepted: [`Bus::max_payload`](crate::Bus::max_payload)
    /// less [`HEADER_ROOM`], as over NATS a value travels as one message; the
    /// in-process store keeps the same limit.
    max_value: usize,
}

/// async-nats' KV handle carries a copy of its stream's info (over a KiB), hence the `Arc`.
#[derive(Clone)]
enum KvInner {
    Nats(Arc<nats::NatsKv>),
    Local(local::LocalKv),
    /// Calls a data broker makes for this process (see `nats/data.rs`).
    Brokered(Arc<nats::BrokeredKv>),
}

/// What a write stored (see [`Kv::put_once`]).
pub(crate) use nats::Written;

impl Written {
    /// A first write, of revision `revision`.
    fn new(revision: u64) -> Written {
        Written { revision, duplicate: false }
    }
}

/// The current value of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Bytes,
    /// The bucket revision of the write that set this value.
    pub revision: u64,
}

/// One page of [`Kv::keys_page`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPage {
    /// Keys with a value, oldest change first.
    pub keys: Vec<String>,
    /// Where the next page starts (pass it as `after`), or `None` if this
    /// page reached the end.
    pub next: Option<u64>,
}

/// One change seen by a [`KvWatch`], or one current value it replays first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEvent {
    pub key: String,
    /// The new value, or `None` if the key was deleted.
    pub value: Option<Bytes>,
    /// The bucket revision of this change.
    pub revision: u64,
}

impl Kv {
    pub(crate) fn nats(kv: nats::NatsKv, max_value: usize) -> Kv {
        Kv {
            inner: KvInner::Nats(Arc::new(kv)),
            max_value,
        }
    }

    pub(crate) fn brokered(kv: nats::BrokeredKv, max_value: usize) -> Kv {
        Kv {
            inner: KvInner::Brokered(Arc::new(kv)),
            max_value,
        }
    }

    pub(crate) fn local(kv: local::LocalKv, max_value: usize) -> Kv {
        Kv {
            inner: KvInner::Local(kv),
            max_value,
        }
    }

    /// The largest value a write accepts, in bytes.
    pub fn max_value(&self) -> usize {
        self.max_value
    }

    /// The current value of `key`, or `None` if it has none (never set, or deleted).
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, KvError> {
        subject::check_key(key).map_err(KvError::InvalidName)?;
        match &self.inner {
            KvInner::Nats(kv) => kv.get(key).await,
            KvInner::Local(kv) => kv.get(key).await,
            KvInner::Brokered(kv) => kv.get(key).await,
        }
    }

    /// Sets `key` to `value` whatever it held before; returns the new revision.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<u64, KvError> {
        if let KvInner::Brokered(kv) = &self.inner {
            self.check_write(key, &value)?;
            return kv.put(key, value).await;
        }
        Ok(self.put_once(key, value, &nats::message_id()).await?.revision)
    }

    /// Sets `key` to `value` only if it has no value (never set, or deleted);
    /// returns the new revision, or [`KvError::AlreadyExists`].
    pub async fn create(&self, key: &str, value: Bytes) -> Result<u64, KvError> {
        if let KvInner::Brokered(kv) = &self.inner {
            self.check_write(key, &value)?;
            return kv.create(key, value).await;
        }
        Ok(self.create_once(key, value, &nats::message_id()).await?.revision)
    }

    /// Compare-and-set: sets `key` to `value` only if its last change has
    /// revision `expected_revision` (0: the key was never written); returns
    /// the new revision, or [`KvError::RevisionMismatch`].
    pub async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected_revision: u64,
    ) -> Result<u64, KvError> {
        if let KvInner::Brokered(kv) = &self.inner {
            self.check_write(key, &value)?;
            return kv.update(key, value, expected_revision).await;
        }
        Ok(self.update_once(key, value, expected_revision, &nats::message_id()).await?.revision)
    }

    /// [`Kv::put`] as the write with message id `id`: over NATS, a write
    /// sent again with the same id within the bucket's duplicate window is
    /// stored once, and answered with the first one's revision (a data
    /// broker sends an asker's id, so an ask sent again after a lost answer
    /// counts once). The in-process store ignores ids.
    pub(crate) async fn put_once(&self, key: &str, value: Bytes, id: &str) -> Result<Written, KvError> {
        self.check_write(key, &value)?;
        match &self.inner {
            KvInner::Nats(kv) => kv.put(key, value, id).await,
            KvInner::Local(kv) => kv.put(key, value).await.map(Written::new),
            KvInner::Brokered(kv) => kv.put(key, value).await.map(Written::new),
        }
    }

    /// [`Kv::create`] under message id `id` (see [`Kv::put_once`]).
    pub(crate) async fn create_once(&self, key: &str, value: Bytes, id: &str) -> Result<Written, KvError> {
        self.check_write(key, &value)?;
        match &self.inner {
            KvInner::Nats(kv) => kv.create(key, value, id).await,
            KvInner::Local(kv) => kv.create(key, value).await.map(Written::new),
            KvInner::Brokered(kv) => kv.create(key, value).await.map(Written::new),
        }
    }

    /// [`Kv::update`] under message id `id` (see [`Kv::put_once`]).
    pub(crate) async fn update_once(&self, key: &str, value: Bytes, expected_revision: u64, id: &str) -> Result<Written, KvError> {
        self.check_write(key, &value)?;
        match &self.inner {
            KvInner::Nats(kv) => kv.update(key, value, expected_revision, id).await,
            KvInner::Local(kv) => kv.update(key, value, expected_revision).await.map(Written::new),
            KvInner::Brokered(kv) => kv.update(key, value, expected_revision).await.map(Written::new),
        }
    }

    /// Adds `delta` to the decimal number `key` holds (none: 0) by
    /// compare-and-set, tried again while other writers win (up to
    /// [`INCREMENT_ATTEMPTS`] times); returns the new number. Through a
    /// data broker the broker runs the loop, next to the store.
    pub async fn increment(&self, key: &str, delta: u64) -> Result<u64, KvError> {
        subject::check_key(key).map_err(KvError::InvalidName)?;
        if let KvInner::Brokered(kv) = &self.inner {
            return kv.increment(key, delta).await;
        }
        self.increment_once(key, delta, &nats::message_id()).await
    }

    /// [`Kv::increment`] whose write carries message id `id` on every try
    /// (a try refused by compare-and-set stores nothing, so the id stays
    /// free): made again with the same id after it succeeded, it finds its
    /// first write stored and answers that write's number, counting once.
    pub(crate) async fn increment_once(&self, key: &str, delta: u64, id: &str) -> Result<u64, KvError> {
        let failed = |why: String| KvError::Increment { bucket: String::new(), key: key.to_owned(), why };
        let number = |value: &[u8]| {
            std::str::from_utf8(value).ok().and_then(|s| s.trim().parse::<u64>().ok()).ok_or_else(|| failed("its value is not a decimal number".into()))
        };
        for _ in 0..INCREMENT_ATTEMPTS {
            let current = self.get(key).await?;
            let value = match &current {
                Some(entry) => number(&entry.value)?,
                None => 0,
            };
            let next = value.checked_add(delta).ok_or_else(|| failed("it would overflow u64".into()))?;
            let text = Bytes::from(next.to_string());
            let written = match &current {
                Some(entry) => self.update_once(key, text, entry.revision, id).await,
                None => self.create_once(key, text, id).await,
            };
            match written {
                Ok(written) if written.duplicate => {
                    // This increment was made before (its answer lost): its
                    // number is what that write stored. If a later write
                    // replaced it, the value read above already counts it
                    // (a repeat found behind a later write fails its
                    // compare-and-set and reads again), and is the answer:
                    // as if the later increments came first.
                    let KvInner::Nats(kv) = &self.inner else { return Ok(next) };
                    return match kv.value_at(key, written.revision).await? {
                        Some(stored) => number(&stored),
                        None => Ok(value),
                    };
                }
                Ok(_) => return Ok(next),
                Err(KvError::RevisionMismatch { .. } | KvError::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(failed(format!("it lost to other writers {INCREMENT_ATTEMPTS} times")))
    }

    /// Deletes `key`. Afterwards [`Kv::get`] returns `None` and [`Kv::create`]
    /// succeeds again. The delete is a change with a revision of its own, seen
    /// by watchers, even if the key had no value.
    pub async fn delete(&self, key: &str) -> Result<(), KvError> {
        self.delete_once(key, &nats::message_id()).await
    }

    /// [`Kv::delete`] under message id `id` (see [`Kv::put_once`]).
    pub(crate) async fn delete_once(&self, key: &str, id: &str) -> Result<(), KvError> {
        subject::check_key(key).map_err(KvError::InvalidName)?;
        match &self.inner {
            KvInner::Nats(kv) => kv.delete(key, id).await,
            KvInner::Local(kv) => kv.delete(key).await,
            KvInner::Brokered(kv) => kv.delete(key).await,
        }
    }

    /// The keys that have a value, sorted.
    pub async fn keys(&self) -> Result<Vec<String>, KvError> {
        let mut keys = match &self.inner {
            KvInner::Nats(kv) => kv.keys().await?,
            KvInner::Local(kv) => kv.keys().await?,
            KvInner::Brokered(kv) => kv.keys().await?,
        };
        keys.sort_unstable();
        Ok(keys)
    }

    /// At most `limit` keys that start with `prefix` (empty, or ending with
    /// `.`) and whose last change came after revision `after` (0: from the
    /// start), oldest change first.
    ///
    /// Reading stops once the page is full, so a page costs what it holds,
    /// not what the bucket holds. A key changed while pages are read moves to
    /// a later revision and may appear again on a later page.
    pub async fn keys_page(&self, prefix: &str, after: u64, limit: usize) -> Result<KeyPage, KvError> {
        if !prefix.is_empty() {
            let tokens = prefix.strip_suffix('.').unwrap_or("");
            subject::check_key(tokens).map_err(KvError::InvalidName)?;
        }
        if limit == 0 {
            return Ok(KeyPage { keys: Vec::new(), next: Some(after) });
        }
        match &self.inner {
            KvInner::Nats(kv) => kv.keys_page(prefix, after, limit).await,
            KvInner::Local(kv) => kv.keys_page(prefix, after, limit).await,
            KvInner::Brokered(kv) => kv.keys_page(prefix, after, limit).await,
        }
    }

    /// The current entries, sorted by key.
    pub async fn entries(&self) -> Result<Vec<Entry>, KvError> {
        let mut entries = match &self.inner {
            KvInner::Nats(kv) => kv.entries().await?,
            KvInner::Local(kv) => kv.entries().await?,
            KvInner::Brokered(_) => {
                // A key deleted between the listing and its read is left out.
                let keys = self.keys().await?;
                let mut entries = Vec::with_capacity(keys.len());
                for key in keys {
                    entries.extend(self.get(&key).await?);
                }
                entries
            }
        };
        entries.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    /// Watches the keys matching `pattern` (a key, or one with `*` and `>`
    /// tokens as in subjects; `>` for all keys).
    ///
    /// The watch first yields the current value of every matching key, oldest
    /// revision first, then every change as it happens, deletes included.
    /// Consumers can therefore be level-triggered: what they have seen is
    /// always the whole current state, whenever they started watching.
    pub async fn watch(&self, pattern: &str) -> Result<KvWatch, KvError> {
        subject::check_key_pattern(pattern).map_err(KvError::InvalidName)?;
        let inner = match &self.inner {
            KvInner::Nats(kv) => WatchInner::Nats(Box::new(kv.watch(pattern).await?)),
            KvInner::Local(kv) => WatchInner::Local(kv.watch(pattern).await?),
            KvInner::Brokered(kv) => WatchInner::Nats(Box::new(kv.watch(pattern).await?)),
        };
        Ok(KvWatch { inner })
    }

    fn check_write(&self, key: &str, value: &Bytes) -> Result<(), KvError> {
        subject::check_key(key).map_err(KvError::InvalidName)?;
        if value.len() > self.max_value {
            return Err(KvError::ValueTooLarge {
                key: key.to_owned(),
                size: value.len(),
                max: self.max_value,
            });
        }
        Ok(())
    }
}

/// The stream of a [`Kv::watch`]: current values first, then changes.
///
/// It does not fail: over NATS, a watch whose server restarted or whose
/// consumer failed is renewed where it left off as soon as NATS is back.
pub struct KvWatch {
    inner: WatchInner,
}

/// Boxed for the same reason as [`KvInner`]'s `Arc`.
enum WatchInner {
    Nats(Box<nats::NatsWatch>),
    Local(local::LocalWatch),
}

impl Stream for KvWatch {
    type Item = KvEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<KvEvent>> {
        match &mut self.inner {
            WatchInner::Nats(watch) => Pin::new(watch.as_mut()).poll_next(cx),
            WatchInner::Local(watch) => Pin::new(watch).poll_next(cx),
        }
    }
}
