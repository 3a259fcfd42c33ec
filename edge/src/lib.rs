//! Wharf's client-facing HTTP/1.1 server: every host's ingress, its admin
//! listener and the control plane's API run on it.
//!
//! Whatever a client can make a server hold is bounded here, once, for all
//! of them ([`ServerConfig`]): open connections (past the cap a new one is
//! answered 503 and closed at once, while established ones keep working),
//! the time to send a request head, the time a kept-alive connection may sit
//! idle, the time between two pieces of a request body, the TLS handshake,
//! and each connection's buffer. A connection's phase (waiting for a head,
//! serving a request, idle between requests) is followed by [`activity`], so
//! the header and idle clocks are separate, as nginx's
//! `client_header_timeout` and `keepalive_timeout` are.
//!
//! # Architecture Invariant
//!
//! This crate knows nothing of Wharf: not workloads, routes, tokens or
//! metrics. It takes a hyper service and serves it.

mod activity;
mod body;

pub use body::{Body, BodyError};

use activity::{Activity, Watched};
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

/// The bounds one listener puts on its clients. Defaults follow nginx's
/// (`client_header_timeout`, `keepalive_timeout`, `client_body_timeout`)
/// and Envoy's edge-proxy recommendations (small per-connection buffers, a
/// connection cap, an admin endpoint off the public listener); each field
/// says which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// How long a client has to send a whole request head, from its
    /// connection's start (or the end of its TLS handshake), or from the
    /// first byte of a later request on a kept-alive connection. 10 s:
    /// below nginx's 60 s default, as slow-header (slowloris) advice for
    /// nginx recommends; a real client sends its head in one packet.
    pub header_read_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request
    /// before it is closed. 75 s, nginx's `keepalive_timeout`.
    pub idle_timeout: Duration,
    /// How long a request body may go without a new piece arriving while
    /// the server waits for one. 60 s, nginx's `client_body_timeout`.
    pub body_read_timeout: Duration,
    /// Connections open at once; past it a new connection is answered 503
    /// (plain HTTP) or closed (TLS) at once. 10,000: each connection holds
    /// a file descriptor and up to [`ServerConfig::max_buffer`]; the CLI
    /// raises the process's descriptor limit and warns if this exceeds it.
    pub max_connections: usize,
    /// The most bytes a connection buffers (hyper's read buffer, and its
    /// queue of response bytes). 256 KiB: four times the ingress's 64 KiB
    /// head limit, so a too-large head still gets a clear 431 from the
    /// handler rather than a bare close. (Envoy's edge advice is 32 KiB;
    /// Wharf accepts larger heads than Envoy's default 60 KiB would.)
    pub max_buffer: usize,
    /// How long a client has to finish a TLS handshake. 10 s.
    pub tls_handshake_timeout: Duration,
    /// How long open connections get to finish after shutdown begins. 5 s.
    pub drain_timeout: Duration,
    /// The largest request body a handler reading bodies accepts (the
    /// host's ingress does; a larger declared length gets 413 at once, a
    /// longer streamed body is cut off with an error). 16 MiB; bodies
    /// stream through the host, so raising it costs no memory per byte.
    pub max_request_body: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_buffer: 256 * 1024,
            tls_handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            max_request_body: 16 * 1024 * 1024,
        }
    }
}

/// Why a [`ServerConfig`] cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A timeout of zero would close every connection at once.
    #[error("{0} must be longer than zero")]
    ZeroTimeout(&'static str),
    /// A cap of zero connections would serve nobody.
    #[error("the connection cap must be at least 1")]
    ZeroConnections,
    /// hyper needs room for at least one ordinary head.
    #[error("the connection buffer must be at least {min} bytes (got {got})")]
    BufferTooSmall { min: usize, got: usize },
}

/// hyper's own lower bound for a connection's buffer.
const MIN_BUFFER: usize = 8192;

impl ServerConfig {
    /// Checks that every bound can be applied; the CLI calls it before binding.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (value, what) in [
            (self.header_read_timeout, "the header read timeout"),
            (self.idle_timeout, "the idle timeout"),
            (self.body_read_timeout, "the body read timeout"),
            (self.tls_handshake_timeout, "the TLS handshake timeout"),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroTimeout(what));
            }
        }
        if self.max_connections == 0 {
            return Err(ConfigError::ZeroConnections);
        }
        if self.max_buffer < MIN_BUFFER {
            return Err(ConfigError::BufferTooSmall { min: MIN_BUFFER, got: self.max_buffer });
        }
        Ok(())
    }
}

/// The answer a connection past the cap gets before it is closed.
fn refusal(max_connections: usize) -> Vec<u8> {
    let body = format!("this server already has {max_connections} open connections; try again shortly\n");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nx-wharf-error: too_many_connections\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// How often a refused connection is logged at warn level at most; the rest
/// go to debug, so a flood cannot flood the log too.
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(10);

/// Serves `service` on `listener` (HTTPS when `tls` is given) within
/// `config`'s bounds until `shutdown` resolves, then stops accepting and
/// gives open connections [`ServerConfig::drain_timeout`] to finish.
pub async fn serve<S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    config: ServerConfig,
    service: S,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    S: hyper::service::Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let config = Arc::new(config);
    let permits = Arc::new(Semaphore::new(config.max_connections));
    let refusal = refusal(config.max_connections);
    let mut last_warned: Option<Instant> = None;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Refused before anything is spent on it: a plain client gets a
            // 503 if the socket takes it without waiting, a TLS client (we
            // cannot answer in clear text) a close.
            if tls.is_none() {
                let _ = stream.try_write(&refusal);
            }
            drop(stream);
            if last_warned.is_none_or(|at| at.elapsed() >= REFUSAL_WARN_EVERY) {
                last_warned = Some(Instant::now());
                tracing::warn!("refusing connections (first: {peer}): {} already open; raise the cap if this host can hold more", config.max_connections);
            } else {
                tracing::debug!("refused connection from {peer}: {} already open", config.max_connections);
            }
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("could not set TCP_NODELAY for {peer}: {e}");
        }
        let (service, config, stop, tls) = (service.clone(), config.clone(), stop_rx.clone(), tls.clone());
        connections.spawn(async move {
            // Held for the connection's whole life, handshake included.
            let _permit = permit;
            connection(stream, peer, tls, &config, service, stop).await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drain = config.drain_timeout;
    let drained = tokio::time::timeout(drain, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("{} connection(s) still open after {drain:?}; closing them", connections.len());
        connections.abort_all();
    }
    Ok(())
}

/// One connection: its TLS handshake if any, then its requests.
async fn connection<S, B>(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    config: &ServerConfig,
    service: S,
    mut stop: watch::Receiver<bool>,
) where
    S: hyper::service::Service<Request<Body>, Response = Response<B>, Error = Infallible> + Send + Sync + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let Some(acceptor) = tls else {
        return http(stream, peer, config, service, stop).await;
    };
    // The handshake runs here, in the connection's own task, so a slow or
    // broken client never holds up accepting the next one.
    let timeout = config.tls_handshake_timeout;
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(timeout, acceptor.accept(stream)) => handshake,
        _ = stop.changed() => return,
    };
    match handshake {
        Ok(Ok(stream)) => http(stream, peer, config, service, stop).await,
        Ok(Err(e)) => tracing::debug!("TLS handshake with {peer} failed: {e}"),
        Err(_) => tracing::debug!("TLS handshake with {peer} timed out after {timeout:?}"),
    }
}

/// Serves one connection's requests until the client closes it, a clock of
/// [`ServerConfig`] runs out, or `stop` changes (then the request in
/// progress may finish).
async fn http<IO, S, B>(io: IO, peer: SocketAddr, config: &ServerConfig, service: S, mut stop: watch::Receiver<bool>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Body>, Response = Response<B>, Error = Infallible> + Send + Sync + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::new());
    let body_read_timeout = config.body_read_timeout;
    let served = activity.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        served.busy();
        let response = service.call(request.map(|body| Body::with_read_timeout(body, body_read_timeout)));
        let served = served.clone();
        async move {
            let response = response.await?;
            Ok::<_, Infallible>(response.map(|body| activity::Tracked::new(body, served)))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // hyper's own header clock runs from the moment it waits for a head,
        // idle time included; ours (below) tells the two apart. hyper's is
        // kept as a backstop that holds even if ours were wrong.
        .header_read_timeout(config.idle_timeout.saturating_add(config.header_read_timeout))
        .keep_alive(true)
        .max_buf_size(config.max_buffer)
        .serve_connection(TokioIo::new(Watched::new(io, activity.clone())), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result { tracing::debug!("connection from {peer} ended: {e}"); }
        }
        expired = activity::expiry(&activity, config.header_read_timeout, config.idle_timeout) => {
            // Dropping the connection closes the socket; nothing is in flight.
            tracing::debug!("closing connection from {peer}: {expired}");
        }
        _ = stop.changed() => {
            connection.as_mut().graceful_shutdown();
            if let Err(e) = connection.await { tracing::debug!("connection from {peer} ended: {e}"); }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_is_a_complete_response() {
        let text = String::from_utf8(refusal(7)).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(body.contains("7 open connections"));
    }

    #[test]
    fn validate_names_the_bad_bound() {
        assert_eq!(ServerConfig::default().validate(), Ok(()));
        let zero = ServerConfig { idle_timeout: Duration::ZERO, ..ServerConfig::default() };
        assert_eq!(zero.validate(), Err(ConfigError::ZeroTimeout("the idle timeout")));
        let none = ServerConfig { max_connections: 0, ..ServerConfig::default() };
        assert_eq!(none.validate(), Err(ConfigError::ZeroConnections));
        let small = ServerConfig { max_buffer: 100, ..ServerConfig::default() };
        assert_eq!(small.validate(), Err(ConfigError::BufferTooSmall { min: MIN_BUFFER, got: 100 }));
    }
}
