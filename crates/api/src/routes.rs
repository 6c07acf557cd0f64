//! The route table. Every route declares, once, what it needs: who may call it (open, any
//! key, or a scope), its rate-limit class, whether it needs the store, and where a key may
//! come from; its OpenAPI operation is its handler's `#[utoipa::path]`. The gate in front of
//! each route (authentication, the agent restriction, rate limits) and the OpenAPI document
//! (security, shared error answers) read these declarations; nothing classifies requests by
//! their path. Adding a route means adding one line here.

use std::net::SocketAddr;
use std::sync::Arc;

use agentry_core::ErrorCode;
use axum::Router;
use axum::extract::{ConnectInfo, RawPathParams, Request, State};
use axum::handler::Handler;
use axum::middleware::{Next, from_fn_with_state};
use axum::response::Response;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

use crate::auth::{Principal, presented_token, refuse};
pub use crate::policy::*;
use crate::state::AppState;
use crate::{
    compat, deliveries, event_bus, hooks, keys, metrics, native, nodes, openapi, probes, runs,
    schedules,
};

type S = Arc<AppState>;

/// The native API: each route with its policy. The OpenAPI document is generated from these.
fn native_routes() -> Vec<(Policy, UtoipaMethodRouter<S>)> {
    vec![
        (ANY_KEY, routes!(native::list_agents)),
        (ANY_KEY, routes!(native::get_agent)),
        (INVOKE, routes!(native::invoke)),
        (INVOKE, routes!(native::stream)),
        (INVOKE_WS, routes!(native::ws)),
        (RUNS_WRITE, routes!(runs::create_run)),
        (RUNS_READ, routes!(runs::list_runs)),
        (RUNS_WRITE, routes!(runs::create_and_wait)),
        (RUNS_WRITE, routes!(runs::create_and_stream)),
        (RUNS_READ, routes!(runs::get_run)),
        (RUNS_READ, routes!(runs::wait_run)),
        (RUNS_WRITE, routes!(runs::cancel_run)),
        (RUNS_READ, routes!(runs::run_events)),
        (RUNS_READ, routes!(deliveries::list_deliveries)),
        (RUNS_READ, routes!(event_bus::events)),
        (RUNS_READ_WS, routes!(event_bus::events_ws)),
        (RUNS_WRITE, routes!(deliveries::resend_delivery)),
        (RUNS_READ_WS, routes!(runs::run_events_ws)),
        (SCHEDULES, routes!(schedules::create_schedule)),
        (SCHEDULES, routes!(schedules::list_schedules)),
        (SCHEDULES, routes!(schedules::get_schedule)),
        (SCHEDULES, routes!(schedules::update_schedule)),
        (SCHEDULES, routes!(schedules::delete_schedule)),
        (SCHEDULES, routes!(schedules::pause_schedule)),
        (SCHEDULES, routes!(schedules::resume_schedule)),
        (SCHEDULES, routes!(schedules::trigger_schedule)),
        (SCHEDULES, routes!(schedules::list_fires)),
        (HOOKS, routes!(hooks::deliver)),
        (KEYS, routes!(keys::create_key)),
        (KEYS, routes!(keys::list_keys)),
        (KEYS, routes!(keys::revoke_key)),
        (RUNS_READ, routes!(nodes::list_nodes)),
        (ANY_KEY, routes!(metrics::metrics)),
        (PROBE, routes!(probes::healthz)),
        (PROBE, routes!(probes::readyz)),
        (SPEC, routes!(openapi::openapi_json)),
    ]
}

/// Which agent a route's requests are about, for the agent restriction of keys and the
/// per-agent rate limits.
#[derive(Debug, Clone)]
enum AgentOf {
    /// None (or the handler checks it on what it loads, as the run routes do).
    Unnamed,
    /// The `{agent}` path parameter, as the handler decodes and resolves it.
    Param,
    /// This agent (RunAgent's routes carry the agent id literally).
    Fixed(Arc<str>),
}

#[derive(Clone)]
struct Gate {
    state: S,
    policy: Policy,
    agent: AgentOf,
    /// Refusals are shaped as RunAgent's server shapes them (`{"detail"}`).
    runagent: bool,
}

/// The whole HTTP surface but the global layers: every route behind its gate.
pub(crate) fn build(state: &S) -> (Router<S>, utoipa::openapi::OpenApi, Policies) {
    let mut api = OpenApiRouter::with_openapi(openapi::base());
    let mut policies = Policies::new();
    for (policy, (schemas, paths, method_router)) in native_routes() {
        for operation in operations(&paths) {
            policies.insert(operation, policy);
        }
        let gated = method_router.layer(from_fn_with_state(
            gate(state, policy, AgentOf::Param),
            check,
        ));
        api = api.routes((schemas, paths, gated));
    }
    // Unknown routes under /v1 answer the native 404.
    api = api.route(
        "/v1/{*rest}",
        axum::routing::any(native::no_such_route).layer(from_fn_with_state(
            gate(state, ANY_KEY, AgentOf::Unnamed),
            check,
        )),
    );
    let (native, spec) = api.split_for_parts();
    let mut router = Router::new();
    for agent in state.agents.iter() {
        let id: Arc<str> = agent.config.agent_id.as_str().into();
        router = router.merge(
            compat::agent_routes(state, agent).route_layer(from_fn_with_state(
                runagent_gate(state, INVOKE_WS, AgentOf::Fixed(id)),
                check,
            )),
        );
    }
    let router = router
        .merge(compat::routes().route_layer(from_fn_with_state(
            runagent_gate(state, INVOKE_WS, AgentOf::Unnamed),
            check,
        )))
        .merge(native)
        .merge(
            Router::from(openapi::swagger_ui()).route_layer(from_fn_with_state(
                gate(state, DOCS, AgentOf::Unnamed),
                check,
            )),
        )
        .fallback(compat::not_found.layer(from_fn_with_state(
            runagent_gate(state, ANY_KEY, AgentOf::Unnamed),
            check,
        )));
    (router, spec, policies)
}

/// An execution-only node's admin port (`agentry worker`): the probes and the metrics, each
/// behind the same gate as on a serving node; everything else is the native 404.
pub(crate) fn build_admin(state: &S) -> Router<S> {
    let admin = [
        (PROBE, routes!(probes::healthz)),
        (PROBE, routes!(probes::readyz)),
        (ANY_KEY, routes!(metrics::metrics)),
    ];
    let mut api = OpenApiRouter::new();
    for (policy, (schemas, paths, method_router)) in admin {
        let gated = method_router.layer(from_fn_with_state(
            gate(state, policy, AgentOf::Unnamed),
            check,
        ));
        api = api.routes((schemas, paths, gated));
    }
    let (router, _) = api.split_for_parts();
    router.fallback(native::no_such_route.layer(from_fn_with_state(
        gate(state, ANY_KEY, AgentOf::Unnamed),
        check,
    )))
}

/// The (path, method) of every operation a route's OpenAPI paths describe.
fn operations(paths: &utoipa::openapi::path::Paths) -> Vec<(String, String)> {
    let Ok(serde_json::Value::Object(items)) = serde_json::to_value(paths) else {
        return Vec::new();
    };
    items
        .into_iter()
        .flat_map(|(path, item)| {
            let methods: Vec<String> = item
                .as_object()
                .into_iter()
                .flat_map(|m| m.keys().cloned())
                .collect();
            methods
                .into_iter()
                .map(move |method| (path.clone(), method))
        })
        .collect()
}

fn gate(state: &S, policy: Policy, agent: AgentOf) -> Gate {
    Gate {
        state: Arc::clone(state),
        policy,
        agent,
        runagent: false,
    }
}

/// The gate of a RunAgent route (and of unknown paths, which answer as RunAgent's does).
fn runagent_gate(state: &S, policy: Policy, agent: AgentOf) -> Gate {
    Gate {
        runagent: true,
        ..gate(state, policy, agent)
    }
}

/// The gate in front of every route: authentication and scope, the key's agent restriction,
/// then the caller's and the agent's rate limits. With authentication off it costs one check
/// of a flag (and a rate limit when one is configured).
async fn check(
    State(gate): State<Gate>,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    mut req: Request,
    next: Next,
) -> Response {
    let Gate {
        state,
        policy,
        agent,
        runagent,
    } = gate;
    let agent_id: Option<Arc<str>> = match &agent {
        AgentOf::Unnamed => None,
        AgentOf::Fixed(id) => Some(Arc::clone(id)),
        AgentOf::Param => params.ok().and_then(|p| {
            p.iter()
                .find(|(k, _)| *k == "agent")
                .and_then(|(_, v)| state.agent(v))
                .map(|a| a.config.agent_id.as_str().into())
        }),
    };
    let mut principal = Principal(None);
    // Without keys, loopback is open to this machine, not to the web pages its browser shows.
    if policy.access != Access::Public
        && !state.auth.enabled()
        && state.bound.ip().is_loopback()
        && let Some(refusal) = crate::browser::check(&req, &state.config.http.cors_origins)
    {
        return refuse(runagent, refusal.code, &refusal.message);
    }
    if policy.access != Access::Public && state.auth.enabled() {
        let Some(token) = presented_token(&req, policy.query_token) else {
            return refuse(
                runagent,
                ErrorCode::AuthenticationError,
                "an API key is required: send `Authorization: Bearer <key>`",
            );
        };
        let Some(entry) = state.auth.check(token) else {
            return refuse(
                runagent,
                ErrorCode::AuthenticationError,
                "the API key is not valid (unknown, revoked or expired)",
            );
        };
        if let Access::Scope(scope) = policy.access
            && !entry.key.grants(scope)
        {
            return refuse(
                runagent,
                ErrorCode::PermissionError,
                &format!(
                    "the API key {} lacks the `{}` scope",
                    entry.key.id,
                    scope.as_str()
                ),
            );
        }
        principal = Principal(Some(entry));
        if let Some(agent) = agent_id.as_deref().and_then(|id| state.agents.by_id(id))
            && !principal.allows(agent)
        {
            return refuse(
                runagent,
                ErrorCode::PermissionError,
                "the API key is limited to other agents",
            );
        }
    }
    if let Some(class) = policy.limit
        && !state.limits.is_empty()
    {
        // The key's id is borrowed; only an IP address is formatted.
        let caller: std::borrow::Cow<'_, str> = match principal.0.as_ref() {
            Some(entry) => std::borrow::Cow::Borrowed(&entry.key.id),
            None => req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map_or("unknown".into(), |c| c.0.ip().to_string().into()),
        };
        if let Err(limited) = state.limits.check_caller(class, &caller) {
            return limited.into_response(runagent);
        }
        if let Some(id) = agent_id.as_deref()
            && let Err(limited) = state.limits.check_agent(class, id)
        {
            return limited.into_response(runagent);
        }
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use agentry_core::keys::Scope;

    use super::*;

    /// What each kind of route needs, as the table declares it.
    #[test]
    fn routes_map_to_scopes() {
        let table: Vec<(String, String, Policy)> = native_routes()
            .into_iter()
            .flat_map(|(policy, (_, paths, _))| {
                operations(&paths)
                    .into_iter()
                    .map(move |(path, method)| (path, method, policy))
            })
            .collect();
        let of = |method: &str, path: &str| {
            table
                .iter()
                .find(|(p, m, _)| p == path && m == method)
                .map(|(_, _, policy)| policy.access)
                .unwrap_or_else(|| panic!("{method} {path} is not in the table"))
        };
        assert_eq!(of("get", "/healthz"), Access::Public);
        assert_eq!(of("get", "/readyz"), Access::Public);
        assert_eq!(of("get", "/openapi.json"), Access::AnyKey);
        assert_eq!(of("get", "/v1/agents"), Access::AnyKey);
        assert_eq!(
            of("post", "/v1/agents/{agent}/entrypoints/{tag}/invoke"),
            Access::Scope(Scope::Invoke)
        );
        assert_eq!(
            of("get", "/v1/agents/{agent}/entrypoints/{tag}/ws"),
            Access::Scope(Scope::Invoke)
        );
        assert_eq!(
            of("get", "/v1/runs/{id}/events"),
            Access::Scope(Scope::RunsRead)
        );
        assert_eq!(
            of("post", "/v1/runs/{id}/cancel"),
            Access::Scope(Scope::RunsWrite)
        );
        assert_eq!(of("get", "/v1/keys"), Access::Scope(Scope::Admin));
        for (method, path) in [
            ("post", "/v1/schedules"),
            ("get", "/v1/schedules"),
            ("get", "/v1/schedules/{id}"),
            ("patch", "/v1/schedules/{id}"),
            ("delete", "/v1/schedules/{id}"),
            ("post", "/v1/schedules/{id}/pause"),
            ("post", "/v1/schedules/{id}/resume"),
            ("post", "/v1/schedules/{id}/trigger"),
            ("get", "/v1/schedules/{id}/fires"),
        ] {
            assert_eq!(
                of(method, path),
                Access::Scope(Scope::Schedules),
                "{method} {path}"
            );
        }
        assert_eq!(
            of("get", "/v1/runs/{id}/deliveries"),
            Access::Scope(Scope::RunsRead)
        );
        assert_eq!(
            of("post", "/v1/runs/{id}/deliveries"),
            Access::Scope(Scope::RunsWrite)
        );
        assert_eq!(of("get", "/v1/events"), Access::Scope(Scope::RunsRead));
        assert_eq!(of("get", "/v1/events/ws"), Access::Scope(Scope::RunsRead));
        // A delivery carries its hook's signature, not a key.
        assert_eq!(of("post", "/v1/hooks/{name}"), Access::Public);
        assert_eq!(of("get", "/v1/nodes"), Access::Scope(Scope::RunsRead));
        assert_eq!(of("get", "/metrics"), Access::AnyKey);
        assert_eq!(of("delete", "/v1/keys/{id}"), Access::Scope(Scope::Admin));
        // Every route of the store says so; the probes and the spec are never limited by
        // the store.
        for (path, method, policy) in &table {
            assert_eq!(
                policy.uses_store,
                path.starts_with("/v1/runs")
                    || path.starts_with("/v1/keys")
                    || path.starts_with("/v1/schedules")
                    || path.starts_with("/v1/hooks")
                    || path.starts_with("/v1/events")
                    || path == "/v1/nodes",
                "{method} {path}"
            );
        }
    }
}
