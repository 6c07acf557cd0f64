//! `agentry serve` and `agentry validate`: load agents, resolve their interpreters, start their
//! warm workers, bind, serve, and shut down gracefully.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use agentry_api::auth::Auth;
use agentry_api::limits::RateLimits;
use agentry_api::server::ConnectionLimits;
use agentry_api::{Agent, AppState};
use agentry_core::settings::RateSpec;
use agentry_core::{AgentConfig, EntrypointKind, ServeSettings};
use agentry_engine::{Engine, EngineAgent, EngineSettings};
use agentry_runner::{
    AgentPool, PoolConfig, PythonResolver, ResolvedPython, StartError, WorkerSpec,
};
use agentry_store::{Durability, RunAgentDb, SqliteOptions, SqliteStore};
use anyhow::{Context, bail};
use std::collections::HashMap;
use tokio::net::TcpListener;

use crate::{AgentArgs, ServeArgs, ValidateArgs};

/// First port of RunAgent's policy.
const RUNAGENT_FIRST_PORT: u16 = 8450;

fn secs(value: f64, name: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--{name} must be a positive number of seconds"))
}

fn settings_from(args: &ServeArgs) -> anyhow::Result<ServeSettings> {
    let defaults = ServeSettings::default();
    Ok(ServeSettings {
        host: args.host,
        port: args.port,
        state_dir: args.agents.state_dir.clone(),
        python: args.agents.python.clone(),
        workers: args.workers.unwrap_or(defaults.workers).max(1),
        max_async_per_worker: args.max_async_per_worker.max(1),
        pipeline_depth: args.pipeline_depth.max(1),
        default_timeout: secs(args.timeout_s, "timeout-s")?,
        max_timeout: secs(args.max_timeout_s, "max-timeout-s")?,
        shutdown_grace: Duration::try_from_secs_f64(args.shutdown_grace_s)
            .context("--shutdown-grace-s must be >= 0")?,
        max_body_bytes: args.max_body_bytes,
        max_frame_bytes: args.max_frame_bytes.max(1024),
        worker_memory_mb: args.worker_memory_mb,
        runagent_db: !args.no_runagent_db,
        runagent_db_path: args.runagent_db.clone(),
        expose_tracebacks: args.expose_tracebacks,
        runs_db_path: args.runs_db.clone(),
        runs_db_fsync: !args.runs_db_no_fsync,
        runs_db_busy_timeout: secs(args.runs_db_busy_timeout_s, "runs-db-busy-timeout-s")?,
        max_run_input_bytes: args.max_run_input_bytes,
        max_running_runs: args.max_running_runs.max(1),
        max_running_runs_per_agent: args.max_running_runs_per_agent.map(|n| n.max(1)),
        lease_ttl: secs(args.lease_ttl_s, "lease-ttl-s")?,
        heartbeat_event_every: secs(args.heartbeat_event_s, "heartbeat-event-s")?,
        cancel_grace: secs(args.cancel_grace_s, "cancel-grace-s")?,
        run_retention: if args.run_retention_h > 0.0 {
            Some(secs(args.run_retention_h * 3600.0, "run-retention-h")?)
        } else {
            None
        },
        node_name: args.node_name.clone(),
        auth_required: args.auth == crate::AuthMode::Required,
        cors_origins: args.cors_origins.clone(),
        max_connections: args.max_connections.max(1),
        header_read_timeout: secs(args.header_read_timeout_s, "header-read-timeout-s")?,
        max_header_bytes: args.max_header_bytes.max(1024),
        caller_rate_limits: args
            .rate_limits
            .iter()
            .map(|r| RateSpec::parse_rule(r))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("--rate-limit {e}"))?,
        agent_rate_limits: args
            .agent_rate_limits
            .iter()
            .map(|r| RateSpec::parse_rule(r))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("--agent-rate-limit {e}"))?,
        insecure_no_auth: args.insecure_no_auth,
        rate_limit_postgres: args.rate_limit_postgres.clone(),
        rate_limit_sync: Duration::from_millis(args.rate_limit_sync_ms.clamp(10, 60_000)),
        ..defaults
    })
}

/// This node's name: the flag, else a random id created once in the state directory, so that a
/// restarted server recognises the runs its previous life held.
fn node_name(settings: &ServeSettings, state_dir: &std::path::Path) -> anyhow::Result<String> {
    if let Some(n) = &settings.node_name {
        return Ok(n.clone());
    }
    let file = state_dir.join("node-id");
    if let Ok(id) = std::fs::read_to_string(&file)
        && !id.trim().is_empty()
    {
        return Ok(id.trim().to_string());
    }
    let id = format!("node_{}", uuid::Uuid::new_v4().simple());
    std::fs::create_dir_all(state_dir)
        .and_then(|_| std::fs::write(&file, &id))
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(id)
}

/// Opens the database of runs and keys (`--runs-db`, else `<state-dir>/agentry.db`).
pub(crate) async fn open_store(settings: &ServeSettings) -> anyhow::Result<Arc<SqliteStore>> {
    let state_dir = std::path::absolute(&settings.state_dir)?;
    let path = settings
        .runs_db_path
        .clone()
        .unwrap_or_else(|| state_dir.join("agentry.db"));
    let options = SqliteOptions {
        durability: if settings.runs_db_fsync {
            Durability::Full
        } else {
            Durability::Normal
        },
        busy_timeout: settings.runs_db_busy_timeout,
        ..SqliteOptions::default()
    };
    let shown = path.display().to_string();
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path, options))
        .await?
        .map_err(|e| anyhow::anyhow!("cannot open the database {shown}: {e}"))?;
    Ok(Arc::new(store))
}

/// Starts the engine over the served agents.
async fn start_engine(
    settings: &ServeSettings,
    agents: &[Arc<Agent>],
    store: Arc<SqliteStore>,
) -> anyhow::Result<Engine> {
    let state_dir = std::path::absolute(&settings.state_dir)?;
    let mut engine_agents = HashMap::new();
    for a in agents {
        let has_async = a
            .config
            .entrypoints
            .iter()
            .filter_map(|e| a.pool.entrypoint(&e.tag))
            .any(|r| r.is_async());
        // Runs beyond what the workers run at once wait in the pool, already leased, in FIFO
        // order; their deadline starts when a worker takes them. Claiming well ahead keeps the
        // workers busy between two claims.
        let per_worker = if has_async {
            settings.max_async_per_worker
        } else {
            settings.pipeline_depth * 16
        };
        let default_cap = a.pool.live_workers().max(1) * per_worker.max(1);
        engine_agents.insert(
            a.config.agent_id.clone(),
            EngineAgent {
                pool: a.pool.clone(),
                max_running: settings.max_running_runs_per_agent.unwrap_or(default_cap),
            },
        );
    }
    let engine_settings = EngineSettings {
        node: node_name(settings, &state_dir)?,
        max_running: settings.max_running_runs,
        lease_ttl: settings.lease_ttl,
        heartbeat_every: settings.lease_ttl / 3,
        heartbeat_event_every: settings.heartbeat_event_every,
        reap_every: (settings.lease_ttl / 6).max(Duration::from_millis(200)),
        cancel_grace: settings.cancel_grace,
        retention: settings.run_retention,
        retention_every: settings.run_retention.map_or(Duration::from_secs(60), |r| {
            (r / 4).clamp(Duration::from_millis(100), Duration::from_secs(60))
        }),
        ..EngineSettings::default()
    };
    Engine::start(store, engine_agents, engine_settings)
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the run engine: {e}"))
}

/// Loads every agent folder, reporting every failure, not just the first.
fn load_configs(paths: &[std::path::PathBuf]) -> anyhow::Result<Vec<AgentConfig>> {
    let mut configs = Vec::new();
    let mut problems = Vec::new();
    for path in paths {
        match AgentConfig::load(path) {
            Ok(c) => {
                if let Some(e) = c
                    .entrypoints
                    .iter()
                    .find(|e| matches!(e.kind, EntrypointKind::Webhook { .. }))
                {
                    problems.push(format!(
                        "agent {} ({}): entrypoint `{}` is a webhook (n8n) entrypoint; Agentry does not serve those yet",
                        c.agent_name,
                        c.file.display(),
                        e.tag
                    ));
                    continue;
                }
                if let Some(other) = configs
                    .iter()
                    .find(|o: &&AgentConfig| o.agent_id == c.agent_id)
                {
                    problems.push(format!(
                        "agents {} and {} share the agent_id {}; each served agent needs its own",
                        other.dir.display(),
                        c.dir.display(),
                        c.agent_id
                    ));
                    continue;
                }
                configs.push(c);
            }
            Err(e) => problems.push(format!("configuration error: {e}")),
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(configs)
}

fn resolve_python(
    resolver: &PythonResolver,
    explicit: Option<&std::path::Path>,
    config: &AgentConfig,
) -> anyhow::Result<ResolvedPython> {
    let choice = match (explicit, &config.overrides.python) {
        (Some(p), _) => Some((p.to_path_buf(), "--python / AGENTRY_PYTHON")),
        (None, Some(p)) => Some((config.dir.join(p), "the agent's `agentry.python` setting")),
        (None, None) => None,
    };
    resolver
        .resolve(
            choice.as_ref().map(|(p, why)| (p.as_path(), *why)),
            &config.dir,
        )
        .with_context(|| format!("agent {} ({})", config.agent_name, config.dir.display()))
}

fn worker_spec(
    settings: &ServeSettings,
    config: &AgentConfig,
    python: &ResolvedPython,
    shim: &std::path::Path,
) -> WorkerSpec {
    WorkerSpec {
        agent: config.agent_name.clone(),
        python: python.executable.clone(),
        shim: shim.to_path_buf(),
        agent_dir: config.dir.clone(),
        spec_json: agentry_runner::shim_spec(config),
        env: config.env_vars.clone(),
        memory_limit_bytes: settings.worker_memory_mb.map(|mb| mb * 1024 * 1024),
        max_frame: settings.max_frame_bytes,
        start_timeout: settings.worker_start_timeout,
    }
}

fn describe_start_error(config: &AgentConfig, err: StartError) -> String {
    match err {
        StartError::Import(failures) => failures
            .iter()
            .map(|f| {
                let (file, module) = f.r#where.split_once(':').unwrap_or((&f.r#where, ""));
                let tb = f.traceback.trim_end();
                format!(
                    "agent {}: entrypoint `{}` (file {}, module {module}) cannot be loaded: {}: {}\n{}",
                    config.agent_name,
                    f.tag,
                    config.dir.join(file).display(),
                    f.r#type,
                    f.message,
                    indent(tb)
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
        StartError::Spawn(e) => format!("agent {}: cannot start a worker: {e}", config.agent_name),
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Checks that each `_stream` entrypoint can stream: a generator, or something returning an
/// iterable (only known at call time for plain functions, which RunAgent also accepts).
fn check_stream_kinds(config: &AgentConfig, pool: &AgentPool) -> Vec<String> {
    config
        .entrypoints
        .iter()
        .filter_map(|e| {
            let report = pool.entrypoint(&e.tag)?;
            (!e.is_streaming() && (report.kind == "generator" || report.kind == "asyncgen")).then(|| {
                format!(
                    "agent {}: entrypoint `{}` is a generator but its tag does not end in `_stream`, so RunAgent clients would receive the generator's repr instead of its chunks; rename the tag to `{}_stream`",
                    config.agent_name, e.tag, e.tag
                )
            })
        })
        .collect()
}

struct Started {
    agents: Vec<Arc<Agent>>,
    warnings: Vec<String>,
}

/// Loads, resolves and starts every agent's pool, concurrently.
async fn start_agents(
    settings: &ServeSettings,
    agent_args: &AgentArgs,
    workers: Option<usize>,
) -> anyhow::Result<Started> {
    let configs = load_configs(&agent_args.paths)?;
    // Absolute, because workers run inside their agent folder, not where `serve` was started.
    let state_dir = std::path::absolute(&settings.state_dir)
        .with_context(|| format!("bad state directory {}", settings.state_dir.display()))?;
    let shim = agentry_runner::install_shim(&state_dir.join("python"))
        .with_context(|| format!("cannot write the worker shim into {}", state_dir.display()))?;
    let resolver = PythonResolver::with_cache_file(state_dir.join("python-interpreters.json"));
    let mut pending = Vec::new();
    for config in configs {
        let python = resolve_python(&resolver, settings.python.as_deref(), &config)?;
        tracing::info!(
            agent.name = %config.agent_name,
            python = %python.executable.display(),
            "agent {} uses Python {} at {} ({})",
            config.agent_name,
            python.version,
            python.executable.display(),
            python.reason
        );
        let pool_config = PoolConfig {
            workers: workers
                .or(config.overrides.workers)
                .unwrap_or(settings.workers)
                .max(1),
            max_async_per_worker: settings.max_async_per_worker,
            pipeline_depth: settings.pipeline_depth,
            stream_window: settings.stream_window,
            ..PoolConfig::default()
        };
        let spec = worker_spec(settings, &config, &python, &shim);
        pending.push(async move {
            let pool = AgentPool::start(spec, pool_config).await;
            (config, python, pool)
        });
    }
    let mut agents = Vec::new();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    for (config, python, pool) in futures_util::future::join_all(pending).await {
        match pool {
            Ok(pool) => {
                warnings.extend(check_stream_kinds(&config, &pool));
                agents.push(Arc::new(Agent {
                    config,
                    pool,
                    python,
                    history_client_info: OnceLock::new(),
                }));
            }
            Err(e) => problems.push(describe_start_error(&config, e)),
        }
    }
    if !problems.is_empty() {
        for a in &agents {
            a.pool.shutdown(Duration::ZERO).await;
        }
        bail!("{}", problems.join("\n"));
    }
    Ok(Started { agents, warnings })
}

async fn bind(settings: &ServeSettings, db: Option<&RunAgentDb>) -> anyhow::Result<TcpListener> {
    if let Some(port) = settings.port {
        let addr = SocketAddr::new(settings.host, port);
        return TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"));
    }
    // RunAgent's policy: the first free port from 8450 that no agent row has recorded.
    let recorded = match db {
        Some(db) => db.recorded_ports().await.unwrap_or_default(),
        None => Default::default(),
    };
    for port in RUNAGENT_FIRST_PORT..=u16::MAX {
        if recorded.contains(&port) {
            continue;
        }
        if let Ok(listener) = TcpListener::bind(SocketAddr::new(settings.host, port)).await {
            return Ok(listener);
        }
    }
    bail!(
        "no free port from {RUNAGENT_FIRST_PORT} upward on {}",
        settings.host
    )
}

fn is_loopback(ip: IpAddr) -> bool {
    ip.is_loopback()
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = settings_from(&args)?;
    let t0 = Instant::now();
    let store = open_store(&settings).await?;
    let auth = Auth::load(
        Arc::clone(&store) as Arc<dyn agentry_core::KeyStore>,
        settings.auth_required,
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot read the API keys: {e}"))?;
    if !auth.enabled() && !is_loopback(settings.host) && !settings.insecure_no_auth {
        bail!(
            "refusing to serve {} without authentication: no API key exists, so anyone who can reach this address could run your agents. Create one with `agentry keys create --scope invoke` (authentication turns on with the first key), bind 127.0.0.1 (the default), or pass --insecure-no-auth if a trusted proxy guards it",
            settings.host
        );
    }
    let db_path = settings
        .runagent_db_path
        .clone()
        .unwrap_or_else(RunAgentDb::default_path);
    let db_open = async {
        if settings.runagent_db {
            Some(RunAgentDb::open(&db_path).await)
        } else {
            None
        }
    };
    let (started, db) = tokio::join!(start_agents(&settings, &args.agents, args.workers), db_open);
    let Started { agents, warnings } = started?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let db = match db {
        Some(Ok(db)) => Some(db),
        Some(Err(e)) => {
            tracing::warn!(
                "RunAgent's database {} is unavailable ({e}); serving without discovery and invocation history",
                db_path.display()
            );
            None
        }
        None => None,
    };
    let engine = match start_engine(&settings, &agents, store).await {
        Ok(e) => e,
        Err(e) => {
            for a in &agents {
                a.pool.shutdown(Duration::ZERO).await;
            }
            return Err(e);
        }
    };
    let listener = bind(&settings, db.as_ref()).await?;
    let addr = listener.local_addr()?;
    if let Some(db) = &db {
        for a in &agents {
            if let Err(e) = db
                .register_serving(&a.config, &addr.ip().to_string(), addr.port())
                .await
            {
                tracing::warn!(
                    "cannot record agent {} in RunAgent's database: {e}",
                    a.config.agent_id
                );
            }
        }
    }
    let history = db.as_ref().map(|db| db.start_invocation_log(16_384));
    let bound = OnceLock::new();
    let _ = bound.set(addr);
    let limits = RateLimits::new(&settings.caller_rate_limits, &settings.agent_rate_limits);
    let shared_buckets: Option<Arc<dyn agentry_core::SharedBuckets>> = match &settings
        .rate_limit_postgres
    {
        None => None,
        Some(_) if limits.is_empty() => {
            tracing::warn!(
                "--rate-limit-postgres is set but no rate limit is configured: nothing to share"
            );
            None
        }
        Some(url) => {
            let store = agentry_store::PgBuckets::connect(url).await.map_err(|e| {
                anyhow::anyhow!("--rate-limit-postgres: cannot use the database: {e}")
            })?;
            tracing::info!(
                "rate limits are shared with the other nodes through PostgreSQL, synced every {} ms",
                settings.rate_limit_sync.as_millis()
            );
            Some(Arc::new(store))
        }
    };
    let state = Arc::new(AppState {
        agents,
        settings,
        started: Instant::now(),
        runagent_db: db,
        history: history.clone(),
        bound,
        draining: Default::default(),
        engine: engine.clone(),
        auth: Arc::clone(&auth),
        limits,
        openapi: Default::default(),
    });
    if !state.limits.is_empty() {
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                st.limits.shrink();
            }
        });
        if let Some(store) = shared_buckets {
            let st = Arc::clone(&state);
            let every = st.settings.rate_limit_sync;
            tokio::spawn(async move { st.limits.share(store, every).await });
        }
    }
    auth.spawn_maintenance();
    let app = agentry_api::router(Arc::clone(&state));
    for a in &state.agents {
        tracing::info!(
            "serving agent {} ({}) with {} warm worker(s): http://{addr}/v1/agents/{}  (RunAgent: http://{addr}/api/v1/agents/{}/run)",
            a.config.agent_name,
            a.config.agent_id,
            a.pool.live_workers(),
            a.config.agent_name,
            a.config.agent_id
        );
    }
    let auth_line = if auth.enabled() {
        format!(
            "authentication is on: {} active API key(s)",
            auth.active_keys()
        )
    } else if is_loopback(addr.ip()) {
        "authentication is off: no API key exists; it turns on with the first `agentry keys create`"
            .to_string()
    } else {
        "authentication is OFF on a non-loopback address (--insecure-no-auth)".to_string()
    };
    tracing::info!(
        "ready on http://{addr} in {} ms ({auth_line})",
        t0.elapsed().as_millis()
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let limits = ConnectionLimits {
        max_connections: state.settings.max_connections,
        header_read_timeout: state.settings.header_read_timeout,
        max_header_bytes: state.settings.max_header_bytes,
    };
    let server = agentry_api::server::serve(listener, app, limits, stop_rx);
    let server = tokio::spawn(async move { server.await });
    shutdown_signal().await;
    tracing::info!(
        "shutting down: no new connections; in-flight calls get {:?}",
        state.settings.shutdown_grace
    );
    state.draining.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    let grace = state.settings.shutdown_grace;
    // Runs still executing after the grace are left leased: the next start requeues them.
    let runs = engine.shutdown(grace);
    let calls = futures_util::future::join_all(state.agents.iter().map(|a| a.pool.shutdown(grace)));
    tokio::join!(runs, calls);
    // Workers are gone, so every request still open ends promptly; don't wait on idle sockets.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    if let Some(h) = &history {
        let _ = tokio::time::timeout(Duration::from_secs(2), h.flush()).await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

pub async fn validate(args: ValidateArgs) -> anyhow::Result<()> {
    let settings = ServeSettings {
        state_dir: args.agents.state_dir.clone(),
        python: args.agents.python.clone(),
        ..ServeSettings::default()
    };
    let Started { agents, warnings } = start_agents(&settings, &args.agents, Some(1)).await?;
    let mut report = Vec::new();
    for a in &agents {
        let c = &a.config;
        let entrypoints: Vec<serde_json::Value> = c
            .entrypoints
            .iter()
            .map(|e| {
                let r = a.pool.entrypoint(&e.tag);
                serde_json::json!({
                    "tag": e.tag, "streaming": e.is_streaming(), "kind": r.map(|r| r.kind.clone()),
                    "input_schema": r.map(|r| r.schema.clone()), "doc": r.and_then(|r| r.doc.clone()),
                })
            })
            .collect();
        report.push(serde_json::json!({
            "agent_id": c.agent_id, "agent_name": c.agent_name, "dir": c.dir, "config_file": c.file,
            "python": {"executable": a.python.executable, "version": a.python.version, "chosen_because": a.python.reason},
            "entrypoints": entrypoints,
        }));
        a.pool.shutdown(Duration::ZERO).await;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"agents": report, "warnings": warnings})
            )?
        );
        return Ok(());
    }
    for (a, r) in agents.iter().zip(&report) {
        println!(
            "agent {} ({}) — {}",
            a.config.agent_name,
            a.config.agent_id,
            a.config.file.display()
        );
        println!(
            "  python {} at {} ({})",
            a.python.version,
            a.python.executable.display(),
            a.python.reason
        );
        for e in r["entrypoints"].as_array().into_iter().flatten() {
            let params = e["input_schema"]["properties"]
                .as_object()
                .map(|p| p.keys().cloned().collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            println!(
                "  ok  {:<24} {:<10} {}({params})",
                e["tag"].as_str().unwrap_or_default(),
                e["kind"].as_str().unwrap_or_default(),
                if e["streaming"].as_bool() == Some(true) {
                    "stream "
                } else {
                    ""
                }
            );
        }
    }
    for w in &warnings {
        println!("warning: {w}");
    }
    println!("{} agent(s) valid", agents.len());
    Ok(())
}
