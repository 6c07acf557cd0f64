//! The native API (`docs/api.md`): agents and their entrypoints with schemas and docs, and
//! invoke / stream (SSE) / WebSocket calls. JSON in, JSON out; every error is the one envelope
//! of `crate::error`. An agent is named by its id or its name.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use agentry_core::ErrorCode;
use agentry_core::agent::Arguments;
use agentry_core::executor::ChunkStream;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use utoipa::{IntoParams, IntoResponses, ToSchema};

use crate::auth::{Caller, principal};
use crate::de::body_or_error;
use crate::error::{ApiError, upgrade_required, ws_read_close_code};
use crate::request_id::RequestId;
use crate::state::{Agent, AppState};
use crate::views::{ErrorEnvelope, InvokeResponse, SseEvent};

type S = Arc<AppState>;

/// Any route under `/v1` that is not one.
pub(crate) async fn no_such_route() -> ApiError {
    ApiError::new(
        ErrorCode::AgentNotFound,
        "no such route in the native API; see GET /v1/agents",
    )
    .with_details(json!({"hint": "routes are listed in docs/api.md"}))
}

/// An agent as the API shows it.
#[derive(Serialize, ToSchema)]
#[schema(as = Agent)]
pub struct AgentView<'a> {
    id: &'a str,
    name: &'a str,
    description: &'a str,
    framework: &'a str,
    version: &'a str,
    python: PythonView<'a>,
    workers: WorkersView,
    entrypoints: Vec<EntrypointView<'a>>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = Python)]
struct PythonView<'a> {
    #[schema(value_type = String)]
    executable: &'a std::path::Path,
    version: &'a str,
    chosen_because: &'a str,
}

#[derive(Serialize, ToSchema)]
#[schema(as = Workers)]
struct WorkersView {
    live: usize,
    /// Why the agent's workers are held back after crashing in a row; null when healthy.
    crash_loop: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = Entrypoint)]
struct EntrypointView<'a> {
    tag: &'a str,
    streaming: bool,
    /// `function`, `coroutine`, `generator` or `asyncgen`; null until a worker reported.
    kind: Option<&'a str>,
    doc: Option<&'a str>,
    /// JSON Schema of the keyword arguments.
    #[schema(value_type = Option<Object>)]
    input_schema: Option<&'a Value>,
    accepts_args: Option<bool>,
    timeout_s: Option<f64>,
}

/// The list of agents.
#[derive(Serialize, ToSchema)]
pub struct AgentList<'a> {
    agents: Vec<AgentView<'a>>,
}

fn agent_view(agent: &Agent) -> AgentView<'_> {
    let c = &agent.config;
    AgentView {
        id: &c.agent_id,
        name: &c.agent_name,
        description: &c.description,
        framework: &c.framework,
        version: &c.version,
        python: PythonView {
            executable: &agent.runtime.executable,
            version: &agent.runtime.version,
            chosen_because: &agent.runtime.reason,
        },
        workers: {
            let health = agent.executor.health();
            WorkersView {
                live: health.live_workers,
                crash_loop: health.crash_loop,
            }
        },
        entrypoints: c
            .entrypoints
            .iter()
            .map(|e| {
                let report = agent.executor.entrypoint(&e.tag);
                EntrypointView {
                    tag: &e.tag,
                    streaming: e.is_streaming(),
                    kind: report.map(|r| r.kind.as_str()),
                    doc: report.and_then(|r| r.doc.as_deref()),
                    input_schema: report.map(|r| &r.schema),
                    accepts_args: report.map(|r| r.var_args || !r.positional_only.is_empty()),
                    timeout_s: e.timeout_s,
                }
            })
            .collect(),
    }
}

/// The agents served here, with their entrypoints, parameter schemas and docstrings.
#[utoipa::path(get, path = "/v1/agents", tag = "agents",
    responses((status = 200, description = "The agents served here", body = AgentList)))]
pub(crate) async fn list_agents(State(state): State<S>, caller: Caller) -> Response {
    // A key limited to some agents sees only those.
    let who = principal(caller);
    Json(AgentList {
        agents: state
            .agents
            .iter()
            .filter(|a| who.allows(a))
            .map(|a| agent_view(a))
            .collect(),
    })
    .into_response()
}

pub(crate) fn find_agent<'a>(state: &'a S, key: &str) -> Result<&'a Arc<Agent>, ApiError> {
    state
        .agent(key)
        .ok_or_else(|| crate::error::agent_not_found(key))
}

/// One agent, by id or name.
#[utoipa::path(get, path = "/v1/agents/{agent}", tag = "agents",
    params(("agent" = String, Path, description = "The agent's id or name")),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 404, description = "`agent_not_found`", body = ErrorEnvelope),
    ))]
pub(crate) async fn get_agent(
    State(state): State<S>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(agent_view(find_agent(&state, &key)?)).into_response())
}

/// The error answers invoke and stream share: refusals before the call, and the call's end
/// before any output (a stream's later failures are `error` events). The body limit's 413 is
/// added to every operation with a body.
#[derive(IntoResponses)]
#[allow(dead_code)]
enum CallRefused {
    /// `wrong_entrypoint_kind`: a streaming tag on invoke, or the reverse
    #[response(status = 400)]
    WrongKind(ErrorEnvelope),
    /// `agent_not_found`, `entrypoint_not_found`
    #[response(status = 404)]
    NotFound(ErrorEnvelope),
    /// `validation_error`: the arguments do not match the entrypoint's parameters
    #[response(status = 422)]
    Invalid(ErrorEnvelope),
    /// `unavailable`: no worker can take the call
    #[response(status = 503)]
    Unavailable(ErrorEnvelope),
    /// `timeout_error`: the deadline passed (waiting for a worker counts)
    #[response(status = 504)]
    Timeout(ErrorEnvelope),
}

/// The path of the invoke, stream and WebSocket routes.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub(crate) struct EntrypointPath {
    /// The agent's id or name.
    agent: String,
    /// The entrypoint's tag.
    tag: String,
}

/// The body of invoke, stream and the WebSocket start frame.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CallRequest)]
pub(crate) struct CallBody<'a> {
    /// Keyword arguments, checked against the entrypoint's parameters.
    #[serde(borrow, default)]
    #[schema(value_type = Option<Object>)]
    input: Option<&'a RawValue>,
    /// Positional arguments, in the order of the entrypoint's parameters.
    #[serde(borrow, default)]
    #[schema(value_type = Option<Vec<Value>>)]
    args: Option<&'a RawValue>,
    /// Deadline for this call, in seconds (capped by the server's maximum).
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0)]
    timeout_s: Option<f64>,
}

struct Call {
    agent: Arc<Agent>,
    tag: String,
    args: String,
    kwargs: String,
    timeout: Duration,
}

fn prepare(
    state: &S,
    key: &str,
    tag: &str,
    body: &[u8],
    want_stream: Option<bool>,
) -> Result<Call, ApiError> {
    let agent = find_agent(state, key)?;
    let Some(entrypoint) = agent.config.entrypoint(tag) else {
        return Err(crate::error::entrypoint_not_found(
            &agent.config.agent_name,
            tag,
        ));
    };
    match want_stream {
        Some(true) if !entrypoint.is_streaming() => {
            return Err(ApiError::new(
                ErrorCode::WrongEntrypointKind,
                format!(
                    "entrypoint `{tag}` is not streaming (its tag does not end in `_stream`); use .../invoke"
                ),
            ));
        }
        Some(false) if entrypoint.is_streaming() => {
            return Err(ApiError::new(
                ErrorCode::WrongEntrypointKind,
                format!("entrypoint `{tag}` is streaming; use .../stream (SSE) or .../ws"),
            ));
        }
        _ => {}
    }
    let parsed: CallBody<'_> = if body.is_empty() {
        CallBody {
            input: None,
            args: None,
            timeout_s: None,
        }
    } else {
        crate::de::object_body(body)?
    };
    let kwargs = match parsed.input {
        None => "{}",
        Some(raw) if raw.get() == "null" => "{}",
        Some(raw) => raw.get(),
    };
    let args = match parsed.args {
        None => "[]",
        Some(raw) if raw.get() == "null" => "[]",
        Some(raw) => raw.get(),
    };
    let Arguments { args, kwargs } = agent
        .conform(tag, args, kwargs)
        .map_err(|e| crate::error::arguments_rejected(tag, e))?;
    if let Some(t) = parsed.timeout_s
        && !(t.is_finite() && t > 0.0)
    {
        return Err(ApiError::new(
            ErrorCode::ValidationError,
            "`timeout_s` must be a positive number of seconds",
        )
        .with_details(json!({"errors": [{"path": "timeout_s", "expected": "positive number"}]})));
    }
    Ok(Call {
        agent: Arc::clone(agent),
        tag: tag.to_string(),
        args,
        kwargs,
        timeout: state
            .config
            .workers
            .call_timeout(parsed.timeout_s, entrypoint.timeout_s),
    })
}

/// Call a non-streaming entrypoint and wait for its result.
#[utoipa::path(post, path = "/v1/agents/{agent}/entrypoints/{tag}/invoke", tag = "invoke",
    params(EntrypointPath),
    request_body(content = CallBody, description = "The call's arguments"),
    responses(
        (status = 200, description = "The entrypoint's return value", body = InvokeResponse),
        CallRefused,
        (status = 500, description = "`agent_error`: the Python code raised", body = ErrorEnvelope),
        (status = 502, description = "`agent_crashed`", body = ErrorEnvelope),
    ))]
pub(crate) async fn invoke(
    State(state): State<S>,
    caller: Caller,
    Path(EntrypointPath { agent: key, tag }): Path<EntrypointPath>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_or_error(body, state.config.http.max_body_bytes)?;
    let call = prepare(&state, &key, &tag, &body, Some(false))?;
    let payload = call
        .agent
        .executor
        .call(&call.tag, &call.args, &call.kwargs, call.timeout)
        .await
        .map_err(|e| {
            ApiError::from_call(
                e,
                principal(caller).sees_tracebacks(state.config.gateway.expose_tracebacks),
            )
        })?;
    let mut out = String::with_capacity(payload.json.len() + 12);
    out.push_str("{\"output\":");
    out.push_str(payload.as_str());
    out.push('}');
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        out,
    )
        .into_response())
}

/// Call a streaming (`_stream`) entrypoint: Server-Sent Events, `chunk` events then `done`,
/// or `error`.
#[utoipa::path(post, path = "/v1/agents/{agent}/entrypoints/{tag}/stream", tag = "invoke",
    params(EntrypointPath),
    request_body(content = CallBody, description = "The call's arguments"),
    responses(
        (status = 200, description = "`chunk` events, then one `done` or `error` event", content_type = "text/event-stream", body = SseEvent),
        CallRefused,
    ))]
pub(crate) async fn stream(
    State(state): State<S>,
    caller: Caller,
    request_id: Option<Extension<RequestId>>,
    Path(EntrypointPath { agent: key, tag }): Path<EntrypointPath>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request_id = crate::request_id::of(request_id);
    let body = body_or_error(body, state.config.http.max_body_bytes)?;
    let call = prepare(&state, &key, &tag, &body, Some(true))?;
    let expose = principal(caller).sees_tracebacks(state.config.gateway.expose_tracebacks);
    // Errors before the first byte (no worker, deadline while queued) are plain HTTP errors.
    let calls = call
        .agent
        .executor
        .stream(&call.tag, &call.args, &call.kwargs, call.timeout)
        .await
        .map_err(|e| ApiError::from_call(e, expose))?;
    let events = futures_util::stream::unfold(Some((calls, 0u64)), move |st| async move {
        let (mut calls, n) = st?;
        match calls.next().await {
            Some(Ok(payload)) => {
                let event = Event::default()
                    .event("chunk")
                    .id(n.to_string())
                    .data(payload.as_str());
                Some((Ok::<_, Infallible>(event), Some((calls, n + 1))))
            }
            Some(Err(e)) => {
                let body = ApiError::from_call(e, expose).body(request_id.as_str());
                Some((
                    Ok(Event::default().event("error").data(body.to_string())),
                    None,
                ))
            }
            None => {
                let total = calls.total().map_or(n, u64::from);
                Some((
                    Ok(Event::default()
                        .event("done")
                        .data(json!({"chunks": total}).to_string())),
                    None,
                ))
            }
        }
    });
    // Later `error` events name this id: the answer's header says it.
    let sse = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    Ok(crate::request_id::with_header(sse, request_id))
}

/// Call any entrypoint over a WebSocket: send one start frame (the invoke body); receive
/// `chunk` frames then `done`, or one `result`, or `error`.
#[utoipa::path(get, path = "/v1/agents/{agent}/entrypoints/{tag}/ws", tag = "invoke",
    params(EntrypointPath),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 404, description = "`agent_not_found`, `entrypoint_not_found`", body = ErrorEnvelope),
        (status = 426, description = "`upgrade_required`: not a WebSocket handshake", body = ErrorEnvelope),
    ))]
pub(crate) async fn ws(
    State(state): State<S>,
    caller: Caller,
    request_id: Option<Extension<RequestId>>,
    Path(EntrypointPath { agent: key, tag }): Path<EntrypointPath>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // Unknown agents and tags are refused before the upgrade, with a normal HTTP error.
    let agent = Arc::clone(find_agent(&state, &key)?);
    if agent.config.entrypoint(&tag).is_none() {
        return Err(crate::error::entrypoint_not_found(
            &agent.config.agent_name,
            &tag,
        ));
    }
    let limit = state.config.http.max_body_bytes;
    let expose = principal(caller).sees_tracebacks(state.config.gateway.expose_tracebacks);
    let request_id = crate::request_id::of(request_id);
    let upgraded = upgrade
        .map_err(upgrade_required)?
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| ws_session(socket, state, key, tag, expose, request_id));
    Ok(crate::request_id::with_header(upgraded, request_id))
}

pub(crate) async fn ws_session(
    socket: WebSocket,
    state: S,
    key: String,
    tag: String,
    expose: bool,
    request_id: RequestId,
) {
    let ws_error = |err: &ApiError| ws_error(err, request_id);
    let (mut sender, mut receiver) = socket.split();
    let start =
        match tokio::time::timeout(state.config.http.ws_start_timeout(), receiver.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => Bytes::from(t.as_str().to_owned()),
            Ok(Some(Ok(Message::Binary(b)))) => b,
            Err(_) => {
                let err = ApiError::new(
                    ErrorCode::ValidationError,
                    "no start frame received in time",
                );
                finish(&mut sender, ws_error(&err), 1008).await;
                return;
            }
            Ok(Some(Err(e))) => {
                let code = ws_read_close_code(&e);
                let err = if code == 1009 {
                    ApiError::new(
                        ErrorCode::PayloadTooLarge,
                        format!(
                            "the start frame is larger than the limit of {} bytes",
                            state.config.http.max_body_bytes
                        ),
                    )
                } else {
                    ApiError::new(
                        ErrorCode::ValidationError,
                        format!("bad WebSocket frame: {e}"),
                    )
                };
                finish(&mut sender, ws_error(&err), code).await;
                return;
            }
            _ => return, // closed before starting
        };
    let call = match prepare(&state, &key, &tag, &start, None) {
        Ok(c) => c,
        Err(e) => {
            finish(&mut sender, ws_error(&e), 1008).await;
            return;
        }
    };
    if !call
        .agent
        .config
        .entrypoint(&tag)
        .is_some_and(|e| e.is_streaming())
    {
        let result = tokio::select! {
            r = call.agent.executor.call(&call.tag, &call.args, &call.kwargs, call.timeout) => r,
            _ = wait_closed(&mut receiver) => return,
        };
        let frame = match result {
            Ok(p) => format!("{{\"type\":\"result\",\"output\":{}}}", p.as_str()),
            Err(e) => ws_error(&ApiError::from_call(e, expose)),
        };
        finish(&mut sender, frame, 1000).await;
        return;
    }
    let mut calls: Box<dyn ChunkStream> = match call
        .agent
        .executor
        .stream(&call.tag, &call.args, &call.kwargs, call.timeout)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            finish(&mut sender, ws_error(&ApiError::from_call(e, expose)), 1000).await;
            return;
        }
    };
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            item = calls.next() => match item {
                Some(Ok(p)) => {
                    n += 1;
                    let frame = format!("{{\"type\":\"chunk\",\"data\":{}}}", p.as_str());
                    if sender.send(Message::Text(frame.into())).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    finish(&mut sender, ws_error(&ApiError::from_call(e, expose)), 1000).await;
                    return;
                }
                None => {
                    let total = calls.total().map_or(n, u64::from);
                    finish(&mut sender, json!({"type": "done", "chunks": total}).to_string(), 1000).await;
                    return;
                }
            },
            _ = wait_closed(&mut receiver) => return, // dropping `calls` cancels the generator
        }
    }
}

pub(crate) async fn wait_closed(receiver: &mut futures_util::stream::SplitStream<WebSocket>) {
    loop {
        match receiver.next().await {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
            Some(Ok(_)) => {}
        }
    }
}

fn ws_error(err: &ApiError, request_id: RequestId) -> String {
    let mut body = err.body(request_id.as_str());
    body["type"] = Value::String("error".into());
    body.to_string()
}

pub(crate) async fn finish(
    sender: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    frame: String,
    code: u16,
) {
    let _ = sender.send(Message::Text(frame.into())).await;
    let _ = sender
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: "".into(),
        })))
        .await;
}
