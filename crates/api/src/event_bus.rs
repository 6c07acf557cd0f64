//! The event bus (`GET /v1/events`, and `GET /v1/events/ws`): the events of every run the
//! caller may see, as Server-Sent Events or WebSocket text frames, in the global log's order
//! (`RunStore::log_after`), filtered by agent, entrypoint, kind and correlation id, resumable
//! with `Last-Event-ID` (or `?after=`) across restarts and nodes. The log is read from the store (shared by every node on PostgreSQL), a page at a
//! time, so a slow client only holds its own cursor.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use agentry_core::events::EventCursor;
use axum::Extension;
use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::auth::{Caller, principal};
use crate::error::{ApiError, invalid, upgrade_required};
use crate::request_id::RequestId;
use crate::runs::{QueryResult, event_json, query};
use crate::state::AppState;
use crate::views::ErrorEnvelope;

type S = Arc<AppState>;

/// Events read from the store at once.
const PAGE: usize = 500;
/// How long a caught-up stream waits before it looks again.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// How long it waits after the store failed to answer.
const STORE_RETRY: Duration = Duration::from_secs(1);

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct BusQuery {
    /// Only this agent's runs (id or name).
    agent: Option<String>,
    /// Only runs of this entrypoint.
    entrypoint: Option<String>,
    /// Only these kinds, comma-separated (`run.succeeded,run.failed`, `progress`).
    kind: Option<String>,
    /// Only runs of this chain (`docs/triggers.md`).
    #[param(max_length = 256)]
    correlation_id: Option<String>,
    /// Start after this event id (`Last-Event-ID` wins); default: from the start of the log.
    #[param(max_length = 64)]
    after: Option<String>,
    /// The API key, on `/v1/events/ws` only (a browser cannot set headers on a WebSocket
    /// handshake); read by the gate, ignored here.
    #[serde(rename = "token")]
    #[param(rename = "token")]
    _token: Option<String>,
}

fn cursor_of(text: &str, field: &str) -> Result<EventCursor, ApiError> {
    EventCursor::parse(text).ok_or_else(|| {
        invalid(
            field,
            "an event id from this stream",
            format!("invalid {field}"),
        )
    })
}

/// One event as the bus sends it: its cursor, its type, and its JSON.
struct BusItem {
    id: String,
    kind: String,
    data: String,
}

/// Checks the request and starts the task that reads the log for it; the items come on the
/// returned channel until the client goes away.
fn open(
    state: &S,
    caller: Caller,
    headers: &HeaderMap,
    q: BusQuery,
) -> Result<tokio::sync::mpsc::Receiver<BusItem>, ApiError> {
    let who = principal(caller);
    let mut cursor = match headers.get("last-event-id") {
        Some(v) => cursor_of(v.to_str().unwrap_or_default(), "Last-Event-ID")?,
        None => match q.after.as_deref() {
            Some(a) => cursor_of(a, "after")?,
            None => EventCursor::default(),
        },
    };
    let agents = crate::runs::agents_seen(state, &who, q.agent.as_deref())?;
    let kinds: Option<HashSet<String>> = q
        .kind
        .as_deref()
        .map(|k| k.split(',').map(|s| s.trim().to_string()).collect());
    if kinds
        .as_ref()
        .is_some_and(|k| k.iter().any(String::is_empty))
    {
        return Err(invalid(
            "kind",
            "comma-separated event types",
            "`kind` has an empty entry",
        ));
    }
    let entrypoint = q.entrypoint;
    let correlation = q.correlation_id;
    let tracebacks = who.sees_tracebacks(state.config.gateway.expose_tracebacks);
    let store = Arc::clone(state.engine.store());
    let (tx, rx) = tokio::sync::mpsc::channel::<BusItem>(64);
    tokio::spawn(async move {
        loop {
            let page = match store.log_after(cursor, PAGE, agents.clone()).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!("the event bus cannot read the log: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(STORE_RETRY) => continue,
                        _ = tx.closed() => return,
                    }
                }
            };
            if tx.is_closed() {
                return; // the client went away while nothing it wants came by
            }
            let caught_up = page.next == cursor;
            cursor = page.next;
            for e in page.events {
                if entrypoint.as_ref().is_some_and(|t| *t != e.entrypoint)
                    || correlation
                        .as_ref()
                        .is_some_and(|c| e.correlation_id.as_ref() != Some(c))
                    || kinds
                        .as_ref()
                        .is_some_and(|k| !k.contains(e.event.kind.as_str()))
                {
                    continue;
                }
                let inner = event_json(&e.event, tracebacks);
                let chain = match &e.correlation_id {
                    Some(c) => format!(
                        "\"correlation_id\":{},\"depth\":{},",
                        serde_json::Value::from(c.as_str()),
                        e.depth
                    ),
                    None => String::new(),
                };
                let data = format!(
                    "{{\"run_id\":{},\"agent_id\":{},\"entrypoint\":{},{chain}{}",
                    serde_json::Value::from(e.event.run_id.as_str()),
                    serde_json::Value::from(e.agent.as_str()),
                    serde_json::Value::from(e.entrypoint.as_str()),
                    &inner[1..]
                );
                let kind: String = e
                    .event
                    .kind
                    .as_str()
                    .chars()
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect();
                let item = BusItem {
                    id: e.cursor.to_string(),
                    kind,
                    data,
                };
                if tx.send(item).await.is_err() {
                    return; // the client went away
                }
            }
            if caught_up {
                tokio::select! {
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = tx.closed() => return,
                }
            }
        }
    });
    Ok(rx)
}

/// Every event of every run the caller may see, then live (Server-Sent Events).
#[utoipa::path(get, path = "/v1/events", tag = "runs",
    params(BusQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id (wins over `after`)")),
    responses(
        (status = 200, description = "Events: `id` is the global log's cursor, `event` the type, `data` `{run_id, agent_id, entrypoint, correlation_id?, depth?, seq, type, at, data}`", content_type = "text/event-stream"),
        (status = 404, description = "`agent_not_found`", body = ErrorEnvelope),
        (status = 422, description = "`validation_error`: a bad `Last-Event-ID`, `after` or filter", body = ErrorEnvelope),
    ))]
pub(crate) async fn events(
    State(state): State<S>,
    caller: Caller,
    headers: HeaderMap,
    q: QueryResult<BusQuery>,
) -> Result<Response, ApiError> {
    let rx = open(&state, caller, &headers, query(q)?)?;
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        let event = Event::default()
            .id(item.id)
            .event(item.kind)
            .data(item.data);
        Some((Ok::<_, Infallible>(event), rx))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The same events over a WebSocket: one text frame per event, its JSON with the event's
/// cursor as `id` (resume with `?after=` or `Last-Event-ID`).
#[utoipa::path(get, path = "/v1/events/ws", tag = "runs",
    params(BusQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id (wins over `after`)")),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol; frames `{id, run_id, agent_id, entrypoint, correlation_id?, depth?, seq, type, at, data}`"),
        (status = 404, description = "`agent_not_found`", body = ErrorEnvelope),
        (status = 426, description = "`upgrade_required`: not a WebSocket handshake", body = ErrorEnvelope),
        (status = 422, description = "`validation_error`: a bad `Last-Event-ID`, `after` or filter", body = ErrorEnvelope),
    ))]
pub(crate) async fn events_ws(
    State(state): State<S>,
    caller: Caller,
    request_id: Option<Extension<RequestId>>,
    headers: HeaderMap,
    q: QueryResult<BusQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(upgrade_required)?;
    let rx = open(&state, caller, &headers, query(q)?)?;
    let request_id = crate::request_id::of(request_id);
    let upgraded = ws
        .max_message_size(64 * 1024)
        .max_frame_size(64 * 1024)
        .on_upgrade(move |socket| send_frames(socket, rx));
    Ok(crate::request_id::with_header(upgraded, request_id))
}

async fn send_frames(mut socket: WebSocket, mut rx: tokio::sync::mpsc::Receiver<BusItem>) {
    loop {
        tokio::select! {
            item = rx.recv() => {
                let Some(item) = item else { break };
                let frame = format!(
                    "{{\"id\":{},{}",
                    serde_json::Value::from(item.id),
                    &item.data[1..]
                );
                if socket.send(Message::Text(frame.into())).await.is_err() {
                    break;
                }
            }
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                _ => {}
            },
        }
    }
}
