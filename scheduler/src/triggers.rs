//! The checks a service with message triggers gets when it is written:
//! its component must export the handler triggers call, so a deploy that
//! could never handle a message is refused with the export's name rather
//! than failing on every host.

use crate::ControlPlane;
use crate::api::ApiError;
use axum::http::StatusCode;
use wharf_proto::ServiceSpec;
use wharf_proto::trigger::MESSAGE_HANDLER_EXPORT;

/// Refuses a service with triggers whose component lacks [`MESSAGE_HANDLER_EXPORT`].
pub(crate) async fn check_handler(plane: &ControlPlane, spec: &ServiceSpec) -> Result<(), ApiError> {
    if spec.triggers.is_empty() {
        return Ok(());
    }
    let Some(bytes) = plane.store.artifact(&spec.component).await? else {
        // The caller has already refused a component that is not uploaded.
        return Ok(());
    };
    let check = plane.check.clone();
    let exports = tokio::task::spawn_blocking(move || check.exports(&bytes))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("the component check failed: {e}")))?
        .map_err(|message| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_component", message))?;
    if exports.iter().any(|name| name == MESSAGE_HANDLER_EXPORT) {
        return Ok(());
    }
    let found = if exports.is_empty() { "none".to_string() } else { exports.join(", ") };
    Err(ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_component",
        format!(
            "triggers: component {} does not export `{MESSAGE_HANDLER_EXPORT}`, which a service with triggers needs (its exports: {found}); build it for the wasmcloud:messaging world, or remove `triggers`",
            spec.component
        ),
    ))
}
