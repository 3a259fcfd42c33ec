//! The web dashboard at `/ui`: one page served by the control plane itself
//! (no CDN, nothing from outside: its content security policy forbids it).
//!
//! The page holds no data, so it needs no token; its script reads the API
//! with the token the user gives it (`/ui#token=...` once, then kept in the
//! browser's storage, or typed in), so the dashboard shows exactly what
//! that token may read: hosts, services with replicas, revisions, traffic
//! and rollout, live load (refreshed every 2 s), events and a log tail.

use crate::ControlPlane;
use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

/// The page; its script and styles are inline.
const PAGE: &str = include_str!("dashboard.html");

/// What the page may load: itself and the API, nothing else.
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'";

/// The routes of this module, merged into the API's router.
pub fn routes() -> Router<ControlPlane> {
    Router::new().route("/ui", get(page))
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(PAGE),
    )
        .into_response()
}
