//! HTTP over the bus: how a request reaches a service that runs on another
//! host. The request is sent with request/reply on the subject of a host
//! with a ready replica (the sender picks it: `agent/routing.rs`), where
//! that host alone listens.
//!
//! A message carries an HTTP/1.1 message as is (head, blank line, body),
//! so heads are parsed by `httparse`, the parser hyper itself uses. A body
//! that fits in the bus's largest message with its head travels in it, in
//! one request and one reply as always; a larger one (or one of unknown
//! size that turns out larger) follows its head as a flow-controlled
//! stream of chunks ([`crate::body_stream`]), in either direction.

use crate::body_stream::{self, ReadBody, STREAM_HEADER, SourceSlot, StreamError};
use crate::ingress::RequestBody;
use crate::workload::{ResponseBody, error_response, full_body};
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
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

/// A request ready to cross the hop: encoded whole in one message, or its
/// head to send first and its body to stream after it
/// ([`crate::body_stream`]). Clones share the body: the tries of one
/// request (to one host, then another) send it once.
#[derive(Clone)]
pub enum Prepared {
    /// Head and body in one message, as every request went before bodies
    /// were streamed; what every body that fits in one message still does.
    Whole(Bytes),
    /// The head (without the stream header, which names each try's own
    /// inbox) and the body, unread past what the decision needed.
    Streamed { head: Bytes, body: SourceSlot },
}

impl Prepared {
    /// Whether the request may be sent to a second host while the first
    /// may still serve it: only a safe method ([`is_safe`]) with a body
    /// sent whole. A streamed body is never sent twice that way: the first
    /// host may have consumed part of it, and it cannot be replayed.
    pub fn is_safe(&self) -> bool {
        match self {
            Prepared::Whole(payload) => is_safe(payload),
            Prepared::Streamed { .. } => false,
        }
    }

    /// The request again, to serve here: from its encoding, or its head and
    /// the body still held (an error once a try took it).
    pub fn into_request(self) -> Result<Request<RequestBody>, String> {
        match self {
            Prepared::Whole(payload) => decode_request_bytes(&payload),
            Prepared::Streamed { head, body } => {
                let (request, _) = decode_request_bytes(&head)?.into_parts();
                let source = body.take().ok_or_else(|| StreamError::Consumed.to_string())?;
                Ok(Request::from_parts(request, source.into_body()))
            }
        }
    }
}

/// Reads a request as far as needed to decide how it crosses the bus
/// ([`body_stream::read`]): whole when its body fits in one message with
/// the head, else its head and the body to stream.
pub async fn prepare(bus: &Bus, request: Request<RequestBody>) -> Result<Prepared, Response<ResponseBody>> {
    let (parts, body) = request.into_parts();
    match body_stream::read(body, max_body(bus)).await {
        Ok(ReadBody::Whole(body)) => Ok(Prepared::Whole(encode_request(&parts, &body))),
        Ok(ReadBody::Stream(source)) => Ok(Prepared::Streamed { head: encode_request(&parts, b""), body: SourceSlot::new(source) }),
        Err(e) => Err(error_response(StatusCode::BAD_REQUEST, "bad_request", format!("cannot read the request body: {e}"))),
    }
}

/// Sends a prepared request to `service` on `subject` over the bus and
/// waits up to `timeout` for the answer. A streamed body goes while the
/// answer is awaited; the answer's body may come as a stream too.
pub async fn send(bus: &Bus, service: &ServiceId, subject: &str, prepared: Prepared, timeout: Duration) -> Result<Response<ResponseBody>, NoReplica> {
    let reply = match prepared {
        Prepared::Whole(payload) => bus.request(subject, payload, timeout).await,
        Prepared::Streamed { head, body } => {
            let (inbox, control) = match body_stream::open_inbox(bus).await {
                Ok(opened) => opened,
                Err(e) => return Ok(error_response(StatusCode::BAD_GATEWAY, "bus_error", format!("cannot stream the request body to service {service}: {e}"))),
            };
            // The sending task, stopped if this try ends without an answer
            // (nothing was taken from the body then: a host takes it only
            // by granting credit, after it decided to serve the request).
            let mut sending = AbortOnDrop(Some(tokio::spawn({
                let bus = bus.clone();
                async move { body_stream::send(&bus, control, body).await }
            })));
            let request = bus.request(subject, with_stream_header(&head, &inbox), timeout);
            tokio::pin!(request);
            let reply = tokio::select! {
                reply = &mut request => reply,
                sent = sending.wait() => match sent {
                    // All sent, or the serving host stopped reading (it may
                    // answer without the rest): the answer is still to come.
                    Ok(_) | Err(StreamError::Aborted(_)) => request.await,
                    Err(e) => {
                        return Ok(error_response(StatusCode::BAD_GATEWAY, "stream_failed", format!("the request body to service {service} failed part-way: {e}")));
                    }
                },
            };
            if reply.is_ok() {
                // The rest of the body goes on while the answer is read.
                sending.detach();
            }
            reply
        }
    };
    match reply {
        Ok(reply) => match decode_response(bus, &reply.payload).await {
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

/// A task stopped when its handle is dropped, unless detached.
struct AbortOnDrop<T>(Option<tokio::task::JoinHandle<T>>);

impl<T> AbortOnDrop<Result<T, StreamError>> {
    /// The task's outcome (a task that panicked or was stopped is an error).
    async fn wait(&mut self) -> Result<T, StreamError> {
        match self.0.as_mut() {
            Some(task) => task.await.unwrap_or_else(|e| Err(StreamError::Body(format!("the sending task failed (a bug in Wharf): {e}")))),
            None => std::future::pending().await,
        }
    }

    fn detach(&mut self) {
        self.0 = None;
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// `head` (an encoded head, ending in its blank line) naming `inbox` as
/// where the receiver of its body grants credit.
fn with_stream_header(head: &Bytes, inbox: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(head.len() + inbox.len() + 32);
    out.put_slice(&head[..head.len().saturating_sub(2)]);
    put_header(&mut out, STREAM_HEADER, inbox.as_bytes());
    out.put_slice(b"\r\n");
    out.freeze()
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

/// Turns a request that arrived over the bus back into an HTTP request,
/// and the sender's inbox if its body follows as a stream (the request's
/// body is then empty: [`receive_body`] fills it once the request is sure
/// to be served here).
pub fn decode_request(message: &Message) -> Result<(Request<RequestBody>, Option<String>), String> {
    let mut request = decode_request_bytes(&message.payload)?;
    let streamed = request.headers_mut().remove(STREAM_HEADER);
    let streamed = streamed.map(|inbox| inbox.to_str().map(str::to_owned).map_err(|e| format!("bad {STREAM_HEADER} header: {e}"))).transpose()?;
    Ok((request, streamed))
}

/// Grants the first credit to the sender of a streamed request body,
/// waiting on `inbox`, and makes `request`'s body the stream.
pub async fn receive_body(bus: &Bus, request: Request<RequestBody>, inbox: String) -> Result<Request<RequestBody>, StreamError> {
    let body = body_stream::receive(bus, inbox).await?;
    let (parts, _) = request.into_parts();
    Ok(Request::from_parts(parts, body))
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

/// Answers the bus request `to` with `response`: whole in one message
/// when its body fits, else its head at once and the body streamed as the
/// sender pulls it, returning once it is all sent or the stream failed.
pub async fn reply(bus: &Bus, to: &Message, response: Response<ResponseBody>) -> Result<(), String> {
    let limit = max_body(bus);
    let (parts, body) = response.into_parts();
    let payload = match body_stream::read(body, limit).await {
        Ok(ReadBody::Whole(body)) => encode_response(parts.status, &parts.headers, &body),
        Ok(ReadBody::Stream(source)) => {
            let (inbox, control) = body_stream::open_inbox(bus).await.map_err(|e| e.to_string())?;
            let mut head = encode_response(parts.status, &parts.headers, b"");
            head = with_stream_header(&head, &inbox);
            bus.respond(to, head).await.map_err(|e| e.to_string())?;
            return body_stream::send(bus, control, SourceSlot::new(source)).await.map(|_| ()).map_err(|e| format!("the response body stream failed: {e}"));
        }
        Err(e) => {
            let mut headers = http::HeaderMap::new();
            headers.insert(crate::workload::ERROR_HEADER, HeaderValue::from_static("bad_gateway"));
            encode_response(StatusCode::BAD_GATEWAY, &headers, format!("the response body failed: {e}\n").as_bytes())
        }
    };
    bus.respond(to, payload).await.map_err(|e| e.to_string())
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
        // The stream header is the sending host's alone: a client's or a
        // component's own would have a host send credit or a body's bytes
        // to an inbox of its choosing.
        if HOP_HEADERS.contains(&name.as_str()) || name == http::header::CONTENT_LENGTH || name == STREAM_HEADER {
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

/// Turns an answer from the bus back into an HTTP response; one whose
/// body is streamed ([`STREAM_HEADER`]) gets it as a stream, pulled from
/// the sender as it is read.
async fn decode_response(bus: &Bus, payload: &Bytes) -> Result<Response<ResponseBody>, String> {
    let mut response = decode_response_bytes(payload)?;
    if let Some(inbox) = response.headers_mut().remove(STREAM_HEADER) {
        let inbox = inbox.to_str().map_err(|e| format!("bad {STREAM_HEADER} header: {e}"))?.to_owned();
        let body = body_stream::receive(bus, inbox).await.map_err(|e| e.to_string())?;
        *response.body_mut() = body;
    }
    Ok(response)
}

fn decode_response_bytes(payload: &Bytes) -> Result<Response<ResponseBody>, String> {
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
        let (decoded, streamed) = decode_request(&message).expect("decodes");
        assert_eq!(streamed, None);
        assert_eq!(decoded.method(), Method::POST);
        assert_eq!(decoded.uri().path_and_query().map(|p| p.as_str()), Some("/a/b?x=1"));
        assert_eq!(decoded.headers().get_all("x-one").iter().count(), 2);
        assert_eq!(decoded.headers()["host"], "web.shop");

        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert(STREAM_HEADER, HeaderValue::from_static("_INBOX.host-evil.x"));
        let encoded = encode_response(StatusCode::IM_A_TEAPOT, &headers, b"\x00binary\xff");
        let response = decode_response_bytes(&encoded).expect("decodes");
        assert!(response.headers().get(STREAM_HEADER).is_none(), "a component's own {STREAM_HEADER} is dropped, never believed");
        assert_eq!(response.status(), StatusCode::IM_A_TEAPOT);
        assert_eq!(response.headers()["content-type"], "text/plain");
        assert!(response.headers().get("transfer-encoding").is_none(), "hop headers are dropped");
    }

    #[test]
    fn garbage_is_refused_not_misread() {
        let message = Message { subject: "s".into(), payload: Bytes::from_static(b"\x00\x01 nonsense"), reply: None };
        assert!(decode_request(&message).is_err());
        assert!(decode_response_bytes(&Bytes::from_static(b"HTTP/1.1 abc\r\n")).is_err());
    }

    fn request_of(body: Vec<u8>, exact: bool) -> Request<RequestBody> {
        let body = if exact {
            http_body_util::Full::new(Bytes::from(body)).map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} }).boxed_unsync()
        } else {
            // A body of unknown length, as a chunked upload's.
            let pieces = body.chunks(64 * 1024).map(|piece| Ok(http_body::Frame::data(Bytes::copy_from_slice(piece)))).collect::<Vec<_>>();
            http_body_util::StreamBody::new(futures::stream::iter(pieces)).boxed_unsync()
        };
        Request::post("http://web.shop/up").header(STREAM_HEADER, "_INBOX.host-evil.x").body(body).expect("request")
    }

    #[tokio::test]
    async fn bodies_that_fit_in_one_message_go_whole_and_larger_ones_are_streamed() {
        let bus = Bus::local(wharf_bus::LocalStore::in_memory().expect("store"));
        let fits = max_body(&bus);
        for exact in [true, false] {
            for len in [0, 10, fits] {
                let Ok(Prepared::Whole(payload)) = prepare(&bus, request_of(vec![7; len], exact)).await else { panic!("{len} bytes (exact {exact}) not sent whole") };
                assert!(payload.len() <= bus.max_payload(), "one message holds it");
                let (request, streamed) = decode_request(&Message { subject: "s".into(), payload, reply: None }).expect("decodes");
                assert_eq!(streamed, None, "a client's own {STREAM_HEADER} is dropped, never believed");
                assert_eq!(request.into_body().collect().await.expect("body").to_bytes().len(), len);
            }
            let Ok(Prepared::Streamed { head, body }) = prepare(&bus, request_of(vec![7; fits + 1], exact)).await else { panic!("{} bytes (exact {exact}) sent whole", fits + 1) };
            assert!(!String::from_utf8_lossy(&head).contains(STREAM_HEADER), "the head names no inbox until a try adds its own");
            let prepared = Prepared::Streamed { head: head.clone(), body };
            assert!(!prepared.is_safe(), "a streamed body is never sent to two hosts");
            let request = prepared.clone().into_request().expect("still whole");
            assert_eq!(request.into_body().collect().await.expect("body").to_bytes().len(), fits + 1, "nothing read ahead is lost");
            assert_eq!(prepared.into_request().err(), Some(StreamError::Consumed.to_string()), "taken once");
            let named = with_stream_header(&head, "_INBOX.host-a.1");
            let (_, streamed) = decode_request(&Message { subject: "s".into(), payload: named, reply: None }).expect("decodes");
            assert_eq!(streamed.as_deref(), Some("_INBOX.host-a.1"));
        }
    }
}
