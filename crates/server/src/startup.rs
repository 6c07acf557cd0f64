//! The application: `Application::build(config)` opens the stores, starts the agents, binds,
//! starts the engine and the background tasks; `run_until_stopped(shutdown)` serves until the
//! shutdown future resolves, then stops in order (readiness off, no new connections, the
//! engine and the workers get the grace period, history is flushed).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use agentry_api::AppState;
use agentry_api::auth::Auth;
use agentry_api::limits::RateLimits;
use agentry_api::server::ConnectionLimits;
use agentry_core::InvocationHistory;
use agentry_core::RunStore;
use agentry_core::nodes::NodeRole;
use agentry_core::store::{CallbackStore, TriggerStore};
use agentry_core::{Config, KeyStore, ScheduleStore, SharedBuckets};
use agentry_engine::{Agents, Engine, EngineSettings};
use agentry_store::{
    Durability, History, HistoryBounds, PgHistory, PgOptions, PgStore, RunAgentDb, SqliteOptions,
    SqliteStore,
};
use anyhow::{Context, bail};
use tokio::net::TcpListener;

use crate::lock::StateLock;

/// First port of RunAgent's policy.
const RUNAGENT_FIRST_PORT: u16 = 8450;

/// A built application, bound and ready to serve.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    state: Arc<AppState>,
    app: axum::Router,
    history: Option<Arc<dyn InvocationHistory>>,
    /// Held until the application has stopped.
    lock: StateLock,
}

/// The state directory, absolute: workers run inside their agent folders, not where the
/// server was started.
pub fn state_dir(config: &Config) -> anyhow::Result<PathBuf> {
    std::path::absolute(&config.state_dir)
        .with_context(|| format!("bad state directory {}", config.state_dir.display()))
}

/// Where runs and API keys live: SQLite (one node) or PostgreSQL (many).
#[derive(Clone)]
pub struct Stores {
    pub runs: Arc<dyn RunStore>,
    pub keys: Arc<dyn KeyStore>,
    pub schedules: Arc<dyn ScheduleStore>,
    /// The callback outbox.
    pub callbacks: Arc<dyn CallbackStore>,
    pub triggers: Arc<dyn TriggerStore>,
    /// Rate-limit buckets in the same database (PostgreSQL only): what shared limits use when
    /// no other database is named for them.
    pub buckets: Option<Arc<dyn SharedBuckets>>,
    /// RunAgent's invocation history in the same database (PostgreSQL only), shared by the
    /// nodes on it.
    pub history: Option<PgHistory>,
    /// The SQLite store, to close its writer at the end.
    sqlite: Option<Arc<SqliteStore>>,
}

impl Stores {
    /// Lets queued writes finish (SQLite's writer thread); PostgreSQL's pool closes on drop.
    pub fn close(&self) {
        if let Some(s) = &self.sqlite {
            s.close();
        }
    }
}

/// How to reach PostgreSQL, when runs are kept there (`store.database_url`).
pub fn pg_options(config: &Config) -> Option<PgOptions> {
    let url = config.store.database_url.as_ref()?;
    Some(PgOptions {
        url: url.clone(),
        max_connections: config.store.database_max_connections,
        batches_in_flight: config.store.database_batches_in_flight,
        acquire_timeout: Duration::from_secs(5),
        schema: config.store.database_schema.clone(),
    })
}

/// Opens the database of runs and keys: PostgreSQL when `store.database_url` is set, else the
/// SQLite file (`store.path`, else `<state_dir>/agentry.db`).
pub async fn open_store(config: &Config) -> anyhow::Result<Stores> {
    if let Some(options) = pg_options(config) {
        let store = PgStore::connect(&options).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot use the PostgreSQL database {}: {e}",
                crate::config::redact_url(&options.url)
            )
        })?;
        let store = Arc::new(store);
        return Ok(Stores {
            runs: Arc::clone(&store) as Arc<dyn RunStore>,
            buckets: Some(Arc::new(store.shared_buckets()) as Arc<dyn SharedBuckets>),
            history: Some(store.shared_history()),
            schedules: Arc::clone(&store) as Arc<dyn ScheduleStore>,
            callbacks: Arc::clone(&store) as Arc<dyn CallbackStore>,
            triggers: Arc::clone(&store) as Arc<dyn TriggerStore>,
            keys: store as Arc<dyn KeyStore>,
            sqlite: None,
        });
    }
    let path = config.store.runs_db_path(&state_dir(config)?);
    let options = SqliteOptions {
        durability: if config.store.fsync {
            Durability::Full
        } else {
            Durability::Normal
        },
        busy_timeout: config.store.busy_timeout(),
        ..SqliteOptions::default()
    };
    let shown = path.display().to_string();
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path, options))
        .await?
        .map_err(|e| anyhow::anyhow!("cannot open the database {shown}: {e}"))?;
    let store = Arc::new(store);
    Ok(Stores {
        runs: Arc::clone(&store) as Arc<dyn RunStore>,
        keys: Arc::clone(&store) as Arc<dyn KeyStore>,
        schedules: Arc::clone(&store) as Arc<dyn ScheduleStore>,
        callbacks: Arc::clone(&store) as Arc<dyn CallbackStore>,
        triggers: Arc::clone(&store) as Arc<dyn TriggerStore>,
        buckets: None,
        history: None,
        sqlite: Some(store),
    })
}

/// This node's name: as configured, else a random id created once in the state directory, so
/// that a restarted server recognises the runs its previous life held.
fn node_name(config: &Config, state_dir: &Path) -> anyhow::Result<String> {
    if let Some(n) = &config.node_name {
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

/// Where this node runs from: its state directory's id (created once), its path, and this
/// machine's host name and boot: the node registry lets a process holding that directory's lock
/// take over its node name at once from a holder that died. The machine's part keeps a copied
/// state directory (a cloned volume, an image with the directory baked in) from passing for the
/// same home on another host.
fn node_home(state_dir: &Path) -> anyhow::Result<String> {
    let kernel = |key: &str| {
        std::fs::read_to_string(format!("/proc/sys/kernel/{key}"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    Ok(format!(
        "{}:{}@{}/{}",
        state_id(state_dir)?,
        state_dir.display(),
        kernel("hostname"),
        kernel("random/boot_id")
    ))
}

fn state_id(state_dir: &Path) -> anyhow::Result<String> {
    let file = state_dir.join("state-id");
    if let Ok(id) = std::fs::read_to_string(&file)
        && !id.trim().is_empty()
    {
        return Ok(id.trim().to_string());
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    std::fs::create_dir_all(state_dir)
        .and_then(|_| std::fs::write(&file, &id))
        .with_context(|| format!("cannot write {}", file.display()))?;
    Ok(id)
}

async fn bind(config: &Config, db: Option<&RunAgentDb>) -> anyhow::Result<TcpListener> {
    let host = config.http.host;
    if let Some(port) = config.http.port {
        let addr = SocketAddr::new(host, port);
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
        if let Ok(listener) = TcpListener::bind(SocketAddr::new(host, port)).await {
            return Ok(listener);
        }
    }
    bail!("no free port from {RUNAGENT_FIRST_PORT} upward on {host}")
}

/// The shared rate-limit store, when there is something to share: the database named for it
/// (`gateway.rate_limit_postgres`), else the run store's own PostgreSQL database.
async fn shared_buckets(
    config: &Config,
    limits: &RateLimits,
    in_run_store: Option<Arc<dyn SharedBuckets>>,
) -> anyhow::Result<Option<Arc<dyn SharedBuckets>>> {
    if limits.is_empty() {
        if config.gateway.rate_limit_postgres.is_some() {
            tracing::warn!(
                "--rate-limit-postgres is set but no rate limit is configured: nothing to share"
            );
        }
        return Ok(None);
    }
    let store: Arc<dyn SharedBuckets> =
        match &config.gateway.rate_limit_postgres {
            Some(url) => Arc::new(agentry_store::PgBuckets::connect(url).await.map_err(|e| {
                anyhow::anyhow!("--rate-limit-postgres: cannot use the database: {e}")
            })?),
            None => match in_run_store {
                Some(store) => store,
                None => return Ok(None),
            },
        };
    tracing::info!(
        "rate limits are shared with the other nodes through PostgreSQL, synced every {} ms",
        config.gateway.rate_limit_sync().as_millis()
    );
    Ok(Some(store))
}

/// Says what this node serves or executes, and that it is ready (the tests wait for this line).
fn log_ready(state: &AppState, role: NodeRole, auth: &Auth, addr: SocketAddr, t0: Instant) {
    if role == NodeRole::Worker {
        for a in state.agents.iter() {
            tracing::info!(
                "executing runs of agent {} ({}) with {} warm worker(s)",
                a.config.agent_name,
                a.config.agent_id,
                a.executor.health().live_workers,
            );
        }
        tracing::info!(
            "worker ready in {} ms; admin port http://{addr} (/healthz, /readyz, /metrics)",
            t0.elapsed().as_millis()
        );
        return;
    }
    for a in state.agents.iter() {
        tracing::info!(
            "serving agent {} ({}) with {} warm worker(s): http://{addr}/v1/agents/{}  (RunAgent: http://{addr}/api/v1/agents/{}/run)",
            a.config.agent_name,
            a.config.agent_id,
            a.executor.health().live_workers,
            a.config.agent_name,
            a.config.agent_id
        );
    }
    let auth_line = if auth.enabled() {
        format!(
            "authentication is on: {} active API key(s)",
            auth.active_keys()
        )
    } else if addr.ip().is_loopback() {
        "authentication is off: no API key exists; it turns on with the first `agentry keys create`"
            .to_string()
    } else {
        "authentication is OFF on a non-loopback address (--insecure-no-auth)".to_string()
    };
    tracing::info!(
        "ready on http://{addr} in {} ms ({auth_line})",
        t0.elapsed().as_millis()
    );
}

impl Application {
    /// Opens the stores, starts the agents' workers, binds the listener and starts the run
    /// engine. Nothing is served until `run_until_stopped`.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_as(config, NodeRole::Serve).await
    }

    /// An execution-only node (`agentry worker`): it claims and runs the runs of its agents
    /// from the shared PostgreSQL store, and serves only `/healthz`, `/readyz` and `/metrics`
    /// on its admin port (`http.port`; an OS-chosen one when unset, logged at start).
    pub async fn build_worker(config: Config) -> anyhow::Result<Self> {
        if config.store.database_url.is_none() {
            bail!(
                "a worker needs --database postgres://…: it executes the runs that serving nodes accept into a shared PostgreSQL; with the embedded store, `agentry serve` both accepts and executes"
            );
        }
        if config.runs.max_running == 0 {
            bail!("a worker with --max-running-runs 0 would execute nothing");
        }
        Self::build_as(config, NodeRole::Worker).await
    }

    async fn build_as(mut config: Config, role: NodeRole) -> anyhow::Result<Self> {
        let t0 = Instant::now();
        crate::agents::merge_agent_files(&mut config)?;
        if role == NodeRole::Worker {
            // A worker answers no RunAgent client: nothing to record in RunAgent's database,
            // and its admin port is not RunAgent's.
            config.store.runagent_db = false;
            if config.http.port.is_none() {
                config.http.port = Some(0);
            }
        }
        let state_dir = state_dir(&config)?;
        // Before anything is opened: a second server here must not touch the first one's runs.
        // With PostgreSQL many nodes share the database; the state directory is still one
        // node's alone (its node id, its workers' files).
        let sqlite_db = config
            .store
            .database_url
            .is_none()
            .then(|| config.store.runs_db_path(&state_dir));
        let mut lock = StateLock::acquire(&state_dir, sqlite_db.as_deref())?;
        let stores = open_store(&config).await?;
        let auth = Auth::load(Arc::clone(&stores.keys), config.gateway.auth_required())
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the API keys: {e}"))?;
        let host = config.http.host;
        if !auth.enabled() && !host.is_loopback() && !config.gateway.insecure_no_auth {
            bail!(
                "refusing to serve {host} without authentication: no API key exists, so anyone who can reach this address could run your agents. Create one with `agentry keys create --scope invoke` (authentication turns on with the first key), bind 127.0.0.1 (the default), or pass --insecure-no-auth if a trusted proxy guards it"
            );
        }
        let caller_limits = config.gateway.caller_rate_limits()?;
        let agent_limits = config.gateway.per_agent_rate_limits()?;
        let db_path = config
            .store
            .runagent_db_path
            .clone()
            .unwrap_or_else(RunAgentDb::default_path);
        let db_open = async {
            if config.store.runagent_db {
                Some(RunAgentDb::open(&db_path).await)
            } else {
                None
            }
        };
        let tls = crate::agents::outbound_tls(&config)?;
        let (started, db) = tokio::join!(
            crate::agents::start(&config, &state_dir, None, &tls),
            db_open
        );
        let started = started?;
        for w in &started.warnings {
            tracing::warn!("{w}");
        }
        let agents = Arc::new(Agents::new(started.agents));
        let hooks = match crate::hooks::resolve(&config, &agents) {
            Ok(h) => h,
            Err(e) => {
                agents.shutdown(Duration::ZERO).await;
                return Err(e);
            }
        };
        let event_triggers = match crate::hooks::event_triggers(&config, &agents) {
            Ok(t) => t,
            Err(e) => {
                agents.shutdown(Duration::ZERO).await;
                return Err(e);
            }
        };
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
        let listener = match bind(&config, db.as_ref()).await {
            Ok(l) => l,
            Err(e) => {
                agents.shutdown(Duration::ZERO).await;
                return Err(e);
            }
        };
        let addr = listener.local_addr()?;
        lock.record_address(addr);
        let mut engine_settings =
            EngineSettings::new(node_name(&config, &state_dir)?, &config.runs);
        engine_settings.role = role;
        engine_settings.home = node_home(&state_dir)?;
        let engine = match Engine::start(
            Arc::clone(&stores.runs),
            Arc::clone(&agents),
            engine_settings,
        )
        .await
        {
            Ok(e) => e,
            Err(e) => {
                agents.shutdown(Duration::ZERO).await;
                bail!("cannot start the run engine: {e}");
            }
        };
        let scheduler = agentry_engine::Scheduler::start(
            &engine,
            Arc::clone(&stores.schedules),
            agentry_engine::SchedulerSettings {
                workers: config.workers.clone(),
                runs: config.runs.clone(),
                schedules: config.schedules.clone(),
            },
        );
        match crate::callbacks::settings(&config, &state_dir) {
            Ok(settings) => agentry_engine::start_deliverer(
                &engine,
                Arc::clone(&stores.callbacks),
                Arc::new(crate::callbacks::HttpTransport::new(
                    config.callbacks.allow_private,
                    &tls,
                )?),
                settings,
            ),
            Err(e) => {
                engine.shutdown(Duration::ZERO).await;
                agents.shutdown(Duration::ZERO).await;
                return Err(e);
            }
        }
        if let Err(e) = agentry_engine::start_triggers(
            &engine,
            Arc::clone(&stores.triggers),
            event_triggers,
            agentry_engine::TriggerSettings {
                workers: config.workers.clone(),
                runs: config.runs.clone(),
                triggers: config.triggers.clone(),
            },
        )
        .await
        {
            engine.shutdown(Duration::ZERO).await;
            agents.shutdown(Duration::ZERO).await;
            bail!("cannot start the event triggers: {e}");
        }
        if role == NodeRole::Serve {
            let declared = match config.timers() {
                Ok(timers) => scheduler.declare_timers(&timers).await,
                Err(e) => Err(e.to_string()),
            };
            match declared {
                Ok(d) => {
                    if d.changed_anything() {
                        tracing::info!(
                            created = ?d.created,
                            changed = ?d.changed,
                            unchanged = ?d.unchanged,
                            deleted = ?d.deleted,
                            "timers declared"
                        );
                    }
                }
                Err(e) => {
                    engine.shutdown(Duration::ZERO).await;
                    agents.shutdown(Duration::ZERO).await;
                    bail!("configuration error: {e}");
                }
            }
        }
        if let Some(db) = &db {
            for a in agents.iter() {
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
        let (max_rows, max_age) = config.store.runagent_history_bounds();
        let bounds = HistoryBounds {
            max_rows,
            max_age,
            agents: agents.iter().map(|a| a.config.agent_id.clone()).collect(),
        };
        // On a shared database the history is the cluster's; RunAgent's own file keeps this
        // node's discovery row and call counters.
        let history: Option<Arc<dyn InvocationHistory>> = match stores.history.clone() {
            Some(shared) if config.store.runagent_db => Some(Arc::new(History::start_shared(
                shared.with_local(db),
                16_384,
                bounds,
            ))),
            _ => db.map(|db| {
                Arc::new(History::start(db, 16_384, bounds)) as Arc<dyn InvocationHistory>
            }),
        };
        let limits = RateLimits::new(&caller_limits, &agent_limits);
        let shared = shared_buckets(&config, &limits, stores.buckets.clone()).await?;
        let state = Arc::new(AppState {
            agents,
            config: Arc::new(config),
            started: Instant::now(),
            history: history.clone(),
            bound: addr,
            draining: Default::default(),
            engine,
            scheduler,
            callbacks: Arc::clone(&stores.callbacks),
            hooks,
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
            if let Some(store) = shared {
                let st = Arc::clone(&state);
                let every = st.config.gateway.rate_limit_sync();
                tokio::spawn(async move { st.limits.share(store, every).await });
            }
        }
        auth.spawn_maintenance();
        // Built before "ready" is said: the routes, their gates and the OpenAPI document.
        let app = match role {
            NodeRole::Serve => agentry_api::router(Arc::clone(&state)),
            NodeRole::Worker => agentry_api::admin_router(Arc::clone(&state)),
        };
        log_ready(&state, role, &auth, addr, t0);
        Ok(Self {
            listener,
            addr,
            state,
            app,
            history,
            lock,
        })
    }

    /// The address the listener is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the handlers share (the engine, the agents, the configuration).
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves until `shutdown` resolves, then shuts down: readiness turns off, the listener
    /// stops accepting, in-flight calls and runs get the grace period, then every worker is
    /// stopped. Runs still executing are handed back to the queue at once, without using up
    /// an attempt.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Self {
            listener,
            state,
            app,
            history,
            lock,
            ..
        } = self;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let limits = ConnectionLimits {
            max_connections: state.config.http.max_connections,
            header_read_timeout: state.config.http.header_read_timeout(),
            max_header_bytes: state.config.http.max_header_bytes,
        };
        let server = tokio::spawn(agentry_api::server::serve(listener, app, limits, stop_rx));
        shutdown.await;
        let grace = state.config.shutdown_grace();
        tracing::info!("shutting down: no new connections; in-flight calls get {grace:?}");
        state.draining.store(true, Ordering::SeqCst);
        let _ = stop_tx.send(true);
        tokio::join!(state.engine.shutdown(grace), state.agents.shutdown(grace));
        // Workers are gone, so every request still open ends promptly; don't wait on idle sockets.
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        if let Some(h) = &history {
            let _ = tokio::time::timeout(Duration::from_secs(2), h.flush()).await;
        }
        tracing::info!("stopped");
        drop(lock);
        Ok(())
    }
}
