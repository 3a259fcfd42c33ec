//! Message triggers on this host: running the messages the control plane
//! takes in for triggered services, on a replica here or elsewhere.
//!
//! Hosts take in no message themselves: a host's NATS identity may not
//! subscribe to components' messages (`wharf.msg.>` would show it every
//! tenant's). The control plane's intake (`wharf_scheduler`'s `intake`)
//! subscribes to each core trigger's subject and consumes each stream
//! trigger's durable consumer, and hands each message to one host on that
//! host's own subject ([`wharf_proto::trigger::intake_subject`]), one that
//! reports a ready replica of the service when there is one. The host runs
//! it on a ready local replica if it has one, else hands it over the bus to
//! a host the directory says has one, on that host's own subject
//! ([`wharf_proto::trigger::delivery_subject`], request/reply, answered
//! with how the handler ended; others are tried, as for requests, when it
//! has none any more); if nobody has one, an autoscaled service is woken
//! as an HTTP request wakes it (announce, start a replica here if allowed)
//! and the message waits up to the activation timeout. The host answers the
//! control plane with how the handler ended, which acknowledges a stream's
//! message, asks for it again, or dead-letters it after its last delivery.
//!
//! Delivery listeners follow the replicas ready here (assigned or
//! activated; other hosts choose by the status, so only assigned ones are
//! chosen, as for requests).

use super::{HostAgent, Inner};
use crate::messaging::BrokerMessage;
use crate::workload::{MessageError, Workload};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use wharf_bus::RequestError;
use wharf_proto::HostId;
use wharf_proto::trigger::{Delivery, DeliveryResult, decode_batch, delivery_queue_group, delivery_subject, host_intake_wildcard, intake_service};
use wharf_proto::{ServiceId, ServiceSpec};

/// How often a message with no replica to go to looks again when no
/// announcement came.
const NO_REPLICA_POLL: Duration = Duration::from_millis(500);

/// A task that stops when its handle is dropped.
struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The delivery listeners of this host, one per service with a ready
/// replica here; the lock is held only to compare and swap tasks.
#[derive(Default)]
pub(crate) struct Triggers {
    deliveries: Mutex<BTreeMap<ServiceId, Task>>,
}

impl HostAgent {
    /// Brings delivery listeners in line with the triggered services'
    /// replicas ready here. A draining host takes in nothing.
    pub(super) fn sync_triggers(&self) {
        let draining = self.inner.draining.load(Ordering::Relaxed);
        let wanted: BTreeSet<ServiceId> = if draining { BTreeSet::new() } else { self.inner.directory.triggered().into_iter().map(|(service, _)| service).collect() };
        if let Ok(mut deliveries) = self.inner.triggers.deliveries.lock() {
            deliveries.retain(|service, task| wanted.contains(service) && self.local_workload(service).is_some() && !task.0.is_finished());
            for service in &wanted {
                if !deliveries.contains_key(service) && self.local_workload(service).is_some() {
                    deliveries.insert(service.clone(), Task(tokio::spawn(deliver(Arc::downgrade(&self.inner), service.clone()))));
                }
            }
        }
    }

    /// Answers the messages the control plane's intake hands this host
    /// ([`wharf_proto::trigger::host_intake_wildcard`]), each on its own
    /// task, until the agent stops.
    pub(super) async fn answer_intake(&self) -> Result<(), wharf_bus::SubscribeError> {
        let subscription = self.inner.bus.subscribe(&host_intake_wildcard(&self.inner.config.host)).await?;
        tokio::spawn(answer_each(Arc::downgrade(&self.inner), subscription, |agent: HostAgent, subject: String, payload: Bytes| async move {
            agent.take_in(&subject, &payload).await
        }));
        Ok(())
    }

    /// Runs the messages the intake handed over together on `subject` (a
    /// batch, [`wharf_proto::trigger::encode_batch`]), each on its own, and
    /// answers how each ended, in order: `not_here` for all when this host
    /// is draining or does not know the service as triggered (yet), so the
    /// intake tries another host.
    async fn take_in(&self, subject: &str, payload: &[u8]) -> Vec<DeliveryResult> {
        let failed = |error: String| vec![DeliveryResult { error: Some(error), not_here: false, overloaded: false }];
        let Some(service) = intake_service(subject).and_then(|(namespace, name)| ServiceId::new(namespace, name).ok()) else {
            return failed(format!("{subject} names no service"));
        };
        let deliveries = match decode_batch(payload) {
            Ok(deliveries) => deliveries,
            Err(e) => return failed(e),
        };
        let spec = match self.inner.directory.spec(&service) {
            Some(spec) if !spec.triggers.is_empty() && !self.inner.draining.load(Ordering::Relaxed) => spec,
            _ => return vec![DeliveryResult { error: None, not_here: true, overloaded: false }; deliveries.len()],
        };
        futures::future::join_all(deliveries.into_iter().map(|delivery| self.take_one(&service, &spec, delivery))).await
    }

    /// Runs one message of a batch the intake handed over.
    async fn take_one(&self, service: &ServiceId, spec: &ServiceSpec, delivery: &[u8]) -> DeliveryResult {
        let (head, body) = match Delivery::decode(delivery) {
            Ok(decoded) => decoded,
            Err(e) => return DeliveryResult { error: Some(e), not_here: false, overloaded: false },
        };
        let last = head.last_delivery;
        let message = BrokerMessage { subject: head.subject, body: body.to_vec(), reply_to: head.reply_to };
        let outcome = self.dispatch(service, spec, message).await;
        let result = match (&outcome, last) {
            (Ok(()), _) => "handled",
            (Err(_), None) => "failed",
            (Err(_), Some(false)) => "redelivered",
            (Err(_), Some(true)) => "dead_lettered",
        };
        if let Err(e) = &outcome {
            tracing::debug!(%service, "a message was not handled ({result}): {e}");
        }
        self.inner.metrics.trigger_message(&service.to_string(), result);
        DeliveryResult { error: outcome.err(), not_here: false, overloaded: false }
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
        let payload = Bytes::from(Delivery { subject: message.subject.clone(), reply_to: message.reply_to.clone(), last_delivery: None }.encode(&message.body));
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

/// What a host answers a hand-off (one result) or the intake (one per message) with.
trait AnswerPayload {
    fn encode(&self) -> Vec<u8>;
}

impl AnswerPayload for DeliveryResult {
    fn encode(&self) -> Vec<u8> {
        // Small fields: they always encode.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl AnswerPayload for Vec<DeliveryResult> {
    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Answers each request on `subscription` with what `handle` makes of its
/// subject and payload, each on a task of its own within the host's bound
/// of bus handlers, until the agent stops.
async fn answer_each<F, Fut, T>(agent: Weak<Inner>, mut subscription: wharf_bus::Subscription, handle: F)
where
    F: Fn(HostAgent, String, Bytes) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = T> + Send,
    T: AnswerPayload + Send,
{
    let Some(inner) = agent.upgrade() else { return };
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
        let handle = handle.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let agent = HostAgent { inner };
            let result = handle(agent.clone(), request.subject.clone(), request.payload.clone()).await;
            let payload = result.encode();
            if let Err(e) = agent.inner.bus.respond(&request, Bytes::from(payload)).await {
                tracing::debug!("cannot answer a message on {}: {e}", request.subject);
            }
        });
    }
}

/// Answers messages other hosts hand to this host's replicas of `service`.
async fn deliver(agent: Weak<Inner>, service: ServiceId) {
    let Some(inner) = agent.upgrade() else { return };
    let subject = delivery_subject(&inner.config.host, &service.namespace, &service.name);
    let subscription = match inner.bus.queue_subscribe(&subject, &delivery_queue_group(&service.namespace, &service.name)).await {
        Ok(subscription) => subscription,
        Err(e) => {
            tracing::error!(%service, "cannot listen for messages handed over by other hosts: {e}");
            return;
        }
    };
    drop(inner);
    answer_each(agent, subscription, move |agent: HostAgent, _subject: String, payload: Bytes| {
        let service = service.clone();
        async move {
            match Delivery::decode(&payload) {
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
            }
        }
    })
    .await;
}
