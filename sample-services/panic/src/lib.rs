//! `panic`: panics on every request, to show a trap fails one request and nothing else.

use wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Panic;

wasi::http::proxy::export!(Panic);

impl wasi::exports::http::incoming_handler::Guest for Panic {
    fn handle(_request: IncomingRequest, _out: ResponseOutparam) {
        // Written first so tests can check a trapped instance's stderr still
        // reaches the logs.
        eprintln!("panic: about to panic");
        panic!("panic sample: deliberate panic");
    }
}
