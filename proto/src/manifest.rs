//! Manifests: the files `wharf apply -f` reads, in YAML, TOML or JSON, with
//! one service or several. Errors name the field (`services[1].replicas`),
//! the problem and, where the format tells, the line.

use crate::{Digest, OciReference};
use crate::names::ServiceId;
use crate::spec::{ServiceSpec, SpecError};
use crate::strict;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A service as a manifest describes it: a [`ServiceSpec`] whose component
/// is a file to upload or a digest already uploaded.
pub type ServiceManifest = ServiceSpec<ComponentRef>;

/// How a manifest names a component: `file: hello.wasm`, `digest: sha256:...`
/// or `oci: ghcr.io/org/app:1.0`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ComponentRefFields", into = "ComponentRefFields")]
pub enum ComponentRef {
    /// A file to upload; a relative path is relative to the manifest's directory.
    File(PathBuf),
    /// A component already in the artifact store.
    Digest(Digest),
    /// A component in an OCI registry, pulled and uploaded like a file; the
    /// spec records it as its `source`.
    Oci(OciReference),
}

/// The written form of [`ComponentRef`]: a mapping with exactly one of the keys.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComponentRefFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    digest: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    oci: Option<OciReference>,
}

impl TryFrom<ComponentRefFields> for ComponentRef {
    type Error = &'static str;
    fn try_from(fields: ComponentRefFields) -> Result<Self, Self::Error> {
        match (fields.file, fields.digest, fields.oci) {
            (Some(file), None, None) => Ok(ComponentRef::File(file)),
            (None, Some(digest), None) => Ok(ComponentRef::Digest(digest)),
            (None, None, Some(oci)) => Ok(ComponentRef::Oci(oci)),
            _ => Err(
                "give the component as exactly one of `file: path/to/component.wasm`, `digest: sha256:...` or `oci: REGISTRY/REPOSITORY:TAG`",
            ),
        }
    }
}

impl From<ComponentRef> for ComponentRefFields {
    fn from(component: ComponentRef) -> Self {
        match component {
            ComponentRef::File(file) => ComponentRefFields {
                file: Some(file),
                digest: None,
                oci: None,
            },
            ComponentRef::Digest(digest) => ComponentRefFields {
                file: None,
                digest: Some(digest),
                oci: None,
            },
            ComponentRef::Oci(oci) => ComponentRefFields {
                file: None,
                digest: None,
                oci: Some(oci),
            },
        }
    }
}

impl ServiceManifest {
    /// The spec to store once the component is known by `digest`. A
    /// component pulled from a registry is recorded as the spec's `source`.
    pub fn into_spec(mut self, digest: Digest) -> ServiceSpec {
        if let ComponentRef::Oci(reference) = &self.component {
            self.source = Some(reference.clone());
        }
        self.with_component(digest)
    }
}

/// The languages a manifest may be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestFormat {
    /// YAML: a service mapping, or `services:` with a list of them.
    Yaml,
    /// TOML: top-level service fields, or `[[services]]` tables.
    Toml,
    /// JSON: a service object, or `{"services": [...]}`.
    Json,
}

impl ManifestFormat {
    /// The format a file's extension names: `.yaml`, `.yml`, `.toml` or `.json`.
    pub fn from_path(path: &Path) -> Result<Self, ManifestError> {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("yaml" | "yml") => Ok(ManifestFormat::Yaml),
            Some("toml") => Ok(ManifestFormat::Toml),
            Some("json") => Ok(ManifestFormat::Json),
            _ => Err(ManifestError::UnknownFormat(path.to_path_buf())),
        }
    }
}

impl fmt::Display for ManifestFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ManifestFormat::Yaml => "YAML",
            ManifestFormat::Toml => "TOML",
            ManifestFormat::Json => "JSON",
        })
    }
}

/// A place in a manifest's text, both counted from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// The line.
    pub line: usize,
    /// The column, in characters.
    pub column: usize,
}

/// Why a manifest was refused. Nothing in it is applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The file's extension does not name a format.
    #[error("cannot tell the format of {0:?} from its extension: use .yaml, .yml, .toml or .json")]
    UnknownFormat(PathBuf),
    /// The text is not valid for the format, or a field has the wrong name,
    /// type or value. `field` is the path to it, empty for the whole document.
    #[error("{}", describe_parse(.field, .message, .location))]
    Parse {
        /// The path to the offending field, e.g. `services[1].replicas`.
        field: String,
        /// What is wrong.
        message: String,
        /// Where, when the format tells.
        location: Option<Location>,
    },
    /// The manifest holds no service.
    #[error("the manifest describes no service: give one service, or a list under `services`")]
    Empty,
    /// A job manifest holds no job.
    #[error("the manifest describes no job: give one job, or a list under `jobs`")]
    NoJob,
    /// The manifest is larger than [`MAX_MANIFEST_BYTES`] or lists more than [`MAX_MANIFEST_SERVICES`] services.
    #[error("the manifest is too large: {0}")]
    TooLarge(String),
    /// A service parsed but breaks a rule of specs.
    #[error(transparent)]
    Invalid(#[from] SpecError),
    /// Two entries describe the same service (or job).
    #[error("{field}: {service} is already described at {first}")]
    Duplicate {
        /// The path to the second entry.
        field: String,
        /// The service described twice.
        service: ServiceId,
        /// The path to the first entry.
        first: String,
    },
}

fn describe_parse(field: &str, message: &str, location: &Option<Location>) -> String {
    let mut text = if field.is_empty() {
        message.to_string()
    } else {
        format!("{field}: {message}")
    };
    if let Some(Location { line, column }) = location {
        text.push_str(&format!(" (line {line}, column {column})"));
    }
    text
}

/// A manifest with several services.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceList {
    services: Vec<ServiceManifest>,
}

/// Only asks whether the document has a `services` key, ignoring the rest.
#[derive(Deserialize)]
struct Shape {
    services: Option<IgnoredAny>,
}

/// Reads the services a manifest describes and checks each of them.
///
/// The document is either one service or `services:` with a list; either
/// way the result is a list, checked with [`ServiceSpec::validate`] and for
/// services described twice. Errors name the field by its path from the top
/// of the document, e.g. `services[1].replicas` or, for a single service,
/// `replicas`.
pub fn parse_manifest(
    text: &str,
    format: ManifestFormat,
) -> Result<Vec<ServiceManifest>, ManifestError> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge(format!("{} bytes, at most {MAX_MANIFEST_BYTES} are read", text.len())));
    }
    let services = parse_unbounded(text, format)?;
    if services.len() > MAX_MANIFEST_SERVICES {
        return Err(ManifestError::TooLarge(format!("{} services, at most {MAX_MANIFEST_SERVICES} in one manifest", services.len())));
    }
    Ok(services)
}

/// A job as a manifest describes it (`wharf run -f`): a
/// [`crate::JobSpec`] whose component is a file, a digest or an OCI reference.
pub type JobManifest = crate::JobSpec<ComponentRef>;

/// A manifest with several jobs.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobList {
    jobs: Vec<JobManifest>,
}

/// Only asks whether the document has a `jobs` key.
#[derive(Deserialize)]
struct JobShape {
    jobs: Option<IgnoredAny>,
}

/// Reads the jobs a manifest describes: one job (the fields of a job
/// spec, as a service manifest holds one service's), or `jobs:` with a
/// list; each checked with [`crate::JobSpec::validate`] (schedule and time
/// zone included). Errors name the field as [`parse_manifest`]'s do
/// (`jobs[1].schedule`).
pub fn parse_job_manifest(text: &str, format: ManifestFormat) -> Result<Vec<JobManifest>, ManifestError> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge(format!("{} bytes, at most {MAX_MANIFEST_BYTES} are read", text.len())));
    }
    let is_list = matches!(deserialize_lenient::<JobShape>(text, format), Ok(JobShape { jobs: Some(_) }));
    let jobs = if is_list {
        deserialize::<JobList>(text, format)?.jobs
    } else if is_blank(text, format) {
        Vec::new()
    } else {
        vec![deserialize::<JobManifest>(text, format)?]
    };
    if jobs.is_empty() {
        return Err(ManifestError::NoJob);
    }
    if jobs.len() > MAX_MANIFEST_SERVICES {
        return Err(ManifestError::TooLarge(format!("{} jobs, at most {MAX_MANIFEST_SERVICES} in one manifest", jobs.len())));
    }
    check_entries(&jobs, is_list.then_some("jobs"), JobManifest::validate, JobManifest::id)?;
    Ok(jobs)
}

/// The largest manifest [`parse_manifest`] reads.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;
/// The most services one manifest may describe.
pub const MAX_MANIFEST_SERVICES: usize = 1000;

fn parse_unbounded(text: &str, format: ManifestFormat) -> Result<Vec<ServiceManifest>, ManifestError> {
    // The shape is read first, then the text again into the right type, so
    // that errors keep the line numbers of the original text. Manifests are
    // small; reading twice costs nothing that matters.
    let is_list = matches!(
        deserialize_lenient::<Shape>(text, format),
        Ok(Shape { services: Some(_) })
    );
    let services: Vec<ServiceManifest> = if is_list {
        deserialize::<ServiceList>(text, format)?.services
    } else {
        if is_blank(text, format) {
            return Err(ManifestError::Empty);
        }
        vec![deserialize::<ServiceManifest>(text, format)?]
    };
    if services.is_empty() {
        return Err(ManifestError::Empty);
    }
    check_entries(&services, is_list.then_some("services"), ServiceManifest::validate, ServiceManifest::id)?;
    Ok(services)
}

/// Checks each entry of a manifest and that no two describe the same
/// service or job; errors name the entry by its path (`services[1]`), or
/// by none for a document of one entry (`list` is `None`).
fn check_entries<T>(items: &[T], list: Option<&str>, validate: impl Fn(&T) -> Result<(), SpecError>, id: impl Fn(&T) -> ServiceId) -> Result<(), ManifestError> {
    let path = |i: usize| list.map_or(String::new(), |name| format!("{name}[{i}]"));
    let mut seen: BTreeMap<ServiceId, usize> = BTreeMap::new();
    for (i, item) in items.iter().enumerate() {
        validate(item).map_err(|e| if list.is_some() { e.within(path(i)) } else { e })?;
        if let Some(first) = seen.insert(id(item), i) {
            return Err(ManifestError::Duplicate { field: path(i), service: id(item), first: path(first) });
        }
    }
    Ok(())
}

/// What `wharf apply -f` reads: services and jobs.
#[derive(Debug)]
pub struct Manifest {
    pub services: Vec<ServiceManifest>,
    pub jobs: Vec<JobManifest>,
}

/// A manifest with jobs, and services beside them or not.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServicesAndJobs {
    #[serde(default)]
    services: Vec<ServiceManifest>,
    jobs: Vec<JobManifest>,
}

/// Reads what `wharf apply -f` applies: a manifest [`parse_manifest`]
/// reads, or one with a `jobs:` list (and, beside it, `services:` or not).
/// Each entry is checked as its own kind's manifest checks it.
pub fn parse_apply_manifest(text: &str, format: ManifestFormat) -> Result<Manifest, ManifestError> {
    let has_jobs = matches!(deserialize_lenient::<JobShape>(text, format), Ok(JobShape { jobs: Some(_) }));
    if !has_jobs {
        return Ok(Manifest { services: parse_manifest(text, format)?, jobs: Vec::new() });
    }
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge(format!("{} bytes, at most {MAX_MANIFEST_BYTES} are read", text.len())));
    }
    let ServicesAndJobs { services, jobs } = deserialize(text, format)?;
    if services.len() + jobs.len() > MAX_MANIFEST_SERVICES {
        return Err(ManifestError::TooLarge(format!("{} services and jobs, at most {MAX_MANIFEST_SERVICES} in one manifest", services.len() + jobs.len())));
    }
    if services.is_empty() && jobs.is_empty() {
        return Err(ManifestError::Empty);
    }
    check_entries(&services, Some("services"), ServiceManifest::validate, ServiceManifest::id)?;
    check_entries(&jobs, Some("jobs"), JobManifest::validate, JobManifest::id)?;
    Ok(Manifest { services, jobs })
}

/// Whether the document holds nothing at all (only whitespace or comments).
fn is_blank(text: &str, format: ManifestFormat) -> bool {
    let comment = match format {
        ManifestFormat::Yaml | ManifestFormat::Toml => "#",
        ManifestFormat::Json => return text.trim().is_empty(),
    };
    text.lines()
        .map(str::trim)
        .all(|line| line.is_empty() || line.starts_with(comment) || line == "---")
}

/// Deserialises `text` in `format`, with the path to the field at fault in
/// any error. A field the types do not know is an error too (see
/// [`crate::strict`]), located in the text by its key.
fn deserialize<T: DeserializeOwned>(
    text: &str,
    format: ManifestFormat,
) -> Result<T, ManifestError> {
    let mut ignored = Vec::new();
    let value = deserialize_collecting(text, format, &mut ignored)?;
    match ignored.into_iter().next() {
        None => Ok(value),
        Some(path) => {
            let unknown = strict::unknown_field(path);
            let location = locate_key(text, format, &unknown.key);
            Err(ManifestError::Parse {
                field: unknown.path,
                message: unknown.message,
                location,
            })
        }
    }
}

/// Like [`deserialize`], but skipping unknown fields: for looking at a
/// document's shape only.
fn deserialize_lenient<T: DeserializeOwned>(
    text: &str,
    format: ManifestFormat,
) -> Result<T, ManifestError> {
    deserialize_collecting(text, format, &mut Vec::new())
}

/// Deserialises `text`, collecting the paths of fields the types skipped.
fn deserialize_collecting<T: DeserializeOwned>(
    text: &str,
    format: ManifestFormat,
    ignored: &mut Vec<String>,
) -> Result<T, ManifestError> {
    let value = match format {
        ManifestFormat::Yaml => strict::deserialize_collecting(
            serde_norway::Deserializer::from_str(text),
            ignored,
        )
        .map_err(|e| {
            let location = e.inner().location().map(|l| Location {
                line: l.line(),
                column: l.column(),
            });
            parse_error(e.path().to_string(), &e.inner().to_string(), location)
        })?,
        ManifestFormat::Toml => {
            let toml_error = |field: String, e: &toml::de::Error| {
                let location = e.span().map(|span| location_of(text, span.start));
                parse_error(field, e.message(), location)
            };
            let deserializer =
                toml::Deserializer::parse(text).map_err(|e| toml_error(String::new(), &e))?;
            strict::deserialize_collecting(deserializer, ignored)
                .map_err(|e| toml_error(e.path().to_string(), e.inner()))?
        }
        ManifestFormat::Json => {
            let mut deserializer = serde_json::Deserializer::from_str(text);
            let json_error = |field: String, e: &serde_json::Error| {
                let location = (e.line() > 0).then(|| Location {
                    line: e.line(),
                    column: e.column(),
                });
                parse_error(field, &e.to_string(), location)
            };
            let value = strict::deserialize_collecting(&mut deserializer, ignored)
                .map_err(|e| json_error(e.path().to_string(), e.inner()))?;
            deserializer
                .end()
                .map_err(|e| json_error(String::new(), &e))?;
            value
        }
    };
    Ok(value)
}

/// Where `key` is first written as a key in `text` (bare or quoted, in a
/// block or a flow/inline mapping): for pointing at an unknown field, which
/// the parsers themselves do not report once the types accept it.
fn locate_key(text: &str, format: ManifestFormat, key: &str) -> Option<Location> {
    let separator = match format {
        ManifestFormat::Toml => '=',
        ManifestFormat::Yaml | ManifestFormat::Json => ':',
    };
    let quoted = format!("\"{key}\"");
    for (index, line) in text.lines().enumerate() {
        for (at, token) in line.match_indices(key).map(|(at, t)| (at, t.len())).chain(line.match_indices(&quoted).map(|(at, t)| (at, t.len()))) {
            let before = line[..at].trim_end().chars().last();
            let opens = matches!(before, None | Some('{' | ',' | '-'));
            let closes = line[at + token..].trim_start().starts_with(separator);
            let whole = !line[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_');
            if opens && closes && whole {
                return Some(Location {
                    line: index + 1,
                    column: line[..at].chars().count() + 1,
                });
            }
        }
    }
    None
}

/// Builds a [`ManifestError::Parse`], taking out of `message` the path and the
/// location that YAML and JSON errors spell into their text, since the error
/// carries both on its own.
fn parse_error(field: String, message: &str, location: Option<Location>) -> ManifestError {
    // serde_path_to_error writes `.` for the document itself.
    let field = if field == "." { String::new() } else { field };
    // YAML names the path to the enclosing value, which is the field's own
    // path or a prefix of it (for an unknown field, its mapping).
    let mut message = match message.split_once(": ") {
        Some((prefix, rest)) if is_path_prefix(prefix, &field) => rest,
        _ => message,
    };
    if let Some(Location { line, column }) = location {
        message = message
            .strip_suffix(&format!(" at line {line} column {column}"))
            .unwrap_or(message);
    }
    ManifestError::Parse {
        field,
        message: message.to_string(),
        location,
    }
}

/// Whether `prefix` is `path` or the path to a value enclosing it.
fn is_path_prefix(prefix: &str, path: &str) -> bool {
    !prefix.is_empty()
        && path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// The line and column of byte `offset` in `text`.
fn location_of(text: &str, offset: usize) -> Location {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Location {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn jobs_are_read_beside_services_and_checked_by_path() {
        let both = "services:\n  - name: web\n    component: { file: web.wasm }\njobs:\n  - name: nightly\n    component: { file: job.wasm }\n    schedule: \"0 3 * * *\"\n    time_zone: Europe/Berlin\n";
        let manifest = parse_apply_manifest(both, ManifestFormat::Yaml).expect("valid");
        assert_eq!((manifest.services.len(), manifest.jobs.len()), (1, 1));
        assert_eq!(manifest.jobs[0].schedule.as_deref(), Some("0 3 * * *"));
        let bad = "jobs:\n  - name: a\n    component: { file: a.wasm }\n  - name: b\n    component: { file: b.wasm }\n    schedule: \"* * *\"\n";
        let error = parse_apply_manifest(bad, ManifestFormat::Yaml).expect_err("a bad schedule");
        assert!(error.to_string().starts_with("jobs[1].schedule: \"* * *\" is not a cron schedule"), "{error}");
        let twice = "jobs:\n  - name: a\n    component: { file: a.wasm }\n  - name: a\n    component: { file: a.wasm }\n";
        let error = parse_apply_manifest(twice, ManifestFormat::Yaml).expect_err("twice");
        assert_eq!(error.to_string(), "jobs[1]: default/a is already described at jobs[0]");
        let typo = "jobs:\n  - name: a\n    component: { file: a.wasm }\n    shedule: \"* * * * *\"\n";
        let error = parse_apply_manifest(typo, ManifestFormat::Yaml).expect_err("a typo");
        assert!(error.to_string().contains("jobs[0].shedule"), "{error}");
        let services = parse_apply_manifest("name: web\ncomponent: { file: web.wasm }\n", ManifestFormat::Yaml).expect("one service");
        assert_eq!((services.services.len(), services.jobs.len()), (1, 0));
        let one_job = parse_job_manifest("name: once\ncomponent: { file: job.wasm }\nargs: [a, b]\n", ManifestFormat::Yaml).expect("one job");
        assert_eq!(one_job[0].args, ["a", "b"]);
    }

    #[test]
    fn oversized_manifests_are_refused() {
        let big = format!("name: a\ncomponent: {{ file: a.wasm }}\nenv: {{ X: \"{}\" }}\n", "x".repeat(MAX_MANIFEST_BYTES));
        let error = parse_manifest(&big, ManifestFormat::Yaml).expect_err("too big");
        assert!(error.to_string().contains("too large"), "{error}");
        let many: String = (0..=MAX_MANIFEST_SERVICES).map(|i| format!("  - name: s{i}\n    component: {{ file: a.wasm }}\n")).collect();
        let error = parse_manifest(&format!("services:\n{many}"), ManifestFormat::Yaml).expect_err("too many");
        assert!(error.to_string().contains("1001 services"), "{error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ByteSize;
    use std::time::Duration;

    const DIGEST: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    /// Parses `text` and checks either the names of the services or the error text.
    #[track_caller]
    fn check(
        format: ManifestFormat,
        text: &str,
        expected: Result<&[&str], &str>,
    ) -> Vec<ServiceManifest> {
        match (parse_manifest(text, format), expected) {
            (Ok(services), Ok(names)) => {
                let got: Vec<String> = services.iter().map(|s| s.id().to_string()).collect();
                assert_eq!(got, names);
                services
            }
            (Err(err), Err(want)) => {
                assert_eq!(err.to_string(), want);
                Vec::new()
            }
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn triggers_are_read_and_checked_by_field() {
        use ManifestFormat::Yaml;
        let one = |triggers: &str| format!("name: orders\ncomponent: {{ digest: \"{DIGEST}\" }}\ntriggers: {triggers}\n");
        let services = check(Yaml, &one("[{ subject: \"orders.>\" }, { subject: pay.*, stream: pay, max_deliver: 3 }]"), Ok(&["default/orders"]));
        let triggers = &services[0].triggers;
        assert_eq!(triggers.len(), 2);
        assert_eq!((triggers[1].stream.as_deref(), triggers[1].max_deliver()), (Some("pay"), 3));
        assert_eq!(triggers[1].dead_letter("orders"), "dead-letter.orders");
        check(Yaml, &one("[{ subject: \"orders..x\" }]"), Err("triggers[0].subject: subject \"orders..x\" has an empty token (two dots, or a dot at an end)"));
        check(Yaml, &one("[{ subject: a, max_deliver: 2 }]"), Err("triggers[0].max_deliver: only a trigger with `stream:` is redelivered; add `stream: NAME` or remove max_deliver"));
        check(Yaml, &one("[{ subject: a }, { subject: a }]"), Err("triggers[1].subject: subject \"a\" is declared twice"));
        check(Yaml, &one("[{ subject: \">\", stream: all }]"), Err("triggers[0].dead_letter: \"dead-letter.orders\" matches the trigger's own subject \">\": a dead letter would be delivered again"));
        let unknown = parse_manifest(&one("[{ subject: a, strem: s }]"), Yaml).expect_err("a typo");
        assert!(unknown.to_string().contains("unknown field `strem`"), "{unknown}");
    }

    #[test]
    fn yaml_single_service_with_defaults() {
        let text =
            "name: hello\ncomponent:\n  file: hello.wasm\nroutes:\n  - path_prefix: /hello\n";
        let services = check(ManifestFormat::Yaml, text, Ok(&["default/hello"]));
        let hello = &services[0];
        assert_eq!(hello.component, ComponentRef::File("hello.wasm".into()));
        assert_eq!(hello.replicas, 1);
        assert_eq!(hello.limits, crate::Limits::default());
        assert_eq!(hello.routes[0].path_prefix, "/hello");
    }

    #[test]
    fn yaml_several_services() {
        let text = format!(
            "services:
  - name: api
    namespace: shop
    component: {{ digest: \"{DIGEST}\" }}
    replicas: 3
    limits: {{ memory: 128MiB, timeout: 500ms, fuel: unlimited, concurrency: 4 }}
    env: {{ MODE: prod }}
    placement: {{ labels: {{ zone: a }} }}
    autoscale: {{ max: 10, scale_to_zero_after: 2m }}
  - name: web
    component: {{ file: web.wasm }}
"
        );
        let services = check(
            ManifestFormat::Yaml,
            &text,
            Ok(&["shop/api", "default/web"]),
        );
        let api = &services[0];
        assert_eq!(
            api.component,
            ComponentRef::Digest(DIGEST.parse().expect("valid digest"))
        );
        assert_eq!(api.replicas, 3);
        assert_eq!(api.limits.memory, ByteSize::mib(128));
        assert_eq!(api.limits.timeout, Duration::from_millis(500));
        assert_eq!(api.limits.fuel, None);
        assert_eq!(api.limits.concurrency, 4);
        assert_eq!(api.env["MODE"], "prod");
        assert_eq!(api.placement.labels["zone"], "a");
        let autoscale = api.autoscale.as_ref().expect("autoscale given");
        assert_eq!(
            (autoscale.min, autoscale.max, autoscale.scale_to_zero_after),
            (0, 10, Duration::from_secs(120))
        );
    }

    #[test]
    fn yaml_errors_name_the_field_and_line() {
        use ManifestFormat::Yaml;
        let two = |second: &str| {
            format!("services:\n  - name: a\n    component: {{ file: a.wasm }}\n  - {second}\n")
        };
        check(
            Yaml,
            &two("name: b\n    component: { file: b.wasm }\n    replicaz: 2"),
            Err(
                "services[1].replicaz: unknown field `replicaz`, expected one of `namespace`, `name`, `component`, \
                 `replicas`, `limits`, `routes`, `env`, `placement`, `allow_outbound`, `autoscale`, `volumes`, `keyvalue`, `config`, `secrets`, `health`, `rollout`, `traffic`, `source`, `triggers` (line 6, column 5)",
            ),
        );
        check(
            Yaml,
            &two("component: { file: b.wasm }"),
            Err("services[1]: missing field `name` (line 4, column 5)"),
        );
        check(
            Yaml,
            &two("name: b\n    component: { file: b.wasm }\n    replicas: -1"),
            Err(
                "services[1].replicas: invalid type: integer `-1`, expected u32 (line 6, column 15)",
            ),
        );
        check(
            Yaml,
            &two("name: b\n    component: { file: b.wasm }\n    limits: { memory: 64MB5 }"),
            Err(
                "services[1].limits.memory: invalid size \"64MB5\": unknown unit (write a number of bytes or a number \
                 with a unit such as 512KiB, 64MiB, 2GiB) (line 6, column 13)",
            ),
        );
        check(
            Yaml,
            &two("name: b\n    component: { file: b.wasm, digest: x }"),
            Err(
                "services[1].component.digest: malformed sha256 digest \"x\": expected 64 lowercase hex digits \
                 (line 5, column 16)",
            ),
        );
        check(
            Yaml,
            &two("name: b\n    component: {}"),
            Err(
                "services[1].component: give the component as exactly one of `file: path/to/component.wasm`, \
                 `digest: sha256:...` or `oci: REGISTRY/REPOSITORY:TAG` (line 4, column 5)",
            ),
        );
        check(
            Yaml,
            "name: hello\ncomponent: { file: a.wasm }\nreplicas: -1\n",
            Err("replicas: invalid type: integer `-1`, expected u32 (line 3, column 11)"),
        );
        check(
            Yaml,
            "component: { file: a.wasm }\n",
            Err("missing field `name` (line 1, column 1)"),
        );
    }

    #[test]
    fn validation_errors_carry_the_entry_path() {
        let text = "services:\n  - name: a\n    component: { file: a.wasm }\n  - name: b\n    component: { file: b.wasm }\n    limits: { memory: 8GiB }\n";
        check(
            ManifestFormat::Yaml,
            text,
            Err("services[1].limits.memory: must be between 1MiB and 4GiB, got 8GiB"),
        );
        let single = "name: Hello\ncomponent: { file: a.wasm }\n";
        let err = parse_manifest(single, ManifestFormat::Yaml).expect_err("bad name");
        assert!(
            matches!(&err, ManifestError::Invalid(SpecError { field, .. }) if field == "name"),
            "{err}"
        );
    }

    #[test]
    fn duplicates_and_empty_manifests_are_refused() {
        let text = "services:\n  - name: a\n    component: { file: a.wasm }\n  - name: a\n    namespace: default\n    component: { file: b.wasm }\n";
        check(
            ManifestFormat::Yaml,
            text,
            Err("services[1]: default/a is already described at services[0]"),
        );
        let empty =
            "the manifest describes no service: give one service, or a list under `services`";
        check(ManifestFormat::Yaml, "services: []\n", Err(empty));
        check(ManifestFormat::Yaml, "# nothing yet\n", Err(empty));
        check(ManifestFormat::Toml, "", Err(empty));
        check(ManifestFormat::Json, " ", Err(empty));
    }

    #[test]
    fn toml_single_and_several_services() {
        let single = "name = \"hello\"\ncomponent = { file = \"hello.wasm\" }\n[limits]\nmemory = \"32MiB\"\nfuel = \"unlimited\"\n";
        let services = check(ManifestFormat::Toml, single, Ok(&["default/hello"]));
        assert_eq!(services[0].limits.memory, ByteSize::mib(32));
        assert_eq!(services[0].limits.fuel, None);
        let several = format!(
            "[[services]]\nname = \"api\"\ncomponent = {{ digest = \"{DIGEST}\" }}\nreplicas = 2\n\n\
             [[services.routes]]\npath_prefix = \"/api\"\nhost = \"example.com\"\n\n\
             [[services]]\nname = \"web\"\ncomponent = {{ file = \"web.wasm\" }}\n[services.limits]\ntimeout = \"2s\"\n"
        );
        let services = check(
            ManifestFormat::Toml,
            &several,
            Ok(&["default/api", "default/web"]),
        );
        assert_eq!(services[0].routes[0].host.as_deref(), Some("example.com"));
        assert_eq!(services[1].limits.timeout, Duration::from_secs(2));
    }

    #[test]
    fn toml_errors_name_the_field_and_line() {
        use ManifestFormat::Toml;
        let two = |second: &str| {
            format!(
                "[[services]]\nname = \"a\"\ncomponent = {{ file = \"a.wasm\" }}\n\n[[services]]\n{second}\n"
            )
        };
        check(
            Toml,
            &two("name = \"b\"\ncomponent = { file = \"b.wasm\" }\nreplicas = -1"),
            Err(
                "services[1].replicas: invalid value: integer `-1`, expected u32 (line 8, column 12)",
            ),
        );
        check(
            Toml,
            &two("name = \"b\"\ncomponent = { file = \"b.wasm\" }\nreplicaz = 2"),
            Err(
                "services[1].replicaz: unknown field `replicaz`, expected one of `namespace`, `name`, `component`, \
                 `replicas`, `limits`, `routes`, `env`, `placement`, `allow_outbound`, `autoscale`, `volumes`, \
                 `keyvalue`, `config`, `secrets`, `health`, `rollout`, `traffic`, `source`, `triggers` (line 8, column 1)",
            ),
        );
        check(
            Toml,
            &two("component = { file = \"b.wasm\" }"),
            Err("services[1]: missing field `name` (line 5, column 1)"),
        );
        check(
            Toml,
            &two(
                "name = \"b\"\ncomponent = { file = \"b.wasm\" }\nlimits = { memory = \"64 parsecs\" }",
            ),
            Err(
                "services[1].limits.memory: invalid size \"64 parsecs\": unknown unit (write a number of bytes or a \
                 number with a unit such as 512KiB, 64MiB, 2GiB) (line 8, column 21)",
            ),
        );
        check(
            Toml,
            "name = \"a\n",
            Err("invalid basic string, expected `\"` (line 1, column 10)"),
        );
    }

    #[test]
    fn json_manifests() {
        let text =
            format!(r#"{{"services": [{{"name": "a", "component": {{"digest": "{DIGEST}"}}}}]}}"#);
        check(ManifestFormat::Json, &text, Ok(&["default/a"]));
        check(
            ManifestFormat::Json,
            r#"{"name": "a", "component": {"file": "a.wasm"}, "replicas": -1}"#,
            Err("replicas: invalid value: integer `-1`, expected u32 (line 1, column 61)"),
        );
        check(
            ManifestFormat::Json,
            r#"{"name": "a", "component": {"file": "a.wasm"}} {"#,
            Err("trailing characters (line 1, column 48)"),
        );
    }

    #[test]
    fn spread_is_read_from_placement_in_every_format() {
        let yaml = "name: api\ncomponent: { file: api.wasm }\nreplicas: 3\n\
                    placement:\n  labels: { disk: ssd }\n  spread: zone\n";
        let toml = "name = \"api\"\ncomponent = { file = \"api.wasm\" }\nreplicas = 3\n\
                    [placement]\nlabels = { disk = \"ssd\" }\nspread = \"zone\"\n";
        let json = r#"{"name": "api", "component": {"file": "api.wasm"}, "replicas": 3,
                       "placement": {"labels": {"disk": "ssd"}, "spread": "zone"}}"#;
        for (format, text) in [
            (ManifestFormat::Yaml, yaml),
            (ManifestFormat::Toml, toml),
            (ManifestFormat::Json, json),
        ] {
            let services = check(format, text, Ok(&["default/api"]));
            let placement = &services[0].placement;
            assert_eq!(placement.spread.as_deref(), Some("zone"), "{format}");
            assert_eq!(placement.labels["disk"], "ssd", "{format}");
        }
        // Spread alone is enough to keep `placement` when written back.
        let text = "name: api\ncomponent: { file: api.wasm }\nplacement: { spread: rack }\n";
        let manifest = check(ManifestFormat::Yaml, text, Ok(&["default/api"])).remove(0);
        let written = serde_norway::to_string(&manifest).expect("serialises");
        assert!(written.contains("spread: rack"), "{written}");
        assert_eq!(
            parse_manifest(&written, ManifestFormat::Yaml).expect("valid"),
            vec![manifest]
        );
    }

    #[test]
    fn spread_errors_name_the_field() {
        use ManifestFormat::Yaml;
        check(
            Yaml,
            "services:\n  - name: a\n    component: { file: a.wasm }\n    placement: { spread: \"zone name\" }\n",
            Err(
                "services[0].placement.spread: \"zone name\" is not a label key: a label key must be non-empty, \
                 without '=', ',' or whitespace",
            ),
        );
        check(
            Yaml,
            "name: a\ncomponent: { file: a.wasm }\nplacement: { spread: \"\" }\n",
            Err(
                "placement.spread: \"\" is not a label key: a label key must be non-empty, without '=', ',' or \
                 whitespace",
            ),
        );
        // Only `placement.spread`: a top-level `spread` is an unknown field.
        check(
            Yaml,
            "name: a\ncomponent: { file: a.wasm }\nspread: zone\n",
            Err(
                "spread: unknown field `spread`, expected one of `namespace`, `name`, `component`, `replicas`, \
                 `limits`, `routes`, `env`, `placement`, `allow_outbound`, `autoscale`, `volumes`, `keyvalue`, `config`, `secrets`, `health`, `rollout`, `traffic`, `source`, `triggers` (line 3, column 1)",
            ),
        );
        check(
            Yaml,
            "name: a\ncomponent: { file: a.wasm }\nplacement: { spraed: zone }\n",
            Err(
                "placement.spraed: unknown field `spraed`, expected `labels` or `spread` (line 3, column 14)",
            ),
        );
    }

    #[test]
    fn format_from_extension() {
        let format = |p: &str| ManifestFormat::from_path(Path::new(p));
        assert_eq!(format("app.yaml"), Ok(ManifestFormat::Yaml));
        assert_eq!(format("dir/app.YML"), Ok(ManifestFormat::Yaml));
        assert_eq!(format("app.toml"), Ok(ManifestFormat::Toml));
        assert_eq!(format("app.json"), Ok(ManifestFormat::Json));
        let err = format("app.txt")
            .expect_err("unknown extension")
            .to_string();
        assert!(err.contains("app.txt") && err.contains(".yaml"), "{err}");
        assert!(format("Makefile").is_err());
    }

    #[test]
    fn manifest_becomes_spec_and_round_trips() {
        let text = "name: hello\ncomponent: { file: hello.wasm }\nreplicas: 2\n";
        let manifest = parse_manifest(text, ManifestFormat::Yaml)
            .expect("valid")
            .remove(0);
        let yaml = serde_norway::to_string(&manifest).expect("serialises");
        assert_eq!(
            parse_manifest(&yaml, ManifestFormat::Yaml).expect("valid"),
            vec![manifest.clone()]
        );
        let digest = Digest::of(b"hello");
        let spec = manifest.into_spec(digest.clone());
        assert_eq!(spec.component, digest);
        assert_eq!(spec.replicas, 2);
        assert_eq!(spec.validate(), Ok(()));
    }

    #[test]
    fn oci_components_become_the_spec_source() {
        let text = "name: app\ncomponent: { oci: \"127.0.0.1:5000/wharf/app:v1\" }\n";
        let manifest = parse_manifest(text, ManifestFormat::Yaml).expect("valid").remove(0);
        let ComponentRef::Oci(reference) = &manifest.component else { panic!("{:?}", manifest.component) };
        assert_eq!((reference.registry(), reference.repository(), reference.tag()), ("127.0.0.1:5000", "wharf/app", Some("v1")));
        let digest = Digest::of(b"app");
        let spec = manifest.clone().into_spec(digest.clone());
        assert_eq!(spec.component, digest);
        assert_eq!(spec.source.as_ref().map(ToString::to_string).as_deref(), Some("oci://127.0.0.1:5000/wharf/app:v1"));
        // The stored spec round-trips with its source.
        let json = serde_json::to_string(&spec).expect("serialises");
        assert!(json.contains("\"source\":\"oci://127.0.0.1:5000/wharf/app:v1\""), "{json}");
        assert_eq!(serde_json::from_str::<ServiceSpec>(&json).expect("parses"), spec);
        // A file upload records no source.
        let file = parse_manifest("name: a\ncomponent: { file: a.wasm }\n", ManifestFormat::Yaml).expect("valid").remove(0);
        assert_eq!(file.into_spec(digest).source, None);
    }

    #[test]
    fn bad_oci_references_and_ambiguous_components_name_the_field() {
        check(
            ManifestFormat::Yaml,
            "name: a\ncomponent: { oci: \"app:1\" }\n",
            Err("component.oci: \"app:1\" is not an OCI reference (REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:...): name the registry first, e.g. ghcr.io/org/app:1.0 or 127.0.0.1:5000/app:1.0 (line 2, column 12)"),
        );
        check(
            ManifestFormat::Yaml,
            "name: a\ncomponent: { oci: \"ghcr.io/a:1\", file: a.wasm }\n",
            Err("component: give the component as exactly one of `file: path/to/component.wasm`, `digest: sha256:...` or `oci: REGISTRY/REPOSITORY:TAG` (line 1, column 1)"),
        );
    }
}
