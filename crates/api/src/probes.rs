//! The probes: `/healthz` (alive) and `/readyz` (every agent has a warm worker and the server
//! is not draining). Open to everyone; an unauthenticated caller learns only what they say.

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
) -> impl IntoResponse {
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
    let ready = !draining
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
    (
        status,
        axum::Json(serde_json::json!({"status": word, "agents": agents})),
    )
}
