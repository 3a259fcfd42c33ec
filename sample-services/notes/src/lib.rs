//! `notes`: keeps named notes as files in the directory the host preopens at `/data`.

use std::io::ErrorKind;
use std::path::Path;

use samplekit::{Target, method_name, read_request_body, respond_text};
use wasi::http::types::{IncomingRequest, Method, ResponseOutparam};

/// Where the host mounts the volume.
const VOLUME: &str = "/data";

struct Notes;

wasi::http::proxy::export!(Notes);

impl wasi::exports::http::incoming_handler::Guest for Notes {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let target = Target::of(&request);
        let method = request.method();
        let (status, body) = if target.path == "/escape" {
            escape(&target)
        } else if target.path == "/notes" || target.path.starts_with("/notes/") {
            notes(&request, &method, &target.path)
        } else {
            (
                404,
                format!(
                    "notes: no route {}; try /notes, /notes/<name> or /escape?path=P\n",
                    target.path
                ),
            )
        };
        respond_text(out, status, &body);
    }
}

/// Serves `/notes` and `/notes/<name>`.
fn notes(request: &IncomingRequest, method: &Method, path: &str) -> (u16, String) {
    // Without the preopen every path below would fail with a confusing
    // "not found"; say plainly that the volume is missing.
    if let Err(error) = std::fs::metadata(VOLUME) {
        return (
            500,
            format!("notes: no volume mounted at {VOLUME}: {error}\n"),
        );
    }
    let name = path
        .strip_prefix("/notes")
        .and_then(|rest| rest.strip_prefix('/'))
        .unwrap_or("");
    match (method, name) {
        (Method::Get, "") => list(),
        (Method::Get, name) => match checked(name) {
            Ok(file) => read(name, &file),
            Err(reply) => reply,
        },
        (Method::Put, name) => match checked(name) {
            Ok(file) => match read_request_body(request) {
                Ok(body) => save(name, &file, &body),
                Err(error) => (
                    500,
                    format!("notes: cannot read the request body: {error:?}\n"),
                ),
            },
            Err(reply) => reply,
        },
        (method, _) => (
            405,
            format!(
                "notes: {path} does not take {}; use GET or PUT\n",
                method_name(method)
            ),
        ),
    }
}

/// The file for note `name`, or a `400` when the name could leave the volume.
fn checked(name: &str) -> Result<String, (u16, String)> {
    if name.is_empty() || name.contains('/') || name.contains("..") {
        return Err((
            400,
            format!("notes: bad note name {name:?}: it must be non-empty without '/' or '..'\n"),
        ));
    }
    Ok(format!("{VOLUME}/{name}"))
}

/// Lists the notes, one name per line, sorted.
fn list() -> (u16, String) {
    let entries = match std::fs::read_dir(VOLUME) {
        Ok(entries) => entries,
        Err(error) => return (500, format!("notes: cannot list {VOLUME}: {error}\n")),
    };
    let mut names = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => names.push(entry.file_name().to_string_lossy().into_owned()),
            Err(error) => return (500, format!("notes: cannot list {VOLUME}: {error}\n")),
        }
    }
    names.sort();
    let body: String = names.iter().map(|name| format!("{name}\n")).collect();
    (200, body)
}

/// Answers with note `name`.
fn read(name: &str, file: &str) -> (u16, String) {
    match std::fs::read(file) {
        Ok(contents) => (200, String::from_utf8_lossy(&contents).into_owned()),
        Err(error) if error.kind() == ErrorKind::NotFound => (404, format!("no note {name}\n")),
        Err(error) => (500, format!("notes: cannot read note {name}: {error}\n")),
    }
}

/// Writes note `name`, replacing any earlier one.
fn save(name: &str, file: &str, body: &[u8]) -> (u16, String) {
    match std::fs::write(file, body) {
        Ok(()) => (200, format!("saved {name}\n")),
        Err(error) => (500, format!("notes: cannot save note {name}: {error}\n")),
    }
}

/// Reads `?path=P` exactly as given, so tests can show that paths outside
/// the preopen (`/etc/passwd`, `/data/../x`, relative paths) cannot be opened.
/// Deliberately no check for a mounted volume: the answer is whatever the
/// host lets through.
fn escape(target: &Target) -> (u16, String) {
    let Some(path) = target.text("path") else {
        return (400, "notes: missing query parameter path\n".to_owned());
    };
    match std::fs::read(Path::new(&path)) {
        Ok(contents) => (200, String::from_utf8_lossy(&contents).into_owned()),
        Err(error) => (403, format!("notes: cannot open {path}: {error}\n")),
    }
}
