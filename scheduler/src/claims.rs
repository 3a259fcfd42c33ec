//! Routes have owners: a host name, or a path prefix of the routes that
//! name no host, belongs to one namespace. `POST/GET/DELETE
//! /v1/namespaces/{ns}/claims` (claim first come, list, release),
//! `POST ... {"grant": true}` for admins, `GET /v1/claims` for admins.
//!
//! Who owns a target: its explicit claim (bucket `wharf-route-claims`) if
//! there is one, else the namespaces whose services already route there (so
//! routes deployed before claims existed keep their owners). A path prefix
//! is owned by the owner of the longest claimed or routed prefix covering
//! it, as the route table sends a request to the longest prefix. A route on
//! a target another namespace owns is refused with 409 naming the owner; a
//! route on a target nobody owns is claimed for its namespace when it is
//! deployed (first come), never taken from another.

use crate::ControlPlane;
use crate::api::{ApiError, check_namespace};
use crate::auth::{Principal, Visible};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use serde_json::json;
use wharf_bus::KvError;
use wharf_proto::ServiceSpec;
use wharf_proto::names::route_claim_key;
use wharf_proto::wire::{ClaimTarget, RouteClaim, prefix_covers};

type ApiResult<T = Response> = Result<T, ApiError>;

/// The routes of this module, merged into the API's router.
pub fn routes() -> Router<ControlPlane> {
    Router::new().route("/v1/claims", get(list_all)).route("/v1/namespaces/{ns}/claims", get(list).post(claim).delete(release))
}

/// What is claimed and routed now: the view ownership is decided on.
struct Owners {
    claims: Vec<RouteClaim>,
    /// Every service's routes: (target, namespace, service).
    routed: Vec<(ClaimTarget, String, String)>,
}

impl Owners {
    /// Every claim (for listings).
    async fn read_all(plane: &ControlPlane) -> ApiResult<Owners> {
        let entries = plane.store.route_claims_kv().entries().await.map_err(store_failed)?;
        let claims = entries.iter().filter_map(|e| serde_json::from_slice::<RouteClaim>(&e.value).ok()).collect();
        Ok(Owners { claims, routed: routed(plane, |_| true) })
    }

    /// The claims that can decide `targets`: a host name's own, and for a
    /// path prefix those of the prefixes covering it (`/`, `/a`, `/a/b`):
    /// a few reads by key, however many claims there are.
    async fn read_for(plane: &ControlPlane, targets: &[ClaimTarget]) -> ApiResult<Owners> {
        let kv = plane.store.route_claims_kv();
        let mut keys: Vec<ClaimTarget> = targets.iter().flat_map(deciders).collect();
        keys.sort();
        keys.dedup();
        let mut claims = Vec::new();
        for key in &keys {
            if let Some(entry) = kv.get(&route_claim_key(key)).await.map_err(store_failed)?
                && let Ok(claim) = serde_json::from_slice::<RouteClaim>(&entry.value)
            {
                claims.push(claim);
            }
        }
        // Only routes on those same targets can decide too (the owner of a
        // path is that of the longest prefix covering it).
        Ok(Owners { claims, routed: routed(plane, |target| keys.binary_search(target).is_ok()) })
    }

    fn claim(&self, target: &ClaimTarget) -> Option<&RouteClaim> {
        self.claims.iter().find(|c| c.target == *target)
    }

    /// The namespace that owns `target`, if one does, and how.
    fn owner(&self, target: &ClaimTarget, asking: &str) -> Option<(String, String)> {
        let exact = match target {
            ClaimTarget::Host(_) => target.clone(),
            ClaimTarget::Path(path) => {
                // The longest claimed or routed prefix covering the path decides.
                let covering = |t: &ClaimTarget| matches!(t, ClaimTarget::Path(p) if prefix_covers(p, path));
                let longest = self.claims.iter().map(|c| &c.target).chain(self.routed.iter().map(|(t, _, _)| t)).filter(|t| covering(t)).max_by_key(|t| match t {
                    ClaimTarget::Path(p) => p.len(),
                    ClaimTarget::Host(_) => 0,
                });
                longest?.clone()
            }
        };
        if let Some(claim) = self.claim(&exact) {
            return Some((claim.namespace.clone(), format!("{} {}", claim.how, crate::store::format_ms(claim.at_ms))));
        }
        let routers: Vec<&(ClaimTarget, String, String)> = self.routed.iter().filter(|(t, _, _)| *t == exact).collect();
        if routers.iter().any(|(_, ns, _)| ns == asking) {
            return Some((asking.to_string(), "routed".to_string()));
        }
        routers.first().map(|(_, ns, service)| (ns.clone(), format!("routed by {service}")))
    }

    /// 409 naming the owner if `target` belongs to another namespace than `ns`.
    fn check(&self, target: &ClaimTarget, ns: &str) -> ApiResult<()> {
        match self.owner(target, ns) {
            Some((owner, how)) if owner != ns => Err(ApiError::new(
                StatusCode::CONFLICT,
                "route_owned",
                format!("{target} belongs to namespace {owner} ({how}); namespace {ns} may not route it (an admin can grant it: `wharf domain grant ... -n {ns}`)"),
            )),
            _ => Ok(()),
        }
    }
}

/// The longest host name or path prefix a route may have: its claim's key
/// (hex of it) stays within the bus's key limit.
const MAX_TARGET: usize = 1024;

/// Refuses a target too long to be claimed (400).
fn check_length(target: &ClaimTarget) -> ApiResult<()> {
    let (ClaimTarget::Host(name) | ClaimTarget::Path(name)) = target;
    if name.len() > MAX_TARGET {
        return Err(ApiError::bad_request(format!("routes: a host name or path prefix is at most {MAX_TARGET} bytes (got {})", name.len())));
    }
    Ok(())
}

/// The services' routes on the targets `among` keeps (all, for a listing):
/// (target, namespace, service), from memory. Only those kept are copied,
/// so checking a deploy's routes does not copy every service's.
fn routed(plane: &ControlPlane, among: impl Fn(&ClaimTarget) -> bool) -> Vec<(ClaimTarget, String, String)> {
    plane.informer.read(|state| {
        let mut routed = Vec::new();
        for stored in state.services.values() {
            for route in &stored.spec.routes {
                let target = ClaimTarget::of_route(route);
                if among(&target) {
                    routed.push((target, stored.spec.namespace.clone(), stored.spec.id().to_string()));
                }
            }
        }
        routed
    })
}

/// The targets whose claims can decide who owns `target`: itself, and for
/// a path prefix every prefix covering it at a segment boundary.
fn deciders(target: &ClaimTarget) -> Vec<ClaimTarget> {
    match target {
        ClaimTarget::Host(_) => vec![target.clone()],
        ClaimTarget::Path(path) => {
            let mut covering = vec![ClaimTarget::Path("/".to_string())];
            covering.extend(path.char_indices().skip(1).filter(|(_, c)| *c == '/').map(|(i, _)| ClaimTarget::Path(path[..i].to_string())));
            if path != "/" {
                covering.push(target.clone());
            }
            covering
        }
    }
}

fn store_failed(e: KvError) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", format!("the route claims store failed: {e}"))
}

/// Refuses a spec with a route on a target another namespace owns (409
/// naming the owner). Only when its routes change: a scale keeps them.
pub(crate) async fn check_routes(plane: &ControlPlane, spec: &ServiceSpec) -> ApiResult<()> {
    let unchanged = plane.informer.service(&spec.id()).is_some_and(|stored| stored.spec.routes == spec.routes);
    if spec.routes.is_empty() || unchanged {
        return Ok(());
    }
    let targets: Vec<ClaimTarget> = spec.routes.iter().map(ClaimTarget::of_route).collect();
    for target in &targets {
        check_length(target)?;
    }
    let owners = Owners::read_for(plane, &targets).await?;
    for target in &targets {
        owners.check(target, &spec.namespace)?;
    }
    Ok(())
}

/// Claims for the spec's namespace each target of its routes nobody has
/// claimed yet (first come); returns the claims it made, for
/// [`undo_claims`] if the write they were made for fails. A claim another
/// namespace made meanwhile refuses the spec (409).
pub(crate) async fn claim_routes(plane: &ControlPlane, spec: &ServiceSpec, by: &str) -> ApiResult<Vec<ClaimTarget>> {
    let unchanged = plane.informer.service(&spec.id()).is_some_and(|stored| stored.spec.routes == spec.routes);
    if spec.routes.is_empty() || unchanged {
        return Ok(Vec::new());
    }
    let kv = plane.store.route_claims_kv();
    let mut made = Vec::new();
    for route in &spec.routes {
        let target = ClaimTarget::of_route(route);
        if made.contains(&target) {
            continue;
        }
        let claim = RouteClaim { target: target.clone(), namespace: spec.namespace.clone(), how: "deployed".to_string(), by: by.to_string(), at_ms: crate::store::now_ms() };
        match kv.create(&route_claim_key(&target), encode(&claim)).await {
            Ok(_) => made.push(target),
            Err(KvError::AlreadyExists { .. }) => {
                let existing = kv.get(&route_claim_key(&target)).await.map_err(store_failed)?;
                let owner = existing.and_then(|e| serde_json::from_slice::<RouteClaim>(&e.value).ok()).map(|c| c.namespace);
                if let Some(owner) = owner.filter(|owner| *owner != spec.namespace) {
                    undo_claims(plane, &made).await;
                    return Err(ApiError::new(StatusCode::CONFLICT, "route_owned", format!("{target} belongs to namespace {owner}; namespace {} may not route it", spec.namespace)));
                }
            }
            Err(e) => {
                undo_claims(plane, &made).await;
                return Err(store_failed(e));
            }
        }
    }
    Ok(made)
}

/// Drops claims made for a write that then failed.
pub(crate) async fn undo_claims(plane: &ControlPlane, made: &[ClaimTarget]) {
    for target in made {
        if let Err(e) = plane.store.route_claims_kv().delete(&route_claim_key(target)).await {
            tracing::warn!("cannot drop the claim on {target} of a refused write: {e}");
        }
    }
}

fn encode(claim: &RouteClaim) -> Bytes {
    Bytes::from(serde_json::to_vec(claim).unwrap_or_default())
}

/// `{"host": "shop.example.com"}` or `{"path_prefix": "/login"}`; `grant`
/// (admins only) gives it to the namespace whoever claimed it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimRequest {
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    grant: bool,
}

/// The target of a request: exactly one of a host name and a path prefix, checked as a route's.
fn target(host: Option<String>, path_prefix: Option<String>) -> ApiResult<ClaimTarget> {
    let route = match (host, path_prefix) {
        (Some(host), None) => wharf_proto::Route { host: Some(host), path_prefix: "/".to_string() },
        (None, Some(path)) => wharf_proto::Route { host: None, path_prefix: path },
        _ => return Err(ApiError::bad_request("name exactly one of host (a host name) and path_prefix (a path-only route's prefix)")),
    };
    route.validate().map_err(|e| ApiError::bad_request(e.to_string()))?;
    let target = ClaimTarget::of_route(&route);
    check_length(&target)?;
    Ok(target)
}

async fn claim(State(plane): State<ControlPlane>, Path(ns): Path<String>, principal: Option<Extension<Principal>>, visible: Option<Extension<Visible>>, body: Bytes) -> ApiResult {
    check_namespace(&ns)?;
    let request: ClaimRequest = serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("expected {{\"host\": \"shop.example.com\"}} or {{\"path_prefix\": \"/shop\"}}: {e}")))?;
    let admin = visible.is_none_or(|Extension(v)| v.0.is_none());
    if request.grant && !admin {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "only admin tokens grant host names and path prefixes"));
    }
    let target = target(request.host, request.path_prefix)?;
    let by = principal.map(|Extension(p)| p.0).unwrap_or_else(|| "anonymous".to_string());
    let owners = Owners::read_for(&plane, std::slice::from_ref(&target)).await?;
    let kv = plane.store.route_claims_kv();
    let key = route_claim_key(&target);
    let record = RouteClaim { target: target.clone(), namespace: ns.clone(), how: if request.grant { "granted" } else { "claimed" }.to_string(), by, at_ms: crate::store::now_ms() };
    if request.grant {
        // A grant moves a target, but not from under another namespace's live routes.
        let routing: Vec<&str> = owners.routed.iter().filter(|(t, n, _)| *t == target && *n != ns).map(|(_, _, s)| s.as_str()).collect();
        if !routing.is_empty() {
            return Err(ApiError::new(StatusCode::CONFLICT, "route_owned", format!("{target} is routed by {}; change their routes before granting it to namespace {ns}", routing.join(", "))));
        }
        kv.put(&key, encode(&record)).await.map_err(store_failed)?;
        return Ok((StatusCode::OK, axum::Json(json!({"claim": record}))).into_response());
    }
    owners.check(&target, &ns)?;
    if let Some(existing) = owners.claim(&target) {
        return Ok((StatusCode::OK, axum::Json(json!({"claim": existing}))).into_response());
    }
    match kv.create(&key, encode(&record)).await {
        Ok(_) => Ok((StatusCode::CREATED, axum::Json(json!({"claim": record}))).into_response()),
        Err(KvError::AlreadyExists { .. }) => Err(ApiError::new(StatusCode::CONFLICT, "route_owned", format!("{target} was claimed by another namespace just now; `wharf domain list` shows it"))),
        Err(e) => Err(store_failed(e)),
    }
}

#[derive(serde::Deserialize)]
struct ReleaseQuery {
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    path_prefix: Option<String>,
}

/// Gives a claim up: refused (409) while the namespace's services route there.
async fn release(State(plane): State<ControlPlane>, Path(ns): Path<String>, Query(query): Query<ReleaseQuery>) -> ApiResult {
    check_namespace(&ns)?;
    let target = target(query.host, query.path_prefix)?;
    let owners = Owners::read_for(&plane, std::slice::from_ref(&target)).await?;
    match owners.claim(&target) {
        Some(claim) if claim.namespace == ns => {}
        _ => return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("namespace {ns} has no claim on {target}"))),
    }
    let routing: Vec<&str> = owners.routed.iter().filter(|(t, n, _)| *t == target && *n == ns).map(|(_, _, s)| s.as_str()).collect();
    if !routing.is_empty() {
        return Err(ApiError::new(StatusCode::CONFLICT, "in_use", format!("{target} is routed by {}; change their routes first", routing.join(", "))));
    }
    plane.store.route_claims_kv().delete(&route_claim_key(&target)).await.map_err(store_failed)?;
    Ok(axum::Json(json!({"released": target, "namespace": ns})).into_response())
}

async fn list(State(plane): State<ControlPlane>, Path(ns): Path<String>) -> ApiResult {
    check_namespace(&ns)?;
    let mut claims: Vec<RouteClaim> = Owners::read_all(&plane).await?.claims.into_iter().filter(|c| c.namespace == ns).collect();
    claims.sort_by(|a, b| a.target.cmp(&b.target));
    Ok(axum::Json(json!({"namespace": ns, "claims": claims})).into_response())
}

async fn list_all(State(plane): State<ControlPlane>, visible: Option<Extension<Visible>>) -> ApiResult {
    if visible.is_some_and(|Extension(v)| v.0.is_some()) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "only admin tokens list every namespace's claims; use /v1/namespaces/<ns>/claims"));
    }
    let mut claims = Owners::read_all(&plane).await?.claims;
    claims.sort_by(|a, b| a.target.cmp(&b.target));
    Ok(axum::Json(json!({"claims": claims})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(target: ClaimTarget, ns: &str) -> RouteClaim {
        RouteClaim { target, namespace: ns.to_string(), how: "claimed".to_string(), by: String::new(), at_ms: 0 }
    }

    fn path(p: &str) -> ClaimTarget {
        ClaimTarget::Path(p.to_string())
    }

    fn host(h: &str) -> ClaimTarget {
        ClaimTarget::Host(h.to_string())
    }

    #[test]
    fn the_longest_claimed_or_routed_prefix_decides() {
        let owners = Owners {
            claims: vec![claim(path("/"), "root"), claim(path("/shop"), "shop"), claim(host("shop.example.com"), "shop")],
            routed: vec![(path("/legacy"), "old".to_string(), "old/web".to_string())],
        };
        let owner = |t: &ClaimTarget, asking: &str| owners.owner(t, asking).map(|(ns, _)| ns);
        assert_eq!(owner(&path("/shop/login"), "a"), Some("shop".to_string()));
        assert_eq!(owner(&path("/shopping"), "a"), Some("root".to_string()), "a prefix covers at a segment boundary");
        assert_eq!(owner(&path("/legacy/x"), "a"), Some("old".to_string()), "a route from before claims keeps its owner");
        assert_eq!(owner(&host("shop.example.com"), "a"), Some("shop".to_string()));
        assert_eq!(owner(&host("other.example.com"), "a"), None);
        assert!(owners.check(&path("/shop/login"), "a").is_err());
        assert!(owners.check(&path("/shop/login"), "shop").is_ok());
        assert!(owners.check(&host("shop.example.com"), "a").is_err());
        let nobody = Owners { claims: Vec::new(), routed: Vec::new() };
        assert!(nobody.check(&path("/anything"), "a").is_ok());
    }

    #[test]
    fn a_path_is_decided_by_the_claims_of_the_prefixes_covering_it() {
        assert_eq!(deciders(&path("/shop/login")), vec![path("/"), path("/shop"), path("/shop/login")]);
        assert_eq!(deciders(&path("/")), vec![path("/")]);
        assert_eq!(deciders(&host("a.example.com")), vec![host("a.example.com")]);
    }
}
