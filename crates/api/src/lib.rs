//! The HTTP transport: RunAgent's local-server protocol (`compat`), the native `/v1` API
//! (`native`), and the operations probes. Handlers are thin: they parse, call the agent's
//! worker pool, and format. The invoke path touches no database; invocation history is queued
//! to a batching writer.

pub mod auth;
pub mod compat;
mod de;
pub mod error;
pub mod keys;
pub mod limits;
pub mod native;
pub mod openapi;
pub mod pyjson;
pub mod request_id;
pub mod routes;
pub mod runs;
pub mod server;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use agentry_core::Config;
use agentry_engine::{Agents, ServedAgent};
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::IntoResponse;

/// One served agent, as the handlers see it.
pub type Agent = ServedAgent;

/// What every handler shares.
pub struct AppState {
    pub agents: Arc<Agents>,
    pub config: Arc<Config>,
    pub started: Instant,
    /// RunAgent's invocation history, when kept.
    pub history: Option<Arc<dyn agentry_core::InvocationHistory>>,
    /// The address actually bound (RunAgent's info route reports it).
    pub bound: SocketAddr,
    /// Set when shutdown starts: readiness fails so load balancers drain us.
    pub draining: AtomicBool,
    /// Durable runs.
    pub engine: agentry_engine::Engine,
    /// API keys, and whether they are required.
    pub auth: Arc<auth::Auth>,
    /// Rate limits.
    pub limits: limits::RateLimits,
    /// The native API's OpenAPI description, as `router` generated it from the routes.
    pub openapi: OnceLock<serde_json::Value>,
}

impl AppState {
    /// The agent with this id or name.
    pub fn agent(&self, key: &str) -> Option<&Arc<Agent>> {
        self.agents.get(key)
    }
}

/// A stored time (Unix milliseconds) as the API shows it: RFC 3339, milliseconds, UTC.
pub(crate) fn time(ms: Option<i64>) -> serde_json::Value {
    ms.and_then(rfc3339)
        .map(serde_json::Value::String)
        .unwrap_or(serde_json::Value::Null)
}

/// A stored time (Unix milliseconds) as RFC 3339 text, or `None` if out of range.
pub(crate) fn rfc3339(ms: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// CORS for the configured origins; `None` when off (the default).
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([
                header::LOCATION,
                header::RETRY_AFTER,
                HeaderName::from_static("ratelimit-limit"),
                HeaderName::from_static("ratelimit-remaining"),
                HeaderName::from_static("ratelimit-reset"),
                HeaderName::from_static("idempotent-replayed"),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// The whole HTTP surface.
pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.config.http.max_body_bytes;
    let (router, spec, policies) = routes::build(&state);
    let _ = state.openapi.set(openapi::refined(spec, &policies));
    router
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(request_id::middleware))
        // Outermost: a browser's preflight is answered before authentication.
        .layer(tower::util::option_layer(cors(
            &state.config.http.cors_origins,
        )))
        .with_state(state)
}

/// Alive: answers as long as the process serves HTTP.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = openapi::Health)))]
pub(crate) async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

/// Ready when every agent has at least one warm worker and the server is not draining.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = openapi::Readiness),
        (status = 503, description = "Not ready, or draining", body = openapi::Readiness),
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
