//! `listener`: a component that only handles messages, as wasmCloud's
//! messaging components do: it exports `wasmcloud:messaging/handler` 0.2.0
//! and no HTTP handler. A message with a reply subject is answered
//! `heard <body>`; one without is published again on `heard.<subject>`.

use bindings::exports::wasmcloud::messaging::handler::Guest;
use bindings::wasmcloud::messaging::{consumer, types::BrokerMessage};

/// Bindings for `wasmcloud:messaging` (vendored in the repository's `wit/deps/`).
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/deps/messaging",
        world: "wasmcloud:messaging/messaging",
    });
}

struct Listener;

/// wit-bindgen's export macro writes the `extern "C"` functions the
/// component model calls, which the workspace's lints forbid elsewhere.
#[allow(unsafe_code, reason = "the exported ABI functions wit-bindgen generates are unsafe by nature")]
mod handler_export {
    use super::{Listener, bindings};
    bindings::export!(Listener with_types_in bindings);
}

impl Guest for Listener {
    fn handle_message(msg: BrokerMessage) -> Result<(), String> {
        let mut body = b"heard ".to_vec();
        body.extend_from_slice(&msg.body);
        let subject = msg.reply_to.unwrap_or_else(|| format!("heard.{}", msg.subject));
        consumer::publish(&BrokerMessage { subject, body, reply_to: None })
    }
}
