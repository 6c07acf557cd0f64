//! The remote executor: an agent whose code runs on another server that speaks RunAgent's
//! local-server protocol (another `agentry serve`, or RunAgent's own `runagent serve`), called
//! by URL and agent id. A call is `POST {url}/api/v1/agents/{id}/run`; a stream is the
//! `run-stream` WebSocket. Results come back as RunAgent's `{type, payload}` text, whose
//! payload is already Python's JSON: it is passed on as it came, never re-encoded.
//!
//! The remote side checks its own arguments (this side knows no schema: `entrypoint()` is
//! `None`, so inputs are passed as given), enforces its own limits, and keeps its own history.

use std::time::Duration;

use agentry_core::executor::{
    AgentExecutor, CallError, ChunkStream, EntrypointReport, Health, Payload, RunCall, ValueType,
};
use agentry_core::settings::RemoteSettings;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use reqwest::header::HeaderValue;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::run_call::RemoteRun;

const DEFAULT_CONCURRENCY: usize = 8;
/// The longest remote answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// An agent served by another server. Cheap to clone.
#[derive(Clone)]
pub struct RemoteAgent {
    http: reqwest::Client,
    /// How `wss://` streams connect (a `ws://` stream ignores it).
    ws: tokio_tungstenite::Connector,
    /// `Bearer <api key>`, for the stream's upgrade request (the HTTP client sends it itself).
    authorization: Option<HeaderValue>,
    /// `{url}/api/v1/agents/{id}`.
    base: String,
    agent_id: String,
    capacity: usize,
    /// Calls, streams and runs in flight to the server: at most `capacity`.
    in_flight: std::sync::Arc<tokio::sync::Semaphore>,
}

/// RunAgent's response envelope (`AgentRunResponseMinimal`), the fields read.
#[derive(Deserialize)]
struct Envelope {
    success: bool,
    data: Option<String>,
    error: Option<ErrorDetail>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: Option<String>,
    message: Option<String>,
}

/// `{"type": T, "payload": P}`, the text inside `data` and each stream frame's `content`.
#[derive(Deserialize)]
struct Structured {
    #[serde(rename = "type")]
    ty: String,
    payload: String,
}

impl RemoteAgent {
    /// `agent_id` is the local configuration's, used when the settings name none; `api_key`
    /// goes with every request and stream as `Authorization: Bearer`.
    pub fn new(
        settings: &RemoteSettings,
        agent_id: &str,
        api_key: Option<&str>,
        tls: &crate::OutboundTls,
    ) -> Result<Self, String> {
        // The parsed form: its scheme is lower-case, so `ws` + what follows `http` is the
        // stream's URL.
        let url = crate::http_url(&settings.url, "remote.url")?;
        // Credentials in the URL would be sent as Basic auth and shown wherever the URL is
        // (the agent's view, the logs): the key has its own settings.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "remote.url carries credentials; give the key in api_key_env or api_key_file"
                    .into(),
            );
        }
        let agent_id = settings.agent_id.clone().unwrap_or(agent_id.to_string());
        let capacity = settings
            .max_concurrency
            .unwrap_or(DEFAULT_CONCURRENCY)
            .max(1);
        if agent_id.is_empty() || agent_id.contains(['/', '?', '#']) {
            return Err(format!("remote.agent_id `{agent_id}` is not an agent id"));
        }
        let authorization = api_key
            .map(|key| {
                let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
                    .map_err(|_| "the remote API key has characters a header cannot carry")?;
                // Kept out of debug output and logs.
                value.set_sensitive(true);
                Ok::<_, String>(value)
            })
            .transpose()?;
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(value) = &authorization {
            headers.insert(reqwest::header::AUTHORIZATION, value.clone());
        }
        Ok(Self {
            http: crate::client(tls.client_builder().default_headers(headers))?,
            ws: tls.ws_connector(),
            authorization,
            base: format!(
                "{}/api/v1/agents/{agent_id}",
                url.as_str().trim_end_matches('/')
            ),
            agent_id,
            capacity,
            in_flight: std::sync::Arc::new(tokio::sync::Semaphore::new(capacity)),
        })
    }

    /// Whether what is sent to the server cannot be read on the way: `https://`, or a loopback
    /// address.
    pub fn is_private_link(&self) -> bool {
        let Ok(url) = reqwest::Url::parse(&self.base) else {
            return false;
        };
        url.scheme() == "https"
            || match url.host_str() {
                Some("localhost") => true,
                Some(host) => host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback()),
                None => false,
            }
    }

    /// The RunAgent request body: the arguments' texts spliced in as they are.
    fn body(tag: &str, args: &str, kwargs: &str, timeout: Duration) -> String {
        format!(
            "{{\"entrypoint_tag\":{},\"input_args\":{args},\"input_kwargs\":{kwargs},\"timeout_seconds\":{},\"async_execution\":false}}",
            serde_json::Value::from(tag),
            timeout.as_secs().max(1)
        )
    }

    /// A place among the calls in flight (waited for in FIFO order).
    async fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, CallError> {
        std::sync::Arc::clone(&self.in_flight)
            .acquire_owned()
            .await
            .map_err(|_| CallError::Unavailable("the remote executor is stopping".into()))
    }

    async fn post_run(
        &self,
        tag: &str,
        body: String,
        timeout: Duration,
        idempotency_key: Option<String>,
    ) -> Result<Payload, CallError> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Waiting for a place counts against the deadline.
        let _permit = tokio::time::timeout_at(deadline, self.permit())
            .await
            .map_err(|_| CallError::Timeout(timeout))??;
        let url = format!("{}/run", self.base);
        let make = || {
            let mut r = self
                .http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone());
            if let Some(key) = &idempotency_key {
                r = r.header("idempotency-key", key);
            }
            r
        };
        let resp = crate::send_with_retries(make, deadline)
            .await
            .map_err(|e| transport_error(e, timeout))?;
        let status = resp.status().as_u16();
        let text = read_capped(resp, timeout).await?;
        let envelope: Option<Envelope> = serde_json::from_str(&text).ok();
        match (status, envelope) {
            (
                200,
                Some(Envelope {
                    success: true,
                    data: Some(data),
                    ..
                }),
            ) => structured(&data),
            (200, Some(Envelope { error, .. })) => Err(agent_error(&self.agent_id, error, true)),
            (404, Some(Envelope { error: Some(e), .. }))
                if e.code.as_deref() == Some("NOT_FOUND") =>
            {
                Err(CallError::NoSuchEntrypoint(tag.to_string()))
            }
            (404, _) => Err(CallError::Unavailable(format!(
                "the remote server {} does not serve agent {}",
                self.base, self.agent_id
            ))),
            (400, Some(Envelope { error, .. })) => Err(agent_error(&self.agent_id, error, false)),
            (status, _) => Err(CallError::Unavailable(format!(
                "the remote server answered HTTP {status}"
            ))),
        }
    }
}

/// A payload from RunAgent's `{type, payload}` text.
fn structured(text: &str) -> Result<Payload, CallError> {
    let s: Structured = serde_json::from_str(text).map_err(|e| {
        CallError::Unavailable(format!("the remote server sent a malformed result: {e}"))
    })?;
    let ty = ValueType::parse(&s.ty).ok_or_else(|| {
        CallError::Unavailable(format!(
            "the remote server sent a result of type `{}`",
            s.ty
        ))
    })?;
    Ok(Payload {
        ty,
        json: Bytes::from(s.payload),
    })
}

/// The agent's failure as the remote server reported it, without RunAgent's prefixes.
fn agent_error(agent_id: &str, error: Option<ErrorDetail>, retriable: bool) -> CallError {
    let message = error.and_then(|e| e.message).unwrap_or_default();
    let prefix = format!("Agent execution failed: Server error running agent {agent_id}: ");
    let message = message
        .strip_prefix(&prefix)
        .unwrap_or(&message)
        .to_string();
    crate::agent_failure("RemoteAgentError", message, retriable)
}

fn transport_error(e: reqwest::Error, timeout: Duration) -> CallError {
    crate::unanswered(e, timeout, "the remote server")
}

async fn read_capped(resp: reqwest::Response, timeout: Duration) -> Result<String, CallError> {
    let too_large = || CallError::Unavailable("the remote server's answer is too large".into());
    let body = crate::read_body(resp, MAX_ANSWER_BYTES)
        .await
        .map_err(|e| e.map_or_else(too_large, |e| transport_error(e, timeout)))?;
    String::from_utf8(body)
        .map_err(|_| CallError::Unavailable("the remote server's answer is not UTF-8".into()))
}

/// A stream over RunAgent's `run-stream` WebSocket: its frames read on a task, chunks handed
/// over a channel; dropping it closes the socket.
struct RemoteStream {
    rx: tokio::sync::mpsc::Receiver<Result<Payload, CallError>>,
    total: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// Set by the reader on `stream_completed`: a channel closed without it was cut short.
    completed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ended: bool,
    task: tokio::task::JoinHandle<()>,
    /// Held while the stream is open (`max_concurrency`).
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl ChunkStream for RemoteStream {
    fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Payload, CallError>>> {
        use std::sync::atomic::Ordering;
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(None) if !self.ended => {
                self.ended = true;
                if self.completed.load(Ordering::Acquire) {
                    std::task::Poll::Ready(None)
                } else {
                    // The reader was stopped (a cancel) before the stream completed.
                    std::task::Poll::Ready(Some(Err(CallError::Cancelled)))
                }
            }
            polled => polled,
        }
    }

    fn total(&self) -> Option<u32> {
        use std::sync::atomic::Ordering;
        (self.ended && self.completed.load(Ordering::Acquire))
            .then(|| self.total.load(Ordering::Relaxed))
    }
}

impl Drop for RemoteStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One frame of RunAgent's stream.
#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    content: Option<String>,
    status: Option<String>,
    total_chunks: Option<u32>,
    error: Option<String>,
    detail: Option<String>,
}

impl RemoteAgent {
    async fn open_stream(
        &self,
        tag: &str,
        body: String,
        timeout: Duration,
    ) -> Result<RemoteStream, CallError> {
        let permit = self.permit().await?;
        let url = format!(
            "ws{}/run-stream",
            self.base.strip_prefix("http").unwrap_or(&self.base)
        );
        // One deadline for the whole stream, connecting included.
        let deadline = tokio::time::Instant::now() + timeout;
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| CallError::Unavailable(format!("cannot open the remote stream: {e}")))?;
        if let Some(value) = &self.authorization {
            request
                .headers_mut()
                .insert(reqwest::header::AUTHORIZATION, value.clone());
        }
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            request,
            None,
            true,
            Some(self.ws.clone()),
        );
        let (mut socket, _) = tokio::time::timeout_at(deadline, connect)
            .await
            .map_err(|_| CallError::Timeout(timeout))?
            .map_err(|e| CallError::Unavailable(format!("cannot open the remote stream: {e}")))?;
        socket
            .send(Message::Text(body.into()))
            .await
            .map_err(|e| CallError::Unavailable(format!("the remote stream failed: {e}")))?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let total = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = std::sync::Arc::clone(&total);
        let completed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = std::sync::Arc::clone(&completed);
        let tag = tag.to_string();
        let task = tokio::spawn(async move {
            let deadline = tokio::time::sleep_until(deadline);
            tokio::pin!(deadline);
            loop {
                let msg = tokio::select! {
                    m = socket.next() => m,
                    _ = &mut deadline => {
                        let _ = tx.send(Err(CallError::Timeout(timeout))).await;
                        break;
                    }
                };
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | None => {
                        let _ = tx
                            .send(Err(CallError::Unavailable(
                                "the remote stream closed before it completed".into(),
                            )))
                            .await;
                        break;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        let _ = tx
                            .send(Err(CallError::Unavailable(format!(
                                "the remote stream failed: {e}"
                            ))))
                            .await;
                        break;
                    }
                };
                let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
                    // A frame we cannot read may be a chunk: ending is better than a gap.
                    let _ = tx
                        .send(Err(CallError::Unavailable(
                            "the remote stream sent a frame that is not RunAgent's".into(),
                        )))
                        .await;
                    break;
                };
                match frame.kind.as_str() {
                    "data" => {
                        let item = structured(frame.content.as_deref().unwrap_or_default());
                        if tx.send(item).await.is_err() {
                            break;
                        }
                    }
                    "status" if frame.status.as_deref() == Some("stream_completed") => {
                        counted.store(
                            frame.total_chunks.unwrap_or_default(),
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        done.store(true, std::sync::atomic::Ordering::Release);
                        break; // the channel closes: the stream ended normally
                    }
                    "error" => {
                        let text = frame.error.or(frame.detail).unwrap_or_default();
                        let error = if text == format!("Entrypoint {tag} not found") {
                            CallError::NoSuchEntrypoint(tag.clone())
                        } else {
                            let message = text.strip_prefix("Streaming error: ").unwrap_or(&text);
                            crate::agent_failure("RemoteAgentError", message.to_string(), true)
                        };
                        let _ = tx.send(Err(error)).await;
                        break;
                    }
                    _ => {}
                }
            }
            let _ = socket.close(None).await;
        });
        Ok(RemoteStream {
            rx,
            total,
            completed,
            ended: false,
            task,
            _permit: permit,
        })
    }
}

/// A durable run's call's idempotency key, `<run id>:<attempt>`, from the run context's JSON
/// (`{"id", "attempt", "state"}`): the same for the tries of one attempt, new for the next
/// attempt (which is meant to run again).
pub(crate) fn attempt_key(context: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Context {
        id: String,
        attempt: u32,
    }
    serde_json::from_str::<Context>(context)
        .ok()
        .map(|c| format!("{}:{}", c.id, c.attempt))
}

#[async_trait]
impl AgentExecutor for RemoteAgent {
    fn entrypoint(&self, _tag: &str) -> Option<&EntrypointReport> {
        None
    }

    async fn call(
        &self,
        tag: &str,
        args: &str,
        kwargs: &str,
        timeout: Duration,
    ) -> Result<Payload, CallError> {
        self.post_run(tag, Self::body(tag, args, kwargs, timeout), timeout, None)
            .await
    }

    async fn stream(
        &self,
        tag: &str,
        args: &str,
        kwargs: &str,
        timeout: Duration,
    ) -> Result<Box<dyn ChunkStream>, CallError> {
        let body = Self::body(tag, args, kwargs, timeout);
        Ok(Box::new(self.open_stream(tag, body, timeout).await?))
    }

    async fn run(
        &self,
        tag: &str,
        kwargs: &str,
        context: &str,
        timeout: Duration,
    ) -> Result<Box<dyn RunCall>, CallError> {
        let body = Self::body(tag, "[]", kwargs, timeout);
        // RunAgent's only signal for a streaming entrypoint.
        if tag.ends_with("_stream") {
            let stream = self.open_stream(tag, body, timeout).await?;
            let abort = stream.task.abort_handle();
            return Ok(Box::new(RemoteRun::stream(Box::new(stream), Some(abort))));
        }
        let this = self.clone();
        let tag = tag.to_string();
        let key = attempt_key(context);
        Ok(Box::new(RemoteRun::unary(async move {
            this.post_run(&tag, body, timeout, key).await
        })))
    }

    fn health(&self) -> Health {
        Health {
            live_workers: self.capacity,
            crash_loop: None,
        }
    }

    fn run_capacity(&self) -> usize {
        self.capacity
    }

    async fn drain(&self, _grace: Duration) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_pass_through_and_errors_lose_runagents_prefix() {
        let p = structured(r#"{"type": "object", "payload": "{\"a\": 1}"}"#).expect("payload");
        assert_eq!((p.ty, p.as_str()), (ValueType::Object, r#"{"a": 1}"#));
        assert!(structured(r#"{"type": "blob", "payload": "1"}"#).is_err());
        let e = agent_error(
            "x",
            Some(ErrorDetail {
                code: Some("INTERNAL_ERROR".into()),
                message: Some("Agent execution failed: Server error running agent x: boom".into()),
            }),
            true,
        );
        assert_eq!(e.runagent_text(), "boom");
        assert_eq!(
            RemoteAgent::body("t", "[1]", "{}", Duration::from_secs(3)),
            r#"{"entrypoint_tag":"t","input_args":[1],"input_kwargs":{},"timeout_seconds":3,"async_execution":false}"#
        );
    }
}
