//! `GET /v1/tokens` and `DELETE /v1/tokens/{id}`: listing and revoking API
//! tokens (admin only; the middleware refuses namespace tokens). A listing
//! shows ids, roles, creation and expiry times, never hashes or tokens.

use crate::ControlPlane;
use crate::api::ApiError;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use serde_json::json;

/// The routes of this module, merged into the API's router.
pub fn routes() -> Router<ControlPlane> {
    Router::new().route("/v1/tokens", get(list)).route("/v1/tokens/{id}", delete(revoke))
}

fn tokens(plane: &ControlPlane) -> Result<&crate::auth::Tokens, ApiError> {
    plane.tokens.as_ref().ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "authentication is off on this control plane"))
}

fn store_failed(e: wharf_bus::KvError) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", format!("the token store failed: {e}"))
}

async fn list(State(plane): State<ControlPlane>) -> Result<Response, ApiError> {
    let mut listed = tokens(&plane)?.list().await.map_err(store_failed)?;
    listed.sort_by_key(|(_, record)| record.created_at_ms);
    let now = crate::store::now_ms();
    let tokens: Vec<_> = listed
        .into_iter()
        .map(|(id, record)| {
            let expired = record.expires_at_ms.is_some_and(|at| at <= now);
            json!({"id": id, "role": record.role, "created_at_ms": record.created_at_ms, "expires_at_ms": record.expires_at_ms, "expired": expired})
        })
        .collect();
    Ok(axum::Json(json!({"tokens": tokens})).into_response())
}

async fn revoke(State(plane): State<ControlPlane>, Path(id): Path<String>) -> Result<Response, ApiError> {
    // A whole token works as well as its id: take the id out of it.
    let id = id.strip_prefix("wharf_").and_then(|rest| rest.split('_').next()).unwrap_or(&id).to_string();
    if tokens(&plane)?.revoke(&id).await.map_err(store_failed)? {
        Ok(axum::Json(json!({"revoked": id})).into_response())
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no token with id {id:?} (ids are the 12 hex digits after `wharf_`; `wharf token list` shows them)")))
    }
}
