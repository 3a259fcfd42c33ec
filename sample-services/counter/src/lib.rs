//! `counter`: counts its requests in a `wasi:keyvalue` bucket, and reads and
//! writes keys there: `/get?key=`, `PUT /set?key=`, `/keys` (every key, page
//! by page, and how many pages) and `/many?keys=a,b` (one `get-many`).

use samplekit::{Target, method_name, read_request_body, respond};
use wasi::http::types::{IncomingRequest, Method, ResponseOutparam};

use keyvalue::wasi::keyvalue::{atomics, batch, store};

/// Bindings for the `wasi:keyvalue` imports, which the `wasi` crate does not
/// carry. In a module of their own because the generated root module is
/// called `wasi`, which would shadow the `wasi` crate.
mod keyvalue {
    wit_bindgen::generate!({
        path: "../../wit/deps/keyvalue",
        world: "wasi:keyvalue/imports",
    });
}

/// The bucket used when neither `?bucket=` nor `BUCKET` names one.
const DEFAULT_BUCKET: &str = "counter";

/// The key the request counter lives under.
const HITS: &str = "hits";

struct Counter;

wasi::http::proxy::export!(Counter);

impl wasi::exports::http::incoming_handler::Guest for Counter {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let target = Target::of(&request);
        // `?bucket=` beats the environment so tests can ask for a bucket the
        // service never declared and watch the host refuse it.
        let bucket_name = target
            .text("bucket")
            .or_else(|| std::env::var("BUCKET").ok())
            .unwrap_or_else(|| DEFAULT_BUCKET.to_owned());
        let method = request.method();
        let (status, content_type, body) = match target.path.as_str() {
            "/get" | "/set" => match (target.path.as_str(), &method, target.text("key")) {
                (_, _, None) => text(400, "counter: missing query parameter key\n".to_owned()),
                ("/get", Method::Get, Some(key)) => get(&bucket_name, &key),
                ("/set", Method::Put, Some(key)) => match read_request_body(&request) {
                    Ok(value) => set(&bucket_name, &key, &value),
                    Err(error) => text(
                        500,
                        format!("counter: cannot read the request body: {error:?}\n"),
                    ),
                },
                (path, method, Some(_)) => text(
                    405,
                    format!(
                        "counter: {path} does not take {}; use {}\n",
                        method_name(method),
                        if path == "/get" { "GET" } else { "PUT" }
                    ),
                ),
            },
            "/keys" => keys(&bucket_name),
            "/many" => many(&bucket_name, &target.text("keys").unwrap_or_default()),
            _ => increment(&bucket_name),
        };
        respond(out, status, content_type, &body);
    }
}

/// A response: status, content type and body.
type Reply = (u16, &'static str, Vec<u8>);

/// A `text/plain` reply.
fn text(status: u16, body: String) -> Reply {
    (status, "text/plain; charset=utf-8", body.into_bytes())
}

/// The `500` reply for a failed keyvalue call. The error's `Debug` form names
/// the variant and carries the host's message of `other(..)`.
fn failed(what: &str, error: &store::Error) -> Reply {
    text(500, format!("counter: {what}: {error:?}\n"))
}

/// Opens the bucket, or says why not in a ready-made reply.
fn open(bucket_name: &str) -> Result<store::Bucket, Reply> {
    store::open(bucket_name)
        .map_err(|error| failed(&format!("cannot open bucket {bucket_name:?}"), &error))
}

/// Adds one to `hits` and answers with the new count.
fn increment(bucket_name: &str) -> Reply {
    let bucket = match open(bucket_name) {
        Ok(bucket) => bucket,
        Err(reply) => return reply,
    };
    match atomics::increment(&bucket, HITS, 1) {
        Ok(hits) => text(200, format!("{hits}\n")),
        Err(error) => failed(
            &format!("cannot increment {HITS:?} in bucket {bucket_name:?}"),
            &error,
        ),
    }
}

/// Answers with the stored value of `key`, as it was stored.
fn get(bucket_name: &str, key: &str) -> Reply {
    let bucket = match open(bucket_name) {
        Ok(bucket) => bucket,
        Err(reply) => return reply,
    };
    match bucket.get(key) {
        Ok(Some(value)) => (200, "text/plain; charset=utf-8", value),
        Ok(None) => text(
            404,
            format!("counter: no key {key:?} in bucket {bucket_name:?}\n"),
        ),
        Err(error) => failed(
            &format!("cannot get {key:?} from bucket {bucket_name:?}"),
            &error,
        ),
    }
}

/// Every key of the bucket, following `list-keys` cursors: a first line
/// `pages: N`, then the keys sorted, one a line.
fn keys(bucket_name: &str) -> Reply {
    let bucket = match open(bucket_name) {
        Ok(bucket) => bucket,
        Err(reply) => return reply,
    };
    let (mut keys, mut cursor, mut pages) = (Vec::new(), None, 0);
    loop {
        match bucket.list_keys(cursor) {
            Ok(page) => {
                pages += 1;
                keys.extend(page.keys);
                match page.cursor {
                    Some(next) => cursor = Some(next),
                    None => break,
                }
            }
            Err(error) => return failed(&format!("cannot list bucket {bucket_name:?}"), &error),
        }
    }
    keys.sort();
    text(200, format!("pages: {pages}\n{}", keys.iter().map(|k| format!("{k}\n")).collect::<String>()))
}

/// One `get-many` of the comma-separated `keys`: how many were found.
fn many(bucket_name: &str, keys: &str) -> Reply {
    let bucket = match open(bucket_name) {
        Ok(bucket) => bucket,
        Err(reply) => return reply,
    };
    let keys: Vec<String> = keys.split(',').filter(|k| !k.is_empty()).map(str::to_owned).collect();
    match batch::get_many(&bucket, &keys) {
        Ok(found) => text(200, format!("found {}\n", found.iter().flatten().count())),
        Err(error) => failed(&format!("cannot get {} keys from bucket {bucket_name:?}", keys.len()), &error),
    }
}

/// Stores `value` under `key`.
fn set(bucket_name: &str, key: &str, value: &[u8]) -> Reply {
    let bucket = match open(bucket_name) {
        Ok(bucket) => bucket,
        Err(reply) => return reply,
    };
    match bucket.set(key, value) {
        Ok(()) => text(200, "ok\n".to_owned()),
        Err(error) => failed(
            &format!("cannot set {key:?} in bucket {bucket_name:?}"),
            &error,
        ),
    }
}
