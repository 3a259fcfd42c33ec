//! HTTP over the bus: how a request reaches a service that runs on another
//! host. The request is sent with request/reply on the subject of a host
//! with a ready replica (the sender picks it: `agent/routing.rs`), where
//! that host alone listens.
//!
//! A message carries an HTTP/1.1 message as is (head, blank line, body),
//! so heads are parsed by `httparse`, the parser hyper itself uses. Bodies
//! travel whole: one that does not fit in the bus's largest message is
//! refused with 413 (request) or 502 (response) naming the limit, never cut.

use crate::ingress::RequestBody;
use crate::workload::{ResponseBody, error_response, full_body};
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use std::time::Duration;
use wharf_bus::{Bus, Message, RequestError};
use wharf_proto::ServiceId;

/// Headers that belong to one hop and are not forwarded.
const HOP_HEADERS: &[&str] = &["connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"];

/// The largest body that can cross the bus.
pub fn max_body(bus: &Bus) -> usize {
    // Room is kept for the head: at most what an ingress accepts.
    bus.max_payload().saturating_sub(crate::ingress::MAX_HEAD)
}

/// The host a request was sent to did not serve it; another may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoReplica {
    /// Nobody listens on the subject: the host has no ready replica (any
    /// more, or yet), or is gone.
    NoResponders,
    /// The host that took the request has no ready replica any more (it
    /// was being stopped): the request did not run and may be sent again.
    NotHere,
    /// The control plane announced the host lost while a safe request was
    /// in flight there: its answer may never come.
    HostLost,
}

/// Header on the answer of a host that took a bus request but has no
/// ready replica for it any more (see [`NoReplica::NotHere`]).
pub const NOT_HERE_HEADER: &str = "x-wharf-not-here";

/// The answer of a host with no ready replica for a request that reached it.
pub fn not_here(service: &ServiceId, host: &str) -> Response<ResponseBody> {
    let mut response = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        format!("service {service} has no ready replica on host {host} any more"),
    );
    response.headers_mut().insert(NOT_HERE_HEADER, HeaderValue::from_static("1"));
    response
}

/// Reads a request whole and encodes it for the bus, or answers it at once
/// (413) when its body cannot cross the bus.
pub async fn prepare(bus: &Bus, request: Request<RequestBody>) -> Result<Bytes, Response<ResponseBody>> {
    let limit = max_body(bus);
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Err(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the request body is larger than {limit} bytes, the most a request to another host can carry (the bus's max payload); send less, or raise max_payload on the NATS server"),
            ));
        }
        Err(e) => return Err(error_response(StatusCode::BAD_REQUEST, "bad_request", format!("cannot read the request body: {e}"))),
    };
    Ok(encode_request(&parts, &body))
}

/// Sends a prepared request to `service` on `subject` over the bus and
/// waits up to `timeout` for the answer.
pub async fn send(bus: &Bus, service: &ServiceId, subject: &str, payload: Bytes, timeout: Duration) -> Result<Response<ResponseBody>, NoReplica> {
    match bus.request(subject, payload, timeout).await {
        Ok(reply) => match decode_response(&reply.payload) {
            Ok(response) if response.headers().contains_key(NOT_HERE_HEADER) => Err(NoReplica::NotHere),
            Ok(response) => Ok(response),
            Err(e) => Ok(error_response(StatusCode::BAD_GATEWAY, "bad_gateway", format!("unreadable answer from a host running {service}: {e}"))),
        },
        Err(RequestError::NoResponders { .. }) => Err(NoReplica::NoResponders),
        Err(RequestError::TimedOut { .. }) => {
            Ok(error_response(StatusCode::GATEWAY_TIMEOUT, "deadline", format!("no answer from service {service} within {timeout:?}")))
        }
        Err(e) => Ok(error_response(StatusCode::BAD_GATEWAY, "bus_error", format!("cannot reach service {service}: {e}"))),
    }
}

/// Whether an encoded request may be sent twice: the safe methods (RFC
/// 9110), which a lost host's requests are sent again for, as Envoy's
/// retry on reset does.
pub fn is_safe(payload: &[u8]) -> bool {
    [&b"GET "[..], b"HEAD ", b"OPTIONS "].iter().any(|method| payload.starts_with(method))
}

/// The answer when a service has no ready replica anywhere.
pub fn not_ready(service: &ServiceId, why: &str) -> Response<ResponseBody> {
    // A 503: error_response adds the Retry-After.
    error_response(StatusCode::SERVICE_UNAVAILABLE, "not_ready", format!("service {service} {why}"))
}

/// Turns a request that arrived over the bus back into an HTTP request.
pub fn decode_request(message: &Message) -> Result<Request<RequestBody>, String> {
    decode_request_bytes(&message.payload)
}

/// Turns an encoded request back into an HTTP request.
pub fn decode_request_bytes(payload: &Bytes) -> Result<Request<RequestBody>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(payload) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("the request head is incomplete".into()),
        Err(e) => return Err(format!("bad request head: {e}")),
    };
    let method = Method::from_bytes(parsed.method.unwrap_or("GET").as_bytes()).map_err(|e| e.to_string())?;
    let mut builder = Request::builder().method(method).uri(parsed.path.unwrap_or("/"));
    for header in parsed.headers.iter() {
        builder = builder.header(header.name, header.value);
    }
    let body = full_request_body(payload.slice(head_len..));
    builder.body(body).map_err(|e| e.to_string())
}

/// Answers a bus request with `response`, whose body is collected whole.
pub async fn encode_reply(bus: &Bus, response: Response<ResponseBody>) -> Bytes {
    let limit = max_body(bus);
    let (parts, body) = response.into_parts();
    match Limited::new(body, limit).collect().await {
        Ok(collected) => encode_response(parts.status, &parts.headers, &collected.to_bytes()),
        Err(e) => {
            let (status, message) = if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                (StatusCode::BAD_GATEWAY, format!("the response body is larger than {limit} bytes, the most a response from another host can carry (the bus's max payload)"))
            } else {
                (StatusCode::BAD_GATEWAY, format!("the response body failed: {e}"))
            };
            let mut headers = http::HeaderMap::new();
            headers.insert(crate::workload::ERROR_HEADER, HeaderValue::from_static("too_large"));
            encode_response(status, &headers, format!("{message}\n").as_bytes())
        }
    }
}

fn encode_request(parts: &http::request::Parts, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(256 + body.len());
    out.put_slice(parts.method.as_str().as_bytes());
    out.put_u8(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    if let Some(authority) = parts.uri.authority()
        && !parts.headers.contains_key(http::header::HOST)
    {
        put_header(&mut out, "host", authority.as_str().as_bytes());
    }
    put_headers(&mut out, &parts.headers);
    out.put_slice(b"\r\n");
    out.put_slice(body);
    out.freeze()
}

fn encode_response(status: StatusCode, headers: &http::HeaderMap, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(128 + body.len());
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_slice(b" -\r\n");
    put_headers(&mut out, headers);
    out.put_slice(b"\r\n");
    out.put_slice(body);
    out.freeze()
}

fn put_headers(out: &mut BytesMut, headers: &http::HeaderMap) {
    for (name, value) in headers {
        if HOP_HEADERS.contains(&name.as_str()) || name == http::header::CONTENT_LENGTH {
            continue;
        }
        put_header(out, name.as_str(), value.as_bytes());
    }
}

fn put_header(out: &mut BytesMut, name: &str, value: &[u8]) {
    out.put_slice(name.as_bytes());
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

fn decode_response(payload: &Bytes) -> Result<Response<ResponseBody>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Response::new(&mut headers);
    let head_len = match parsed.parse(payload) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("the response head is incomplete".into()),
        Err(e) => return Err(format!("bad response head: {e}")),
    };
    let status = StatusCode::from_u16(parsed.code.unwrap_or(500)).map_err(|e| e.to_string())?;
    let mut response = Response::new(full_body(payload.slice(head_len..)));
    *response.status_mut() = status;
    for header in parsed.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes()).map_err(|e| e.to_string())?;
        let value = HeaderValue::from_bytes(header.value).map_err(|e| e.to_string())?;
        response.headers_mut().append(name, value);
    }
    Ok(response)
}

fn full_request_body(bytes: Bytes) -> RequestBody {
    http_body_util::Full::new(bytes).map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} }).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_methods_are_sent_twice() {
        let encoded = |method: Method| {
            let (parts, ()) = Request::builder().method(method).uri("http://web.shop/a").body(()).expect("request").into_parts();
            encode_request(&parts, b"")
        };
        for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
            assert!(is_safe(&encoded(method.clone())), "{method}");
        }
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            assert!(!is_safe(&encoded(method.clone())), "{method}");
        }
    }

    #[test]
    fn requests_and_responses_survive_the_trip() {
        let request = Request::post("http://web.shop/a/b?x=1").header("x-one", "1").header("x-one", "2").body(()).expect("request");
        let (parts, ()) = request.into_parts();
        let payload = encode_request(&parts, b"body bytes\r\n\r\nmore");
        let message = Message { subject: "s".into(), payload, reply: None };
        let decoded = decode_request(&message).expect("decodes");
        assert_eq!(decoded.method(), Method::POST);
        assert_eq!(decoded.uri().path_and_query().map(|p| p.as_str()), Some("/a/b?x=1"));
        assert_eq!(decoded.headers().get_all("x-one").iter().count(), 2);
        assert_eq!(decoded.headers()["host"], "web.shop");

        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        let encoded = encode_response(StatusCode::IM_A_TEAPOT, &headers, b"\x00binary\xff");
        let response = decode_response(&encoded).expect("decodes");
        assert_eq!(response.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(response.headers()["content-type"], "text/plain");
        assert!(response.headers().get("transfer-encoding").is_none(), "hop headers are dropped");
    }

    #[test]
    fn garbage_is_refused_not_misread() {
        let message = Message { subject: "s".into(), payload: Bytes::from_static(b"\x00\x01 nonsense"), reply: None };
        assert!(decode_request(&message).is_err());
        assert!(decode_response(&Bytes::from_static(b"HTTP/1.1 abc\r\n")).is_err());
    }
}
