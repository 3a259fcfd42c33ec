//! KV buckets over JetStream: reads and writes, and watches that outlive reconnections and node losses.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_nats::jetstream::{ErrorCode, kv};
use bytes::Bytes;
use futures::future::{self, BoxFuture};
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt};
use tokio::sync::watch;

use super::buckets::jetstream_code;
use super::consumers::{BrokerUnreachable, Consumers, Fed, Made, PushFeed};
use crate::error::{BackendError, KvError};
use crate::{ConnectionState, Entry, KeyPage, KvEvent};

/// How long a page of keys waits for the server's next message before it
/// gives up (the consumer delivers a page at once; this only bounds a stall).
const PAGE_STALL: Duration = Duration::from_secs(5);

/// How long a read or a write keeps trying while the bucket cannot answer:
/// a server of the cluster lost, the bucket's stream electing a leader (4
/// to 7 s after its leader is killed on a quiet machine; past 15 s was seen
/// with some twenty streams electing at once on a busy one), a
/// reconnection. Past it, the error.
const RIDE_OVER: Duration = Duration::from_secs(30);

/// About the bytes a write's headers take in the stream.
const WRITE_HEADERS: usize = 128;

/// The pause between two tries, doubling up to a second.
const FIRST_PAUSE: Duration = Duration::from_millis(50);

/// A JetStream KV bucket.
///
/// Reads and writes ride over the loss of a server and the elections that
/// follow: they are tried again for up to [`RIDE_OVER`]. A write that may
/// or may not have been stored (its server died before answering) is sent
/// again *as the same message*: every write call carries a `Nats-Msg-Id`
/// of its own, the same on each try, and JetStream stores a message id once
/// within its duplicate window, answering a repeat with the first answer. So a retried write is
/// stored exactly once, and a counter incremented by compare-and-set across
/// a node's death counts every increment once.
pub(crate) struct NatsKv {
    store: kv::Store,
    bucket: String,
    /// For watches, which follow the stream's leader elections.
    client: async_nats::Client,
    /// For writes with headers of our own (message ids).
    jetstream: async_nats::jetstream::Context,
    /// For watches, which start afresh when the connection comes back.
    connection: watch::Receiver<ConnectionState>,
    /// Who makes the consumers of watches and key listings.
    consumers: Consumers,
}

impl NatsKv {
    pub(crate) fn new(
        store: kv::Store,
        bucket: &str,
        client: async_nats::Client,
        jetstream: async_nats::jetstream::Context,
        connection: watch::Receiver<ConnectionState>,
        consumers: Consumers,
    ) -> NatsKv {
        NatsKv {
            store,
            bucket: bucket.to_owned(),
            client,
            jetstream,
            connection,
            consumers,
        }
    }

    /// Whether the server is one of a cluster (it advertises others).
    fn clustered(&self) -> bool {
        self.client.server_info().connect_urls.len() > 1
    }

    async fn ride_over<T, F, Fut>(&self, attempt: F) -> Result<T, KvError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Attempt<KvError>>>,
    {
        ride_over(&self.bucket, attempt).await
    }

    /// Publishes one write to `key` under message id `id` (see
    /// [`NatsKv`]), compare-and-set against `expected` when given; a delete
    /// marker when `delete`.
    async fn write(&self, key: &str, value: Bytes, expected: Option<u64>, id: &str, delete: bool) -> Result<Written, KvError> {
        let mut subject = String::new();
        if self.store.use_jetstream_prefix {
            // The store was opened through a JetStream domain's prefix.
            subject.push_str(&self.store.prefix);
        } else {
            subject.push_str(self.store.put_prefix.as_deref().unwrap_or(&self.store.prefix));
        }
        subject.push_str(key);
        // The message's headers (id, expected sequence) count against the
        // bucket's limit too.
        let size = key.len() + value.len() + WRITE_HEADERS;
        // A repeat met on a later try is this call's own earlier try,
        // stored with its answer lost: what it stored is this call's value.
        let mut tries = 0u32;
        self.ride_over(|| {
            tries += 1;
            let first = tries == 1;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
            if delete {
                headers.insert(KV_OPERATION, "DEL");
            }
            if let Some(expected) = expected {
                headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, expected.to_string().as_str());
            }
            let (subject, value) = (subject.clone(), value.clone());
            // Whether the connection dropped during this try: then a missing
            // answer is the server's death, not a refusal (a write the
            // server refuses for permissions also goes unanswered).
            let mut connection = self.connection.clone();
            connection.mark_unchanged();
            async move {
                let ack = match self.jetstream.publish_with_headers(subject, headers, value).await {
                    Ok(ack) => ack.await,
                    Err(err) => return Err(Attempt::Retry(self.unavailable(err))),
                };
                let reconnected = connection.has_changed().unwrap_or(true) || self.clustered();
                match ack {
                    Ok(ack) => Ok(Written { revision: ack.sequence, duplicate: ack.duplicate && first }),
                    // Servers from 2.11 answer a failed compare-and-set with
                    // a constant code of their own (10164) rather than 10071.
                    Err(err)
                        if err.kind() == async_nats::jetstream::context::PublishErrorKind::WrongLastSequence
                            || jetstream_code(&err) == Some(ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT) =>
                    {
                        // The server checks the expected revision before
                        // the message id: a repeat of a write that was
                        // stored (its answer lost) meets its own revision.
                        if let Some(revision) = self.stored_last(key, id).await {
                            return Ok(Written { revision, duplicate: first });
                        }
                        Err(Attempt::Final(KvError::RevisionMismatch { bucket: self.bucket.clone(), key: key.to_owned(), expected: expected.unwrap_or(0) }))
                    }
                    Err(err) if is_transient(&err, reconnected) => Err(Attempt::Retry(self.unavailable(err))),
                    Err(err) => Err(Attempt::Final(self.write_failed(err, size).await)),
                }
            }
        })
        .await
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Entry>, KvError> {
        let entry = self
            .ride_over(|| {
                let mut connection = self.connection.clone();
                connection.mark_unchanged();
                async move {
                    self.store.entry(key).await.map_err(|err| {
                        // As for writes: a timeout on a steady connection
                        // is a refusal, not a lost server.
                        let reconnected = connection.has_changed().unwrap_or(true) || self.clustered();
                        if err.kind() == kv::EntryErrorKind::TimedOut && !reconnected {
                            Attempt::Final(self.unavailable(err))
                        } else {
                            Attempt::Retry(self.unavailable(err))
                        }
                    })
                }
            })
            .await?;
        // A deleted key's last entry is its delete marker.
        Ok(entry
            .filter(|entry| entry.operation == kv::Operation::Put)
            .map(|entry| Entry {
                key: entry.key,
                value: entry.value,
                revision: entry.revision,
            }))
    }

    pub(crate) async fn put(&self, key: &str, value: Bytes, id: &str) -> Result<Written, KvError> {
        self.write(key, value, None, id, false).await
    }

    /// A write expecting the key to have no message, or only a delete
    /// marker (whose revision the write then expects); each step rides over
    /// a lost server like any other call.
    pub(crate) async fn create(&self, key: &str, value: Bytes, id: &str) -> Result<Written, KvError> {
        let already = || KvError::AlreadyExists { bucket: self.bucket.clone(), key: key.to_owned() };
        match self.write(key, value.clone(), Some(0), id, false).await {
            Err(KvError::RevisionMismatch { .. }) => {}
            other => return other,
        }
        let marker = self
            .ride_over(|| async {
                self.store.entry(key).await.map_err(|err| Attempt::Retry(self.unavailable(err)))
            })
            .await?;
        match marker {
            Some(entry) if entry.operation != kv::Operation::Put => match self.write(key, value, Some(entry.revision), id, false).await {
                Err(KvError::RevisionMismatch { .. }) => Err(already()),
                other => other,
            },
            _ => Err(already()),
        }
    }

    pub(crate) async fn update(&self, key: &str, value: Bytes, expected: u64, id: &str) -> Result<Written, KvError> {
        self.write(key, value, Some(expected), id, false).await
    }

    /// Writes a delete marker for `key`, under message id `id`.
    pub(crate) async fn delete(&self, key: &str, id: &str) -> Result<(), KvError> {
        self.write(key, Bytes::new(), None, id, true).await.map(drop)
    }

    /// The revision of `key`'s last change if the write with message id
    /// `id` made it.
    async fn stored_last(&self, key: &str, id: &str) -> Option<u64> {
        let last = self.store.stream.get_last_raw_message_by_subject(&format!("$KV.{}.{key}", self.bucket)).await.ok()?;
        let stored_id = last.headers.get(async_nats::header::NATS_MESSAGE_ID)?;
        (stored_id.as_str() == id).then_some(last.sequence)
    }

    /// The value `key` was given by the write of revision `revision`.
    pub(crate) async fn value_at(&self, key: &str, revision: u64) -> Result<Option<Bytes>, KvError> {
        let entry = self
            .ride_over(|| async { self.store.entry_for_revision(key, revision).await.map_err(|err| Attempt::Retry(self.unavailable(err))) })
            .await?;
        Ok(entry.filter(|entry| entry.operation == kv::Operation::Put).map(|entry| entry.value))
    }

    /// Reads keys from a consumer that starts after revision `after`,
    /// delivers only headers, and is dropped as soon as the page is full.
    /// The bucket keeps one message per key, so each message is one key's
    /// latest change; deletes are skipped.
    pub(crate) async fn keys_page(&self, prefix: &str, after: u64, limit: usize) -> Result<KeyPage, KvError> {
        self.listed(prefix, Some(after.saturating_add(1)), Some(limit)).await
    }

    /// Every live key: the last message of each key, headers only.
    pub(crate) async fn keys(&self) -> Result<Vec<String>, KvError> {
        Ok(self.listed("", None, None).await?.keys)
    }

    /// The live keys under `prefix` a headers-only consumer delivers, from
    /// stream sequence `from` (else the last message of each key), up to
    /// `limit` of them (the page then says where the next starts).
    async fn listed(&self, prefix: &str, from: Option<u64>, limit: Option<usize>) -> Result<KeyPage, KvError> {
        let filter = format!("{}{prefix}>", self.store.prefix);
        let (mut feed, made) = PushFeed::open(&self.client, &self.consumers, &self.store.stream_name, filter, from, true)
            .await
            .map_err(|err| self.unavailable(err))?;
        let mut page = KeyPage { keys: Vec::new(), next: None };
        if made.pending == 0 {
            return Ok(page);
        }
        loop {
            let message = match tokio::time::timeout(PAGE_STALL, feed.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(err))) => return Err(self.unavailable(err)),
                Ok(None) => return Ok(page),
                Err(_) => return Err(self.unavailable(format!("no keys arrived for {PAGE_STALL:?}"))),
            };
            if !message.is_kv_delete() && let Some(key) = message.subject.strip_prefix(self.store.prefix.as_str()) {
                page.keys.push(key.to_owned());
            }
            if message.info.pending == 0 {
                return Ok(page);
            }
            if limit == Some(page.keys.len()) {
                page.next = Some(message.info.stream_sequence);
                return Ok(page);
            }
        }
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
        NatsWatch::open(self.client.clone(), self.consumers.clone(), self.connection.clone(), &self.store.stream_name, &self.store.prefix, pattern)
            .await
            .map_err(|err| self.unavailable(err))
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

/// The header that marks a key-value message as a delete (as async-nats writes it).
const KV_OPERATION: &str = "KV-Operation";

/// What a write stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Written {
    /// The revision of the write.
    pub(crate) revision: u64,
    /// Whether the write was a repeat of one already stored under the same
    /// message id: `revision` is that first write's, and the value stored
    /// is what that write carried.
    pub(crate) duplicate: bool,
}

/// The outcome of one try of a bucket call that may be tried again.
pub(crate) enum Attempt<E> {
    /// Try again (until [`RIDE_OVER`]); this error if not.
    Retry(E),
    /// Done: this error is the answer.
    Final(E),
}

/// Tries `attempt` until it succeeds, fails for good, or [`RIDE_OVER`] has
/// passed, pausing 50 ms doubling to 1 s between tries; `Err(Retry(e))`
/// asks for another try.
pub(crate) async fn ride_over<T, E, F, Fut>(bucket: &str, mut attempt: F) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Attempt<E>>>,
{
    let started = tokio::time::Instant::now();
    let mut pause = FIRST_PAUSE;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(Attempt::Final(err)) => return Err(err),
            Err(Attempt::Retry(err)) => {
                if started.elapsed() + pause > RIDE_OVER {
                    return Err(err);
                }
                tracing::debug!(%bucket, "bucket call failed, trying again in {pause:?}: {err}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// A fresh message id for one write call: every try of that call sends
/// it, so a write sent again is stored once; no other write shares it, so
/// two writers of the same value expecting the same revision never pass for
/// one (the second must see its compare-and-set refused), and a value put
/// again later is stored again.
pub(crate) fn message_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Whether a publish failed for want of an answer that a retry may get:
/// nobody listening while the stream elects a leader, a lost connection,
/// or a timeout across a reconnection or in a cluster (`reconnected`). A
/// timeout on a steady connection to a lone server is a refusal
/// (permissions) or a server that cannot store it, and is not retried; in
/// a cluster it is also what the loss of another node looks like (the
/// stream's leader died with the request), so it is retried there.
fn is_transient(err: &async_nats::jetstream::context::PublishError, reconnected: bool) -> bool {
    use async_nats::jetstream::context::PublishErrorKind;
    let code = jetstream_code(err);
    match err.kind() {
        PublishErrorKind::TimedOut => reconnected,
        PublishErrorKind::BrokenPipe | PublishErrorKind::StreamNotFound => true,
        // A retried write whose first try the stream is still storing
        // (through its new leader): the next try gets the first's answer.
        PublishErrorKind::Other => {
            code.is_some_and(|code| code == ErrorCode::CLUSTER_NOT_AVAILABLE || code == ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT)
        }
        _ => false,
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
    source: Arc<WatchSource>,
    state: WatchState,
    /// Whether a consumer was ever made: until then the next one replays
    /// current values; after, it resumes from `seen_up_to`.
    opened: bool,
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

/// What a watch needs to make its consumer again.
struct WatchSource {
    client: async_nats::Client,
    consumers: Consumers,
    stream: String,
    /// `$KV.<bucket>.`
    prefix: String,
    pattern: String,
}

impl WatchSource {
    async fn open(&self, from: Option<u64>) -> Result<(PushFeed, Made), BackendError> {
        PushFeed::open(&self.client, &self.consumers, &self.stream, format!("{}{}", self.prefix, self.pattern), from, false).await
    }
}

type Feed = BoxStream<'static, Result<Fed, BackendError>>;

enum WatchState {
    Open(Feed),
    Reopening(BoxFuture<'static, (Feed, Made)>),
}

impl NatsWatch {
    /// Watches the keys of stream `stream` (subjects `prefix` + key)
    /// matching `pattern`, its consumers made by `consumers`.
    pub(crate) async fn open(
        client: async_nats::Client,
        consumers: Consumers,
        connection: watch::Receiver<ConnectionState>,
        stream: &str,
        prefix: &str,
        pattern: &str,
    ) -> Result<NatsWatch, BackendError> {
        // Subscribed before the watch starts, so no election after it is missed.
        let elections = client.subscribe(format!("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{stream}")).await?;
        let source = WatchSource { client, consumers, stream: stream.to_owned(), prefix: prefix.to_owned(), pattern: pattern.to_owned() };
        let opened = source.open(None).await;
        let mut watch = NatsWatch {
            source: Arc::new(source),
            state: WatchState::Reopening(Box::pin(future::pending())),
            opened: false,
            seen_up_to: 0,
            replayed_up_to: 0,
            renewals: futures::stream::select(reconnections(connection), elections.map(drop)).boxed(),
        };
        match opened {
            Ok((feed, made)) => watch.start(feed, made),
            // A host started before any control plane: its watches begin
            // once a broker answers.
            Err(err) if err.is::<BrokerUnreachable>() => {
                tracing::warn!(%stream, %pattern, "{err}; the watch starts once one does");
                watch.reopen();
            }
            Err(err) => return Err(err),
        }
        Ok(watch)
    }

    fn start(&mut self, feed: PushFeed, made: Made) {
        self.state = WatchState::Open(feed.into_stream());
        if !self.opened {
            self.opened = true;
            self.replayed_up_to = made.last;
        }
    }

    fn reopen(&mut self) {
        let source = self.source.clone();
        // From a revision, not "current values", once some were replayed:
        // the values up to it have been yielded already, and the changes
        // after it are exactly what is missing (with history 1, only each
        // key's latest change is kept, which is all a level-triggered
        // watcher needs).
        let from = self.opened.then_some(self.seen_up_to + 1);
        self.state = WatchState::Reopening(Box::pin(async move {
            let mut delay = Duration::from_millis(50);
            loop {
                // Each attempt is bounded: one made as the client reconnects
                // can go unanswered for the JetStream API's whole 10 s
                // timeout, while a second one a moment later succeeds.
                match tokio::time::timeout(RENEW_ATTEMPT_TIMEOUT, source.open(from))
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()))
                {
                    Ok((feed, made)) => return (feed.into_stream(), made),
                    Err(err) => {
                        tracing::warn!(
                            stream = %source.stream,
                            pattern = %source.pattern,
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
            let feed = match &mut self.state {
                WatchState::Open(feed) => feed,
                WatchState::Reopening(renewal) => {
                    let (feed, made) = ready!(renewal.poll_unpin(cx));
                    self.state = WatchState::Open(feed);
                    if !self.opened {
                        self.opened = true;
                        self.replayed_up_to = made.last;
                    }
                    continue;
                }
            };
            let message = match ready!(feed.poll_next_unpin(cx)) {
                // The client is gone, and with it any hope of more changes.
                None => return Poll::Ready(None),
                Some(Err(err)) => {
                    tracing::warn!(
                        stream = %self.source.stream,
                        pattern = %self.source.pattern,
                        "KV watch failed, renewing it: {err}"
                    );
                    self.reopen();
                    continue;
                }
                Some(Ok(message)) => message,
            };
            let revision = message.info.stream_sequence;
            if revision <= self.seen_up_to {
                continue;
            }
            self.seen_up_to = revision;
            let deleted = message.is_kv_delete();
            if deleted && revision <= self.replayed_up_to {
                continue;
            }
            let Some(key) = message.subject.strip_prefix(self.source.prefix.as_str()) else { continue };
            return Poll::Ready(Some(KvEvent {
                key: key.to_owned(),
                value: (!deleted).then_some(message.payload),
                revision,
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
