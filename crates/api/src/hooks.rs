//! Webhook deliveries (`docs/webhooks.md`): `POST /v1/hooks/{name}` checks a delivery's
//! signature under the hook's secret (the route takes no API key: the signature is the
//! credential), refuses a stale timestamp, an oversized body and a replayed delivery id, maps
//! the body to the entrypoint's input, and creates a durable run. A delivery's id is the
//! run's idempotency key under the hook's own scope, so a replay is refused on every node of a
//! cluster and across restarts, for as long as the first run is kept.

use std::sync::Arc;

use agentry_core::ErrorCode;
use agentry_core::runs::{NewRun, RunRequest, now_ms};
use agentry_engine::SubmitError;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

use crate::de::body_or_error;
use crate::error::ApiError;
use crate::limits::RouteClass;
use crate::state::AppState;
use crate::views::ErrorEnvelope;

type S = Arc<AppState>;

/// A delivery accepted: the run it created.
#[derive(Serialize, ToSchema)]
pub(crate) struct HookAccepted {
    run_id: String,
    status: &'static str,
    hook: String,
    /// The delivery's id (`webhook-id`, `X-GitHub-Delivery`, or the Stripe event's `id`).
    delivery_id: String,
    /// `standard`, `github` or `stripe`.
    scheme: &'static str,
    agent_id: String,
    entrypoint: String,
}

fn replayed(delivery: &str, run_id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Conflict,
        format!("the delivery `{delivery}` was received before; it started run {run_id}"),
    )
    .with_details(json!({"run_id": run_id, "delivery_id": delivery}))
}

/// Deliver a webhook: a durable run of the entrypoint that declares the hook.
#[utoipa::path(post, path = "/v1/hooks/{name}", tag = "hooks",
    params(("name" = String, Path, description = "The hook's name, as declared in the configuration")),
    request_body(content = Object, description = "The sender's payload (JSON), signed"),
    responses(
        (status = 202, description = "The delivery's run, committed", body = HookAccepted,
            headers(("Location" = String, description = "`/v1/runs/{id}`"))),
        (status = 401, description = "`authentication_error`: unsigned, a signature that does not match, or a stale timestamp", body = ErrorEnvelope),
        (status = 404, description = "`hook_not_found`", body = ErrorEnvelope),
        (status = 409, description = "`conflict`: a replayed delivery id (`details.run_id`)", body = ErrorEnvelope),
        (status = 413, description = "`payload_too_large`: over the hook's body limit", body = ErrorEnvelope),
        (status = 422, description = "`validation_error`: the body does not make the entrypoint's input", body = ErrorEnvelope),
        (status = 429, description = "`rate_limit_error`", body = ErrorEnvelope),
        (status = 503, description = "`unavailable`: the store cannot be written", body = ErrorEnvelope),
    ))]
pub(crate) async fn deliver(
    State(state): State<S>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let hook = state.hooks.get(&name).cloned().ok_or_else(|| {
        ApiError::new(
            ErrorCode::HookNotFound,
            format!("no webhook is named `{name}`"),
        )
    })?;
    let body = body_or_error(body, state.config.http.max_body_bytes)?;
    if body.len() > hook.max_body_bytes {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the body is larger than the hook's limit of {} bytes",
                hook.max_body_bytes
            ),
        ));
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let delivery = hook
        .verify(header, &body, now_ms().div_euclid(1000))
        .map_err(|refusal| {
            tracing::debug!(hook = %hook.name, "webhook delivery refused: {refusal}");
            ApiError::new(ErrorCode::AuthenticationError, refusal.to_string())
        })?;
    if let Err(limited) = state.limits.check_agent(RouteClass::Hooks, &hook.agent) {
        return Err(ApiError::new(
            ErrorCode::RateLimitError,
            format!(
                "the agent's rate limit for webhooks ({}/s) is exceeded; retry in {:.3} s",
                limited.spec.per_second,
                limited.wait.as_secs_f64()
            ),
        ));
    }
    let input = hook.input(&body).map_err(|e| {
        crate::error::invalid(
            "body",
            "the entrypoint's input, as the hook maps it",
            e.to_string(),
        )
    })?;
    let metadata = json!({"trigger": {
        "kind": "webhook",
        "hook": hook.name,
        "delivery_id": delivery.id,
        "scheme": delivery.scheme.as_str(),
    }})
    .to_string();
    let scope = format!("hook:{}", hook.name);
    let request = RunRequest {
        agent: &hook.agent,
        entrypoint: &hook.entrypoint,
        input: Some(&input),
        idempotency_key: Some(&delivery.id),
        idempotency_scope: Some(&scope),
        metadata: Some(&metadata),
        ..RunRequest::default()
    };
    let run = NewRun::build(
        &request,
        &state.agents,
        &state.config.workers,
        &state.config.runs,
        now_ms(),
    )
    .map_err(crate::error::run_rejected)?;
    let (run, created) = match state.engine.submit(run).await {
        Ok(done) => done,
        Err(SubmitError::Conflict(existing)) => return Err(replayed(&delivery.id, &existing)),
        Err(SubmitError::Store(e)) => return Err(ApiError::from_store(e)),
    };
    if !created {
        return Err(replayed(&delivery.id, &run.id));
    }
    let mut resp = (
        StatusCode::ACCEPTED,
        Json(HookAccepted {
            run_id: run.id.clone(),
            status: run.status.as_str(),
            hook: hook.name.clone(),
            delivery_id: delivery.id,
            scheme: delivery.scheme.as_str(),
            agent_id: run.agent.clone(),
            entrypoint: run.entrypoint.clone(),
        }),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/runs/{}", run.id)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}
