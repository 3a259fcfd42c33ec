//! The in-process implementation: a message router inside this process, and state in a [`LocalStore`].
//!
//! The router imitates core NATS where callers could tell the difference:
//! wildcard matching by the same rules, one random member per queue group,
//! plain subscribers all served, a bounded buffer per subscription that drops
//! messages for a subscriber that falls too far behind, and a request that
//! fails at once when no subscription matches its subject.

mod store;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::watch;

pub use store::LocalStore;
pub(crate) use store::{LocalKv, LocalObjects, LocalWatch};

use crate::error::RequestError;
use crate::{ConnectionState, Message, Subscription, SubscriptionInner, subject};

/// NATS' default `max_payload`, kept in-process so that single-node mode refuses what a default NATS server would.
pub(crate) const MAX_PAYLOAD: usize = 1024 * 1024;

/// Messages a subscription buffers before further ones are dropped: async-nats' default.
const SUBSCRIPTION_CAPACITY: usize = 64 * 1024;

#[derive(Clone)]
pub(crate) struct LocalBus {
    store: LocalStore,
    router: Arc<Router>,
    /// Always `Connected`. Kept alive so that `changed()` on a receiver waits
    /// forever, as it would on a NATS bus that stays connected, instead of
    /// failing at once because the sender is gone.
    connection: Arc<watch::Sender<ConnectionState>>,
}

impl LocalBus {
    pub(crate) fn new(store: LocalStore) -> LocalBus {
        LocalBus {
            store,
            router: Arc::new(Router {
                subscriptions: Mutex::default(),
            }),
            connection: Arc::new(watch::Sender::new(ConnectionState::Connected)),
        }
    }

    pub(crate) fn store(&self) -> &LocalStore {
        &self.store
    }

    pub(crate) fn connection_changes(&self) -> watch::Receiver<ConnectionState> {
        self.connection.subscribe()
    }

    pub(crate) fn subscribe(&self, pattern: &str, group: Option<&str>) -> Subscription {
        let (sender, receiver) = mpsc::channel(SUBSCRIPTION_CAPACITY);
        let id = self.router.add(Subscriber {
            pattern: pattern.to_owned(),
            group: group.map(str::to_owned),
            sender,
        });
        Subscription {
            inner: SubscriptionInner::Local(LocalSubscription {
                receiver,
                registration: Some(Registration {
                    router: Arc::downgrade(&self.router),
                    id,
                }),
            }),
        }
    }

    /// Delivers a message; returns how many subscriptions matched its subject.
    pub(crate) fn publish(&self, subject: &str, reply: Option<String>, payload: Bytes) -> usize {
        self.router.deliver(&Message {
            subject: subject.to_owned(),
            payload,
            reply,
        })
    }

    /// A subject no other inbox of this process has: inboxes look like
    /// NATS' (`_INBOX.<unique>`), so a subscriber to `>` sees the same
    /// traffic in both implementations.
    pub(crate) fn new_inbox(&self) -> String {
        static NEXT_INBOX: AtomicU64 = AtomicU64::new(0);
        format!("_INBOX.{}", NEXT_INBOX.fetch_add(1, Ordering::Relaxed))
    }

    pub(crate) async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, RequestError> {
        let inbox = self.new_inbox();
        let mut replies = self.subscribe(&inbox, None);
        if self.publish(subject, Some(inbox), payload) == 0 {
            return Err(RequestError::NoResponders {
                subject: subject.to_owned(),
            });
        }
        match tokio::time::timeout(timeout, replies.next()).await {
            Ok(Some(reply)) => Ok(reply),
            // `None` cannot happen: this bus keeps the router, and with it the
            // inbox subscription, alive. Waiting out the timeout is all a
            // requester could have seen.
            Ok(None) | Err(_) => Err(RequestError::TimedOut {
                subject: subject.to_owned(),
                timeout,
            }),
        }
    }
}

/// Who subscribes to what.
struct Router {
    /// Locked briefly and never across an await: once per publish, subscribe and unsubscribe.
    subscriptions: Mutex<Subscriptions>,
}

#[derive(Default)]
struct Subscriptions {
    next_id: u64,
    by_id: BTreeMap<u64, Subscriber>,
}

struct Subscriber {
    pattern: String,
    group: Option<String>,
    sender: mpsc::Sender<Message>,
}

impl Router {
    fn lock(&self) -> MutexGuard<'_, Subscriptions> {
        // Nothing panics while holding the lock, so a poisoned map is still consistent.
        self.subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn add(&self, subscriber: Subscriber) -> u64 {
        let mut subscriptions = self.lock();
        let id = subscriptions.next_id;
        subscriptions.next_id += 1;
        subscriptions.by_id.insert(id, subscriber);
        id
    }

    /// Sends `message` to every matching plain subscriber and one matching
    /// member of each queue group; returns how many subscriptions matched.
    ///
    /// Every subscription is checked against the subject: fine for the few
    /// hundred subscriptions of one node, and simpler than a subject trie.
    fn deliver(&self, message: &Message) -> usize {
        let subscriptions = self.lock();
        let mut matched = 0;
        let mut groups: BTreeMap<&str, Vec<&Subscriber>> = BTreeMap::new();
        for subscriber in subscriptions.by_id.values() {
            if !subject::matches(&subscriber.pattern, &message.subject) {
                continue;
            }
            matched += 1;
            match &subscriber.group {
                None => subscriber.send(message.clone()),
                Some(group) => groups.entry(group).or_default().push(subscriber),
            }
        }
        for members in groups.values() {
            // NATS, too, picks a member of the group at random.
            members[rand::random_range(0..members.len())].send(message.clone());
        }
        matched
    }
}

impl Subscriber {
    fn send(&self, message: Message) {
        match self.sender.try_send(message) {
            Ok(()) => {}
            Err(TrySendError::Full(message)) => tracing::warn!(
                subject = %message.subject,
                pattern = %self.pattern,
                "subscriber is {SUBSCRIPTION_CAPACITY} messages behind; message dropped"
            ),
            // The subscription is being dropped and its registration with it.
            Err(TrySendError::Closed(_)) => {}
        }
    }
}

/// A subscription's receiving end.
pub(crate) struct LocalSubscription {
    receiver: mpsc::Receiver<Message>,
    /// Unsubscribes when the subscription is dropped (or drained).
    registration: Option<Registration>,
}

impl LocalSubscription {
    /// Unsubscribes; messages already delivered stay readable, then the stream ends.
    pub(crate) fn drain(&mut self) {
        self.registration = None;
    }
}

impl Stream for LocalSubscription {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.receiver.poll_recv(cx)
    }
}

/// Removes a subscription from its router when dropped, so a request right
/// after finds no responders, as it would once NATS processed the unsubscribe.
struct Registration {
    /// Weak, so that subscriptions outliving the bus do not keep its router alive.
    router: Weak<Router>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(router) = self.router.upgrade() {
            router.lock().by_id.remove(&self.id);
        }
    }
}
