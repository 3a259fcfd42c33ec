//! `messenger`: a message handler (`wasmcloud:messaging/handler` 0.2.0)
//! for trigger tests, which also answers HTTP.
//!
//! Each message: a body `noop` does nothing (for benchmarks); a body
//! starting with `fail` is counted (below), then fails the handler; `publish SUBJECT TEXT`
//! publishes TEXT on SUBJECT; `spin` loops until its budget runs out;
//! anything else adds 1 to the key named by the body in the `wasi:keyvalue`
//! bucket `BUCKET` (default `messages`). A message with a reply subject is
//! answered `handled <body>`.
//!
//! HTTP (under any route prefix): `GET …/publish?subject=S&body=B`
//! publishes (`200 published`, or `502` with the host's error);
//! `GET …/request?subject=S&body=B` sends a
//! request and answers with the reply; anything else `200 messenger\n`.

use samplekit::{Target, respond_text};
use wasi::http::types::{IncomingRequest, ResponseOutparam};

use bindings::exports::wasmcloud::messaging::handler::Guest as Handler;
use bindings::wasmcloud::messaging::{consumer, types::BrokerMessage};
use keyvalue::wasi::keyvalue::{atomics, store};

/// Bindings for `wasmcloud:messaging`, which the `wasi` crate does not carry.
mod bindings {
    wit_bindgen::generate!({
        path: "../../wit/deps/messaging",
        world: "wasmcloud:messaging/messaging",
    });
}

/// Bindings for the `wasi:keyvalue` imports. In a module of their own
/// because the generated root module is called `wasi`, which would shadow
/// the `wasi` crate.
mod keyvalue {
    wit_bindgen::generate!({
        path: "../../wit/deps/keyvalue",
        world: "wasi:keyvalue/imports",
    });
}

/// The bucket counts go to when `BUCKET` names none.
const DEFAULT_BUCKET: &str = "messages";

struct Messenger;

wasi::http::proxy::export!(Messenger);
/// wit-bindgen's export macro writes the `extern "C"` functions the
/// component model calls, which the workspace's lints forbid elsewhere.
#[allow(unsafe_code, reason = "the exported ABI functions wit-bindgen generates are unsafe by nature")]
mod handler_export {
    use super::{Messenger, bindings};
    bindings::export!(Messenger with_types_in bindings);
}

impl Handler for Messenger {
    fn handle_message(msg: BrokerMessage) -> Result<(), String> {
        let body = String::from_utf8_lossy(&msg.body).into_owned();
        if body == "noop" {
            return Ok(());
        }
        if body.starts_with("fail") {
            // Counted first, so a test can tell how often it was delivered.
            count(&body)?;
            return Err(format!("messenger: asked to fail ({body})"));
        }
        if body == "spin" {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if let Some(rest) = body.strip_prefix("publish ") {
            let (subject, text) = rest.split_once(' ').unwrap_or((rest, ""));
            consumer::publish(&BrokerMessage { subject: subject.to_owned(), body: text.as_bytes().to_vec(), reply_to: None })?;
        } else {
            count(&body)?;
        }
        if let Some(reply_to) = msg.reply_to {
            consumer::publish(&BrokerMessage { subject: reply_to, body: format!("handled {body}").into_bytes(), reply_to: None })?;
        }
        Ok(())
    }
}

/// Adds 1 to `key` in the bucket.
fn count(key: &str) -> Result<(), String> {
    let name = std::env::var("BUCKET").unwrap_or_else(|_| DEFAULT_BUCKET.to_owned());
    let bucket = store::open(&name).map_err(|e| format!("messenger: cannot open bucket {name:?}: {e:?}"))?;
    atomics::increment(&bucket, key, 1).map_err(|e| format!("messenger: cannot count {key:?}: {e:?}"))?;
    Ok(())
}

impl wasi::exports::http::incoming_handler::Guest for Messenger {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let target = Target::of(&request);
        let subject = target.text("subject").unwrap_or_default();
        let body = target.text("body").unwrap_or_default();
        // Under whatever route prefix the service is given.
        let action = target.path.rsplit('/').next().unwrap_or_default();
        match action {
            "publish" => match consumer::publish(&BrokerMessage { subject, body: body.into_bytes(), reply_to: None }) {
                Ok(()) => respond_text(out, 200, "published\n"),
                Err(error) => respond_text(out, 502, &format!("messenger: {error}\n")),
            },
            "request" => match consumer::request(&subject, body.as_bytes(), 2000) {
                Ok(reply) => respond_text(out, 200, &String::from_utf8_lossy(&reply.body)),
                Err(error) => respond_text(out, 502, &format!("messenger: {error}\n")),
            },
            _ => respond_text(out, 200, "messenger\n"),
        }
    }
}
