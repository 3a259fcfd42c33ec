//! Request and response plumbing shared by the sample components, over the raw `wasi:http` bindings.
//!
//! The samples are deliberately tiny and dependency-free beyond the `wasi`
//! crate, so this crate holds the few chores every one of them repeats:
//! reading the request target and body, and writing a whole response.

use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasi::io::streams::StreamError;

/// `wasi:io` lets one blocking write carry at most this many bytes.
const MAX_BLOCKING_WRITE: usize = 4096;

/// How much of a body to ask for per read; the host may return less.
const READ_CHUNK: u64 = 64 * 1024;

/// The path and query of a request, split at the first `?`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The path, `/` when the request carried none.
    pub path: String,
    /// The raw query without its `?`, empty when there is none.
    pub query: String,
}

impl Target {
    /// Reads the target of an incoming request.
    pub fn of(request: &IncomingRequest) -> Self {
        Self::parse(&request.path_with_query().unwrap_or_default())
    }

    /// Splits `path?query`.
    pub fn parse(path_with_query: &str) -> Self {
        let (path, query) = path_with_query
            .split_once('?')
            .unwrap_or((path_with_query, ""));
        let path = if path.is_empty() { "/" } else { path };
        Self {
            path: path.to_owned(),
            query: query.to_owned(),
        }
    }

    /// The path, then `?query` if there is a query.
    pub fn path_with_query(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }

    /// The raw value of the first query parameter called `name`.
    ///
    /// Values are not percent-decoded: the samples only take numbers.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    }

    /// The first query parameter called `name`, percent-decoded.
    ///
    /// For parameters that carry names and paths rather than numbers.
    /// `+` stays a `+`; bytes that do not decode to UTF-8 are replaced.
    pub fn text(&self, name: &str) -> Option<String> {
        self.param(name).map(percent_decode)
    }

    /// The query parameter `name` as a whole number, or `default` when it is absent.
    ///
    /// The error is a ready-made `400` body naming the parameter.
    pub fn number(&self, name: &str, default: u64) -> Result<u64, String> {
        match self.param(name) {
            None => Ok(default),
            Some(value) => value.parse().map_err(|_| {
                format!("bad query parameter {name}: expected a whole number, got {value:?}\n")
            }),
        }
    }
}

/// Decodes `%XX` escapes; a `%` not followed by two hex digits is kept as it is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = bytes
            .get(index + 1..index + 3)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[index], escaped) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                index += 3;
            }
            (byte, _) => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// The method's name as it appears on the wire.
pub fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET".to_owned(),
        Method::Head => "HEAD".to_owned(),
        Method::Post => "POST".to_owned(),
        Method::Put => "PUT".to_owned(),
        Method::Delete => "DELETE".to_owned(),
        Method::Connect => "CONNECT".to_owned(),
        Method::Options => "OPTIONS".to_owned(),
        Method::Trace => "TRACE".to_owned(),
        Method::Patch => "PATCH".to_owned(),
        Method::Other(other) => other.clone(),
    }
}

/// Why a body could not be read to its end.
#[derive(Debug)]
pub enum ReadError {
    /// The body had already been taken from its request or response.
    AlreadyTaken,
    /// The stream failed part-way; holds the host's description.
    Stream(String),
}

/// Reads an incoming request's whole body.
pub fn read_request_body(request: &IncomingRequest) -> Result<Vec<u8>, ReadError> {
    read_body(request.consume().map_err(|()| ReadError::AlreadyTaken)?)
}

/// Reads a whole incoming body (of a request or of a response) into memory.
pub fn read_body(body: IncomingBody) -> Result<Vec<u8>, ReadError> {
    let stream = body.stream().map_err(|()| ReadError::AlreadyTaken)?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(READ_CHUNK) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(error)) => {
                return Err(ReadError::Stream(error.to_debug_string()));
            }
        }
    }
    // The stream is a child of the body and must be gone before the body is.
    drop(stream);
    drop(body);
    Ok(bytes)
}

/// Sends a complete response with a `text/plain` body.
pub fn respond_text(out: ResponseOutparam, status: u16, body: &str) {
    respond(out, status, "text/plain; charset=utf-8", body.as_bytes());
}

/// Sends a complete response: status, content type, content length and body.
pub fn respond(out: ResponseOutparam, status: u16, content_type: &str, body: &[u8]) {
    let headers = Fields::from_list(&[
        ("content-type".to_owned(), content_type.as_bytes().to_vec()),
        (
            "content-length".to_owned(),
            body.len().to_string().into_bytes(),
        ),
    ])
    .expect("content-type and content-length are valid, unforbidden headers");
    let response = OutgoingResponse::new(headers);
    response
        .set_status_code(status)
        .expect("samples only use valid status codes");
    let outgoing = response
        .body()
        .expect("a new response's body is taken only once");
    ResponseOutparam::set(out, Ok(response));

    let stream = outgoing
        .write()
        .expect("a new body's stream is taken only once");
    for chunk in body.chunks(MAX_BLOCKING_WRITE) {
        // A failed write means the client has gone; nobody is left to tell.
        if stream.blocking_write_and_flush(chunk).is_err() {
            break;
        }
    }
    // The stream is a child of the body and must be gone before finishing it.
    drop(stream);
    // Finishing fails only if fewer bytes were written than content-length
    // promised, i.e. after the failed write above; the host already knows.
    let _ = OutgoingBody::finish(outgoing, None);
}

/// Appends `text` to `json` as a JSON string literal, quotes included.
///
/// Hand-written rather than pulling in serde_json, which would multiply the
/// size of the one sample (`echo`) that emits JSON.
pub fn push_json_string(json: &mut String, text: &str) {
    json.push('"');
    for c in text.chars() {
        match c {
            '"' => json.push_str("\\\""),
            '\\' => json.push_str("\\\\"),
            '\n' => json.push_str("\\n"),
            '\r' => json.push_str("\\r"),
            '\t' => json.push_str("\\t"),
            c if u32::from(c) < 0x20 => json.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => json.push(c),
        }
    }
    json.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_splits_path_and_query() {
        let target = Target::parse("/a/b?n=5&x");
        assert_eq!(target.path, "/a/b");
        assert_eq!(target.query, "n=5&x");
        assert_eq!(target.param("n"), Some("5"));
        assert_eq!(target.param("x"), Some(""));
        assert_eq!(target.param("y"), None);
        assert_eq!(target.number("n", 1), Ok(5));
        assert_eq!(target.number("y", 1), Ok(1));
        assert!(target.number("x", 1).is_err());
        assert_eq!(target.path_with_query(), "/a/b?n=5&x");
        assert_eq!(Target::parse("").path_with_query(), "/");
    }

    #[test]
    fn text_parameters_are_percent_decoded() {
        let target = Target::parse("/?path=%2Fdata%2F..%2Fetc&raw=/a/b&bad=100%&odd=%zz+1");
        assert_eq!(target.text("path").as_deref(), Some("/data/../etc"));
        assert_eq!(target.text("raw").as_deref(), Some("/a/b"));
        assert_eq!(target.text("bad").as_deref(), Some("100%"));
        assert_eq!(target.text("odd").as_deref(), Some("%zz+1"));
        assert_eq!(target.text("none"), None);
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut json = String::new();
        push_json_string(&mut json, "a\"b\\c\nd\u{1}é");
        assert_eq!(json, r#""a\"b\\c\nd\u0001é""#);
    }
}
