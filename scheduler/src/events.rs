//! Events: what the control plane decided or saw, and why, kept per
//! namespace for `wharf describe`, `wharf events` and the API.
//!
//! The leader's controller records events through a [`Recorder`]; one task
//! writes them to KV bucket `wharf-events`, so a pass never waits on the
//! store. Each namespace is a ring of [`EVENTS_PER_NAMESPACE`] keys
//! (`<ns>.<seq mod N>`): the newest event overwrites the oldest, so the
//! bucket stays bounded whatever happens, on NATS and in-process alike,
//! with nothing but plain KV puts. A new leader continues the numbering
//! from what the bucket holds.
//!
//! Readers read the namespace's slots (a page of keys, then the values);
//! followers watch the namespace's keys.

use bytes::Bytes;
use futures::StreamExt;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use wharf_bus::{Kv, KvError};
use wharf_proto::names::{event_key, events_pattern};
use wharf_proto::observe::{EVENTS_PER_NAMESPACE, Event, MAX_EVENT_MESSAGE};
use wharf_proto::{AssignedReplica, AutoscaleSummary, HostId, ReplicaKey, ServiceId};
use wharf_scheduler_core::Decision;

/// Events queued for the writer; past it, events are dropped (and logged).
const QUEUE: usize = 1024;

/// Dedupe keys remembered by [`Recorder::record_once`]; past it the memory
/// starts again (an old condition may then be reported once more).
const MAX_REMEMBERED: usize = 10_000;

/// What the controller tells: an event without its number and time.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub service: ServiceId,
    pub reason: &'static str,
    pub message: String,
    pub host: Option<HostId>,
    pub revision: Option<u64>,
    pub replica: Option<u32>,
}

impl NewEvent {
    /// An event about `service` as a whole.
    pub fn new(service: &ServiceId, reason: &'static str, message: impl Into<String>) -> NewEvent {
        NewEvent { service: service.clone(), reason, message: message.into(), host: None, revision: None, replica: None }
    }

    /// The same, about one replica (`revision`, `replica`) on `host`.
    pub fn replica(mut self, host: Option<&HostId>, revision: u64, replica: u32) -> NewEvent {
        self.host = host.cloned();
        self.revision = Some(revision);
        self.replica = Some(replica);
        self
    }
}

/// The controller's handle for recording events. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    /// Events to write; `None` asks the writer to read the numbering again.
    queue: mpsc::Sender<Option<NewEvent>>,
    /// What [`Recorder::record_once`] has already recorded. Held only to
    /// look up and insert.
    recorded: Arc<Mutex<HashSet<String>>>,
}

impl Recorder {
    /// Starts the writer task over the events bucket.
    pub fn start(kv: Kv) -> Recorder {
        let (queue, events) = mpsc::channel(QUEUE);
        tokio::spawn(write_events(kv, events));
        Recorder { queue, recorded: Arc::default() }
    }

    /// Queues `event` without waiting; a full queue drops it.
    pub fn record(&self, event: NewEvent) {
        tracing::debug!(service = %event.service, reason = event.reason, "event: {}", event.message);
        if self.queue.try_send(Some(event)).is_err() {
            tracing::warn!("an event was dropped: the event writer is behind");
        }
    }

    /// Makes the writer read each namespace's numbering from the bucket
    /// again (on taking the lead: another leader may have written since).
    pub fn renumber(&self) {
        let _ = self.queue.try_send(None);
    }

    /// Records `event` unless an event with the same `dedupe` key was
    /// recorded before: for conditions seen on every pass (a failure
    /// waiting for its retry, an unplaceable replica).
    pub fn record_once(&self, dedupe: String, event: NewEvent) {
        let fresh = self.recorded.lock().is_ok_and(|mut recorded| {
            if recorded.len() >= MAX_REMEMBERED {
                recorded.clear();
            }
            recorded.insert(dedupe)
        });
        if fresh {
            self.record(event);
        }
    }
}

/// Records what a new assignment of `host` changed: replicas placed there
/// and replicas taken off it.
pub fn assignment_changed(events: &Recorder, host: &HostId, before: &[AssignedReplica], after: &[AssignedReplica]) {
    let keys = |replicas: &[AssignedReplica]| replicas.iter().map(AssignedReplica::key).collect::<BTreeSet<ReplicaKey>>();
    let (before, after) = (keys(before), keys(after));
    for key in after.difference(&before) {
        let message = format!("replica {} of revision {} placed on host {host}", key.replica, key.revision);
        events.record(NewEvent::new(&key.service, "Placed", message).replica(Some(host), key.revision, key.replica));
    }
    for key in before.difference(&after) {
        let message = format!("replica {} of revision {} taken off host {host}", key.replica, key.revision);
        events.record(NewEvent::new(&key.service, "Stopped", message).replica(Some(host), key.revision, key.replica));
    }
}

/// Records the autoscaler changing a service's replica count.
pub fn scaled(events: &Recorder, service: &ServiceId, before: Option<&AutoscaleSummary>, now: Option<&Decision>) {
    if let (Some(before), Some(now)) = (before, now)
        && before.replicas != now.replicas
    {
        events.record(NewEvent::new(service, "Scaled", format!("scaled {} → {} by the autoscaler: {}", before.replicas, now.replicas, now.reason)));
    }
}

/// The writer: numbers each namespace's events and puts them in its ring.
async fn write_events(kv: Kv, mut events: mpsc::Receiver<Option<NewEvent>>) {
    let mut next_seq: HashMap<String, u64> = HashMap::new();
    while let Some(new) = events.recv().await {
        let Some(new) = new else {
            next_seq.clear();
            continue;
        };
        let namespace = new.service.namespace.clone();
        let seq = match next_seq.get(&namespace) {
            Some(seq) => *seq,
            None => match read(&kv, &namespace).await {
                Ok(kept) => kept.last().map_or(1, |e| e.seq + 1),
                Err(e) => {
                    tracing::warn!(namespace, "cannot read the events bucket; numbering events from the clock: {e}");
                    crate::store::now_ms()
                }
            },
        };
        next_seq.insert(namespace.clone(), seq + 1);
        let mut message = new.message;
        if message.len() > MAX_EVENT_MESSAGE {
            let mut cut = MAX_EVENT_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let event = Event {
            seq,
            time_ms: crate::store::now_ms(),
            service: new.service,
            reason: new.reason.to_string(),
            message,
            host: new.host,
            revision: new.revision,
            replica: new.replica,
        };
        let Ok(value) = serde_json::to_vec(&event) else { continue };
        if let Err(e) = kv.put(&event_key(&namespace, seq), Bytes::from(value)).await {
            tracing::warn!(namespace, "cannot record an event: {e}");
        }
    }
}

/// The events `namespace` keeps, oldest first.
pub async fn read(kv: &Kv, namespace: &str) -> Result<Vec<Event>, KvError> {
    let page = kv.keys_page(&format!("{namespace}."), 0, usize::try_from(EVENTS_PER_NAMESPACE).unwrap_or(usize::MAX)).await?;
    let values = futures::stream::iter(page.keys).map(|key| async move { kv.get(&key).await }).buffer_unordered(32).collect::<Vec<_>>().await;
    let mut events = Vec::with_capacity(values.len());
    for value in values {
        if let Some(entry) = value?
            && let Ok(event) = serde_json::from_slice::<Event>(&entry.value)
        {
            events.push(event);
        }
    }
    events.sort_by_key(|e| e.seq);
    Ok(events)
}

/// New events of `namespace` as they are recorded, after `after` (a seq).
/// The watch replays the ring first; what is not newer is skipped.
pub async fn follow(kv: &Kv, namespace: &str, after: u64) -> Result<impl futures::Stream<Item = Event> + Send + 'static, KvError> {
    let watch = kv.watch(&events_pattern(namespace)).await?;
    let mut last = after;
    Ok(watch.filter_map(move |change| {
        let event = change.value.and_then(|v| serde_json::from_slice::<Event>(&v).ok()).filter(|e| e.seq > last);
        if let Some(event) = &event {
            last = event.seq;
        }
        futures::future::ready(event)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use wharf_bus::{Bus, LocalStore};

    async fn bucket() -> Kv {
        let bus = Bus::local(LocalStore::in_memory().expect("an in-memory store"));
        bus.kv(wharf_proto::names::EVENTS_BUCKET).await.expect("the events bucket")
    }

    fn service(id: &str) -> ServiceId {
        id.parse().expect("a service id")
    }

    /// Waits until `namespace` keeps an event numbered `seq` (the writer is a task of its own).
    async fn until_recorded(kv: &Kv, namespace: &str, seq: u64) -> Vec<Event> {
        for _ in 0..500 {
            let events = read(kv, namespace).await.expect("readable");
            if events.last().is_some_and(|e| e.seq >= seq) {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("event {seq} of {namespace} was never recorded");
    }

    #[tokio::test]
    async fn each_namespace_keeps_its_newest_events_in_order_and_a_new_leader_numbers_on() {
        let kv = bucket().await;
        let events = Recorder::start(kv.clone());
        let total = EVENTS_PER_NAMESPACE + 10;
        for n in 1..=total {
            events.record(NewEvent::new(&service("shop/cart"), "Placed", format!("event {n}")).replica(Some(&HostId::new("h-1").expect("label")), 1, 0));
        }
        events.record(NewEvent::new(&service("other/web"), "Scaled", "x".repeat(MAX_EVENT_MESSAGE * 2)));
        let kept = until_recorded(&kv, "shop", total).await;
        assert_eq!(kept.len() as u64, EVENTS_PER_NAMESPACE, "bounded: the oldest were overwritten");
        assert_eq!((kept[0].seq, kept[0].message.as_str()), (11, "event 11"));
        assert!(kept.windows(2).all(|w| w[0].seq + 1 == w[1].seq), "oldest first, none missing");
        assert_eq!((kept[0].host.as_ref().map(HostId::as_str), kept[0].revision, kept[0].replica), (Some("h-1"), Some(1), Some(0)));
        let other = until_recorded(&kv, "other", 1).await;
        assert_eq!(other.len(), 1, "namespaces are apart: {other:?}");
        assert!(other[0].message.len() <= MAX_EVENT_MESSAGE + '…'.len_utf8() && other[0].message.ends_with('…'));

        // Another leader (a recorder of its own over the same bucket) continues the numbering.
        let next_leader = Recorder::start(kv.clone());
        next_leader.record(NewEvent::new(&service("shop/cart"), "Moving", "after a takeover"));
        let kept = until_recorded(&kv, "shop", total + 1).await;
        assert_eq!(kept.last().map(|e| (e.seq, e.message.as_str())), Some((total + 1, "after a takeover")));
        assert_eq!(kept.len() as u64, EVENTS_PER_NAMESPACE);
    }

    #[tokio::test]
    async fn a_condition_seen_every_pass_is_recorded_once_and_followers_see_only_newer_events() {
        let kv = bucket().await;
        let events = Recorder::start(kv.clone());
        for _ in 0..5 {
            events.record_once("failed/shop/cart/0".into(), NewEvent::new(&service("shop/cart"), "Failed", "it failed"));
        }
        until_recorded(&kv, "shop", 1).await;
        let mut follow = Box::pin(follow(&kv, "shop", 1).await.expect("a watch"));
        events.record(NewEvent::new(&service("shop/cart"), "Retrying", "again"));
        let next = tokio::time::timeout(Duration::from_secs(5), follow.next()).await.expect("in time").expect("an event");
        assert_eq!((next.seq, next.reason.as_str()), (2, "Retrying"), "the failure was recorded once, and the follower skips what it had");
    }
}
