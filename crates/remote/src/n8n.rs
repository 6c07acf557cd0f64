//! n8n-style webhook entrypoints: a `runagent.config.json` whose entrypoints are
//! `{webhook_url, method, tag, timeout, extractor}` (RunAgent's `WebHookEntryPoint`, served by
//! its `N8NExecutor`). A call takes at most one positional argument or a `payload` keyword
//! argument, POSTs it as JSON (or sends a GET, which carries no payload), and answers the
//! response's JSON, passed through the entrypoint's extractor (`{key: first JSONPath match or
//! null}`). The deadline is the shorter of the call's and the entrypoint's `timeout`.

use std::collections::HashMap;
use std::time::Duration;

use agentry_core::config::{AgentConfig, EntrypointKind};
use agentry_core::executor::{
    AgentExecutor, CallError, ChunkStream, EntrypointReport, Health, Payload, RunCall, ValueType,
};
use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Map, Value};
use serde_json_path::JsonPath;

use crate::run_call::RemoteRun;

/// Webhook calls of one agent sent at once.
const CAPACITY: usize = 16;
/// The longest webhook answer read.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

#[derive(Clone)]
struct Hook {
    url: String,
    post: bool,
    timeout: Duration,
    /// (key, path) in the configuration's order.
    extractor: Vec<(String, JsonPath)>,
}

/// The webhook entrypoints of one agent. Cheap to clone.
#[derive(Clone)]
pub struct WebhookAgent {
    http: reqwest::Client,
    hooks: std::sync::Arc<HashMap<String, Hook>>,
    /// Calls in flight to the agent's webhooks: at most `CAPACITY`.
    in_flight: std::sync::Arc<tokio::sync::Semaphore>,
}

impl WebhookAgent {
    /// Reads the agent's webhook entrypoints; an error names the first that cannot work.
    pub fn new(agent: &AgentConfig, tls: &crate::OutboundTls) -> Result<Self, String> {
        let mut hooks = HashMap::new();
        for e in &agent.entrypoints {
            let EntrypointKind::Webhook {
                webhook_url,
                method,
                timeout_s,
            } = &e.kind
            else {
                return Err(format!("entrypoint `{}` is not a webhook", e.tag));
            };
            crate::http_url(webhook_url, &format!("entrypoint `{}`: webhook_url", e.tag))?;
            let post = match method.to_ascii_lowercase().as_str() {
                "post" => true,
                "get" => false,
                other => {
                    return Err(format!(
                        "entrypoint `{}`: method `{other}` is not post or get",
                        e.tag
                    ));
                }
            };
            let timeout = Duration::try_from_secs_f64(*timeout_s)
                .ok()
                .filter(|t| !t.is_zero())
                .ok_or_else(|| format!("entrypoint `{}`: timeout must be positive", e.tag))?;
            let mut extractor = Vec::new();
            for (key, path) in &e.extractor {
                let text = path.as_str().ok_or_else(|| {
                    format!("entrypoint `{}`: extractor `{key}` is not a string", e.tag)
                })?;
                let path = JsonPath::parse(text).map_err(|err| {
                    format!(
                        "entrypoint `{}`: extractor `{key}` is not a JSONPath: {err}",
                        e.tag
                    )
                })?;
                extractor.push((key.clone(), path));
            }
            hooks.insert(
                e.tag.clone(),
                Hook {
                    url: webhook_url.clone(),
                    post,
                    timeout,
                    extractor,
                },
            );
        }
        Ok(Self {
            http: crate::client(tls.client_builder())?,
            hooks: std::sync::Arc::new(hooks),
            in_flight: std::sync::Arc::new(tokio::sync::Semaphore::new(CAPACITY)),
        })
    }

    async fn send(
        &self,
        tag: &str,
        args: &str,
        kwargs: &str,
        timeout: Duration,
        idempotency_key: Option<String>,
    ) -> Result<Payload, CallError> {
        let hook = self
            .hooks
            .get(tag)
            .ok_or_else(|| CallError::NoSuchEntrypoint(tag.to_string()))?;
        let payload = payload_of(args, kwargs)?;
        let timeout = timeout.min(hook.timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        // Waiting for a place counts against the deadline.
        let _permit = tokio::time::timeout_at(
            deadline,
            std::sync::Arc::clone(&self.in_flight).acquire_owned(),
        )
        .await
        .map_err(|_| CallError::Timeout(timeout))?
        .map_err(|_| CallError::Unavailable("the webhook executor is stopping".into()))?;
        let body = payload.to_string();
        let make = || {
            let mut r = if hook.post {
                self.http
                    .post(&hook.url)
                    .header("content-type", "application/json")
                    .body(body.clone())
            } else {
                self.http.get(&hook.url)
            };
            if let Some(key) = &idempotency_key {
                r = r.header("idempotency-key", key);
            }
            r
        };
        let resp = crate::send_with_retries(make, deadline)
            .await
            .map_err(|e| failed(e, timeout))?;
        let status = resp.status();
        if !status.is_success() {
            // httpx's raise_for_status, as RunAgent reports it.
            return Err(agent_error(
                format!("the webhook answered HTTP {}", status.as_u16()),
                status.is_server_error(),
            ));
        }
        let bytes = crate::read_body(resp, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| match e {
                None => agent_error("the webhook's answer is too large".into(), false),
                Some(e) => failed(e, timeout),
            })?;
        let answer: Value = serde_json::from_slice(&bytes)
            .map_err(|e| agent_error(format!("the webhook's answer is not JSON: {e}"), false))?;
        let result = if hook.extractor.is_empty() {
            answer
        } else {
            let mut out = Map::new();
            for (key, path) in &hook.extractor {
                let found = path.query(&answer).first().cloned().unwrap_or(Value::Null);
                out.insert(key.clone(), found);
            }
            Value::Object(out)
        };
        Ok(Payload {
            ty: ValueType::of(&result),
            json: Bytes::from(crate::pyjson::dumps(&result)),
        })
    }
}

/// The payload of a call, by RunAgent's rules: one positional argument, or `payload=`, or
/// nothing (`null`).
fn payload_of(args: &str, kwargs: &str) -> Result<Value, CallError> {
    let bad = |m: &str| agent_error(m.to_string(), false);
    let mut args: Vec<Value> =
        serde_json::from_str(args).map_err(|_| bad("input_args is not a list"))?;
    let mut kwargs: Map<String, Value> =
        serde_json::from_str(kwargs).map_err(|_| bad("input_kwargs is not an object"))?;
    if args.len() > 1 {
        return Err(bad("Too many positional arguments. Expected at most 1."));
    }
    if !args.is_empty() && !kwargs.is_empty() {
        return Err(bad("Cannot specify both positional and keyword arguments."));
    }
    if kwargs.len() > 1 || (!kwargs.is_empty() && !kwargs.contains_key("payload")) {
        return Err(bad("Only 'payload' keyword argument is allowed."));
    }
    Ok(args
        .pop()
        .or_else(|| kwargs.remove("payload"))
        .unwrap_or(Value::Null))
}

fn agent_error(message: String, retriable: bool) -> CallError {
    crate::agent_failure("WebhookError", message, retriable)
}

fn failed(e: reqwest::Error, timeout: Duration) -> CallError {
    crate::unanswered(e, timeout, "the webhook")
}

#[async_trait]
impl AgentExecutor for WebhookAgent {
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
        self.send(tag, args, kwargs, timeout, None).await
    }

    async fn stream(
        &self,
        tag: &str,
        _args: &str,
        _kwargs: &str,
        _timeout: Duration,
    ) -> Result<Box<dyn ChunkStream>, CallError> {
        Err(CallError::Unavailable(format!(
            "`{tag}` is a webhook entrypoint: webhooks answer once, they do not stream"
        )))
    }

    async fn run(
        &self,
        tag: &str,
        kwargs: &str,
        context: &str,
        timeout: Duration,
    ) -> Result<Box<dyn RunCall>, CallError> {
        let this = self.clone();
        let (tag, kwargs) = (tag.to_string(), kwargs.to_string());
        let key = crate::runagent::attempt_key(context);
        Ok(Box::new(RemoteRun::unary(async move {
            this.send(&tag, "[]", &kwargs, timeout, key).await
        })))
    }

    fn health(&self) -> Health {
        Health {
            live_workers: CAPACITY,
            crash_loop: None,
        }
    }

    fn run_capacity(&self) -> usize {
        CAPACITY
    }

    async fn drain(&self, _grace: Duration) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_follows_runagents_rules() {
        assert_eq!(
            payload_of("[{\"a\":1}]", "{}").ok(),
            Some(serde_json::json!({"a": 1}))
        );
        assert_eq!(payload_of("[]", "{\"payload\":2}").ok(), Some(2.into()));
        assert_eq!(payload_of("[]", "{}").ok(), Some(Value::Null));
        for (args, kwargs) in [
            ("[1,2]", "{}"),
            ("[1]", "{\"payload\":1}"),
            ("[]", "{\"x\":1}"),
        ] {
            assert!(payload_of(args, kwargs).is_err(), "{args} {kwargs}");
        }
    }
}
