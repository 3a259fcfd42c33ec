//! The API's HTTPS listener: a TCP listener whose connections axum gets only
//! after their TLS handshake.
//!
//! Handshakes run in tasks of their own, so a slow or broken client never
//! holds up accepting others; a failed one is logged at debug and dropped.
//! Handshakes still under way when the server stops are cancelled with the
//! listener. (The acceptor is built by `wharf_host::tls::load`; this crate
//! does not depend on the host, so it takes the acceptor as it is.)

use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client gets to complete the handshake (the ingress gives the same).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections and hands out those that finished a handshake.
pub(crate) struct TlsListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    /// Handshakes in progress; owned by this listener alone (axum polls it
    /// from its accept loop), so dropping the listener cancels them.
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    pub(crate) fn new(listener: TcpListener, acceptor: TlsAcceptor) -> Self {
        TlsListener { listener, acceptor, handshakes: JoinSet::new() }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    /// Cancel-safe, as axum requires: a connection is either still in the
    /// kernel's queue or its handshake is in `handshakes`.
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let acceptor = self.acceptor.clone();
                        self.handshakes.spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => Some((stream, peer)),
                                Ok(Err(e)) => {
                                    tracing::debug!("TLS handshake with API client {peer} failed: {e}");
                                    None
                                }
                                Err(_) => {
                                    tracing::debug!("TLS handshake with API client {peer} timed out after {HANDSHAKE_TIMEOUT:?}");
                                    None
                                }
                            }
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!("API accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(done) = self.handshakes.join_next() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}
