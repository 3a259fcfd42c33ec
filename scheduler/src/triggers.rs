//! What a service with message triggers gets when it is written: its
//! component must export the handler triggers call (and a service without
//! triggers the HTTP handler), so a deploy that could never be reached is
//! refused with the export's name rather than failing on every host; and
//! the control plane, which owns streams (hosts may not create them under
//! the shipped NATS roles), creates each stream trigger's stream.

use crate::ControlPlane;
use crate::api::ApiError;
use axum::http::StatusCode;
use wharf_bus::StreamError;
use wharf_proto::ServiceSpec;
use wharf_proto::trigger::{MESSAGE_HANDLER_EXPORT, message_subject, stream_name};

/// The HTTP handler export, any 0.2 version.
const HTTP_HANDLER_EXPORT: &str = "wasi:http/incoming-handler@0.2";

/// Creates (or extends with the trigger's subject) the stream of every
/// stream trigger. Over the in-process bus, which has no streams, a stream
/// trigger is refused.
pub(crate) async fn ensure_streams(plane: &ControlPlane, spec: &ServiceSpec) -> Result<(), ApiError> {
    for (i, trigger) in spec.triggers.iter().enumerate() {
        let Some(stream) = &trigger.stream else { continue };
        let name = stream_name(&spec.namespace, stream);
        let subject = message_subject(&spec.namespace, &trigger.subject);
        plane.bus.ensure_stream(&name, &subject).await.map_err(|e| {
            let status = match e {
                StreamError::Unsupported { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            ApiError::new(status, "stream_unavailable", format!("triggers[{i}].stream: {e}"))
        })?;
    }
    Ok(())
}

/// Refuses a service with triggers whose component lacks
/// [`MESSAGE_HANDLER_EXPORT`], and one without triggers whose component
/// has no HTTP handler. Skipped when neither the component nor whether the
/// service has triggers changed (a scale, say), so those writes read no artifact.
pub(crate) async fn check_exports(plane: &ControlPlane, spec: &ServiceSpec) -> Result<(), ApiError> {
    if let Some(stored) = plane.informer.service(&spec.id())
        && stored.spec.component == spec.component
        && stored.spec.triggers.is_empty() == spec.triggers.is_empty()
    {
        return Ok(());
    }
    let Some(exports) = exports_of(plane, &spec.component).await? else {
        // The caller has already refused a component that is not uploaded.
        return Ok(());
    };
    let found = || if exports.is_empty() { "none".to_string() } else { exports.join(", ") };
    let refuse = |message: String| Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_component", message));
    if !spec.triggers.is_empty() && !exports.iter().any(|name| name == MESSAGE_HANDLER_EXPORT) {
        return refuse(format!(
            "triggers: component {} does not export `{MESSAGE_HANDLER_EXPORT}`, which a service with triggers needs (its exports: {}); build it for the wasmcloud:messaging world, or remove `triggers`",
            spec.component,
            found()
        ));
    }
    if spec.triggers.is_empty() && !exports.iter().any(|name| name.starts_with(HTTP_HANDLER_EXPORT)) {
        return refuse(format!(
            "component {} does not export `wasi:http/incoming-handler` (its exports: {}), so without `triggers` nothing could reach the service; add triggers for its message handler",
            spec.component,
            found()
        ));
    }
    Ok(())
}

/// Exports already read, by component digest (an artifact never changes
/// under its digest). Bounded: emptied when it holds this many.
const EXPORTS_KEPT: usize = 4096;

/// The exports of component `digest`, read from the artifact store once
/// per digest: without this every write of a service (thousands in an
/// `apply`) would fetch and parse its component again. Misses are read one
/// at a time, so a burst of writes of one new component reads it once.
pub(crate) async fn exports_of(plane: &ControlPlane, digest: &wharf_proto::Digest) -> Result<Option<std::sync::Arc<Vec<String>>>, ApiError> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static KNOWN: OnceLock<Mutex<HashMap<wharf_proto::Digest, Arc<Vec<String>>>>> = OnceLock::new();
    static READING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let known = KNOWN.get_or_init(Mutex::default);
    let cached = || known.lock().ok().and_then(|map| map.get(digest).cloned());
    if let Some(exports) = cached() {
        return Ok(Some(exports));
    }
    let _reading = READING.lock().await;
    if let Some(exports) = cached() {
        return Ok(Some(exports));
    }
    let Some(bytes) = plane.store.artifact(digest).await? else { return Ok(None) };
    let check = plane.check.clone();
    let exports = tokio::task::spawn_blocking(move || check.exports(&bytes))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("the component check failed: {e}")))?
        .map_err(|message| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_component", message))?;
    let exports = Arc::new(exports);
    if let Ok(mut map) = known.lock() {
        if map.len() >= EXPORTS_KEPT {
            map.clear();
        }
        map.insert(digest.clone(), exports.clone());
    }
    Ok(Some(exports))
}
