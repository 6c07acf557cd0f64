//! The OpenAPI 3.1 description of the native API, served at `/openapi.json`, with Swagger UI
//! at `/docs`.
//!
//! The paths come from the router itself: every native handler carries a `#[utoipa::path]`
//! and is registered through `utoipa_axum::routes!`, which takes the method and path from that
//! same annotation, so a route cannot exist without its description. Request bodies are the
//! handlers' own deserialisation structs, and agents, runs and keys are answered from typed
//! views that are their own schemas. The few shapes built elsewhere (the error envelope, the
//! probes, SSE events, enumerations) are written out below; schemathesis checks in CI that
//! every answer matches the spec.
//!
//! On top of the generic paths, each served entrypoint gets its own invoke (or stream) path,
//! derived from the generic one, with the entrypoint's parameter schema as the body's `input`
//! and its docstring as the description.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::policy::{Access, Policies, Policy};
use crate::state::AppState;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use utoipa::openapi::OpenApi as Spec;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

type S = Arc<AppState>;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Agentry",
        description = "Serve Python agents over HTTP: calls (sync, SSE, WebSocket) and durable runs.\n\nErrors share one envelope (`Error`); `docs/errors.md` lists the codes. With authentication on, send `Authorization: Bearer <key>`; `/healthz`, `/readyz` and `/docs` are open.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&Security),
    tags(
        (name = "agents", description = "The agents served here, their entrypoints and schemas"),
        (name = "invoke", description = "Calls: answered at once, never stored"),
        (name = "entrypoints", description = "One path per served entrypoint, with its parameters and docstring"),
        (name = "runs", description = "Durable runs: queued, retried, resumable"),
        (name = "hooks", description = "Webhook deliveries, signed with the hook's secret instead of an API key"),
        (name = "keys", description = "API keys (admin scope)"),
        (name = "operations", description = "Probes and this description"),
    ),
)]
struct ApiDoc;

/// Bearer keys on every operation but the probes.
struct Security;

impl Modify for Security {
    fn modify(&self, spec: &mut Spec) {
        let components = spec.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("ak_<id>_<secret>")
                    .description(Some(
                        "An API key from `agentry keys create` or `POST /v1/keys`",
                    ))
                    .build(),
            ),
        );
        spec.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "api_key",
            Vec::<String>::new(),
        )]);
    }
}

/// The document's base: title, tags, security scheme. The paths come from the route table.
pub(crate) fn base() -> Spec {
    ApiDoc::openapi()
}

/// The spec as JSON, with the constraints the derive cannot state: `delay_s` and `run_at`
/// exclude each other, and `backoff` takes no other fields.
pub fn refined(spec: Spec, policies: &Policies) -> Value {
    let mut spec = serde_json::to_value(&spec).unwrap_or_else(|_| json!({}));
    let schemas = &mut spec["components"]["schemas"];
    schemas["RunRequest"]["not"] = json!({
        "description": "`delay_s` and `run_at` cannot both be given",
        "required": ["delay_s", "run_at"],
        "properties": {"delay_s": {"type": "number"}, "run_at": {"type": "string"}},
    });
    schemas["Backoff"]["additionalProperties"] = json!(false);
    // A call without a body is a call without arguments.
    for kind in ["invoke", "stream"] {
        let path = format!("/v1/agents/{{agent}}/entrypoints/{{tag}}/{kind}");
        if let Some(body) = spec["paths"][&path]["post"].get_mut("requestBody") {
            body["required"] = json!(false);
        }
    }
    if let Some(paths) = spec["paths"].as_object_mut() {
        for (path, item) in paths.iter_mut() {
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for (method, op) in item.iter_mut() {
                if let Some(policy) = policies.get(&(path.clone(), method.clone())) {
                    add_shared_responses(policy, op);
                }
            }
        }
    }
    spec
}

/// What an operation's entry in the route table says about it: open ones need no key
/// (`security: [{}]`); the others share the answers of what sits in front of every handler,
/// authentication and rate limits; an operation with a body shares the body limit's 413 (and,
/// behind a gate, the 415 of a non-JSON body while authentication is off), and
/// one that uses the store its 503 (locked database, full disk).
fn add_shared_responses(policy: &Policy, op: &mut Value) {
    let open = policy.access == Access::Public;
    let has_body = op.get("requestBody").is_some();
    let uses_store = policy.uses_store;
    let Some(responses) = op["responses"].as_object_mut() else {
        return;
    };
    let shared = [
        (
            !open,
            "401",
            "`authentication_error`: no key, or an unknown, revoked or expired one",
        ),
        (
            !open,
            "403",
            "`permission_error`: the key lacks the scope, or is limited to other agents",
        ),
        (
            !open && policy.limit.is_some(),
            "429",
            "`rate_limit_error`: see `Retry-After` and the `RateLimit-*` headers",
        ),
        (
            has_body,
            "413",
            "`payload_too_large`: the body is over `--max-body-bytes`",
        ),
        (
            has_body && !open,
            "415",
            "`unsupported_media_type`: with authentication off, a body not sent as JSON",
        ),
        (
            uses_store,
            "503",
            "`unavailable`: the store cannot take this now; retry",
        ),
    ];
    for (applies, status, description) in shared {
        if !applies {
            continue;
        }
        let mut response = json!({
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        });
        if status == "429" {
            response["headers"] = json!({"Retry-After": {
                "description": "Seconds until a request may succeed",
                "schema": {"type": "integer"},
            }});
        }
        responses.entry(status).or_insert(response);
    }
    if open {
        op["security"] = json!([{}]);
    }
}

/// Swagger UI's files (vendored into the binary), pointed at `/openapi.json`. Query
/// configuration and persisted authorisation stay off: a link that points the page at another
/// spec must not be able to send a stored key elsewhere. With keys on, the spec is loaded by
/// typing `/openapi.json?token=<key>` into the page's top bar.
pub fn swagger_ui() -> utoipa_swagger_ui::SwaggerUi {
    utoipa_swagger_ui::SwaggerUi::new("/docs")
        .config(utoipa_swagger_ui::Config::from("/openapi.json"))
}

/// This API's OpenAPI 3.1 description, with a path for each served entrypoint.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 description", body = Object)))]
pub(crate) async fn openapi_json(State(state): State<S>, caller: crate::auth::Caller) -> Response {
    // The description names every agent served here, with its entrypoints and schemas.
    if crate::auth::principal(caller).agent_limit().is_some() {
        return crate::error::ApiError::new(
            agentry_core::ErrorCode::PermissionError,
            "the API description lists every agent served here: it needs a key not limited to agents",
        )
        .into_response();
    }
    let body = state.openapi.get().map_or_else(
        || "{}".to_string(),
        |base| with_entrypoints(base, &state).to_string(),
    );
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// The base spec as JSON, plus one path per served entrypoint. Built per request: workers
/// report their schemas after start-up, and the document is small.
pub fn with_entrypoints(base: &Value, state: &AppState) -> Value {
    let mut spec = base.clone();
    let mut extra = BTreeMap::new();
    for kind in ["invoke", "stream"] {
        let generic = format!("/v1/agents/{{agent}}/entrypoints/{{tag}}/{kind}");
        let Some(template) = spec["paths"][&generic]["post"].as_object().cloned() else {
            continue;
        };
        for agent in state.agents.iter() {
            for ep in &agent.config.entrypoints {
                if ep.is_streaming() != (kind == "stream") {
                    continue;
                }
                let report = agent.executor.entrypoint(&ep.tag);
                let mut op = Value::Object(template.clone());
                let name = &agent.config.agent_name;
                let doc = report.and_then(|r| r.doc.as_deref()).unwrap_or("");
                let summary = doc.lines().next().filter(|l| !l.is_empty());
                op["tags"] = json!(["entrypoints"]);
                op["operationId"] = json!(format!("{kind}_{name}_{}", ep.tag));
                op["summary"] =
                    json!(summary.map_or_else(|| format!("{name}.{}", ep.tag), str::to_string));
                op["description"] = json!(doc);
                op["parameters"] = json!([]);
                op["requestBody"] = entrypoint_body(report);
                let path = format!("/v1/agents/{name}/entrypoints/{}/{kind}", ep.tag);
                extra.insert(path, json!({"post": op}));
            }
        }
    }
    if let Some(paths) = spec["paths"].as_object_mut() {
        paths.extend(extra);
    }
    spec
}

/// The call body of one entrypoint, as exact as JSON Schema allows: `input` holds its keyword
/// parameters, `args` its positional ones in order (`prefixItems`); a required parameter must
/// come one way or the other, and no parameter both ways. The body is required when the
/// entrypoint has required parameters.
fn entrypoint_body(report: Option<&agentry_core::executor::EntrypointReport>) -> Value {
    let mut body = json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {
            "input": {"type": ["object", "null"]},
            "args": {"type": ["array", "null"]},
            "timeout_s": {"type": ["number", "null"], "exclusiveMinimum": 0},
        },
    });
    let Some(r) = report else {
        return json!({"required": false, "content": {"application/json": {"schema": body}}});
    };
    let props = r.schema.get("properties").and_then(Value::as_object);
    let required: Vec<&str> = r
        .schema
        .get("required")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut input = r.schema.clone();
    if let Some(o) = input.as_object_mut() {
        o.remove("required");
    }
    body["properties"]["input"] = json!({"anyOf": [input, {"type": "null"}]});
    let positional: Vec<Value> = r
        .positional_only
        .iter()
        .map(|name| {
            props
                .and_then(|p| p.get(name))
                .cloned()
                .unwrap_or_else(|| json!({}))
        })
        .collect();
    body["properties"]["args"] = match (positional.is_empty(), r.var_args) {
        (true, false) => json!({"type": ["array", "null"], "maxItems": 0}),
        (true, true) => json!({"type": ["array", "null"]}),
        (false, items) => {
            json!({"type": ["array", "null"], "prefixItems": positional, "items": items})
        }
    };
    let by_keyword = |name: &str| json!({"required": ["input"], "properties": {"input": {"type": "object", "required": [name]}}});
    let mut rules = Vec::new();
    for (i, name) in r.positional_only.iter().enumerate() {
        let by_position = json!({"required": ["args"], "properties": {"args": {"type": "array", "minItems": i + 1}}});
        rules.push(json!({"not": {"allOf": [by_keyword(name), by_position]}}));
        if required.contains(&name.as_str()) {
            rules.push(json!({"anyOf": [by_keyword(name), by_position]}));
        }
    }
    for name in required
        .iter()
        .filter(|n| !r.positional_only.iter().any(|p| p == *n))
    {
        rules.push(by_keyword(name));
    }
    if !rules.is_empty() {
        body["allOf"] = Value::Array(rules);
    }
    json!({"required": !required.is_empty(), "content": {"application/json": {"schema": body}}})
}
