//! `sleep`: waits `?ms=N` milliseconds (default 100) on a host timer, to exercise deadlines and concurrency.

use samplekit::{Target, respond_text};
use wasi::clocks::monotonic_clock;
use wasi::http::types::{IncomingRequest, ResponseOutparam};

const NANOS_PER_MILLI: u64 = 1_000_000;

struct Sleep;

wasi::http::proxy::export!(Sleep);

impl wasi::exports::http::incoming_handler::Guest for Sleep {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let millis = match Target::of(&request).number("ms", 100) {
            Ok(ms) => ms,
            Err(message) => return respond_text(out, 400, &message),
        };
        // A pollable blocks in the host, so the wait burns no fuel and leaves
        // the host's threads free; a busy loop would do neither.
        monotonic_clock::subscribe_duration(millis.saturating_mul(NANOS_PER_MILLI)).block();
        respond_text(out, 200, &format!("slept {millis} ms\n"));
    }
}
