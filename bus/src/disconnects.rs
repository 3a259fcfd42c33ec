//! Hearing at once that another client's connection to the bus closed: [`Bus::client_disconnects`](crate::Bus::client_disconnects).
//!
//! A process that dies closes its NATS connection, and the server says so
//! straight away; that beats waiting for missed heartbeats by seconds. It is
//! a hint, not a verdict: a client whose server shuts down or goes away
//! reconnects to another one within moments, and a hung process keeps its
//! connection open. Heartbeats stay the truth; this only lets a watcher act
//! sooner on the clear cases.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;

use crate::nats;

/// A client whose connection to NATS closed, from the server's disconnect advisory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientGone {
    /// The name the client gave its connection (e.g. `wharf-host-a1`; see
    /// [`NatsOptions::name`](crate::NatsOptions::name)), empty if it gave none.
    pub name: String,
    /// The user it authenticated as, empty without authentication.
    pub user: String,
    /// Its NATS account (`$G` on a server without accounts).
    pub account: String,
    /// The server it was connected to (its `server_name`).
    pub server: String,
    pub reason: DisconnectReason,
}

/// Why the server says a connection closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The client closed it, or its process ended (a SIGKILL included: the
    /// kernel closes the socket). The clearest sign that the client is gone.
    ClientClosed,
    /// The server closing it is shutting down; the client reconnects to
    /// another server of the cluster and is not gone.
    ServerShutdown,
    /// Anything else, as the server words it (`Stale Connection`,
    /// `Slow Consumer (Write Deadline)`, `Authentication Expired`, ...).
    Other(String),
}

impl DisconnectReason {
    /// The reason a server gives, e.g. `Client Closed`.
    pub(crate) fn from_server(reason: &str) -> DisconnectReason {
        match reason {
            "Client Closed" => DisconnectReason::ClientClosed,
            "Server Shutdown" => DisconnectReason::ServerShutdown,
            other => DisconnectReason::Other(other.to_owned()),
        }
    }
}

/// The stream of [`Bus::client_disconnects`](crate::Bus::client_disconnects).
///
/// Over NATS it yields one [`ClientGone`] per advisory, from every server of
/// the cluster, and follows the system connection across reconnects (an
/// advisory sent while it was itself reconnecting is missed). In-process it
/// never yields: there are no other clients to lose. It ends only when the
/// bus's connection is gone for good.
pub struct ClientDisconnects {
    inner: DisconnectsInner,
}

enum DisconnectsInner {
    Nats(nats::NatsDisconnects),
    Never,
}

impl ClientDisconnects {
    pub(crate) fn nats(disconnects: nats::NatsDisconnects) -> ClientDisconnects {
        ClientDisconnects {
            inner: DisconnectsInner::Nats(disconnects),
        }
    }

    pub(crate) fn never() -> ClientDisconnects {
        ClientDisconnects {
            inner: DisconnectsInner::Never,
        }
    }
}

impl Stream for ClientDisconnects {
    type Item = ClientGone;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ClientGone>> {
        match &mut self.inner {
            DisconnectsInner::Nats(disconnects) => Pin::new(disconnects).poll_next(cx),
            DisconnectsInner::Never => Poll::Pending,
        }
    }
}
