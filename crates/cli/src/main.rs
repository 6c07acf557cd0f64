//! `agentry`: serve RunAgent-style agent folders as a fast, safe service, and talk to a server.
//!
//! Data goes to stdout (pipeable); diagnostics go to stderr.

mod client;
mod config;
mod flags;
mod init;
mod keys;
mod migrate;
mod runs;
mod schedules;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Every request allocates a few small buffers; mimalloc makes those markedly cheaper than glibc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "agentry",
    version,
    about = "A self-hostable runtime for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve one or more agent folders over REST, WebSocket and SSE.
    Serve(flags::ServeFlags),
    /// Execute the runs of agent folders from a shared PostgreSQL database (`--database`),
    /// serving no API: only `/healthz`, `/readyz` and `/metrics` on an admin port (`--port`).
    Worker(flags::ServeFlags),
    /// Check agent folders (config, interpreter, imports, signatures) without serving.
    Validate(ValidateArgs),
    /// Call an entrypoint on a running server and print the result (or chunks as they arrive).
    Run(client::RunArgs),
    /// Durable runs on a running server: create, get, list, wait, cancel, events.
    Runs(runs::RunsArgs),
    /// Schedules on a running server: create, list, get, update, pause, resume, trigger,
    /// delete, fires.
    Schedules(schedules::SchedulesArgs),
    /// API keys, offline in the state directory (or the shared database): create, list, revoke.
    Keys(keys::KeysArgs),
    /// Bring a PostgreSQL database's schema up to date, or list what is applied (`--status`).
    Migrate(migrate::MigrateArgs),
    /// The effective configuration: `show` prints every setting and where it came from,
    /// `check` validates it without serving.
    Config(config::ConfigArgs),
    /// Create a working example agent folder (offline).
    Init {
        /// The folder to create.
        path: PathBuf,
    },
}

#[derive(clap::Args)]
struct ValidateArgs {
    #[command(flatten)]
    flags: flags::ServeFlags,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("AGENTRY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // tungstenite traces a WebSocket upgrade request's raw bytes, headers included: a remote
    // server's API key would reach the log at `trace`.
    let filter = match "tungstenite::handshake=off".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The configuration is read before the runtime starts: it says how many threads serve HTTP.
    let loaded = match &cli.command {
        Command::Serve(flags)
        | Command::Worker(flags)
        | Command::Validate(ValidateArgs { flags, .. }) => match flags.load() {
            Ok(loaded) => Some(loaded),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    // The server's own work per request is small next to the Python workers'; on a small
    // machine, fewer I/O threads leave the cores to the workers and avoid cross-thread wakeups.
    let io_threads = match (&cli.command, &loaded) {
        (Command::Serve(_), Some(l)) => l.config.http.io_threads(),
        _ => 2,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(io_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(_) => {
                init_tracing();
                serve::serve(loaded).await
            }
            Command::Worker(_) => {
                init_tracing();
                serve::worker(loaded).await
            }
            Command::Validate(args) => serve::validate(loaded, args.json).await,
            Command::Config(args) => config::config(args),
            Command::Run(args) => client::run(args).await,
            Command::Runs(args) => runs::runs(args).await,
            Command::Schedules(args) => schedules::schedules(args).await,
            Command::Keys(args) => keys::keys(args).await,
            Command::Migrate(args) => migrate::migrate(args).await,
            Command::Init { path } => init::init(&path),
        }
    });
    // Workers and pending writes are finished by now; don't wait for idle blocking threads.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use agentry_core::settings::{FIELDS, FieldKind};
    use clap::Parser;

    #[test]
    fn verify_cli() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    /// Every documented flag exists on `serve` and sets the setting the table says.
    #[test]
    fn each_flag_sets_its_documented_setting() {
        for field in FIELDS {
            let Some(flag) = field.flag else { continue };
            let value = match (field.key, field.kind) {
                (_, FieldKind::Flag | FieldKind::Negated) => None,
                ("http.host", _) => Some("127.0.0.1"),
                ("gateway.auth", _) => Some("required"),
                ("gateway.rate_limits" | "gateway.agent_rate_limits", _) => Some("invoke=1"),
                ("gateway.rate_limit_postgres", _) => Some("postgres://x"),
                _ => Some("7"),
            };
            let mut argv = vec!["agentry".to_string(), "serve".into(), format!("--{flag}")];
            argv.extend(value.map(str::to_string));
            let cli = super::Cli::try_parse_from(&argv)
                .unwrap_or_else(|e| panic!("`--{flag}` of {}: {e}", field.key));
            let super::Command::Serve(flags) = cli.command else {
                panic!("not serve")
            };
            let keys: Vec<&str> = flags.settings().iter().map(|(k, _)| *k).collect();
            assert_eq!(keys, vec![field.key], "`--{flag}`");
        }
    }
}
