//! The control plane's intake of components' messages for triggers.
//!
//! Hosts take in no message themselves: a host's NATS identity may not
//! subscribe to `wharf.msg.>`, which would show it every tenant's messages.
//! Every scheduler runs an intake for every triggered service instead: a
//! core trigger is a queue subscription to its subject (one group over all
//! schedulers, so one of them takes each message), a stream trigger a pull
//! from the service's durable consumer (shared by all schedulers). Each
//! message goes to one host, on that host's own subject
//! ([`intake_subject`], request/reply, answered with how the handler
//! ended): a host that reports a ready replica of the service (taking
//! turns), else any ready host, which wakes a service at zero. A host that
//! answers `not_here` (draining, or not knowing the service yet), or that
//! nobody answers for, is passed over for the next; with no host to take
//! it, a message waits for one up to [`HOST_ALLOWANCE`].
//!
//! A stream's message is acknowledged after its handler succeeded; a
//! failure asks for it again after a short delay, and its last allowed
//! delivery goes to the dead-letter subject instead. While a host has it,
//! the scheduler tells the stream every few seconds that it is in progress,
//! so the consumer's ack wait can be short: the messages a killed
//! scheduler held are delivered again within [`ACK_WAIT`]. A core message is
//! delivered at most once.
//!
//! In flight per service: twice its concurrency for each ready host (at
//! least one host's worth): what the hosts' replicas run at once, and the
//! next batch on its way.

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use wharf_bus::{Bus, RequestError, StreamConsumerConfig};
use wharf_proto::trigger::{Delivery, DeliveryResult, Trigger, consumer_name, delivery_queue_group, encode_batch, intake_subject, message_subject, relative_subject, stream_name};
use wharf_proto::{HostId, ServiceId, ServiceSpec};

use crate::hosts::HostTable;
use crate::informer::Informer;

/// How long a failed stream message waits before it is delivered again.
const REDELIVERY_DELAY: Duration = Duration::from_secs(1);

/// How often intakes that ended (a subscription failed or closed) are started again.
const RESTART_EVERY: Duration = Duration::from_secs(5);

/// How long a stream intake waits before opening its consumer again after a failure.
const REOPEN_DELAY: Duration = Duration::from_secs(1);

/// Messages of one stream delivered and not yet acknowledged, over all schedulers.
const MAX_ACK_PENDING: u32 = 1024;

/// How long a stream's message may go without word from the scheduler that
/// holds it before another gets it: short, since a live holder says every
/// [`PROGRESS_EVERY`] that it is still at it (however long a host takes),
/// so a killed scheduler's messages come back within this.
const ACK_WAIT: Duration = Duration::from_secs(10);

/// How often a held stream message's ack wait is started again.
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

/// Hosts one message is offered to before the intake gives up on it.
const HOSTS_TRIED: usize = 3;

/// What a host may take over a message beyond the handler's deadline
/// (waiting for a replica of a service at zero, hosts' `--activation-timeout`,
/// 30 s by default, and for a free instance); also how long a message with
/// no host to take it waits for one.
const HOST_ALLOWANCE: Duration = Duration::from_secs(40);

/// Messages handed to one host together, at most (and at most the service's concurrency).
const MAX_BATCH: usize = 32;

/// How often a message with no host to take it looks again when the hosts did not change.
const NO_HOST_POLL: Duration = Duration::from_millis(500);

/// A task that stops when its handle is dropped.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One triggered service's intakes: the spec they follow, one task per trigger.
struct Intakes {
    spec: Arc<ServiceSpec>,
    _tasks: Vec<Task>,
}

/// Whether intakes started from `old` still fit `new`: the same triggers
/// and limits (which they wait and bound by).
fn same_intakes(old: &ServiceSpec, new: &ServiceSpec) -> bool {
    old.triggers == new.triggers && old.limits == new.limits
}

/// Runs the intakes of every triggered service the informer holds, following
/// its changes, until `stop` turns true.
pub(crate) fn start(bus: Bus, informer: Informer, hosts: HostTable, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut intakes: BTreeMap<ServiceId, Intakes> = BTreeMap::new();
        let mut changes = informer.changes();
        loop {
            // Only new or changed specs are copied.
            let (keep, new): (BTreeSet<ServiceId>, Vec<Arc<ServiceSpec>>) = informer.read(|state| {
                let mut keep = BTreeSet::new();
                let mut new = Vec::new();
                for stored in state.services.values().filter(|s| !s.spec.triggers.is_empty()) {
                    let id = stored.spec.id();
                    match intakes.get(&id) {
                        // One whose task ended (its subscription failed or closed) starts again.
                        Some(running) if same_intakes(&running.spec, &stored.spec) && !running._tasks.iter().any(|t| t.0.is_finished()) => {
                            keep.insert(id);
                        }
                        _ => new.push(Arc::new(stored.spec.clone())),
                    }
                }
                (keep, new)
            });
            intakes.retain(|id, _| keep.contains(id));
            for spec in new {
                let shared = Arc::new(Shared::new(bus.clone(), hosts.clone(), spec.clone()));
                let tasks = spec.triggers.iter().map(|trigger| Task(tokio::spawn(intake(shared.clone(), trigger.clone())))).collect();
                intakes.insert(spec.id(), Intakes { spec, _tasks: tasks });
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                // Intakes that ended are started again even when nothing changed.
                _ = tokio::time::sleep(RESTART_EVERY) => {}
                _ = stop.changed() => return,
            }
        }
    });
}

/// What one service's intakes share: where to send, and how much at once.
struct Shared {
    bus: Bus,
    hosts: HostTable,
    spec: Arc<ServiceSpec>,
    service: ServiceId,
    /// Messages in hand at once; grows with the ready hosts (see the module's doc).
    in_flight: Arc<Semaphore>,
    /// Whose turn it is among the hosts with a replica.
    turn: AtomicUsize,
    /// The hosts as last read: those with a ready replica, the other ready
    /// ones, and the permits granted so far; read again when the table changes.
    candidates: Mutex<Candidates>,
}

struct Candidates {
    changes: watch::Receiver<u64>,
    with_replica: Arc<Vec<HostId>>,
    others: Arc<Vec<HostId>>,
    granted: usize,
}

/// How one message fared.
enum Outcome {
    Handled,
    /// The handler failed, or a host could not be asked; why.
    Failed(String),
    /// No host was ready to take it within [`HOST_ALLOWANCE`].
    NoHost(String),
}

/// Messages in hand per ready host: twice the service's concurrency, so
/// that while one batch runs on a host the next is already on its way (the
/// host's replicas queue what exceeds their concurrency, as for requests).
fn in_flight_per_host(spec: &ServiceSpec) -> usize {
    2 * usize::try_from(spec.limits.concurrency).unwrap_or(1).max(1)
}

impl Shared {
    fn new(bus: Bus, hosts: HostTable, spec: Arc<ServiceSpec>) -> Shared {
        let per_host = in_flight_per_host(&spec);
        let mut changes = hosts.changes();
        changes.mark_changed();
        Shared {
            service: spec.id(),
            in_flight: Arc::new(Semaphore::new(per_host)),
            turn: AtomicUsize::new(0),
            candidates: Mutex::new(Candidates { changes, with_replica: Arc::default(), others: Arc::default(), granted: per_host }),
            bus,
            hosts,
            spec,
        }
    }

    /// The next host to offer a message to, leaving out `tried`: one with a
    /// ready replica (in turn), or, when none has one, another ready host.
    fn next_host(&self, tried: &[HostId]) -> Option<HostId> {
        let (with_replica, others) = {
            let Ok(mut candidates) = self.candidates.lock() else { return None };
            if candidates.changes.has_changed().unwrap_or(false) {
                candidates.changes.borrow_and_update();
                let (with_replica, others) = self.hosts.intake_hosts(&self.service);
                let wanted = in_flight_per_host(&self.spec) * (with_replica.len() + others.len()).max(1);
                if wanted > candidates.granted {
                    self.in_flight.add_permits(wanted - candidates.granted);
                    candidates.granted = wanted;
                }
                candidates.with_replica = Arc::new(with_replica);
                candidates.others = Arc::new(others);
            }
            (candidates.with_replica.clone(), candidates.others.clone())
        };
        // Hosts that run nothing of the service see its messages only when
        // none reports a ready replica (to wake it, or hand them on): one
        // that does and answers `not_here` is waited for, not passed over.
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let candidates = if with_replica.is_empty() { &others } else { &with_replica };
        let len = candidates.len();
        (0..len).map(|i| &candidates[(turn + i) % len]).find(|host| !tried.contains(host)).cloned()
    }

    /// Messages handed to one host at once, at most.
    fn max_batch(&self) -> usize {
        usize::try_from(self.spec.limits.concurrency).unwrap_or(1).clamp(1, MAX_BATCH)
    }

    /// Offers encoded messages, together, to hosts until each ran (see the
    /// module's doc), waiting up to [`HOST_ALLOWANCE`] for a host when none
    /// is ready; how each fared, in order.
    async fn hand(&self, payloads: &[Bytes]) -> Vec<Outcome> {
        let timeout = self.spec.limits.timeout + HOST_ALLOWANCE;
        let deadline = Instant::now() + HOST_ALLOWANCE;
        let mut changes = self.hosts.changes();
        let mut outcomes: Vec<Option<Outcome>> = payloads.iter().map(|_| None).collect();
        let mut tried = Vec::new();
        loop {
            tried.clear();
            while tried.len() < HOSTS_TRIED {
                let pending: Vec<usize> = (0..outcomes.len()).filter(|i| outcomes[*i].is_none()).collect();
                if pending.is_empty() {
                    return outcomes.into_iter().flatten().collect();
                }
                let Some(host) = self.next_host(&tried) else { break };
                tried.push(host.clone());
                let subject = intake_subject(&host, &self.service.namespace, &self.service.name);
                let batch = Bytes::from(encode_batch(pending.iter().map(|i| payloads[*i].as_ref())));
                let fail_all = |outcomes: &mut Vec<Option<Outcome>>, why: String| {
                    for i in &pending {
                        outcomes[*i] = Some(Outcome::Failed(why.clone()));
                    }
                };
                match self.ask(&host, &subject, batch, timeout).await {
                    None => fail_all(&mut outcomes, format!("host {host} was lost while it had the message")),
                    Some(Ok(reply)) => match serde_json::from_slice::<Vec<DeliveryResult>>(&reply.payload) {
                        Ok(results) if results.len() == pending.len() => {
                            for (i, result) in pending.iter().zip(results) {
                                if !result.not_here {
                                    outcomes[*i] = Some(result.error.map_or(Outcome::Handled, Outcome::Failed));
                                }
                            }
                        }
                        // One error for the whole batch (it named no service, or was unreadable).
                        Ok(mut results) if results.len() == 1 => {
                            fail_all(&mut outcomes, results.pop().and_then(|r| r.error).unwrap_or_else(|| format!("host {host} ran none of the messages")));
                        }
                        Ok(results) => fail_all(&mut outcomes, format!("host {host} answered {} results for {} messages", results.len(), pending.len())),
                        Err(e) => fail_all(&mut outcomes, format!("host {host} answered unreadably: {e}")),
                    },
                    Some(Err(RequestError::NoResponders { .. })) => {}
                    Some(Err(e)) => fail_all(&mut outcomes, format!("host {host} did not finish the message: {e}")),
                }
            }
            if outcomes.iter().all(Option::is_some) {
                return outcomes.into_iter().flatten().collect();
            }
            let now = Instant::now();
            if now >= deadline {
                let tried: Vec<String> = tried.iter().map(ToString::to_string).collect();
                let why = if tried.is_empty() {
                    format!("no host was ready to take a message of {} within {}", self.service, wharf_proto::units::format_duration(HOST_ALLOWANCE))
                } else {
                    format!("no host took a message of {} (tried {})", self.service, tried.join(", "))
                };
                return outcomes.into_iter().map(|o| o.unwrap_or_else(|| Outcome::NoHost(why.clone()))).collect();
            }
            tokio::select! {
                _ = tokio::time::sleep((deadline - now).min(NO_HOST_POLL)) => {}
                _ = changes.changed() => {}
            }
        }
    }
}

impl Shared {
    /// Sends a message to `host` and waits for its answer; `None` as soon
    /// as the host is lost meanwhile (the heartbeat table says so), rather
    /// than at the request's timeout.
    async fn ask(&self, host: &HostId, subject: &str, payload: Bytes, timeout: Duration) -> Option<Result<wharf_bus::Message, RequestError>> {
        let mut changes = self.hosts.changes();
        let request = self.bus.request(subject, payload, timeout);
        tokio::pin!(request);
        loop {
            tokio::select! {
                answer = &mut request => return Some(answer),
                changed = changes.changed() => {
                    if changed.is_err() || self.hosts.is_lost(host) {
                        return None;
                    }
                }
            }
        }
    }
}

/// Takes in one trigger's messages until the task is dropped.
async fn intake(shared: Arc<Shared>, trigger: Trigger) {
    let service = &shared.service;
    let subject = message_subject(&service.namespace, &trigger.subject);
    match &trigger.stream {
        None => intake_core(shared, subject).await,
        Some(stream) => {
            let config = StreamConsumerConfig {
                stream: stream_name(&service.namespace, stream),
                subject,
                consumer: consumer_name(&service.name, &trigger.subject),
                max_deliver: trigger.max_deliver(),
                ack_wait: ACK_WAIT,
                max_ack_pending: MAX_ACK_PENDING,
            };
            let dead_letter = message_subject(&service.namespace, &trigger.dead_letter(&service.name));
            intake_stream(shared, config, dead_letter).await;
        }
    }
}

/// Room left in a batch's NATS message for what the bus adds (headers).
const BATCH_HEADROOM: usize = 4096;

/// About how many bytes a message takes in a batch: its body, its head
/// (subjects and a few fields of JSON) and its length prefix.
fn envelope(subject: &str, reply_to: Option<&str>, body: usize) -> usize {
    body + subject.len() + reply_to.map_or(0, str::len) + 96
}

/// Adds to `batch` (which holds its first message) those `at_hand` gives
/// without waiting, so that they go to a host in one trip: up to `max`
/// messages and `budget` bytes by `size`. One taken that does not fit is
/// returned, to start the next batch.
fn fill_batch<T>(batch: &mut Vec<T>, max: usize, budget: usize, size: impl Fn(&T) -> usize, mut at_hand: impl FnMut() -> Option<T>) -> Option<T> {
    let mut bytes: usize = batch.iter().map(&size).sum();
    while batch.len() < max {
        let more = at_hand()?;
        bytes += size(&more);
        if bytes > budget {
            return Some(more);
        }
        batch.push(more);
    }
    None
}

/// The message's head and body as hosts take them.
fn encode(shared: &Shared, subject: &str, reply_to: Option<String>, last_delivery: Option<bool>, body: &[u8]) -> Bytes {
    let subject = relative_subject(&shared.service.namespace, subject).unwrap_or(subject).to_owned();
    Bytes::from(Delivery { subject, reply_to, last_delivery }.encode(body))
}

/// A core NATS trigger: at most once; a failure is logged.
async fn intake_core(shared: Arc<Shared>, subject: String) {
    let service = shared.service.clone();
    let group = delivery_queue_group(&service.namespace, &service.name);
    let mut subscription = match shared.bus.queue_subscribe(&subject, &group).await {
        Ok(subscription) => subscription,
        Err(e) => {
            tracing::error!(%service, "cannot subscribe to trigger subject {subject}: {e}");
            return;
        }
    };
    let max = shared.max_batch();
    let budget = shared.bus.max_payload().saturating_sub(BATCH_HEADROOM);
    // One taken that did not fit the last batch: it starts the next.
    let mut carried = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match subscription.next().await {
                Some(first) => first,
                None => return,
            },
        };
        let mut batch = vec![first];
        carried = fill_batch(&mut batch, max, budget, |m| envelope(&m.subject, m.reply.as_deref(), m.payload.len()), || {
            subscription.next().now_or_never().flatten()
        });
        let Ok(permits) = shared.in_flight.clone().acquire_many_owned(u32::try_from(batch.len()).unwrap_or(1)).await else { return };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permits = permits;
            let payloads: Vec<Bytes> = batch.into_iter().map(|m| encode(&shared, &m.subject, m.reply, None, &m.payload)).collect();
            for outcome in shared.hand(&payloads).await {
                match outcome {
                    Outcome::Handled => {}
                    Outcome::Failed(e) | Outcome::NoHost(e) => tracing::debug!(service = %shared.service, "a message was not handled (core NATS: not delivered again): {e}"),
                }
            }
        });
    }
}

/// A stream trigger: at least once, acknowledged after the handler succeeded.
async fn intake_stream(shared: Arc<Shared>, config: StreamConsumerConfig, dead_letter: String) {
    let service = shared.service.clone();
    let max = shared.max_batch();
    let budget = shared.bus.max_payload().saturating_sub(BATCH_HEADROOM);
    // One taken that did not fit the last batch: it starts the next.
    let mut carried: Option<wharf_bus::Delivered> = None;
    let mut warned = false;
    loop {
        let mut messages = match shared.bus.stream_consumer(&config).await {
            Ok(messages) => messages,
            Err(e) => {
                if !warned {
                    tracing::error!(%service, "cannot consume trigger stream {}: {e}; trying again every {REOPEN_DELAY:?}", config.stream);
                    warned = true;
                }
                tokio::time::sleep(REOPEN_DELAY).await;
                continue;
            }
        };
        warned = false;
        loop {
            let first = match carried.take() {
                Some(first) => first,
                None => match messages.next().await {
                    None => break,
                    Some(Ok(first)) => first,
                    Some(Err(e)) => {
                        tracing::debug!(%service, "trigger stream {}: {e}", config.stream);
                        continue;
                    }
                },
            };
            let mut batch = vec![first];
            carried = fill_batch(&mut batch, max, budget, |d| envelope(&d.subject, None, d.payload.len()), || messages.ready());
            let Ok(permits) = shared.in_flight.clone().acquire_many_owned(u32::try_from(batch.len()).unwrap_or(1)).await else { return };
            let (shared, dead_letter, max_deliver) = (shared.clone(), dead_letter.clone(), config.max_deliver);
            tokio::spawn(async move {
                let _permits = permits;
                let last: Vec<bool> = batch.iter().map(|d| d.delivered >= u64::from(max_deliver)).collect();
                let payloads: Vec<Bytes> = batch.iter().zip(&last).map(|(d, last)| encode(&shared, &d.subject, None, Some(*last), &d.payload)).collect();
                let handing = shared.hand(&payloads);
                tokio::pin!(handing);
                let mut progress = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
                let outcomes = loop {
                    tokio::select! {
                        outcomes = &mut handing => break outcomes,
                        _ = progress.tick() => {
                            for delivered in &batch {
                                if let Err(e) = delivered.in_progress().await {
                                    tracing::debug!(service = %shared.service, "cannot tell the stream a message is in progress: {e}");
                                }
                            }
                        }
                    }
                };
                for ((delivered, last), outcome) in batch.iter().zip(last).zip(outcomes) {
                    settle(&shared, delivered, last, outcome, &dead_letter).await;
                }
            });
        }
    }
}

/// Acknowledges a stream's message, asks for it again, or dead-letters it
/// (its last allowed delivery failed, or no host took it).
async fn settle(shared: &Shared, delivered: &wharf_bus::Delivered, last: bool, outcome: Outcome, dead_letter: &str) {
    let service = &shared.service;
    let settled = match outcome {
        Outcome::Handled => delivered.ack().await,
        Outcome::Failed(e) | Outcome::NoHost(e) if last => {
            tracing::warn!(%service, deliveries = delivered.delivered, "a message failed its last delivery; moving it to {dead_letter}: {e}");
            match shared.bus.publish(dead_letter, delivered.payload.clone()).await {
                Ok(()) => delivered.ack().await,
                Err(publish) => {
                    tracing::error!(%service, "cannot dead-letter a message on {dead_letter}: {publish}");
                    delivered.nak(REDELIVERY_DELAY).await
                }
            }
        }
        // No host ran it: it waits in the stream (a delivery is spent, as
        // for any redelivery).
        Outcome::NoHost(e) => {
            tracing::warn!(%service, "{e}; the stream will deliver it again");
            delivered.nak(REDELIVERY_DELAY).await
        }
        Outcome::Failed(e) => {
            tracing::debug!(%service, deliveries = delivered.delivered, "a message failed; it will be delivered again: {e}");
            delivered.nak(REDELIVERY_DELAY).await
        }
    };
    if let Err(e) = settled {
        tracing::debug!(%service, "cannot acknowledge a message (it will be delivered again): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_takes_what_is_at_hand_up_to_its_count_and_bytes() {
        let mut at_hand = vec![30, 30, 50, 10].into_iter();
        let mut batch = vec![20];
        let carried = fill_batch(&mut batch, 8, 100, |n: &usize| *n, || at_hand.next());
        assert_eq!((batch, carried), (vec![20, 30, 30], Some(50)), "the one that does not fit starts the next batch");
        let mut batch = vec![50];
        assert_eq!(fill_batch(&mut batch, 2, 1000, |n: &usize| *n, || at_hand.next()), None);
        assert_eq!(batch, [50, 10], "at most `max`, and no more than is at hand");
        let mut batch = vec![5];
        assert_eq!(fill_batch(&mut batch, 8, 100, |n: &usize| *n, || None), None);
        assert_eq!(batch, [5]);
    }
}
