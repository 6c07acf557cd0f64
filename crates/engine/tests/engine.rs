//! The engine against a fake executor (scripted entrypoints, no Python) and a real SQLite
//! file: claims under the caps, retries with backoff, deadlines, cancellation, a lost lease,
//! and recovery of a previous incarnation's runs. The end-to-end tests with real workers are
//! in `crates/cli/tests/it/runs.rs`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use agentry_core::AgentConfig;
use agentry_core::agent::{Agents, ServedAgent};
use agentry_core::executor::{
    AgentExecutor, CallError, ChunkStream, EntrypointReport, Health, Payload, RunCall, RunItem,
    Runtime, ValueType,
};
use agentry_core::runs::{
    Backoff, ClaimRequest, Clock, LeaseRef, NewRun, Outcome, Run, RunStatus, new_run_id, now_ms,
};
use agentry_core::settings::RunsConfig;
use agentry_core::store::RunStore;
use agentry_engine::{Engine, EngineSettings};
use agentry_store::{SqliteOptions, SqliteStore};
use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

const AGENT: &str = "11111111-0000-0000-0000-00000000fake";

/// What the fake saw happen to one call.
#[derive(Debug, Clone, Default)]
struct CallLog {
    tag: String,
    attempt: u32,
    cancelled: bool,
    killed: Option<String>,
}

/// An executor whose entrypoints follow a script:
/// `ok` answers at once; `flaky` fails (retriably) on its first attempt, then answers;
/// `fatal` fails non-retriably; `hang` runs until cancelled (then ends cancelled) or killed;
/// `stubborn` ignores cancellation and ends only when killed; `stalls_once` hangs on its first
/// attempt and answers 300 ms into any later one; `emits` emits an event, then answers.
#[derive(Default)]
struct FakeExecutor {
    calls: Arc<Mutex<Vec<CallLog>>>,
}

struct FakeCall {
    rx: mpsc::UnboundedReceiver<RunItem>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    done: bool,
    cancel: watch::Sender<bool>,
    index: usize,
    calls: Arc<Mutex<Vec<CallLog>>>,
}

impl RunCall for FakeCall {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<RunItem>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = self.rx.poll_recv(cx) {
            // Events come before the answer; the answer (or the fake's going away) ends it.
            self.done = !matches!(
                item,
                Some(
                    RunItem::Event { .. }
                        | RunItem::Log { .. }
                        | RunItem::Chunk(_)
                        | RunItem::Checkpoint(_)
                )
            );
            return Poll::Ready(item.or(Some(RunItem::Failed(CallError::Crashed(
                "the fake went away".into(),
            )))));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.done = true;
            self.kill("past its deadline");
            return Poll::Ready(Some(RunItem::Failed(CallError::Timeout(self.timeout))));
        }
        Poll::Pending
    }

    fn ack(&self, _saved: bool) {}

    fn cancel(&self) {
        self.calls.lock()[self.index].cancelled = true;
        self.cancel.send_replace(true);
    }

    fn kill(&mut self, reason: &str) {
        self.calls.lock()[self.index]
            .killed
            .get_or_insert_with(|| reason.to_string());
        self.done = true;
    }
}

fn payload(json: &str) -> Payload {
    Payload {
        ty: ValueType::Object,
        json: json.as_bytes().to_vec().into(),
    }
}

#[async_trait]
impl AgentExecutor for FakeExecutor {
    fn entrypoint(&self, _tag: &str) -> Option<&EntrypointReport> {
        None
    }

    async fn call(&self, _: &str, _: &str, _: &str, _: Duration) -> Result<Payload, CallError> {
        Err(CallError::Unavailable("runs only".into()))
    }

    async fn stream(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: Duration,
    ) -> Result<Box<dyn ChunkStream>, CallError> {
        Err(CallError::Unavailable("runs only".into()))
    }

    async fn run(
        &self,
        tag: &str,
        _kwargs: &str,
        context: &str,
        timeout: Duration,
    ) -> Result<Box<dyn RunCall>, CallError> {
        let ctx: serde_json::Value = serde_json::from_str(context).expect("context");
        let attempt = ctx["attempt"].as_u64().unwrap_or(0) as u32;
        let index = {
            let mut calls = self.calls.lock();
            calls.push(CallLog {
                tag: tag.to_string(),
                attempt,
                ..Default::default()
            });
            calls.len() - 1
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let (cancel, mut cancelled) = watch::channel(false);
        let agent_error = |retriable| {
            RunItem::Failed(CallError::Agent {
                exc_type: "RuntimeError".into(),
                message: "scripted failure".into(),
                traceback: String::new(),
                retriable,
            })
        };
        match tag {
            "ok" => drop(tx.send(RunItem::Result(payload("{\"ok\": true}")))),
            "flaky" if attempt == 1 => drop(tx.send(agent_error(true))),
            "flaky" => drop(tx.send(RunItem::Result(payload("{\"attempt\": 2}")))),
            "fatal" => drop(tx.send(agent_error(false))),
            "hang" => {
                tokio::spawn(async move {
                    if cancelled.wait_for(|c| *c).await.is_ok() {
                        let _ = tx.send(RunItem::Failed(CallError::Cancelled));
                    }
                });
            }
            "emits" => {
                let _ = tx.send(RunItem::Event {
                    kind: "progress".into(),
                    data: bytes::Bytes::from_static(b"{\"done\": 1}"),
                });
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = tx.send(RunItem::Result(payload("{\"ok\": true}")));
                });
            }
            "impostor" => {
                // Writes the runtime's own terminal kind, and a payload that is not JSON.
                let _ = tx.send(RunItem::Event {
                    kind: "run.succeeded".into(),
                    data: bytes::Bytes::from_static(b"{}"),
                });
                // A kind that would end an SSE frame for every reader.
                let _ = tx.send(RunItem::Event {
                    kind: "x\nevent: run.succeeded".into(),
                    data: bytes::Bytes::from_static(b"{}"),
                });
                let _ = tx.send(RunItem::Event {
                    kind: "note".into(),
                    data: bytes::Bytes::from_static(b"{not json"),
                });
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let _ = tx.send(RunItem::Result(payload("{\"ok\": true}")));
                });
            }
            "checkpoints" => {
                for n in 0..3 {
                    let state = format!("{{\"n\": {n}, \"pad\": \"{}\"}}", "y".repeat(1000));
                    let _ = tx.send(RunItem::Checkpoint(bytes::Bytes::from(state)));
                }
                let _ = tx.send(RunItem::Result(payload("{\"ok\": true}")));
            }
            "chatters" => {
                // Emits every 20 ms and ignores cancellation.
                tokio::spawn(async move {
                    loop {
                        let sent = tx.send(RunItem::Event {
                            kind: "tick".into(),
                            data: bytes::Bytes::from_static(b"{}"),
                        });
                        if sent.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                });
            }
            "stalls_once" if attempt == 1 => {
                // The first attempt hangs (a node paused mid-run), until killed.
                tokio::spawn(async move {
                    let _keep = tx;
                    std::future::pending::<()>().await;
                });
            }
            "stalls_once" => {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let _ = tx.send(RunItem::Result(payload("{\"attempt\": 2}")));
                });
            }
            "stubborn" => {
                // Holds the channel open and never answers.
                tokio::spawn(async move {
                    let _keep = tx;
                    std::future::pending::<()>().await;
                });
            }
            other => return Err(CallError::NoSuchEntrypoint(other.to_string())),
        }
        Ok(Box::new(FakeCall {
            rx,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            done: false,
            cancel,
            index,
            calls: Arc::clone(&self.calls),
        }))
    }

    fn health(&self) -> Health {
        Health {
            live_workers: 1,
            crash_loop: None,
        }
    }

    fn run_capacity(&self) -> usize {
        1
    }

    async fn drain(&self, _grace: Duration) {}
}

fn agent_config() -> AgentConfig {
    let tags = [
        "ok",
        "flaky",
        "fatal",
        "hang",
        "stubborn",
        "stalls_once",
        "emits",
        "impostor",
        "checkpoints",
        "chatters",
    ];
    let entrypoints: Vec<serde_json::Value> = tags
        .iter()
        .map(|t| serde_json::json!({"file": "agent.py", "module": t, "tag": t}))
        .collect();
    let doc = serde_json::json!({
        "agent_name": "fake", "description": "", "framework": "default", "template": "",
        "version": "1", "created_at": "2025-01-01",
        "template_source": {"repo_url": "", "author": "", "path": ""},
        "agent_architecture": {"entrypoints": entrypoints}, "agent_id": AGENT,
    });
    let dir = std::path::Path::new("/nonexistent/fake");
    AgentConfig::from_value(dir, &dir.join("runagent.config.json"), doc).expect("config")
}

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    /// The store the engine sees, with its fault hooks.
    faults: Arc<FaultyStore>,
    engine: Engine,
    calls: Arc<Mutex<Vec<CallLog>>>,
    clock: Clock,
}

fn settings(node: &str) -> EngineSettings {
    let mut s = EngineSettings::new(node.to_string(), &RunsConfig::default());
    // Leases long enough that no renewal is missed on a busy machine; heartbeats often.
    s.lease_ttl = Duration::from_secs(5);
    s.heartbeat_every = Duration::from_millis(100);
    s.reap_every = Duration::from_millis(200);
    s.cancel_grace = Duration::from_millis(300);
    s
}

async fn harness_with(
    dir: tempfile::TempDir,
    settings: EngineSettings,
    max_running_runs: usize,
) -> Harness {
    let store = Arc::new(
        SqliteStore::open(&dir.path().join("runs.db"), SqliteOptions::default()).expect("open"),
    );
    let faults = Arc::new(FaultyStore::new(Arc::clone(&store)));
    let fake = FakeExecutor::default();
    let calls = Arc::clone(&fake.calls);
    let agents = Arc::new(Agents::new(vec![Arc::new(ServedAgent {
        config: agent_config(),
        executor: Arc::new(fake),
        runtime: Runtime {
            executable: "/bin/false".into(),
            version: "0".into(),
            reason: "a fake".into(),
        },
        max_running_runs: Some(max_running_runs),
        named_executors: Default::default(),
    })]));
    let clock = settings.clock.clone();
    let engine = Engine::start(Arc::clone(&faults) as Arc<dyn RunStore>, agents, settings)
        .await
        .expect("engine");
    Harness {
        _dir: dir,
        store,
        faults,
        engine,
        calls,
        clock,
    }
}

async fn harness_on(dir: tempfile::TempDir, node: &str, max_running_runs: usize) -> Harness {
    harness_with(dir, settings(node), max_running_runs).await
}

async fn harness(max_running_runs: usize) -> Harness {
    harness_on(
        tempfile::tempdir().expect("dir"),
        "node-a",
        max_running_runs,
    )
    .await
}

fn new_run(tag: &str) -> NewRun {
    let now = now_ms();
    NewRun {
        id: new_run_id(),
        agent: AGENT.into(),
        entrypoint: tag.into(),
        input: "{}".into(),
        idempotency_key: None,
        idempotency_scope: String::new(),
        request_hash: None,
        priority: 0,
        run_at: now,
        timeout_ms: 30_000,
        max_attempts: 3,
        backoff: Backoff {
            base: 1.0,
            max_s: 0.0,
            jitter: 0.0,
        },
        concurrency_key: None,
        metadata: "{}".into(),
        callback_url: None,
        correlation_id: None,
        depth: 0,
        parent_run_id: None,
        executor: None,
        created_at: now,
    }
}

impl Harness {
    async fn submit(&self, run: NewRun) -> Run {
        self.engine.submit(run).await.ok().expect("submit").0
    }

    async fn finished(&self, id: &str) -> Run {
        let run = self
            .engine
            .wait(id, Duration::from_secs(20), |_| true)
            .await
            .expect("wait")
            .expect("run");
        assert!(run.status.is_terminal(), "not finished in time: {run:?}");
        run
    }

    async fn kinds(&self, id: &str) -> Vec<String> {
        self.store
            .events_after(id, 0, 1000)
            .await
            .expect("events")
            .into_iter()
            .map(|e| e.kind.to_string())
            .collect()
    }

    fn calls_of(&self, tag: &str) -> Vec<CallLog> {
        self.calls
            .lock()
            .iter()
            .filter(|c| c.tag == tag)
            .cloned()
            .collect()
    }

    /// Waits until the run's log has an event of `kind`; returns the log's kinds.
    async fn until_event(&self, id: &str, kind: &str) -> Vec<String> {
        for _ in 0..400 {
            let kinds = self.kinds(id).await;
            if kinds.iter().any(|k| k == kind) {
                return kinds;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no {kind} event: {:?}", self.kinds(id).await);
    }

    /// Waits until the fake saw `what` happen to its calls of `tag`.
    async fn until(&self, what: impl Fn(&[CallLog]) -> bool) {
        for _ in 0..400 {
            if what(&self.calls.lock()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the fake never saw it: {:?}", self.calls.lock());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn claims_respect_the_agents_cap_and_run_each_run_once() {
    let h = harness(1).await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(h.submit(new_run("ok")).await.id);
    }
    for id in &ids {
        let run = h.finished(id).await;
        assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
        assert_eq!(run.attempt, 1);
        assert_eq!(run.result.as_deref(), Some("{\"ok\": true}"));
    }
    assert_eq!(h.calls_of("ok").len(), 6, "each run ran exactly once");
    // An attempt leaves the bookkeeping just after its end is published.
    for _ in 0..200 {
        if h.engine.running() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.engine.running(), 0, "no attempt is left behind");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retriable_failure_is_retried_and_a_fatal_one_is_not() {
    let h = harness(4).await;
    let flaky = h.submit(new_run("flaky")).await.id;
    let fatal = h.submit(new_run("fatal")).await.id;
    let run = h.finished(&flaky).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(run.attempt, 2);
    let attempts: Vec<u32> = h.calls_of("flaky").iter().map(|c| c.attempt).collect();
    assert_eq!(
        attempts,
        [1, 2],
        "the retry is the second attempt, with the context saying so"
    );
    let kinds = h.kinds(&flaky).await;
    assert_eq!(
        kinds,
        [
            "run.queued",
            "run.started",
            "run.retrying",
            "run.started",
            "run.succeeded"
        ]
    );
    let run = h.finished(&fatal).await;
    assert_eq!(run.status, RunStatus::Failed, "{run:?}");
    assert_eq!(run.attempt, 1, "a non-retriable error is not retried");
    assert!(run.error.unwrap_or_default().contains("scripted failure"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_past_its_deadline_times_out() {
    let h = harness(4).await;
    let mut run = new_run("stubborn");
    run.timeout_ms = 300;
    let id = h.submit(run).await.id;
    let run = h.finished(&id).await;
    assert_eq!(run.status, RunStatus::TimedOut, "{run:?}");
    assert_eq!(run.attempt, 1, "a deadline is final");
    assert!(h.calls_of("stubborn")[0].killed.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_asks_the_call_to_stop_and_kills_it_past_the_grace() {
    let h = harness(4).await;
    let polite = h.submit(new_run("hang")).await.id;
    let stubborn = h.submit(new_run("stubborn")).await.id;
    h.until(|c| c.len() == 2).await;
    h.engine.cancel(&polite).await.expect("cancel");
    h.engine.cancel(&stubborn).await.expect("cancel");
    for id in [&polite, &stubborn] {
        let run = h.finished(id).await;
        assert_eq!(run.status, RunStatus::Cancelled, "{run:?}");
        assert!(run.cancel_requested);
    }
    let polite_call = &h.calls_of("hang")[0];
    assert!(
        polite_call.cancelled && polite_call.killed.is_none(),
        "{polite_call:?}"
    );
    let stubborn_call = &h.calls_of("stubborn")[0];
    assert!(
        stubborn_call.cancelled && stubborn_call.killed.is_some(),
        "{stubborn_call:?}"
    );
    // A queued run is cancelled at once, without ever running.
    let mut later = new_run("ok");
    later.run_at = now_ms() + 60_000;
    let queued = h.submit(later).await.id;
    h.engine.cancel(&queued).await.expect("cancel");
    assert_eq!(h.finished(&queued).await.status, RunStatus::Cancelled);
    assert_eq!(h.calls_of("ok").len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_lease_stops_the_attempt_without_writing_anything() {
    // One slot: while the first attempt still holds it, this node cannot claim the run again.
    let h = harness(1).await;
    let id = h.submit(new_run("stubborn")).await.id;
    h.until_event(&id, "run.started").await;
    // Another node, its clock an hour ahead, finds the lease expired, requeues the run and
    // claims its next attempt. To this node the run is not due yet (its clock is behind), so
    // only node-b can take it.
    let ahead = now_ms() + 3_600_000;
    let recovered = h
        .store
        .recover_leases(ahead, None, Vec::new())
        .await
        .expect("recover");
    assert_eq!(recovered.len(), 1);
    let now = ahead;
    let claimed = h
        .store
        .claim_runs(ClaimRequest {
            node: "node-b".into(),
            owner: "node-b/1".into(),
            now,
            lease_until: now + 60_000,
            per_agent: vec![(AGENT.into(), 1)],
            cluster: Default::default(),
            entrypoint_caps: Vec::new(),
        })
        .await
        .expect("claim");
    assert_eq!(claimed.runs.len(), 1);
    assert_eq!(claimed.runs[0].run.attempt, 2);
    // This node's next heartbeat finds the lease gone and stops its attempt.
    h.until(|c| c[0].killed.is_some()).await;
    let before = h.kinds(&id).await;
    h.store
        .finish_run(
            LeaseRef {
                run_id: id.clone(),
                owner: "node-b/1".into(),
                attempt: 2,
            },
            Outcome::Succeeded {
                result: "{\"by\": \"node-b\"}".into(),
            },
            None,
        )
        .await
        .expect("node-b finishes the run");
    let run = h.store.get_run(&id).await.expect("read").expect("run");
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(run.result.as_deref(), Some("{\"by\": \"node-b\"}"));
    assert!(!run.cancel_requested);
    assert_eq!(
        before,
        ["run.queued", "run.started", "run.retrying"],
        "the stale attempt wrote nothing (node-b's claim is not a start)"
    );
    assert_eq!(
        h.calls_of("stubborn").len(),
        1,
        "this node did not run it again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_node_requeues_and_runs_its_previous_lifes_runs_without_using_an_attempt() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("runs.db");
    // The previous life of node-a claimed two runs and died.
    let mut ids = Vec::new();
    {
        let store = SqliteStore::open(&path, SqliteOptions::default()).expect("open");
        for _ in 0..2 {
            let run = new_run("ok");
            ids.push(run.id.clone());
            store.create_run(run, None).await.expect("create");
        }
        let now = now_ms();
        let claimed = store
            .claim_runs(ClaimRequest {
                node: "node-a".into(),
                owner: "node-a/previous".into(),
                now,
                lease_until: now + 3_600_000,
                per_agent: vec![(AGENT.into(), 10)],
                cluster: Default::default(),
                entrypoint_caps: Vec::new(),
            })
            .await
            .expect("claim");
        assert_eq!(claimed.runs.len(), 2);
        store.close();
    }
    let h = harness_on(dir, "node-a", 4).await;
    let mut seen = HashMap::new();
    for id in &ids {
        let run = h.finished(id).await;
        assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
        // The lost attempt does not count: two attempts of three remain.
        assert_eq!((run.attempt, run.lease_losses), (2, 1), "{run:?}");
        assert_eq!(run.attempt - run.lease_losses, 1);
        seen.insert(id.clone(), run);
    }
    assert_eq!(h.calls_of("ok").len(), 2, "each ran once in this life");
}

/// The real SQLite store with fault hooks:
/// * `finish_at_check`: finishes a run (as another node would) right after a follower's
///   catch-up read, at its status check: the moment where a run that ends between the two
///   must not lose its last events;
/// * `renewals_hang`: lease renewals hang while set, as on a stalled disk or a lost
///   connection.
struct FaultyStore {
    inner: Arc<SqliteStore>,
    finish_at_check: Mutex<Option<LeaseRef>>,
    renewals_hang: watch::Sender<bool>,
    /// Event appends hang while set.
    appends_hang: watch::Sender<bool>,
    /// This many `finish_run`s, then this many `append_events`, fail as a full disk would.
    failing_finishes: std::sync::atomic::AtomicUsize,
    failing_appends: std::sync::atomic::AtomicUsize,
}

/// Takes one from `left` if any are left: the next call fails.
fn fails(left: &std::sync::atomic::AtomicUsize) -> bool {
    left.fetch_update(
        std::sync::atomic::Ordering::SeqCst,
        std::sync::atomic::Ordering::SeqCst,
        |n| n.checked_sub(1),
    )
    .is_ok()
}

fn disk_full() -> agentry_core::StoreError {
    agentry_core::StoreError::Unavailable("database or disk is full".into())
}

impl FaultyStore {
    fn new(inner: Arc<SqliteStore>) -> Self {
        Self {
            inner,
            finish_at_check: Mutex::new(None),
            renewals_hang: watch::channel(false).0,
            appends_hang: watch::channel(false).0,
            failing_finishes: Default::default(),
            failing_appends: Default::default(),
        }
    }
}

#[async_trait]
impl RunStore for FaultyStore {
    async fn create_run(
        &self,
        run: NewRun,
        claim: Option<agentry_core::runs::DirectClaim>,
    ) -> Result<agentry_core::runs::CreateOutcome, agentry_core::StoreError> {
        self.inner.create_run(run, claim).await
    }
    async fn get_run(&self, id: &str) -> Result<Option<Run>, agentry_core::StoreError> {
        let lease = self.finish_at_check.lock().take();
        if let Some(lease) = lease {
            let outcome = Outcome::Succeeded {
                result: "{\"late\": true}".into(),
            };
            let start = agentry_core::runs::AttemptStart {
                at: now_ms(),
                node: "node-b".into(),
            };
            self.inner.finish_run(lease, outcome, Some(start)).await?;
        }
        self.inner.get_run(id).await
    }
    async fn list_runs(
        &self,
        query: agentry_core::runs::RunQuery,
    ) -> Result<Vec<Run>, agentry_core::StoreError> {
        self.inner.list_runs(query).await
    }
    async fn claim_runs(
        &self,
        request: ClaimRequest,
    ) -> Result<agentry_core::runs::Claimed, agentry_core::StoreError> {
        self.inner.claim_runs(request).await
    }
    async fn renew_leases(
        &self,
        leases: Vec<LeaseRef>,
        until: i64,
        heartbeat: Vec<String>,
    ) -> Result<Vec<agentry_core::runs::Renewal>, agentry_core::StoreError> {
        let _ = self.renewals_hang.subscribe().wait_for(|hang| !*hang).await;
        self.inner.renew_leases(leases, until, heartbeat).await
    }
    async fn append_events(
        &self,
        lease: LeaseRef,
        events: Vec<agentry_core::runs::NewEvent>,
    ) -> Result<Vec<agentry_core::runs::RunEvent>, agentry_core::StoreError> {
        if fails(&self.failing_appends) {
            return Err(disk_full());
        }
        let _ = self.appends_hang.subscribe().wait_for(|hang| !*hang).await;
        self.inner.append_events(lease, events).await
    }
    async fn save_checkpoint(
        &self,
        lease: LeaseRef,
        state: String,
    ) -> Result<agentry_core::runs::RunEvent, agentry_core::StoreError> {
        self.inner.save_checkpoint(lease, state).await
    }
    async fn start_attempt(
        &self,
        lease: LeaseRef,
        start: agentry_core::runs::AttemptStart,
    ) -> Result<agentry_core::runs::RunEvent, agentry_core::StoreError> {
        self.inner.start_attempt(lease, start).await
    }
    async fn finish_run(
        &self,
        lease: LeaseRef,
        outcome: Outcome,
        start: Option<agentry_core::runs::AttemptStart>,
    ) -> Result<agentry_core::runs::Finished, agentry_core::StoreError> {
        if fails(&self.failing_finishes) {
            return Err(disk_full());
        }
        self.inner.finish_run(lease, outcome, start).await
    }
    async fn cancel_run(
        &self,
        id: &str,
        now: i64,
    ) -> Result<agentry_core::runs::CancelOutcome, agentry_core::StoreError> {
        self.inner.cancel_run(id, now).await
    }
    async fn last_event_seq(&self, id: &str) -> Result<i64, agentry_core::StoreError> {
        self.inner.last_event_seq(id).await
    }
    async fn run_links(
        &self,
        id: &str,
    ) -> Result<Option<agentry_core::runs::RunLinks>, agentry_core::StoreError> {
        self.inner.run_links(id).await
    }
    async fn log_after(
        &self,
        after: agentry_core::events::EventCursor,
        limit: usize,
        agents: Option<Vec<String>>,
    ) -> Result<agentry_core::events::LogPage, agentry_core::StoreError> {
        self.inner.log_after(after, limit, agents).await
    }
    async fn events_after(
        &self,
        id: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<agentry_core::runs::RunEvent>, agentry_core::StoreError> {
        self.inner.events_after(id, after, limit).await
    }
    async fn recover_leases(
        &self,
        now: i64,
        node: Option<(String, String)>,
        alive: Vec<LeaseRef>,
    ) -> Result<Vec<agentry_core::runs::Finished>, agentry_core::StoreError> {
        self.inner.recover_leases(now, node, alive).await
    }
    async fn purge_finished(
        &self,
        before: i64,
        limit: usize,
    ) -> Result<usize, agentry_core::StoreError> {
        self.inner.purge_finished(before, limit).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_gets_the_terminal_event_of_a_run_that_ends_while_it_catches_up() {
    let dir = tempfile::tempdir().expect("dir");
    let inner = Arc::new(
        SqliteStore::open(&dir.path().join("runs.db"), SqliteOptions::default()).expect("open"),
    );
    let store = Arc::new(FaultyStore::new(Arc::clone(&inner)));
    let agents = Arc::new(Agents::new(Vec::new()));
    let engine = Engine::start(
        Arc::clone(&store) as Arc<dyn RunStore>,
        agents,
        settings("node-a"),
    )
    .await
    .expect("engine");
    // Another node runs it; this node only follows.
    let run = new_run("ok");
    let id = run.id.clone();
    inner.create_run(run, None).await.expect("create");
    let now = now_ms();
    let claimed = inner
        .claim_runs(ClaimRequest {
            node: "node-b".into(),
            owner: "node-b/1".into(),
            now,
            lease_until: now + 60_000,
            per_agent: vec![(AGENT.into(), 1)],
            cluster: Default::default(),
            entrypoint_caps: Vec::new(),
        })
        .await
        .expect("claim");
    assert_eq!(claimed.runs.len(), 1);
    *store.finish_at_check.lock() = Some(LeaseRef {
        run_id: id.clone(),
        owner: "node-b/1".into(),
        attempt: 1,
    });
    let mut feed = engine
        .follow(&id, agentry_engine::Follow::After(0))
        .await
        .expect("follow");
    let mut kinds = Vec::new();
    while let Ok(Some(p)) = tokio::time::timeout(Duration::from_secs(10), feed.next()).await {
        kinds.push(p.event.kind.to_string());
    }
    assert_eq!(kinds, ["run.queued", "run.started", "run.succeeded"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_attempts_end_never_touches_the_next_attempt_of_the_same_run_on_this_node() {
    // Two slots, so that this node can claim the run's next attempt while the first still runs.
    let h = harness(2).await;
    let id = h.submit(new_run("stalls_once")).await.id;
    h.until_event(&id, "run.started").await;
    // A paused node as it wakes up: its renewals have not gone through and the wall clock is
    // an hour on. A reaper (another node's, which this node's clock cannot vouch for) finds the
    // lease expired and requeues the run, and this node's dispatcher claims attempt 2 while
    // attempt 1 is still alive here (by the monotonic clock its lease is fresh, so it has not
    // fenced itself).
    h.faults.renewals_hang.send_replace(true);
    h.clock.jump(Duration::from_secs(3600));
    let requeued = h
        .store
        .recover_leases(h.clock.now_ms(), None, Vec::new())
        .await
        .expect("recover");
    assert_eq!(requeued.len(), 1);
    h.until(|c| c.len() == 2).await;
    // Then the renewal that was under way answers: attempt 1's lease is gone.
    h.faults.renewals_hang.send_replace(false);
    let run = h.finished(&id).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(run.attempt, 2, "{run:?}");
    assert!(!run.cancel_requested);
    let calls = h.calls_of("stalls_once");
    assert_eq!(
        calls[0].killed.as_deref(),
        Some("the run's lease was lost"),
        "{calls:?}"
    );
    assert_eq!(
        calls[1].killed, None,
        "the new attempt ran to its end: {calls:?}"
    );
    let kinds = h.kinds(&id).await;
    let ends: Vec<&String> = kinds
        .iter()
        .filter(|k| k.as_str() != "run.heartbeat")
        .collect();
    assert_eq!(
        ends,
        [
            "run.queued",
            "run.started",
            "run.retrying",
            "run.started",
            "run.succeeded"
        ],
        "one terminal event, never run.cancelled"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_cannot_renew_its_leases_stops_its_attempts_before_they_expire() {
    let mut s = settings("node-a");
    s.lease_ttl = Duration::from_secs(3);
    s.heartbeat_every = Duration::from_millis(100);
    s.reap_every = Duration::from_millis(100);
    let h = harness_with(tempfile::tempdir().expect("dir"), s, 2).await;
    let id = h.submit(new_run("stalls_once")).await.id;
    h.until(|c| c.len() == 1).await;
    // Renewals hang from now on: the lease runs out 3 s after the last one that went through;
    // the attempt stops itself a tenth of that earlier.
    h.faults.renewals_hang.send_replace(true);
    h.until(|c| c[0].killed.is_some()).await;
    let fenced = h.store.get_run(&id).await.expect("read").expect("run");
    assert_eq!(
        (fenced.status, fenced.attempt),
        (RunStatus::Running, 1),
        "stopped while the lease was still its own: {fenced:?}"
    );
    let calls = h.calls_of("stalls_once");
    assert!(
        calls[0]
            .killed
            .as_deref()
            .is_some_and(|k| k.contains("could not renew")),
        "{calls:?}"
    );
    // The attempt says why in the run's events (written after it stopped the call).
    h.until_event(&id, "run.fenced").await;
    // The store comes back: the expired lease is reaped and the next attempt runs.
    h.faults.renewals_hang.send_replace(false);
    let run = h.finished(&id).await;
    assert_eq!(
        (run.status, run.attempt),
        (RunStatus::Succeeded, 2),
        "{run:?}"
    );
    assert!(!run.cancel_requested);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_end_that_cannot_be_recorded_is_retried_and_the_run_is_not_run_again() {
    let h = harness(2).await;
    h.faults
        .failing_finishes
        .store(3, std::sync::atomic::Ordering::SeqCst);
    let id = h.submit(new_run("ok")).await.id;
    let run = h.finished(&id).await;
    assert_eq!(
        (run.status, run.attempt),
        (RunStatus::Succeeded, 1),
        "{run:?}"
    );
    assert_eq!(
        h.calls_of("ok").len(),
        1,
        "the success was kept, not run again"
    );
    assert_eq!(
        h.faults
            .failing_finishes
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the failures happened"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn events_that_cannot_be_stored_fail_the_attempt_retriably_never_a_success_with_gaps() {
    let h = harness(2).await;
    h.faults
        .failing_appends
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let id = h.submit(new_run("emits")).await.id;
    let run = h.finished(&id).await;
    assert_eq!(
        (run.status, run.attempt),
        (RunStatus::Succeeded, 2),
        "{run:?}"
    );
    let calls = h.calls_of("emits");
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[0].killed.is_some(), "{calls:?}");
    let kinds = h.kinds(&id).await;
    assert_eq!(
        kinds,
        [
            "run.queued",
            "run.started",
            "run.retrying",
            "run.started",
            "progress",
            "run.succeeded"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_cannot_write_the_runtimes_event_kinds_or_broken_json() {
    let h = harness(2).await;
    let id = h.submit(new_run("impostor")).await.id;
    let run = h.finished(&id).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    let events = h.store.events_after(&id, 0, 100).await.expect("events");
    let kinds: Vec<String> = events.iter().map(|e| e.kind.to_string()).collect();
    assert_eq!(
        kinds,
        [
            "run.queued",
            "run.started",
            "run.log",
            "run.log",
            "note",
            "run.succeeded"
        ],
        "the fake run.succeeded and the kind with a newline became warnings"
    );
    assert!(events[2].data.contains("may not use"), "{}", events[2].data);
    // Every event's data is JSON: the broken payload is kept as a string.
    for e in &events {
        serde_json::from_str::<serde_json::Value>(&e.data).expect("JSON data");
    }
    assert_eq!(events[4].data, "\"{not json\"");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attempt_over_its_event_cap_fails_the_run_with_a_clear_error() {
    let mut s = settings("node-a");
    s.max_events_per_attempt = 1;
    let h = harness_with(tempfile::tempdir().expect("dir"), s, 2).await;
    let id = h.submit(new_run("impostor")).await.id;
    let run = h.finished(&id).await;
    assert_eq!((run.status, run.attempt), (RunStatus::Failed, 1), "{run:?}");
    let error: serde_json::Value =
        serde_json::from_str(run.error.as_deref().unwrap_or("{}")).expect("error");
    assert_eq!(error["code"], "payload_too_large", "{error}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("runs.max_events_per_attempt")),
        "{error}"
    );
    assert!(h.calls_of("impostor")[0].killed.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attempt_stuck_in_a_write_is_still_fenced_in_time() {
    let mut s = settings("node-a");
    s.lease_ttl = Duration::from_secs(3);
    s.reap_every = Duration::from_millis(100);
    let h = harness_with(tempfile::tempdir().expect("dir"), s, 2).await;
    // A stalled disk: the attempt's first event write and every renewal hang.
    h.faults.appends_hang.send_replace(true);
    h.faults.renewals_hang.send_replace(true);
    let id = h.submit(new_run("emits")).await.id;
    h.until(|c| c.first().is_some_and(|c| c.killed.is_some()))
        .await;
    let calls = h.calls_of("emits");
    assert!(
        calls[0]
            .killed
            .as_deref()
            .is_some_and(|k| k.contains("could not renew")),
        "the call was stopped by the fence while its write hung: {calls:?}"
    );
    h.faults.appends_hang.send_replace(false);
    h.faults.renewals_hang.send_replace(false);
    let run = h.finished(&id).await;
    assert_eq!(
        (run.status, run.attempt),
        (RunStatus::Succeeded, 2),
        "{run:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn checkpoints_count_against_the_attempts_byte_cap() {
    let mut s = settings("node-a");
    s.max_event_bytes_per_attempt = 2_500;
    let h = harness_with(tempfile::tempdir().expect("dir"), s, 2).await;
    let id = h.submit(new_run("checkpoints")).await.id;
    let run = h.finished(&id).await;
    assert_eq!(run.status, RunStatus::Failed, "{run:?}");
    assert!(
        run.error
            .as_deref()
            .is_some_and(|e| e.contains("payload_too_large")),
        "{run:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_asked_for_before_the_cap_is_hit_still_ends_the_run_cancelled() {
    let mut s = settings("node-a");
    s.max_events_per_attempt = 20;
    s.cancel_grace = Duration::from_secs(5);
    let h = harness_with(tempfile::tempdir().expect("dir"), s, 2).await;
    let id = h.submit(new_run("chatters")).await.id;
    h.until_event(&id, "tick").await;
    h.engine.cancel(&id).await.expect("cancel");
    let run = h.finished(&id).await;
    assert_eq!(run.status, RunStatus::Cancelled, "{run:?}");
    assert!(run.cancel_requested);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wall_clock_step_does_not_make_a_node_requeue_its_own_live_attempts() {
    let h = harness(2).await;
    let id = h.submit(new_run("hang")).await.id;
    h.until_event(&id, "run.started").await;
    // An hour forward, with the renewals held up so that every lease looks long expired to
    // this node's own reaper (every 200 ms). The attempt is alive and its lease fresh by the
    // monotonic clock: it is not requeued.
    h.faults.renewals_hang.send_replace(true);
    h.clock.jump(Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let run = h.store.get_run(&id).await.expect("read").expect("run");
    assert_eq!(
        (run.status, run.attempt),
        (RunStatus::Running, 1),
        "{run:?}"
    );
    assert!(!h.kinds(&id).await.contains(&"run.retrying".to_string()));
    h.faults.renewals_hang.send_replace(false);
    h.engine.cancel(&id).await.expect("cancel");
    let run = h.finished(&id).await;
    assert_eq!(
        (run.status, run.attempt),
        (RunStatus::Cancelled, 1),
        "{run:?}"
    );
    assert_eq!(h.calls_of("hang").len(), 1, "it ran once");
}
