//! `settings`: answers with its runtime configuration (`wasi:config`), as
//! the host hands it over from the spec's `config` and granted secrets.
//!
//! - `GET /?key=K`: `200` with the value of `K`, or `404` `settings: no key K\n`.
//! - `GET /keys`: the names of every key, one per line (values are not shown).
//! - A failing config store: `500` `settings: <error>\n`.

use samplekit::{Target, respond_text};
use wasi::http::types::{IncomingRequest, ResponseOutparam};

use config::wasi::config::store;

/// Bindings for `wasi:config`, which the `wasi` crate does not carry; in a
/// module of their own so the generated `wasi` module does not shadow the crate.
mod config {
    wit_bindgen::generate!({
        path: "../../wit/deps/config",
        world: "wasi:config/imports",
    });
}

struct Settings;

wasi::http::proxy::export!(Settings);

impl wasi::exports::http::incoming_handler::Guest for Settings {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let target = Target::of(&request);
        if target.path == "/keys" {
            match store::get_all() {
                Ok(all) => {
                    let mut names: Vec<String> = all.into_iter().map(|(k, _)| k).collect();
                    names.sort();
                    respond_text(out, 200, &names.iter().map(|n| format!("{n}\n")).collect::<String>());
                }
                Err(e) => respond_text(out, 500, &format!("settings: {e:?}\n")),
            }
            return;
        }
        let Some(key) = target.text("key") else {
            respond_text(out, 400, "settings: missing query parameter key\n");
            return;
        };
        match store::get(&key) {
            Ok(Some(value)) => respond_text(out, 200, &value),
            Ok(None) => respond_text(out, 404, &format!("settings: no key {key}\n")),
            Err(e) => respond_text(out, 500, &format!("settings: {e:?}\n")),
        }
    }
}
