//! `frontend`: calls `backend` over outgoing wasi:http and wraps its answer, to exercise service-to-service calls.

use samplekit::{ReadError, Target, read_body, respond_text};
use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, IncomingRequest, Method, OutgoingRequest, ResponseOutparam, Scheme,
};

/// Where the backend is when `BACKEND_URL` is not set: Wharf resolves a bare
/// service name as the authority.
const DEFAULT_BACKEND: &str = "http://backend";

struct Frontend;

wasi::http::proxy::export!(Frontend);

impl wasi::exports::http::incoming_handler::Guest for Frontend {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let target = Target::of(&request);
        let base = std::env::var("BACKEND_URL").unwrap_or_else(|_| DEFAULT_BACKEND.to_owned());
        match call_backend(&base, &target.path_with_query()) {
            Ok(body) => {
                let mut text = String::from("frontend got: ");
                text.push_str(&String::from_utf8_lossy(&body));
                respond_text(out, 200, &text);
            }
            Err(error) => {
                respond_text(
                    out,
                    502,
                    &format!("frontend: backend call failed: {error:?}\n"),
                );
            }
        }
    }
}

/// Why the backend gave no body. Only its `Debug` form is used, in the 502 body.
#[derive(Debug)]
#[allow(
    dead_code,
    reason = "the fields are read through Debug, which dead-code analysis ignores"
)]
enum BackendError {
    /// The base URL is not `http://authority[/path]` or `https://…`.
    BadUrl(String),
    /// The host refused or failed the request.
    Request(ErrorCode),
    /// The response body broke off.
    Body(ReadError),
}

/// GETs `path_with_query` below `base` and returns the response body, whatever its status.
fn call_backend(base: &str, path_with_query: &str) -> Result<Vec<u8>, BackendError> {
    let (scheme, rest) = if let Some(rest) = base.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else if let Some(rest) = base.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else {
        return Err(BackendError::BadUrl(base.to_owned()));
    };
    let (authority, base_path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.is_empty() {
        return Err(BackendError::BadUrl(base.to_owned()));
    }
    let full_path = format!("{}{path_with_query}", base_path.trim_end_matches('/'));

    let request = OutgoingRequest::new(Fields::new());
    let bad_url = |()| BackendError::BadUrl(base.to_owned());
    request.set_method(&Method::Get).map_err(bad_url)?;
    request.set_scheme(Some(&scheme)).map_err(bad_url)?;
    request.set_authority(Some(authority)).map_err(bad_url)?;
    request
        .set_path_with_query(Some(&full_path))
        .map_err(bad_url)?;
    // The body is never taken, which the host reads as an empty request body.

    let pending = outgoing_handler::handle(request, None).map_err(BackendError::Request)?;
    pending.subscribe().block();
    let response = pending
        .get()
        .expect("the pollable said the response is ready")
        .expect("the response is taken only once")
        .map_err(BackendError::Request)?;
    let body = response
        .consume()
        .map_err(|()| BackendError::Body(ReadError::AlreadyTaken))?;
    read_body(body).map_err(BackendError::Body)
}
