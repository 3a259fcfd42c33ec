//! `hello`: the smallest useful wasi:http component, with a greeting taken from the environment.

use samplekit::{Target, respond_text};
use wasi::http::types::{IncomingRequest, ResponseOutparam};

struct Hello;

wasi::http::proxy::export!(Hello);

impl wasi::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let target = Target::of(&request);
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
