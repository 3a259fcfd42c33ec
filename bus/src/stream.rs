//! At-least-once delivery from a JetStream stream: a durable pull consumer
//! that many processes share (each message goes to one of them), messages
//! acknowledged by the caller after it handled them, redelivered after a
//! negative acknowledgement or when the acknowledgement does not come in
//! time, with the number of deliveries so far on each.
//!
//! Over NATS only: the in-process bus has no streams, and says so.

use crate::error::BackendError;
use crate::{Backend, Bus};
use async_nats::jetstream::{self, AckKind, consumer::pull};
use bytes::Bytes;
use futures::StreamExt;
use std::time::Duration;
use thiserror::Error;

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

/// The messages of a stream consumer, in the order the server hands them out.
pub struct StreamMessages {
    messages: pull::Stream,
    stream: String,
    consumer: String,
}

/// One delivered message; acknowledge it with [`Delivered::ack`] or ask
/// for it again with [`Delivered::nak`].
pub struct Delivered {
    /// The subject it was published to.
    pub subject: String,
    pub payload: Bytes,
    /// Which delivery this is, from 1.
    pub delivered: u64,
    message: jetstream::Message,
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

    async fn open_stream(&self, name: &str, subject: &str) -> Result<jetstream::stream::Stream, StreamError> {
        let Backend::Nats(nats) = &self.backend else {
            return Err(StreamError::Unsupported { stream: name.to_owned() });
        };
        let js = nats.jetstream();
        let failed = |source: BackendError| StreamError::Stream { stream: name.to_owned(), subject: subject.to_owned(), source };
        let stream = match js.get_stream(name).await {
            Ok(stream) => stream,
            Err(e) if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref js_error) if js_error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => js
                .get_or_create_stream(jetstream::stream::Config {
                    name: name.to_owned(),
                    subjects: vec![subject.to_owned()],
                    num_replicas: nats.replicas_for_new(),
                    ..Default::default()
                })
                .await
                .map_err(|e| failed(Box::new(e)))?,
            Err(e) => return Err(failed(Box::new(e))),
        };
        let mut config = stream.cached_info().config.clone();
        if !config.subjects.iter().any(|s| s == subject) {
            config.subjects.push(subject.to_owned());
            js.update_stream(&config).await.map_err(|e| failed(Box::new(e)))?;
        }
        Ok(stream)
    }

    /// Opens (creating what is missing, see [`Bus::ensure_stream`]) the
    /// stream and durable consumer of `config` and starts pulling messages.
    pub async fn stream_consumer(&self, config: &StreamConsumerConfig) -> Result<StreamMessages, StreamError> {
        let stream = self.open_stream(&config.stream, &config.subject).await?;
        let consumer_failed =
            |source: BackendError| StreamError::Consumer { stream: config.stream.clone(), consumer: config.consumer.clone(), source };
        // Create or update: a redeploy that changes max_deliver or the ack
        // wait reaches the consumer every host shares.
        let consumer: jetstream::consumer::PullConsumer = stream
            .create_consumer(
                pull::Config {
                    durable_name: Some(config.consumer.clone()),
                    filter_subject: config.subject.clone(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    max_deliver: i64::from(config.max_deliver),
                    max_ack_pending: i64::from(config.max_ack_pending),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| consumer_failed(Box::new(e)))?;
        let messages = consumer.messages().await.map_err(|e| consumer_failed(Box::new(e)))?;
        Ok(StreamMessages { messages, stream: config.stream.clone(), consumer: config.consumer.clone() })
    }
}

impl StreamMessages {
    /// The next message; `None` once the consumer is gone for good. A
    /// passing error (a missed heartbeat while reconnecting) is returned and
    /// the stream goes on.
    pub async fn next(&mut self) -> Option<Result<Delivered, StreamError>> {
        let message = self.messages.next().await?;
        Some(match message {
            Ok(message) => {
                let delivered = message.info().map(|info| u64::try_from(info.delivered).unwrap_or(1)).unwrap_or(1);
                Ok(Delivered { subject: message.subject.to_string(), payload: message.payload.clone(), delivered, message })
            }
            Err(e) => Err(StreamError::Consumer { stream: self.stream.clone(), consumer: self.consumer.clone(), source: Box::new(e) }),
        })
    }
}

impl Delivered {
    /// Done with: never delivered again.
    pub async fn ack(&self) -> Result<(), BackendError> {
        self.message.ack().await
    }

    /// Failed: deliver it again after `delay`.
    pub async fn nak(&self, delay: Duration) -> Result<(), BackendError> {
        self.message.ack_with(AckKind::Nak(Some(delay))).await
    }
}
