//! Authentication: the key ring, and who a request's caller is. Once any key exists (or with
//! `--auth required`) every route but the open ones needs a key with the scope its entry in the
//! route table (`routes.rs`) names.
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
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use parking_lot::RwLock;

use crate::error::ApiError;
use crate::policy::QueryToken;

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
    pub fn allows(&self, agent: &agentry_core::agent::ServedAgent) -> bool {
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
    pub(crate) fn check(&self, token: &str) -> Option<Arc<KeyEntry>> {
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

/// The key a request presents: `Authorization: Bearer`, or `?token=` where the route takes one.
pub(crate) fn presented_token(req: &Request, query: QueryToken) -> Option<&str> {
    if let Some(v) = req.headers().get(header::AUTHORIZATION)
        && let Ok(v) = v.to_str()
        && let Some(token) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
    {
        return Some(token.trim());
    }
    // Browsers cannot set headers on a WebSocket handshake, nor on the spec Swagger UI loads
    // (typed into Swagger UI's top bar as `/openapi.json?token=...`); there, and only there, a
    // query token is taken.
    let is_upgrade = || {
        req.headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
    };
    let taken = match query {
        QueryToken::No => false,
        QueryToken::OnUpgrade => is_upgrade(),
        QueryToken::Always => true,
    };
    if taken {
        return req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
    }
    None
}

/// A refusal, shaped for the route: RunAgent's routes answer as FastAPI does (`{"detail"}`).
pub(crate) fn refuse(runagent: bool, code: ErrorCode, message: &str) -> Response {
    let mut resp = if runagent {
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
