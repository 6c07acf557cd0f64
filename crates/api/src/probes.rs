//! The probes: `/healthz` (alive) and `/readyz` (every agent has a warm worker and the server
//! is not draining). Open to everyone; an unauthenticated caller learns only what they say:
//! the per-agent details of `/readyz` are for a caller with a valid key not limited to agents,
//! or for anyone while authentication is off on loopback (this machine's own user).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::http::StatusCode;
use axum::response::IntoResponse;

use crate::state::AppState;
use crate::views;

/// Alive: answers as long as the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = views::Health)))]
pub(crate) async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// Ready when every agent has at least one warm worker and the server is not draining.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = views::Readiness),
        (status = 503, description = "Not ready, or draining", body = views::Readiness),
    ))]
pub(crate) async fn readyz(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: axum::extract::Request,
) -> impl IntoResponse {
    let detailed = if state.auth.enabled() {
        // A key limited to agents would learn the others' names: unrestricted keys only.
        crate::auth::presented_token(&req, crate::policy::QueryToken::No).is_some_and(|token| {
            state
                .auth
                .check(token)
                .is_some_and(|entry| entry.key.agents.is_none())
        })
    } else {
        state.bound.ip().is_loopback()
    };
    let agents: serde_json::Map<String, serde_json::Value> = state
        .agents
        .iter()
        .map(|a| {
            let health = a.executor.health();
            (
                a.config.agent_name.clone(),
                serde_json::json!({"live_workers": health.live_workers, "crash_loop": health.crash_loop}),
            )
        })
        .collect();
    let draining = state.draining.load(Ordering::SeqCst);
    let store_ok = state.engine.store_reachable().await;
    let ready = !draining
        && store_ok
        && state
            .agents
            .iter()
            .all(|a| a.executor.health().live_workers > 0);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = if ready {
        "ready"
    } else if draining {
        "draining"
    } else {
        "not_ready"
    };
    let body = if detailed {
        serde_json::json!({"status": word, "agents": agents, "store": if store_ok { "ok" } else { "unreachable" }})
    } else {
        serde_json::json!({"status": word})
    };
    (status, axum::Json(body))
}
