//! The NATS implementation: core NATS for messages, JetStream KV and Object Store for state.
//!
//! Names, payload sizes and values have been checked by the caller in
//! `lib.rs`, `kv.rs` or `objects.rs`; this module only translates calls and
//! errors between async-nats and the bus's types. Submodules: `buckets`
//! (creating buckets and keeping their settings), `kv` (KV operations and
//! watches that outlive node losses), `objects`, `system` (the
//! system-account connection and its disconnect advisories) and `tls`
//! (certificates, and what a failed handshake means).

mod buckets;
mod consumers;
mod data;
mod kv;
mod objects;
mod system;
mod tls;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{ConnectErrorKind, Event, RequestErrorKind, ServerAddr};
use bytes::Bytes;
use tokio::sync::watch;

pub(crate) use consumers::{Consumers, ack_info, open_stream};
pub use consumers::{ConsumerAsk, ConsumerPolicy, ConsumerRules};
pub(crate) use data::{BrokeredKv, BrokeredObjects, DataBroker, serve as serve_data};
pub use data::{DataAsk, DataPolicy, DataRules};
pub(crate) use kv::{NatsKv, NatsWatch, Written, message_id};
pub(crate) use objects::NatsObjects;
pub(crate) use system::NatsDisconnects;
use tls::TlsSetup;
pub use tls::{ClientCertificate, NatsTls};

use crate::error::{
    BackendError, ConnectError, PublishError, RequestError, SubscribeError, TlsFailure,
};
use crate::{ConnectionState, Message, Subscription, SubscriptionInner};

/// The oldest nats-server accepted: async-nats 0.51 cannot create KV buckets on 2.9.
const MIN_SERVER_VERSION: (u64, u64) = (2, 10);

/// How to connect to NATS.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// The connection's name in the server's monitoring and logs, e.g. `wharf-host-a1`.
    pub name: String,
    pub auth: NatsAuth,
    /// How long one attempt to reach a server may take.
    pub connect_timeout: Duration,
    /// Copies of each bucket the bus creates, on different servers of a
    /// cluster. `None`: one per server the cluster has, up to 3; an existing
    /// bucket with more copies keeps them. `Some(n)`: exactly `n`, also for
    /// existing buckets opened with [`Bus::kv_with`](crate::Bus::kv_with).
    pub replicas: Option<usize>,
    /// A user of the server's system account, for a second connection that
    /// hears the server's disconnect advisories
    /// ([`Bus::client_disconnects`](crate::Bus::client_disconnects)); `None`: no such connection.
    pub system_auth: Option<NatsAuth>,
    /// TLS, required on every connection when given; `None`: plain TCP
    /// unless the URL says `tls://` or the server requires TLS.
    pub tls: Option<NatsTls>,
    /// The prefix of this connection's request inboxes, where replies and
    /// JetStream watches and reads are delivered; `None`: async-nats'
    /// `_INBOX`. A host uses its own (`_INBOX.host-<id>`), the only inboxes
    /// its NATS identity may subscribe to.
    pub inbox_prefix: Option<String>,
    /// The subject of a consumer broker (see [`Bus::serve_consumer_broker`](crate::Bus::serve_consumer_broker)) that makes
    /// this connection's JetStream consumers (KV watches, key listings,
    /// stream pulls) on its behalf; `None`: it makes them itself. A host
    /// uses one: its NATS identity may not make consumers, because a
    /// consumer may deliver anywhere.
    pub consumer_broker: Option<String>,
    /// The subject of a data broker (see [`Bus::serve_data_broker`](crate::Bus::serve_data_broker))
    /// that makes every bucket call of this connection on its behalf (KV
    /// reads, writes and pages of keys; object reads; watches' consumers
    /// come from [`NatsOptions::consumer_broker`]); `None`: it makes them
    /// itself. A host uses one, so that it sends JetStream no request at
    /// all: JetStream answers a request on whatever reply subject it
    /// names, with the server's rights. The broker allows a host only what
    /// it follows and the data of namespaces it runs.
    pub data_broker: Option<String>,
    /// Subject prefixes (`wharf.msg.`) whose publishes and requests the
    /// data broker makes for this connection (with a `data_broker` only):
    /// subjects a stream may capture, where JetStream acknowledges what it
    /// stores on whatever reply subject the publisher named, with the
    /// server's rights. The broker names none, or its own inbox.
    pub brokered_subjects: Vec<String>,
}

impl Default for NatsOptions {
    fn default() -> NatsOptions {
        NatsOptions {
            name: "wharf".to_owned(),
            auth: NatsAuth::None,
            connect_timeout: Duration::from_secs(5),
            replicas: None,
            system_auth: None,
            tls: None,
            inbox_prefix: None,
            consumer_broker: None,
            data_broker: None,
            brokered_subjects: Vec::new(),
        }
    }
}

/// How the connection proves who it is to the server.
#[derive(Clone, Default)]
pub enum NatsAuth {
    /// No credentials, for servers without authorization.
    #[default]
    None,
    /// A user and password from the server's `authorization` block.
    UserPassword { user: String, password: String },
    /// A `.creds` file holding a user JWT and NKey seed (decentralised auth).
    CredentialsFile(PathBuf),
    /// A file holding a user NKey seed (`SU…`), whose public key the
    /// server's config names as a user (`wharf nats add-host` writes both).
    NkeySeedFile(PathBuf),
}

// Hand-written so that a password never ends up in a log.
impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
            NatsAuth::CredentialsFile(path) => {
                f.debug_tuple("CredentialsFile").field(path).finish()
            }
            NatsAuth::NkeySeedFile(path) => f.debug_tuple("NkeySeedFile").field(path).finish(),
        }
    }
}

pub(crate) struct NatsBus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    /// Fed by the client's event callback.
    connection: watch::Receiver<ConnectionState>,
    /// [`NatsOptions::replicas`].
    replicas: Option<usize>,
    /// The connection to the system account, if credentials for it were given.
    system: Option<async_nats::Client>,
    /// Who makes this connection's consumers.
    consumers: Consumers,
    /// [`NatsOptions::data_broker`].
    data_broker: Option<DataBroker>,
    /// [`NatsOptions::brokered_subjects`].
    brokered_subjects: Vec<String>,
}

impl NatsBus {
    pub(crate) async fn connect(urls: &str, options: NatsOptions) -> Result<NatsBus, ConnectError> {
        let addrs = server_addrs(urls)?;
        let (state, connection) = watch::channel(ConnectionState::Connected);
        let state = Arc::new(state);
        let on_event = move |event| {
            let state = Arc::clone(&state);
            async move {
                let new = match event {
                    Event::Connected => ConnectionState::Connected,
                    Event::Disconnected => ConnectionState::Disconnected,
                    _ => return,
                };
                // Only real changes wake receivers: the first connect's
                // event arrives after the channel already says `Connected`,
                // and must not look like a reconnect to `NatsWatch`.
                state.send_if_modified(|current| {
                    let changed = *current != new;
                    *current = new;
                    changed
                });
            }
        };
        let tls = match &options.tls {
            Some(tls) => Some(TlsSetup::load(tls).await?),
            None => None,
        };
        let mut connect = client_options(
            &options.name,
            &options.auth,
            options.connect_timeout,
            tls.as_ref(),
        )
        .await?
        .event_callback(on_event);
        if let Some(prefix) = &options.inbox_prefix {
            connect = connect.custom_inbox_prefix(prefix);
        }
        let client = open(connect, &addrs, urls, tls.as_ref()).await?;

        let info = client.server_info();
        if !version_at_least(&info.version, MIN_SERVER_VERSION) {
            return Err(ConnectError::ServerTooOld {
                url: urls.to_owned(),
                version: info.version,
            });
        }
        if !info.jetstream {
            return Err(ConnectError::JetStreamDisabled {
                url: urls.to_owned(),
            });
        }
        let jetstream = jetstream::new(client.clone());
        // The server may run JetStream without granting it to this account.
        // A connection whose brokers make its JetStream calls sends none itself.
        if options.data_broker.is_none() {
            jetstream
                .query_account()
                .await
                .map_err(|err| ConnectError::JetStreamUnavailable {
                    url: urls.to_owned(),
                    source: Box::new(err),
                })?;
        }
        let system = match &options.system_auth {
            Some(auth) => Some(system::connect(&addrs, urls, &options, auth, tls.as_ref()).await?),
            None => None,
        };
        let consumers = match options.consumer_broker {
            Some(subject) => Consumers::Broker { client: client.clone(), subject },
            None => own_consumers(&client, &jetstream, options.replicas),
        };
        let data_broker = options.data_broker.map(|subject| DataBroker::new(client.clone(), subject, connection.clone()));
        Ok(NatsBus {
            client,
            jetstream,
            connection,
            replicas: options.replicas,
            system,
            consumers,
            data_broker,
            brokered_subjects: options.brokered_subjects,
        })
    }

    /// The data broker, if it makes the publishes and requests on `subject`
    /// ([`NatsOptions::brokered_subjects`]).
    fn broker_of(&self, subject: &str) -> Option<&DataBroker> {
        self.data_broker.as_ref().filter(|_| self.brokered_subjects.iter().any(|prefix| subject.starts_with(prefix.as_str())))
    }

    pub(crate) async fn publish(&self, subject: &str, payload: Bytes) -> Result<(), PublishError> {
        if let Some(broker) = self.broker_of(subject) {
            return broker.publish(subject, payload).await;
        }
        self.client
            .publish(subject.to_owned(), payload)
            .await
            .map_err(|err| PublishError::Unavailable {
                subject: subject.to_owned(),
                source: Box::new(err),
            })
    }

    pub(crate) async fn subscribe(
        &self,
        subject: &str,
        group: Option<&str>,
    ) -> Result<Subscription, SubscribeError> {
        let subscriber = match group {
            None => self.client.subscribe(subject.to_owned()).await,
            Some(group) => {
                self.client
                    .queue_subscribe(subject.to_owned(), group.to_owned())
                    .await
            }
        };
        subscriber
            .map(|subscriber| Subscription {
                inner: SubscriptionInner::Nats(subscriber),
            })
            .map_err(|err| SubscribeError::Unavailable {
                subject: subject.to_owned(),
                source: Box::new(err),
            })
    }

    pub(crate) async fn request(
        &self,
        subject: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Message, RequestError> {
        if let Some(broker) = self.broker_of(subject) {
            return broker.request(subject, payload, timeout).await;
        }
        let request = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        match self.client.send_request(subject.to_owned(), request).await {
            Ok(reply) => Ok(message(reply)),
            Err(err) => {
                let subject = subject.to_owned();
                Err(match err.kind() {
                    RequestErrorKind::NoResponders => RequestError::NoResponders { subject },
                    RequestErrorKind::TimedOut => RequestError::TimedOut { subject, timeout },
                    _ => RequestError::Unavailable {
                        subject,
                        source: Box::new(err),
                    },
                })
            }
        }
    }

    pub(crate) fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    pub(crate) fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub(crate) fn consumers(&self) -> &Consumers {
        &self.consumers
    }

    /// Bucket `bucket` through the data broker, if this connection has one.
    pub(crate) fn brokered_kv(&self, bucket: &str) -> Option<BrokeredKv> {
        self.data_broker.as_ref().map(|broker| BrokeredKv::new(bucket, broker.clone(), self.consumers.clone()))
    }

    /// Serves consumer asks on `subject` in queue group `group` (see
    /// [`consumers::serve`]), in a task of its own, making what `policy`
    /// allows itself.
    pub(crate) async fn serve_consumer_broker(&self, subject: &str, group: &str, policy: ConsumerPolicy) -> Result<(), SubscribeError> {
        let asks = self.client.queue_subscribe(subject.to_owned(), group.to_owned()).await.map_err(|err| SubscribeError::Unavailable { subject: subject.to_owned(), source: Box::new(err) })?;
        let own = own_consumers(&self.client, &self.jetstream, self.replicas);
        tokio::spawn(consumers::serve(self.client.clone(), asks, own, policy));
        Ok(())
    }

    pub(crate) fn new_inbox(&self) -> String {
        self.client.new_inbox()
    }

    pub(crate) fn max_payload(&self) -> usize {
        self.client.max_payload()
    }

    pub(crate) fn connection_changes(&self) -> watch::Receiver<ConnectionState> {
        self.connection.clone()
    }
}

/// Consumers this connection makes itself, its streams with as many
/// copies as [`NatsBus::replicas_for_new`] would give.
fn own_consumers(client: &async_nats::Client, jetstream: &jetstream::Context, replicas: Option<usize>) -> Consumers {
    let client = client.clone();
    Consumers::Own { jetstream: jetstream.clone(), replicas: Arc::new(move || buckets::replicas_for(&client, replicas)) }
}

/// Parses `urls`, one NATS server URL or several separated by commas (the
/// members of a cluster). The client tries them in random order, at first
/// and whenever it reconnects, and adds the other members each server
/// advertises.
fn server_addrs(urls: &str) -> Result<Vec<ServerAddr>, ConnectError> {
    urls.split(',')
        .map(str::trim)
        .map(|url| {
            if url.is_empty() {
                return Err(ConnectError::InvalidUrl {
                    url: urls.to_owned(),
                    source: "the list holds an empty URL".into(),
                });
            }
            url.parse::<ServerAddr>()
                .map_err(|err| ConnectError::InvalidUrl {
                    url: url.to_owned(),
                    source: Box::new(err),
                })
        })
        .collect()
}

/// The options every connection of the bus shares: its name, credentials, TLS and patience.
async fn client_options(
    name: &str,
    auth: &NatsAuth,
    timeout: Duration,
    tls: Option<&TlsSetup>,
) -> Result<async_nats::ConnectOptions, ConnectError> {
    // `retry_on_initial_connect` is deliberately not set: a wrong URL must
    // fail here with a clear error rather than retry in the background.
    // Once connected, reconnection is unlimited, so a NATS restart, the loss
    // of a cluster node or a network blip never leaves a Wharf process
    // disconnected for good.
    let connect = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(timeout)
        .max_reconnects(None);
    let connect = match tls {
        Some(tls) => tls.apply(connect),
        None => connect,
    };
    Ok(match auth {
        NatsAuth::None => connect,
        NatsAuth::UserPassword { user, password } => {
            connect.user_and_password(user.clone(), password.clone())
        }
        NatsAuth::CredentialsFile(path) => {
            connect.credentials_file(path).await.map_err(|source| {
                ConnectError::CredentialsFile {
                    path: path.clone(),
                    source,
                }
            })?
        }
        NatsAuth::NkeySeedFile(path) => {
            let seed = tokio::fs::read_to_string(path).await.map_err(|source| {
                ConnectError::CredentialsFile {
                    path: path.clone(),
                    source,
                }
            })?;
            connect.nkey(seed.trim().to_owned())
        }
    })
}

/// Connects with `options` (whose TLS is `tls`) to one of `addrs` (`urls` as given, for errors).
async fn open(
    options: async_nats::ConnectOptions,
    addrs: &[ServerAddr],
    urls: &str,
    tls: Option<&TlsSetup>,
) -> Result<async_nats::Client, ConnectError> {
    options.connect(addrs).await.map_err(|err| {
        let url = urls.to_owned();
        let kind = err.kind();
        // Also without TLS options: a `tls://` URL, or a server that requires TLS, brings TLS in.
        let client_certificate = tls.is_some_and(TlsSetup::has_client_certificate);
        let failure = tls::failure(&err, client_certificate)
            .or_else(|| (kind == ConnectErrorKind::Tls).then_some(TlsFailure::Other));
        let source: BackendError = Box::new(err);
        if let Some(failure) = failure {
            return ConnectError::Tls {
                url,
                failure,
                source,
            };
        }
        match kind {
            ConnectErrorKind::ServerParse => ConnectError::InvalidUrl { url, source },
            ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                ConnectError::Unauthorized { url, source }
            }
            _ => ConnectError::Unreachable { url, source },
        }
    })
}

/// Converts a received message; status-only messages never reach subscriptions.
pub(crate) fn message(message: async_nats::Message) -> Message {
    Message {
        subject: message.subject.to_string(),
        payload: message.payload,
        reply: message.reply.map(|reply| reply.to_string()),
    }
}

/// Whether a server version such as `2.10.4` or `2.11.0-RC.1` is at least `(major, minor)`.
fn version_at_least(version: &str, minimum: (u64, u64)) -> bool {
    let mut numbers = version.split('.').map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u64>()
    });
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= minimum,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_are_compared() {
        for (version, expected) in [
            ("2.10.0", true),
            ("2.15.1", true),
            ("2.11.0-RC.1", true),
            ("3.0.0", true),
            ("2.9.10", false),
            ("1.4.1", false),
            ("", false),
            ("garbage", false),
        ] {
            assert_eq!(
                version_at_least(version, MIN_SERVER_VERSION),
                expected,
                "{version}"
            );
        }
    }

    #[test]
    fn urls_are_split_on_commas_and_each_is_checked() {
        let addrs = server_addrs("nats://127.0.0.1:4222, nats://127.0.0.1:4223,127.0.0.1:4224")
            .expect("three URLs");
        assert_eq!(addrs.len(), 3);
        for (urls, bad) in [
            (
                "nats://127.0.0.1:4222,nats://127.0.0.1:notaport",
                "nats://127.0.0.1:notaport",
            ),
            (
                "nats://127.0.0.1:4222,,nats://127.0.0.1:4223",
                "nats://127.0.0.1:4222,,nats://127.0.0.1:4223",
            ),
            ("", ""),
            ("http://127.0.0.1:4222", "http://127.0.0.1:4222"),
        ] {
            match server_addrs(urls) {
                Err(ConnectError::InvalidUrl { url, .. }) => assert_eq!(url, bad, "{urls}"),
                other => panic!("{urls}: {other:?}"),
            }
        }
    }
}
