//! `echo`: answers with everything it was given (request, body and environment) as JSON.

use std::collections::BTreeMap;

use samplekit::{Target, method_name, push_json_string, read_request_body, respond, respond_text};
use wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Echo;

wasi::http::proxy::export!(Echo);

impl wasi::exports::http::incoming_handler::Guest for Echo {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let method = method_name(&request.method());
        let target = Target::of(&request);
        // A map keyed by lowercase name: repeated headers keep their last
        // value, and the JSON comes out in a stable order.
        let headers: BTreeMap<String, String> = request
            .headers()
            .entries()
            .into_iter()
            .map(|(name, value)| {
                (
                    name.to_ascii_lowercase(),
                    String::from_utf8_lossy(&value).into_owned(),
                )
            })
            .collect();
        let body = match read_request_body(&request) {
            Ok(body) => body,
            Err(error) => {
                respond_text(
                    out,
                    500,
                    &format!("echo: cannot read the request body: {error:?}\n"),
                );
                return;
            }
        };
        let env: BTreeMap<String, String> = std::env::vars_os()
            .map(|(key, value)| {
                (
                    key.to_string_lossy().into_owned(),
                    value.to_string_lossy().into_owned(),
                )
            })
            .collect();

        let mut json = String::from("{\"method\": ");
        push_json_string(&mut json, &method);
        json.push_str(", \"path\": ");
        push_json_string(&mut json, &target.path);
        json.push_str(", \"query\": ");
        push_json_string(&mut json, &target.query);
        json.push_str(", \"headers\": ");
        push_json_object(&mut json, &headers);
        json.push_str(", \"body\": ");
        push_json_string(&mut json, &String::from_utf8_lossy(&body));
        json.push_str(&format!(", \"body_len\": {}, \"env\": ", body.len()));
        push_json_object(&mut json, &env);
        json.push_str("}\n");
        respond(out, 200, "application/json", json.as_bytes());
    }
}

/// Appends a flat JSON object of string values.
fn push_json_object(json: &mut String, map: &BTreeMap<String, String>) {
    json.push('{');
    for (index, (key, value)) in map.iter().enumerate() {
        if index > 0 {
            json.push_str(", ");
        }
        push_json_string(json, key);
        json.push_str(": ");
        push_json_string(json, value);
    }
    json.push('}');
}
