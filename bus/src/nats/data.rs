//! Key-value reads and writes made by a broker on a process's behalf.
//!
//! A process whose NATS identity may not touch a bucket itself (a host and
//! the data of namespaces it does not run) asks a broker instead
//! ([`NatsOptions::data_broker`](super::NatsOptions::data_broker)), which
//! checks each [`DataAsk`] against its policy ([`DataRules`]) and carries it
//! out with its own rights. An ask and its answer each travel as one
//! message: a JSON header (its length first, four bytes, big-endian), then
//! the value's bytes.
//!
//! The broker also publishes and makes requests on subjects that a stream
//! may capture ([`NatsOptions::brokered_subjects`](super::NatsOptions::brokered_subjects)):
//! JetStream acknowledges a message it stores on the reply subject the
//! publisher named, with the server's rights, so a publisher allowed such
//! subjects could have an acknowledgement written onto any key. The broker
//! names no reply for a publish, and its own inbox for a request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::{BackendError, KvError, PublishError, RequestError};
use crate::{Bus, Entry, KeyPage, Kv, Message};

/// How long an asker waits for the broker's answer in all: longer than a
/// bucket call rides over a lost server (30 s), so the broker's own error
/// comes back rather than a timeout.
const BROKER_PATIENCE: Duration = Duration::from_secs(35);

/// How long one sending of an ask waits for its answer before the ask is
/// sent again (under the same id, see [`ASK_ID`]): an ask, or its answer,
/// lost with a NATS server that died while it crossed is not otherwise
/// noticed. A lost connection sends it again at once.
const TRY_PATIENCE: Duration = Duration::from_secs(5);

/// The longest request the broker makes for an asker, whatever it asks.
const MAX_REQUEST: Duration = Duration::from_secs(60);

/// How long an ask is sent again while no broker listens (all of them
/// reconnecting after a server's loss, say) before that is the answer.
const NO_BROKER_PATIENCE: Duration = Duration::from_secs(10);

/// The header naming an ask, the same on each sending of it: the broker
/// writes under it as the message id, so JetStream stores a write once
/// however many times its ask arrives (see `Kv::put_once`).
const ASK_ID: &str = "Wharf-Ask-Id";

/// A key-value call a process asks a data broker to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum DataAsk {
    Get { bucket: String, key: String },
    Put { bucket: String, key: String },
    Create { bucket: String, key: String },
    Update { bucket: String, key: String, expected: u64 },
    Delete { bucket: String, key: String },
    KeysPage { bucket: String, prefix: String, after: u64, limit: usize },
    /// [`Kv::increment`]: the broker runs the compare-and-set loop.
    Increment { bucket: String, key: String, delta: u64 },
    /// An object's size and chunks (object bucket `bucket`).
    ObjectInfo { bucket: String, name: String },
    /// The first chunk of object `nuid` after stream sequence `after`.
    ObjectChunk { bucket: String, nuid: String, after: u64 },
    /// A core NATS publish of the ask's bytes on `subject`, naming no reply subject.
    Publish { subject: String },
    /// A request of the ask's bytes on `subject`, waiting up to
    /// `timeout_ms` for a reply, whose bytes the answer carries.
    Request { subject: String, timeout_ms: u64 },
}

impl DataAsk {
    /// The bucket the call is about; empty for a publish or a request
    /// (see [`DataAsk::subject`]).
    pub fn bucket(&self) -> &str {
        match self {
            DataAsk::Get { bucket, .. }
            | DataAsk::Put { bucket, .. }
            | DataAsk::Create { bucket, .. }
            | DataAsk::Update { bucket, .. }
            | DataAsk::Delete { bucket, .. }
            | DataAsk::KeysPage { bucket, .. }
            | DataAsk::Increment { bucket, .. }
            | DataAsk::ObjectInfo { bucket, .. }
            | DataAsk::ObjectChunk { bucket, .. } => bucket,
            DataAsk::Publish { .. } | DataAsk::Request { .. } => "",
        }
    }

    /// The subject a publish or a request is made on; `None` for a bucket call.
    pub fn subject(&self) -> Option<&str> {
        match self {
            DataAsk::Publish { subject } | DataAsk::Request { subject, .. } => Some(subject),
            _ => None,
        }
    }

    /// Whether the call changes the bucket.
    pub fn writes(&self) -> bool {
        matches!(self, DataAsk::Put { .. } | DataAsk::Create { .. } | DataAsk::Update { .. } | DataAsk::Delete { .. } | DataAsk::Increment { .. })
    }
}

/// What a data broker allows; see [`ConsumerRules`](super::ConsumerRules)
/// for why answers must go only where the asker may read.
pub trait DataRules: Send + Sync {
    /// Whether an answer to `asker` may be published on `reply`; if not,
    /// the ask is dropped unanswered.
    fn may_answer(&self, asker: &str, reply: &str) -> bool;
    /// `Ok` to carry `ask` out for `asker`, else why not.
    fn allows(&self, asker: &str, ask: &DataAsk) -> Result<(), String>;
}

/// A data broker's rules, shared by its tasks.
pub type DataPolicy = Arc<dyn DataRules>;

/// The broker's answer.
#[derive(Debug, Default, Serialize, Deserialize)]
struct DataAnswer {
    /// The revision written, or of the entry read (`found`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revision: Option<u64>,
    /// For a get: whether the key has a value (it follows the header).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    found: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keys: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    object: Option<ObjectMeta>,
    /// For a request: the subject the reply came on (its bytes follow the header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failed: Option<Failure>,
}

/// An object as [`DataAsk::ObjectInfo`] answers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ObjectMeta {
    nuid: String,
    size: usize,
    chunks: usize,
}

/// A call that failed, as the asker rebuilds its [`KvError`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Failure {
    Refused { why: String },
    AlreadyExists,
    RevisionMismatch { expected: u64 },
    BucketFull { max_bytes: u64 },
    ValueTooLarge { size: usize, max: usize },
    Increment { why: String },
    /// A request that no one listens for.
    NoResponders,
    /// A request that got no reply in its time.
    TimedOut,
    Other { message: String },
}

/// A header then a body, as one message.
fn frame(header: &impl Serialize, body: &[u8]) -> Bytes {
    let json = serde_json::to_vec(header).unwrap_or_default();
    let mut out = BytesMut::with_capacity(4 + json.len() + body.len());
    out.put_u32(u32::try_from(json.len()).unwrap_or(u32::MAX));
    out.put_slice(&json);
    out.put_slice(body);
    out.freeze()
}

/// The header and body of a framed message.
fn unframe<T: for<'de> Deserialize<'de>>(message: &Bytes) -> Result<(T, Bytes), String> {
    let length = message.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize).ok_or("too short")?;
    let json = message.get(4..4 + length).ok_or("shorter than its header says")?;
    let header = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    Ok((header, message.slice(4 + length..)))
}

/// The asking side of a data broker: where asks go, over which connection.
#[derive(Clone)]
pub(crate) struct DataBroker {
    client: async_nats::Client,
    subject: String,
    connection: tokio::sync::watch::Receiver<crate::ConnectionState>,
}

/// A bucket whose calls a data broker makes (and whose watches' consumers
/// the consumer broker makes).
pub(crate) struct BrokeredKv {
    bucket: String,
    broker: DataBroker,
    consumers: super::Consumers,
}

impl DataBroker {
    pub(crate) fn new(client: async_nats::Client, subject: String, connection: tokio::sync::watch::Receiver<crate::ConnectionState>) -> DataBroker {
        DataBroker { client, subject, connection }
    }

    /// Sends `ask` once and reads the answer, waiting up to `patience`: a
    /// publish or a request is not sent again, which could deliver it twice.
    async fn once(&self, ask: &DataAsk, body: Bytes, patience: Duration) -> Result<(DataAnswer, Bytes), BackendError> {
        let request = async_nats::Request::new().payload(frame(ask, &body)).timeout(Some(patience));
        let reply = self.client.send_request(self.subject.clone(), request).await.map_err(|err| format!("the data broker on {} did not answer: {err}", self.subject))?;
        Ok(unframe(&reply.payload).map_err(|err| format!("the data broker on {} answered something unreadable: {err}", self.subject))?)
    }

    /// Has the broker publish `payload` on `subject`.
    pub(crate) async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), PublishError> {
        let unavailable = |source: BackendError| PublishError::Unavailable { subject: subject.to_owned(), source };
        let (answer, _) = self.once(&DataAsk::Publish { subject: subject.to_owned() }, payload, TRY_PATIENCE).await.map_err(unavailable)?;
        match answer.failed {
            None => Ok(()),
            Some(Failure::Refused { why }) => Err(unavailable(format!("the data broker refused: {why}").into())),
            Some(Failure::Other { message }) => Err(unavailable(format!("the data broker could not publish: {message}").into())),
            Some(other) => Err(unavailable(format!("the data broker could not publish: {other:?}").into())),
        }
    }

    /// Has the broker send a request of `payload` on `subject` and return its reply.
    pub(crate) async fn request(&self, subject: &str, payload: Bytes, timeout: Duration) -> Result<Message, RequestError> {
        let unavailable = |source: BackendError| RequestError::Unavailable { subject: subject.to_owned(), source };
        let ask = DataAsk::Request { subject: subject.to_owned(), timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX) };
        let (answer, body) = self.once(&ask, payload, timeout + TRY_PATIENCE).await.map_err(unavailable)?;
        match answer.failed {
            None => Ok(Message { subject: answer.subject.unwrap_or_default(), payload: body, reply: None }),
            Some(Failure::NoResponders) => Err(RequestError::NoResponders { subject: subject.to_owned() }),
            Some(Failure::TimedOut) => Err(RequestError::TimedOut { subject: subject.to_owned(), timeout }),
            Some(Failure::Refused { why }) => Err(unavailable(format!("the data broker refused: {why}").into())),
            Some(Failure::Other { message }) => Err(unavailable(format!("the data broker's request failed: {message}").into())),
            Some(other) => Err(unavailable(format!("the data broker's request failed: {other:?}").into())),
        }
    }
}

impl BrokeredKv {
    pub(crate) fn new(bucket: &str, broker: DataBroker, consumers: super::Consumers) -> BrokeredKv {
        BrokeredKv { bucket: bucket.to_owned(), broker, consumers }
    }

    pub(crate) async fn watch(&self, pattern: &str) -> Result<super::NatsWatch, KvError> {
        let (stream, prefix) = (format!("KV_{}", self.bucket), format!("$KV.{}.", self.bucket));
        super::NatsWatch::open(self.broker.client.clone(), self.consumers.clone(), self.broker.connection.clone(), &stream, &prefix, pattern)
            .await
            .map_err(|source| KvError::Unavailable { bucket: self.bucket.clone(), source })
    }

    async fn ask(&self, ask: DataAsk, value: &[u8]) -> Result<(DataAnswer, Bytes), KvError> {
        let unavailable = |source: BackendError| KvError::Unavailable { bucket: self.bucket.clone(), source };
        let reply = self.broker.sent(frame(&ask, value)).await.map_err(unavailable)?;
        let (answer, body): (DataAnswer, Bytes) =
            unframe(&reply.payload).map_err(|err| unavailable(format!("the data broker on {} answered something unreadable: {err}", self.broker.subject).into()))?;
        let key = match &ask {
            DataAsk::Get { key, .. }
            | DataAsk::Put { key, .. }
            | DataAsk::Create { key, .. }
            | DataAsk::Update { key, .. }
            | DataAsk::Delete { key, .. }
            | DataAsk::Increment { key, .. } => key.clone(),
            DataAsk::ObjectInfo { name, .. } => name.clone(),
            DataAsk::KeysPage { .. } | DataAsk::ObjectChunk { .. } | DataAsk::Publish { .. } | DataAsk::Request { .. } => String::new(),
        };
        match answer.failed {
            None => Ok((answer, body)),
            Some(failure) => Err(match failure {
                Failure::Refused { why } => unavailable(format!("the data broker refused: {why}").into()),
                Failure::AlreadyExists => KvError::AlreadyExists { bucket: self.bucket.clone(), key },
                Failure::RevisionMismatch { expected } => KvError::RevisionMismatch { bucket: self.bucket.clone(), key, expected },
                Failure::BucketFull { max_bytes } => KvError::BucketFull { bucket: self.bucket.clone(), max_bytes },
                Failure::ValueTooLarge { size, max } => KvError::ValueTooLarge { key, size, max },
                Failure::Increment { why } => KvError::Increment { bucket: self.bucket.clone(), key, why },
                Failure::Other { message } => unavailable(message.into()),
                failure @ (Failure::NoResponders | Failure::TimedOut) => unavailable(format!("{failure:?} for a bucket call").into()),
            }),
        }
    }
}

impl DataBroker {
    /// Sends an ask until its answer comes: again after [`TRY_PATIENCE`]
    /// or a change of connection, always under one [`ASK_ID`], for up to
    /// [`BROKER_PATIENCE`] in all.
    async fn sent(&self, payload: Bytes) -> Result<async_nats::Message, BackendError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(ASK_ID, super::message_id().as_str());
        let started = tokio::time::Instant::now();
        let mut connection = self.connection.clone();
        loop {
            connection.mark_unchanged();
            let request = async_nats::Request::new().payload(payload.clone()).headers(headers.clone()).timeout(Some(TRY_PATIENCE));
            let sent = self.client.send_request(self.subject.clone(), request);
            let outcome = tokio::select! {
                outcome = sent => Some(outcome),
                // The ask or its answer may have been lost with the connection.
                Ok(()) = connection.changed() => None,
            };
            let waited = started.elapsed();
            match outcome {
                Some(Ok(reply)) => return Ok(reply),
                Some(Err(err)) => {
                    let again = match err.kind() {
                        async_nats::RequestErrorKind::TimedOut => waited + TRY_PATIENCE <= BROKER_PATIENCE,
                        async_nats::RequestErrorKind::NoResponders => waited < NO_BROKER_PATIENCE,
                        _ => false,
                    };
                    if !again {
                        return Err(format!("the data broker on {} did not answer: {err}", self.subject).into());
                    }
                    tracing::debug!(subject = %self.subject, "a data ask got no answer ({err}); sending it again");
                    if err.kind() == async_nats::RequestErrorKind::NoResponders {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
                None if waited < BROKER_PATIENCE => tracing::debug!(subject = %self.subject, "the connection changed during a data ask; sending it again"),
                None => return Err(format!("the data broker on {} did not answer within {BROKER_PATIENCE:?}", self.subject).into()),
            }
        }
    }
}

impl BrokeredKv {
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Entry>, KvError> {
        let (answer, value) = self.ask(DataAsk::Get { bucket: self.bucket.clone(), key: key.to_owned() }, &[]).await?;
        Ok(answer.found.then(|| Entry { key: key.to_owned(), value, revision: answer.revision.unwrap_or(0) }))
    }

    async fn written(&self, ask: DataAsk, value: &[u8]) -> Result<u64, KvError> {
        Ok(self.ask(ask, value).await?.0.revision.unwrap_or(0))
    }

    pub(crate) async fn put(&self, key: &str, value: Bytes) -> Result<u64, KvError> {
        self.written(DataAsk::Put { bucket: self.bucket.clone(), key: key.to_owned() }, &value).await
    }

    pub(crate) async fn create(&self, key: &str, value: Bytes) -> Result<u64, KvError> {
        self.written(DataAsk::Create { bucket: self.bucket.clone(), key: key.to_owned() }, &value).await
    }

    pub(crate) async fn update(&self, key: &str, value: Bytes, expected: u64) -> Result<u64, KvError> {
        self.written(DataAsk::Update { bucket: self.bucket.clone(), key: key.to_owned(), expected }, &value).await
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), KvError> {
        self.written(DataAsk::Delete { bucket: self.bucket.clone(), key: key.to_owned() }, &[]).await.map(drop)
    }

    pub(crate) async fn increment(&self, key: &str, delta: u64) -> Result<u64, KvError> {
        self.written(DataAsk::Increment { bucket: self.bucket.clone(), key: key.to_owned(), delta }, &[]).await
    }

    pub(crate) async fn keys_page(&self, prefix: &str, after: u64, limit: usize) -> Result<KeyPage, KvError> {
        let ask = DataAsk::KeysPage { bucket: self.bucket.clone(), prefix: prefix.to_owned(), after, limit };
        let (answer, _) = self.ask(ask, &[]).await?;
        Ok(KeyPage { keys: answer.keys.unwrap_or_default(), next: answer.next })
    }

    pub(crate) async fn keys(&self) -> Result<Vec<String>, KvError> {
        let mut keys = Vec::new();
        let mut after = 0;
        loop {
            let page = self.keys_page("", after, 1000).await?;
            keys.extend(page.keys);
            match page.next {
                Some(next) => after = next,
                None => return Ok(keys),
            }
        }
    }
}

/// An object bucket whose reads a data broker makes.
pub(crate) struct BrokeredObjects {
    kv: BrokeredKv,
}

impl BrokeredObjects {
    pub(crate) fn new(kv: BrokeredKv) -> BrokeredObjects {
        BrokeredObjects { kv }
    }

    fn failed(&self, err: KvError) -> crate::error::ObjectError {
        crate::error::ObjectError::Unavailable { bucket: self.kv.bucket.clone(), source: Box::new(err) }
    }

    async fn info(&self, name: &str) -> Result<Option<ObjectMeta>, crate::error::ObjectError> {
        let (answer, _) = self.kv.ask(DataAsk::ObjectInfo { bucket: self.kv.bucket.clone(), name: name.to_owned() }, &[]).await.map_err(|e| self.failed(e))?;
        Ok(answer.object)
    }

    pub(crate) async fn get(&self, name: &str) -> Result<Option<Bytes>, crate::error::ObjectError> {
        let Some(meta) = self.info(name).await? else { return Ok(None) };
        let mut data = Vec::with_capacity(meta.size);
        let mut after = 0;
        for _ in 0..meta.chunks {
            let ask = DataAsk::ObjectChunk { bucket: self.kv.bucket.clone(), nuid: meta.nuid.clone(), after };
            let (answer, chunk) = self.kv.ask(ask, &[]).await.map_err(|e| self.failed(e))?;
            after = answer.revision.unwrap_or(after + 1);
            data.extend_from_slice(&chunk);
        }
        if data.len() != meta.size {
            return Err(crate::error::ObjectError::Unavailable { bucket: self.kv.bucket.clone(), source: format!("object {name}: read {} bytes of {}", data.len(), meta.size).into() });
        }
        Ok(Some(data.into()))
    }

    pub(crate) async fn exists(&self, name: &str) -> Result<bool, crate::error::ObjectError> {
        Ok(self.info(name).await?.is_some())
    }
}

/// Serves data asks from `asks` (subjects whose last token names the
/// asker), making what `policy` allows through `bus`, until the
/// subscription ends.
pub(crate) async fn serve(bus: Bus, client: async_nats::Client, mut asks: async_nats::Subscriber, policy: DataPolicy) {
    let buckets: Arc<Mutex<HashMap<String, Kv>>> = Arc::default();
    while let Some(message) = asks.next().await {
        let Some(reply) = message.reply.clone() else { continue };
        let (bus, client, policy, buckets) = (bus.clone(), client.clone(), policy.clone(), buckets.clone());
        tokio::spawn(async move {
            let asker = message.subject.as_str().rsplit('.').next().unwrap_or_default().to_owned();
            let reply = reply.to_string();
            if !policy.may_answer(&asker, &reply) {
                tracing::warn!(%asker, %reply, "data ask dropped: its answer would go to a subject the asker may not read");
                return;
            }
            let (answer, value) = match unframe::<DataAsk>(&message.payload) {
                Err(err) => (DataAnswer { failed: Some(Failure::Refused { why: format!("unreadable ask: {err}") }), ..DataAnswer::default() }, Bytes::new()),
                Ok((ask, value)) => match allowed(policy.as_ref(), &asker, &ask).await {
                    Err(why) => {
                        tracing::warn!(%asker, bucket = %ask.bucket(), subject = ask.subject().unwrap_or_default(), "data ask refused: {why}");
                        (DataAnswer { failed: Some(Failure::Refused { why }), ..DataAnswer::default() }, Bytes::new())
                    }
                    Ok(()) => {
                        let id = message.headers.as_ref().and_then(|h| h.get(ASK_ID)).map_or_else(super::message_id, |id| id.to_string());
                        carry_out(&bus, &buckets, ask, value, &id).await
                    }
                },
            };
            if let Err(err) = client.publish(reply, frame(&answer, &value)).await {
                tracing::debug!("could not answer a data ask: {err}");
            }
        });
    }
}

/// How long a refusal is checked again before it is the answer: the
/// policy's view of the state may lag what the asker was told a moment ago
/// (a replica assigned to it, say).
const RECHECK: Duration = Duration::from_secs(2);

/// `policy`'s verdict on `ask`, a refusal checked again every 100 ms for up to [`RECHECK`].
async fn allowed(policy: &dyn DataRules, asker: &str, ask: &DataAsk) -> Result<(), String> {
    let until = tokio::time::Instant::now() + RECHECK;
    loop {
        match policy.allows(asker, ask) {
            Err(_) if tokio::time::Instant::now() < until => tokio::time::sleep(Duration::from_millis(100)).await,
            verdict => return verdict,
        }
    }
}

/// Makes the call `ask` names on its bucket (opened once, then kept); a
/// write under message id `id`, so an ask made twice writes once.
async fn carry_out(bus: &Bus, buckets: &Mutex<HashMap<String, Kv>>, ask: DataAsk, value: Bytes, id: &str) -> (DataAnswer, Bytes) {
    match &ask {
        // No reply subject: JetStream would acknowledge a stored message there.
        DataAsk::Publish { subject } => {
            return match bus.publish(subject, value).await {
                Ok(()) => (DataAnswer::default(), Bytes::new()),
                Err(err) => other(err.to_string()),
            };
        }
        DataAsk::Request { subject, timeout_ms } => {
            let timeout = Duration::from_millis(*timeout_ms).min(MAX_REQUEST);
            return match bus.request(subject, value, timeout).await {
                Ok(reply) => (DataAnswer { subject: Some(reply.subject), ..DataAnswer::default() }, reply.payload),
                Err(RequestError::NoResponders { .. }) => (DataAnswer { failed: Some(Failure::NoResponders), ..DataAnswer::default() }, Bytes::new()),
                Err(RequestError::TimedOut { .. }) => (DataAnswer { failed: Some(Failure::TimedOut), ..DataAnswer::default() }, Bytes::new()),
                Err(err) => other(err.to_string()),
            };
        }
        _ => {}
    }
    let bucket = ask.bucket().to_owned();
    if let DataAsk::ObjectInfo { name, .. } = &ask {
        return object_info(bus, &bucket, name).await;
    }
    if let DataAsk::ObjectChunk { nuid, after, .. } = &ask {
        return object_chunk(bus, &bucket, nuid, *after).await;
    }
    let cached = buckets.lock().ok().and_then(|b| b.get(&bucket).cloned());
    let kv = match cached {
        Some(kv) => kv,
        None => match bus.kv(&bucket).await {
            Ok(kv) => {
                if let Ok(mut b) = buckets.lock() {
                    b.insert(bucket.clone(), kv.clone());
                }
                kv
            }
            Err(err) => return (failure(err), Bytes::new()),
        },
    };
    let written = |result: Result<u64, KvError>| match result {
        Ok(revision) => (DataAnswer { revision: Some(revision), ..DataAnswer::default() }, Bytes::new()),
        Err(err) => (failure(err), Bytes::new()),
    };
    let revision = |result: Result<crate::kv::Written, KvError>| result.map(|w| w.revision);
    match ask {
        DataAsk::Get { key, .. } => match kv.get(&key).await {
            Ok(Some(entry)) => (DataAnswer { revision: Some(entry.revision), found: true, ..DataAnswer::default() }, entry.value),
            Ok(None) => (DataAnswer::default(), Bytes::new()),
            Err(err) => (failure(err), Bytes::new()),
        },
        DataAsk::Put { key, .. } => written(revision(kv.put_once(&key, value, id).await)),
        DataAsk::Create { key, .. } => written(revision(kv.create_once(&key, value, id).await)),
        DataAsk::Update { key, expected, .. } => written(revision(kv.update_once(&key, value, expected, id).await)),
        DataAsk::Delete { key, .. } => written(kv.delete_once(&key, id).await.map(|()| 0)),
        // The new number travels where a write's revision does.
        DataAsk::Increment { key, delta, .. } => written(kv.increment_once(&key, delta, id).await),
        DataAsk::KeysPage { prefix, after, limit, .. } => match kv.keys_page(&prefix, after, limit).await {
            Ok(page) => (DataAnswer { keys: Some(page.keys), next: page.next, ..DataAnswer::default() }, Bytes::new()),
            Err(err) => (failure(err), Bytes::new()),
        },
        DataAsk::ObjectInfo { .. } | DataAsk::ObjectChunk { .. } | DataAsk::Publish { .. } | DataAsk::Request { .. } => {
            (failure(KvError::Unavailable { bucket, source: "not a key-value call".into() }), Bytes::new())
        }
    }
}

/// An answer that failed for `message`.
fn other(message: String) -> (DataAnswer, Bytes) {
    (DataAnswer { failed: Some(Failure::Other { message }), ..DataAnswer::default() }, Bytes::new())
}

/// [`DataAsk::ObjectInfo`]: the object's chunks, or no object.
async fn object_info(bus: &Bus, bucket: &str, name: &str) -> (DataAnswer, Bytes) {
    let Some(jetstream) = bus.nats_jetstream() else { return other("no objects on this bus".into()) };
    let store = match jetstream.get_object_store(bucket).await {
        Ok(store) => store,
        Err(err) => return other(format!("object bucket {bucket}: {err}")),
    };
    match store.info(name).await {
        Ok(info) if !info.deleted => (DataAnswer { object: Some(ObjectMeta { nuid: info.nuid, size: info.size, chunks: info.chunks }), ..DataAnswer::default() }, Bytes::new()),
        Ok(_) => (DataAnswer::default(), Bytes::new()),
        Err(err) if err.kind() == async_nats::jetstream::object_store::InfoErrorKind::NotFound => (DataAnswer::default(), Bytes::new()),
        Err(err) => other(format!("object {name}: {err}")),
    }
}

/// [`DataAsk::ObjectChunk`]: the first chunk of object `nuid` after stream sequence `after`.
async fn object_chunk(bus: &Bus, bucket: &str, nuid: &str, after: u64) -> (DataAnswer, Bytes) {
    let Some(jetstream) = bus.nats_jetstream() else { return other("no objects on this bus".into()) };
    let stream = match jetstream.get_stream_no_info(format!("OBJ_{bucket}")).await {
        Ok(stream) => stream,
        Err(err) => return other(format!("object bucket {bucket}: {err}")),
    };
    match stream.get_first_raw_message_by_subject(format!("$O.{bucket}.C.{nuid}"), after + 1).await {
        Ok(chunk) => (DataAnswer { revision: Some(chunk.sequence), ..DataAnswer::default() }, chunk.payload),
        Err(err) => other(format!("a chunk of {nuid}: {err}")),
    }
}

fn failure(err: KvError) -> DataAnswer {
    let failed = match err {
        KvError::AlreadyExists { .. } => Failure::AlreadyExists,
        KvError::RevisionMismatch { expected, .. } => Failure::RevisionMismatch { expected },
        KvError::BucketFull { max_bytes, .. } => Failure::BucketFull { max_bytes },
        KvError::ValueTooLarge { size, max, .. } => Failure::ValueTooLarge { size, max },
        KvError::Increment { why, .. } => Failure::Increment { why },
        other => Failure::Other { message: other.to_string() },
    };
    DataAnswer { failed: Some(failed), ..DataAnswer::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_carries_its_header_and_any_bytes() {
        let ask = DataAsk::Update { bucket: "wharf-kv-shop".into(), key: "cart.a".into(), expected: 7 };
        let value = [0u8, 1, 2, 255, b'\n'];
        let (back, body): (DataAsk, Bytes) = unframe(&frame(&ask, &value)).expect("reads back");
        assert_eq!((back, &body[..]), (ask, &value[..]));
        assert!(unframe::<DataAsk>(&Bytes::from_static(b"\0\0\0\x09{}")).is_err(), "a header longer than the message");
        assert!(unframe::<DataAsk>(&Bytes::from_static(b"\0")).is_err());
    }
}
