//! The public HTTP/1.1 ingress in front of a host's workloads.
//!
//! It runs on [`wharf_edge`] (which bounds connections, timeouts and
//! buffers, plain or TLS), checks each request's head and body size, and
//! hands it to a [`Handler`]. It serves tenants' routes only: operator
//! endpoints such as `/metrics` are on the admin listener ([`crate::admin`]),
//! so a tenant may route `/metrics` like any other path. It knows nothing
//! about routing: `wharf serve` passes one workload, a cluster host passes
//! its route table.

use crate::tls::TlsAcceptor;
use crate::workload::{ResponseBody, error_response};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::net::TcpListener;
use wharf_edge::{BodyError, ServerConfig};

/// A request body as handed to a [`Handler`]: already mapped to the error
/// type `wasi:http` expects, so it can go straight into a component.
pub type RequestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// The largest request head (target and headers) accepted; larger ones get
/// 431 before any handler runs. (The edge server's buffer is four times
/// this by default, so it bounds memory without cutting our clearer answer short.)
pub const MAX_HEAD: usize = 64 * 1024;

/// The largest request body accepted by default
/// ([`ServerConfig::max_request_body`]); a larger declared `Content-Length`
/// gets 413 at once, and a longer streamed body is cut off with an error.
pub const MAX_BODY: u64 = 16 * 1024 * 1024;

/// Whatever answers the requests an ingress accepts.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. Must not fail: every error is a response.
    fn handle(&self, request: Request<RequestBody>) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send + '_>>;
}

/// Serves tenants' requests on `listener` (HTTPS when `tls` is given)
/// within `config`'s bounds until `shutdown` resolves, then stops accepting
/// and gives open connections the config's drain time to finish.
pub async fn serve<H, S>(listener: TcpListener, tls: Option<TlsAcceptor>, config: ServerConfig, handler: Arc<H>, shutdown: S) -> std::io::Result<()>
where
    H: Handler,
    S: Future<Output = ()>,
{
    let max_body = config.max_request_body;
    let service = hyper::service::service_fn(move |request: Request<wharf_edge::Body>| {
        let handler = handler.clone();
        async move { Ok::<_, std::convert::Infallible>(dispatch(&*handler, request, max_body).await) }
    });
    wharf_edge::serve(listener, tls, config, service, shutdown).await
}

async fn dispatch<H: Handler + ?Sized>(handler: &H, request: Request<wharf_edge::Body>, max_body: u64) -> Response<ResponseBody> {
    let head: usize = uri_len(request.uri()) + request.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum::<usize>();
    if head > MAX_HEAD {
        return error_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_large",
            format!("the request's headers are {head} bytes; this ingress accepts at most {MAX_HEAD} bytes"),
        );
    }
    let declared = request.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_body) {
        return error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body is {} bytes; this ingress accepts at most {max_body} bytes (the host's --max-request-body)", declared.unwrap_or(0)),
        );
    }
    let request = request.map(|body| {
        http_body_util::Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX))
            .map_err(move |e| match e.downcast::<BodyError>() {
                Ok(e) => match *e {
                    BodyError::Hyper(e) => wasmtime_wasi_http::Error::from(e),
                    BodyError::ReadTimeout(_) => wasmtime_wasi_http::Error::ConnectionReadTimeout,
                },
                Err(_) => wasmtime_wasi_http::Error::HttpRequestBodySize(Some(max_body)),
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
