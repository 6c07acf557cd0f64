//! The application in the test process: `Application::build` on port 0 with real Python
//! workers, a fresh state directory and a fresh RunAgent database, served on the test's own
//! runtime. For tests that need no separate process (signals, crashes, logs and the CLI keep
//! the spawned binary of `Server`).

use std::path::PathBuf;

use agentry_server::{Application, Config};
use tokio::sync::oneshot;

/// A running application. Stopped (gracefully) by `stop`, or with the test's runtime.
pub struct TestApp {
    pub base: String,
    pub port: u16,
    stop: Option<oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub dirs: tempfile::TempDir,
}

impl TestApp {
    /// Serves `agent` with the harness's defaults (two workers per agent).
    pub async fn serve(agent: PathBuf) -> Self {
        Self::start(vec![agent], |_| {}).await
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
        configure(&mut config);
        config.validate().expect("a valid configuration");
        let app = Application::build(config)
            .await
            .expect("the application starts");
        let port = app.addr().port();
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Self {
            base: format!("http://127.0.0.1:{port}"),
            port,
            stop: Some(stop),
            serving: Some(serving),
            dirs,
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
