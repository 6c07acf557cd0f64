//! `/v1/keys` (admin scope): create, list and revoke API keys. A new key is shown once, in the
//! answer to its creation; lists show ids, scopes and times, never keys.

use std::sync::Arc;

use agentry_core::ErrorCode;
use agentry_core::keys::{self, ApiKey, Scope};
use agentry_core::runs::now_ms;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, invalid};
use crate::native::body_or_error;
use crate::time;

type S = Arc<AppState>;

pub fn routes() -> Router<S> {
    Router::new()
        .route("/v1/keys", post(create_key).get(list_keys))
        .route("/v1/keys/{id}", delete(revoke_key))
}

/// A key as lists show it (without its hash).
pub fn key_json(k: &ApiKey) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "scopes": k.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "agents": k.agents,
        "created_at": time(Some(k.created_at)),
        "expires_at": time(k.expires_at),
        "revoked_at": time(k.revoked_at),
        "last_used_at": time(k.last_used_at),
        "active": k.is_active(now_ms()),
    })
}

/// Builds a new key; the token is returned once and only its hash is kept.
pub fn new_key(
    name: Option<String>,
    scopes: Vec<Scope>,
    agents: Option<Vec<String>>,
    expires_in_s: Option<u64>,
) -> (ApiKey, String) {
    let (id, token) = keys::generate_key();
    let now = now_ms();
    let key = ApiKey {
        id,
        name,
        hash: keys::hash_token(&token),
        scopes,
        agents,
        created_at: now,
        expires_at: expires_in_s.map(|s| now.saturating_add((s as i64).saturating_mul(1000))),
        revoked_at: None,
        last_used_at: None,
    };
    (key, token)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    #[serde(default)]
    name: Option<String>,
    scopes: Vec<String>,
    #[serde(default)]
    agents: Option<Vec<String>>,
    #[serde(default)]
    expires_in_s: Option<u64>,
}

async fn create_key(
    State(state): State<S>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_or_error(body, state.settings.max_body_bytes)?;
    let b: CreateBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorCode::ValidationError,
            format!("invalid request body: {e}"),
        )
    })?;
    let mut scopes = Vec::new();
    for s in &b.scopes {
        let scope = Scope::parse(s).ok_or_else(|| {
            invalid(
                "scopes",
                "invoke, runs:read, runs:write, schedules or admin",
                format!("unknown scope `{s}`"),
            )
        })?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    if scopes.is_empty() {
        return Err(invalid(
            "scopes",
            "at least one scope",
            "a key needs at least one scope",
        ));
    }
    if b.expires_in_s == Some(0) {
        return Err(invalid(
            "expires_in_s",
            "positive seconds",
            "`expires_in_s` must be positive",
        ));
    }
    if let Some(agents) = &b.agents
        && agents.is_empty()
    {
        return Err(invalid(
            "agents",
            "at least one agent, or absent",
            "`agents` is empty",
        ));
    }
    let (key, token) = new_key(b.name, scopes, b.agents, b.expires_in_s);
    state
        .auth
        .store()
        .create_key(key.clone())
        .await
        .map_err(ApiError::from_store)?;
    state.auth.reload().await.map_err(ApiError::from_store)?;
    let mut out = key_json(&key);
    out["key"] = Value::String(token);
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn list_keys(State(state): State<S>) -> Result<Response, ApiError> {
    let keys = state
        .auth
        .store()
        .list_keys()
        .await
        .map_err(ApiError::from_store)?;
    Ok(Json(json!({"keys": keys.iter().map(key_json).collect::<Vec<_>>()})).into_response())
}

async fn revoke_key(State(state): State<S>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let key = state
        .auth
        .store()
        .revoke_key(&id, now_ms())
        .await
        .map_err(ApiError::from_store)?
        .ok_or_else(|| ApiError::new(ErrorCode::KeyNotFound, format!("no key `{id}`")))?;
    state.auth.reload().await.map_err(ApiError::from_store)?;
    Ok(Json(key_json(&key)).into_response())
}
