//! The application in the test process: `Application::build` on port 0 with real Python
//! workers, a fresh state directory and a fresh RunAgent database, served on the test's own
//! runtime. For tests that need no separate process (signals, crashes, logs and the CLI keep
//! the spawned binary of `Server`).

use std::path::PathBuf;

use agentry_core::settings::{FIELDS, FieldKind};
use agentry_server::config::{ConfigFile, Sources};
use agentry_server::{Application, Config};
use serde_json::json;
use tokio::sync::oneshot;

/// Builds a `TestApp` from `serve` flags, as `ServerBuilder` builds a `Server`: the flags are
/// read through the same settings table and loader as the binary's.
pub struct AppBuilder {
    agents: Vec<PathBuf>,
    args: Vec<String>,
}

/// An in-process application serving `agent` (add flags, then `start().await`).
pub fn app(agent: PathBuf) -> AppBuilder {
    AppBuilder {
        agents: vec![agent],
        args: Vec::new(),
    }
}

impl AppBuilder {
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }
    pub fn agent(mut self, p: PathBuf) -> Self {
        self.agents.push(p);
        self
    }
    /// Use this state directory.
    pub fn state_dir(self, p: &std::path::Path) -> Self {
        self.args(["--state-dir".to_string(), p.display().to_string()])
    }

    /// The flags as settings, by the table `agentry serve` uses.
    fn settings(&self) -> Vec<(&'static str, serde_json::Value)> {
        let mut out = Vec::new();
        let mut args = self.args.iter();
        while let Some(arg) = args.next() {
            let name = arg
                .strip_prefix("--")
                .unwrap_or_else(|| panic!("not a flag: {arg}"));
            let field = FIELDS
                .iter()
                .find(|f| f.flag == Some(name))
                .unwrap_or_else(|| panic!("no such serve flag: --{name}"));
            let value = match field.kind {
                FieldKind::Flag => json!(true),
                FieldKind::Negated => json!(false),
                kind => {
                    let text = args
                        .next()
                        .unwrap_or_else(|| panic!("--{name} needs a value"));
                    match kind {
                        FieldKind::Number => serde_json::from_str(text).expect("a number"),
                        FieldKind::List => json!(text.split(',').collect::<Vec<_>>()),
                        _ => json!(text),
                    }
                }
            };
            out.push((field.key, value));
        }
        out
    }

    pub async fn start(self) -> TestApp {
        let settings = self.settings();
        TestApp::start(self.agents, move |config| {
            let loaded = agentry_server::config::load(Sources {
                file: ConfigFile::None,
                env: Vec::new(),
                flags: settings,
            })
            .expect("the flags make a valid configuration");
            let defaults = Config::default();
            // Keep the harness's choices unless a flag changed them.
            let (state_dir, port, workers, history) = (
                config.state_dir.clone(),
                config.http.port,
                config.workers.count,
                config.store.runagent_db_path.clone(),
            );
            *config = loaded.config;
            if config.state_dir == defaults.state_dir {
                config.state_dir = state_dir;
            }
            if config.http.port.is_none() {
                config.http.port = port;
            }
            if config.workers.count.is_none() {
                config.workers.count = workers;
            }
            if config.store.runagent_db_path.is_none() {
                config.store.runagent_db_path = history;
            }
        })
        .await
    }
}

/// A running application. Stopped (gracefully) by `stop`, or with the test's runtime.
pub struct TestApp {
    pub base: String,
    pub port: u16,
    /// What the handlers share, to look inside (the engine's hub, the agents).
    pub state: std::sync::Arc<agentry_api::AppState>,
    stop: Option<oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The state and cache directories, removed when the app is dropped.
    _dirs: tempfile::TempDir,
}

impl super::Served for TestApp {
    fn url(&self, path: &str) -> String {
        TestApp::url(self, path)
    }
}

impl TestApp {
    /// Serves `agent` with the harness's defaults (two workers per agent).
    pub async fn serve(agent: PathBuf) -> Self {
        Self::start(vec![agent], |_| {}).await
    }

    /// What starting `agents` (one worker each, no RunAgent database) says once `configure`
    /// changed the configuration: `started`, or the error of validation or of the start.
    pub async fn start_error(agents: Vec<PathBuf>, configure: impl FnOnce(&mut Config)) -> String {
        let state = tempfile::tempdir().expect("state");
        let mut config = Config {
            agent_dirs: agents,
            state_dir: state.path().to_path_buf(),
            ..Default::default()
        };
        config.http.port = Some(0);
        config.workers.count = Some(1);
        config.store.runagent_db = false;
        configure(&mut config);
        if let Err(e) = config.validate() {
            return e.to_string();
        }
        match Application::build(config).await {
            Ok(_) => "started".to_string(),
            Err(e) => format!("{e:#}"),
        }
    }

    /// Serves `agents`; `configure` changes the configuration first.
    pub async fn start(agents: Vec<PathBuf>, configure: impl FnOnce(&mut Config)) -> Self {
        let dirs = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.agent_dirs = agents;
        config.state_dir = dirs.path().join("state");
        config.http.port = Some(0);
        config.workers.count = Some(2);
        config.store.runagent_db_path = Some(dirs.path().join("runagent-cache/runagent_local.db"));
        let agent_dirs = config.agent_dirs.clone();
        configure(&mut config);
        config.agent_dirs = agent_dirs;
        config.validate().expect("a valid configuration");
        let app = Application::build(config)
            .await
            .expect("the application starts");
        let port = app.addr().port();
        let state = std::sync::Arc::clone(app.state());
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Self {
            base: format!("http://127.0.0.1:{port}"),
            port,
            state,
            stop: Some(stop),
            serving: Some(serving),
            _dirs: dirs,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    /// Shuts the application down as SIGTERM would, and waits until it has.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(serving) = self.serving.take() {
            serving
                .await
                .expect("the server task")
                .expect("a clean shutdown");
        }
    }
}
