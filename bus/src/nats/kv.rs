//! KV buckets over JetStream: reads and writes, and watches that outlive reconnections and node losses.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_nats::jetstream::{ErrorCode, kv};
use bytes::Bytes;
use futures::future::{self, BoxFuture};
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use tokio::sync::watch;

use super::buckets::jetstream_code;
use crate::error::{BackendError, KvError};
use crate::{ConnectionState, Entry, KvEvent};

/// A JetStream KV bucket.
pub(crate) struct NatsKv {
    store: kv::Store,
    bucket: String,
    /// For watches, which follow the stream's leader elections.
    client: async_nats::Client,
    /// For watches, which start afresh when the connection comes back.
    connection: watch::Receiver<ConnectionState>,
}

impl NatsKv {
    pub(crate) fn new(
        store: kv::Store,
        bucket: &str,
        client: async_nats::Client,
        connection: watch::Receiver<ConnectionState>,
    ) -> NatsKv {
        NatsKv {
            store,
            bucket: bucket.to_owned(),
            client,
            connection,
        }
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Entry>, KvError> {
        let entry = self
            .store
            .entry(key)
            .await
            .map_err(|err| self.unavailable(err))?;
        // A deleted key's last entry is its delete marker.
        Ok(entry
            .filter(|entry| entry.operation == kv::Operation::Put)
            .map(|entry| Entry {
                key: entry.key,
                value: entry.value,
                revision: entry.revision,
            }))
    }

    pub(crate) async fn put(&self, key: &str, value: Bytes) -> Result<u64, KvError> {
        let size = key.len() + value.len();
        match self.store.put(key, value).await {
            Ok(revision) => Ok(revision),
            Err(err) => Err(self.write_failed(err, size).await),
        }
    }

    pub(crate) async fn create(&self, key: &str, value: Bytes) -> Result<u64, KvError> {
        let size = key.len() + value.len();
        match self.store.create(key, value).await {
            Ok(revision) => Ok(revision),
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                Err(KvError::AlreadyExists {
                    bucket: self.bucket.clone(),
                    key: key.to_owned(),
                })
            }
            Err(err) => Err(self.write_failed(err, size).await),
        }
    }

    pub(crate) async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: u64,
    ) -> Result<u64, KvError> {
        let size = key.len() + value.len();
        match self.store.update(key, value, expected).await {
            Ok(revision) => Ok(revision),
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(KvError::RevisionMismatch {
                    bucket: self.bucket.clone(),
                    key: key.to_owned(),
                    expected,
                })
            }
            Err(err) => Err(self.write_failed(err, size).await),
        }
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), KvError> {
        match self.store.delete(key).await {
            Ok(()) => Ok(()),
            Err(err) => Err(self.write_failed(err, key.len()).await),
        }
    }

    pub(crate) async fn keys(&self) -> Result<Vec<String>, KvError> {
        self.store
            .keys()
            .await
            .map_err(|err| self.unavailable(err))?
            .try_collect()
            .await
            .map_err(|err| self.unavailable(err))
    }

    pub(crate) async fn entries(&self) -> Result<Vec<Entry>, KvError> {
        // async-nats has no "current entries" call (its history consumer
        // rejects `>`), so fetch the keys, then their values concurrently
        // over the one connection. A key deleted in between is left out.
        let keys = self.keys().await?;
        let entries = future::try_join_all(keys.iter().map(|key| self.get(key))).await?;
        Ok(entries.into_iter().flatten().collect())
    }

    pub(crate) async fn watch(&self, pattern: &str) -> Result<NatsWatch, KvError> {
        // The stream's last sequence before the watch starts bounds the
        // replay of current values; see `NatsWatch::replayed_up_to`.
        let info = self
            .store
            .stream
            .get_info()
            .await
            .map_err(|err| self.unavailable(err))?;
        // Subscribed before the watch starts, so no election after it is missed.
        let elections = self
            .client
            .subscribe(format!(
                "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{}",
                self.store.stream_name
            ))
            .await
            .map_err(|err| self.unavailable(err))?;
        let watch = self
            .store
            .watch_with_history(pattern)
            .await
            .map_err(|err| self.unavailable(err))?;
        Ok(NatsWatch {
            store: self.store.clone(),
            pattern: pattern.to_owned(),
            state: WatchState::Open(Box::new(watch)),
            seen_up_to: 0,
            replayed_up_to: info.state.last_sequence,
            renewals: futures::stream::select(
                reconnections(self.connection.clone()),
                elections.map(drop),
            )
            .boxed(),
        })
    }

    /// The error for a write the server refused: [`KvError::BucketFull`] if
    /// it refused to store `size` more bytes for the bucket's size limit (the
    /// stream's "store failed" answer, with the bucket at its limit), else
    /// [`KvError::Unavailable`].
    async fn write_failed(&self, err: impl Into<BackendError>, size: usize) -> KvError {
        let err: BackendError = err.into();
        if jetstream_code(err.as_ref()) == Some(ErrorCode::STREAM_STORE_FAILED)
            && let Ok(info) = self.store.stream.get_info().await
            && let Ok(max_bytes) = u64::try_from(info.config.max_bytes)
            && max_bytes > 0
            && info.state.bytes.saturating_add(size as u64) >= max_bytes
        {
            return KvError::BucketFull {
                bucket: self.bucket.clone(),
                max_bytes,
            };
        }
        self.unavailable(err)
    }

    fn unavailable(&self, err: impl Into<BackendError>) -> KvError {
        unavailable(&self.bucket, err)
    }
}

/// How long one attempt to renew a watch may take before the next starts.
const RENEW_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// A JetStream KV watch, turned into [`KvEvent`]s, that outlives NATS
/// restarts and the loss of a cluster node.
///
/// async-nats' watch (an ordered consumer) notices a lost consumer only after
/// missing heartbeats for 10 s; it then yields an error and recreates itself.
/// The consumer is lost when the server holding it goes: the one the client
/// was connected to, or the stream's leader, where JetStream keeps a watch's
/// consumer. This watch instead starts a new one as soon as the client
/// reconnects or the stream elects a leader, or after any error, resuming
/// after the last revision it yielded, and retries until that works. So it
/// yields no errors, and misses or repeats no change.
pub(crate) struct NatsWatch {
    store: kv::Store,
    pattern: String,
    state: WatchState,
    /// The highest revision handled so far; a new watch resumes after it,
    /// and anything at or below it is not yielded again.
    seen_up_to: u64,
    /// The stream's last revision when the watch began: entries up to it are
    /// the replay of current values. For a deleted key the replay holds its
    /// delete marker, which NATS keeps; that is not a change the watcher
    /// should see (the in-process store has nothing to replay for such a
    /// key), so such deletes are skipped.
    replayed_up_to: u64,
    /// Yields each time the connection comes back or the stream elects a leader.
    renewals: BoxStream<'static, ()>,
}

/// The watch is boxed: it is large, and a `Reopening` state would carry its size for nothing.
enum WatchState {
    Open(Box<kv::Watch>),
    Reopening(BoxFuture<'static, kv::Watch>),
}

impl NatsWatch {
    fn reopen(&mut self) {
        let (store, pattern) = (self.store.clone(), self.pattern.clone());
        let from = self.seen_up_to + 1;
        self.state = WatchState::Reopening(Box::pin(async move {
            let mut delay = Duration::from_millis(50);
            loop {
                // From a revision, not "current values": the values up to it
                // have been yielded already, and the changes after it are
                // exactly what is missing (with history 1, only each key's
                // latest change is kept, which is all a level-triggered
                // watcher needs).
                // Each attempt is bounded: one made as the client reconnects
                // can go unanswered for the JetStream API's whole 10 s
                // timeout, while a second one a moment later succeeds.
                let attempt = store.watch_from_revision(&pattern, from);
                match tokio::time::timeout(RENEW_ATTEMPT_TIMEOUT, attempt)
                    .await
                    .unwrap_or_else(|_| Err(kv::WatchError::new(kv::WatchErrorKind::TimedOut)))
                {
                    Ok(watch) => return watch,
                    Err(err) => {
                        tracing::warn!(
                            bucket = %store.name,
                            %pattern,
                            "cannot renew KV watch, retrying in {delay:?}: {err}"
                        );
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }));
    }
}

impl Stream for NatsWatch {
    type Item = KvEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<KvEvent>> {
        loop {
            if let Poll::Ready(Some(())) = self.renewals.poll_next_unpin(cx) {
                self.reopen();
            }
            let watch = match &mut self.state {
                WatchState::Open(watch) => watch,
                WatchState::Reopening(renewal) => {
                    let watch = ready!(renewal.poll_unpin(cx));
                    self.state = WatchState::Open(Box::new(watch));
                    continue;
                }
            };
            let entry = match ready!(watch.poll_next_unpin(cx)) {
                // The client is gone, and with it any hope of more changes.
                None => return Poll::Ready(None),
                Some(Err(err)) => {
                    tracing::warn!(
                        bucket = %self.store.name,
                        pattern = %self.pattern,
                        "KV watch failed, renewing it: {err}"
                    );
                    self.reopen();
                    continue;
                }
                Some(Ok(entry)) => entry,
            };
            if entry.revision <= self.seen_up_to {
                continue;
            }
            self.seen_up_to = entry.revision;
            let deleted = entry.operation != kv::Operation::Put;
            if deleted && entry.revision <= self.replayed_up_to {
                continue;
            }
            return Poll::Ready(Some(KvEvent {
                key: entry.key,
                value: (!deleted).then_some(entry.value),
                revision: entry.revision,
            }));
        }
    }
}

/// A stream that yields whenever `connection` changes back to connected; it
/// ends when the client is dropped, and stays ended (fused).
fn reconnections(mut connection: watch::Receiver<ConnectionState>) -> BoxStream<'static, ()> {
    // A clone remembers what its original last saw; only later changes count.
    connection.mark_unchanged();
    futures::stream::unfold(connection, |mut connection| async move {
        loop {
            connection.changed().await.ok()?;
            if *connection.borrow_and_update() == ConnectionState::Connected {
                return Some(((), connection));
            }
        }
    })
    .fuse()
    .boxed()
}

pub(crate) fn unavailable(bucket: &str, err: impl Into<BackendError>) -> KvError {
    KvError::Unavailable {
        bucket: bucket.to_owned(),
        source: err.into(),
    }
}
