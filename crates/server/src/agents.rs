//! Starting the served agents: each folder's configuration is read (with its settings from
//! `agentry.toml` applied), its interpreter resolved, and its warm workers started, all agents
//! at once. Every problem is reported, not just the first.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agentry_core::{AgentConfig, Config, EntrypointKind};
use agentry_engine::ServedAgent;
use agentry_runner::{
    AgentPool, PoolConfig, PythonResolver, ResolvedPython, StartError, WorkerSpec,
};
use anyhow::{Context, bail};

/// The agents started, and what is worth a warning about them.
pub struct Started {
    pub agents: Vec<Arc<ServedAgent>>,
    pub warnings: Vec<String>,
}

/// Loads every agent folder of `config.agent_dirs`.
fn load_configs(config: &Config) -> anyhow::Result<Vec<AgentConfig>> {
    let mut configs: Vec<AgentConfig> = Vec::new();
    let mut problems = Vec::new();
    for path in &config.agent_dirs {
        let mut c = match AgentConfig::load(path) {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("configuration error: {e}"));
                continue;
            }
        };
        if let Some(other) = configs.iter().find(|o| o.agent_id == c.agent_id) {
            problems.push(format!(
                "agents {} and {} share the agent_id {}; each served agent needs its own",
                other.dir.display(),
                c.dir.display(),
                c.agent_id
            ));
            continue;
        }
        // Keys, routes and the agent restriction name agents by id or name: each must name one.
        if let Some(other) = configs.iter().find(|o| {
            o.agent_name == c.agent_name || o.agent_id == c.agent_name || o.agent_name == c.agent_id
        }) {
            problems.push(format!(
                "agents {} and {} would share the name `{}`: an agent's name or id must not be another served agent's name or id",
                other.dir.display(),
                c.dir.display(),
                if other.agent_name == c.agent_name || other.agent_id == c.agent_name {
                    &c.agent_name
                } else {
                    &c.agent_id
                }
            ));
            continue;
        }
        if let Err(e) = config.apply_entrypoint_settings(&mut c) {
            problems.push(format!("configuration error: {e}"));
            continue;
        }
        configs.push(c);
    }
    for name in config.agents.keys() {
        if !configs
            .iter()
            .any(|c| &c.agent_name == name || &c.agent_id == name)
            && problems.is_empty()
        {
            problems.push(format!(
                "configuration error: agents.{name}: no agent served here has that name or id"
            ));
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(configs)
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

/// The TLS settings of every outbound call (`outbound.ca_file`), built once per start.
pub fn outbound_tls(config: &Config) -> anyhow::Result<agentry_remote::OutboundTls> {
    agentry_remote::OutboundTls::load(config.outbound.ca_file.as_deref())
        .map_err(anyhow::Error::msg)
}

/// Loads, resolves and starts every agent's pool, concurrently. `state_dir` is absolute.
/// `workers` overrides every agent's worker count (`validate` starts one each).
pub async fn start(
    config: &Config,
    state_dir: &Path,
    workers: Option<usize>,
    tls: &agentry_remote::OutboundTls,
) -> anyhow::Result<Started> {
    let configs = load_configs(config)?;
    let shim = agentry_runner::install_shim(&state_dir.join("python"))
        .with_context(|| format!("cannot write the worker shim into {}", state_dir.display()))?;
    let resolver = PythonResolver::with_cache_file(state_dir.join("python-interpreters.json"));
    let mut pending = Vec::new();
    let mut agents = Vec::new();
    let mut problems = Vec::new();
    for agent in configs {
        let settings = config.resolve_agent(&agent);
        let named = match named_executors(config, &agent, tls) {
            Ok(named) => named,
            Err(why) => {
                problems.push(format!(
                    "agent {} ({}): {why}",
                    agent.agent_name,
                    agent.dir.display()
                ));
                continue;
            }
        };
        match elsewhere(config, &agent, tls) {
            Ok(None) => {}
            Ok(Some((executor, runtime))) => {
                tracing::info!(agent.name = %agent.agent_name, "agent {} runs {}", agent.agent_name, runtime.reason);
                agents.push(Arc::new(ServedAgent {
                    config: agent,
                    executor,
                    runtime,
                    max_running_runs: settings.max_running_runs,
                    named_executors: named,
                }));
                continue;
            }
            Err(why) => {
                problems.push(format!(
                    "agent {} ({}): {why}",
                    agent.agent_name,
                    agent.dir.display()
                ));
                continue;
            }
        }
        let python = resolver
            .resolve(
                settings.python.as_ref().map(|(p, why)| (p.as_path(), *why)),
                &agent.dir,
            )
            .with_context(|| format!("agent {} ({})", agent.agent_name, agent.dir.display()))?;
        tracing::info!(
            agent.name = %agent.agent_name,
            python = %python.executable.display(),
            "agent {} uses Python {} at {} ({})",
            agent.agent_name,
            python.version,
            python.executable.display(),
            python.reason
        );
        let w = &config.workers;
        let pool_config = PoolConfig {
            workers: workers.unwrap_or(settings.workers).max(1),
            max_async_per_worker: w.max_async_per_worker,
            pipeline_depth: w.pipeline_depth,
            pipeline_below: w.pipeline_below(),
            stream_window: w.stream_window,
            cancel_grace: w.call_cancel_grace(),
            run_cancel_grace: config.runs.cancel_grace(),
        };
        let spec = WorkerSpec {
            agent: agent.agent_name.clone(),
            python: python.executable.clone(),
            shim: shim.clone(),
            agent_dir: agent.dir.clone(),
            spec_json: agentry_runner::shim_spec(&agent),
            env: agent.env_vars.clone(),
            memory_limit_bytes: settings.memory_limit_bytes,
            max_frame: w.max_frame_bytes,
            start_timeout: w.start_timeout(),
        };
        pending.push(async move {
            let pool = AgentPool::start(spec, pool_config).await;
            (agent, python, settings, pool, named)
        });
    }
    let mut warnings = Vec::new();
    for (agent, python, settings, pool, named) in futures_util::future::join_all(pending).await {
        match pool {
            Ok(pool) => {
                warnings.extend(check_stream_kinds(&agent, &pool));
                agents.push(served(
                    agent,
                    pool,
                    python,
                    settings.max_running_runs,
                    named,
                ));
            }
            Err(e) => problems.push(describe_start_error(&agent, e)),
        }
    }
    if !problems.is_empty() {
        for a in &agents {
            a.executor.drain(Duration::ZERO).await;
        }
        bail!("{}", problems.join("\n"));
    }
    Ok(Started { agents, warnings })
}

/// The executor of an agent whose code does not run in local workers: a remote server
/// (`[agents.<name>.remote]`) or its n8n-style webhooks; `None` for a Python agent served here.
fn elsewhere(
    config: &Config,
    agent: &AgentConfig,
    tls: &agentry_remote::OutboundTls,
) -> Result<
    Option<(
        Arc<dyn agentry_core::executor::AgentExecutor>,
        agentry_core::executor::Runtime,
    )>,
    String,
> {
    let remote = config
        .agent(&agent.agent_name, &agent.agent_id)
        .and_then(|a| a.remote.as_ref());
    let webhooks = agent
        .entrypoints
        .iter()
        .any(|e| matches!(e.kind, EntrypointKind::Webhook { .. }));
    match (remote, webhooks) {
        (Some(_), true) => Err(
            "webhook entrypoints call their URLs themselves; they take no `remote` server".into(),
        ),
        (Some(r), false) => {
            let executor = remote_agent(r, &agent.agent_id, tls)?;
            Ok(Some((
                Arc::new(executor),
                agentry_core::executor::Runtime {
                    executable: r.url.clone().into(),
                    version: "remote".into(),
                    reason: format!("on the remote server {} (RunAgent's protocol)", r.url),
                },
            )))
        }
        (None, true) => Ok(Some((
            Arc::new(agentry_remote::WebhookAgent::new(agent, tls)?),
            agentry_core::executor::Runtime {
                executable: "webhook".into(),
                version: "n8n".into(),
                reason: "its n8n-style webhook entrypoints".into(),
            },
        ))),
        (None, false) => Ok(None),
    }
}

/// The served agent. Without a configured cap, the pool says how many of its runs to lease at
/// once (`AgentExecutor::run_capacity`), from its live workers and what it learnt of its
/// entrypoints.
fn served(
    agent: AgentConfig,
    pool: AgentPool,
    python: ResolvedPython,
    max_running_runs: Option<usize>,
    named_executors: NamedExecutors,
) -> Arc<ServedAgent> {
    Arc::new(ServedAgent {
        config: agent,
        executor: Arc::new(pool),
        runtime: python,
        max_running_runs,
        named_executors,
    })
}

type NamedExecutors =
    std::collections::BTreeMap<String, Arc<dyn agentry_core::executor::AgentExecutor>>;

/// The executors a run of this agent may name (`[agents.<name>.executors.<x>]`).
fn named_executors(
    config: &Config,
    agent: &AgentConfig,
    tls: &agentry_remote::OutboundTls,
) -> Result<NamedExecutors, String> {
    let mut out = NamedExecutors::new();
    let Some(own) = config.agent(&agent.agent_name, &agent.agent_id) else {
        return Ok(out);
    };
    for (name, settings) in &own.executors {
        if name.is_empty() || name.len() > 64 {
            return Err(format!("executors.{name}: a name is 1 to 64 characters"));
        }
        let remote = remote_agent(settings, &agent.agent_id, tls)
            .map_err(|e| format!("executors.{name}: {e}"))?;
        out.insert(name.clone(), Arc::new(remote));
    }
    Ok(out)
}

/// A remote server's executor, with its API key read from where the settings say.
fn remote_agent(
    settings: &agentry_core::settings::RemoteSettings,
    agent_id: &str,
    tls: &agentry_remote::OutboundTls,
) -> Result<agentry_remote::RemoteAgent, String> {
    if settings.api_key_env.is_some() && settings.api_key_file.is_some() {
        return Err("remote: give api_key_env or api_key_file, not both".into());
    }
    // Agentry's own settings (the database URL, the callback secret) are never sent out; an
    // agent folder's `agentry.agent.toml` may name the variable.
    if let Some(var) = &settings.api_key_env
        && (var.is_empty() || var.to_ascii_uppercase().starts_with("AGENTRY_"))
    {
        return Err(format!(
            "remote: api_key_env `{var}` cannot be used (empty, or one of Agentry's own `AGENTRY_*` variables)"
        ));
    }
    let api_key = crate::secrets::read(
        settings.api_key_env.as_deref(),
        settings.api_key_file.as_deref(),
    )
    .map_err(|e| format!("remote api key: {e}"))?;
    let remote = agentry_remote::RemoteAgent::new(settings, agent_id, api_key.as_deref(), tls)?;
    if api_key.is_some() && !remote.is_private_link() {
        tracing::warn!(
            "the API key of the remote server {} goes over plain http:// to a non-loopback address: anyone on the path can read it; use https://",
            settings.url
        );
    }
    Ok(remote)
}

/// The file beside an agent's `runagent.config.json` that holds its Agentry settings.
pub const AGENT_FILE: &str = "agentry.agent.toml";

/// Folds each agent folder's `agentry.agent.toml` into `config.agents`, under what
/// `agentry.toml` says of the same agent (which wins setting by setting). A folder whose
/// RunAgent configuration cannot be read is left to the start to report.
pub fn merge_agent_files(config: &mut Config) -> anyhow::Result<()> {
    use figment::providers::{Format, Toml};
    for dir in config.agent_dirs.clone() {
        let file = dir.join(AGENT_FILE);
        if !file.is_file() {
            continue;
        }
        let Ok(agent) = AgentConfig::load(&dir) else {
            continue;
        };
        let from_folder: agentry_core::settings::AgentSettings =
            figment::Figment::from(Toml::file(&file))
                .extract()
                .with_context(|| format!("configuration error: {}", file.display()))?;
        let key = [&agent.agent_name, &agent.agent_id]
            .into_iter()
            .find(|k| config.agents.contains_key(k.as_str()))
            .unwrap_or(&agent.agent_name)
            .clone();
        let own = config.agents.remove(&key).unwrap_or_default();
        config.agents.insert(key, own.over(from_folder));
    }
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("configuration error: {e}"))
}
