//! `hello`: the smallest useful wasi:http component, with a greeting taken
//! from the environment, and switches tests use to make it unhealthy.

use samplekit::{Target, respond_text};
use wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Hello;

wasi::http::proxy::export!(Hello);

/// An environment variable parsed as an HTTP status, if set and valid.
fn status_from(name: &str) -> Option<u16> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).filter(|s| (100..600).contains(s))
}

impl wasi::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let target = Target::of(&request);
        // The readiness check: `HEALTH_STATUS` (default 200).
        if target.path == "/healthz" {
            let status = status_from("HEALTH_STATUS").unwrap_or(200);
            respond_text(out, status, &format!("health {status}\n"));
            return;
        }
        // `FAIL_STATUS` fails every request; `FAIL_ON_HOST` only those on
        // that host (hosts set `WHARF_HOST`), to play a host-local fault.
        let host = std::env::var("WHARF_HOST").unwrap_or_default();
        let failing_here = std::env::var("FAIL_ON_HOST").is_ok_and(|h| !h.is_empty() && h == host);
        if let Some(status) = status_from("FAIL_STATUS").or(failing_here.then_some(500)) {
            respond_text(out, status, &format!("hello: failing with {status} on {host}\n"));
            return;
        }
        // `GREETING` lets tests see that a service's env reaches the instance.
        let body = match std::env::var_os("GREETING") {
            Some(greeting) => format!("{}\n", greeting.to_string_lossy()),
            None => "Hello from Wharf!\n".to_owned(),
        };
        respond_text(out, 200, &body);
        // One line per request, so tests can follow a service's logs.
        println!("hello: served {}", target.path);
    }
}
