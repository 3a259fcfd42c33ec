//! `spin`: burns CPU for `?n=N` iterations (default 1000), to exercise fuel
//! limits and deadlines; `?log=N` also writes N lines to stdout, to exercise
//! the host's log limits.

use std::hint::black_box;

use samplekit::{Target, respond_text};
use wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Spin;

wasi::http::proxy::export!(Spin);

impl wasi::exports::http::incoming_handler::Guest for Spin {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let iterations = match Target::of(&request).number("n", 1000) {
            Ok(n) => n,
            Err(message) => return respond_text(out, 400, &message),
        };
        let lines = match Target::of(&request).number("log", 0) {
            Ok(n) => n,
            Err(message) => return respond_text(out, 400, &message),
        };
        for line in 0..lines {
            println!("spin: log line {line}");
        }
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..iterations {
            // `black_box` on every step keeps the optimiser from folding the
            // loop into a closed form: the work must really be done.
            state = black_box(
                state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(i | 1)
                    .rotate_left(17),
            );
        }
        respond_text(
            out,
            200,
            &format!("spun {iterations} iterations: {state}\n"),
        );
    }
}
