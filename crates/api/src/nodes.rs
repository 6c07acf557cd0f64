//! `GET /v1/nodes`: the nodes sharing this node's store, with their agents, capacity and load,
//! as each last reported itself (every heartbeat). On the embedded store, this node alone.

use std::sync::Arc;

use agentry_core::nodes::{NodeRecord, NodeRole, NodeStatus};
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::{Caller, principal};
use crate::error::ApiError;
use crate::state::AppState;
use crate::views::{ErrorEnvelope, rfc3339};

type S = Arc<AppState>;

/// One node as the registry last heard of it.
#[derive(Serialize, ToSchema)]
#[schema(as = Node)]
pub struct NodeView {
    name: String,
    /// `serve` (API and execution) or `worker` (execution only).
    #[schema(value_type = String)]
    role: NodeRole,
    version: String,
    /// The agent ids whose runs it claims (for a key limited to agents, only those).
    agents: Vec<String>,
    /// Runs it may hold at once.
    capacity: usize,
    /// Runs it holds now (0 once stopped or gone).
    running: usize,
    /// `up`, `stopped` (shut down gracefully) or `gone` (silent for longer than a lease TTL).
    #[schema(value_type = String)]
    status: NodeStatus,
    started_at: Option<String>,
    last_seen_at: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct NodeList {
    nodes: Vec<NodeView>,
}

/// The nodes that share this store: those up, those stopped and those gone (kept a day).
#[utoipa::path(get, path = "/v1/nodes", tag = "operations",
    responses(
        (status = 200, description = "The nodes", body = NodeList),
        (status = 403, description = "`permission_error`: the key lacks `runs:read`", body = ErrorEnvelope),
        (status = 503, description = "`service_unavailable`: the store does not answer", body = ErrorEnvelope),
    ))]
pub(crate) async fn list_nodes(
    State(state): State<S>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let who = principal(caller);
    let nodes = state.engine.nodes().await.map_err(ApiError::from_store)?;
    // A key limited to some agents learns nothing of the others, not even their names.
    let visible = |agent: &String| match who.agent_limit() {
        None => true,
        Some(allowed) => {
            allowed.contains(agent) || state.agent(agent).is_some_and(|served| who.allows(served))
        }
    };
    let nodes = nodes
        .into_iter()
        .map(
            |NodeRecord {
                 report,
                 started_at,
                 last_seen_at,
                 status,
             }| NodeView {
                name: report.name,
                role: report.role,
                version: report.version,
                agents: report.agents.into_iter().filter(|a| visible(a)).collect(),
                capacity: report.capacity,
                running: report.running,
                status,
                started_at: rfc3339(started_at),
                last_seen_at: rfc3339(last_seen_at),
            },
        )
        .collect();
    Ok(Json(NodeList { nodes }).into_response())
}
