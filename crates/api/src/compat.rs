//! RunAgent 0.1.49's local-server protocol, served exactly (`spec/runagent-compat.md` §5):
//! the same routes with the agent id in the path, the same envelopes and status codes,
//! FastAPI-shaped 422s, and the double-encoded `{type, payload}` strings. RunAgent's SDKs work
//! against these routes unchanged. Where RunAgent blocks or leaks we do not: sync generators
//! run in their worker, and the WebSocket is closed with 1000 after the terminal frame.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use agentry_core::executor::{CallError, ChunkStream, Payload};
use agentry_core::{Invocation, InvocationHistory};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use yawc::close::CloseCode;
use yawc::{Frame, OpCode};

use crate::auth::{Caller, principal};
use crate::pyjson::{push_json_str, python_json_error, structured};
use crate::request_id::{self, RequestId};
use crate::state::{Agent, AppState};

type S = Arc<AppState>;

/// Routes whose paths carry one agent's id literally, as RunAgent's do. Any other id falls
/// through to the 404 (HTTP) or the 403 (WebSocket) RunAgent gives.
pub fn agent_routes(state: &AppState, agent: &Arc<Agent>) -> Router<S> {
    let id = &agent.config.agent_id;
    let a = Arc::clone(agent);
    // `client_info` of this agent's history rows: the same for every call.
    let client_info: Arc<str> = json!({
        "server_host": state.bound.ip().to_string(),
        "server_port": state.bound.port(),
        "agent_name": agent.config.agent_name, "agent_framework": agent.config.framework,
    })
    .to_string()
    .into();
    let run = post(
        move |State(s): State<S>,
              id: Option<Extension<RequestId>>,
              body: Result<Bytes, BytesRejection>| {
            let a = Arc::clone(&a);
            let client_info = Arc::clone(&client_info);
            async move { run(s, a, client_info, request_id::of(id), body).await }
        },
    )
    .fallback(|| async { method_not_allowed("POST") });
    let a = Arc::clone(agent);
    let stream = get(
        move |State(s): State<S>,
              headers: axum::http::HeaderMap,
              upgrade: Result<yawc::IncomingUpgrade, StatusCode>| {
            let a = Arc::clone(&a);
            async move { stream_upgrade(s, a, &headers, upgrade) }
        },
    );
    let a = Arc::clone(agent);
    let architecture = get(move |id: Option<Extension<RequestId>>| {
        let a = Arc::clone(&a);
        async move { architecture(&a, request_id::of(id)) }
    });
    let a = Arc::clone(agent);
    let invocations = get(
        move |State(s): State<S>,
              id: Option<Extension<RequestId>>,
              q: Query<Vec<(String, String)>>| {
            let a = Arc::clone(&a);
            async move { invocations(s, a, q.0, request_id::of(id)).await }
        },
    );
    let a = Arc::clone(agent);
    let stats = get(
        move |State(s): State<S>, id: Option<Extension<RequestId>>| {
            let a = Arc::clone(&a);
            async move { invocation_stats(s, a, request_id::of(id)).await }
        },
    );
    Router::new()
        .route(&format!("/api/v1/agents/{id}/run"), run)
        .route(&format!("/api/v1/agents/{id}/run-stream"), stream)
        .route(&format!("/api/v1/agents/{id}/architecture"), architecture)
        .route(&format!("/api/v1/agents/{id}/invocations"), invocations)
        .route(&format!("/api/v1/agents/{id}/invocations/stats"), stats)
}

/// Agent-less RunAgent routes.
pub fn routes() -> Router<S> {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1", get(info))
        .route("/api/v1/invocations/{invocation_id}", get(invocation))
        // A WebSocket to an agent id we do not serve: RunAgent refuses the handshake with 403.
        .route(
            "/api/v1/agents/{agent_id}/run-stream",
            get(|| async { StatusCode::FORBIDDEN }),
        )
        // Anything else under RunAgent's prefix: its 404, behind the same gate as its routes.
        .route("/api/v1/{*rest}", axum::routing::any(not_found))
}

/// The most invocations one history request returns.
const MAX_HISTORY_PAGE: i64 = 1000;

/// Starlette's 404.
pub async fn not_found() -> Response {
    detail(StatusCode::NOT_FOUND, "Not Found")
}

fn method_not_allowed(allow: &'static str) -> Response {
    let mut r = detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

fn detail(status: StatusCode, text: &str) -> Response {
    json_response(status, json!({ "detail": text }).to_string())
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// `AgentRunResponseMinimal` with `success: false`.
fn error_envelope(status: StatusCode, code: &str, message: &str, id: RequestId) -> Response {
    let mut body = String::with_capacity(message.len() + 200);
    body.push_str("{\"success\":false,\"data\":null,\"message\":null,\"error\":{\"code\":");
    push_json_str(&mut body, code);
    body.push_str(",\"message\":");
    push_json_str(&mut body, message);
    body.push_str(",\"details\":null,\"field\":null},");
    push_stamp(&mut body, id);
    request_id::with_header(json_response(status, body), id)
}

/// `"timestamp": …, "request_id": …}` closing every RunAgent envelope: the request's id, as
/// in its `x-request-id` header.
fn push_stamp(body: &mut String, id: RequestId) {
    body.push_str("\"timestamp\":\"");
    body.push_str(&agentry_core::time::python_now_isoformat());
    // The id is ASCII without quotes or backslashes: it needs no escaping.
    body.push_str("\",\"request_id\":\"");
    body.push_str(id.as_str());
    body.push_str("\"}");
}

// ---------------------------------------------------------------------------------------------
// POST /api/v1/agents/{agent_id}/run
// ---------------------------------------------------------------------------------------------

/// The fields of `AgentRunRequest` we read, borrowed from the body. SDKs send more
/// (`timeout_seconds`, `async_execution`, `user_id`, `persistent_memory`, …); `timeout_seconds`
/// is honoured and `user_id` is kept on the invocation record.
#[derive(Deserialize)]
struct RawRunRequest<'a> {
    #[serde(borrow)]
    entrypoint_tag: Option<&'a RawValue>,
    #[serde(borrow)]
    input_args: Option<&'a RawValue>,
    #[serde(borrow)]
    input_kwargs: Option<&'a RawValue>,
    #[serde(borrow)]
    timeout_seconds: Option<&'a RawValue>,
    #[serde(borrow)]
    user_id: Option<&'a RawValue>,
}

/// A validated run request: the tag, and the arguments as JSON text to pass through.
pub(crate) struct RunRequest<'a> {
    pub tag: Cow<'a, str>,
    pub args: Cow<'a, str>,
    pub kwargs: Cow<'a, str>,
    pub timeout_s: Option<f64>,
    /// RunAgent's SDKs send the caller's `user_id`; RunAgent's server ignores it, we keep it in
    /// the history row's `client_info`.
    pub user_id: Option<String>,
}

/// A `user_id` the SDK sent, if it is a string (anything else is ignored, as RunAgent does).
fn user_id_of(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_owned)
}

fn starts_with(raw: &RawValue, c: u8) -> bool {
    raw.get().as_bytes().first() == Some(&c)
}

/// Parses and validates the body as FastAPI + pydantic v2 would, producing FastAPI's 422 body
/// (`{"detail": [{type, loc, msg, input}]}`) on failure.
fn parse_run_request(body: &[u8]) -> Result<RunRequest<'_>, Response> {
    if body.is_empty() {
        return Err(fastapi_422(vec![
            json!({"type": "missing", "loc": ["body"], "msg": "Field required", "input": null}),
        ]));
    }
    match serde_json::from_slice::<RawRunRequest<'_>>(body) {
        Ok(raw) => {
            if let (Some(tag), args, kwargs) =
                (raw.entrypoint_tag, raw.input_args, raw.input_kwargs)
                && starts_with(tag, b'"')
                && args.is_none_or(|a| starts_with(a, b'['))
                && kwargs.is_none_or(|k| starts_with(k, b'{'))
                && let Ok(tag) = serde_json::from_str::<Cow<'_, str>>(tag.get())
            {
                return Ok(RunRequest {
                    tag,
                    args: Cow::Borrowed(args.map_or("[]", |a| a.get())),
                    kwargs: Cow::Borrowed(kwargs.map_or("{}", |k| k.get())),
                    timeout_s: raw
                        .timeout_seconds
                        .and_then(|t| t.get().parse::<f64>().ok()),
                    user_id: raw
                        .user_id
                        .and_then(|u| serde_json::from_str::<String>(u.get()).ok()),
                });
            }
            // Some field has the wrong type or is missing: describe it from the parsed value.
            validate_value(serde_json::from_slice::<Value>(body).unwrap_or(Value::Null))
        }
        Err(e) if e.is_data() => match serde_json::from_slice::<Value>(body) {
            Ok(value) => validate_value(value),
            Err(e) => Err(json_invalid(body, &e)),
        },
        Err(e) => Err(json_invalid(body, &e)),
    }
}

fn json_invalid(body: &[u8], e: &serde_json::Error) -> Response {
    let text = String::from_utf8_lossy(body);
    let err = python_json_error(&text, e);
    fastapi_422(vec![json!({
        "type": "json_invalid", "loc": ["body", err.pos], "msg": "JSON decode error",
        "input": {}, "ctx": {"error": err.msg},
    })])
}

/// The slow path: pydantic's checks on a parsed body, in field order.
fn validate_value(value: Value) -> Result<RunRequest<'static>, Response> {
    let Value::Object(obj) = &value else {
        return Err(fastapi_422(vec![json!({
            "type": "model_attributes_type", "loc": ["body"],
            "msg": "Input should be a valid dictionary or object to extract fields from", "input": value,
        })]));
    };
    let mut errors = Vec::new();
    let tag = match obj.get("entrypoint_tag") {
        None => {
            errors.push(json!({"type": "missing", "loc": ["body", "entrypoint_tag"], "msg": "Field required", "input": value}));
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            errors.push(json!({"type": "string_type", "loc": ["body", "entrypoint_tag"], "msg": "Input should be a valid string", "input": other}));
            None
        }
    };
    let args = match obj.get("input_args") {
        None => Some("[]".to_string()),
        Some(v @ Value::Array(_)) => Some(v.to_string()),
        Some(other) => {
            errors.push(json!({"type": "list_type", "loc": ["body", "input_args"], "msg": "Input should be a valid list", "input": other}));
            None
        }
    };
    let kwargs = match obj.get("input_kwargs") {
        None => Some("{}".to_string()),
        Some(v @ Value::Object(_)) => Some(v.to_string()),
        Some(other) => {
            errors.push(json!({"type": "dict_type", "loc": ["body", "input_kwargs"], "msg": "Input should be a valid dictionary", "input": other}));
            None
        }
    };
    match (tag, args, kwargs) {
        (Some(tag), Some(args), Some(kwargs)) if errors.is_empty() => Ok(RunRequest {
            tag: Cow::Owned(tag),
            args: Cow::Owned(args),
            kwargs: Cow::Owned(kwargs),
            timeout_s: obj.get("timeout_seconds").and_then(Value::as_f64),
            user_id: user_id_of(obj.get("user_id")),
        }),
        _ => Err(fastapi_422(errors)),
    }
}

fn fastapi_422(errors: Vec<Value>) -> Response {
    json_response(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({ "detail": errors }).to_string(),
    )
}

fn body_rejection(rejection: BytesRejection, limit: usize) -> Response {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        detail(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("Request body is larger than the limit of {limit} bytes"),
        )
    } else {
        detail(rejection.status(), &rejection.body_text())
    }
}

async fn run(
    state: S,
    agent: Arc<Agent>,
    client_info: Arc<str>,
    id: RequestId,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return body_rejection(rejection, state.config.http.max_body_bytes),
    };
    let req = match parse_run_request(&body) {
        Ok(r) => r,
        Err(response) => return response,
    };
    let Some(entrypoint) = agent.config.entrypoint(&req.tag) else {
        return error_envelope(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("Entrypoint {} not found", req.tag),
            id,
        );
    };
    if entrypoint.is_streaming() {
        return error_envelope(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            &format!(
                "Can't use Streaming Entrypoint `{}` through non-streaming endpoint.",
                req.tag
            ),
            id,
        );
    }
    let timeout = state
        .config
        .workers
        .call_timeout(req.timeout_s, entrypoint.timeout_s);
    let started = Instant::now();
    let request_ts = chrono::Utc::now().naive_utc();
    let result = agent
        .executor
        .call(&req.tag, &req.args, &req.kwargs, timeout)
        .await;
    let response = match &result {
        Ok(payload) => {
            let data = structured(payload.ty.as_str(), payload.as_str());
            let mut body = String::with_capacity(data.len() + data.len() / 4 + 160);
            body.push_str("{\"success\":true,\"data\":");
            push_json_str(&mut body, &data);
            body.push_str(
                ",\"message\":\"Agent execution completed successfully\",\"error\":null,",
            );
            push_stamp(&mut body, id);
            // A success is not an error: its envelope's id needs no header (RunAgent sends
            // none), which spares the invoke path the header.
            json_response(StatusCode::OK, body)
        }
        Err(e) => {
            let (code, prefix) = envelope_code(e);
            let message = format!(
                "Agent execution failed: Server error running agent {}: {prefix}{}",
                agent.config.agent_id,
                e.runagent_text()
            );
            error_envelope(StatusCode::OK, code, &message, id)
        }
    };
    if let Some(log) = &state.history {
        log.record(invocation_record(
            &agent,
            &req,
            request_ts,
            started,
            &result,
            "local_server",
            client_info.to_string(),
        ));
    }
    response
}

/// The envelope code for a failure: RunAgent only knows agent exceptions (`INTERNAL_ERROR`);
/// our deadlines, crashes and overload get codes of their own in the same envelope.
fn envelope_code(e: &CallError) -> (&'static str, &'static str) {
    match e {
        CallError::Agent { .. } => ("INTERNAL_ERROR", ""),
        CallError::Timeout(_) => ("TIMEOUT", ""),
        CallError::Crashed(_) => ("AGENT_CRASHED", ""),
        CallError::Unavailable(_) => ("SERVICE_UNAVAILABLE", ""),
        CallError::Cancelled => ("CANCELLED", ""),
        CallError::NoSuchEntrypoint(_) => ("NOT_FOUND", ""),
    }
}

fn invocation_record(
    agent: &Agent,
    req: &RunRequest<'_>,
    request_ts: chrono::NaiveDateTime,
    started: Instant,
    result: &Result<Payload, CallError>,
    sdk_type: &'static str,
    mut client_info: String,
) -> Invocation {
    let elapsed = started.elapsed();
    if let Some(user) = &req.user_id
        && client_info.ends_with('}')
    {
        client_info.pop();
        client_info.push_str(if client_info.len() > 1 {
            ", \"user_id\": "
        } else {
            "\"user_id\": "
        });
        push_json_str(&mut client_info, user);
        client_info.push('}');
    }
    let (status, output, error) = match result {
        Ok(p) => ("completed", Some(p.as_str().to_string()), None),
        Err(e) => (
            "failed",
            None,
            Some(format!(
                "Server error running agent {}: {}",
                agent.config.agent_id,
                e.runagent_text()
            )),
        ),
    };
    Invocation {
        // Time-ordered ids: the history table's primary key grows at its end instead of at
        // random pages (RunAgent's ids are UUIDv4; clients treat them as opaque UUIDs).
        invocation_id: uuid::Uuid::now_v7().to_string(),
        agent_id: agent.config.agent_id.clone(),
        input_data: format!(
            "{{\"input_args\": {}, \"input_kwargs\": {}}}",
            req.args, req.kwargs
        ),
        output_data: output,
        error_detail: error,
        request_timestamp: request_ts,
        response_timestamp: request_ts + chrono::Duration::from_std(elapsed).unwrap_or_default(),
        execution_time_ms: elapsed.as_secs_f64() * 1000.0,
        status,
        entrypoint_tag: req.tag.to_string(),
        sdk_type,
        client_info,
    }
}

// ---------------------------------------------------------------------------------------------
// WS /api/v1/agents/{agent_id}/run-stream
// ---------------------------------------------------------------------------------------------

/// Python's `str()` of a JSON value, for RunAgent's "Entrypoint {tag} not found" message.
fn python_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        other => other.to_string(),
    }
}

/// This route's socket. It is yawc's rather than axum's (tungstenite's) because RunAgent's
/// server (uvicorn's `websockets`) accepts a client's `permessage-deflate` offer and
/// compresses every message, and RunAgent's TypeScript SDK depends on that: its Node client
/// stops reading at `stream_completed` and drops chunks that arrived in the same read, which
/// cannot happen when `ws` has to inflate each message on its own turn. So the extension is
/// negotiated whenever it is offered and every message is compressed (no size threshold).
type CompatSocket = yawc::WebSocket<yawc::HttpStream>;
type Tx = SplitSink<CompatSocket, Frame>;
type Rx = SplitStream<CompatSocket>;

fn stream_upgrade(
    state: S,
    agent: Arc<Agent>,
    headers: &axum::http::HeaderMap,
    upgrade: Result<yawc::IncomingUpgrade, StatusCode>,
) -> Response {
    let asks_for_websocket = headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let upgrade = match upgrade {
        Ok(u) if asks_for_websocket => u,
        _ => return (StatusCode::BAD_REQUEST, "expected a WebSocket upgrade").into_response(),
    };
    // yawc refuses a message whose size *reaches* its limit; ours is inclusive.
    let limit = state.config.http.max_body_bytes.saturating_add(1);
    let options = yawc::Options::default()
        .with_limits(limit, limit)
        .with_no_delay()
        .with_compression_level(yawc::CompressionLevel::fast());
    let (response, socket) = match upgrade.upgrade(options) {
        Ok(pair) => pair,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    tokio::spawn(async move {
        if let Ok(socket) = socket.await {
            stream_session(socket, state, agent).await;
        }
    });
    response.map(axum::body::Body::new)
}

async fn close_with<T: futures_util::Sink<Frame> + Unpin>(sender: &mut T, code: u16) {
    let _ = sender.send(Frame::close(CloseCode::from(code), b"")).await;
}

/// Sends the pre-start error frame (compact JSON, key `detail`) and closes with 1003.
async fn refuse<T: futures_util::Sink<Frame> + Unpin>(sender: &mut T, text: &str) {
    let frame = json!({"type": "error", "detail": text}).to_string();
    let _ = sender.send(Frame::text(frame)).await;
    close_with(sender, 1003).await;
}

/// The next data message, past the control frames yawc answers itself. `None`: the client
/// closed, or sent what yawc refused (too big, broken).
async fn next_message(receiver: &mut Rx) -> Option<Frame> {
    loop {
        let frame = receiver.next().await?;
        match frame.opcode() {
            OpCode::Text | OpCode::Binary => return Some(frame),
            OpCode::Close => return None,
            _ => continue,
        }
    }
}

/// The start message, read before the socket is split: yawc answers a close, or a message it
/// refuses (1009 too big, 1002 broken, as the websockets library under RunAgent does), with a
/// close frame that only the whole socket's `poll_ready` writes out, so that is done here.
async fn start_message(socket: &mut CompatSocket) -> Option<Frame> {
    let message = loop {
        match socket.next_frame().await {
            Ok(f) if matches!(f.opcode(), OpCode::Text | OpCode::Binary) => break Some(f),
            Ok(f) if f.opcode() != OpCode::Close => continue,
            _ => break None,
        }
    };
    if message.is_none() {
        let _ = std::future::poll_fn(|cx| socket.poll_ready_unpin(cx)).await;
        let _ = socket.flush().await;
    }
    message
}

async fn stream_session(mut socket: CompatSocket, state: S, agent: Arc<Agent>) {
    let first = tokio::time::timeout(
        state.config.http.ws_start_timeout(),
        start_message(&mut socket),
    )
    .await;
    let text = match first {
        Ok(Some(frame)) => String::from_utf8_lossy(frame.payload()).into_owned(),
        Ok(None) => return,
        Err(_) => {
            refuse(&mut socket, "No start message received in time").await;
            return;
        }
    };
    let (mut sender, mut receiver) = socket.split();
    let value: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            let err = python_json_error(&text, &e);
            refuse(&mut sender, &format!("Invalid JSON format: {err}")).await;
            return;
        }
    };
    for field in ["entrypoint_tag", "input_args", "input_kwargs"] {
        if value.get(field).is_none() {
            refuse(&mut sender, &format!("Missing required field: {field}")).await;
            return;
        }
    }
    let tag = python_str(&value["entrypoint_tag"]);
    let Some(entrypoint) = agent.config.entrypoint(&tag) else {
        refuse(&mut sender, &format!("Entrypoint {tag} not found")).await;
        return;
    };
    if !entrypoint.is_streaming() {
        refuse(
            &mut sender,
            &format!("Entrypoint `{tag}` is not a streaming entrypoint. Use a streaming entrypoint (ending with '_stream')."),
        )
        .await;
        return;
    }
    let req = RunRequest {
        tag: Cow::Owned(tag),
        args: Cow::Owned(value["input_args"].to_string()),
        kwargs: Cow::Owned(value["input_kwargs"].to_string()),
        timeout_s: value.get("timeout_seconds").and_then(Value::as_f64),
        user_id: user_id_of(value.get("user_id")),
    };
    let timeout = state
        .config
        .workers
        .call_timeout(req.timeout_s, entrypoint.timeout_s);
    let invocation_id = uuid::Uuid::now_v7().to_string();
    let started = Instant::now();
    let request_ts = chrono::Utc::now().naive_utc();
    let hello = format!(
        "{{\"type\":\"status\",\"status\":\"stream_started\",\"invocation_id\":\"{invocation_id}\"}}"
    );
    // Start the call first, so the worker begins while the status frame is on its way.
    let stream = agent
        .executor
        .stream(&req.tag, &req.args, &req.kwargs, timeout)
        .await;
    if sender.send(Frame::text(hello)).await.is_err() {
        return;
    }
    let outcome = match stream {
        Ok(stream) => {
            let deadline = tokio::time::Instant::from_std(started) + timeout;
            pump_stream(stream, &mut sender, &mut receiver, deadline).await
        }
        Err(e) => StreamOutcome::Failed(e),
    };
    let result: Result<Payload, CallError> = match outcome {
        StreamOutcome::Completed(count) => {
            let done = format!(
                "{{\"type\":\"status\",\"status\":\"stream_completed\",\"total_chunks\":{count},\"execution_time\":{},\"invocation_id\":\"{invocation_id}\"}}",
                started.elapsed().as_secs_f64()
            );
            let _ = sender.send(Frame::text(done)).await;
            close_with(&mut sender, 1000).await;
            Ok(Payload {
                ty: agentry_core::executor::ValueType::Object,
                json: Bytes::from(format!("{{\"total_chunks\": {count}}}")),
            })
        }
        StreamOutcome::Failed(e) => {
            // RunAgent writes this one frame with json.dumps' default spacing and key `error`.
            let mut frame = String::from("{\"type\": \"error\", \"error\": ");
            push_json_str(
                &mut frame,
                &format!("Streaming error: {}", e.runagent_text()),
            );
            frame.push('}');
            let _ = sender.send(Frame::text(frame)).await;
            close_with(&mut sender, 1000).await;
            Err(e)
        }
        StreamOutcome::ClientGone => Err(CallError::Cancelled),
    };
    if let Some(log) = &state.history {
        let client_info = r#"{"connection_type": "websocket", "stream_mode": true}"#.to_string();
        let mut record = invocation_record(
            &agent,
            &req,
            request_ts,
            started,
            &result,
            "websocket_stream",
            client_info,
        );
        record.invocation_id = invocation_id;
        log.record(record);
    }
}

enum StreamOutcome {
    Completed(u32),
    Failed(CallError),
    ClientGone,
}

/// Forwards chunks to the client while watching the client: if it goes away, the stream is
/// dropped, which cancels the generator in its worker.
///
/// A client that stops reading blocks the send; the call's own deadline still ends it then
/// (while a send waits, neither the call nor the client is polled).
async fn pump_stream(
    mut stream: Box<dyn ChunkStream>,
    sender: &mut Tx,
    receiver: &mut Rx,
    deadline: tokio::time::Instant,
) -> StreamOutcome {
    let mut count: u32 = 0;
    loop {
        tokio::select! {
            item = stream.next() => match item {
                Some(Ok(payload)) => {
                    count += 1;
                    let data = structured(payload.ty.as_str(), payload.as_str());
                    let mut frame = String::with_capacity(data.len() + data.len() / 4 + 32);
                    frame.push_str("{\"type\":\"data\",\"content\":");
                    push_json_str(&mut frame, &data);
                    frame.push('}');
                    let sent = tokio::time::timeout_at(deadline, sender.send(Frame::text(frame))).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        return StreamOutcome::ClientGone;
                    }
                }
                Some(Err(e)) => return StreamOutcome::Failed(e),
                None => return StreamOutcome::Completed(stream.total().unwrap_or(count)),
            },
            // RunAgent reads nothing after the start frame; a close (or a broken socket) means
            // the client is gone.
            msg = next_message(receiver) => if msg.is_none() {
                return StreamOutcome::ClientGone;
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Health, info, architecture, invocation history
// ---------------------------------------------------------------------------------------------

/// The agent RunAgent's agent-less routes describe (the first served), if the caller may see
/// it; else the answer for a key limited to other agents.
fn primary_for(state: &S, caller: Caller) -> Result<&Arc<Agent>, Response> {
    let Some(agent) = state.agents.primary() else {
        return Err(detail(StatusCode::NOT_FOUND, "Not Found"));
    };
    if !principal(caller).allows(agent) {
        return Err(detail(
            StatusCode::FORBIDDEN,
            "the API key is limited to other agents",
        ));
    }
    Ok(agent)
}

async fn health(State(state): State<S>, caller: Caller) -> Response {
    let agent = match primary_for(&state, caller) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let mut body = String::with_capacity(300);
    body.push_str(
        "{\"status\":\"healthy\",\"server\":\"RunAgent FastAPI Local Server\",\"timestamp\":\"",
    );
    body.push_str(&agentry_core::time::python_now_isoformat());
    body.push_str("\",\"uptime_seconds\":");
    body.push_str(&state.started.elapsed().as_secs_f64().to_string());
    body.push_str(",\"version\":\"1.0.0\",\"agent_id\":");
    push_json_str(&mut body, &agent.config.agent_id);
    body.push_str(",\"agent_name\":");
    push_json_str(&mut body, &agent.config.agent_name);
    body.push_str(",\"framework\":");
    push_json_str(&mut body, &agent.config.framework);
    body.push('}');
    json_response(StatusCode::OK, body)
}

async fn info(State(state): State<S>, caller: Caller) -> Response {
    let agent = match primary_for(&state, caller) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let c = &agent.config;
    let bound = Some(&state.bound);
    let body = json!({
        "message": format!("RunAgent API - {}({})", c.agent_name, c.agent_id),
        "version": c.version,
        "host": bound.map(|a| a.ip().to_string()),
        "port": bound.map(|a| a.port()),
        "config": c.info_json(),
        "endpoints": {
            "GET /": "Agent info",
            "GET /health": "Health check",
            "POST /api/v1/agents/{agent_id}/execute/{entrypoint}": "Execute agent",
            "GET /api/v1/agents/{agent_id}/invocations": "Get invocation history",
            "GET /api/v1/agents/{agent_id}/invocations/stats": "Get invocation stats",
        },
    });
    json_response(StatusCode::OK, body.to_string())
}

fn architecture(agent: &Agent, id: RequestId) -> Response {
    let entrypoints = agent.config.info_json()["agent_architecture"]["entrypoints"].clone();
    let data = json!({"agent_id": agent.config.agent_id, "entrypoints": entrypoints});
    let mut body = String::from("{\"success\":true,\"data\":");
    body.push_str(&data.to_string());
    body.push_str(",\"message\":\"Agent architecture retrieved successfully\",\"error\":null,");
    push_stamp(&mut body, id);
    request_id::with_header(json_response(StatusCode::OK, body), id)
}

async fn history_db(state: &S, id: RequestId) -> Result<&dyn InvocationHistory, Response> {
    let Some(db) = state.history.as_deref() else {
        return Err(error_envelope(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "Invocation history is not kept by this server (started with --no-runagent-db)",
            id,
        ));
    };
    Ok(db)
}

async fn invocations(
    state: S,
    agent: Arc<Agent>,
    query: Vec<(String, String)>,
    id: RequestId,
) -> Response {
    let mut limit: i64 = 50;
    let mut status: Option<String> = None;
    for (k, v) in query {
        match k.as_str() {
            "limit" => match v.trim().parse::<i64>() {
                // Bounded, so that one request cannot read the whole history at once.
                Ok(n) if !(1..=MAX_HISTORY_PAGE).contains(&n) => {
                    let (kind, msg, bound) = if n < 1 {
                        (
                            "greater_than_equal",
                            "Input should be greater than or equal to 1".to_string(),
                            json!({"ge": 1}),
                        )
                    } else {
                        (
                            "less_than_equal",
                            format!("Input should be less than or equal to {MAX_HISTORY_PAGE}"),
                            json!({"le": MAX_HISTORY_PAGE}),
                        )
                    };
                    return fastapi_422(vec![json!({
                        "type": kind, "loc": ["query", "limit"], "msg": msg, "input": v, "ctx": bound,
                    })]);
                }
                Ok(n) => limit = n,
                Err(_) => {
                    return fastapi_422(vec![json!({
                        "type": "int_parsing", "loc": ["query", "limit"],
                        "msg": "Input should be a valid integer, unable to parse string as an integer", "input": v,
                    })]);
                }
            },
            "status" => status = Some(v),
            _ => {}
        }
    }
    let db = match history_db(&state, id).await {
        Ok(db) => db,
        Err(r) => return r,
    };
    match db
        .list(&agent.config.agent_id, status.as_deref(), limit)
        .await
    {
        Ok(list) => {
            let n = list.len();
            json_response(
                StatusCode::OK,
                json!({"agent_id": agent.config.agent_id, "invocations": list, "total_count": n})
                    .to_string(),
            )
        }
        Err(e) => error_envelope(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            &format!("Failed to get invocations: {e}"),
            id,
        ),
    }
}

async fn invocation_stats(state: S, agent: Arc<Agent>, id: RequestId) -> Response {
    let db = match history_db(&state, id).await {
        Ok(db) => db,
        Err(r) => return r,
    };
    match db.stats(&agent.config.agent_id).await {
        Ok(stats) => json_response(
            StatusCode::OK,
            json!({"agent_id": agent.config.agent_id, "stats": stats}).to_string(),
        ),
        Err(e) => error_envelope(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            &format!("Failed to get invocation stats: {e}"),
            id,
        ),
    }
}

async fn invocation(
    State(state): State<S>,
    id: Option<Extension<RequestId>>,
    caller: Caller,
    Path(invocation_id): Path<String>,
) -> Response {
    let id = request_id::of(id);
    let db = match history_db(&state, id).await {
        Ok(db) => db,
        Err(r) => return r,
    };
    // An invocation of an agent the key may not touch is answered as one that does not exist.
    let who = principal(caller);
    // RunAgent's database is shared with other servers: an invocation of an agent not served
    // here is for unrestricted keys only.
    let visible = |inv: &Value| match inv["agent_id"]
        .as_str()
        .and_then(|agent| state.agents.by_id(agent))
    {
        Some(agent) => who.allows(agent),
        None => who.agent_limit().is_none(),
    };
    match db.get(&invocation_id).await {
        Ok(Some(inv)) if visible(&inv) => json_response(StatusCode::OK, inv.to_string()),
        Ok(_) => error_envelope(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            &format!("Invocation {invocation_id} not found"),
            id,
        ),
        Err(e) => error_envelope(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            &format!("Failed to get invocation: {e}"),
            id,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_path_borrows_arguments() {
        let body = br#"{"entrypoint_tag":"echo","input_args":[],"input_kwargs":{"message":"hi"},"timeout_seconds":300}"#;
        let Ok(r) = parse_run_request(body) else {
            panic!("rejected")
        };
        assert_eq!(r.tag, "echo");
        assert!(matches!(r.kwargs, Cow::Borrowed("{\"message\":\"hi\"}")));
        assert_eq!(r.timeout_s, Some(300.0));
    }

    #[test]
    fn python_str_matches_pythons() {
        assert_eq!(python_str(&json!(5)), "5");
        assert_eq!(python_str(&json!(null)), "None");
        assert_eq!(python_str(&json!("x")), "x");
    }
}
