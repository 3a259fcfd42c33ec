//! Fuzzes the HTTP request that crosses the bus between hosts
//! (`remote::decode_request_bytes`): any bytes a peer on the bus sends must
//! become a request or an error, never a panic, and a decoded request's
//! body is exactly the bytes after its head.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let payload = Bytes::copy_from_slice(data);
    if let Ok(request) = wharf_host::remote::decode_request_bytes(&payload) {
        // Everything a handler reads from the head must be readable.
        let _ = (request.method().as_str(), request.uri().path(), request.uri().query());
        for (name, value) in request.headers() {
            let _ = (name.as_str(), value.to_str());
        }
        let hint = http_body::Body::size_hint(request.body());
        assert!(hint.exact().is_some_and(|n| n <= data.len() as u64), "a decoded body is a known slice of the payload");
    }
});
