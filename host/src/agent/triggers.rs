//! Message triggers on this host: taking in the messages of every
//! triggered service, and handing each to a replica.
//!
//! Every host takes in every triggered service's messages, as every host's
//! ingress serves every route: a core NATS trigger is a queue subscription
//! (group `<ns>.<name>`, so one host gets each message), a stream trigger a
//! pull from the service's durable consumer (shared by all hosts). A
//! message goes to a ready local replica if there is one, else over the bus
//! to a host the directory says has one, on that host's own subject
//! ([`wharf_proto::trigger::delivery_subject`], request/reply, answered
//! with how the handler ended; others are tried, as for requests, when it
//! has none any more); if nobody has one,
//! an autoscaled service is woken as an HTTP request wakes it (announce,
//! start a replica here if allowed) and the message waits up to the
//! activation timeout. A stream message is acknowledged after its handler
//! succeeded; a failure asks for it again after a short delay, and its last
//! allowed delivery goes to the dead-letter subject instead.
//!
//! Intakes follow the services' latest specs (the directory); delivery
//! listeners follow the replicas ready here (assigned or activated; other
//! hosts choose by the status, so only assigned ones are chosen, as for
//! requests).

use super::{HostAgent, Inner};
use crate::messaging::BrokerMessage;
use crate::workload::{MessageError, Workload};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use wharf_bus::{RequestError, StreamConsumerConfig};
use wharf_proto::HostId;
use wharf_proto::trigger::{Delivery, DeliveryResult, Trigger, consumer_name, delivery_queue_group, delivery_subject, message_subject, relative_subject, stream_name};
use wharf_proto::{ServiceId, ServiceSpec};

/// How long a failed stream message waits before it is delivered again.
const REDELIVERY_DELAY: Duration = Duration::from_secs(1);

/// How often a message with no replica to go to looks again when no
/// announcement came.
const NO_REPLICA_POLL: Duration = Duration::from_millis(500);

/// How long a stream intake waits before opening its consumer again after
/// a failure.
const REOPEN_DELAY: Duration = Duration::from_secs(1);

/// Messages of one stream delivered and not yet acknowledged, over all hosts.
const MAX_ACK_PENDING: u32 = 1024;

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

/// Whether intakes started from `old` still fit `new`: the same triggers,
/// and the same limits and autoscaling, which they wait and bound by.
fn same_intakes(old: &ServiceSpec, new: &ServiceSpec) -> bool {
    old.triggers == new.triggers && old.limits == new.limits && old.autoscale.is_some() == new.autoscale.is_some()
}

/// The trigger tasks of this host. Each map has its own lock, held only to
/// compare and swap tasks.
#[derive(Default)]
pub(crate) struct Triggers {
    /// Per triggered service, its intakes.
    intakes: Mutex<BTreeMap<ServiceId, Intakes>>,
    /// Per service with a ready replica here: the delivery listener.
    deliveries: Mutex<BTreeMap<ServiceId, Task>>,
}

impl HostAgent {
    /// Brings intakes in line with the services' triggers and delivery
    /// listeners with the replicas ready here. A draining host takes in nothing.
    pub(super) fn sync_triggers(&self) {
        let draining = self.inner.draining.load(Ordering::Relaxed);
        let wanted: BTreeMap<ServiceId, Arc<ServiceSpec>> =
            if draining { BTreeMap::new() } else { self.inner.directory.triggered().into_iter().collect() };
        if let Ok(mut intakes) = self.inner.triggers.intakes.lock() {
            intakes.retain(|service, intake| wanted.get(service).is_some_and(|spec| same_intakes(&intake.spec, spec)));
            for (service, spec) in &wanted {
                if intakes.contains_key(service) {
                    continue;
                }
                let tasks = spec
                    .triggers
                    .iter()
                    .map(|trigger| Task(tokio::spawn(intake(Arc::downgrade(&self.inner), service.clone(), spec.clone(), trigger.clone()))))
                    .collect();
                intakes.insert(service.clone(), Intakes { spec: spec.clone(), _tasks: tasks });
            }
        }
        if let Ok(mut deliveries) = self.inner.triggers.deliveries.lock() {
            deliveries.retain(|service, task| wanted.contains_key(service) && self.local_workload(service).is_some() && !task.0.is_finished());
            for service in wanted.keys() {
                if !deliveries.contains_key(service) && self.local_workload(service).is_some() {
                    deliveries.insert(service.clone(), Task(tokio::spawn(deliver(Arc::downgrade(&self.inner), service.clone()))));
                }
            }
        }
    }

    /// A ready replica of `service` here: an assigned one, else an activation replica.
    fn local_workload(&self, service: &ServiceId) -> Option<Workload> {
        self.inner.replicas.least_busy(service, None).or_else(|| self.inner.activations.replica(service))
    }

    /// Hands `message` to a replica of `service`, here or elsewhere, waking
    /// the service if it is at zero; waits for one up to the activation timeout.
    async fn dispatch(&self, service: &ServiceId, spec: &ServiceSpec, message: BrokerMessage) -> Result<(), String> {
        let started = Instant::now();
        let deadline = started + self.inner.config.activation_timeout;
        let timeout = spec.limits.timeout + crate::limits::WorkloadLimits::default().queue_timeout + Duration::from_secs(1);
        let payload = Bytes::from(Delivery { subject: message.subject.clone(), reply_to: message.reply_to.clone() }.encode(&message.body));
        let mut woken = false;
        // Reported as demand while it waits for a replica, as a held request is.
        let mut held = None;
        let mut changes = self.changes();
        loop {
            // A handler that never ran for want of a free instance is not a
            // failed delivery: wait for one (up to the deadline) instead.
            if let Some(workload) = self.local_workload(service) {
                match workload.handle_message(message.clone()).await {
                    Ok(()) => return Ok(()),
                    Err(MessageError::Failed(e)) => return Err(e),
                    Err(MessageError::Overloaded(e)) if Instant::now() >= deadline => return Err(e),
                    Err(MessageError::Overloaded(_)) => continue,
                }
            }
            match self.hand_over(service, &payload, timeout).await {
                Some(Ok(result)) if result.overloaded && Instant::now() < deadline => continue,
                Some(Ok(result)) => return result.error.map_or(Ok(()), Err),
                Some(Err(e)) => return Err(e),
                None => {}
            }
            if !woken && spec.autoscale.is_some() {
                woken = true;
                held = Some(super::activation::Held::enter(&self.inner.activations, service));
                self.announce_activation(service).await;
                if self.may_activate_here(service).is_ok() {
                    match self.activate_locally(service).await {
                        Ok(_) => {
                            self.sync_triggers();
                            continue;
                        }
                        Err(e) => tracing::warn!(%service, "cannot start a replica here for a message: {e}"),
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                drop(held);
                return Err(format!(
                    "no replica of {service} was ready within {}",
                    wharf_proto::units::format_duration(self.inner.config.activation_timeout)
                ));
            }
            tokio::select! {
                _ = tokio::time::sleep((deadline - now).min(NO_REPLICA_POLL)) => {}
                _ = changes.changed() => {}
            }
        }
    }

    /// Hands an encoded message to another host the directory says has a
    /// ready replica of `service`, on its own subject; to others (as many
    /// as a request may try) when one has none any more. `None`: no host
    /// took it.
    async fn hand_over(&self, service: &ServiceId, payload: &Bytes, timeout: Duration) -> Option<Result<DeliveryResult, String>> {
        let mut tried: Vec<(HostId, u64)> = Vec::new();
        while tried.len() < super::routing::HOSTS_TRIED {
            let (host, revision) = self.inner.directory.choose(service, None, &self.inner.config.host, &tried)?;
            let subject = delivery_subject(&host, &service.namespace, &service.name);
            tried.push((host, revision));
            match self.inner.bus.request(&subject, payload.clone(), timeout).await {
                Ok(reply) => match serde_json::from_slice::<DeliveryResult>(&reply.payload) {
                    Ok(result) if result.not_here => {}
                    Ok(result) => return Some(Ok(result)),
                    Err(e) => return Some(Err(format!("the host that handled the message answered unreadably: {e}"))),
                },
                Err(RequestError::NoResponders { .. }) => {}
                Err(e) => return Some(Err(format!("cannot hand the message to a replica of {service}: {e}"))),
            }
        }
        None
    }
}

/// Messages one intake has in hand at once: as many as one replica runs at
/// once (every host takes in, so the cluster holds one replica's worth per
/// host), so a slow service neither waits past its queue timeout for
/// instances nor takes the host's bus handlers from other services.
fn intake_bound(spec: &ServiceSpec) -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(usize::try_from(spec.limits.concurrency).unwrap_or(1).max(1)))
}

/// Takes in one trigger's messages until the task is dropped or the agent stops.
async fn intake(agent: Weak<Inner>, service: ServiceId, spec: Arc<ServiceSpec>, trigger: Trigger) {
    let subject = message_subject(&service.namespace, &trigger.subject);
    match &trigger.stream {
        None => intake_core(agent, service, spec, subject).await,
        Some(stream) => {
            let config = StreamConsumerConfig {
                stream: stream_name(&service.namespace, stream),
                subject,
                consumer: consumer_name(&service.name, &trigger.subject),
                max_deliver: trigger.max_deliver(),
                // Long enough for the longest wait for a replica plus a handler's deadline, twice over.
                ack_wait: 2 * (spec.limits.timeout + Duration::from_secs(35)),
                max_ack_pending: MAX_ACK_PENDING,
            };
            let dead_letter = message_subject(&service.namespace, &trigger.dead_letter(&service.name));
            intake_stream(agent, service, spec, config, dead_letter).await;
        }
    }
}

/// A core NATS trigger: at most once; a failure is logged and counted.
async fn intake_core(agent: Weak<Inner>, service: ServiceId, spec: Arc<ServiceSpec>, subject: String) {
    let Some(inner) = agent.upgrade() else { return };
    let group = delivery_queue_group(&service.namespace, &service.name);
    let mut subscription = match inner.bus.queue_subscribe(&subject, &group).await {
        Ok(subscription) => subscription,
        Err(e) => {
            tracing::error!(%service, "cannot subscribe to trigger subject {subject}: {e}");
            return;
        }
    };
    let handlers = inner.handlers.clone();
    let in_flight = intake_bound(&spec);
    let mut stop = inner.stop.subscribe();
    drop(inner);
    loop {
        let message = tokio::select! {
            message = subscription.next() => message,
            _ = stop.changed() => return,
        };
        let Some(message) = message else { return };
        let Ok(permit) = handlers.clone().acquire_owned().await else { return };
        let Ok(own) = in_flight.clone().acquire_owned().await else { return };
        let Some(inner) = agent.upgrade() else { return };
        let (service, spec) = (service.clone(), spec.clone());
        tokio::spawn(async move {
            let _permits = (permit, own);
            let message = BrokerMessage {
                subject: relative_subject(&service.namespace, &message.subject).unwrap_or(&message.subject).to_string(),
                body: message.payload.to_vec(),
                reply_to: message.reply,
            };
            let agent = HostAgent { inner };
            let result = match agent.dispatch(&service, &spec, message).await {
                Ok(()) => "handled",
                Err(e) => {
                    tracing::debug!(%service, "a message was not handled (core NATS: not delivered again): {e}");
                    "failed"
                }
            };
            agent.inner.metrics.trigger_message(&service.to_string(), result);
        });
    }
}

/// A stream trigger: at least once, acknowledged after the handler succeeded.
async fn intake_stream(agent: Weak<Inner>, service: ServiceId, spec: Arc<ServiceSpec>, config: StreamConsumerConfig, dead_letter: String) {
    let mut warned = false;
    loop {
        let Some(inner) = agent.upgrade() else { return };
        let mut stop = inner.stop.subscribe();
        let handlers = inner.handlers.clone();
        let in_flight = intake_bound(&spec);
        let opened = inner.bus.stream_consumer(&config).await;
        drop(inner);
        let mut messages = match opened {
            Ok(messages) => messages,
            Err(e) => {
                if !warned {
                    tracing::error!(%service, "cannot consume trigger stream {}: {e}; trying again every {REOPEN_DELAY:?}", config.stream);
                    warned = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(REOPEN_DELAY) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        warned = false;
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                _ = stop.changed() => return,
            };
            let delivered = match next {
                None => break,
                Some(Err(e)) => {
                    tracing::debug!(%service, "trigger stream {}: {e}", config.stream);
                    continue;
                }
                Some(Ok(delivered)) => delivered,
            };
            let Ok(permit) = handlers.clone().acquire_owned().await else { return };
            let Ok(own) = in_flight.clone().acquire_owned().await else { return };
            let Some(inner) = agent.upgrade() else { return };
            let (service, spec, dead_letter, max_deliver) = (service.clone(), spec.clone(), dead_letter.clone(), config.max_deliver);
            tokio::spawn(async move {
                let _permits = (permit, own);
                let message = BrokerMessage {
                    subject: relative_subject(&service.namespace, &delivered.subject).unwrap_or(&delivered.subject).to_string(),
                    body: delivered.payload.to_vec(),
                    reply_to: None,
                };
                let agent = HostAgent { inner };
                let (result, settled) = match agent.dispatch(&service, &spec, message).await {
                    Ok(()) => ("handled", delivered.ack().await),
                    Err(e) if delivered.delivered >= u64::from(max_deliver) => {
                        tracing::warn!(%service, deliveries = delivered.delivered, "a message failed its last delivery; moving it to {dead_letter}: {e}");
                        match agent.inner.bus.publish(&dead_letter, delivered.payload.clone()).await {
                            Ok(()) => ("dead_lettered", delivered.ack().await),
                            Err(publish) => {
                                tracing::error!(%service, "cannot dead-letter a message on {dead_letter}: {publish}");
                                ("redelivered", delivered.nak(REDELIVERY_DELAY).await)
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(%service, deliveries = delivered.delivered, "a message failed; it will be delivered again: {e}");
                        ("redelivered", delivered.nak(REDELIVERY_DELAY).await)
                    }
                };
                agent.inner.metrics.trigger_message(&service.to_string(), result);
                if let Err(e) = settled {
                    tracing::debug!(%service, "cannot acknowledge a message (it will be delivered again): {e}");
                }
            });
        }
    }
}

/// Answers messages other hosts hand to this host's replicas of `service`.
async fn deliver(agent: Weak<Inner>, service: ServiceId) {
    let Some(inner) = agent.upgrade() else { return };
    let subject = delivery_subject(&inner.config.host, &service.namespace, &service.name);
    let mut subscription = match inner.bus.queue_subscribe(&subject, &delivery_queue_group(&service.namespace, &service.name)).await {
        Ok(subscription) => subscription,
        Err(e) => {
            tracing::error!(%service, "cannot listen for messages handed over by other hosts: {e}");
            return;
        }
    };
    let handlers = inner.handlers.clone();
    let mut stop = inner.stop.subscribe();
    drop(inner);
    loop {
        let request = tokio::select! {
            request = subscription.next() => request,
            _ = stop.changed() => return,
        };
        let Some(request) = request else { return };
        let Ok(permit) = handlers.clone().acquire_owned().await else { return };
        let Some(inner) = agent.upgrade() else { return };
        let service = service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let agent = HostAgent { inner };
            let result = match Delivery::decode(&request.payload) {
                Err(e) => DeliveryResult { error: Some(e), not_here: false, overloaded: false },
                Ok((head, body)) => match agent.local_workload(&service) {
                    None => DeliveryResult { error: None, not_here: true, overloaded: false },
                    Some(workload) => {
                        let message = BrokerMessage { subject: head.subject, body: body.to_vec(), reply_to: head.reply_to };
                        match workload.handle_message(message).await {
                            Ok(()) => DeliveryResult { error: None, not_here: false, overloaded: false },
                            Err(MessageError::Overloaded(e)) => DeliveryResult { error: Some(e), not_here: false, overloaded: true },
                            Err(MessageError::Failed(e)) => DeliveryResult { error: Some(e), not_here: false, overloaded: false },
                        }
                    }
                },
            };
            // A result is two small fields: it always encodes.
            let payload = serde_json::to_vec(&result).unwrap_or_default();
            if let Err(e) = agent.inner.bus.respond(&request, Bytes::from(payload)).await {
                tracing::debug!(%service, "cannot answer a handed-over message: {e}");
            }
        });
    }
}
