//! `backend`: the callee in the frontend → backend pair, naming the path it was asked for.

use samplekit::{Target, respond_text};
use wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Backend;

wasi::http::proxy::export!(Backend);

impl wasi::exports::http::incoming_handler::Guest for Backend {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let target = Target::of(&request);
        respond_text(out, 200, &format!("backend ok {}\n", target.path));
    }
}
