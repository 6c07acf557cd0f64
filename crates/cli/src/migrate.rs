//! `agentry migrate`: brings a PostgreSQL database's schema up to date (every node also does at
//! start-up, under the same advisory lock), or with `--status` lists what is applied.

use std::io::Write;
use std::path::PathBuf;

use agentry_store::PgStore;
use anyhow::bail;
use clap::Args;

#[derive(Args)]
pub struct MigrateArgs {
    /// The database (or `store.database_url`, `AGENTRY_DATABASE_URL`).
    #[command(flatten)]
    database: crate::flags::DatabaseFlags,
    /// List the migrations and whether each is applied; change nothing.
    #[arg(long)]
    status: bool,
    /// The configuration file (default: ./agentry.toml when present).
    #[arg(long, env = "AGENTRY_CONFIG")]
    config: Option<PathBuf>,
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let flags = args.database.settings();
    let loaded = agentry_server::config::load(agentry_server::config::Sources::from_process(
        args.config.clone(),
        flags,
    ))?;
    let Some(options) = agentry_server::pg_options(&loaded.config) else {
        bail!(
            "no PostgreSQL database: pass --database postgres://… (SQLite databases migrate themselves when a server opens them)"
        );
    };
    let shown = agentry_server::config::redact_url(&options.url);
    let fail = |e| anyhow::anyhow!("cannot use the PostgreSQL database {shown}: {e}");
    let store = if args.status {
        PgStore::connect_unmigrated(&options).await.map_err(fail)?
    } else {
        PgStore::connect(&options).await.map_err(fail)?
    };
    let mut out = std::io::stdout().lock();
    for m in store.migrations().await.map_err(fail)? {
        let state = match (m.applied_at, m.known) {
            (Some(at), true) => format!("applied {}", agentry_core::time::rfc3339_ms(at)),
            (Some(at), false) => format!(
                "applied {} by a newer Agentry (unknown here)",
                agentry_core::time::rfc3339_ms(at)
            ),
            (None, _) => "pending".to_string(),
        };
        writeln!(out, "{:04} {:<24} {state}", m.version, m.name)?;
    }
    Ok(())
}
