//! `GET /v1/namespaces/{ns}/events`: the control plane's events of a
//! namespace (`events.rs`), oldest first; `service=NAME` keeps one
//! service's, `limit=N` the newest N, `follow=true` streams JSON lines: the
//! kept events, then each new one, until the client goes away. Namespace
//! tokens apply as on every `/v1/namespaces/{ns}/...` path.

use crate::ControlPlane;
use crate::api::ApiError;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use std::sync::atomic::AtomicUsize;
use wharf_proto::observe::Event;

/// Followers (`follow=true`) one scheduler serves at once; more get 503.
pub const MAX_FOLLOWERS: usize = 256;

/// Followers being served now, against [`MAX_FOLLOWERS`].
static FOLLOWERS: AtomicUsize = AtomicUsize::new(0);

/// The routes of this module, merged into the API's router.
pub fn routes() -> Router<ControlPlane> {
    Router::new().route("/v1/namespaces/{ns}/events", get(events))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsParams {
    service: Option<String>,
    limit: Option<usize>,
    follow: Option<bool>,
}

async fn events(
    State(plane): State<ControlPlane>,
    Path(ns): Path<String>,
    params: Result<Query<EventsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(format!("{e} (takes service, limit, follow)")))?;
    wharf_proto::names::check_label(&ns).map_err(|e| ApiError::bad_request(format!("namespace: {e}")))?;
    let service = match &params.service {
        Some(name) => Some(crate::api::service_id(&ns, name)?),
        None => None,
    };
    let mine = move |event: &Event| service.as_ref().is_none_or(|s| *s == event.service);
    let mut kept: Vec<Event> = crate::events::read(&plane.events, &ns).await.map_err(unavailable)?.into_iter().filter(&mine).collect();
    if let Some(limit) = params.limit
        && kept.len() > limit
    {
        kept.drain(..kept.len() - limit);
    }
    if params.follow != Some(true) {
        return Ok(axum::Json(serde_json::json!({"events": kept})).into_response());
    }
    let slot = crate::logs_api::FollowerSlot::take(&FOLLOWERS, MAX_FOLLOWERS, "events")?;
    let after = kept.last().map_or(0, |e| e.seq);
    let live = crate::events::follow(&plane.events, &ns, after).await.map_err(unavailable)?;
    let stream = futures::stream::iter(kept).chain(live.filter(move |e| futures::future::ready(mine(e)))).map(move |event| {
        let _held = &slot;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Ok::<Bytes, std::convert::Infallible>(Bytes::from(line))
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], Body::from_stream(stream)).into_response())
}

fn unavailable(e: wharf_bus::KvError) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", format!("the events bucket failed: {e}"))
}
