//! `GET /metrics`: this node in the OpenMetrics text format, for Prometheus. Read at scrape
//! time from what the engine and the agents already keep (atomics, worker health), so the
//! serving path pays nothing for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::auth::{Caller, principal};
use crate::state::AppState;

type Labels = Vec<(&'static str, String)>;
type IntGauge = Gauge<i64, AtomicI64>;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn gauge(v: i64) -> IntGauge {
    let g = IntGauge::default();
    g.set(v);
    g
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// This node's metrics: runs held and claimed, attempts ended by status, leases lost, warm
/// workers per agent, whether the store answers.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String)))]
pub(crate) async fn metrics(State(state): State<Arc<AppState>>, caller: Caller) -> Response {
    // A key limited to some agents sees the series of those agents only.
    let who = principal(caller);
    let engine = &state.engine;
    let store_up = engine.store_reachable().await;
    let counters = engine.counters();
    let mut registry = Registry::with_prefix("agentry");

    let info = Family::<Labels, IntGauge>::default();
    info.get_or_create(&vec![
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        ("role", engine.role().as_str().to_string()),
        ("node", engine.node_name().to_string()),
    ])
    .set(1);
    registry.register("build_info", "This node's version, role and name", info);
    registry.register(
        "runs_held",
        "Runs this node holds a lease on now",
        gauge(count(engine.running())),
    );
    registry.register(
        "runs_capacity",
        "Runs this node may hold at once",
        gauge(count(engine.capacity())),
    );
    registry.register(
        "store_up",
        "1 while the run store answers",
        gauge(i64::from(store_up)),
    );
    registry.register(
        "draining",
        "1 while this node is shutting down",
        gauge(i64::from(state.draining.load(Ordering::Relaxed))),
    );
    registry.register(
        "runs_claimed",
        "Runs this node claimed from the queue (direct leases at submission not included)",
        ConstCounter::<u64>::new(counters.claimed),
    );
    registry.register(
        "leases_lost",
        "Attempts stopped because another node took their run over",
        ConstCounter::<u64>::new(counters.leases_lost),
    );
    let ended = Family::<Labels, Counter>::default();
    for (status, n) in &counters.ended {
        ended
            .get_or_create(&vec![("status", status.as_str().to_string())])
            .inc_by(*n);
    }
    registry.register(
        "attempts_ended",
        "Attempts whose end this node recorded, by the run's status after it (`queued`: a retry is due)",
        ended,
    );
    let live = Family::<Labels, IntGauge>::default();
    let crash_loop = Family::<Labels, IntGauge>::default();
    for a in state.agents.iter().filter(|a| who.allows(a)) {
        let health = a.executor.health();
        let labels = vec![("agent", a.config.agent_id.clone())];
        live.get_or_create(&labels).set(count(health.live_workers));
        crash_loop
            .get_or_create(&labels)
            .set(i64::from(health.crash_loop.is_some()));
    }
    registry.register("agent_live_workers", "Warm Python workers per agent", live);
    registry.register(
        "agent_crash_loop",
        "1 while an agent's workers keep dying at start (its readiness says why)",
        crash_loop,
    );
    let mut body = String::new();
    if encode(&mut body, &registry).is_err() {
        return axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}
