//! At-least-once delivery from a JetStream stream: a durable pull consumer
//! that many processes share (each message goes to one of them), messages
//! acknowledged by the caller after it handled them, redelivered after a
//! negative acknowledgement or when the acknowledgement does not come in
//! time, with the number of deliveries so far on each.
//!
//! Over NATS only: the in-process bus has no streams, and says so.

use crate::error::BackendError;
use crate::nats::{ConsumerAsk, Consumers};
use crate::{Backend, Bus};
use bytes::Bytes;
use futures::StreamExt;
use std::time::Duration;
use thiserror::Error;

/// Messages one pull request asks for at most.
const PULL_BATCH: usize = 16;

/// How long one pull request waits for messages before the server ends it
/// (and the next one is sent).
const PULL_EXPIRES: Duration = Duration::from_secs(10);

/// How long past [`PULL_EXPIRES`] a pull request is waited for before it
/// counts as lost (its end went missing across a reconnection).
const PULL_GRACE: Duration = Duration::from_secs(2);

/// A stream (created if missing, its subjects extended if they lack
/// `subject`) and a durable consumer of `subject` on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConsumerConfig {
    /// The stream's name (letters, digits, `-`, `_`).
    pub stream: String,
    /// The subject (pattern) the consumer takes; the stream keeps it.
    pub subject: String,
    /// The durable consumer's name, shared by every process that consumes.
    pub consumer: String,
    /// Deliveries of one message at most.
    pub max_deliver: u32,
    /// How long a delivered message may go unacknowledged before it is
    /// delivered again.
    pub ack_wait: Duration,
    /// Messages delivered and not yet acknowledged, over all processes.
    pub max_ack_pending: u32,
}

/// Why a stream consumer could not be opened or read.
#[derive(Debug, Error)]
pub enum StreamError {
    /// The in-process bus has no JetStream.
    #[error("stream `{stream}`: JetStream streams need NATS (`--nats URL`); the in-process bus of single-node mode has none")]
    Unsupported { stream: String },
    /// The stream could not be created or extended (refused by the server,
    /// e.g. for lack of permission, or overlapping another stream's subjects).
    #[error("cannot create or extend stream `{stream}` with subject {subject}: {source}")]
    Stream {
        stream: String,
        subject: String,
        #[source]
        source: BackendError,
    },
    /// The consumer could not be created or read from.
    #[error("consumer `{consumer}` of stream `{stream}`: {source}")]
    Consumer {
        stream: String,
        consumer: String,
        #[source]
        source: BackendError,
    },
}

/// The messages of a stream consumer, in the order the server hands them
/// out: pulled in batches into an inbox of this process's own. Who makes
/// the consumer and sends the pull requests is the bus's
/// [`consumer_broker`](crate::NatsOptions::consumer_broker), or the process.
pub struct StreamMessages {
    consumers: Consumers,
    subscriber: async_nats::Subscriber,
    deliver: String,
    stream: String,
    consumer: String,
    /// Messages the pull requests sent may still bring.
    outstanding: usize,
    /// When the last pull request counts as lost.
    deadline: tokio::time::Instant,
    /// A status message [`StreamMessages::ready`] came across, for
    /// [`StreamMessages::next`] to act on.
    stashed: Option<async_nats::Message>,
}

/// One delivered message; acknowledge it with [`Delivered::ack`] or ask
/// for it again with [`Delivered::nak`].
pub struct Delivered {
    /// The subject it was published to.
    pub subject: String,
    pub payload: Bytes,
    /// Which delivery this is, from 1.
    pub delivered: u64,
    /// Where its acknowledgement goes.
    reply: String,
    consumers: Consumers,
}

impl Bus {
    /// Makes sure stream `stream` exists and keeps `subject`: creates it
    /// (with as many copies as the bus gives its buckets: up to 3 on a
    /// cluster), or adds the subject to an existing one. Changes nothing
    /// when both are there, so a process without the right to create
    /// streams can call it on a stream that is ready.
    pub async fn ensure_stream(&self, stream: &str, subject: &str) -> Result<(), StreamError> {
        self.open_stream(stream, subject).await.map(drop)
    }

    async fn open_stream(&self, name: &str, subject: &str) -> Result<(), StreamError> {
        let Backend::Nats(nats) = &self.backend else {
            return Err(StreamError::Unsupported { stream: name.to_owned() });
        };
        crate::nats::open_stream(nats.jetstream(), nats.replicas_for_new(), name, subject)
            .await
            .map(drop)
            .map_err(|source| StreamError::Stream { stream: name.to_owned(), subject: subject.to_owned(), source })
    }

    /// Opens (creating what is missing, see [`Bus::ensure_stream`]) the
    /// stream and durable consumer of `config` and starts pulling messages.
    pub async fn stream_consumer(&self, config: &StreamConsumerConfig) -> Result<StreamMessages, StreamError> {
        let Backend::Nats(nats) = &self.backend else {
            return Err(StreamError::Unsupported { stream: config.stream.clone() });
        };
        let consumer_failed =
            |source: BackendError| StreamError::Consumer { stream: config.stream.clone(), consumer: config.consumer.clone(), source };
        let consumers = nats.consumers().clone();
        consumers
            .make(&ConsumerAsk::Durable {
                stream: config.stream.clone(),
                subject: config.subject.clone(),
                consumer: config.consumer.clone(),
                max_deliver: config.max_deliver,
                ack_wait_ms: u64::try_from(config.ack_wait.as_millis()).unwrap_or(u64::MAX),
                max_ack_pending: config.max_ack_pending,
            })
            .await
            .map_err(consumer_failed)?;
        let client = nats.client().clone();
        let deliver = client.new_inbox();
        let subscriber = client.subscribe(deliver.clone()).await.map_err(|e| consumer_failed(Box::new(e)))?;
        Ok(StreamMessages {
            consumers,
            subscriber,
            deliver,
            stream: config.stream.clone(),
            consumer: config.consumer.clone(),
            outstanding: 0,
            deadline: tokio::time::Instant::now(),
            stashed: None,
        })
    }
}

impl StreamMessages {
    /// The next message; `None` once the consumer is gone for good. A
    /// passing error (a pull request refused while reconnecting) is
    /// returned and the stream goes on.
    pub async fn next(&mut self) -> Option<Result<Delivered, StreamError>> {
        loop {
            if self.outstanding == 0 {
                let ask = ConsumerAsk::Pull {
                    stream: self.stream.clone(),
                    consumer: self.consumer.clone(),
                    deliver: self.deliver.clone(),
                    batch: PULL_BATCH,
                    expires_ms: u64::try_from(PULL_EXPIRES.as_millis()).unwrap_or(u64::MAX),
                };
                if let Err(source) = self.consumers.make(&ask).await {
                    // Not at once again: the broker or the server may be
                    // back in a moment.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    return Some(Err(self.failed(source)));
                }
                self.outstanding = PULL_BATCH;
                self.deadline = tokio::time::Instant::now() + PULL_EXPIRES + PULL_GRACE;
            }
            let message = match self.stashed.take() {
                Some(message) => message,
                None => match tokio::time::timeout_at(self.deadline, self.subscriber.next()).await {
                    Ok(Some(message)) => message,
                    Ok(None) => return None,
                    Err(_) => {
                        self.outstanding = 0;
                        continue;
                    }
                },
            };
            if let Some(status) = message.status {
                match status.as_u16() {
                    // A heartbeat.
                    100 => {}
                    // The request expired, or found nothing: send the next.
                    404 | 408 => self.outstanding = 0,
                    _ => {
                        let why = message.description.unwrap_or_default();
                        self.outstanding = 0;
                        if why.to_ascii_lowercase().contains("deleted") {
                            // The consumer is gone: the caller opens it again.
                            return None;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        return Some(Err(self.failed(format!("status {status}: {why}").into())));
                    }
                }
                continue;
            }
            if let Some(delivered) = self.delivered(message) {
                return Some(Ok(delivered));
            }
        }
    }

    /// A message already received, without waiting and without asking the
    /// server for more: `None` when none is at hand (or the next thing at
    /// hand is a status, left for [`StreamMessages::next`]). For taking
    /// together what arrived together.
    pub fn ready(&mut self) -> Option<Delivered> {
        use futures::FutureExt as _;
        if self.stashed.is_some() {
            return None;
        }
        loop {
            let message = self.subscriber.next().now_or_never()??;
            if message.status.is_some() {
                self.stashed = Some(message);
                return None;
            }
            if let Some(delivered) = self.delivered(message) {
                return Some(delivered);
            }
        }
    }

    /// A stored message as delivered (one of those pulled); `None` for one without an ack subject.
    fn delivered(&mut self, message: async_nats::Message) -> Option<Delivered> {
        let reply = message.reply.map(|reply| reply.to_string())?;
        self.outstanding = self.outstanding.saturating_sub(1);
        let delivered = crate::nats::ack_info(&reply).map_or(1, |info| info.delivered);
        Some(Delivered { subject: message.subject.to_string(), payload: message.payload, delivered, reply, consumers: self.consumers.clone() })
    }

    fn failed(&self, source: BackendError) -> StreamError {
        StreamError::Consumer { stream: self.stream.clone(), consumer: self.consumer.clone(), source }
    }
}

impl Delivered {
    /// Done with: never delivered again.
    pub async fn ack(&self) -> Result<(), BackendError> {
        self.consumers.acknowledge(&self.reply, None).await
    }

    /// Failed: deliver it again after `delay`.
    pub async fn nak(&self, delay: Duration) -> Result<(), BackendError> {
        self.consumers.acknowledge(&self.reply, Some(delay)).await
    }

    /// Still being worked on: the consumer's ack wait starts again, so a
    /// short ack wait redelivers soon after its holder dies, however long
    /// a live holder takes.
    pub async fn in_progress(&self) -> Result<(), BackendError> {
        self.consumers.progress(&self.reply).await
    }
}
