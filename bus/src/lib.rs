//! Wharf's one port to messaging and state: publish/subscribe, queue groups,
//! request/reply, KV buckets with compare-and-set and watches, and an object store.
//!
//! There are two implementations behind one handle, [`Bus`]:
//!
//! - **NATS** ([`Bus::connect_nats`]): core NATS for messages, JetStream KV
//!   for buckets, JetStream Object Store for objects. This is how Wharf
//!   spreads over many machines; NATS is the distributed engine. Over a NATS
//!   cluster the bus knows every member, reconnects to another when one goes,
//!   keeps each bucket on up to three servers, and hears from the system
//!   account when another client disconnects.
//! - **In-process** ([`Bus::local`]): messages are routed inside the process,
//!   and state lives in an embedded [redb](https://docs.rs/redb) database
//!   ([`LocalStore`]), in a file that survives `kill -9` or in memory. This is
//!   single-node `wharf up`, and fast tests.
//!
//! Both behave the same, and `tests/conformance.rs` holds them to it with one
//! suite run against each: the same subject and key rules (checked in this
//! crate before either implementation is called), the same wildcard matching,
//! queue groups that hand each message to one member, `NoResponders` at once
//! when nobody listens, a 1 MiB payload limit, KV revisions that increase per
//! bucket (the JetStream stream sequence, or a counter kept in redb), deletes
//! that take a revision of their own, and watches that first replay the
//! current values and then follow every change (over NATS, also across a
//! server restart or the loss of a cluster node), and buckets with a size
//! limit that refuse a write past it ([`BucketOptions`]).
//!
//! `Bus` holds a private enum of the two implementations rather than an
//! `Arc<dyn Trait>`: the set is closed (two, both in this crate), an enum needs
//! no boxed futures or `async-trait` for async methods, and each method's
//! `match` shows both implementations side by side. Each variant is a cheap
//! handle over shared state, so `Bus` is cheap to clone and can be handed to
//! every task. [`Kv`], [`Objects`], [`Subscription`] and [`KvWatch`] follow
//! the same pattern.
//!
//! # Architecture Invariant
//!
//! This crate knows nothing of Wharf's domain: subjects, keys and bucket names
//! are strings and payloads are bytes. Which names exist is `proto`'s business.

mod buckets;
mod disconnects;
mod error;
mod kv;
mod local;
mod nats;
mod objects;
mod stream;
mod subject;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::watch;

pub use buckets::{BucketOptions, StorageLimits};
pub use disconnects::{ClientDisconnects, ClientGone, DisconnectReason};
pub use error::{
    BackendError, BucketSettingsError, ConnectError, DisconnectsError, KvError, NameError,
    ObjectError, OpenStoreError, PublishError, RequestError, SubscribeError, TlsFailure, TlsFile,
};
pub use kv::{Entry, KeyPage, Kv, KvEvent, KvWatch};
pub use local::LocalStore;
pub use nats::{ClientCertificate, ConsumerAsk, ConsumerPolicy, ConsumerRules, DataAsk, DataPolicy, DataRules, NatsAuth, NatsOptions, NatsTls};
pub use objects::Objects;
pub use stream::{Delivered, StreamConsumerConfig, StreamError, StreamMessages};

/// A handle to the bus; clone it freely, all clones share one connection or one in-process router and store.
#[derive(Clone)]
pub struct Bus {
    backend: Backend,
    /// The limits of buckets [`Bus::kv`] and [`Bus::objects`] create.
    limits: StorageLimits,
}

/// The NATS side sits behind an `Arc` because async-nats' client and
/// JetStream context are several hundred bytes to copy; the local side is an
/// `Arc` handle already.
#[derive(Clone)]
enum Backend {
    Nats(Arc<nats::NatsBus>),
    Local(local::LocalBus),
}

/// A message received from a subscription, or the reply to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The subject it was published to (not the pattern subscribed to).
    pub subject: String,
    pub payload: Bytes,
    /// Where the sender waits for a reply, if it was sent with [`Bus::request`]; answer with [`Bus::respond`].
    pub reply: Option<String>,
}

/// Whether the bus can currently reach its server. The in-process bus is always connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    Connected,
    /// The connection to NATS is lost; the client keeps reconnecting, without limit.
    Disconnected,
}

impl Bus {
    /// Connects to the NATS server at `urls`, e.g. `nats://127.0.0.1:4222`,
    /// or to a cluster: several URLs separated by commas.
    ///
    /// Fails at once, with an error naming the URL, if nothing answers at any
    /// of them: only after this first connection succeeds does the client
    /// reconnect by itself, forever, whenever the connection drops, to any
    /// member of the cluster (those given, and those the servers advertise).
    /// Also refuses servers older than 2.10 and servers without JetStream,
    /// and, with [`NatsOptions::system_auth`], credentials that do not reach
    /// the system account.
    pub async fn connect_nats(urls: &str, options: NatsOptions) -> Result<Bus, ConnectError> {
        let bus = nats::NatsBus::connect(urls, options).await?;
        Ok(Bus {
            backend: Backend::Nats(Arc::new(bus)),
            limits: StorageLimits::default(),
        })
    }

    /// An in-process bus keeping its state in `store`.
    ///
    /// Messages reach only subscribers of this `Bus` and its clones; KV
    /// watches see changes made through any bus over the same store.
    pub fn local(store: LocalStore) -> Bus {
        Bus {
            backend: Backend::Local(local::LocalBus::new(store)),
            limits: StorageLimits::default(),
        }
    }

    /// This bus, creating buckets with `limits` instead of the defaults; clones made afterwards share them.
    pub fn with_storage_limits(mut self, limits: StorageLimits) -> Bus {
        self.limits = limits;
        self
    }

    /// The limits buckets are created with; [`StorageLimits::data`] is for the caller's data buckets.
    pub fn storage_limits(&self) -> StorageLimits {
        self.limits
    }

    /// Publishes `payload` to `subject`, for every plain subscriber and one member of each queue group.
    ///
    /// Nobody listening is not an error. Delivery is at most once, as in core
    /// NATS: over NATS this returns once the client has queued the message,
    /// which is lost if the connection drops before it is sent.
    pub async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), PublishError> {
        subject::check_subject(subject).map_err(PublishError::InvalidSubject)?;
        if let Some((size, max)) = self.oversize(&payload) {
            return Err(PublishError::PayloadTooLarge {
                subject: subject.to_owned(),
                size,
                max,
            });
        }
        match &self.backend {
            Backend::Nats(bus) => bus.publish(subject, payload).await,
            Backend::Local(bus) => {
                bus.publish(subject, None, payload);
                Ok(())
            }
        }
    }

    /// Receives every message published to subjects matching `subject`,
    /// which may contain the wildcards `*` (one token) and, last, `>` (one or more tokens).
    ///
    /// Dropping the subscription unsubscribes. Over NATS the server learns of
    /// the subscription asynchronously: messages published on this same `Bus`
    /// after this returns are delivered, from other connections a moment later.
    pub async fn subscribe(&self, subject: &str) -> Result<Subscription, SubscribeError> {
        subject::check_pattern(subject).map_err(SubscribeError::InvalidName)?;
        match &self.backend {
            Backend::Nats(bus) => bus.subscribe(subject, None).await,
            Backend::Local(bus) => Ok(bus.subscribe(subject, None)),
        }
    }

    /// Like [`Bus::subscribe`], as a member of queue group `group`: each
    /// message goes to one member of the group, picked at random, while plain
    /// subscribers still get every message.
    pub async fn queue_subscribe(
        &self,
        subject: &str,
        group: &str,
    ) -> Result<Subscription, SubscribeError> {
        subject::check_pattern(subject).map_err(SubscribeError::InvalidName)?;
        subject::check_queue_group(group).map_err(SubscribeError::InvalidName)?;
        match &self.backend {
            Backend::Nats(bus) => bus.subscribe(subject, Some(group)).await,
            Backend::Local(bus) => Ok(bus.subscribe(subject, Some(group))),
        }
    }

    /// Sends `payload` to `subject` and waits up to `timeout` for the first reply.
    ///
    /// Fails with [`RequestError::NoResponders`] at once if nobody subscribes
    /// to `subject`, and with [`RequestError::TimedOut`] if subscribers exist
    /// but none replied in time.
    pub async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, RequestError> {
        subject::check_subject(subject).map_err(RequestError::InvalidSubject)?;
        if let Some((size, max)) = self.oversize(&payload) {
            return Err(RequestError::PayloadTooLarge {
                subject: subject.to_owned(),
                size,
                max,
            });
        }
        match &self.backend {
            Backend::Nats(bus) => bus.request(subject, payload, timeout).await,
            Backend::Local(bus) => bus.request(subject, payload, timeout).await,
        }
    }

    /// Replies to `request`, a message sent with [`Bus::request`].
    pub async fn respond(&self, request: &Message, payload: Bytes) -> Result<(), PublishError> {
        match &request.reply {
            Some(reply) => self.publish(reply, payload).await,
            None => Err(PublishError::NoReplySubject {
                subject: request.subject.clone(),
            }),
        }
    }

    /// A fresh subject for replies to this connection, under its inbox
    /// prefix ([`NatsOptions::inbox_prefix`], `_INBOX` by default): the
    /// subjects a connection limited to its own inboxes may subscribe to.
    /// Unique for the connection's life; subscribe to it with
    /// [`Bus::subscribe`] and hand it to whoever should answer there.
    pub fn new_inbox(&self) -> String {
        match &self.backend {
            Backend::Nats(bus) => bus.new_inbox(),
            Backend::Local(bus) => bus.new_inbox(),
        }
    }

    /// The largest payload a message may carry: the server's `max_payload`
    /// over NATS (1 MiB by default), and the same 1 MiB in-process so both behave alike.
    pub fn max_payload(&self) -> usize {
        match &self.backend {
            Backend::Nats(bus) => bus.max_payload(),
            Backend::Local(_) => local::MAX_PAYLOAD,
        }
    }

    /// Whether the bus is connected now.
    pub fn is_connected(&self) -> bool {
        *self.connection_changes().borrow() == ConnectionState::Connected
    }

    /// The connection state, updated as it changes; `changed().await` waits for the next change.
    pub fn connection_changes(&self) -> watch::Receiver<ConnectionState> {
        match &self.backend {
            Backend::Nats(bus) => bus.connection_changes(),
            Backend::Local(bus) => bus.connection_changes(),
        }
    }

    /// Opens KV bucket `bucket` (letters, digits, `-`, `_`) as it is,
    /// creating it if missing as a bucket of state
    /// ([`StorageLimits::state`]).
    ///
    /// For processes that use buckets others own: an existing bucket's
    /// settings are left alone. The owner opens with [`Bus::kv_with`].
    pub async fn kv(&self, bucket: &str) -> Result<Kv, KvError> {
        self.open_kv(bucket, self.limits.state, false, false).await
    }

    /// Opens KV bucket `bucket` with `options`: creates it so if missing, and
    /// updates an existing bucket whose size limit or copies differ (logging
    /// the change, or a warning saying why the server refused it; the bucket
    /// is then used as it is).
    ///
    /// For the process that owns the bucket. Keep a separate bucket for each
    /// party that may fill one (e.g. each tenant's data apart from the
    /// control plane's state), each with its own limit.
    pub async fn kv_with(&self, bucket: &str, options: BucketOptions) -> Result<Kv, KvError> {
        self.open_kv(bucket, options, true, false).await
    }

    /// Opens bucket `bucket` as [`Bus::kv`] does, but with this connection's
    /// own JetStream requests even when it has a data broker: for the one
    /// bucket a process fully trusted with it reads itself (a host given the
    /// control plane's secret key reads the secrets bucket). Under
    /// permissions that keep the process off JetStream, the calls are
    /// refused.
    pub async fn kv_itself(&self, bucket: &str) -> Result<Kv, KvError> {
        self.open_kv(bucket, self.limits.state, false, true).await
    }

    async fn open_kv(
        &self,
        bucket: &str,
        options: BucketOptions,
        update: bool,
        itself: bool,
    ) -> Result<Kv, KvError> {
        subject::check_bucket(bucket).map_err(KvError::InvalidName)?;
        // Over NATS a conditional write carries its expected revision in a
        // header, and headers count against max_payload; leaving the same room
        // in both implementations keeps their limits identical.
        let max_value = self.max_payload().saturating_sub(kv::HEADER_ROOM);
        match &self.backend {
            // Over a data broker ([`NatsOptions::data_broker`]) the broker
            // makes every call: the bucket is neither created nor changed.
            Backend::Nats(bus) if !itself && let Some(kv) = bus.brokered_kv(bucket) => Ok(Kv::brokered(kv, max_value)),
            Backend::Nats(bus) => Ok(Kv::nats(bus.kv(bucket, options, update).await?, max_value)),
            Backend::Local(bus) => Ok(Kv::local(
                bus.store().open_kv(bucket, options, update).await?,
                max_value,
            )),
        }
    }

    /// Opens object bucket `bucket` (letters, digits, `-`, `_`) as it is,
    /// creating it if missing with [`StorageLimits::objects`].
    pub async fn objects(&self, bucket: &str) -> Result<Objects, ObjectError> {
        self.open_objects(bucket, self.limits.objects, false).await
    }

    /// Opens object bucket `bucket` with `options`, creating or updating it as [`Bus::kv_with`] does.
    pub async fn objects_with(
        &self,
        bucket: &str,
        options: BucketOptions,
    ) -> Result<Objects, ObjectError> {
        self.open_objects(bucket, options, true).await
    }

    async fn open_objects(
        &self,
        bucket: &str,
        options: BucketOptions,
        update: bool,
    ) -> Result<Objects, ObjectError> {
        subject::check_bucket(bucket).map_err(ObjectError::InvalidName)?;
        match &self.backend {
            Backend::Nats(bus) if let Some(kv) = bus.brokered_kv(bucket) => Ok(Objects::brokered(nats::BrokeredObjects::new(kv))),
            Backend::Nats(bus) => Ok(Objects::nats(bus.objects(bucket, options, update).await?)),
            Backend::Local(bus) => Ok(Objects::local(
                bus.store().open_objects(bucket, options, update).await?,
            )),
        }
    }

    /// The JetStream context under a NATS bus, for the brokers.
    pub(crate) fn nats_jetstream(&self) -> Option<&async_nats::jetstream::Context> {
        match &self.backend {
            Backend::Nats(bus) => Some(bus.jetstream()),
            Backend::Local(_) => None,
        }
    }

    /// Reads and writes buckets for processes that may not touch them
    /// themselves (see [`NatsOptions::data_broker`]): answers their asks on
    /// `subject` (whose last token, `*`, is the asker's name) in queue group
    /// `group`, in a task of its own, making the calls `policy` allows
    /// through this bus. The in-process bus has no other processes: nothing
    /// is served.
    pub async fn serve_data_broker(&self, subject: &str, group: &str, policy: DataPolicy) -> Result<(), SubscribeError> {
        match &self.backend {
            Backend::Nats(nats) => {
                let asks = nats.client().queue_subscribe(subject.to_owned(), group.to_owned()).await.map_err(|err| SubscribeError::Unavailable { subject: subject.to_owned(), source: Box::new(err) })?;
                tokio::spawn(nats::serve_data(self.clone(), nats.client().clone(), asks, policy));
                Ok(())
            }
            Backend::Local(_) => Ok(()),
        }
    }

    /// Makes JetStream consumers for processes that may not make their own
    /// (see [`NatsOptions::consumer_broker`]): answers their asks on
    /// `subject` (whose last token, `*`, is the asker's name, which its NATS
    /// permissions must tie to its identity), in queue group `group` so
    /// that several brokers share the work, in a task of its own. `policy`
    /// decides each ask; what it allows is made with this bus's rights.
    /// The in-process bus has no consumers to make: nothing is served.
    pub async fn serve_consumer_broker(&self, subject: &str, group: &str, policy: ConsumerPolicy) -> Result<(), SubscribeError> {
        match &self.backend {
            Backend::Nats(bus) => bus.serve_consumer_broker(subject, group, policy).await,
            Backend::Local(_) => Ok(()),
        }
    }

    /// The clients whose connections to the bus close from now on, as the
    /// server reports them: at once, rather than after missed heartbeats.
    ///
    /// Over NATS this needs [`NatsOptions::system_auth`]; without it the
    /// answer is [`DisconnectsError::NotConfigured`], and callers rely on
    /// heartbeats alone. The in-process bus has no other clients, so its
    /// stream never yields (see [`ClientDisconnects`]).
    pub async fn client_disconnects(&self) -> Result<ClientDisconnects, DisconnectsError> {
        match &self.backend {
            Backend::Nats(bus) => Ok(ClientDisconnects::nats(bus.client_disconnects().await?)),
            Backend::Local(_) => Ok(ClientDisconnects::never()),
        }
    }

    /// `Some((size, max))` if `payload` is over [`Bus::max_payload`].
    fn oversize(&self, payload: &Bytes) -> Option<(usize, usize)> {
        let max = self.max_payload();
        (payload.len() > max).then_some((payload.len(), max))
    }
}

/// The messages of one subscription, as a [`Stream`]; unsubscribes when dropped.
///
/// If the subscriber falls far behind (64 Ki messages), further messages are
/// dropped rather than buffered without bound, as NATS does with slow consumers.
pub struct Subscription {
    inner: SubscriptionInner,
}

enum SubscriptionInner {
    Nats(async_nats::Subscriber),
    Local(local::LocalSubscription),
}

impl Subscription {
    /// Unsubscribes while keeping what was already sent to this subscriber:
    /// the stream yields the messages in flight, then ends. A queue group
    /// member that stops this way answers every request NATS handed it.
    pub async fn drain(&mut self) {
        match &mut self.inner {
            SubscriptionInner::Nats(subscriber) => {
                if let Err(e) = subscriber.drain().await {
                    // The connection is gone: nothing more will arrive anyway.
                    tracing::debug!("cannot drain a subscription: {e}");
                }
            }
            SubscriptionInner::Local(subscription) => subscription.drain(),
        }
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        match &mut self.inner {
            SubscriptionInner::Nats(subscriber) => Pin::new(subscriber)
                .poll_next(cx)
                .map(|message| message.map(nats::message)),
            SubscriptionInner::Local(subscription) => Pin::new(subscription).poll_next(cx),
        }
    }
}
