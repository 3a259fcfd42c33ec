//! `hog`: allocates `?mb=N` MiB (default 1) and touches every page, to exercise memory caps.

use std::hint::black_box;

use samplekit::{Target, respond_text};
use wasi::http::types::{IncomingRequest, ResponseOutparam};

const MIB: u64 = 1024 * 1024;

/// One byte written per 4 KiB makes the host commit every page of the
/// allocation, not just the wasm memory size, so host RSS grows too.
const HOST_PAGE: usize = 4096;

struct Hog;

wasi::http::proxy::export!(Hog);

impl wasi::exports::http::incoming_handler::Guest for Hog {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let mebibytes = match Target::of(&request).number("mb", 1) {
            Ok(mb) => mb,
            Err(message) => return respond_text(out, 400, &message),
        };
        // Whether the host refuses to grow memory or the size is past what a
        // 32-bit memory can address, the allocation fails and the instance
        // traps: that failure is what the sample exists to provoke.
        let size = mebibytes
            .checked_mul(MIB)
            .and_then(|bytes| usize::try_from(bytes).ok())
            .unwrap_or_else(|| panic!("hog: {mebibytes} MiB is past a 32-bit address space"));
        let mut hoard = vec![0u8; size];
        for page in hoard.chunks_mut(HOST_PAGE) {
            page[0] = 1;
        }
        black_box(&hoard);
        respond_text(out, 200, &format!("allocated {mebibytes} MiB\n"));
    }
}
