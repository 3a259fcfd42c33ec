//! The NATS implementation: core NATS for messages, JetStream KV and Object Store for state.
//!
//! Names, payload sizes and values have been checked by the caller in
//! `lib.rs`, `kv.rs` or `objects.rs`; this module only translates calls and
//! errors between async-nats and the bus's types.

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream::StorageType};
use async_nats::{ConnectErrorKind, Event, RequestErrorKind};
use bytes::Bytes;
use futures::future::{self, BoxFuture};
use futures::stream::BoxStream;
use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::error::{
    BackendError, ConnectError, KvError, ObjectError, PublishError, RequestError, SubscribeError,
};
use crate::{ConnectionState, Entry, KeyPage, KvEvent, KvOptions, Message, Subscription, SubscriptionInner};

/// How long a page of keys waits for the server's next message before it
/// gives up (the consumer delivers a page at once; this only bounds a stall).
const PAGE_STALL: Duration = Duration::from_secs(5);

/// The oldest nats-server accepted: async-nats 0.51 cannot create KV buckets on 2.9.
const MIN_SERVER_VERSION: (u64, u64) = (2, 10);

/// How to connect to NATS.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// The connection's name in the server's monitoring and logs, e.g. `wharf-host-a1`.
    pub name: String,
    pub auth: NatsAuth,
    /// How long one attempt to reach a server may take.
    pub connect_timeout: Duration,
}

impl Default for NatsOptions {
    fn default() -> NatsOptions {
        NatsOptions {
            name: "wharf".to_owned(),
            auth: NatsAuth::None,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// How the connection proves who it is to the server.
#[derive(Clone, Default)]
pub enum NatsAuth {
    /// No credentials, for servers without authorization.
    #[default]
    None,
    /// A user and password from the server's `authorization` block.
    UserPassword { user: String, password: String },
    /// A `.creds` file holding a user JWT and NKey seed (decentralised auth).
    CredentialsFile(PathBuf),
}

// Hand-written so that a password never ends up in a log.
impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            NatsAuth::CredentialsFile(path) => {
                f.debug_tuple("CredentialsFile").field(path).finish()
            }
        }
    }
}

pub(crate) struct NatsBus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    /// Fed by the client's event callback.
    connection: watch::Receiver<ConnectionState>,
}

impl NatsBus {
    pub(crate) async fn connect(url: &str, options: NatsOptions) -> Result<NatsBus, ConnectError> {
        let (state, connection) = watch::channel(ConnectionState::Connected);
        let state = Arc::new(state);
        // `retry_on_initial_connect` is deliberately not set: a wrong URL must
        // fail here with a clear error rather than retry in the background.
        // Once connected, reconnection is unlimited, so a NATS restart or a
        // network blip never leaves a Wharf process disconnected for good.
        let mut connect = async_nats::ConnectOptions::new()
            .name(options.name)
            .connection_timeout(options.connect_timeout)
            .max_reconnects(None)
            .event_callback(move |event| {
                let state = Arc::clone(&state);
                async move {
                    let new = match event {
                        Event::Connected => ConnectionState::Connected,
                        Event::Disconnected => ConnectionState::Disconnected,
                        _ => return,
                    };
                    // Only real changes wake receivers: the first connect's
                    // event arrives after the channel already says `Connected`,
                    // and must not look like a reconnect to `NatsWatch`.
                    state.send_if_modified(|current| {
                        let changed = *current != new;
                        *current = new;
                        changed
                    });
                }
            });
        connect = match options.auth {
            NatsAuth::None => connect,
            NatsAuth::UserPassword { user, password } => connect.user_and_password(user, password),
            NatsAuth::CredentialsFile(path) => connect
                .credentials_file(&path)
                .await
                .map_err(|source| ConnectError::CredentialsFile { path, source })?,
        };
        let client = connect.connect(url).await.map_err(|err| {
            let url = url.to_owned();
            let kind = err.kind();
            let source: BackendError = Box::new(err);
            match kind {
                ConnectErrorKind::ServerParse => ConnectError::InvalidUrl { url, source },
                ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                    ConnectError::Unauthorized { url, source }
                }
                _ => ConnectError::Unreachable { url, source },
            }
        })?;

        let info = client.server_info();
        if !version_at_least(&info.version, MIN_SERVER_VERSION) {
            return Err(ConnectError::ServerTooOld {
                url: url.to_owned(),
                version: info.version,
            });
        }
        if !info.jetstream {
            return Err(ConnectError::JetStreamDisabled {
                url: url.to_owned(),
            });
        }
        let jetstream = jetstream::new(client.clone());
        // The server may run JetStream without granting it to this account.
        jetstream
            .query_account()
            .await
            .map_err(|err| ConnectError::JetStreamUnavailable {
                url: url.to_owned(),
                source: Box::new(err),
            })?;
        Ok(NatsBus {
            client,
            jetstream,
            connection,
        })
    }

    pub(crate) async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), PublishError> {
        self.client
            .publish(subject.to_owned(), payload)
            .await
            .map_err(|err| PublishError::Unavailable {
                subject: subject.to_owned(),
                source: Box::new(err),
            })
    }

    pub(crate) async fn subscribe(
        &self,
        subject: &str,
        group: Option<&str>,
    ) -> Result<Subscription, SubscribeError> {
        let subscriber = match group {
            None => self.client.subscribe(subject.to_owned()).await,
            Some(group) => {
                self.client
                    .queue_subscribe(subject.to_owned(), group.to_owned())
                    .await
            }
        };
        subscriber
            .map(|subscriber| Subscription {
                inner: SubscriptionInner::Nats(subscriber),
            })
            .map_err(|err| SubscribeError::Unavailable {
                subject: subject.to_owned(),
                source: Box::new(err),
            })
    }

    pub(crate) async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, RequestError> {
        let request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        match self.client.send_request(subject.to_owned(), request).await {
            Ok(reply) => Ok(message(reply)),
            Err(err) => {
                let subject = subject.to_owned();
                Err(match err.kind() {
                    RequestErrorKind::NoResponders => RequestError::NoResponders { subject },
                    RequestErrorKind::TimedOut => RequestError::TimedOut { subject, timeout },
                    _ => RequestError::Unavailable {
                        subject,
                        source: Box::new(err),
                    },
                })
            }
        }
    }

    pub(crate) fn max_payload(&self) -> usize {
        self.client.max_payload()
    }

    pub(crate) fn connection_changes(&self) -> watch::Receiver<ConnectionState> {
        self.connection.clone()
    }

    pub(crate) async fn kv(&self, bucket: &str, options: Option<KvOptions>) -> Result<NatsKv, KvError> {
        // Opening the existing bucket first respects a bucket made elsewhere
        // with other settings (unless `options` says what they must be). If
        // that fails for any reason, creating it either works (JetStream
        // creates idempotently, so racing processes both succeed) or reports
        // the real problem.
        let max_bytes = options.and_then(|o| o.max_bytes).map_or(-1, |max| i64::try_from(max).unwrap_or(i64::MAX));
        let store = match self.jetstream.get_key_value(bucket).await {
            Ok(mut store) => {
                if options.is_some() {
                    let mut info = store.stream.get_info().await.map_err(|err| kv_unavailable(bucket, err))?;
                    if info.config.max_bytes != max_bytes {
                        info.config.max_bytes = max_bytes;
                        self.jetstream.update_stream(&info.config).await.map_err(|err| kv_unavailable(bucket, err))?;
                        store = self.jetstream.get_key_value(bucket).await.map_err(|err| kv_unavailable(bucket, err))?;
                    }
                }
                store
            }
            Err(_) => self
                .jetstream
                .create_key_value(kv::Config {
                    bucket: bucket.to_owned(),
                    // Wharf's state is level-triggered: only the latest value matters.
                    history: 1,
                    max_value_size: -1,
                    max_bytes,
                    storage: StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|err| kv_unavailable(bucket, err))?,
        };
        let max_bytes = u64::try_from(store.stream.cached_info().config.max_bytes).unwrap_or(0);
        Ok(NatsKv {
            store,
            bucket: bucket.to_owned(),
            max_bytes,
            client: self.client.clone(),
            connection: self.connection.clone(),
        })
    }

    pub(crate) async fn objects(&self, bucket: &str) -> Result<NatsObjects, ObjectError> {
        // As in `kv`: open first, create if that fails.
        let store = match self.jetstream.get_object_store(bucket).await {
            Ok(store) => store,
            Err(_) => self
                .jetstream
                .create_object_store(object_store::Config {
                    bucket: bucket.to_owned(),
                    storage: StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|err| objects_unavailable(bucket, err))?,
        };
        Ok(NatsObjects {
            store,
            bucket: bucket.to_owned(),
        })
    }
}

/// Converts a received message; status-only messages never reach subscriptions.
pub(crate) fn message(message: async_nats::Message) -> Message {
    Message {
        subject: message.subject.to_string(),
        payload: message.payload,
        reply: message.reply.map(|reply| reply.to_string()),
    }
}

/// A JetStream KV bucket.
pub(crate) struct NatsKv {
    store: kv::Store,
    bucket: String,
    /// The bucket's byte limit when it was opened (0: none), for errors.
    max_bytes: u64,
    /// For the inboxes of key pages' consumers.
    client: async_nats::Client,
    /// For watches, which start afresh when the connection comes back.
    connection: watch::Receiver<ConnectionState>,
}

impl NatsKv {
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
        self.store
            .put(key, value)
            .await
            .map_err(|err| self.write_failed(key, err))
    }

    pub(crate) async fn create(&self, key: &str, value: Bytes) -> Result<u64, KvError> {
        self.store.create(key, value).await.map_err(|err| {
            if err.kind() == kv::CreateErrorKind::AlreadyExists {
                KvError::AlreadyExists {
                    bucket: self.bucket.clone(),
                    key: key.to_owned(),
                }
            } else {
                self.write_failed(key, err)
            }
        })
    }

    pub(crate) async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: u64,
    ) -> Result<u64, KvError> {
        self.store
            .update(key, value, expected)
            .await
            .map_err(|err| {
                if err.kind() == kv::UpdateErrorKind::WrongLastRevision {
                    KvError::RevisionMismatch {
                        bucket: self.bucket.clone(),
                        key: key.to_owned(),
                        expected,
                    }
                } else {
                    self.write_failed(key, err)
                }
            })
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), KvError> {
        self.store
            .delete(key)
            .await
            .map_err(|err| self.write_failed(key, err))
    }

    /// Reads keys from an ordered consumer that starts after revision
    /// `after`, delivers only headers, and is dropped as soon as the page
    /// is full. The bucket keeps one message per key, so each message is
    /// one key's latest change; deletes are skipped.
    pub(crate) async fn keys_page(&self, prefix: &str, after: u64, limit: usize) -> Result<KeyPage, KvError> {
        use jetstream::consumer::{DeliverPolicy, push::OrderedConfig};
        let consumer = self
            .store
            .stream
            .create_consumer(OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: format!("{}{prefix}>", self.store.prefix),
                headers_only: true,
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: after.saturating_add(1) },
                ..Default::default()
            })
            .await
            .map_err(|err| self.unavailable(err))?;
        let mut page = KeyPage { keys: Vec::new(), next: None };
        if consumer.cached_info().num_pending == 0 {
            return Ok(page);
        }
        let mut messages = consumer.messages().await.map_err(|err| self.unavailable(err))?;
        loop {
            let message = match tokio::time::timeout(PAGE_STALL, messages.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(err))) => return Err(self.unavailable(err)),
                Ok(None) => return Ok(page),
                Err(_) => return Err(self.unavailable(format!("no keys arrived for {PAGE_STALL:?}"))),
            };
            let (sequence, pending) = match message.info() {
                Ok(info) => (info.stream_sequence, info.pending),
                Err(err) => return Err(self.unavailable(err.to_string())),
            };
            let deleted = message.headers.as_ref().and_then(|headers| headers.get("KV-Operation")).is_some_and(|op| op.as_str() != "PUT");
            if !deleted && let Some(key) = message.subject.as_str().strip_prefix(self.store.prefix.as_str()) {
                page.keys.push(key.to_owned());
            }
            if pending == 0 {
                return Ok(page);
            }
            if page.keys.len() == limit {
                page.next = Some(sequence);
                return Ok(page);
            }
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
            reconnections: reconnections(self.connection.clone()),
        })
    }

    fn unavailable(&self, err: impl Into<BackendError>) -> KvError {
        kv_unavailable(&self.bucket, err)
    }

    /// A failed write: [`KvError::BucketFull`] when the stream refused it
    /// for its byte limit, else unavailable.
    fn write_failed<E: std::error::Error + Send + Sync + 'static>(&self, key: &str, err: E) -> KvError {
        if is_bucket_full(&err) {
            return KvError::BucketFull { bucket: self.bucket.clone(), key: key.to_owned(), max_bytes: self.max_bytes };
        }
        self.unavailable(err)
    }
}

/// A JetStream KV watch, turned into [`KvEvent`]s, that outlives NATS restarts.
///
/// async-nats' watch (an ordered consumer) notices a lost consumer only after
/// missing heartbeats for 10 s, and a restarted server has lost it; it then
/// yields an error and recreates itself. This watch instead starts a new one
/// as soon as the client reconnects, or after any error, resuming after the
/// last revision it yielded, and retries until that works. So it yields no
/// errors, and misses or repeats no change.
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
    /// Yields each time the connection comes back.
    reconnections: BoxStream<'static, ()>,
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
                match store.watch_from_revision(&pattern, from).await {
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
            if let Poll::Ready(Some(())) = self.reconnections.poll_next_unpin(cx) {
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

/// A JetStream object store bucket.
pub(crate) struct NatsObjects {
    store: object_store::ObjectStore,
    bucket: String,
}

impl NatsObjects {
    pub(crate) async fn put(&self, name: &str, data: Bytes) -> Result<(), ObjectError> {
        let mut reader: &[u8] = &data;
        self.store
            .put(name, &mut reader)
            .await
            .map(drop)
            .map_err(|err| self.unavailable(err))
    }

    pub(crate) async fn get(&self, name: &str) -> Result<Option<Bytes>, ObjectError> {
        let mut object = match self.store.get(name).await {
            Ok(object) => object,
            Err(err) if err.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(self.unavailable(err)),
        };
        let mut data = Vec::with_capacity(object.info.size);
        object
            .read_to_end(&mut data)
            .await
            .map_err(|err| self.unavailable(err))?;
        Ok(Some(data.into()))
    }

    pub(crate) async fn exists(&self, name: &str) -> Result<bool, ObjectError> {
        match self.store.info(name).await {
            // A deleted object keeps its metadata, marked deleted.
            Ok(info) => Ok(!info.deleted),
            Err(err) if err.kind() == object_store::InfoErrorKind::NotFound => Ok(false),
            Err(err) => Err(self.unavailable(err)),
        }
    }

    pub(crate) async fn delete(&self, name: &str) -> Result<(), ObjectError> {
        match self.store.delete(name).await {
            Err(err) if err.kind() != object_store::DeleteErrorKind::NotFound => {
                Err(self.unavailable(err))
            }
            _ => Ok(()),
        }
    }

    pub(crate) async fn list(&self) -> Result<Vec<String>, ObjectError> {
        self.store
            .list()
            .await
            .map_err(|err| self.unavailable(err))?
            .map_ok(|info| info.name)
            .try_collect()
            .await
            .map_err(|err| self.unavailable(err))
    }

    fn unavailable(&self, err: impl Into<BackendError>) -> ObjectError {
        objects_unavailable(&self.bucket, err)
    }
}

/// Whether a write failed because the stream is at its byte limit. The
/// server answers with its generic "store failed" code (10077), which also
/// covers disk errors, so the description is checked as well: it is the
/// server's fixed text for this case (`ErrMaxBytes`).
fn is_bucket_full(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(js) = err.downcast_ref::<jetstream::Error>() {
            return js.error_code() == jetstream::ErrorCode::STREAM_STORE_FAILED && js.to_string().contains("maximum bytes exceeded");
        }
        current = err.source();
    }
    false
}

fn kv_unavailable(bucket: &str, err: impl Into<BackendError>) -> KvError {
    KvError::Unavailable {
        bucket: bucket.to_owned(),
        source: err.into(),
    }
}

fn objects_unavailable(bucket: &str, err: impl Into<BackendError>) -> ObjectError {
    ObjectError::Unavailable {
        bucket: bucket.to_owned(),
        source: err.into(),
    }
}

/// Whether a server version such as `2.10.4` or `2.11.0-RC.1` is at least `(major, minor)`.
fn version_at_least(version: &str, minimum: (u64, u64)) -> bool {
    let mut numbers = version.split('.').map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u64>()
    });
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= minimum,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_are_compared() {
        for (version, expected) in [
            ("2.10.0", true),
            ("2.15.1", true),
            ("2.11.0-RC.1", true),
            ("3.0.0", true),
            ("2.9.10", false),
            ("1.4.1", false),
            ("", false),
            ("garbage", false),
        ] {
            assert_eq!(
                version_at_least(version, MIN_SERVER_VERSION),
                expected,
                "{version}"
            );
        }
    }
}
