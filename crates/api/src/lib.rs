//! The HTTP transport: the route table and the gate in front of every route (`routes`,
//! `policy`), RunAgent's local-server protocol (`compat`), the native `/v1` API (`native`,
//! `runs`, `keys`), the probes, and the OpenAPI description. Handlers are thin: they parse,
//! call the domain (an agent's executor, the engine), and format. The invoke path touches no
//! database; invocation history is queued to a batching writer.
//!
//! Modules depend one way: handlers → views, state, error; the table → handlers; nothing
//! below imports the crate root.

pub mod auth;
mod browser;
pub mod compat;
mod de;
mod deliveries;
pub mod error;
mod event_bus;
mod hooks;
pub mod keys;
pub mod limits;
mod metrics;
pub mod native;
mod nodes;
pub mod openapi;
pub mod policy;
mod probes;
pub mod pyjson;
pub mod request_id;
pub mod routes;
pub mod runs;
mod schedules;
pub mod server;
pub mod state;
pub mod views;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;

pub use state::{Agent, AppState};

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

/// An execution-only node's admin port: `/healthz`, `/readyz` and `/metrics`.
pub fn admin_router(state: Arc<AppState>) -> Router {
    routes::build_admin(&state)
        .layer(DefaultBodyLimit::max(64 * 1024))
        .layer(axum::middleware::from_fn(request_id::middleware))
        .with_state(state)
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
