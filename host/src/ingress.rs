//! The HTTP/1.1 server in front of a host's workloads.
//!
//! It accepts connections (plain, or TLS with an acceptor from
//! [`crate::tls`]), answers `/metrics` itself, and hands every other request
//! to a [`Handler`]. It knows nothing about routing: `wharf serve` passes one
//! workload, a cluster host passes its route table.

use crate::metrics::HostMetrics;
use crate::tls::{self, TlsAcceptor};
use crate::workload::{ResponseBody, error_response, full_body};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// The path Wharf reserves on every ingress for Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";

/// A request body as handed to a [`Handler`]: already mapped to the error
/// type `wasi:http` expects, so it can go straight into a component.
pub type RequestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// The largest request head (target and headers) accepted; larger ones get
/// 431 before any handler runs. (hyper's own buffer limit is set to four
/// times this, so it bounds memory without cutting our clearer answer short.)
pub const MAX_HEAD: usize = 64 * 1024;

/// The largest request body accepted; a larger declared `Content-Length`
/// gets 413 at once, and a longer streamed body is cut off with an error.
pub const MAX_BODY: u64 = 16 * 1024 * 1024;

/// How long open connections get to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Whatever answers the requests an ingress accepts.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. Must not fail: every error is a response.
    fn handle(&self, request: Request<RequestBody>) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send + '_>>;
}

/// Serves HTTP/1.1 on `listener` (HTTPS when `tls` is given) until
/// `shutdown` resolves, then stops accepting and gives open connections a
/// few seconds to finish.
pub async fn serve<H, S>(listener: TcpListener, tls: Option<TlsAcceptor>, handler: Arc<H>, metrics: HostMetrics, shutdown: S) -> std::io::Result<()>
where
    H: Handler,
    S: Future<Output = ()>,
{
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
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
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("could not set TCP_NODELAY for {peer}: {e}");
        }
        let handler = handler.clone();
        let metrics = metrics.clone();
        let mut stop = stop_rx.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let Some(tls) = tls else {
                return serve_connection(TokioIo::new(stream), peer, handler, metrics, stop).await;
            };
            // The handshake runs here, in the connection's own task, so a
            // slow or broken client never holds up accepting the next one.
            let stream = tokio::select! {
                stream = tls::handshake(&tls, stream, peer) => stream,
                _ = stop.changed() => None,
            };
            if let Some(stream) = stream {
                serve_connection(TokioIo::new(stream), peer, handler, metrics, stop).await;
            }
        });
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("{} connection(s) still open after {DRAIN_TIMEOUT:?}; closing them", connections.len());
        connections.abort_all();
    }
    Ok(())
}

/// Serves one connection's requests until the client closes it or `stop`
/// changes, then lets the request in progress finish.
async fn serve_connection<H, IO>(io: TokioIo<IO>, peer: SocketAddr, handler: Arc<H>, metrics: HostMetrics, mut stop: tokio::sync::watch::Receiver<bool>)
where
    H: Handler,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let handler = handler.clone();
        let metrics = metrics.clone();
        async move { Ok::<_, std::convert::Infallible>(dispatch(&*handler, &metrics, request).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new().keep_alive(true).max_buf_size(MAX_HEAD * 4).serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result { tracing::debug!("connection from {peer} ended: {e}"); }
        }
        _ = stop.changed() => {
            connection.as_mut().graceful_shutdown();
            if let Err(e) = connection.await { tracing::debug!("connection from {peer} ended: {e}"); }
        }
    }
}

async fn dispatch<H: Handler + ?Sized>(handler: &H, metrics: &HostMetrics, request: Request<Incoming>) -> Response<ResponseBody> {
    if request.uri().path() == METRICS_PATH {
        if request.method() != http::Method::GET {
            return error_response(StatusCode::METHOD_NOT_ALLOWED, "bad_request", format!("{METRICS_PATH} only answers GET"));
        }
        let mut response = Response::new(full_body(Bytes::from(metrics.encode())));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        return response;
    }
    let head: usize = uri_len(request.uri()) + request.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum::<usize>();
    if head > MAX_HEAD {
        return error_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_large",
            format!("the request's headers are {head} bytes; this ingress accepts at most {MAX_HEAD} bytes"),
        );
    }
    let declared = request.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY) {
        return error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body is {} bytes; this ingress accepts at most {MAX_BODY} bytes", declared.unwrap_or(0)),
        );
    }
    let request = request.map(|body| {
        http_body_util::Limited::new(body, usize::try_from(MAX_BODY).unwrap_or(usize::MAX))
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => wasmtime_wasi_http::Error::from(*e),
                Err(_) => wasmtime_wasi_http::Error::HttpRequestBodySize(Some(MAX_BODY)),
            })
            .boxed_unsync()
    });
    handler.handle(request).await
}

/// A single workload answers every request (what `wharf serve` runs).
impl Handler for crate::workload::Workload {
    fn handle(&self, request: Request<RequestBody>) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send + '_>> {
        Box::pin(crate::workload::Workload::handle(self, request))
    }
}

/// The length of a URI as written, without writing it anywhere.
fn uri_len(uri: &http::Uri) -> usize {
    struct Count(usize);
    impl std::fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail.
    let _ = std::fmt::Write::write_fmt(&mut count, format_args!("{uri}"));
    count.0
}

#[cfg(test)]
mod tests {
    use super::uri_len;

    #[test]
    fn uri_len_is_the_length_of_the_written_uri() {
        for uri in ["/", "/a/b?x=1&y=%20", "http://example.com:8080/path?q", "*"] {
            let uri: http::Uri = uri.parse().expect("a valid uri");
            assert_eq!(uri_len(&uri), uri.to_string().len(), "{uri}");
        }
    }
}
