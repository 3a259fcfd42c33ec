//! The jobs API: `/v1/jobs` (every job the token may see) and
//! `/v1/namespaces/{ns}/jobs[/{name}[/runs]]`. A job's logs are served by
//! the logs API (`/v1/namespaces/{ns}/jobs/{name}/logs`, see `logs_api.rs`).
//!
//! A write is checked before anything is stored: the spec (schedule and
//! time zone included), the component uploaded and exporting
//! `wasi:cli/run`, no service of the same name, the namespace's quota for
//! one run, a host large enough. Writing a one-off job that is new or
//! changed (or any job with `?run=true`) asks for a run: the job's
//! `requested` count goes up, and the leader starts a run for each
//! request its history has not started.

use crate::ControlPlane;
use crate::api::{ApiError, check_room, check_uploaded, named_body, service_id};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use wharf_proto::job::{JobHistory, JobSpec, StoredJob};
use wharf_proto::ServiceId;

type ApiResult<T = Response> = Result<T, ApiError>;

/// The routes of this module, merged into the API's router.
pub fn routes() -> Router<ControlPlane> {
    Router::new()
        .route("/v1/jobs", get(list_all))
        .route("/v1/namespaces/{ns}/jobs", get(list_namespace))
        .route("/v1/namespaces/{ns}/jobs/{name}", get(get_job).put(put_job).delete(delete_job))
        .route("/v1/namespaces/{ns}/jobs/{name}/runs", post(request_run))
}

/// A job and its runs, as the API shows them.
fn view(job: &StoredJob, history: Option<&JobHistory>) -> Value {
    let next_run_ms = job.spec.parsed_schedule().ok().flatten().and_then(|s| s.next_after(crate::store::now_ms()));
    json!({"job": job, "history": history.cloned().unwrap_or_default(), "next_run_ms": next_run_ms})
}

async fn list_all(State(plane): State<ControlPlane>, visible: Option<axum::Extension<crate::auth::Visible>>) -> ApiResult {
    let visible = visible.map_or(crate::auth::Visible(None), |axum::Extension(v)| v);
    Ok(list(&plane, |ns| visible.allows(ns)))
}

async fn list_namespace(State(plane): State<ControlPlane>, Path(ns): Path<String>) -> ApiResult {
    Ok(list(&plane, |namespace| namespace == ns))
}

fn list(plane: &ControlPlane, shown: impl Fn(&str) -> bool) -> Response {
    let views: Vec<Value> = plane.jobs.read(|state| {
        state.jobs.values().filter(|job| shown(&job.spec.namespace)).map(|job| view(job, state.runs.get(&job.spec.id()).map(|(h, _)| h))).collect()
    });
    axum::Json(json!({"jobs": views})).into_response()
}

/// A job as this scheduler knows it: from memory, else (just written
/// elsewhere, not seen yet) from the store.
async fn find(plane: &ControlPlane, id: &ServiceId) -> ApiResult<(StoredJob, Option<JobHistory>)> {
    let known = plane.jobs.read(|state| state.jobs.get(id).cloned().map(|job| (job, state.runs.get(id).map(|(h, _)| h.clone()))));
    if let Some(found) = known {
        return Ok(found);
    }
    match plane.jobs.job(id).await? {
        Some(job) => Ok((job, None)),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("job {id} not found"))),
    }
}

async fn get_job(State(plane): State<ControlPlane>, Path((ns, name)): Path<(String, String)>) -> ApiResult {
    let id = service_id(&ns, &name)?;
    let (job, history) = find(&plane, &id).await?;
    Ok(axum::Json(view(&job, history.as_ref())).into_response())
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PutQuery {
    /// Ask for a run now (default: for a one-off job that is new or
    /// changed, as applying a manifest again should not run it again; never
    /// for a periodic one).
    run: Option<bool>,
}

async fn put_job(
    State(plane): State<ControlPlane>,
    Path((ns, name)): Path<(String, String)>,
    query: Result<Query<PutQuery>, axum::extract::rejection::QueryRejection>,
    visible: Option<axum::Extension<crate::auth::Visible>>,
    body: Bytes,
) -> ApiResult {
    let Query(query) = query.map_err(|e| ApiError::bad_request(format!("{e} (takes run=true|false)")))?;
    let id = service_id(&ns, &name)?;
    let spec: JobSpec = named_body(&body, &id, "a job spec")?;
    check(&plane, &spec).await?;
    // As for services: a namespace token runs only components its namespace uploaded.
    let visible = visible.map_or(crate::auth::Visible(None), |axum::Extension(v)| v);
    if plane.jobs.job(&id).await?.is_none_or(|job| job.spec.component != spec.component) {
        crate::artifacts_api::check_deployable(&plane, &visible, &spec.namespace, &spec.component).await?;
    }
    for _ in 0..5 {
        let current = plane.jobs.job(&id).await?;
        let changed = current.as_ref().is_none_or(|job| job.spec != spec);
        let run = query.run.unwrap_or(!spec.is_periodic() && changed);
        let (job, expected) = match current {
            Some(mut job) => {
                let version = job.version;
                job.spec = spec.clone();
                job.requested += u64::from(run);
                (job, version)
            }
            None => (StoredJob { spec: spec.clone(), version: 0, created_ms: crate::store::now_ms(), requested: u64::from(run) }, 0),
        };
        match plane.jobs.put_job(&job, expected).await {
            Ok(version) => {
                let status = if expected == 0 { StatusCode::CREATED } else { StatusCode::OK };
                let stored = StoredJob { version, ..job };
                let mut answer = view(&stored, None);
                answer["requested"] = json!(stored.requested);
                answer["run_requested"] = json!(run);
                answer["result"] = json!(if expected == 0 { "created" } else if changed { "updated" } else { "unchanged" });
                return Ok((status, axum::Json(answer)).into_response());
            }
            Err(crate::store::StoreError::Fenced { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("job {id} kept changing; try again")))
}

/// Refuses a job that could never run, before anything is stored.
async fn check(plane: &ControlPlane, spec: &JobSpec) -> ApiResult<()> {
    spec.validate().map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_spec", e.to_string()))?;
    check_uploaded(plane, &spec.component, &spec.namespace).await?;
    if let Some(exports) = crate::triggers::exports_of(plane, &spec.component).await?
        && !exports.iter().any(|name| wharf_proto::job::is_run_export(name))
    {
        let found = if exports.is_empty() { "none".to_string() } else { exports.join(", ") };
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_component",
            format!(
                "component {} does not export `{}` (the wasi:cli/command world), which a job runs; its exports: {found}. Build it as a command (for Rust: a binary with `fn main` for wasm32-wasip2); an HTTP or messaging component runs as a service (`wharf deploy`)",
                spec.component,
                wharf_proto::job::RUN_EXPORT
            ),
        ));
    }
    let id = spec.id();
    if plane.informer.service(&id).is_some() {
        return Err(ApiError::new(StatusCode::CONFLICT, "name_taken", format!("{id} is a service; services and jobs share the names of a namespace")));
    }
    check_room(plane, &spec.namespace, &id, 1, spec.limits.memory.bytes(), "one run's memory").await?;
    if !spec.keyvalue.is_empty() {
        // Hosts may only open data buckets, not create them.
        crate::api::data_bucket(plane, &spec.namespace).await?;
    }
    let hosts = plane.hosts.hosts();
    let biggest = hosts.iter().map(|h| h.heartbeat.capacity.memory).max().unwrap_or_default();
    if !hosts.is_empty() && spec.limits.memory > biggest {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "does_not_fit",
            format!("limits.memory: {} is more than the largest host holds ({biggest})", spec.limits.memory),
        ));
    }
    Ok(())
}

/// Asks for one more run of a job (`wharf run` of an existing job, or a
/// periodic job run now): its `requested` count goes up by compare-and-set.
async fn request_run(State(plane): State<ControlPlane>, Path((ns, name)): Path<(String, String)>) -> ApiResult {
    let id = service_id(&ns, &name)?;
    for _ in 0..5 {
        let Some(mut job) = plane.jobs.job(&id).await? else {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("job {id} not found")));
        };
        let expected = job.version;
        job.requested += 1;
        match plane.jobs.put_job(&job, expected).await {
            Ok(_) => return Ok((StatusCode::ACCEPTED, axum::Json(json!({"job": id.to_string(), "requested": job.requested}))).into_response()),
            Err(crate::store::StoreError::Fenced { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("job {id} kept changing; try again")))
}

async fn delete_job(State(plane): State<ControlPlane>, Path((ns, name)): Path<(String, String)>) -> ApiResult {
    let id = service_id(&ns, &name)?;
    find(&plane, &id).await?;
    plane.jobs.delete_job(&id).await?;
    Ok(axum::Json(json!({"deleted": id.to_string()})).into_response())
}
