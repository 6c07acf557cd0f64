//! Durable runs over HTTP (`docs/api.md#runs`): create (202 once committed), read, list with
//! cursor paging, long-poll until terminal, cancel, and follow the event log over SSE or a
//! WebSocket from any point (`Last-Event-ID`, `?after=`). Sync invocations are not runs: they
//! never touch the database and do not appear here.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use agentry_core::ErrorCode;
use agentry_core::runs::{Backoff, NewRun, Run, RunEvent, RunQuery, RunRequest, RunStatus, now_ms};
use agentry_engine::{Engine, Follow, SubmitError};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use utoipa::{IntoParams, IntoResponses, ToSchema};

use crate::auth::{Caller, Principal, principal};
use crate::de::body_or_error;
use crate::error::{ApiError, invalid, upgrade_required};
use crate::request_id::RequestId;
use crate::state::AppState;
use crate::views::{
    BackoffView, ErrorEnvelope, RunErrorView, RunStatusView, SseEvent, rfc3339, time,
};

type S = Arc<AppState>;
/// A run the caller's key may not see is, to it, no run at all.
fn visible(state: &S, who: &Principal, run: Run) -> Result<Run, ApiError> {
    if may_see(state, who, &run) {
        Ok(run)
    } else {
        Err(not_found(&run.id))
    }
}

/// A key limited to agents sees only runs of those agents; a run of an agent no longer served
/// here is for unrestricted keys only (deny by default).
fn may_see(state: &S, who: &Principal, run: &Run) -> bool {
    match state.agents.by_id(&run.agent) {
        Some(agent) => who.allows(agent),
        None => who.agent_limit().is_none(),
    }
}

/// Longest `wait` a client may ask for, in seconds.
const MAX_WAIT_S: f64 = 600.0;

/// Why a run is refused before anything is stored: the error answers of every route that
/// creates one (the spec's; the body limit's 413 and the store's 503 are added to every
/// operation they apply to).
#[derive(IntoResponses)]
#[allow(dead_code)]
enum RunRefused {
    /// `agent_not_found`, `entrypoint_not_found`
    #[response(status = 404)]
    NotFound(ErrorEnvelope),
    /// `idempotency_conflict`
    #[response(status = 409)]
    Conflict(ErrorEnvelope),
    /// `validation_error`: the input does not match the entrypoint, or an option is out of range
    #[response(status = 422)]
    Invalid(ErrorEnvelope),
}

/// The body of `POST /v1/runs`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RunRequest)]
struct CreateBody<'a> {
    /// The agent's id or name.
    agent: String,
    /// The entrypoint's tag.
    entrypoint: String,
    /// Keyword arguments, checked against the entrypoint's parameters.
    #[serde(borrow, default)]
    #[schema(value_type = Option<Object>)]
    input: Option<&'a RawValue>,
    /// The same key with the same body returns the existing run.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 256)]
    idempotency_key: Option<String>,
    /// Higher runs first (default: the entrypoint's configured `priority`, else 0).
    #[serde(default, deserialize_with = "crate::de::opt_int")]
    priority: Option<i32>,
    /// Start no earlier than this many seconds from now (0 to 31536000).
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 31536000.0)]
    delay_s: Option<f64>,
    /// Start no earlier than this time (RFC 3339); not with `delay_s`.
    #[serde(default)]
    #[schema(format = DateTime)]
    run_at: Option<String>,
    /// Deadline of each attempt, in seconds (capped by `--max-timeout-s`).
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0)]
    timeout_s: Option<f64>,
    /// Attempts in all, the first included (1 to 100; default 3).
    #[serde(default, deserialize_with = "crate::de::opt_int")]
    #[schema(minimum = 1, maximum = 100)]
    max_attempts: Option<u32>,
    #[serde(default)]
    #[schema(value_type = Option<BackoffView>)]
    backoff: Option<Backoff>,
    /// At most one run per key runs at a time, in enqueue order.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 256)]
    concurrency_key: Option<String>,
    /// Kept with the run, not interpreted.
    #[serde(borrow, default)]
    #[schema(value_type = Option<Object>)]
    metadata: Option<&'a RawValue>,
    /// An http(s) URL that gets one signed POST when the run ends (`docs/callbacks.md`).
    #[serde(default)]
    #[schema(max_length = 2048, format = "uri")]
    callback_url: Option<String>,
    /// The chain this run belongs to: runs its events trigger inherit it, and the event bus
    /// filters on it (`docs/triggers.md`).
    #[serde(default)]
    #[schema(min_length = 1, max_length = 256)]
    correlation_id: Option<String>,
    /// One of the agent's named executors (`docs/executors.md`); default: the agent's own.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 64)]
    executor: Option<String>,
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(ErrorCode::RunNotFound, format!("no run `{id}`"))
}

/// Parses a create request; `NewRun::build` checks it. Nothing is stored unless all of it is
/// valid.
fn new_run(state: &S, who: &Principal, body: &[u8]) -> Result<NewRun, ApiError> {
    let b: CreateBody<'_> = crate::de::object_body(body)?;
    let request = RunRequest {
        agent: &b.agent,
        entrypoint: &b.entrypoint,
        input: b.input.map(RawValue::get),
        idempotency_key: b.idempotency_key.as_deref(),
        idempotency_scope: who.0.as_ref().map(|k| k.key.id.as_str()),
        priority: b.priority,
        delay_s: b.delay_s,
        run_at: b.run_at.as_deref(),
        timeout_s: b.timeout_s,
        max_attempts: b.max_attempts,
        backoff: b.backoff,
        concurrency_key: b.concurrency_key.as_deref(),
        metadata: b.metadata.map(RawValue::get),
        callback_url: b.callback_url.as_deref(),
        correlation_id: b.correlation_id.as_deref(),
        executor: b.executor.as_deref(),
    };
    let config = &state.config;
    refuse_private_literal(state, request.callback_url)?;
    NewRun::build(
        &request,
        &state.agents,
        &config.workers,
        &config.runs,
        now_ms(),
    )
    .map_err(crate::error::run_rejected)
}

/// The agents (by id) a listing covers: the one asked for (404 if the caller may not see
/// it), else those the caller's key is limited to, else all (`None`).
pub(crate) fn agents_seen(
    state: &S,
    who: &Principal,
    asked: Option<&str>,
) -> Result<Option<Vec<String>>, ApiError> {
    Ok(match asked {
        Some(a) => {
            let agent = state
                .agent(a)
                .filter(|agent| who.allows(agent))
                .ok_or_else(|| crate::error::agent_not_found(a))?;
            Some(vec![agent.config.agent_id.clone()])
        }
        None if who.agent_limit().is_some() => Some(
            state
                .agents
                .iter()
                .filter(|a| who.allows(a))
                .map(|a| a.config.agent_id.clone())
                .collect(),
        ),
        None => None,
    })
}

/// A callback URL whose host is a private address literal, while private callbacks are not
/// allowed, is refused at once (a name is checked on what it resolves to, at delivery).
pub(crate) fn refuse_private_literal(state: &S, url: Option<&str>) -> Result<(), ApiError> {
    use agentry_core::callbacks::{check_url, is_private, literal_ip};
    if state.config.callbacks.allow_private {
        return Ok(());
    }
    if let Some(ip) = url
        .and_then(|u| check_url(u).ok())
        .and_then(|u| literal_ip(&u))
        .filter(|ip| is_private(*ip))
    {
        return Err(crate::error::invalid(
            "callback_url",
            "a public address (or `--allow-private-callbacks`)",
            format!(
                "`callback_url` points at the private address {ip}; callbacks to loopback, private and link-local addresses are refused unless allowed"
            ),
        ));
    }
    Ok(())
}

/// Stored JSON text as it is, without building a tree (`null` if it is not JSON, which the
/// store never holds).
fn raw(text: &str) -> &RawValue {
    serde_json::from_str(text).unwrap_or_else(|_| null_raw())
}

fn null_raw() -> &'static RawValue {
    static NULL: std::sync::OnceLock<Box<RawValue>> = std::sync::OnceLock::new();
    NULL.get_or_init(|| RawValue::from_string("null".into()).unwrap_or_default())
}

/// A run as the API shows it. Serialised straight from the stored row: input, output and
/// metadata are copied as the JSON text they are.
#[derive(Serialize, ToSchema)]
#[schema(as = Run)]
pub struct RunView<'a> {
    id: &'a str,
    /// The agent's id.
    agent: &'a str,
    agent_name: Option<&'a str>,
    entrypoint: &'a str,
    #[schema(value_type = RunStatusView)]
    status: &'static str,
    attempt: u32,
    max_attempts: u32,
    priority: i32,
    #[schema(value_type = Object)]
    input: &'a RawValue,
    /// The return value once succeeded (null for a streaming entrypoint: its chunks are
    /// events).
    #[schema(value_type = Value)]
    output: Option<&'a RawValue>,
    #[schema(value_type = Option<RunErrorView>)]
    error: Option<Value>,
    idempotency_key: Option<&'a str>,
    concurrency_key: Option<&'a str>,
    #[schema(value_type = Object)]
    metadata: &'a RawValue,
    timeout_s: f64,
    #[schema(value_type = BackoffView)]
    backoff: Backoff,
    cancel_requested: bool,
    created_at: Option<String>,
    run_at: Option<String>,
    started_at: Option<String>,
    finished_at: Option<String>,
    updated_at: Option<String>,
    /// The chain of runs it belongs to (`docs/triggers.md`): given when it was created, or
    /// inherited from the run whose event triggered it. This and the next three are shown by
    /// `GET /v1/runs/{id}` only (one more read, kept off the paths that create and wait).
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<String>,
    /// How many event triggers led to it (0: a client or a schedule created it).
    #[serde(skip_serializing_if = "Option::is_none")]
    depth: Option<u32>,
    /// The run whose event triggered it.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_run_id: Option<String>,
    /// The executor it named (`docs/executors.md`); absent: the agent's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    executor: Option<String>,
}

impl RunView<'_> {
    /// Adds the run's links (`RunStore::run_links`): what `GET /v1/runs/{id}` shows beside
    /// the run's row.
    async fn with_links(mut self, state: &AppState) -> Result<Self, ApiError> {
        let links = state
            .engine
            .store()
            .run_links(self.id)
            .await
            .map_err(ApiError::from_store)?
            .unwrap_or_default();
        self.correlation_id = links.correlation_id;
        self.depth = Some(links.depth);
        self.parent_run_id = links.parent_run_id;
        self.executor = links.executor;
        Ok(self)
    }
}

/// A run as the API shows it; tracebacks only to callers who see them.
pub fn run_view<'a>(state: &'a AppState, run: &'a Run, who: &Principal) -> RunView<'a> {
    // The error is parsed only to take the traceback out, and only when there is one.
    let error = run.error.as_deref().map(|text| {
        let mut e: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        if !who.sees_tracebacks(state.config.gateway.expose_tracebacks)
            && let Some(e) = e.as_object_mut()
        {
            e.remove("traceback");
        }
        e
    });
    RunView {
        id: &run.id,
        agent: &run.agent,
        agent_name: state
            .agent(&run.agent)
            .map(|a| a.config.agent_name.as_str()),
        entrypoint: &run.entrypoint,
        status: run.status.as_str(),
        attempt: run.attempt,
        max_attempts: run.max_attempts,
        priority: run.priority,
        input: raw(&run.input),
        output: run.result.as_deref().map(raw),
        error,
        idempotency_key: run.idempotency_key.as_deref(),
        concurrency_key: run.concurrency_key.as_deref(),
        metadata: raw(&run.metadata),
        timeout_s: run.timeout_ms as f64 / 1000.0,
        backoff: run.backoff,
        cancel_requested: run.cancel_requested,
        created_at: rfc3339(run.created_at),
        run_at: rfc3339(run.run_at),
        started_at: run.started_at.and_then(rfc3339),
        finished_at: run.finished_at.and_then(rfc3339),
        updated_at: rfc3339(run.updated_at),
        correlation_id: None,
        depth: None,
        parent_run_id: None,
        executor: None,
    }
}

/// A page of runs.
#[derive(Serialize, ToSchema)]
pub struct RunList<'a> {
    runs: Vec<RunView<'a>>,
    /// Pass as `cursor` for the next page; null on the last.
    next_cursor: Option<String>,
}

/// An event as the API shows it. Failure events carry the attempt's error, whose traceback
/// only callers who see tracebacks get.
pub(crate) fn event_json(e: &RunEvent, tracebacks: bool) -> String {
    if !tracebacks
        && e.data.contains("\"traceback\"")
        && let Ok(mut data) = serde_json::from_str::<Value>(&e.data)
        && let Some(error) = data.get_mut("error").and_then(Value::as_object_mut)
    {
        error.remove("traceback");
        let stripped = RunEvent {
            data: data.to_string(),
            ..e.clone()
        };
        return event_json(&stripped, true);
    }
    format!(
        "{{\"seq\":{},\"type\":{},\"at\":{},\"data\":{}}}",
        e.seq,
        Value::from(e.kind.as_str()),
        time(Some(e.at)),
        e.data
    )
}

pub(crate) async fn submit(
    state: &S,
    who: &Principal,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Run, bool), ApiError> {
    let run = admit(state, who, body)?;
    state.engine.submit(run).await.map_err(submit_error)
}

/// The error a refused submission answers.
pub(crate) fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Conflict(existing) => ApiError::new(
            ErrorCode::IdempotencyConflict,
            "this idempotency_key was used with a different request",
        )
        .with_details(json!({"run_id": existing})),
        SubmitError::Store(e) => ApiError::from_store(e),
    }
}

/// A run request checked (body, agent, the caller's rights, the agent's rate limit) and built,
/// ready to be stored.
fn admit(
    state: &S,
    who: &Principal,
    body: Result<Bytes, BytesRejection>,
) -> Result<NewRun, ApiError> {
    let body = body_or_error(body, state.config.http.max_body_bytes)?;
    let run = new_run(state, who, &body)?;
    if let Some(agent) = state.agent(&run.agent)
        && !who.allows(agent)
    {
        return Err(ApiError::new(
            ErrorCode::PermissionError,
            "the API key is limited to other agents",
        ));
    }
    if let Err(limited) = state
        .limits
        .check_agent(crate::limits::RouteClass::Runs, &run.agent)
    {
        return Err(ApiError::new(
            ErrorCode::RateLimitError,
            format!(
                "the agent's rate limit for runs ({}/s) is exceeded; retry in {:.3} s",
                limited.spec.per_second,
                limited.wait.as_secs_f64()
            ),
        ));
    }
    Ok(run)
}

fn run_response(
    status: StatusCode,
    run: &Run,
    state: &S,
    who: &Principal,
    replayed: bool,
) -> Response {
    let mut resp = (status, Json(run_view(state, run, who))).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/runs/{}", run.id)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

/// Enqueue a durable run. Answers once it is committed.
#[utoipa::path(post, path = "/v1/runs", tag = "runs",
    request_body(content = CreateBody),
    responses(
        (status = 202, description = "The run, committed", body = RunView,
            headers(("Location" = String, description = "`/v1/runs/{id}`"))),
        (status = 200, description = "An idempotent replay: the existing run", body = RunView,
            headers(("Idempotent-Replayed" = String, description = "`true`"))),
        RunRefused,
    ))]
pub(crate) async fn create_run(
    State(state): State<S>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = principal(caller);
    let (run, created) = submit(&state, &who, body).await?;
    let status = if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok(run_response(status, &run, &state, &who, !created))
}

/// One run.
#[utoipa::path(get, path = "/v1/runs/{id}", tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run", body = RunView),
        (status = 404, description = "`run_not_found`", body = ErrorEnvelope),
    ))]
pub(crate) async fn get_run(
    State(state): State<S>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = principal(caller);
    let run = find_run(&state, &who, &id).await?;
    let view = run_view(&state, &run, &who).with_links(&state).await?;
    Ok(Json(view).into_response())
}

/// The run, if it exists and the caller may see it.
pub(crate) async fn find_run(state: &S, who: &Principal, id: &str) -> Result<Run, ApiError> {
    let run = state
        .engine
        .store()
        .get_run(id)
        .await
        .map_err(ApiError::from_store)?
        .ok_or_else(|| not_found(id))?;
    visible(state, who, run)
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only this agent's runs (id or name).
    agent: Option<String>,
    /// Only runs of this entrypoint.
    entrypoint: Option<String>,
    /// Only runs in this state.
    #[param(inline, value_type = Option<RunStatusView>)]
    status: Option<String>,
    /// Only runs with this concurrency key.
    concurrency_key: Option<String>,
    /// At most this many (1 to 500; default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^([0-9]{1,18})?$")]
    cursor: Option<String>,
}

/// Runs, newest first, a page at a time.
#[utoipa::path(get, path = "/v1/runs", tag = "runs",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of runs", body = RunList),
        (status = 403, description = "`permission_error`: a key limited to some agents must name one", body = ErrorEnvelope),
        (status = 404, description = "`agent_not_found`", body = ErrorEnvelope),
        (status = 422, description = "`validation_error`", body = ErrorEnvelope),
    ))]
pub(crate) async fn list_runs(
    State(state): State<S>,
    caller: Caller,
    q: QueryResult<ListQuery>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let who = principal(caller);
    if who.agent_limit().is_some() {
        // A key limited to some agents lists one of them at a time.
        let allowed = q
            .agent
            .as_deref()
            .and_then(|a| state.agent(a))
            .is_some_and(|a| who.allows(a));
        if !allowed {
            return Err(ApiError::new(
                ErrorCode::PermissionError,
                "this API key is limited to some agents: pass ?agent= with one of them",
            ));
        }
    }
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            invalid(
                "status",
                "queued, running, succeeded, failed, timed_out or cancelled",
                format!("unknown status `{s}`"),
            )
        })?),
    };
    let before_seq = crate::de::seq_cursor(q.cursor.as_deref())?;
    let limit = crate::de::page_limit(q.limit)?;
    // An agent given by name is stored by id.
    let agent = q.agent.map(|a| {
        state
            .agent(&a)
            .map(|x| x.config.agent_id.clone())
            .unwrap_or(a)
    });
    let runs = state
        .engine
        .store()
        .list_runs(RunQuery {
            agent,
            entrypoint: q.entrypoint,
            status,
            concurrency_key: q.concurrency_key,
            before_seq,
            limit,
        })
        .await
        .map_err(ApiError::from_store)?;
    let next_cursor = (runs.len() == limit)
        .then(|| runs.last().map(|r| r.seq.to_string()))
        .flatten();
    Ok(Json(RunList {
        runs: runs.iter().map(|r| run_view(&state, r, &who)).collect(),
        next_cursor,
    })
    .into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct WaitQuery {
    /// How long to wait, in seconds (0 to 600; default 30).
    #[param(minimum = 0.0, maximum = 600.0)]
    timeout_s: Option<f64>,
}

fn wait_for(q: &WaitQuery) -> Result<Duration, ApiError> {
    let s = q.timeout_s.unwrap_or(30.0);
    if !(s.is_finite() && (0.0..=MAX_WAIT_S).contains(&s)) {
        return Err(invalid(
            "timeout_s",
            "seconds from 0 to 600",
            "`timeout_s` must be from 0 to 600",
        ));
    }
    Ok(Duration::from_secs_f64(s))
}

/// Wait until the run is finished, or the timeout passes; answers the run either way.
#[utoipa::path(get, path = "/v1/runs/{id}/wait", tag = "runs",
    params(("id" = String, Path, description = "The run's id"), WaitQuery),
    responses(
        (status = 200, description = "The run: finished, or as it is when the wait ended", body = RunView),
        (status = 404, description = "`run_not_found`", body = ErrorEnvelope),
        (status = 422, description = "`validation_error`", body = ErrorEnvelope),
    ))]
pub(crate) async fn wait_run(
    State(state): State<S>,
    caller: Caller,
    Path(id): Path<String>,
    q: QueryResult<WaitQuery>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let who = principal(caller);
    let run = state
        .engine
        .wait(&id, wait_for(&q)?, |run| may_see(&state, &who, run))
        .await
        .map_err(ApiError::from_store)?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(run_view(&state, &run, &who)).into_response())
}

/// Enqueue a run and wait until it is finished, or the timeout passes.
#[utoipa::path(post, path = "/v1/runs/wait", tag = "runs",
    params(WaitQuery),
    request_body(content = CreateBody),
    responses(
        (status = 200, description = "The run: finished, or as it is when the wait ended", body = RunView),
        RunRefused,
    ))]
pub(crate) async fn create_and_wait(
    State(state): State<S>,
    caller: Caller,
    q: QueryResult<WaitQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let wait = wait_for(&q)?;
    let who = principal(caller);
    let run = admit(&state, &who, body)?;
    let (run, _) = state
        .engine
        .submit_and_wait(run, wait)
        .await
        .map_err(submit_error)?;
    Ok(Json(run_view(&state, &run, &who)).into_response())
}

/// Cancel a run: a queued run ends at once; a running one is asked to stop, then killed after
/// the grace period.
#[utoipa::path(post, path = "/v1/runs/{id}/cancel", tag = "runs",
    params(("id" = String, Path, description = "The run's id")),
    responses(
        (status = 200, description = "The run, cancelled or already finished", body = RunView),
        (status = 202, description = "The run is running and was asked to stop", body = RunView),
        (status = 404, description = "`run_not_found`", body = ErrorEnvelope),
    ))]
pub(crate) async fn cancel_run(
    State(state): State<S>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    use agentry_core::runs::CancelOutcome;
    let who = principal(caller);
    find_run(&state, &who, &id).await?;
    match state
        .engine
        .cancel(&id)
        .await
        .map_err(ApiError::from_store)?
    {
        CancelOutcome::Cancelled(f) => Ok(Json(run_view(&state, &f.run, &who)).into_response()),
        CancelOutcome::Requested { run, .. } => {
            Ok((StatusCode::ACCEPTED, Json(run_view(&state, &run, &who))).into_response())
        }
        CancelOutcome::AlreadyFinished(run) => {
            Ok(Json(run_view(&state, &run, &who)).into_response())
        }
        CancelOutcome::NotFound => Err(not_found(&id)),
    }
}

/// `Last-Event-ID`, for the spec (`resume_point` reads it).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct ResumeHeader {
    /// Resume after this sequence number; wins over `after`.
    #[param(
        rename = "Last-Event-ID",
        nullable = false,
        pattern = "^[ \t]*[0-9]{1,18}[ \t]*$"
    )]
    last_event_id: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// Start after this sequence number (`Last-Event-ID` wins).
    after: Option<i64>,
}

/// Where a client resumes: `Last-Event-ID` wins over `?after=`; default: from the start.
fn resume_point(headers: &HeaderMap, q: &EventsQuery) -> Result<i64, ApiError> {
    if let Some(v) = headers.get("last-event-id") {
        return v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                invalid(
                    "Last-Event-ID",
                    "an event sequence number",
                    "invalid Last-Event-ID",
                )
            });
    }
    Ok(q.after.unwrap_or(0).max(0))
}

/// The run's event log as Server-Sent Events, from `after` on, until its terminal event.
pub(crate) async fn sse_of(
    engine: &Engine,
    id: &str,
    after: i64,
    tracebacks: bool,
) -> Result<Response, ApiError> {
    let feed = engine
        .follow(id, Follow::After(after))
        .await
        .map_err(ApiError::from_store)?;
    let events = futures_util::stream::unfold(feed, move |mut feed| async move {
        let p = feed.next().await?;
        let e = &p.event;
        // A newline in an `event:` field would end the SSE frame (axum refuses it): a kind
        // stored before kinds were checked goes out with its control characters replaced.
        let kind = e.kind.as_str();
        let kind: std::borrow::Cow<'_, str> = if kind.chars().any(char::is_control) {
            kind.chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect::<String>()
                .into()
        } else {
            kind.into()
        };
        let event = Event::default()
            .id(e.seq.to_string())
            .event(kind.as_ref())
            .data(event_json(e, tracebacks));
        Some((Ok::<_, Infallible>(event), feed))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

pub(crate) type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

pub(crate) fn query<T>(q: QueryResult<T>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::new(ErrorCode::ValidationError, e.body_text()))
}

/// The run's event log as Server-Sent Events, from `Last-Event-ID` (or `after`), then live until
/// the terminal event.
#[utoipa::path(get, path = "/v1/runs/{id}/events", tag = "runs",
    params(
        ("id" = String, Path, description = "The run's id"),
        ResumeHeader,
        EventsQuery,
    ),
    responses(
        (status = 200, description = "Events: `id` is the sequence number, `event` the type, `data` the event", content_type = "text/event-stream", body = SseEvent),
        (status = 404, description = "`run_not_found`", body = ErrorEnvelope),
        (status = 422, description = "`validation_error`: a bad `Last-Event-ID` or `after`", body = ErrorEnvelope),
    ))]
pub(crate) async fn run_events(
    State(state): State<S>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: QueryResult<EventsQuery>,
) -> Result<Response, ApiError> {
    let after = resume_point(&headers, &query(q)?)?;
    let who = principal(caller);
    find_run(&state, &who, &id).await?;
    let tracebacks = who.sees_tracebacks(state.config.gateway.expose_tracebacks);
    sse_of(&state.engine, &id, after, tracebacks).await
}

/// Enqueue a run and follow its event log (Server-Sent Events) until it finishes.
#[utoipa::path(post, path = "/v1/runs/stream", tag = "runs",
    request_body(content = CreateBody),
    responses(
        (status = 200, description = "The run's events", content_type = "text/event-stream", body = SseEvent),
        RunRefused,
    ))]
pub(crate) async fn create_and_stream(
    State(state): State<S>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = principal(caller);
    let (run, _) = submit(&state, &who, body).await?;
    let tracebacks = who.sees_tracebacks(state.config.gateway.expose_tracebacks);
    sse_of(&state.engine, &run.id, 0, tracebacks).await
}

/// The run's event log over a WebSocket: one text frame per event, then close.
#[utoipa::path(get, path = "/v1/runs/{id}/events/ws", tag = "runs",
    params(("id" = String, Path, description = "The run's id"), EventsQuery),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 404, description = "`run_not_found`", body = ErrorEnvelope),
        (status = 426, description = "`upgrade_required`: not a WebSocket handshake", body = ErrorEnvelope),
        (status = 422, description = "`validation_error`", body = ErrorEnvelope),
    ))]
pub(crate) async fn run_events_ws(
    State(state): State<S>,
    caller: Caller,
    request_id: Option<Extension<RequestId>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: QueryResult<EventsQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let after = resume_point(&headers, &query(q)?)?;
    let who = principal(caller);
    find_run(&state, &who, &id).await?;
    let engine = state.engine.clone();
    let tracebacks = who.sees_tracebacks(state.config.gateway.expose_tracebacks);
    let request_id = crate::request_id::of(request_id);
    let upgraded = ws
        .map_err(upgrade_required)?
        .max_message_size(64 * 1024)
        .max_frame_size(64 * 1024)
        .on_upgrade(move |socket| ws_follow(socket, engine, id, after, tracebacks, request_id));
    Ok(crate::request_id::with_header(upgraded, request_id))
}

pub(crate) async fn ws_follow(
    mut socket: WebSocket,
    engine: Engine,
    id: String,
    after: i64,
    tracebacks: bool,
    request_id: RequestId,
) {
    let mut feed = match engine.follow(&id, Follow::After(after)).await {
        Ok(feed) => feed,
        Err(e) => {
            let body = ApiError::from_store(e)
                .body(request_id.as_str())
                .to_string();
            let _ = socket.send(Message::Text(body.into())).await;
            let _ = socket.send(Message::Close(None)).await;
            return;
        }
    };
    loop {
        tokio::select! {
            p = feed.next() => match p {
                Some(p) => {
                    if socket.send(Message::Text(event_json(&p.event, tracebacks).into())).await.is_err() {
                        break;
                    }
                }
                None => {
                    let _ = socket.send(Message::Close(None)).await;
                    break;
                }
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                _ => {}
            },
        }
    }
}
