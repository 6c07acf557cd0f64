//! Test harness: runs the real `agentry` binary on port 0 with real Python workers, each server
//! with its own state directory and its own RunAgent cache directory.

pub mod app;
pub mod pg;
pub mod sse;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/agents").join(name)
}

pub fn example(name: &str) -> PathBuf {
    repo_root().join("examples").join(name)
}

pub const COMPAT_ID: &str = "22222222-3333-4444-5555-666666666666";

/// A server the tests talk to: the spawned binary (`Server`) or the in-process `TestApp`.
pub trait Served {
    fn url(&self, path: &str) -> String;
}

impl Served for Server {
    fn url(&self, path: &str) -> String {
        Server::url(self, path)
    }
}

/// A running `agentry serve`.
pub struct Server {
    pub child: Option<Child>,
    pub base: String,
    pub port: u16,
    pub log: Arc<Mutex<Vec<String>>>,
    pub dirs: tempfile::TempDir,
}

pub struct ServerBuilder {
    agents: Vec<PathBuf>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    cache_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    default_workers: bool,
    /// `agentry worker` instead of `agentry serve` (its admin port is the server's port).
    worker: bool,
}

impl ServerBuilder {
    /// Leave the worker count to the configuration (the harness passes `--workers 2`).
    pub fn without_default_workers(mut self) -> Self {
        self.default_workers = false;
        self
    }
    /// Start an execution-only node (`agentry worker`). Used by the `cluster` test binary.
    #[allow(dead_code)]
    pub fn worker(mut self) -> Self {
        self.worker = true;
        self
    }
    /// Use this state directory (to restart a server on the same state).
    pub fn state_dir(mut self, p: &Path) -> Self {
        self.state_dir = Some(p.to_path_buf());
        self
    }
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
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }
    /// Share a RunAgent cache directory (for discovery tests).
    pub fn cache_dir(mut self, p: &Path) -> Self {
        self.cache_dir = Some(p.to_path_buf());
        self
    }

    pub fn start(self) -> Server {
        self.try_start()
            .unwrap_or_else(|log| panic!("server did not start:\n{log}"))
    }

    /// Starts the server; on failure returns its whole log.
    pub fn try_start(self) -> Result<Server, String> {
        let dirs = tempfile::tempdir().expect("tempdir");
        let cache = self
            .cache_dir
            .clone()
            .unwrap_or_else(|| dirs.path().join("runagent-cache"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentry"));
        cmd.arg(if self.worker { "worker" } else { "serve" })
            .args(&self.agents)
            .args(["--port", "0", "--state-dir"])
            .arg(
                self.state_dir
                    .clone()
                    .unwrap_or_else(|| dirs.path().join("state")),
            )
            .args(&self.args)
            .env("RUNAGENT_CACHE_DIR", &cache)
            .env("AGENTRY_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if self.default_workers && !self.args.iter().any(|a| a == "--workers") {
            cmd.args(["--workers", "2"]);
        }
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn agentry");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let re = regex::Regex::new(r"(?:ready on|admin port) http://([0-9.]+):(\d+)")
                    .expect("regex");
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let clean = strip_ansi(&line);
                    if let Some(c) = re.captures(&clean) {
                        let _ = tx.send(c[2].parse::<u16>().ok());
                    }
                    log.lock().expect("log").push(clean);
                }
                let _ = tx.send(None);
            });
        }
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some(port)) => Ok(Server {
                child: Some(child),
                base: format!("http://127.0.0.1:{port}"),
                port,
                log,
                dirs,
            }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                Err(log.lock().expect("log").join("\n"))
            }
        }
    }
}

fn strip_ansi(s: &str) -> String {
    let re = regex::Regex::new(r"\x1b\[[0-9;]*m").expect("regex");
    re.replace_all(s, "").into_owned()
}

pub fn server(agent: PathBuf) -> ServerBuilder {
    ServerBuilder {
        agents: vec![agent],
        args: Vec::new(),
        envs: Vec::new(),
        cache_dir: None,
        state_dir: None,
        default_workers: true,
        worker: false,
    }
}

impl Server {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or_default()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str, within: Duration) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Sends a signal and waits for the server to exit; returns its exit status code.
    pub fn stop(&mut self, signal: nix::sys::signal::Signal) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
        let end = Instant::now() + Duration::from_secs(40);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not exit after {signal:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop(nix::sys::signal::Signal::SIGTERM);
        }
    }
}

/// PIDs of all live descendants of `pid` (children, grandchildren, …), from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // Fields after the command name, which is in parentheses and may contain spaces.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if fields.first() == Some(&"Z") {
                continue; // zombies are already dead
            }
            if let Some(ppid) = fields.get(1).and_then(|f| f.parse::<u32>().ok()) {
                parents.push((p, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(cur) = frontier.pop() {
        for (p, pp) in &parents {
            if *pp == cur {
                out.push(*p);
                frontier.push(*p);
            }
        }
    }
    out
}

pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .map(|(_, r)| r.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

pub fn client() -> reqwest::Client {
    // reqwest's TLS takes the process's crypto provider (ring, as the binary's).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// POSTs JSON text and returns (status, body text).
pub async fn post(url: &str, body: &str) -> (u16, String) {
    try_post(url, body)
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// POSTs JSON text; the error when no answer came (a dead server, a cut connection).
pub async fn try_post(url: &str, body: &str) -> Result<(u16, String), reqwest::Error> {
    let r = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.text().await?))
}

pub async fn get(url: &str) -> (u16, String) {
    let r = client().get(url).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.text().await.expect("body"))
}

pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `agentry keys create ARGS...` (offline); returns the key it printed.
pub fn create_key<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["keys", "create"])
        .args(args)
        .output()
        .expect("keys create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&String::from_utf8_lossy(&out.stdout))["key"]
        .as_str()
        .expect("key")
        .to_string()
}
