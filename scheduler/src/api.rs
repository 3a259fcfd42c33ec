//! The REST API (JSON over HTTP, under `/v1`). Every error is
//! `{"error": {"code": "...", "message": "..."}}` with a message that names
//! the problem, and a refused request changes nothing.

use crate::ControlPlane;
use crate::auth::Principal;
use crate::status::Views;
use crate::store::{Change, StoreError, Written};
use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use wharf_proto::{ServiceId, ServiceSpec, StoredService};

/// Largest component accepted by `POST /v1/artifacts`.
pub const MAX_ARTIFACT: usize = 64 * 1024 * 1024;

/// Largest body of any other request (a spec, a value, a secret).
pub const MAX_BODY: usize = 1024 * 1024;

fn check_size(body: &Bytes) -> ApiResult<()> {
    if body.len() > MAX_BODY {
        return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("the body is {} bytes; at most {MAX_BODY} are accepted here", body.len())));
    }
    Ok(())
}

/// An API error: HTTP status, a stable code, and a message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    pub(crate) code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({"error": {"code": self.code, "message": self.message}}))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::Conflict { .. } | StoreError::Exists(_) | StoreError::Fenced { .. } => StatusCode::CONFLICT,
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        let code = match &e {
            StoreError::Conflict { .. } | StoreError::Fenced { .. } => "conflict",
            StoreError::Exists(_) => "already_exists",
            StoreError::NotFound(_) => "not_found",
            StoreError::TooLarge { .. } => "too_large",
            _ => "store_unavailable",
        };
        ApiError::new(status, code, e.to_string())
    }
}

type ApiResult<T = Response> = Result<T, ApiError>;

/// The API's routes over a control plane.
pub fn router(plane: ControlPlane) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/services", get(list_all_services))
        .route("/v1/namespaces", get(list_namespaces))
        .route("/v1/namespaces/{ns}", get(get_namespace).put(put_namespace))
        .route("/v1/namespaces/{ns}/services", get(list_services))
        .route("/v1/namespaces/{ns}/services/{name}", get(get_service).put(put_service).delete(delete_service))
        .route("/v1/namespaces/{ns}/services/{name}/scale", post(scale_service))
        .route("/v1/namespaces/{ns}/services/{name}/revisions", get(crate::rollout_api::list_revisions))
        .route("/v1/namespaces/{ns}/services/{name}/revisions/{number}", get(crate::rollout_api::get_revision))
        .route("/v1/namespaces/{ns}/services/{name}/rollout", get(crate::rollout_api::get_rollout))
        .route("/v1/namespaces/{ns}/services/{name}/rollout/undo", post(crate::rollout_api::undo))
        .route("/v1/namespaces/{ns}/services/{name}/rollout/canary", post(crate::rollout_api::canary))
        .route("/v1/namespaces/{ns}/services/{name}/rollout/promote", post(crate::rollout_api::promote))
        .route("/v1/namespaces/{ns}/services/{name}/rollout/abort", post(crate::rollout_api::abort))
        .route("/v1/namespaces/{ns}/kv/{bucket}", get(kv_list))
        .route("/v1/namespaces/{ns}/kv/{bucket}/{key}", get(kv_get).put(kv_put).delete(kv_delete))
        .route("/v1/namespaces/{ns}/secrets", get(secret_list))
        .route("/v1/namespaces/{ns}/secrets/{name}", axum::routing::put(secret_put).delete(secret_delete))
        .route("/v1/hosts", get(list_hosts))
        .route("/metrics", get(metrics))
        .route("/v1/tokens", post(create_token))
        .merge(crate::tokens_api::routes())
        .merge(crate::jobs_api::routes())
        .merge(crate::artifacts_api::routes())
        .merge(crate::claims::routes())
        .merge(crate::logs_api::routes())
        .merge(crate::events_api::routes())
        .merge(crate::dashboard::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such API path; see /v1/services, /v1/artifacts, /v1/hosts") })
        .method_not_allowed_fallback(|| async { ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this path does not take that method") })
        .layer(axum::middleware::from_fn_with_state(plane.clone(), crate::auth::authorise))
        .layer(DefaultBodyLimit::max(MAX_ARTIFACT))
        .with_state(plane)
}

/// The autoscaler's series of the services the token may see (a
/// namespace token: its namespaces'), and, for an admin, the control
/// loop's own.
async fn metrics(State(plane): State<ControlPlane>, visible: Option<Extension<crate::auth::Visible>>) -> Response {
    let visible = visible.map_or(crate::auth::Visible(None), |Extension(v)| v);
    let passes = if visible.0.is_none() { plane.pass_stats.metrics() } else { String::new() };
    let series = plane.autoscaling.metrics(|namespace| visible.allows(namespace));
    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], format!("{series}{passes}# EOF\n")).into_response()
}

async fn healthz(State(plane): State<ControlPlane>) -> Response {
    let leadership = match plane.leadership() {
        crate::leader::Leadership::Leader { epoch } => json!({"leader": true, "epoch": epoch}),
        crate::leader::Leadership::Follower { leader } => json!({"leader": false, "lease_holder": leader}),
    };
    axum::Json(json!({"status": "ok", "scheduler": plane.config.name, "leadership": leadership})).into_response()
}

/// Every service the token may see: all of them for an admin, those of its namespaces for a namespace token.
async fn list_all_services(State(plane): State<ControlPlane>, visible: Option<axum::Extension<crate::auth::Visible>>) -> ApiResult {
    let visible = visible.map_or(crate::auth::Visible(None), |axum::Extension(v)| v);
    list(&plane, |ns| visible.allows(ns)).await
}

async fn list_services(State(plane): State<ControlPlane>, Path(ns): Path<String>) -> ApiResult {
    list(&plane, |namespace| namespace == ns).await
}

async fn list(plane: &ControlPlane, shown: impl Fn(&str) -> bool) -> ApiResult {
    let services = plane.informer.read(|state| state.services.values().filter(|s| shown(&s.spec.namespace)).cloned().collect::<Vec<_>>());
    let views = Views::gather_where(plane, |id| shown(&id.namespace));
    let views: Vec<Value> = services.iter().map(|stored| views.view(plane, stored)).collect();
    Ok(axum::Json(json!({"services": views})).into_response())
}

pub(crate) fn service_id(ns: &str, name: &str) -> ApiResult<ServiceId> {
    ServiceId::new(ns, name).map_err(|e| ApiError::bad_request(format!("bad service path {ns}/{name}: {e}")))
}

/// A service as this scheduler knows it: from memory, else (just written
/// elsewhere, not seen yet) from the store.
pub(crate) async fn find_service(plane: &ControlPlane, id: &ServiceId) -> ApiResult<std::sync::Arc<StoredService>> {
    if let Some(stored) = plane.informer.service(id) {
        return Ok(stored);
    }
    match plane.store.service(id).await? {
        Some(stored) => Ok(std::sync::Arc::new(stored)),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("service {id} not found"))),
    }
}

async fn get_service(State(plane): State<ControlPlane>, Path((ns, name)): Path<(String, String)>) -> ApiResult {
    let id = service_id(&ns, &name)?;
    let stored = find_service(&plane, &id).await?;
    Ok(axum::Json(Views::of(&plane, &stored.spec.id()).view(&plane, &stored)).into_response())
}

/// `If-Match: <revision>` replaces only that revision; `If-None-Match: *` only creates.
fn expected_revision(headers: &HeaderMap) -> ApiResult<Option<u64>> {
    if headers.get("if-none-match").is_some_and(|v| v.as_bytes() == b"*") {
        return Ok(Some(0));
    }
    match headers.get("if-match") {
        None => Ok(None),
        Some(value) => {
            let text = value.to_str().unwrap_or("").trim().trim_matches('"');
            text.parse::<u64>().map(Some).map_err(|_| ApiError::bad_request(format!("If-Match must be a revision number, got {text:?}")))
        }
    }
}

#[derive(serde::Deserialize, Default)]
struct PutQuery {
    /// Skip the checks of references (secrets) at write time: the rollout
    /// waits for them instead.
    #[serde(default)]
    force: bool,
    /// Why, recorded in the revision (`deploy`, `apply`).
    #[serde(default)]
    cause: Option<String>,
}

async fn put_service(
    State(plane): State<ControlPlane>,
    Path((ns, name)): Path<(String, String)>,
    axum::extract::Query(query): axum::extract::Query<PutQuery>,
    principal: Option<Extension<Principal>>,
    visible: Option<Extension<crate::auth::Visible>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let id = service_id(&ns, &name)?;
    let expected = expected_revision(&headers)?;
    let spec: ServiceSpec = named_body(&body, &id, "a service spec")?;
    // A namespace token deploys only components its namespace uploaded
    // (checked when the component changes: a service keeps what it runs).
    let visible = visible.map_or(crate::auth::Visible(None), |Extension(v)| v);
    if plane.informer.service(&id).is_none_or(|stored| stored.spec.component != spec.component) {
        crate::artifacts_api::check_deployable(&plane, &visible, &spec.namespace, &spec.component).await?;
    }
    let change = Change {
        by: principal.map(|Extension(p)| p.0).unwrap_or_else(|| "anonymous".to_string()),
        cause: query.cause.unwrap_or_else(|| "apply".to_string()),
    };
    let (stored, written) = write_spec(&plane, spec, expected, &change, query.force).await?;
    let status = match written {
        Written::Created => StatusCode::CREATED,
        Written::Updated | Written::Unchanged => StatusCode::OK,
    };
    let mut view = Views::of(&plane, &stored.spec.id()).view(&plane, &stored);
    view["result"] = Value::String(format!("{written:?}").to_lowercase());
    Ok((status, axum::Json(view)).into_response())
}

/// Reads a spec from a request body (strictly: unknown fields refused,
/// named with their path) for the service or job `id` the path names; the
/// body may repeat the namespace and name, but not contradict them.
pub(crate) fn named_body<T: serde::de::DeserializeOwned>(body: &Bytes, id: &ServiceId, what: &str) -> ApiResult<T> {
    check_size(body)?;
    let mut value: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let Some(object) = value.as_object_mut() else {
        return Err(ApiError::bad_request(format!("the body must be a JSON object: {what}")));
    };
    for (field, from_path) in [("namespace", &id.namespace), ("name", &id.name)] {
        match object.get(field) {
            None => {
                object.insert(field.to_string(), Value::String(from_path.clone()));
            }
            Some(Value::String(given)) if given == from_path => {}
            Some(given) => {
                return Err(ApiError::bad_request(format!("{field}: the body says {given} but the path says {from_path:?}")));
            }
        }
    }
    wharf_proto::strict::from_value(value).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_spec", e.to_string()))
}

/// Checks a spec and writes it: valid, its component uploaded, within its
/// namespace's quota, every reference it makes resolvable (unless
/// `force`), room for a replica on some host. Shared by every path that
/// changes a spec (put, scale, undo, canary).
pub(crate) async fn write_spec(
    plane: &ControlPlane,
    spec: ServiceSpec,
    expected: Option<u64>,
    change: &Change,
    force: bool,
) -> ApiResult<(StoredService, Written)> {
    spec.validate().map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_spec", e.to_string()))?;
    check_uploaded(plane, &spec.component, &spec.namespace).await?;
    if plane.jobs.read(|state| state.jobs.contains_key(&spec.id())) {
        return Err(ApiError::new(StatusCode::CONFLICT, "name_taken", format!("{} is a job; services and jobs share the names of a namespace", spec.id())));
    }
    check_egress(plane, &spec)?;
    crate::claims::check_routes(plane, &spec).await?;
    crate::triggers::check_exports(plane, &spec).await?;
    crate::triggers::ensure_streams(plane, &spec).await?;
    check_quota(plane, &spec).await?;
    check_references(plane, &spec, force).await?;
    check_fits(plane, &spec)?;
    if !spec.keyvalue.is_empty() {
        // Hosts may only open data buckets, not create them.
        data_bucket(plane, &spec.namespace).await?;
    }
    let id = spec.id();
    let stored = plane.informer.service(&id);
    if let Some(stored) = &stored {
        check_traffic(stored, &spec)?;
    } else if spec.traffic.iter().any(|t| t.revision.is_some()) {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_spec", format!("traffic: {id} has no revisions yet; a new service can only name `latest: true`")));
    }
    let keep = plane.informer.status(&id).map(|s| s.rollout.stable).filter(|n| *n != 0);
    // Claimed last, once every other check passed; dropped again if the write fails.
    let claimed = crate::claims::claim_routes(plane, &spec, &change.by).await?;
    match plane.store.put_service(spec, expected, change, keep).await {
        Ok(written) => Ok(written),
        Err(e) => {
            crate::claims::undo_claims(plane, &claimed).await;
            Err(e.into())
        }
    }
}

/// Refuses a component that is not in the artifact store.
pub(crate) async fn check_uploaded(plane: &ControlPlane, component: &wharf_proto::Digest, namespace: &str) -> ApiResult<()> {
    if plane.store.has_artifact(component).await? {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_component",
        format!("component: {component} is not uploaded; POST its bytes to /v1/namespaces/{namespace}/artifacts first"),
    ))
}

/// Refuses what the API can know is wrong before any host tries: a
/// granted secret that does not exist (unless `force`).
async fn check_references(plane: &ControlPlane, spec: &ServiceSpec, force: bool) -> ApiResult<()> {
    if force {
        return Ok(());
    }
    for secret in &spec.secrets {
        let key = wharf_proto::names::secret_key(&spec.namespace, secret);
        if plane.store.secrets_kv().get(&key).await.map_err(kv_failed)?.is_none() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "missing_secret",
                format!(
                    "secrets: secret {secret} does not exist in namespace {}; create it first (`wharf secret set {secret} ...`), or deploy with --force to let the rollout wait for it",
                    spec.namespace
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses a replica no known host could ever hold (its memory request
/// above every host's memory times its overcommit ratio, or its instance
/// slots above every host's).
fn check_fits(plane: &ControlPlane, spec: &ServiceSpec) -> ApiResult<()> {
    let hosts = plane.hosts.hosts();
    if hosts.is_empty() {
        return Ok(());
    }
    let memory = spec.memory_request();
    let biggest = hosts
        .iter()
        .map(|h| h.heartbeat.capacity.memory.scaled(h.heartbeat.memory_overcommit.unwrap_or_default()))
        .max()
        .unwrap_or_default();
    if memory > biggest {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "does_not_fit",
            format!(
                "limits: a replica requests {} of memory, more than the largest host offers ({}); lower limits.memory_request",
                memory.human(),
                biggest.human()
            ),
        ));
    }
    let slots = hosts.iter().map(|h| h.heartbeat.capacity.instances).max().unwrap_or(0);
    if spec.limits.concurrency > slots {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "does_not_fit",
            format!("limits.concurrency: {} instances at once is more than the largest host runs ({slots})", spec.limits.concurrency),
        ));
    }
    Ok(())
}

/// A traffic split may name only revisions the service keeps.
fn check_traffic(stored: &StoredService, spec: &ServiceSpec) -> ApiResult<()> {
    let kept = crate::store::kept(stored);
    for (i, target) in spec.traffic.iter().enumerate() {
        if let Some(n) = target.revision
            && !kept.contains(&n)
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_spec",
                format!("traffic[{i}]: {} has no revision {n} (kept: {kept:?})", stored.spec.id()),
            ));
        }
    }
    Ok(())
}

async fn delete_service(State(plane): State<ControlPlane>, Path((ns, name)): Path<(String, String)>, headers: HeaderMap) -> ApiResult {
    let id = service_id(&ns, &name)?;
    let expected = expected_revision(&headers)?;
    let deleted = plane.store.delete_service(&id, expected).await?;
    Ok(axum::Json(json!({"deleted": id.to_string(), "version": deleted.version})).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Scale {
    replicas: u32,
}

async fn scale_service(
    State(plane): State<ControlPlane>,
    Path((ns, name)): Path<(String, String)>,
    principal: Option<Extension<Principal>>,
    body: Bytes,
) -> ApiResult {
    let id = service_id(&ns, &name)?;
    let scale: Scale = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", format!("expected {{\"replicas\": N}} with N >= 0: {e}")))?;
    let change = Change { by: principal.map(|Extension(p)| p.0).unwrap_or_default(), cause: "scale".to_string() };
    let stored = edit_spec(&plane, &id, &change, |spec| {
        spec.replicas = scale.replicas;
        Ok(())
    })
    .await?;
    Ok(axum::Json(Views::of(&plane, &stored.spec.id()).view(&plane, &stored)).into_response())
}

/// Changes a stored spec by compare-and-set, retried: a concurrent edit of
/// another field is kept.
pub(crate) async fn edit_spec(
    plane: &ControlPlane,
    id: &ServiceId,
    change: &Change,
    mut edit: impl FnMut(&mut ServiceSpec) -> ApiResult<()>,
) -> ApiResult<StoredService> {
    for _ in 0..5 {
        let Some(stored) = plane.store.service(id).await? else {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("service {id} not found")));
        };
        let mut spec = stored.spec.clone();
        edit(&mut spec)?;
        match write_spec(plane, spec, Some(stored.version), change, true).await {
            Ok((stored, _)) => return Ok(stored),
            Err(e) if e.code == "conflict" => continue,
            Err(e) => return Err(e),
        }
    }
    Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("{id} kept changing; try again")))
}

/// Every host; a namespace token sees only its namespaces' replicas, rates
/// and latencies on them, and not which components hosts hold compiled.
async fn list_hosts(State(plane): State<ControlPlane>, visible: Option<Extension<crate::auth::Visible>>) -> ApiResult {
    let visible = visible.map_or(crate::auth::Visible(None), |Extension(v)| v);
    let hosts: Vec<Value> = plane
        .hosts
        .hosts()
        .into_iter()
        .map(|h| {
            let mut hb = h.heartbeat;
            if visible.0.is_some() {
                hb.replicas.retain(|r| visible.allows(&r.service.namespace));
                hb.cached.clear();
            }
            let shown = |id: &ServiceId| visible.allows(&id.namespace);
            json!({
                "id": hb.host,
                "ready": h.ready,
                "addr": hb.addr,
                "labels": hb.labels,
                "capacity": hb.capacity,
                "memory_reserved": hb.memory_reserved,
                "memory_overcommit": hb.memory_overcommit.unwrap_or_default(),
                "memory_in_use": hb.memory_in_use,
                "draining": hb.draining,
                "sent_at_ms": hb.sent_at_ms,
                "started_at_ms": hb.started_at_ms,
                "rps": h.rps.iter().filter(|(k, _)| shown(k)).map(|(k, v)| (k.to_string(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
                "latency_ms": h.latency_ms.iter().filter(|(k, _)| shown(k)).map(|(k, v)| (k.to_string(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
                "last_seen_ms": u64::try_from(h.seen.elapsed().as_millis()).unwrap_or(u64::MAX),
                "replicas": hb.replicas,
                "cached": hb.cached,
            })
        })
        .collect();
    Ok(axum::Json(json!({"hosts": hosts})).into_response())
}

/// Refuses `allow_outbound` entries that name a non-public address (a
/// literal such as 169.254.169.254, or `localhost`) the admin has not opened.
fn check_egress(plane: &ControlPlane, spec: &ServiceSpec) -> ApiResult<()> {
    for (i, entry) in spec.allow_outbound.iter().enumerate() {
        plane.config.private_egress.check_entry(entry).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_spec", format!("allow_outbound[{i}]: {e}")))?;
    }
    Ok(())
}

/// Namespace `ns`'s data bucket, created (or brought) to its size limit:
/// the namespace's quota `kv_bytes`, or the bus's limit for data buckets.
/// Each tenant's data lives in a bucket of its own, apart from the control
/// plane's state, so no tenant can fill the storage another needs.
pub(crate) async fn data_bucket(plane: &ControlPlane, ns: &str) -> ApiResult<wharf_bus::Kv> {
    let options = match namespace(plane, ns).await?.quota.kv_bytes {
        Some(max) => wharf_bus::BucketOptions::max_bytes(max.bytes()),
        None => plane.bus.storage_limits().data,
    };
    plane.bus.kv_with(&wharf_proto::names::kv_bucket(ns), options).await.map_err(kv_failed)
}

/// The namespace's KV bucket and the bucket's token, after checking the
/// names (any identifier a component may open) and, if given, the key.
async fn kv_target(plane: &ControlPlane, ns: &str, bucket: &str, key: Option<&str>) -> ApiResult<(wharf_bus::Kv, String)> {
    check_namespace(ns)?;
    if bucket.is_empty() || bucket.len() > wharf_proto::names::MAX_KV_IDENTIFIER {
        return Err(ApiError::bad_request(format!("a bucket identifier is 1 to {} bytes long (got {})", wharf_proto::names::MAX_KV_IDENTIFIER, bucket.len())));
    }
    if let Some(key) = key {
        wharf_proto::names::check_kv_key(key).map_err(ApiError::bad_request)?;
    }
    let kv = data_bucket(plane, ns).await?;
    Ok((kv, wharf_proto::names::kv_bucket_token(bucket)))
}

/// Keys in one page of `GET /v1/namespaces/{ns}/kv/{bucket}`.
const KV_PAGE_KEYS: usize = 1000;

/// Where a key listing continues: `?after=<cursor>` from the previous page's `next`.
#[derive(serde::Deserialize)]
struct KvPage {
    #[serde(default)]
    after: u64,
}

/// Refuses a namespace name that is not a label.
pub(crate) fn check_namespace(ns: &str) -> ApiResult<()> {
    wharf_proto::names::check_label(ns).map_err(|e| ApiError::bad_request(format!("namespace {ns:?}: {e}")))
}

fn kv_failed(e: wharf_bus::KvError) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", format!("the key-value store failed: {e}"))
}

/// One page of keys, oldest change first, and `next`: the cursor of the
/// following page (`null` at the end).
async fn kv_list(State(plane): State<ControlPlane>, Path((ns, bucket)): Path<(String, String)>, axum::extract::Query(page): axum::extract::Query<KvPage>) -> ApiResult {
    let (kv, token) = kv_target(&plane, &ns, &bucket, None).await?;
    let found = kv.keys_page(&format!("{token}."), page.after, KV_PAGE_KEYS).await.map_err(kv_failed)?;
    let keys: Vec<String> = found.keys.iter().filter_map(|k| wharf_proto::names::kv_key_decode(&token, k)).collect();
    Ok(axum::Json(json!({"namespace": ns, "bucket": bucket, "keys": keys, "next": found.next})).into_response())
}

async fn kv_get(State(plane): State<ControlPlane>, Path((ns, bucket, key)): Path<(String, String, String)>) -> ApiResult {
    let (kv, token) = kv_target(&plane, &ns, &bucket, Some(&key)).await?;
    match kv.get(&wharf_proto::names::kv_key(&token, &key)).await.map_err(kv_failed)? {
        Some(entry) => Ok(([(axum::http::header::CONTENT_TYPE, "application/octet-stream")], entry.value).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no key {key:?} in bucket {bucket} of namespace {ns}"))),
    }
}

async fn kv_put(State(plane): State<ControlPlane>, Path((ns, bucket, key)): Path<(String, String, String)>, body: Bytes) -> ApiResult {
    check_size(&body)?;
    let (kv, token) = kv_target(&plane, &ns, &bucket, Some(&key)).await?;
    let revision = kv.put(&wharf_proto::names::kv_key(&token, &key), body).await.map_err(|e| match e {
        wharf_bus::KvError::ValueTooLarge { .. } => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", e.to_string()),
        wharf_bus::KvError::BucketFull { .. } => ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "quota_exceeded", format!("namespace {ns}: quota kv_bytes reached: {e}")),
        e => kv_failed(e),
    })?;
    Ok(axum::Json(json!({"namespace": ns, "bucket": bucket, "key": key, "revision": revision})).into_response())
}

async fn kv_delete(State(plane): State<ControlPlane>, Path((ns, bucket, key)): Path<(String, String, String)>) -> ApiResult {
    let (kv, token) = kv_target(&plane, &ns, &bucket, Some(&key)).await?;
    kv.delete(&wharf_proto::names::kv_key(&token, &key)).await.map_err(kv_failed)?;
    Ok(axum::Json(json!({"deleted": key})).into_response())
}

/// The secrets bucket, after checking the names. Values go in and never come out.
fn secrets<'a>(plane: &'a ControlPlane, ns: &str, name: Option<&str>) -> ApiResult<&'a wharf_bus::Kv> {
    check_namespace(ns)?;
    if let Some(name) = name {
        wharf_proto::names::check_label(name).map_err(|e| ApiError::bad_request(format!("secret name {name:?}: {e}")))?;
    }
    Ok(plane.store.secrets_kv())
}

async fn secret_list(State(plane): State<ControlPlane>, Path(ns): Path<String>) -> ApiResult {
    let kv = secrets(&plane, &ns, None)?;
    let prefix = format!("{ns}.");
    let mut names: Vec<String> = kv.keys().await.map_err(kv_failed)?.into_iter().filter_map(|k| k.strip_prefix(&prefix).map(str::to_string)).collect();
    names.sort();
    Ok(axum::Json(json!({"namespace": ns, "secrets": names})).into_response())
}

async fn secret_put(State(plane): State<ControlPlane>, Path((ns, name)): Path<(String, String)>, body: Bytes) -> ApiResult {
    check_size(&body)?;
    let kv = secrets(&plane, &ns, Some(&name))?;
    let key = wharf_proto::names::secret_key(&ns, &name);
    let stored = match &plane.config.secret_key {
        Some(secret_key) => Bytes::from(secret_key.seal(&key, &body, rand::random())),
        None => body,
    };
    kv.put(&key, stored).await.map_err(kv_failed)?;
    Ok(axum::Json(json!({"namespace": ns, "secret": name, "stored": true})).into_response())
}

async fn secret_delete(State(plane): State<ControlPlane>, Path((ns, name)): Path<(String, String)>) -> ApiResult {
    let kv = secrets(&plane, &ns, Some(&name))?;
    kv.delete(&wharf_proto::names::secret_key(&ns, &name)).await.map_err(kv_failed)?;
    Ok(axum::Json(json!({"deleted": name})).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    /// Namespaces the token may act in; empty with `admin: true` for an admin token.
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    write: bool,
    #[serde(default)]
    admin: bool,
    /// How long it works, as `24h`, `30m`, `7d`; absent: until revoked.
    #[serde(default)]
    ttl: Option<String>,
}

async fn create_token(State(plane): State<ControlPlane>, body: Bytes) -> ApiResult {
    let Some(tokens) = &plane.tokens else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "authentication is off on this control plane"));
    };
    let new: NewToken = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("expected {{\"namespaces\": [..], \"write\": bool, \"ttl\": \"24h\"}} or {{\"admin\": true}}: {e}")))?;
    let ttl = match &new.ttl {
        None => None,
        Some(text) => {
            let ttl = humantime::parse_duration(text).map_err(|e| ApiError::bad_request(format!("ttl: {text:?} is not a duration such as 24h or 30m: {e}")))?;
            if ttl.is_zero() {
                return Err(ApiError::bad_request("ttl: a token must live longer than 0s (omit ttl for a token that never expires)"));
            }
            Some(ttl)
        }
    };
    let role = if new.admin {
        crate::auth::Role::Admin
    } else {
        if new.namespaces.is_empty() {
            return Err(ApiError::bad_request("namespaces: a token needs at least one namespace (or admin: true)"));
        }
        for ns in &new.namespaces {
            wharf_proto::names::check_label(ns).map_err(|e| ApiError::bad_request(format!("namespaces: {ns:?}: {e}")))?;
        }
        crate::auth::Role::Namespaces { namespaces: new.namespaces, write: new.write }
    };
    let (token, record) = tokens.create(role.clone(), ttl).await.map_err(kv_failed)?;
    Ok((StatusCode::CREATED, axum::Json(json!({"token": token, "role": role, "expires_at_ms": record.expires_at_ms}))).into_response())
}

/// The namespaces bucket.
fn namespaces(plane: &ControlPlane) -> &wharf_bus::Kv {
    plane.store.namespaces_kv()
}

/// A namespace's record (default: no quota).
pub(crate) async fn namespace(plane: &ControlPlane, ns: &str) -> ApiResult<wharf_proto::Namespace> {
    match namespaces(plane).get(ns).await.map_err(kv_failed)? {
        Some(entry) => serde_json::from_slice(&entry.value).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "corrupt", format!("namespace {ns} is unreadable: {e}"))),
        None => Ok(wharf_proto::Namespace::default()),
    }
}

/// Replicas and reserved memory a service counts against its namespace's quota.
fn usage_of(spec: &ServiceSpec) -> (u64, u64) {
    let replicas = u64::from(spec.autoscale.as_ref().map_or(spec.replicas, |a| a.max));
    (replicas, replicas.saturating_mul(spec.memory_request().bytes()))
}

/// What the namespace's services use now, leaving out `except`.
fn usage(plane: &ControlPlane, ns: &str, except: Option<&ServiceId>) -> (u64, u64) {
    plane.informer.read(|state| {
        state
            .services
            .values()
            .filter(|s| s.spec.namespace == ns && Some(&s.spec.id()) != except)
            .map(|s| usage_of(&s.spec))
            .fold((0, 0), |(r, m), (r2, m2)| (r + r2, m + m2))
    })
}

/// Refuses `spec` if it would take its namespace past a quota, naming the
/// quota, its limit and what is in use.
async fn check_quota(plane: &ControlPlane, spec: &ServiceSpec) -> ApiResult<()> {
    let (replicas, memory) = usage_of(spec);
    check_room(plane, &spec.namespace, &spec.id(), replicas, memory, "memory request x replicas").await
}

/// Refuses `replicas` more replicas reserving `memory` bytes for `id` (a
/// service, or a job's run) if they would take namespace `ns` past a quota;
/// `how` says how the memory was counted.
pub(crate) async fn check_room(plane: &ControlPlane, ns: &str, id: &ServiceId, replicas: u64, memory: u64, how: &str) -> ApiResult<()> {
    let quota = namespace(plane, ns).await?.quota;
    if quota.replicas.is_none() && quota.memory.is_none() {
        return Ok(());
    }
    let (used_replicas, used_memory) = usage(plane, ns, Some(id));
    if let Some(limit) = quota.replicas
        && used_replicas + replicas > u64::from(limit)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "quota_exceeded",
            format!("namespace {ns}: quota replicas={limit} exceeded: other services use {used_replicas}, {id} asks for {replicas}"),
        ));
    }
    if let Some(limit) = quota.memory
        && used_memory + memory > limit.bytes()
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "quota_exceeded",
            format!(
                "namespace {ns}: quota memory={limit} exceeded: other services reserve {}, {id} asks for {} ({how})",
                wharf_proto::ByteSize(used_memory),
                wharf_proto::ByteSize(memory)
            ),
        ));
    }
    Ok(())
}

async fn list_namespaces(State(plane): State<ControlPlane>) -> ApiResult {
    let kv = namespaces(&plane);
    let mut names: Vec<String> = kv.keys().await.map_err(kv_failed)?;
    names.extend(plane.informer.read(|state| state.services.values().map(|s| s.spec.namespace.clone()).collect::<Vec<_>>()));
    names.sort();
    names.dedup();
    Ok(axum::Json(json!({"namespaces": names})).into_response())
}

async fn get_namespace(State(plane): State<ControlPlane>, Path(ns): Path<String>) -> ApiResult {
    check_namespace(&ns)?;
    let record = namespace(&plane, &ns).await?;
    let (replicas, memory) = usage(&plane, &ns, None);
    Ok(axum::Json(json!({
        "namespace": ns,
        "quota": record.quota,
        "allow_from": record.allow_from,
        "usage": {"replicas": replicas, "memory": wharf_proto::ByteSize(memory)},
    }))
    .into_response())
}

async fn put_namespace(State(plane): State<ControlPlane>, Path(ns): Path<String>, body: Bytes) -> ApiResult {
    check_namespace(&ns)?;
    check_size(&body)?;
    let record: wharf_proto::Namespace = wharf_proto::strict::from_json(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "expected {{\"quota\": {{\"replicas\": N, \"memory\": \"4GiB\", \"rps\": N, \"kv_bytes\": \"1GiB\"}}, \"allow_from\": [\"ns\", ...]}}: {e}"
        ))
    })?;
    record.validate().map_err(ApiError::bad_request)?;
    let kv = namespaces(&plane);
    kv.put(&ns, Bytes::from(serde_json::to_vec(&record).unwrap_or_default())).await.map_err(kv_failed)?;
    // The data bucket's size limit follows the quota at once (if the
    // namespace has data; a bucket is otherwise made at its first deploy).
    if plane.informer.read(|state| state.services.values().any(|s| s.spec.namespace == ns && !s.spec.keyvalue.is_empty())) {
        data_bucket(&plane, &ns).await?;
    }
    Ok(axum::Json(json!({"namespace": ns, "quota": record.quota, "allow_from": record.allow_from})).into_response())
}
