//! What every handler shares: the agents, the configuration, the engine, the key ring, the
//! rate limits, RunAgent's history, and the OpenAPI description built at start-up.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use agentry_core::Config;
use agentry_engine::{Agents, ServedAgent};

use crate::auth::Auth;
use crate::limits::RateLimits;

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
    /// Schedules, and this node's scheduler.
    pub scheduler: agentry_engine::Scheduler,
    /// The callback outbox (`GET /v1/runs/{id}/deliveries`).
    pub callbacks: Arc<dyn agentry_core::store::CallbackStore>,
    /// The webhooks by name (`POST /v1/hooks/{name}`).
    pub hooks: std::collections::HashMap<String, Arc<agentry_core::webhooks::Hook>>,
    /// API keys, and whether they are required.
    pub auth: Arc<Auth>,
    /// Rate limits.
    pub limits: RateLimits,
    /// The native API's OpenAPI description, as `router` generated it from the routes.
    pub openapi: OnceLock<serde_json::Value>,
}

impl AppState {
    /// The agent with this id or name.
    pub fn agent(&self, key: &str) -> Option<&Arc<Agent>> {
        self.agents.get(key)
    }
}
