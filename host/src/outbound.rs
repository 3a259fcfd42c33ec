//! Sends a component's outbound request once the allow-list has passed it:
//! resolves the name once, refuses addresses an admin has not opened
//! (loopback, link-local, private ranges, this host's own addresses; see
//! [`wharf_proto::egress`]), and connects to the very address it checked,
//! so a second lookup (DNS rebinding) cannot send the request elsewhere.
//!
//! The rest follows `wasi:http`'s default client: HTTPS with the webpki
//! roots (the server name is the URL's host, not the address), HTTP/1.1,
//! and the request's connect, first-byte and between-bytes timeouts.

use http::{Request, Response};
use http_body_util::BodyExt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody};
use wharf_proto::egress::PrivateEgress;

/// `wasi:http`'s own default for each timeout a request leaves unset.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Why an outbound request was not sent, with what the guest sees.
pub(crate) struct Refused {
    /// For the service's log: says which address and why.
    pub(crate) note: String,
    pub(crate) error: HttpError,
}

type IoFuture = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

/// Resolves, checks and sends `request`.
pub(crate) async fn send(request: Request<WasiBody>, options: Option<RequestOptions>, private: &PrivateEgress) -> Result<(Response<WasiBody>, IoFuture), Refused> {
    let failed = |error: HttpError| Refused { note: String::new(), error };
    let uri = request.uri().clone();
    let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
    let host = uri.host().ok_or_else(|| failed(HttpError::HttpRequestUriInvalid))?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let timeout = |pick: fn(&RequestOptions) -> Option<Duration>| options.as_ref().and_then(pick).unwrap_or(DEFAULT_TIMEOUT);
    let connect_timeout = timeout(|o| o.connect_timeout);

    let addresses: Vec<SocketAddr> = match tokio::time::timeout(connect_timeout, tokio::net::lookup_host((host.as_str(), port))).await {
        Err(_) => return Err(failed(HttpError::DnsTimeout)),
        Ok(Err(e)) => return Err(failed(HttpError::DnsError { rcode: Some(e.to_string()), info_code: None })),
        Ok(Ok(found)) => found.collect(),
    };
    let (allowed, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = addresses.into_iter().partition(|addr| refusal(addr.ip(), private).is_none());
    if allowed.is_empty() {
        let note = match refused.first() {
            Some(addr) => format!(
                "wharf: outbound request to {uri} refused: {host} resolves to {}, {}; components may not reach it unless an admin allows the range (--allow-private-egress; allowed now: {})",
                addr.ip(),
                refusal(addr.ip(), private).unwrap_or("not allowed"),
                private.describe()
            ),
            None => format!("wharf: outbound request to {uri} failed: {host} has no address"),
        };
        let error = if refused.is_empty() { HttpError::DestinationNotFound } else { HttpError::DestinationIpProhibited };
        return Err(Refused { note, error });
    }

    let stream = tokio::time::timeout(connect_timeout, connect(&allowed)).await.map_err(|_| failed(HttpError::ConnectionTimeout))?.map_err(|e| failed(HttpError::Connect(e)))?;
    let (response, io) = if https {
        let name = ServerName::try_from(host.clone()).map_err(|e| failed(HttpError::InvalidDnsNameError(e)))?;
        let tls = tokio::time::timeout(connect_timeout, tls_connector().map_err(failed)?.connect(name, stream))
            .await
            .map_err(|_| failed(HttpError::ConnectionTimeout))?
            .map_err(|e| failed(HttpError::Tls(e)))?;
        exchange(tls, request, &options, connect_timeout).await
    } else {
        exchange(stream, request, &options, connect_timeout).await
    }
    .map_err(failed)?;
    Ok((response, io))
}

/// Why a connection to `ip` is refused: a non-public range the admin has
/// not allowed, or one of this host's own addresses.
fn refusal(ip: IpAddr, private: &PrivateEgress) -> Option<&'static str> {
    if let Some(kind) = private.refusal(ip) {
        return Some(kind);
    }
    // A public address of this host reaches its listeners as loopback would.
    (!private.allows(ip) && own_addresses().contains(&ip)).then_some("one of this host's own addresses")
}

/// Connects to the first of `addresses` that answers.
async fn connect(addresses: &[SocketAddr]) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in addresses {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::ErrorKind::NotFound.into()))
}

/// Sends the request over an open connection and returns the response head.
async fn exchange<IO>(io: IO, mut request: Request<WasiBody>, options: &Option<RequestOptions>, connect_timeout: Duration) -> Result<(Response<WasiBody>, IoFuture), HttpError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = tokio::time::timeout(connect_timeout, hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)))
        .await
        .map_err(|_| HttpError::ConnectionTimeout)??;
    // The connection runs in its own task while the request is sent and
    // the response streams; it ends when both are done or dropped.
    let connection = tokio::spawn(connection);
    // On the wire only the path goes in the request line; the host travels in `host`.
    if let Some(authority) = request.uri().authority().cloned()
        && !request.headers().contains_key(http::header::HOST)
        && let Ok(value) = http::HeaderValue::from_str(authority.as_str())
    {
        request.headers_mut().insert(http::header::HOST, value);
    }
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    *request.uri_mut() = http::Uri::try_from(path).map_err(|_| HttpError::HttpRequestUriInvalid)?;
    let first_byte = options.as_ref().and_then(|o| o.first_byte_timeout).unwrap_or(DEFAULT_TIMEOUT);
    let between_bytes = options.as_ref().and_then(|o| o.between_bytes_timeout).unwrap_or(DEFAULT_TIMEOUT).max(Duration::from_nanos(1));
    let response = tokio::time::timeout(first_byte, sender.send_request(request)).await.map_err(|_| HttpError::ConnectionReadTimeout)??;
    let response = response.map(|body| {
        wharf_edge::Body::with_read_timeout(body, between_bytes)
            .map_err(|e| match e {
                wharf_edge::BodyError::Hyper(e) => HttpError::from(e),
                wharf_edge::BodyError::ReadTimeout(_) => HttpError::ConnectionReadTimeout,
            })
            .boxed_unsync()
    });
    let io: IoFuture = Box::new(async move {
        match connection.await {
            Ok(Err(e)) => Err(HttpError::from(e)),
            // Finished, or the task was cancelled at shutdown.
            Ok(Ok(())) | Err(_) => Ok(()),
        }
    });
    Ok((response, io))
}

/// One TLS client configuration for the process: rustls on `ring` with the
/// webpki roots, as `wasi:http`'s default client uses.
fn tls_connector() -> Result<tokio_rustls::TlsConnector, HttpError> {
    static CONNECTOR: OnceLock<Option<tokio_rustls::TlsConnector>> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            use tokio_rustls::rustls;
            let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.into() };
            match rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider())).with_safe_default_protocol_versions() {
                Ok(builder) => Some(tokio_rustls::TlsConnector::from(Arc::new(builder.with_root_certificates(roots).with_no_client_auth()))),
                Err(e) => {
                    tracing::error!("no TLS client for outbound requests: {e}");
                    None
                }
            }
        })
        .clone()
        .ok_or(HttpError::TlsProtocolError)
}

/// This host's own addresses (every interface's), read once from the
/// kernel's tables. Public addresses of the host are refused like private
/// ones, so a component cannot reach this host's listeners through them.
fn own_addresses() -> &'static [IpAddr] {
    static OWN: OnceLock<Vec<IpAddr>> = OnceLock::new();
    OWN.get_or_init(|| {
        let mut found = Vec::new();
        // IPv4: each local address is a line before a "/32 host LOCAL" line.
        if let Ok(trie) = std::fs::read_to_string("/proc/net/fib_trie") {
            let lines: Vec<&str> = trie.lines().collect();
            for pair in lines.windows(2) {
                if pair[1].trim() == "/32 host LOCAL"
                    && let Some(ip) = pair[0].trim().trim_start_matches(['|', '+', '-', ' ']).parse::<IpAddr>().ok()
                    && !found.contains(&ip)
                {
                    found.push(ip);
                }
            }
        }
        // IPv6: the first column of each line, 32 hex digits.
        if let Ok(table) = std::fs::read_to_string("/proc/net/if_inet6") {
            for hex in table.lines().filter_map(|line| line.split_whitespace().next()) {
                if let Ok(bits) = u128::from_str_radix(hex, 16) {
                    found.push(IpAddr::V6(bits.into()));
                }
            }
        }
        found
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses_include_loopback() {
        assert!(own_addresses().contains(&IpAddr::from([127, 0, 0, 1])), "{:?}", own_addresses());
    }
}
