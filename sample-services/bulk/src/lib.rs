//! `bulk`: large bodies, streamed. `GET /?bytes=N` answers `N` bytes of a
//! fixed pattern (byte `i` is `i % 251`), written as the client reads them;
//! any other method reads the request body piece by piece, keeping none of
//! it, and answers `<length> <fnv1a-64 in hex>\n`, or 500 (and a line on
//! stderr) when the body fails part-way.

use samplekit::{Target, method_name, respond_text};
use wasi::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};
use wasi::io::streams::StreamError;

/// Bytes read or written per call.
const PIECE: usize = 64 * 1024;

struct Bulk;

wasi::http::proxy::export!(Bulk);

impl wasi::exports::http::incoming_handler::Guest for Bulk {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        if method_name(&request.method()) == "GET" {
            match Target::of(&request).number("bytes", 0) {
                Ok(bytes) => produce(out, bytes),
                Err(error) => respond_text(out, 400, &format!("bulk: {error}\n")),
            }
            return;
        }
        match digest(&request) {
            Ok((length, hash)) => respond_text(out, 200, &format!("{length} {hash:016x}\n")),
            Err(error) => {
                // Also to the log: the client of a failed upload has gone.
                eprintln!("bulk: {error}");
                respond_text(out, 500, &format!("bulk: {error}\n"));
            }
        }
    }
}

/// The length and FNV-1a (64-bit) hash of the request body, read piece by piece.
fn digest(request: &IncomingRequest) -> Result<(u64, u64), String> {
    let body = request.consume().map_err(|()| "the body was already taken".to_owned())?;
    let stream = body.stream().map_err(|()| "the body's stream was already taken".to_owned())?;
    let (mut length, mut hash) = (0u64, 0xcbf2_9ce4_8422_2325u64);
    loop {
        match stream.blocking_read(PIECE as u64) {
            Ok(piece) => {
                length += piece.len() as u64;
                for byte in piece {
                    hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(error)) => {
                return Err(format!("the body failed after {length} bytes: {}", error.to_debug_string()));
            }
        }
    }
    drop(stream);
    drop(body);
    Ok((length, hash))
}

/// Answers `bytes` bytes of the pattern, without a content length (the
/// client cannot know the size ahead), writing as fast as it is read.
fn produce(out: ResponseOutparam, bytes: u64) {
    let headers = Fields::from_list(&[("content-type".to_owned(), b"application/octet-stream".to_vec())])
        .expect("content-type is a valid, unforbidden header");
    let response = OutgoingResponse::new(headers);
    let outgoing = response.body().expect("a new response's body is taken only once");
    ResponseOutparam::set(out, Ok(response));
    let stream = outgoing.write().expect("a new body's stream is taken only once");
    let pattern: Vec<u8> = (0..PIECE + 251).map(|i| (i % 251) as u8).collect();
    let ready = stream.subscribe();
    let mut written = 0u64;
    while written < bytes {
        let room = match stream.check_write() {
            Ok(0) => {
                ready.block();
                continue;
            }
            Ok(room) => room,
            // The client has gone: nobody is left to tell.
            Err(_) => return,
        };
        let take = (bytes - written).min(room).min(PIECE as u64) as usize;
        let offset = (written % 251) as usize;
        if stream.write(&pattern[offset..offset + take]).is_err() {
            return;
        }
        written += take as u64;
    }
    if stream.blocking_flush().is_err() {
        return;
    }
    drop(ready);
    drop(stream);
    let _ = OutgoingBody::finish(outgoing, None);
}
