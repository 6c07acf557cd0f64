//! What a route needs: who may call it, its rate-limit class, whether it uses the store, and
//! where a key may come from. The route table (`routes.rs`) gives every route one of these.

use std::collections::HashMap;

use agentry_core::keys::Scope;

use crate::limits::RouteClass;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, even with authentication on.
    Public,
    /// Any valid key.
    AnyKey,
    /// A key with this scope (admin has every scope).
    Scope(Scope),
}

/// Where a route takes a key from besides `Authorization: Bearer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryToken {
    No,
    /// `?token=` on a WebSocket handshake (browsers cannot set headers there).
    OnUpgrade,
    /// `?token=` always (the spec Swagger UI loads).
    Always,
}

/// What a route needs, declared once in the table below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub access: Access,
    /// The rate-limit class its requests draw on; `None`: never limited.
    pub limit: Option<RouteClass>,
    /// It reads or writes the store (so it can answer 503 when the store cannot).
    pub uses_store: bool,
    pub query_token: QueryToken,
}

impl Policy {
    const fn new(access: Access, limit: RouteClass) -> Self {
        Self {
            access,
            limit: Some(limit),
            uses_store: false,
            query_token: QueryToken::No,
        }
    }
    const fn store(mut self) -> Self {
        self.uses_store = true;
        self
    }
    const fn websocket(mut self) -> Self {
        self.query_token = QueryToken::OnUpgrade;
        self
    }
}

/// The probes: open, never limited.
pub const PROBE: Policy = Policy {
    access: Access::Public,
    limit: None,
    uses_store: false,
    query_token: QueryToken::No,
};
/// Swagger UI's files: the same for everyone, no data.
pub const DOCS: Policy = Policy::new(Access::Public, RouteClass::Other);
/// The OpenAPI description: any key, in the header or the query.
pub const SPEC: Policy = Policy {
    query_token: QueryToken::Always,
    ..Policy::new(Access::AnyKey, RouteClass::Other)
};
/// Reading what is served (agents), and anything unknown.
pub const ANY_KEY: Policy = Policy::new(Access::AnyKey, RouteClass::Other);
pub const INVOKE: Policy = Policy::new(Access::Scope(Scope::Invoke), RouteClass::Invoke);
pub const INVOKE_WS: Policy = INVOKE.websocket();
pub const RUNS_READ: Policy = Policy::new(Access::Scope(Scope::RunsRead), RouteClass::Runs).store();
pub const RUNS_READ_WS: Policy = RUNS_READ.websocket();
pub const RUNS_WRITE: Policy =
    Policy::new(Access::Scope(Scope::RunsWrite), RouteClass::Runs).store();
pub const SCHEDULES: Policy =
    Policy::new(Access::Scope(Scope::Schedules), RouteClass::Runs).store();
/// Webhook deliveries: no key (the handler checks the hook's signature), their own limit.
pub const HOOKS: Policy = Policy::new(Access::Public, RouteClass::Hooks).store();
pub const KEYS: Policy = Policy::new(Access::Scope(Scope::Admin), RouteClass::Other).store();

/// The policies of the native API's operations, by path and method (for the OpenAPI
/// document).
pub type Policies = HashMap<(String, String), Policy>;
