//! `/v1/keys` (admin scope): create, list and revoke API keys. A new key is shown once, in the
//! answer to its creation; lists show ids, scopes and times, never keys.

use std::sync::Arc;

use agentry_core::ErrorCode;
use agentry_core::keys::{ApiKey, KeyRequest};
use agentry_core::runs::now_ms;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Caller, Principal, principal};
use crate::de::body_or_error;
use crate::error::{ApiError, invalid};
use crate::state::AppState;
use crate::views::{ErrorEnvelope, ScopeView, rfc3339};

type S = Arc<AppState>;

/// A key as the API shows it: never the key itself, nor its hash.
#[derive(Serialize, ToSchema)]
#[schema(as = Key)]
pub struct KeyView {
    id: String,
    name: Option<String>,
    #[schema(value_type = Vec<ScopeView>)]
    scopes: Vec<&'static str>,
    agents: Option<Vec<String>>,
    created_at: Option<String>,
    expires_at: Option<String>,
    revoked_at: Option<String>,
    last_used_at: Option<String>,
    active: bool,
}

impl From<&ApiKey> for KeyView {
    fn from(k: &ApiKey) -> Self {
        Self {
            id: k.id.clone(),
            name: k.name.clone(),
            scopes: k.scopes.iter().map(|s| s.as_str()).collect(),
            agents: k.agents.clone(),
            created_at: rfc3339(k.created_at),
            expires_at: k.expires_at.and_then(rfc3339),
            revoked_at: k.revoked_at.and_then(rfc3339),
            last_used_at: k.last_used_at.and_then(rfc3339),
            active: k.is_active(now_ms()),
        }
    }
}

/// A key just created: the one answer that carries the key.
#[derive(Serialize, ToSchema)]
#[schema(as = NewKey)]
pub struct NewKeyView {
    #[serde(flatten)]
    pub view: KeyView,
    /// The key: shown once, here.
    pub key: String,
}

#[derive(Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = KeyRequest)]
struct CreateBody {
    /// A label for people.
    #[serde(default)]
    name: Option<String>,
    /// At least one.
    #[schema(value_type = Vec<ScopeView>, min_items = 1)]
    scopes: Vec<String>,
    /// Limit the key to these agents (ids or names).
    #[serde(default)]
    #[schema(min_items = 1)]
    agents: Option<Vec<String>>,
    /// Expire this many seconds from now.
    #[serde(default, deserialize_with = "crate::de::opt_int")]
    #[schema(minimum = 1)]
    expires_in_s: Option<u64>,
}

/// Create an API key. The key itself is in this answer and nowhere else, ever.
#[utoipa::path(post, path = "/v1/keys", tag = "keys",
    request_body(content = CreateBody),
    responses(
        (status = 201, description = "The new key, with `key` shown this once", body = NewKeyView),
        (status = 403, description = "`permission_error`: the key lacks the scope, or the key asked for exceeds its own scopes or agents", body = ErrorEnvelope),
        (status = 422, description = "`validation_error`", body = ErrorEnvelope),
        (status = 503, description = "`unavailable`", body = ErrorEnvelope),
    ))]
pub(crate) async fn create_key(
    State(state): State<S>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_or_error(body, state.config.http.max_body_bytes)?;
    let b: CreateBody = crate::de::object_body(&body)?;
    let request = KeyRequest {
        name: b.name,
        scopes: b.scopes,
        agents: b.agents,
        expires_in_s: b.expires_in_s,
    };
    let (key, token) = request
        .create(now_ms())
        .map_err(|r| invalid(r.field, r.expected, r.message))?;
    if let Some(creator) = principal(caller).0 {
        let same_agent = |a: &str, b: &str| {
            a == b
                || state
                    .agent(a)
                    .zip(state.agent(b))
                    .is_some_and(|(x, y)| x.config.agent_id == y.config.agent_id)
        };
        key.within(&creator.key, same_agent)
            .map_err(|why| ApiError::new(ErrorCode::PermissionError, why))?;
    }
    state
        .auth
        .store()
        .create_key(key.clone())
        .await
        .map_err(ApiError::from_store)?;
    state.auth.reload().await.map_err(ApiError::from_store)?;
    let created = NewKeyView {
        view: KeyView::from(&key),
        key: token,
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// Every key: ids, scopes and times, never the keys.
#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    responses(
        (status = 200, description = "The keys", body = KeyList),
        (status = 403, description = "`permission_error`: the key lacks the scope, or is limited to agents", body = ErrorEnvelope),
    ))]
pub(crate) async fn list_keys(
    State(state): State<S>,
    caller: Caller,
) -> Result<Response, ApiError> {
    unrestricted(caller)?;
    let keys = state
        .auth
        .store()
        .list_keys()
        .await
        .map_err(ApiError::from_store)?;
    Ok(Json(KeyList {
        keys: keys.iter().map(KeyView::from).collect(),
    })
    .into_response())
}

/// Revoke a key; it is refused from the next request on. A key cannot revoke itself: that is
/// how an operator locks themself out (another admin key, or `agentry keys revoke` on the
/// server, can).
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys",
    params(("id" = String, Path, description = "The key's id (its `ak_<id>_` part)")),
    responses(
        (status = 200, description = "The revoked key", body = KeyView),
        (status = 403, description = "`permission_error`: the key lacks the scope, is limited to agents, or is the key being revoked", body = ErrorEnvelope),
        (status = 404, description = "`key_not_found`", body = ErrorEnvelope),
    ))]
pub(crate) async fn revoke_key(
    State(state): State<S>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = unrestricted(caller)?;
    if who.0.is_some_and(|k| k.key.id == id) {
        return Err(ApiError::new(
            ErrorCode::PermissionError,
            "a key cannot revoke itself: use another admin key, or `agentry keys revoke` on the server",
        ));
    }
    let key = state
        .auth
        .store()
        .revoke_key(&id, now_ms())
        .await
        .map_err(ApiError::from_store)?
        .ok_or_else(|| ApiError::new(ErrorCode::KeyNotFound, format!("no key `{id}`")))?;
    state.auth.reload().await.map_err(ApiError::from_store)?;
    Ok(Json(KeyView::from(&key)).into_response())
}

/// Listing and revoking see and touch every key, so a key limited to agents may not.
fn unrestricted(caller: Caller) -> Result<Principal, ApiError> {
    let who = principal(caller);
    if who.agent_limit().is_some() {
        return Err(ApiError::new(
            ErrorCode::PermissionError,
            "listing and revoking keys needs an admin key that is not limited to agents",
        ));
    }
    Ok(who)
}
