//! `agentry runs …`: durable runs on a running server (`docs/api.md#runs`). Runs and lists go to
//! stdout as JSON; `events` prints one event per line (JSON) as they arrive, until the run ends.

use std::io::Write;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::client::encode;

/// The server a command talks to.
#[derive(Args)]
pub struct ServerArgs {
    /// The server.
    #[arg(
        long,
        global = true,
        env = "AGENTRY_URL",
        default_value = "http://127.0.0.1:8450"
    )]
    pub url: String,
    /// API key, sent as `Authorization: Bearer`.
    #[arg(long, global = true, env = "AGENTRY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

#[derive(Args)]
pub struct RunsArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(subcommand)]
    command: RunsCommand,
}

#[derive(Subcommand)]
enum RunsCommand {
    /// Create a run (printed as soon as it is stored; `--wait` prints it once it has ended).
    Create(CreateArgs),
    /// Show a run.
    Get { id: String },
    /// List runs, newest first.
    List {
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        entrypoint: Option<String>,
        /// queued, running, succeeded, failed, timed_out or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        concurrency_key: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// `next_cursor` of the previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Wait until a run has ended (or the timeout passes) and show it.
    Wait {
        id: String,
        #[arg(long, default_value_t = 60.0)]
        timeout_s: f64,
    },
    /// Cancel a queued or running run.
    Cancel { id: String },
    /// Show a run's callback and every delivery attempt; `--resend` starts another round.
    Deliveries {
        id: String,
        #[arg(long)]
        resend: bool,
    },
    /// Print a run's events from the start (or after `--after`), then live until it ends.
    Events {
        id: String,
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
}

#[derive(Args)]
struct CreateArgs {
    /// The agent's id or name.
    agent: String,
    /// The entrypoint tag.
    entrypoint: String,
    /// Keyword arguments as a JSON object.
    #[arg(long, default_value = "{}")]
    input: String,
    #[arg(long)]
    idempotency_key: Option<String>,
    #[arg(long)]
    priority: Option<i32>,
    /// Start no sooner than this many seconds from now.
    #[arg(long)]
    delay_s: Option<f64>,
    /// Deadline of each attempt, in seconds.
    #[arg(long)]
    timeout_s: Option<f64>,
    #[arg(long)]
    max_attempts: Option<u32>,
    #[arg(long)]
    concurrency_key: Option<String>,
    /// Metadata as a JSON object.
    #[arg(long)]
    metadata: Option<String>,
    /// An http:// URL that gets a signed POST when the run ends (docs/callbacks.md).
    #[arg(long)]
    callback_url: Option<String>,
    /// The chain this run belongs to (docs/triggers.md).
    #[arg(long)]
    correlation_id: Option<String>,
    /// One of the agent's named executors (docs/executors.md).
    #[arg(long)]
    executor: Option<String>,
    /// Wait for the run to end and print it then.
    #[arg(long)]
    wait: bool,
}

async fn answer(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let text = response
        .text()
        .await
        .context("the server's answer broke off")?;
    if !status.is_success() {
        bail!("{status}: {text}");
    }
    serde_json::from_str(&text).context("the server sent invalid JSON")
}

/// Sends a request and prints the JSON answer.
pub(crate) async fn show(request: reqwest::RequestBuilder, base: &str) -> anyhow::Result<()> {
    let r = request
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    print(&answer(r).await?)
}

fn print(v: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string_pretty(v)?)?;
    Ok(())
}

pub async fn runs(args: RunsArgs) -> anyhow::Result<()> {
    let base = args.server.url.trim_end_matches('/').to_string();
    let http = crate::client::http_client(args.server.api_key.as_deref())?;
    match args.command {
        RunsCommand::Create(c) => {
            let input: Value = serde_json::from_str(&c.input).context("--input must be JSON")?;
            let mut body = json!({"agent": c.agent, "entrypoint": c.entrypoint, "input": input});
            let opt = |v: Option<Value>, k: &str, body: &mut Value| {
                if let Some(v) = v {
                    body[k] = v;
                }
            };
            opt(
                c.idempotency_key.map(Value::from),
                "idempotency_key",
                &mut body,
            );
            opt(c.priority.map(Value::from), "priority", &mut body);
            opt(c.delay_s.map(Value::from), "delay_s", &mut body);
            opt(c.timeout_s.map(Value::from), "timeout_s", &mut body);
            opt(c.max_attempts.map(Value::from), "max_attempts", &mut body);
            opt(
                c.concurrency_key.map(Value::from),
                "concurrency_key",
                &mut body,
            );
            opt(c.callback_url.map(Value::from), "callback_url", &mut body);
            opt(
                c.correlation_id.map(Value::from),
                "correlation_id",
                &mut body,
            );
            if let Some(m) = c.metadata {
                body["metadata"] = serde_json::from_str(&m).context("--metadata must be JSON")?;
            }
            let path = if c.wait {
                "/v1/runs/wait?timeout_s=600"
            } else {
                "/v1/runs"
            };
            show(http.post(format!("{base}{path}")).json(&body), &base).await
        }
        RunsCommand::Get { id } => {
            show(http.get(format!("{base}/v1/runs/{}", encode(&id))), &base).await
        }
        RunsCommand::List {
            agent,
            entrypoint,
            status,
            concurrency_key,
            limit,
            cursor,
        } => {
            let mut q: Vec<(&str, String)> = vec![("limit", limit.to_string())];
            for (k, v) in [
                ("agent", agent),
                ("entrypoint", entrypoint),
                ("status", status),
                ("concurrency_key", concurrency_key),
                ("cursor", cursor),
            ] {
                if let Some(v) = v {
                    q.push((k, v));
                }
            }
            let qs: Vec<String> = q
                .iter()
                .map(|(k, v)| format!("{k}={}", encode(v)))
                .collect();
            show(http.get(format!("{base}/v1/runs?{}", qs.join("&"))), &base).await
        }
        RunsCommand::Wait { id, timeout_s } => {
            show(
                http.get(format!(
                    "{base}/v1/runs/{}/wait?timeout_s={timeout_s}",
                    encode(&id)
                )),
                &base,
            )
            .await
        }
        RunsCommand::Deliveries { id, resend } => {
            let url = format!("{base}/v1/runs/{}/deliveries", encode(&id));
            let request = if resend {
                http.post(url)
            } else {
                http.get(url)
            };
            show(request, &base).await
        }
        RunsCommand::Cancel { id } => {
            show(
                http.post(format!("{base}/v1/runs/{}/cancel", encode(&id))),
                &base,
            )
            .await
        }
        RunsCommand::Events { id, after } => events(&http, &base, &id, after).await,
    }
}

/// Follows the SSE event log, printing each event's JSON on its own line.
async fn events(http: &reqwest::Client, base: &str, id: &str, after: i64) -> anyhow::Result<()> {
    let r = http
        .get(format!(
            "{base}/v1/runs/{}/events?after={after}",
            encode(id)
        ))
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    if !r.status().is_success() {
        let status = r.status();
        bail!("{status}: {}", r.text().await.unwrap_or_default());
    }
    let mut out = std::io::stdout().lock();
    let mut bytes = r.bytes_stream();
    let mut buf = Vec::new();
    while let Some(piece) = bytes.next().await {
        buf.extend_from_slice(&piece.context("the event stream broke")?);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            if let Some(data) = line.trim_end_matches(['\n', '\r']).strip_prefix("data:") {
                writeln!(out, "{}", data.trim_start())?;
                out.flush()?;
            }
        }
    }
    Ok(())
}
