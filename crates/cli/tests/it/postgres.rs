//! Several nodes on one PostgreSQL (127.0.0.1:5432, database `test`, or
//! `AGENTRY_TEST_POSTGRES_URL`), each test in a schema of its own. No skipping: without the
//! server these tests fail (`.ci/run` starts it).

use std::collections::HashMap;
use std::time::Duration;

use crate::common::app::app;
use crate::common::pg::*;
use crate::common::*;
use serde_json::json;

/// Creates a run through `node`; its id.
async fn create_on(node: &impl Served, body: serde_json::Value) -> String {
    let (status, text) = post(&node.url("/v1/runs"), &body.to_string()).await;
    assert_eq!(status, 202, "{text}");
    json(&text)["id"].as_str().expect("id").to_string()
}

/// Waits until the run's code has started (on whichever node), asking `node`.
async fn wait_started(node: &impl Served, id: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = get(&node.url(&format!("/v1/runs/{id}"))).await;
        if !json(&text)["started_at"].is_null() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never started: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A node serving the durable fixture on the test's schema.
async fn node(schema: &str) -> crate::common::app::TestApp {
    app(fixture("durable"))
        .args(on_postgres(schema))
        .start()
        .await
}

/// Two nodes on one database share one queue: runs created on either are executed once, by
/// whichever node claims them, and each node answers for every run (its `wait` returns when the
/// other node finishes it). Each node runs one run at a time and each run lasts 50 ms, so a
/// node woken by a run it accepted finds the other busy: both take part by construction, not
/// by winning a race.
#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_on_one_postgres_share_their_runs() {
    let schema = schema();
    let one_at_a_time = |schema: &str| {
        let mut args = on_postgres(schema);
        args.extend(["--max-running-runs".into(), "1".into()]);
        app(fixture("durable")).args(args).start()
    };
    let a = one_at_a_time(&schema).await;
    let b = one_at_a_time(&schema).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let node = if i % 2 == 0 { &a } else { &b };
        let (status, text) = post(
            &node.url("/v1/runs"),
            &json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": i, "ms": 50}})
                .to_string(),
        )
        .await;
        assert_eq!(status, 202, "{text}");
        ids.push((i, json(&text)["id"].as_str().expect("id").to_string()));
    }
    let mut by_node: HashMap<String, usize> = HashMap::new();
    for (i, id) in &ids {
        // Asked of the node that did not create it.
        let other = if i % 2 == 0 { &b } else { &a };
        let (status, text) = get(&other.url(&format!("/v1/runs/{id}/wait?timeout_s=30"))).await;
        assert_eq!(status, 200, "{text}");
        let run = json(&text);
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["output"], json!({"i": i}));
        assert_eq!(run["attempt"], 1, "{run}");
        let events = crate::runs::events(other, id).await;
        let seqs: Vec<i64> = events.iter().map(|(seq, _, _)| *seq).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as i64).collect::<Vec<_>>(),
            "{events:?}"
        );
        let kinds: Vec<&str> = events.iter().map(|(_, k, _)| k.as_str()).collect();
        assert_eq!(
            kinds,
            ["run.queued", "run.started", "run.succeeded"],
            "{events:?}"
        );
        let node = events[1].2["data"]["node"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        *by_node.entry(node).or_default() += 1;
    }
    assert_eq!(by_node.values().sum::<usize>(), 40, "{by_node:?}");
    assert_eq!(by_node.len(), 2, "both nodes ran runs: {by_node:?}");
}

/// A key created with `agentry keys create --database URL` is known to every node on that
/// database (and turns authentication on there).
#[tokio::test(flavor = "multi_thread")]
async fn a_key_created_against_the_database_works_on_every_node() {
    let schema = schema();
    let a = node(&schema).await;
    let mut args = vec!["--scope".to_string(), "runs:read".to_string()];
    args.extend(on_postgres(&schema));
    let key = create_key(&args);
    let b = node(&schema).await;
    for node in [&a, &b] {
        // Node a loaded its keys before this one existed: it reloads them within seconds.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, _) = get(&node.url("/v1/runs?agent=durable")).await;
            if status == 401 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "authentication never turned on ({status})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let status = get_with_bearer(&node.url("/v1/runs?agent=durable"), &key).await;
        assert_eq!(status, 200, "the key works on every node");
    }
}

async fn get_with_bearer(url: &str, key: &str) -> u16 {
    client()
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// A follower on one node sees the events another node's attempt writes as they happen (not at
/// the next poll, seconds later), and a cancel sent to one node stops the run on the other at
/// once (not at its next heartbeat, up to 10 s later): PostgreSQL's LISTEN/NOTIFY.
#[tokio::test(flavor = "multi_thread")]
async fn events_and_cancels_cross_nodes_at_once() {
    use futures_util::StreamExt;
    let schema = schema();
    let a = node(&schema).await;
    let b = node(&schema).await;
    // Created on b, which is idle, so b leases it in the same commit and runs it.
    let id = create_on(
        &b,
        json!({"agent": "durable", "entrypoint": "chatty", "input": {"n": 30, "ms": 100}}),
    )
    .await;
    let response = client()
        .get(a.url(&format!("/v1/runs/{id}/events?after=0")))
        .send()
        .await
        .expect("follow on a");
    let started = std::time::Instant::now();
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    let mut tick_times = Vec::new();
    while let Some(chunk) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        let ticks = seen.matches("event: tick").count();
        while tick_times.len() < ticks {
            tick_times.push(started.elapsed());
        }
        if seen.contains("run.succeeded") {
            break;
        }
    }
    let total = started.elapsed();
    assert_eq!(tick_times.len(), 30, "{seen}");
    // The run takes about 3 s: its 10th event reached node a well before its end.
    assert!(
        tick_times[9] + Duration::from_millis(1000) < total,
        "events arrived in a burst at the end ({:?} of {total:?}): not live",
        tick_times[9]
    );

    let id = create_on(
        &b,
        json!({"agent": "durable", "entrypoint": "cooperative", "input": {}}),
    )
    .await;
    // Running on b (its code started).
    wait_started(&a, &id).await;
    let asked = std::time::Instant::now();
    let (status, text) = post(&a.url(&format!("/v1/runs/{id}/cancel")), "").await;
    assert!(status == 200 || status == 202, "{status} {text}");
    let (_, text) = get(&a.url(&format!("/v1/runs/{id}/wait?timeout_s=20"))).await;
    let run = json(&text);
    assert_eq!(run["status"], "cancelled", "{run}");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "the cancel took {:?} to cross nodes",
        asked.elapsed()
    );
}

fn agentry(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(args)
        .output()
        .expect("agentry")
}

/// `agentry migrate --status` lists what is pending without applying it; `agentry migrate`
/// applies it; a database migrated by a newer Agentry is refused at start-up, naming both
/// versions.
#[tokio::test(flavor = "multi_thread")]
async fn migrate_applies_and_lists_and_a_newer_database_is_refused() {
    let schema = schema();
    let url = pg_url();
    let base = ["--database", url.as_str(), "--database-schema", &schema];
    let status = |extra: &[&str]| {
        let out = agentry(&[&["migrate"], &base[..], extra].concat());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let pending = status(&["--status"]);
    let known = agentry_store::PG_MIGRATIONS.len();
    assert_eq!(pending.lines().count(), known, "{pending}");
    assert!(pending.lines().all(|l| l.ends_with("pending")), "{pending}");
    assert!(pending.contains("0001 0001_runs"), "{pending}");
    let applied = status(&[]);
    assert!(
        applied.lines().all(|l| l.contains(" applied ")),
        "{applied}"
    );
    assert_eq!(status(&["--status"]), applied, "--status changes nothing");
    // A newer Agentry's migration.
    {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&url).await.expect("connect");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {}.agentry_migrations (version, name, applied_at) VALUES (99, '0099_future', 0)",
            &*schema
        )))
        .execute(&mut c)
        .await
        .expect("insert");
    }
    let listed = status(&["--status"]);
    assert!(
        listed.contains("0099 0099_future") && listed.contains("newer"),
        "{listed}"
    );
    let refused = server(fixture("durable"))
        .args(base.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .try_start()
        .err()
        .expect("refused");
    assert!(
        refused.contains("schema version 99") && refused.contains(&format!("up to {known}")),
        "{refused}"
    );
}

/// A wrong URL or bad credentials fail at start-up with a clear message that never shows the
/// password.
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_database_url_fails_at_start_and_never_shows_the_password() {
    for url in [
        "postgres://nobody_here:sup3rsecret@127.0.0.1:5432/test",
        "postgres://postgres:sup3rsecret@127.0.0.1:1/test",
        "postgres://postgres:sup3rsecret@127.0.0.1:5432/no_such_database_here",
    ] {
        let log = server(fixture("durable"))
            .args(["--database".to_string(), url.to_string()])
            .try_start()
            .err()
            .expect("refused");
        assert!(log.contains("cannot use the PostgreSQL database"), "{log}");
        assert!(!log.contains("sup3rsecret"), "the password leaked: {log}");
    }
}

/// A TCP proxy between a node and PostgreSQL that a test can cut (every connection dropped,
/// new ones refused) and restore: the database going away, deterministically, without touching
/// the server the other tests use.
struct PgProxy {
    port: u16,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<parking_lot::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl PgProxy {
    async fn start() -> PgProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links = std::sync::Arc::new(parking_lot::Mutex::new(
            Vec::<tokio::task::AbortHandle>::new(),
        ));
        let (d, l) = (down.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if d.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect("127.0.0.1:5432").await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                l.lock().push(task.abort_handle());
            }
        });
        PgProxy { port, down, links }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/test", self.port)
    }

    /// Every connection through the proxy is killed, and new ones are refused.
    fn cut(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The database goes away under a node with runs in flight: `/readyz` says not ready, routes
/// that need the store answer 503 promptly (never hang), a sync invocation (no store) still
/// works; when it is back, the node recovers on its own and every accepted run ends exactly
/// once.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_database_goes_away_answers_503_recovers_and_loses_nothing() {
    let schema = schema();
    let proxy = PgProxy::start().await;
    let node = app(fixture("durable"))
        .args([
            "--database".to_string(),
            proxy.url(),
            "--database-schema".into(),
            schema.to_string(),
        ])
        .start()
        .await;
    let create = |i: i64| {
        let url = node.url("/v1/runs");
        async move {
            post(
                &url,
                &json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": i, "ms": 300}})
                    .to_string(),
            )
            .await
        }
    };
    let mut accepted = Vec::new();
    for i in 0..10 {
        let (status, text) = create(i).await;
        assert_eq!(status, 202, "{text}");
        accepted.push(json(&text)["id"].as_str().expect("id").to_string());
    }
    proxy.cut();
    let (status, text) = get(&node.url("/readyz")).await;
    assert_eq!(status, 503, "{text}");
    assert_eq!(json(&text)["store"], "unreachable", "{text}");
    let asked = std::time::Instant::now();
    let (status, text) = create(99).await;
    assert_eq!(status, 503, "{text}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    let (status, text) = post(
        &node.url("/v1/agents/durable/entrypoints/work/invoke"),
        &json!({"input": {"i": 5}}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "a sync call needs no store: {text}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.restore();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = get(&node.url("/readyz")).await;
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &accepted {
        let (status, text) = get(&node.url(&format!("/v1/runs/{id}/wait?timeout_s=60"))).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(json(&text)["status"], "succeeded", "{text}");
        let events = crate::runs::events(&node, id).await;
        let ends = events
            .iter()
            .filter(|(_, k, _)| k == "run.succeeded" || k == "run.failed")
            .count();
        assert_eq!(ends, 1, "{events:?}");
        let seqs: Vec<i64> = events.iter().map(|(s, _, _)| *s).collect();
        assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
    }
}

/// Every connection of a node is terminated (`pg_terminate_backend`) again and again while it
/// runs: it reconnects, no accepted run is lost, none ends twice.
#[tokio::test(flavor = "multi_thread")]
async fn terminated_connections_lose_no_run_and_end_none_twice() {
    let schema = schema();
    let node = node(&schema).await;
    let url = node.url("/v1/runs");
    let submit = tokio::spawn(async move {
        let mut accepted = Vec::new();
        for i in 0..120 {
            let (status, text) = post(
                &url,
                &json!({"agent": "durable", "entrypoint": "work", "input": {"i": i}}).to_string(),
            )
            .await;
            match status {
                202 => accepted.push(json(&text)["id"].as_str().expect("id").to_string()),
                503 => {} // its write met a killed connection: refused, not lost
                other => panic!("{other}: {text}"),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        accepted
    });
    let app_name = format!("agentry {}", &*schema);
    {
        use sqlx::Connection;
        let mut admin = sqlx::PgConnection::connect(&pg_url()).await.expect("admin");
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(80)).await;
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            )
            .bind(&app_name)
            .execute(&mut admin)
            .await
            .expect("terminate");
        }
    }
    let accepted = submit.await.expect("submit");
    assert!(accepted.len() >= 60, "only {} accepted", accepted.len());
    for id in &accepted {
        let (status, text) = get(&node.url(&format!("/v1/runs/{id}/wait?timeout_s=60"))).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(json(&text)["status"], "succeeded", "{text}");
        let events = crate::runs::events(&node, id).await;
        let ends = events
            .iter()
            .filter(|(_, k, _)| k == "run.succeeded")
            .count();
        assert_eq!(ends, 1, "{events:?}");
    }
}

/// A node stopped gracefully hands its unfinished runs back at once: another node takes them
/// within seconds, not after the lease TTL (30 s), and no attempt is used up.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_stopped_gracefully_hands_its_runs_to_another_at_once() {
    let schema = schema();
    let leaving = app(fixture("durable"))
        .args(on_postgres(&schema))
        .args(["--shutdown-grace-s", "0.2"])
        .start()
        .await;
    // The other node is up before the run starts (its start-up, slow on a busy machine, must
    // not outlast the run); the run is leased in its creating commit to the node it is
    // created on.
    let staying = node(&schema).await;
    let id = create_on(
        &leaving,
        json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": 1, "ms": 1500}}),
    )
    .await;
    wait_started(&leaving, &id).await;
    let stopped = std::time::Instant::now();
    leaving.stop().await;
    let (status, text) = get(&staying.url(&format!("/v1/runs/{id}/wait?timeout_s=25"))).await;
    assert_eq!(status, 200, "{text}");
    let run = json(&text);
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "taken over after {:?}: the lease was left to expire",
        stopped.elapsed()
    );
    let events = crate::runs::events(&staying, &id).await;
    let kinds: Vec<&str> = events.iter().map(|(_, k, _)| k.as_str()).collect();
    assert!(kinds.contains(&"run.retrying"), "{kinds:?}");
    assert_eq!(run["attempt"], 2, "the second attempt, on the other node");
    assert_eq!(run["max_attempts"], 3);
}

/// A PostgreSQL server of this test's own (initdb in a temporary directory, run as the
/// `postgres` user on a free port), so that it can be restarted without touching the server
/// the other tests use.
struct PrivatePostgres {
    dir: tempfile::TempDir,
    port: u16,
}

impl PrivatePostgres {
    fn bin(tool: &str) -> std::path::PathBuf {
        let root = std::path::Path::new("/usr/lib/postgresql");
        let mut versions: Vec<_> = std::fs::read_dir(root)
            .expect("PostgreSQL's server binaries in /usr/lib/postgresql")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        versions.sort();
        versions
            .last()
            .expect("a PostgreSQL version")
            .join("bin")
            .join(tool)
    }

    /// Runs a PostgreSQL tool as the `postgres` user (initdb refuses root).
    fn as_postgres(tool: &str, args: &[&str]) {
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Self::bin(tool))
            .args(args)
            .output()
            .expect("runuser");
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::chown(dir.path(), Some(uid_of("postgres")), None).expect("chown");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let data = dir.path().join("data");
        let data = data.to_str().expect("utf-8");
        Self::as_postgres("initdb", &["-D", data, "-A", "trust", "-U", "postgres"]);
        let pg = Self { dir, port };
        pg.ctl("start");
        pg
    }

    fn ctl(&self, what: &str) {
        let data = self.dir.path().join("data");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log");
        let mut args = vec![
            "-D",
            data.to_str().expect("utf-8"),
            "-l",
            log.to_str().expect("utf-8"),
            "-o",
            &options,
            "-w",
            what,
        ];
        if what != "start" {
            // Like a crash: no clean shutdown checkpoint; committed work comes back from the WAL.
            args.extend(["-m", "immediate"]);
        }
        Self::as_postgres("pg_ctl", &args);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(Self::bin("pg_ctl"))
            .args([
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
    }
}

fn uid_of(user: &str) -> u32 {
    let out = std::process::Command::new("id")
        .args(["-u", user])
        .output()
        .expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no user {user}"))
}

/// PostgreSQL restarted (immediate mode: no clean shutdown) under two nodes with runs in
/// flight: the nodes reconnect on their own, every accepted run ends exactly once, none is
/// lost, and none ran to completion twice (the agent logs each completed execution).
#[tokio::test(flavor = "multi_thread")]
async fn postgres_restarted_mid_load_loses_no_run_and_runs_none_twice() {
    let pg = PrivatePostgres::start();
    let logs = tempfile::tempdir().expect("tempdir");
    let durable_log = logs.path().join("durable.log");
    let start = |name: &str| {
        server(fixture("durable"))
            .args(["--database", &pg.url(), "--node-name", name])
            .env("DURABLE_LOG", durable_log.to_str().expect("utf-8"))
            .start()
    };
    let a = start("a");
    let b = start("b");
    let targets = [a.url("/v1/runs"), b.url("/v1/runs")];
    let submit = tokio::spawn(async move {
        let mut accepted = Vec::new();
        for i in 0..200usize {
            let body =
                json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": i, "ms": 10}});
            let (status, text) = post(&targets[i % 2], &body.to_string()).await;
            match status {
                202 => accepted.push(json(&text)["id"].as_str().expect("id").to_string()),
                503 => {} // refused while the database is away: not accepted, not lost
                other => panic!("{other}: {text}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        accepted
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    pg.ctl("restart");
    let accepted = submit.await.expect("submit");
    eprintln!("{} of 200 accepted across the restart", accepted.len());
    assert!(accepted.len() >= 100, "only {} accepted", accepted.len());
    let done = |text: &str, id: &str| {
        text.lines()
            .filter(|l| l.starts_with("done ") && l.split(' ').nth(1) == Some(id))
            .count()
    };
    for id in &accepted {
        let (status, text) = get(&a.url(&format!("/v1/runs/{id}/wait?timeout_s=60"))).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(json(&text)["status"], "succeeded", "{text}");
        let events = crate::runs::events(&a, id).await;
        let ends = events
            .iter()
            .filter(|(_, k, _)| k == "run.succeeded")
            .count();
        assert_eq!(ends, 1, "{events:?}");
    }
    let executed = std::fs::read_to_string(&durable_log).expect("the agent's log");
    for id in &accepted {
        assert_eq!(
            done(&executed, id),
            1,
            "{id} ran to completion {} times",
            done(&executed, id)
        );
    }
    drop((a, b));
}

/// The most of `spans` ([start, end], ISO times of one format) that overlap at any moment.
fn most_at_once(spans: &[(String, String)]) -> usize {
    let mut edges: Vec<(&str, i32)> = spans
        .iter()
        .flat_map(|(s, e)| [(s.as_str(), 1), (e.as_str(), -1)])
        .collect();
    // At one instant an end comes before a start: touching spans do not overlap.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

/// A cluster-wide cap per agent holds across nodes: two nodes, each free to run many at once.
/// Two long runs fill the cap of 2; four more, submitted to both nodes (so each node is woken
/// to claim them), stay queued while the cap is full, and no moment has more than 2 runs of
/// the agent (from the run records' start and end). Which node takes which run is left to
/// them: a test that needs both to take part would be a race.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_cap_per_agent_holds_across_nodes() {
    let schema = schema();
    let mut args = on_postgres(&schema);
    args.extend(["--cluster-max-running-runs-per-agent".into(), "2".into()]);
    let a = app(fixture("durable")).args(args.clone()).start().await;
    let b = app(fixture("durable")).args(args).start().await;
    let sleepy = |i: usize, ms: u64| json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": i, "ms": ms}});
    let long = [
        create_on(&a, sleepy(0, 3000)).await,
        create_on(&b, sleepy(1, 3000)).await,
    ];
    for id in &long {
        wait_started(&a, id).await;
    }
    let mut queued = Vec::new();
    for i in 2..6 {
        let id = if i % 2 == 0 {
            create_on(&a, sleepy(i, 100)).await
        } else {
            create_on(&b, sleepy(i, 100)).await
        };
        queued.push(id);
    }
    // A node that ignored the cap would start these within its claim interval (tens of ms).
    tokio::time::sleep(Duration::from_millis(800)).await;
    for id in &queued {
        let run = json(&get(&b.url(&format!("/v1/runs/{id}"))).await.1);
        assert!(
            run["started_at"].is_null(),
            "{id} started while the cluster cap was full: {run}"
        );
    }
    let mut spans = Vec::new();
    for id in long.iter().chain(&queued) {
        let (status, text) = get(&a.url(&format!("/v1/runs/{id}/wait?timeout_s=60"))).await;
        assert_eq!(status, 200, "{text}");
        let run = json(&text);
        assert_eq!(run["status"], "succeeded", "{run}");
        spans.push((
            run["started_at"].as_str().expect("started").to_string(),
            run["finished_at"].as_str().expect("finished").to_string(),
        ));
    }
    let most = most_at_once(&spans);
    assert!(
        most <= 2,
        "{most} runs of the agent at once across nodes (cap 2): {spans:?}"
    );
    assert_eq!(most, 2, "the cap was never reached: {spans:?}");
}

/// A cluster cap needs the shared database: on the embedded store it is refused, naming the
/// setting.
#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_cap_without_a_database_is_refused() {
    let out = agentry(&[
        "serve",
        fixture("durable").to_str().expect("path"),
        "--port",
        "0",
        "--cluster-max-running-runs",
        "3",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("runs.cluster_max_running"), "{err}");
}

/// RunAgent's invocation history is the cluster's on a shared database: a call made through
/// one node is listed, found and counted by another, while each node keeps its own RunAgent
/// database for discovery.
#[tokio::test(flavor = "multi_thread")]
async fn runagent_history_is_shared_by_the_nodes_of_one_database() {
    let schema = schema();
    let a = app(fixture("compat"))
        .args(on_postgres(&schema))
        .start()
        .await;
    let b = app(fixture("compat"))
        .args(on_postgres(&schema))
        .start()
        .await;
    let run = a.url(&format!("/api/v1/agents/{COMPAT_ID}/run"));
    let (status, text) = post(
        &run,
        r#"{"entrypoint_tag":"echo","input_kwargs":{"message":"through a"}}"#,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    // A call that raises is recorded as failed (whatever RunAgent's route answers).
    post(
        &b.url(&format!("/api/v1/agents/{COMPAT_ID}/run")),
        r#"{"entrypoint_tag":"boom","input_kwargs":{"message":"through b"}}"#,
    )
    .await;
    // Each node flushes its own writer before reading: wait until a's record reached the
    // database, as b sees it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let list = loop {
        let (status, text) =
            get(&b.url(&format!("/api/v1/agents/{COMPAT_ID}/invocations?limit=10"))).await;
        assert_eq!(status, 200, "{text}");
        let v = json(&text);
        if v["total_count"] == 2 || std::time::Instant::now() > deadline {
            break v["invocations"].as_array().cloned().unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(list.len(), 2, "{list:?}");
    let from_a = list
        .iter()
        .find(|i| i["status"] == "completed")
        .expect("a's call, listed by b");
    assert_eq!(from_a["output_data"], json!({"message": "through a"}));
    let id = from_a["invocation_id"].as_str().unwrap_or_default();
    let (status, text) = get(&b.url(&format!("/api/v1/invocations/{id}"))).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["invocation_id"], id);
    let (_, text) = get(&a.url(&format!("/api/v1/agents/{COMPAT_ID}/invocations/stats"))).await;
    let stats = &json(&text)["stats"];
    assert_eq!(stats["total_invocations"], 2, "{stats}");
    assert_eq!(stats["completed_invocations"], 1, "{stats}");
    assert_eq!(stats["failed_invocations"], 1, "{stats}");
}
