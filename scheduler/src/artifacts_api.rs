//! Components belong to the namespaces that uploaded them:
//! `POST/GET /v1/namespaces/{ns}/artifacts`, `DELETE .../artifacts/{digest}`,
//! and for admins `GET /v1/artifacts` (every namespace's) and
//! `POST /v1/artifacts?namespace=NS`.
//!
//! The bytes are stored once by digest (bucket `wharf-artifacts`); each
//! namespace that uploaded them has a record (`wharf-artifact-owners`), which
//! is what it may list, deploy by digest, count against its quota
//! (`artifacts`, `artifact_bytes`) and delete. A component refused by its
//! checks or by the quota is stored nowhere.

use crate::ControlPlane;
use crate::api::{ApiError, check_namespace, namespace};
use crate::auth::{Principal, Visible};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Extension, Router};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use wharf_proto::Digest;
use wharf_proto::wire::ArtifactRecord;

type ApiResult<T = Response> = Result<T, ApiError>;

/// The routes of this module, merged into the API's router.
pub fn routes() -> Router<ControlPlane> {
    Router::new()
        .route("/v1/artifacts", post(upload_as_admin).get(list_all))
        .route("/v1/namespaces/{ns}/artifacts", post(upload).get(list))
        .route("/v1/namespaces/{ns}/artifacts/{digest}", delete(remove))
}

fn who(principal: Option<Extension<Principal>>) -> String {
    principal.map(|Extension(p)| p.0).unwrap_or_else(|| "anonymous".to_string())
}

#[derive(serde::Deserialize)]
struct UploadQuery {
    /// The namespace the component is uploaded for (default: `default`).
    #[serde(default)]
    namespace: Option<String>,
}

/// `POST /v1/artifacts` (admin tokens only; the middleware sees to it).
async fn upload_as_admin(State(plane): State<ControlPlane>, Query(query): Query<UploadQuery>, principal: Option<Extension<Principal>>, body: Bytes) -> ApiResult {
    let ns = query.namespace.unwrap_or_else(|| wharf_proto::names::DEFAULT_NAMESPACE.to_string());
    store_upload(&plane, &ns, &who(principal), body).await
}

async fn upload(State(plane): State<ControlPlane>, Path(ns): Path<String>, principal: Option<Extension<Principal>>, body: Bytes) -> ApiResult {
    store_upload(&plane, &ns, &who(principal), body).await
}

/// Checks a component, then the namespace's quota, and only then stores it
/// and records it as the namespace's.
async fn store_upload(plane: &ControlPlane, ns: &str, by: &str, body: Bytes) -> ApiResult {
    check_namespace(ns)?;
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty; send the component's bytes (Content-Type: application/wasm)"));
    }
    let digest = Digest::of(&body);
    let check = plane.check.clone();
    let bytes = body.clone();
    tokio::task::spawn_blocking(move || check.check(&bytes))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("the component check failed: {e}")))?
        .map_err(|message| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_component", message))?;
    let size = body.len() as u64;
    if !plane.store.owns_artifact(ns, &digest).await? {
        check_artifact_quota(plane, ns, size).await?;
    }
    plane.store.put_artifact(&digest, body).await?;
    let record = ArtifactRecord { size, uploaded_at_ms: crate::store::now_ms(), by: by.to_string() };
    let created = plane.store.own_artifact(ns, &digest, &record).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, axum::Json(json!({"digest": digest, "size": size, "namespace": ns}))).into_response())
}

/// Refuses a new component past the namespace's `artifacts` or
/// `artifact_bytes` quota, naming the quota, its limit and the use.
async fn check_artifact_quota(plane: &ControlPlane, ns: &str, size: u64) -> ApiResult<()> {
    let quota = namespace(plane, ns).await?.quota;
    if quota.artifacts.is_none() && quota.artifact_bytes.is_none() {
        return Ok(());
    }
    let (count, bytes) = usage(&plane.store.artifact_records().await?, ns);
    if let Some(limit) = quota.artifacts
        && count + 1 > u64::from(limit)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "quota_exceeded",
            format!("namespace {ns}: quota artifacts={limit} reached: it keeps {count} components; delete one first (`wharf artifact rm DIGEST -n {ns}`)"),
        ));
    }
    if let Some(limit) = quota.artifact_bytes
        && bytes.saturating_add(size) > limit.bytes()
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "quota_exceeded",
            format!(
                "namespace {ns}: quota artifact_bytes={limit} exceeded: its components take {}, this one {}",
                wharf_proto::ByteSize(bytes),
                wharf_proto::ByteSize(size)
            ),
        ));
    }
    Ok(())
}

/// Components and bytes namespace `ns` keeps.
fn usage(records: &[(String, Digest, ArtifactRecord)], ns: &str) -> (u64, u64) {
    records.iter().filter(|(owner, _, _)| owner == ns).fold((0, 0), |(count, bytes), (_, _, r)| (count + 1, bytes + r.size))
}

/// The services of the namespaces `shown` allows that run `digest` or keep
/// it in a revision they may go back to, as `ns/name`.
async fn users(plane: &ControlPlane, digest: &Digest, shown: impl Fn(&str) -> bool) -> ApiResult<Vec<String>> {
    let services = plane.informer.read(|state| state.services.values().filter(|s| shown(&s.spec.namespace)).cloned().collect::<Vec<_>>());
    let mut users = BTreeSet::new();
    for stored in services {
        let mut uses = stored.spec.component == *digest;
        if !uses {
            uses = plane.store.revisions(&stored).await?.iter().any(|r| r.spec.component == *digest);
        }
        if uses {
            users.insert(stored.spec.id().to_string());
        }
    }
    Ok(users.into_iter().collect())
}

async fn list(State(plane): State<ControlPlane>, Path(ns): Path<String>) -> ApiResult {
    check_namespace(&ns)?;
    let records = plane.store.artifact_records().await?;
    let in_use = in_use(&plane, |n| n == ns);
    let artifacts: Vec<Value> = records
        .iter()
        .filter(|(owner, _, _)| *owner == ns)
        .map(|(_, digest, r)| json!({"digest": digest, "size": r.size, "uploaded_at_ms": r.uploaded_at_ms, "by": r.by, "used_by": in_use.get(digest).cloned().unwrap_or_default()}))
        .collect();
    let (count, bytes) = usage(&records, &ns);
    let quota = namespace(&plane, &ns).await?.quota;
    Ok(axum::Json(json!({
        "namespace": ns,
        "artifacts": artifacts,
        "usage": {"artifacts": count, "artifact_bytes": wharf_proto::ByteSize(bytes)},
        "quota": {"artifacts": quota.artifacts, "artifact_bytes": quota.artifact_bytes},
    }))
    .into_response())
}

/// The services (current specs) of the namespaces `shown` allows, by the component they run.
fn in_use(plane: &ControlPlane, shown: impl Fn(&str) -> bool) -> BTreeMap<Digest, Vec<String>> {
    plane.informer.read(|state| {
        let mut map: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
        for stored in state.services.values().filter(|s| shown(&s.spec.namespace)) {
            map.entry(stored.spec.component.clone()).or_default().push(stored.spec.id().to_string());
        }
        map
    })
}

/// Every component with the namespaces that uploaded it (admins only;
/// stored bytes no namespace has a record of, uploaded before components
/// had owners, show with no owners).
async fn list_all(State(plane): State<ControlPlane>, visible: Option<Extension<Visible>>) -> ApiResult {
    if visible.is_some_and(|Extension(v)| v.0.is_some()) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "only admin tokens list every namespace's components; use /v1/namespaces/<ns>/artifacts"));
    }
    let mut owners: BTreeMap<Digest, (Vec<String>, u64)> = BTreeMap::new();
    for (ns, digest, record) in plane.store.artifact_records().await? {
        let entry = owners.entry(digest).or_insert_with(|| (Vec::new(), record.size));
        entry.0.push(ns);
    }
    for hex in plane.store.artifacts().await? {
        if let Ok(digest) = format!("sha256:{hex}").parse::<Digest>() {
            owners.entry(digest).or_insert_with(|| (Vec::new(), 0));
        }
    }
    let in_use = in_use(&plane, |_| true);
    let artifacts: Vec<Value> = owners
        .into_iter()
        .map(|(digest, (owners, size))| json!({"digest": digest, "size": size, "owners": owners, "used_by": in_use.get(&digest).cloned().unwrap_or_default()}))
        .collect();
    Ok(axum::Json(json!({"artifacts": artifacts})).into_response())
}

/// Deletes namespace `ns`'s component: refused (409, naming them) while a
/// service of the namespace runs it or keeps it in a revision. The bytes go
/// too once no namespace has a record of them and no service uses them.
async fn remove(State(plane): State<ControlPlane>, Path((ns, digest)): Path<(String, String)>) -> ApiResult {
    check_namespace(&ns)?;
    let digest: Digest = digest.parse().map_err(|e| ApiError::bad_request(format!("{digest:?} is not a component digest: {e}")))?;
    if !plane.store.owns_artifact(&ns, &digest).await? {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("namespace {ns} has no component {digest} (`wharf artifact list -n {ns}`)")));
    }
    let used = users(&plane, &digest, |n| n == ns).await?;
    if !used.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "in_use",
            format!("component {digest} is used by {} (running or kept as a revision); delete or update those services first", used.join(", ")),
        ));
    }
    plane.store.disown_artifact(&ns, &digest).await?;
    let owned_elsewhere = plane.store.artifact_records().await?.iter().any(|(_, d, _)| *d == digest);
    let bytes_removed = !owned_elsewhere && users(&plane, &digest, |_| true).await?.is_empty();
    if bytes_removed {
        plane.store.delete_artifact(&digest).await?;
    }
    Ok(axum::Json(json!({"deleted": digest, "namespace": ns, "bytes_removed": bytes_removed})).into_response())
}

/// Whether a namespace token may deploy `digest` into `ns`: admins may
/// deploy any stored component; a namespace token only one its namespace
/// uploaded (else 422, the same answer as for a component never uploaded,
/// so a digest tells nothing about another namespace).
pub(crate) async fn check_deployable(plane: &ControlPlane, visible: &Visible, ns: &str, digest: &Digest) -> ApiResult<()> {
    if visible.0.is_none() || plane.store.owns_artifact(ns, digest).await? {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_component",
        format!("component: {digest} is not uploaded in namespace {ns}; upload it there first (`wharf deploy FILE -n {ns}`, or POST its bytes to /v1/namespaces/{ns}/artifacts)"),
    ))
}
