//! The API of revisions and rollouts: a service's history, where its
//! rollout stands, and the hand controls (undo, canary, promote, abort).
//! Each control is an edit of the service's spec (or record), checked and
//! written like any other; the leader's planner does the rest.

use crate::ControlPlane;
use crate::api::{ApiError, edit_spec, find_service, service_id};
use crate::auth::Principal;
use crate::status::Views;
use crate::store::Change;
use axum::Extension;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use wharf_proto::{RolloutPhase, ServiceId, ServiceSpec, TrafficTarget};

type ApiResult<T = Response> = Result<T, ApiError>;

fn change(principal: Option<Extension<Principal>>, cause: String) -> Change {
    Change { by: principal.map(|Extension(p)| p.0).unwrap_or_default(), cause }
}

/// `GET .../revisions`: the kept revisions, oldest first, marked current and stable.
pub async fn list_revisions(State(plane): State<ControlPlane>, Path((ns, name)): Path<(String, String)>) -> ApiResult {
    let id = service_id(&ns, &name)?;
    let stored = find_service(&plane, &id).await?;
    let stable = plane.informer.status(&id).map_or(0, |s| s.rollout.stable);
    let revisions: Vec<Value> = plane
        .store
        .revisions(&stored)
        .await?
        .into_iter()
        .map(|r| {
            json!({
                "revision": r.number,
                "created_at_ms": r.created_at_ms,
                "created_by": r.created_by,
                "cause": r.cause,
                "component": r.spec.component,
                "current": r.number == stored.revision,
                "stable": r.number == stable,
            })
        })
        .collect();
    Ok(axum::Json(json!({"service": id.to_string(), "current": stored.revision, "stable": stable, "revisions": revisions})).into_response())
}

/// `GET .../revisions/{n}`: one revision, with its whole spec.
pub async fn get_revision(State(plane): State<ControlPlane>, Path((ns, name, number)): Path<(String, String, u64)>) -> ApiResult {
    let id = service_id(&ns, &name)?;
    match plane.store.revision(&id, number).await? {
        Some(revision) => Ok(axum::Json(revision).into_response()),
        None => Err(not_kept(&id, number)),
    }
}

fn not_kept(id: &ServiceId, number: u64) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("{id} has no revision {number} (see `wharf rollout history {}`)", id.name))
}

/// `GET .../rollout`: where the rollout stands, for `wharf rollout status`.
pub async fn get_rollout(State(plane): State<ControlPlane>, Path((ns, name)): Path<(String, String)>) -> ApiResult {
    let id = service_id(&ns, &name)?;
    let stored = find_service(&plane, &id).await?;
    let view = Views::of(&plane, &stored.spec.id()).view(&plane, &stored);
    let status = plane.informer.status(&id);
    // Until the leader has decided on this very version of the service, what it wrote is stale.
    let planned = status.as_ref().is_some_and(|s| s.observed_generation >= stored.generation && s.rollout.latest == stored.revision);
    Ok(axum::Json(json!({
        "service": id.to_string(),
        "revision": stored.revision,
        "planned": planned,
        "rollout": status.as_ref().map(|s| &s.rollout),
        "revisions": view["status"]["revisions"],
        "desired": view["status"]["desired"],
        "ready": view["status"]["ready"],
        "replicas": view["status"]["replicas"],
    }))
    .into_response())
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Undo {
    /// The revision to go back to; default: the one before the current.
    #[serde(default)]
    to: Option<u64>,
}

/// `POST .../rollout/undo {"to": N}`: the spec takes revision N's template
/// again (the previous revision by default); replicas, autoscaling and the
/// rollout policy stay; any traffic split is cleared. The kept revision
/// with that template is reused, so nothing is renumbered.
pub async fn undo(
    State(plane): State<ControlPlane>,
    Path((ns, name)): Path<(String, String)>,
    principal: Option<Extension<Principal>>,
    body: Bytes,
) -> ApiResult {
    let id = service_id(&ns, &name)?;
    let undo: Undo = if body.is_empty() {
        Undo::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("expected {{\"to\": N}} or nothing: {e}")))?
    };
    let stored = find_service(&plane, &id).await?;
    let kept = crate::store::kept(&stored);
    let to = match undo.to {
        Some(to) => to,
        None => kept.iter().rev().copied().find(|n| *n < stored.revision).ok_or_else(|| {
            ApiError::new(StatusCode::CONFLICT, "no_previous", format!("{id} has no revision before {} to go back to", stored.revision))
        })?,
    };
    let Some(target) = plane.store.revision(&id, to).await? else { return Err(not_kept(&id, to)) };
    let change = change(principal, format!("undo to revision {to}"));
    let stored = edit_spec(&plane, &id, &change, |spec| {
        take_template(spec, &target.spec);
        Ok(())
    })
    .await?;
    Ok(axum::Json(json!({"service": id.to_string(), "revision": stored.revision, "undone_to": to})).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Canary {
    /// Percent of requests for the latest revision.
    percent: u32,
}

/// `POST .../rollout/canary {"percent": P}`: the latest revision takes P%
/// of requests and the stable one the rest, until `promote` or `abort`.
pub async fn canary(
    State(plane): State<ControlPlane>,
    Path((ns, name)): Path<(String, String)>,
    principal: Option<Extension<Principal>>,
    body: Bytes,
) -> ApiResult {
    let id = service_id(&ns, &name)?;
    let canary: Canary = serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("expected {{\"percent\": P}}: {e}")))?;
    if !(1..100).contains(&canary.percent) {
        return Err(ApiError::bad_request(format!("percent must be between 1 and 99, got {}", canary.percent)));
    }
    let stored = find_service(&plane, &id).await?;
    let stable = stable_revision(&plane, &id, stored.revision)?;
    let change = change(principal, format!("canary {}%", canary.percent));
    edit_spec(&plane, &id, &change, |spec| {
        spec.traffic = vec![
            TrafficTarget { revision: Some(stable), latest: false, percent: 100 - canary.percent },
            TrafficTarget { revision: None, latest: true, percent: canary.percent },
        ];
        Ok(())
    })
    .await?;
    Ok(axum::Json(json!({"service": id.to_string(), "stable": stable, "canary": stored.revision, "percent": canary.percent})).into_response())
}

/// The stable revision, which must differ from `latest` for a canary to mean anything.
fn stable_revision(plane: &ControlPlane, id: &ServiceId, latest: u64) -> ApiResult<u64> {
    let status = plane.informer.status(id);
    let stable = status.as_ref().map_or(0, |s| s.rollout.stable);
    if stable == 0 || stable == latest {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_canary",
            format!("{id} runs revision {latest} everywhere: deploy a new revision first (`wharf deploy ... --canary 10`), then split traffic"),
        ));
    }
    Ok(stable)
}

/// `POST .../rollout/promote`: the latest revision is rolled out to every
/// replica (a manual split is cleared; an automatic canary skips its
/// remaining steps).
pub async fn promote(
    State(plane): State<ControlPlane>,
    Path((ns, name)): Path<(String, String)>,
    principal: Option<Extension<Principal>>,
) -> ApiResult {
    let id = service_id(&ns, &name)?;
    let stored = find_service(&plane, &id).await?;
    let phase = plane.informer.status(&id).map(|s| s.rollout.phase);
    if stored.spec.traffic.is_empty() && phase != Some(RolloutPhase::Canary) {
        return Err(ApiError::new(StatusCode::CONFLICT, "no_canary", format!("{id} has no canary to promote")));
    }
    plane.store.set_promoted(&id, stored.revision).await?;
    if !stored.spec.traffic.is_empty() {
        let change = change(principal, "promote".to_string());
        edit_spec(&plane, &id, &change, |spec| {
            spec.traffic.clear();
            Ok(())
        })
        .await?;
    }
    Ok(axum::Json(json!({"service": id.to_string(), "promoted": stored.revision})).into_response())
}

/// `POST .../rollout/abort`: back to the stable revision (its template
/// again, reusing its number), the canary's replicas stopped.
pub async fn abort(
    State(plane): State<ControlPlane>,
    Path((ns, name)): Path<(String, String)>,
    principal: Option<Extension<Principal>>,
) -> ApiResult {
    let id = service_id(&ns, &name)?;
    let stored = find_service(&plane, &id).await?;
    let stable = stable_revision(&plane, &id, stored.revision)?;
    let Some(target) = plane.store.revision(&id, stable).await? else { return Err(not_kept(&id, stable)) };
    let change = change(principal, format!("abort: back to revision {stable}"));
    edit_spec(&plane, &id, &change, |spec| {
        take_template(spec, &target.spec);
        Ok(())
    })
    .await?;
    Ok(axum::Json(json!({"service": id.to_string(), "aborted": stored.revision, "revision": stable})).into_response())
}

/// Gives `spec` the template of `from` (a kept revision's spec), keeping
/// its scale, autoscaling and rollout policy and clearing any traffic
/// split: what undo and abort write.
fn take_template(spec: &mut ServiceSpec, from: &ServiceSpec) {
    let mut next = from.clone();
    next.replicas = spec.replicas;
    next.autoscale = spec.autoscale.clone();
    next.rollout = spec.rollout.clone();
    next.traffic = Vec::new();
    *spec = next;
}
