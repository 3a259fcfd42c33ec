//! API authentication and authorisation: bearer tokens, each either a
//! cluster admin or bound to namespaces with a role (read or write).
//!
//! A token is `wharf_<id>_<secret>`. Only its sha256 is stored (bucket
//! `wharf-tokens`, key = id), so the store never holds a usable token. The
//! first start of a control plane creates an admin token and writes it to a
//! file (mode 0600) that only the operator can read.

use crate::ControlPlane;
use crate::api::ApiError;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::path::Path;
use wharf_bus::{Bus, Kv};

/// KV bucket of token records (hashes and roles).
pub const TOKENS_BUCKET: &str = "wharf-tokens";

/// What a token may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Role {
    /// Everything, in every namespace, including tokens.
    Admin,
    /// Only these namespaces; reads, and writes when `write`.
    Namespaces { namespaces: Vec<String>, write: bool },
}

/// A stored token: its hash and role, never the token itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// sha256 of the whole token, hex.
    pub hash: String,
    pub role: Role,
    pub created_at_ms: u64,
    /// When it stops working (`None`: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

/// What a token turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Known, not expired: it has this role.
    Valid(Role),
    /// Known, but past its expiry (ms since the epoch).
    Expired { at_ms: u64 },
    /// Not a token of this control plane (or revoked).
    Unknown,
}

/// The token store.
#[derive(Clone)]
pub struct Tokens {
    kv: Kv,
}

impl Tokens {
    pub async fn open(bus: &Bus) -> Result<Tokens, wharf_bus::KvError> {
        Ok(Tokens { kv: bus.kv(TOKENS_BUCKET).await? })
    }

    /// Makes a new token with `role`, working for `ttl` (or until revoked
    /// when `None`); returns it (the only time it is seen) and its record.
    pub async fn create(&self, role: Role, ttl: Option<std::time::Duration>) -> Result<(String, TokenRecord), wharf_bus::KvError> {
        let id = hex::encode(rand::random::<[u8; 6]>());
        let secret = hex::encode(rand::random::<[u8; 24]>());
        let token = format!("wharf_{id}_{secret}");
        let expires_at_ms = ttl.map(|ttl| crate::store::now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)));
        let record = self.register(&token, role, expires_at_ms).await?;
        Ok((token, record))
    }

    async fn register(&self, token: &str, role: Role, expires_at_ms: Option<u64>) -> Result<TokenRecord, wharf_bus::KvError> {
        let record = TokenRecord { hash: hash(token), role, created_at_ms: crate::store::now_ms(), expires_at_ms };
        let Some(id) = token_id(token) else { return Ok(record) };
        self.kv.put(id, Bytes::from(serde_json::to_vec(&record).unwrap_or_default())).await?;
        Ok(record)
    }

    /// What `token` is at `now_ms`; an error if the store cannot say (which
    /// is not the same as an unknown token).
    pub async fn check(&self, token: &str, now_ms: u64) -> Result<Checked, wharf_bus::KvError> {
        let Some(id) = token_id(token) else { return Ok(Checked::Unknown) };
        let Some(entry) = self.kv.get(id).await? else { return Ok(Checked::Unknown) };
        let Ok(record) = serde_json::from_slice::<TokenRecord>(&entry.value) else { return Ok(Checked::Unknown) };
        if !constant_time_eq(record.hash.as_bytes(), hash(token).as_bytes()) {
            return Ok(Checked::Unknown);
        }
        Ok(match record.expires_at_ms {
            Some(at_ms) if at_ms <= now_ms => Checked::Expired { at_ms },
            _ => Checked::Valid(record.role),
        })
    }

    /// Every token's id and record (its hash, role and creation time), by id.
    /// A record that cannot be read is skipped: it grants nothing either.
    pub async fn list(&self) -> Result<Vec<(String, TokenRecord)>, wharf_bus::KvError> {
        let entries = self.kv.entries().await?;
        Ok(entries.into_iter().filter_map(|e| serde_json::from_slice(&e.value).ok().map(|record| (e.key, record))).collect())
    }

    /// Deletes the token with id `id`; from then on it gets 401. `Ok(false)` if there is no such token.
    pub async fn revoke(&self, id: &str) -> Result<bool, wharf_bus::KvError> {
        let valid = id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid || self.kv.get(id).await?.is_none() {
            return Ok(false);
        }
        self.kv.delete(id).await?;
        Ok(true)
    }

    /// Makes sure an admin token exists in `file`, creating one (and the file,
    /// mode 0600) on first start, and registering the file's token if the
    /// store lost it. Returns the token.
    pub async fn ensure_admin(&self, file: &Path) -> anyhow::Result<String> {
        if let Ok(text) = std::fs::read_to_string(file) {
            let token = text.trim().to_string();
            if self.check(&token, crate::store::now_ms()).await? != Checked::Valid(Role::Admin) {
                self.register(&token, Role::Admin, None).await?;
            }
            return Ok(token);
        }
        let (token, _) = self.create(Role::Admin, None).await?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_private(file, &token)?;
        Ok(token)
    }
}

fn write_private(file: &Path, token: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(file)?;
    f.write_all(token.as_bytes())?;
    f.write_all(b"\n")
}

fn token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix("wharf_")?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) && !secret.is_empty()).then_some(id)
}

fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The namespace a request path acts in, if any (`/v1/namespaces/{ns}/...`).
fn namespace_of(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/namespaces/")?.split('/').next().filter(|ns| !ns.is_empty())
}

/// Who made a request, for the records it writes (a revision's `created_by`):
/// `admin` or `token <id>`.
#[derive(Debug, Clone)]
pub struct Principal(pub String);

/// The namespaces a request may see, for listings that span namespaces
/// (`GET /v1/services`): `None` for every namespace (admin, or no auth).
#[derive(Debug, Clone)]
pub struct Visible(pub Option<Vec<String>>);

impl Visible {
    /// Whether `namespace` may be shown.
    pub fn allows(&self, namespace: &str) -> bool {
        self.0.as_ref().is_none_or(|namespaces| namespaces.iter().any(|n| n == namespace))
    }
}

/// The middleware: 401 without a valid token, 403 when the token's role
/// does not allow the request. `/healthz` and `/ui` need no token;
/// `/metrics` needs one, and shows a namespace token only its namespaces'
/// series (they name services and their load).
pub async fn authorise(State(plane): State<ControlPlane>, mut request: Request, next: Next) -> Result<Response, ApiError> {
    let path = request.uri().path().to_string();
    // The dashboard's page holds no data: its script calls the API with a token.
    if path == "/healthz" || path == "/ui" {
        return Ok(next.run(request).await);
    }
    let Some(tokens) = &plane.tokens else {
        return Ok(next.run(request).await);
    };
    let token = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "no token: send `Authorization: Bearer <token>` (the CLI reads WHARF_TOKEN or ~/.config/wharf/token)"))?;
    let checked = tokens
        .check(token, crate::store::now_ms())
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("cannot check the token now: {e}")))?;
    let role = match checked {
        Checked::Valid(role) => role,
        Checked::Expired { at_ms } => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "token_expired",
                format!("this token expired at {} (ask an admin for a new one: `wharf token create --ttl ...`)", crate::store::format_ms(at_ms)),
            ));
        }
        Checked::Unknown => return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "unknown or revoked token")),
    };
    let writes = !matches!(*request.method(), Method::GET | Method::HEAD);
    let principal = match &role {
        Role::Admin => "admin".to_string(),
        Role::Namespaces { .. } => format!("token {}", token_id(token).unwrap_or("?")),
    };
    request.extensions_mut().insert(Principal(principal));
    request.extensions_mut().insert(Visible(match &role {
        Role::Admin => None,
        Role::Namespaces { namespaces, .. } => Some(namespaces.clone()),
    }));
    match role {
        Role::Admin => {}
        Role::Namespaces { namespaces, write } => {
            let allowed = namespaces.join(", ");
            if path.starts_with("/v1/tokens") {
                return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "only admin tokens manage tokens"));
            }
            // A namespace's own record holds its quota: only admins change it.
            let is_namespace_record = namespace_of(&path).is_some_and(|ns| path.trim_end_matches('/') == format!("/v1/namespaces/{ns}"));
            if writes && is_namespace_record {
                return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "only admin tokens set namespace quotas"));
            }
            match namespace_of(&path) {
                Some(ns) if !namespaces.iter().any(|n| n == ns) => {
                    return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("this token may act only in namespace(s) {allowed}, not {ns}")));
                }
                Some(_) => {}
                // Hosts are a read-only view, filtered to the token's replicas
                // (see `Visible`). Artifacts belong to namespaces: a namespace
                // token uploads and lists them under /v1/namespaces/<ns>/artifacts.
                None if path == "/v1/hosts" && !writes => {}
                // The listing across namespaces shows a namespace token its own (see `Visible`).
                None if (path == "/v1/services" || path == "/v1/jobs" || path == "/metrics") && !writes => {}
                None => {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        format!("this token may act only in namespace(s) {allowed}; use /v1/namespaces/<ns>/... (the CLI: -n <ns>)"),
                    ));
                }
            }
            if writes && !write {
                return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("this token may only read in namespace(s) {allowed}")));
            }
        }
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_are_checked_and_hashes_compared_whole() {
        assert_eq!(token_id("wharf_0123456789ab_secret"), Some("0123456789ab"));
        assert_eq!(token_id("wharf_xyz_secret"), None);
        assert_eq!(token_id("Bearer nothing"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_eq!(namespace_of("/v1/namespaces/shop/services/web"), Some("shop"));
        assert_eq!(namespace_of("/v1/services"), None);
    }
}
