//! Refusing unknown fields in what people write, while messages between
//! processes accept them.
//!
//! Spec types do not carry `#[serde(deny_unknown_fields)]`: a host reading a
//! stored spec written by a newer scheduler must not fail on a field it does
//! not know yet. Where a person writes a spec (a manifest, a body sent to
//! the API), a typo must still be an error, so those paths deserialize
//! through [`serde_ignored`], which reports every field the types skipped,
//! and the first one is refused here with the same message serde's own
//! `deny_unknown_fields` gives (`unknown field `replicaz`, expected one of
//! ...`), naming the field's path.

use crate::manifest::ComponentRef;
use crate::rollout::{CanaryPolicy, Ejection, Health, Readiness, RolloutPolicy, TrafficTarget};
use crate::spec::{Autoscale, Limits, Placement, Route, ServiceSpec, Volume};
use crate::wire::{Namespace, Quota};
use serde::de::{self, DeserializeOwned, Visitor};
use std::fmt;

/// An unknown field found where people write specs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownField {
    /// The path to the field, e.g. `services[1].limits.memroy`.
    pub path: String,
    /// The field's own name.
    pub key: String,
    /// What it should have been, in serde's words (`unknown field `x`, expected one of ...`).
    pub message: String,
}

impl fmt::Display for UnknownField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Why a JSON body was refused by [`from_json`].
#[derive(Debug, thiserror::Error)]
pub enum StrictError {
    /// The JSON does not fit the type; `path` leads to the field at fault.
    #[error("{}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
    Invalid {
        /// The path to the field, empty for the whole document.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The JSON names a field the type does not have.
    #[error("{0}")]
    Unknown(UnknownField),
}

/// Reads `T` from JSON the way the API reads what people send: errors
/// name the field's path, and an unknown field is an error.
pub fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StrictError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let mut ignored = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| ignored.push(path_text(&path));
    let value: T = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(&mut deserializer, &mut record))
    .map_err(|e| StrictError::Invalid { path: clean_path(e.path().to_string()), message: e.inner().to_string() })?;
    deserializer.end().map_err(|e| StrictError::Invalid { path: String::new(), message: e.to_string() })?;
    match ignored.into_iter().next() {
        Some(path) => Err(StrictError::Unknown(unknown_field_in::<T>(path))),
        None => Ok(value),
    }
}

/// Reads `T` from a JSON value the way [`from_json`] does.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, StrictError> {
    let mut ignored = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| ignored.push(path_text(&path));
    let result: T = serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut record))
    .map_err(|e| StrictError::Invalid { path: clean_path(e.path().to_string()), message: e.inner().to_string() })?;
    match ignored.into_iter().next() {
        Some(path) => Err(StrictError::Unknown(unknown_field_in::<T>(path))),
        None => Ok(result),
    }
}

/// Deserializes with `deserializer`, collecting the paths of skipped fields
/// into `ignored`. For formats that report their own locations (manifests).
pub(crate) fn deserialize_collecting<'de, D, T>(
    deserializer: D,
    ignored: &mut Vec<String>,
) -> Result<T, serde_path_to_error::Error<D::Error>>
where
    D: de::Deserializer<'de>,
    T: de::Deserialize<'de>,
{
    let mut record = |path: serde_ignored::Path<'_>| ignored.push(path_text(&path));
    serde_path_to_error::deserialize(serde_ignored::Deserializer::new(deserializer, &mut record))
}

/// serde_path_to_error writes `.` for the document itself.
fn clean_path(path: String) -> String {
    if path == "." { String::new() } else { path }
}

/// The path as the rest of Wharf writes it: `services[1].limits.memroy`.
fn path_text(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", path_text(parent)),
        Path::Map { parent, key } => {
            let parent = path_text(parent);
            if parent.is_empty() { key.clone() } else { format!("{parent}.{key}") }
        }
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => path_text(parent),
    }
}

/// The error for the skipped field at `path` of a manifest, with the
/// fields its struct has.
pub(crate) fn unknown_field(path: String) -> UnknownField {
    unknown_field_in::<ServiceSpec<ComponentRef>>(path)
}

/// The error for the skipped field at `path` of a `T`.
fn unknown_field_in<T: DeserializeOwned>(path: String) -> UnknownField {
    let (parent, key) = match path.rsplit_once('.') {
        Some((parent, key)) => (parent.to_string(), key.to_string()),
        None => (String::new(), path.clone()),
    };
    let fields = if parent.is_empty() { Some(fields_of::<T>()).filter(|f| !f.is_empty()) } else { fields_at(&parent) };
    let message = match fields {
        Some(fields) => <SimpleError as de::Error>::unknown_field(&key, fields).0,
        None => format!("unknown field `{key}`"),
    };
    UnknownField { path, key, message }
}

/// The fields of the struct found at `parent` in a spec, a manifest or a
/// namespace, from the types themselves, by the name the struct goes by.
fn fields_at(parent: &str) -> Option<&'static [&'static str]> {
    // The last segment names the struct: `services[1].limits` -> `limits`.
    let segment = parent.rsplit('.').next().unwrap_or("");
    let segment = segment.split('[').next().unwrap_or(segment);
    Some(match segment {
        "" | "services" => fields_of::<ServiceSpec<ComponentRef>>(),
        "limits" => fields_of::<Limits>(),
        "routes" => fields_of::<Route>(),
        "placement" => fields_of::<Placement>(),
        "autoscale" => fields_of::<Autoscale>(),
        "volumes" => fields_of::<Volume>(),
        "health" => fields_of::<Health>(),
        "readiness" => fields_of::<Readiness>(),
        "ejection" => fields_of::<Ejection>(),
        "rollout" => fields_of::<RolloutPolicy>(),
        "canary" => fields_of::<CanaryPolicy>(),
        "traffic" => fields_of::<TrafficTarget>(),
        "quota" => fields_of::<Quota>(),
        "namespace" => fields_of::<Namespace>(),
        _ => return None,
    })
}

/// The field names a derived `Deserialize` asks for, read by a deserializer
/// that only records them: the list stays true as fields are added.
pub(crate) fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut probe = FieldProbe(&[]);
    let _ = T::deserialize(&mut probe);
    probe.0
}

struct FieldProbe(&'static [&'static str]);

#[derive(Debug)]
struct SimpleError(String);

impl fmt::Display for SimpleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SimpleError {}

impl de::Error for SimpleError {
    fn custom<M: fmt::Display>(message: M) -> Self {
        SimpleError(message.to_string())
    }
}

impl<'de> de::Deserializer<'de> for &mut FieldProbe {
    type Error = SimpleError;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, SimpleError> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, SimpleError> {
        self.0 = fields;
        Err(de::Error::custom("probed"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServiceSpec;

    #[test]
    fn unknown_fields_are_refused_with_the_known_ones() {
        let err = from_json::<ServiceSpec>(br#"{"name": "a", "component": "sha256:0000000000000000000000000000000000000000000000000000000000000000", "limits": {"memroy": "1MiB"}}"#)
            .expect_err("unknown field");
        let text = err.to_string();
        assert!(text.starts_with("limits.memroy: unknown field `memroy`, expected one of `memory`, `memory_request`, `fuel`"), "{text}");
    }

    #[test]
    fn wire_readers_ignore_unknown_fields() {
        let json = r#"{"name": "a", "component": "sha256:0000000000000000000000000000000000000000000000000000000000000000", "from_the_future": 1, "limits": {"later": true}}"#;
        let spec: ServiceSpec = serde_json::from_str(json).expect("plain serde ignores unknown fields");
        assert_eq!(spec.name, "a");
        assert!(from_json::<ServiceSpec>(json.as_bytes()).is_err());
    }

    #[test]
    fn the_probe_reads_every_field() {
        let fields = fields_of::<ServiceSpec>();
        for name in ["namespace", "name", "component", "replicas", "health", "rollout", "traffic"] {
            assert!(fields.contains(&name), "{name} in {fields:?}");
        }
    }
}
