//! `agentry schedules …`: schedules on a running server (`docs/schedules.md`): create, list,
//! get, change, pause, resume, trigger, delete, and the fires recorded. Everything is printed
//! as the server's JSON; the server checks what it is given.

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::client::encode;
use crate::runs::{ServerArgs, show};

#[derive(Args)]
pub struct SchedulesArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(subcommand)]
    command: SchedulesCommand,
}

#[derive(Subcommand)]
enum SchedulesCommand {
    /// Create a schedule; prints it with its next five slots.
    Create(CreateArgs),
    /// List schedules, oldest first.
    List {
        #[arg(long)]
        agent: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// `next_cursor` of the previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show a schedule (with `--next N`, its next N slots).
    Get {
        id: String,
        #[arg(long)]
        next: Option<usize>,
    },
    /// Change a schedule: a JSON merge patch of its fields (null resets one).
    Update {
        id: String,
        /// The fields to change, as a JSON object (e.g. `{"cron": "0 9 * * *"}`).
        patch: String,
    },
    /// Pause a schedule.
    Pause { id: String },
    /// Resume a paused schedule from its next slot after now.
    Resume { id: String },
    /// Fire a schedule now: prints the run created.
    Trigger { id: String },
    /// Delete a schedule and its fires (its runs stay).
    Delete { id: String },
    /// The schedule's fires, newest first.
    Fires {
        id: String,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        cursor: Option<String>,
    },
}

#[derive(Args)]
struct CreateArgs {
    /// The agent's id or name.
    agent: String,
    /// The entrypoint tag.
    entrypoint: String,
    /// Keyword arguments of every run, as a JSON object.
    #[arg(long, default_value = "{}")]
    input: String,
    /// Unique among your schedules.
    #[arg(long)]
    name: Option<String>,
    /// A cron expression (5 fields, or 6 with seconds first).
    #[arg(long, group = "timing")]
    cron: Option<String>,
    /// The IANA time zone of `--cron` and of wall-clock times in `--at`.
    #[arg(long)]
    timezone: Option<String>,
    /// A fixed interval: `90s`, `15m`, `2h`, `1d`.
    #[arg(long, group = "timing")]
    every: Option<String>,
    /// With `--every`: how many times in all.
    #[arg(long)]
    times: Option<u64>,
    /// Once, at this time: RFC 3339 or English ("in 10 minutes", "tomorrow at 9am").
    #[arg(long, group = "timing")]
    at: Option<String>,
    /// Once, after this many seconds.
    #[arg(long, group = "timing")]
    delay_s: Option<f64>,
    /// No fire before (RFC 3339); for `--every`, the first fire.
    #[arg(long)]
    start_at: Option<String>,
    /// No fire after (RFC 3339).
    #[arg(long)]
    end_at: Option<String>,
    #[arg(long)]
    max_fires: Option<u64>,
    /// allow, skip or queue.
    #[arg(long)]
    overlap: Option<String>,
    /// skip, once or all.
    #[arg(long)]
    missed: Option<String>,
    #[arg(long)]
    missed_limit: Option<u32>,
    #[arg(long)]
    priority: Option<i32>,
    #[arg(long)]
    timeout_s: Option<f64>,
    #[arg(long)]
    max_attempts: Option<u32>,
    #[arg(long)]
    concurrency_key: Option<String>,
    /// Metadata of every run, as a JSON object.
    #[arg(long)]
    metadata: Option<String>,
    #[arg(long)]
    callback_url: Option<String>,
}

impl CreateArgs {
    fn body(self) -> anyhow::Result<Value> {
        let input: Value = serde_json::from_str(&self.input).context("--input must be JSON")?;
        let metadata: Option<Value> = self
            .metadata
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .context("--metadata must be JSON")?;
        let mut body = json!({
            "agent": self.agent, "entrypoint": self.entrypoint, "input": input,
            "name": self.name, "cron": self.cron, "timezone": self.timezone,
            "every": self.every, "times": self.times, "at": self.at, "delay_s": self.delay_s,
            "start_at": self.start_at, "end_at": self.end_at, "max_fires": self.max_fires,
            "overlap": self.overlap, "missed": self.missed, "missed_limit": self.missed_limit,
            "priority": self.priority, "timeout_s": self.timeout_s,
            "max_attempts": self.max_attempts, "concurrency_key": self.concurrency_key,
            "metadata": metadata, "callback_url": self.callback_url,
        });
        // What was not given is left to the server's defaults.
        if let Some(fields) = body.as_object_mut() {
            fields.retain(|_, v| !v.is_null());
        }
        Ok(body)
    }
}

fn page_query(pairs: Vec<(&str, Option<String>)>) -> String {
    pairs
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", encode(&v))))
        .collect::<Vec<_>>()
        .join("&")
}

pub async fn schedules(args: SchedulesArgs) -> anyhow::Result<()> {
    let base = args.server.url.trim_end_matches('/').to_string();
    let http = crate::client::http_client(args.server.api_key.as_deref())?;
    let one = |id: &str, tail: &str| format!("{base}/v1/schedules/{}{tail}", encode(id));
    match args.command {
        SchedulesCommand::Create(c) => {
            let body = c.body()?;
            show(http.post(format!("{base}/v1/schedules")).json(&body), &base).await
        }
        SchedulesCommand::List {
            agent,
            limit,
            cursor,
        } => {
            let q = page_query(vec![
                ("agent", agent),
                ("limit", Some(limit.to_string())),
                ("cursor", cursor),
            ]);
            show(http.get(format!("{base}/v1/schedules?{q}")), &base).await
        }
        SchedulesCommand::Get { id, next } => {
            let q = page_query(vec![("next", next.map(|n| n.to_string()))]);
            show(http.get(format!("{}?{q}", one(&id, ""))), &base).await
        }
        SchedulesCommand::Update { id, patch } => {
            let patch: Value = serde_json::from_str(&patch).context("the patch must be JSON")?;
            show(http.patch(one(&id, "")).json(&patch), &base).await
        }
        SchedulesCommand::Pause { id } => show(http.post(one(&id, "/pause")), &base).await,
        SchedulesCommand::Resume { id } => show(http.post(one(&id, "/resume")), &base).await,
        SchedulesCommand::Trigger { id } => show(http.post(one(&id, "/trigger")), &base).await,
        SchedulesCommand::Delete { id } => {
            let r = http
                .delete(one(&id, ""))
                .send()
                .await
                .with_context(|| format!("cannot reach {base}"))?;
            if !r.status().is_success() {
                let status = r.status();
                anyhow::bail!("{status}: {}", r.text().await.unwrap_or_default());
            }
            println!("{}", json!({"deleted": id}));
            Ok(())
        }
        SchedulesCommand::Fires { id, limit, cursor } => {
            let q = page_query(vec![("limit", Some(limit.to_string())), ("cursor", cursor)]);
            show(http.get(format!("{}?{q}", one(&id, "/fires"))), &base).await
        }
    }
}
