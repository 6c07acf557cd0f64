//! Authentication and authorisation: every request but `/healthz` and `/readyz` needs an API
//! key with the route's scope once any key exists (or `--auth required`).
//!
//! Keys travel as `Authorization: Bearer <key>`, or as `?token=<key>` on WebSocket upgrades
//! (browsers cannot set headers there; RunAgent's SDKs send both). Checking a key touches no
//! database: every key lives in memory, reloaded from the store every two seconds (so keys
//! created or revoked offline with `agentry keys` take effect while the server runs) and at once
//! after changes through `/v1/keys`. Last-used times are kept in memory and written in one
//! batch every ten seconds. A key is never logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use agentry_core::keys::{self, ApiKey, Scope};
use agentry_core::runs::now_ms;
use agentry_core::{ErrorCode, KeyStore, StoreError};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::RwLock;

use crate::error::ApiError;
use crate::{Agent, AppState};

/// A key known to the server, with its last use.
pub struct KeyEntry {
    pub key: ApiKey,
    last_used: AtomicI64,
    /// The last-used time already written to the store.
    persisted: AtomicI64,
}

/// Who is calling: a key, or nobody when authentication is off.
#[derive(Clone)]
pub struct Principal(pub Option<Arc<KeyEntry>>);

impl Principal {
    /// Whether the caller may touch this agent.
    pub fn allows(&self, agent: &Agent) -> bool {
        self.0.as_ref().is_none_or(|k| {
            k.key
                .allows_agent(&agent.config.agent_id, &agent.config.agent_name)
        })
    }

    /// Whether error details may carry Python tracebacks: for everyone in development
    /// (`--expose-tracebacks`), otherwise only for admin keys.
    pub fn sees_tracebacks(&self, expose_to_all: bool) -> bool {
        expose_to_all
            || self
                .0
                .as_ref()
                .is_some_and(|k| k.key.scopes.contains(&Scope::Admin))
    }

    /// The agents the key is limited to, if it is.
    pub fn agent_limit(&self) -> Option<&[String]> {
        self.0.as_ref().and_then(|k| k.key.agents.as_deref())
    }
}

/// The caller, as a handler extracts it: absent when no middleware put one there.
pub type Caller = Option<axum::Extension<Principal>>;

pub fn principal(caller: Caller) -> Principal {
    caller.map_or(Principal(None), |axum::Extension(p)| p)
}

/// The key ring and the switch.
pub struct Auth {
    store: Arc<dyn KeyStore>,
    /// `--auth required`: on even before the first key exists.
    required: bool,
    keys: RwLock<Arc<HashMap<String, Arc<KeyEntry>>>>,
    /// Held across a reload's read and swap, so that a slow periodic reload that read the store
    /// before a key was created cannot replace the map a later reload built with it.
    reloading: tokio::sync::Mutex<()>,
}

impl Auth {
    pub async fn load(store: Arc<dyn KeyStore>, required: bool) -> Result<Arc<Self>, StoreError> {
        let auth = Arc::new(Self {
            store,
            required,
            keys: RwLock::new(Arc::new(HashMap::new())),
            reloading: tokio::sync::Mutex::new(()),
        });
        auth.reload().await?;
        Ok(auth)
    }

    /// On once any key exists (revoked ones included: revoking the last key never opens the
    /// server), or when required.
    pub fn enabled(&self) -> bool {
        self.required || !self.keys.read().is_empty()
    }

    /// Keys neither revoked nor expired.
    pub fn active_keys(&self) -> usize {
        let now = now_ms();
        self.keys
            .read()
            .values()
            .filter(|e| e.key.is_active(now))
            .count()
    }

    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// Reads every key from the store, keeping the in-memory last-used times.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.reloading.lock().await;
        let stored = self.store.list_keys().await?;
        let old = Arc::clone(&self.keys.read());
        let map = stored
            .into_iter()
            .map(|key| {
                let last = key.last_used_at.unwrap_or(0);
                let (used, persisted) = old.get(&key.id).map_or((last, last), |e| {
                    (
                        e.last_used.load(Ordering::Relaxed).max(last),
                        e.persisted.load(Ordering::Relaxed).max(last),
                    )
                });
                let entry = KeyEntry {
                    key,
                    last_used: AtomicI64::new(used),
                    persisted: AtomicI64::new(persisted),
                };
                (entry.key.id.clone(), Arc::new(entry))
            })
            .collect();
        *self.keys.write() = Arc::new(map);
        Ok(())
    }

    /// Writes the last-used times that changed.
    pub async fn flush_last_used(&self) {
        let map = Arc::clone(&self.keys.read());
        let used: Vec<(String, i64)> = map
            .values()
            .filter_map(|e| {
                let at = e.last_used.load(Ordering::Relaxed);
                (at > e.persisted.load(Ordering::Relaxed)).then(|| (e.key.id.clone(), at))
            })
            .collect();
        if used.is_empty() {
            return;
        }
        match self.store.touch_keys(used.clone()).await {
            Ok(()) => {
                for (id, at) in used {
                    if let Some(e) = map.get(&id) {
                        e.persisted.fetch_max(at, Ordering::Relaxed);
                    }
                }
            }
            Err(e) => tracing::warn!("recording key use failed: {e}"),
        }
    }

    /// Reloads keys every two seconds and records their use every ten.
    pub fn spawn_maintenance(self: &Arc<Self>) {
        let auth = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            let mut n = 0u64;
            loop {
                tick.tick().await;
                if let Err(e) = auth.reload().await {
                    tracing::warn!("reloading API keys failed: {e}");
                }
                n += 1;
                if n % 5 == 0 {
                    auth.flush_last_used().await;
                }
            }
        });
    }

    /// The key behind a presented token, if it is a valid one.
    fn check(&self, token: &str) -> Option<Arc<KeyEntry>> {
        let id = keys::key_id(token)?;
        let entry = Arc::clone(self.keys.read().get(id)?);
        let now = now_ms();
        if !entry.key.matches(token) || !entry.key.is_active(now) {
            return None;
        }
        entry.last_used.fetch_max(now, Ordering::Relaxed);
        Some(entry)
    }
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Public,
    /// Any valid key (listing agents, unknown routes).
    AnyKey,
    Scope(Scope),
}

fn access_for(method: &Method, path: &str) -> Access {
    // Swagger UI's files are the same for everyone and carry no data; the description they
    // load, `/openapi.json`, needs a key like everything else.
    if path == "/healthz" || path == "/readyz" || path == "/docs" || path.starts_with("/docs/") {
        return Access::Public;
    }
    if path.starts_with("/v1/keys") {
        return Access::Scope(Scope::Admin);
    }
    if path.starts_with("/v1/runs") {
        return if method == Method::GET {
            Access::Scope(Scope::RunsRead)
        } else {
            Access::Scope(Scope::RunsWrite)
        };
    }
    if path.starts_with("/v1/agents/")
        && (path.ends_with("/invoke") || path.ends_with("/stream") || path.ends_with("/ws"))
    {
        return Access::Scope(Scope::Invoke);
    }
    if path.starts_with("/api/v1") {
        return Access::Scope(Scope::Invoke);
    }
    Access::AnyKey
}

/// The agent a path names (`/v1/agents/{agent}/…`, `/api/v1/agents/{agent_id}/…`).
pub(crate) fn path_agent(path: &str) -> Option<&str> {
    let rest = path
        .strip_prefix("/v1/agents/")
        .or_else(|| path.strip_prefix("/api/v1/agents/"))?;
    rest.split('/').next().filter(|s| !s.is_empty())
}

fn presented_token(req: &Request) -> Option<&str> {
    if let Some(v) = req.headers().get(header::AUTHORIZATION)
        && let Ok(v) = v.to_str()
        && let Some(token) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
    {
        return Some(token.trim());
    }
    // Browsers cannot set headers on a WebSocket handshake, nor on the spec Swagger UI loads
    // (typed into Swagger UI's top bar as `/openapi.json?token=...`); there, and only there, a query token is taken.
    let is_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if is_upgrade || req.uri().path() == "/openapi.json" {
        return req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    }
    None
}

/// A refusal, shaped for the route: RunAgent's routes answer as FastAPI does (`{"detail"}`).
fn refuse(path: &str, code: ErrorCode, message: &str) -> Response {
    let mut resp = if path.starts_with("/api/") {
        (
            crate::error::status_of(code),
            axum::Json(serde_json::json!({"detail": message})),
        )
            .into_response()
    } else {
        ApiError::new(code, message).into_response()
    };
    if code == ErrorCode::AuthenticationError {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

/// The middleware in front of every route. With authentication off it only classifies the
/// path (no allocation); with it on, one map lookup and one SHA-256 per request.
pub async fn require_key(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let access = access_for(req.method(), req.uri().path());
    if access == Access::Public {
        return next.run(req).await;
    }
    if !state.auth.enabled() {
        req.extensions_mut().insert(Principal(None));
        return next.run(req).await;
    }
    let path = req.uri().path();
    let Some(token) = presented_token(&req) else {
        return refuse(
            path,
            ErrorCode::AuthenticationError,
            "an API key is required: send `Authorization: Bearer <key>`",
        );
    };
    let Some(entry) = state.auth.check(token) else {
        return refuse(
            path,
            ErrorCode::AuthenticationError,
            "the API key is not valid (unknown, revoked or expired)",
        );
    };
    if let Access::Scope(scope) = access
        && !entry.key.grants(scope)
    {
        return refuse(
            path,
            ErrorCode::PermissionError,
            &format!(
                "the API key {} lacks the `{}` scope",
                entry.key.id,
                scope.as_str()
            ),
        );
    }
    let principal = Principal(Some(entry));
    if let Some(agent) = path_agent(path).and_then(|a| state.agent(a))
        && !principal.allows(agent)
    {
        return refuse(
            path,
            ErrorCode::PermissionError,
            "the API key is limited to other agents",
        );
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_map_to_scopes() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(access_for(&get, "/healthz"), Access::Public);
        assert_eq!(access_for(&get, "/docs/"), Access::Public);
        assert_eq!(access_for(&get, "/docs/swagger-ui.css"), Access::Public);
        assert_eq!(access_for(&get, "/openapi.json"), Access::AnyKey);
        assert_eq!(access_for(&get, "/docsx"), Access::AnyKey);
        assert_eq!(access_for(&get, "/v1/agents"), Access::AnyKey);
        assert_eq!(
            access_for(&post, "/v1/agents/a/entrypoints/t/invoke"),
            Access::Scope(Scope::Invoke)
        );
        assert_eq!(
            access_for(&get, "/v1/agents/a/entrypoints/t/ws"),
            Access::Scope(Scope::Invoke)
        );
        assert_eq!(
            access_for(&post, "/api/v1/agents/x/run"),
            Access::Scope(Scope::Invoke)
        );
        assert_eq!(
            access_for(&get, "/v1/runs/r/events"),
            Access::Scope(Scope::RunsRead)
        );
        assert_eq!(
            access_for(&post, "/v1/runs/r/cancel"),
            Access::Scope(Scope::RunsWrite)
        );
        assert_eq!(access_for(&get, "/v1/keys"), Access::Scope(Scope::Admin));
        assert_eq!(path_agent("/api/v1/agents/abc/run"), Some("abc"));
        assert_eq!(path_agent("/v1/agents"), None);
    }
}
