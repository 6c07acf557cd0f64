//! Executors that run an agent's code somewhere else, over HTTP, behind the same
//! `AgentExecutor` trait as the local Python pool:
//!
//! * [`RemoteAgent`] (`runagent.rs`) calls another Agentry, or any RunAgent local server, by
//!   URL and agent id, in RunAgent's local-server protocol (both speak it): `POST
//!   /api/v1/agents/{id}/run` for calls, the `run-stream` WebSocket for streams. Pulse's
//!   "serverless" and "local serve" executors.
//! * [`WebhookAgent`] (`n8n.rs`) serves the n8n-style webhook entrypoints of a
//!   `runagent.config.json`, as RunAgent's `N8NExecutor` does: the payload POSTed as JSON (or a
//!   GET), the answer passed through the entrypoint's JSONPath extractor.
//!
//! Both enforce each call's deadline, retry only what never reached the other side (a refused
//! connection), and, for a durable run, send its id as `Idempotency-Key`. Both speak `http://`
//! and `https://` (`wss://` for streams), with the TLS settings of [`OutboundTls`] (`tls.rs`),
//! which the server's callbacks share.
//! `run_call.rs` turns a unary call or a stream into a durable run's `RunCall`; `pyjson.rs`
//! writes JSON as Python's `json.dumps` does, for results that did not come from Python.

mod n8n;
mod pyjson;
mod run_call;
mod runagent;
mod tls;

pub use n8n::WebhookAgent;
pub use runagent::RemoteAgent;
pub use tls::OutboundTls;

use std::time::Duration;

use agentry_core::executor::CallError;

/// Connections refused or reset before the request was sent are tried again this many times,
/// within the call's deadline.
pub(crate) const CONNECT_RETRIES: u32 = 2;
/// The first wait before such a retry; doubled after each.
pub(crate) const RETRY_BASE: Duration = Duration::from_millis(100);

/// Checks that `url` is `http://` or `https://`; `what` names the setting in the error.
pub(crate) fn http_url(url: &str, what: &str) -> Result<reqwest::Url, String> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("{what} `{url}` is not a URL: {e}"))?;
    match parsed.scheme() {
        "http" | "https" => Ok(parsed),
        _ => Err(format!("{what} `{url}` is not http:// or https://")),
    }
}

/// The HTTP client of one executor, from `OutboundTls::client_builder` and its own additions.
pub(crate) fn client(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, String> {
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {}", root_cause(&e)))
}

/// The other side's failure, as the agent's: `exc_type` names where it came from.
pub(crate) fn agent_failure(exc_type: &str, message: String, retriable: bool) -> CallError {
    CallError::Agent {
        exc_type: exc_type.into(),
        message,
        traceback: String::new(),
        retriable,
    }
}

/// A request that did not get an answer: past its deadline, or `what` could not be reached.
pub(crate) fn unanswered(e: reqwest::Error, timeout: Duration, what: &str) -> CallError {
    if e.is_timeout() {
        CallError::Timeout(timeout)
    } else {
        CallError::Unavailable(format!("cannot reach {what}: {}", root_cause(&e)))
    }
}

/// The innermost cause of an error: where a client error says what went wrong (a refused
/// connection, an unknown certificate, a resolver's refusal), under layers that only say that
/// a request failed.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut innermost = e;
    while let Some(source) = innermost.source() {
        innermost = source;
    }
    innermost.to_string()
}

/// Reads a body of at most `limit` bytes, chunk by chunk (a body without a length is never
/// buffered past the limit). `Err(None)`: over the limit.
pub(crate) async fn read_body(
    resp: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, Option<reqwest::Error>> {
    use futures_util::StreamExt;
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(None);
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(Some)?;
        if body.len() + chunk.len() > limit {
            return Err(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Sends `request` (rebuilt by `make` for each try), retrying a connection that failed before
/// anything was sent, until `deadline`.
pub(crate) async fn send_with_retries(
    make: impl Fn() -> reqwest::RequestBuilder,
    deadline: tokio::time::Instant,
) -> Result<reqwest::Response, reqwest::Error> {
    let mut wait = RETRY_BASE;
    let mut tries = 0;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match make().timeout(left).send().await {
            // A handshake that failed on the certificate would fail again.
            Err(e)
                if e.is_connect()
                    && !tls::is_tls_failure(&e)
                    && tries < CONNECT_RETRIES
                    && left > wait =>
            {
                tracing::debug!("retrying a refused connection: {e}");
                tries += 1;
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            other => return other,
        }
    }
}
