//! `agentry keys …`: manage API keys offline, straight in the state directory's database (or
//! `--runs-db`), so the first key can be made before any server runs. A running server picks up
//! changes within two seconds. A new key is printed once; only its hash is stored.

use agentry_api::keys::{KeyList, KeyView, NewKeyView};
use std::io::Write;
use std::path::PathBuf;

use agentry_core::keys::{KeyRequest, parse_duration_s};
use agentry_core::runs::now_ms;
use anyhow::{Context, bail};
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct KeysArgs {
    /// Where Agentry keeps its state (the key database is `<state-dir>/agentry.db`).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// The database file, if not the state directory's.
    #[arg(long, global = true)]
    runs_db: Option<PathBuf>,
    #[command(flatten)]
    database: crate::flags::DatabaseFlags,
    /// The configuration file (default: ./agentry.toml when present).
    #[arg(long, global = true, env = "AGENTRY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it (once).
    Create {
        /// invoke, runs:read, runs:write, schedules or admin (repeatable).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Limit the key to this agent (id or name; repeatable).
        #[arg(long = "agent")]
        agents: Vec<String>,
        /// Lifetime: 30d, 12h, 15m, 90s.
        #[arg(long)]
        expires: Option<String>,
        /// A label for people.
        #[arg(long)]
        name: Option<String>,
    },
    /// List keys (never the keys themselves).
    List,
    /// Revoke a key by id (`ak_…`).
    Revoke { id: String },
}

/// The flag that gives a key request's field.
fn flag_of(field: &str) -> &str {
    match field {
        "scopes" => "scope",
        "agents" => "agent",
        "expires_in_s" => "expires",
        other => other,
    }
}

pub async fn keys(args: KeysArgs) -> anyhow::Result<()> {
    let mut flags = Vec::new();
    if let Some(dir) = &args.state_dir {
        flags.push(("state_dir", serde_json::json!(dir)));
    }
    if let Some(db) = &args.runs_db {
        flags.push(("store.path", serde_json::json!(db)));
    }
    flags.extend(args.database.settings());
    let loaded = agentry_server::config::load(agentry_server::config::Sources::from_process(
        args.config.clone(),
        flags,
    ))?;
    let store = agentry_server::open_store(&loaded.config).await?;
    let mut out = std::io::stdout().lock();
    match args.command {
        KeysCommand::Create {
            scopes,
            agents,
            expires,
            name,
        } => {
            let expires_in_s = match expires.as_deref() {
                None => None,
                Some(e) => Some(
                    parse_duration_s(e)
                        .with_context(|| format!("--expires {e}: use 30d, 12h, 15m or 90s"))?,
                ),
            };
            let request = KeyRequest {
                name,
                scopes,
                agents: (!agents.is_empty()).then_some(agents),
                expires_in_s,
            };
            let (key, token) = request.create(now_ms()).map_err(|r| {
                anyhow::anyhow!(
                    "--{}: {} (expected {})",
                    flag_of(r.field),
                    r.message,
                    r.expected
                )
            })?;
            store
                .keys
                .create_key(key.clone())
                .await
                .map_err(|e| anyhow::anyhow!("cannot store the key: {e}"))?;
            let shown = NewKeyView {
                view: KeyView::from(&key),
                key: token,
            };
            writeln!(out, "{}", serde_json::to_string_pretty(&shown)?)?;
            eprintln!("Store this key now: it is not shown again.");
        }
        KeysCommand::List => {
            let keys = store
                .keys
                .list_keys()
                .await
                .map_err(|e| anyhow::anyhow!("cannot read the keys: {e}"))?;
            let list = KeyList {
                keys: keys.iter().map(KeyView::from).collect(),
            };
            writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
        }
        KeysCommand::Revoke { id } => {
            let Some(key) = store
                .keys
                .revoke_key(&id, now_ms())
                .await
                .map_err(|e| anyhow::anyhow!("cannot revoke the key: {e}"))?
            else {
                bail!("no key `{id}`");
            };
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&KeyView::from(&key))?
            )?;
        }
    }
    store.close();
    Ok(())
}
