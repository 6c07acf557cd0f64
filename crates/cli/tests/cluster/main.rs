//! A test binary of its own, so that these clusters of processes never share the machine with
//! the timing-sensitive tests of `it` (cargo runs test binaries one after another).
//!
//! Clusters of real `agentry` processes on one PostgreSQL, one of them SIGKILLed part-way
//! through 500 runs: three `serve` nodes, or one `serve` node taking requests in front of
//! three `agentry worker` processes doing all the execution. What must hold: every run ends
//! exactly once, none is lost, the dead node's runs are taken over within the lease TTL plus a
//! reaper interval, each run's events are gap-free and in order, `wait`, event streams and
//! cancels work across nodes, a concurrency key holds across nodes, and the node registry
//! shows the dead node gone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[path = "../it/common/mod.rs"]
#[allow(dead_code)]
mod common;

use crate::common::pg::{Schema, on_postgres, pg_url, schema};
use crate::common::sse::{events, sse};
use crate::common::*;
use serde_json::{Value, json};

/// Short leases, so that a takeover happens within the test: renewed every second, expired
/// leases looked for every half second.
const LEASE_TTL_S: f64 = 3.0;
const REAP_EVERY_S: f64 = 0.5;
const RUNS: usize = 500;
const KEYED: usize = 50;
/// The durable fixture's agent id (its `runagent.config.json`).
const DURABLE_ID: &str = "d0d0d0d0-0000-4000-8000-000000000001";

/// Which processes make up the cluster.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// Three `serve` nodes: each takes requests and executes.
    ThreeServing,
    /// One `serve` node that executes nothing, three `agentry worker` nodes.
    WorkersBehindOneFront,
}

fn node(schema: &Schema, name: &str, worker: bool, extra: &[&str]) -> ServerBuilder {
    let mut b = server(fixture("durable"))
        .args(on_postgres(schema))
        .args([
            "--node-name",
            name,
            "--lease-ttl-s",
            &LEASE_TTL_S.to_string(),
        ])
        .args(extra.iter().copied());
    if worker {
        b = b.worker();
    }
    b
}

async fn db(schema: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .after_connect({
            let set = format!("SET search_path TO {schema}");
            move |c, _| {
                let set = set.clone();
                Box::pin(async move {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(set)).execute(c).await?;
                    Ok(())
                })
            }
        })
        .connect(&pg_url())
        .await
        .expect("connect to the test database")
}

/// How many runs `node` holds a lease on now.
async fn held_by(pool: &sqlx::PgPool, node: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM runs WHERE status = 'running' AND lease_node = $1")
        .bind(node)
        .fetch_one(pool)
        .await
        .expect("count")
}

async fn nodes(front: &Server) -> HashMap<String, Value> {
    let (status, text) = get(&front.url("/v1/nodes")).await;
    assert_eq!(status, 200, "{text}");
    json(&text)["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| (n["name"].as_str().expect("name").to_string(), n.clone()))
        .collect()
}

async fn cluster_survives_a_sigkilled_node(layout: Layout) {
    let schema = schema();
    let log_dir = tempfile::tempdir().expect("tempdir");
    let durable_log = log_dir.path().join("durable.log");
    let log = durable_log.to_str().expect("utf-8 path");
    // The first node creates the schema; the others start together on it.
    let (fronts, front_names, mut executors) = match layout {
        Layout::ThreeServing => {
            let n1 = node(&schema, "n1", false, &[])
                .env("DURABLE_LOG", log)
                .start();
            let n2 = node(&schema, "n2", false, &[]).env("DURABLE_LOG", log);
            let n3 = node(&schema, "n3", false, &[]).env("DURABLE_LOG", log);
            let (n2, n3) = (std::thread::spawn(move || n2.start()), n3.start());
            let n2 = n2.join().expect("n2");
            // n2 dies; n1 and n3 take requests throughout.
            (vec![n1, n3], vec!["n1", "n3"], vec![n2])
        }
        Layout::WorkersBehindOneFront => {
            let front = node(&schema, "front", false, &["--max-running-runs", "0"]).start();
            let w = |name: &'static str| {
                let b = node(&schema, name, true, &[]).env("DURABLE_LOG", log);
                std::thread::spawn(move || b.start())
            };
            let (w1, w2, w3) = (w("w1"), w("w2"), w("w3"));
            let w1 = w1.join().expect("w1");
            let (w2, w3) = (w2.join().expect("w2"), w3.join().expect("w3"));
            (vec![front], vec!["front"], vec![w1, w2, w3])
        }
    };
    let victim_name = match layout {
        Layout::ThreeServing => "n2",
        Layout::WorkersBehindOneFront => "w1",
    };
    let mut victim = executors.remove(0);
    let front_urls: Vec<String> = fronts.iter().map(|f| f.url("/v1/runs")).collect();
    let mut targets = front_urls.clone();
    if layout == Layout::ThreeServing {
        // The victim takes requests too until it dies.
        targets.push(victim.url("/v1/runs"));
    }

    // 500 runs from 8 submitters, spread over every node that takes requests; 50 of them
    // share a concurrency key.
    let started = Instant::now();
    let submitters: Vec<_> = (0..8)
        .map(|s| {
            let targets = targets.clone();
            let fronts = front_urls.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in (s..RUNS).step_by(8) {
                    // An idempotency key per run: a submission whose answer was lost with the
                    // victim is sent again to a surviving node without creating a second run.
                    let key = format!("run-{i}");
                    let body = if i % (RUNS / KEYED) == 0 {
                        json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": i, "ms": 20}, "concurrency_key": "k", "idempotency_key": key})
                    } else {
                        json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": i, "ms": 60}, "idempotency_key": key})
                    };
                    let body = body.to_string();
                    let (status, text) = match try_post(&targets[i % targets.len()], &body).await {
                        Ok(answer) => answer,
                        Err(_) => post(&fronts[i % fronts.len()], &body).await,
                    };
                    assert!(status == 202 || status == 200, "{status}: {text}");
                    ids.push(json(&text)["id"].as_str().expect("id").to_string());
                }
                ids
            })
        })
        .collect();

    // Part-way (a fifth done), while the victim is executing: kill it.
    let pool = db(&schema).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (held, done): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'running' AND lease_node = $1), count(*) FILTER (WHERE status = 'succeeded') FROM runs",
        )
        .bind(victim_name)
        .fetch_one(&pool)
        .await
        .expect("count");
        if held >= 1 && done >= (RUNS / 5) as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{victim_name} never ran anything"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held_at_kill = held_by(&pool, victim_name).await;
    victim.stop(nix::sys::signal::Signal::SIGKILL);
    let killed_at = Instant::now();
    eprintln!(
        "killed {victim_name} {:?} after the first submission, holding {held_at_kill} runs",
        killed_at - started
    );

    // Its runs are taken over within the lease TTL plus a reaper interval (and a second of
    // slack for a loaded machine: the poll here, the claim, the scheduler).
    let bound = Duration::from_secs_f64(LEASE_TTL_S + REAP_EVERY_S + 1.0);
    loop {
        let held = held_by(&pool, victim_name).await;
        if held == 0 {
            break;
        }
        assert!(
            killed_at.elapsed() < bound,
            "{held} runs of the dead node still not taken over after {:?}",
            killed_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let takeover = killed_at.elapsed();
    eprintln!("the dead node's runs were all requeued {takeover:?} after the kill");

    let mut ids = Vec::new();
    for s in submitters {
        ids.extend(s.await.expect("submitter"));
    }
    assert_eq!(ids.len(), RUNS);
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), RUNS, "a resubmission created a second run");
    let front = &fronts[0];

    // A cancel and a live event stream through a node that is not running the run.
    let (_, text) = post(
        &front.url("/v1/runs"),
        &json!({"agent": "durable", "entrypoint": "cooperative", "input": {}}).to_string(),
    )
    .await;
    let coop = json(&text)["id"].as_str().expect("id").to_string();
    let runner: String = loop {
        let node: Option<String> = sqlx::query_scalar(
            "SELECT lease_node FROM runs WHERE id = $1 AND started_at IS NOT NULL",
        )
        .bind(&coop)
        .fetch_optional(&pool)
        .await
        .expect("lease node")
        .flatten();
        if let Some(n) = node {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // In the worker layout the front executes nothing, so the run is on a worker.
    let elsewhere = front_names
        .iter()
        .position(|name| *name != runner)
        .map(|i| &fronts[i])
        .expect("a taking node that is not running the run");
    let stream_url = elsewhere.url(&format!("/v1/runs/{coop}/events?after=0"));
    let stream = tokio::spawn(async move { get(&stream_url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = Instant::now();
    let (status, text) = post(&elsewhere.url(&format!("/v1/runs/{coop}/cancel")), "").await;
    assert!(status == 202 || status == 200, "{status}: {text}");
    let (status, text) = get(&elsewhere.url(&format!("/v1/runs/{coop}/wait?timeout_s=10"))).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["status"], "cancelled", "{text}");
    let stopped_in = asked.elapsed();
    assert!(
        stopped_in < Duration::from_secs(3),
        "the cancel took {stopped_in:?}"
    );
    let (status, streamed) = stream.await.expect("stream");
    assert_eq!(status, 200);
    let streamed = sse(&streamed);
    assert_eq!(
        streamed.last().map(|(_, k, _)| k.as_str()),
        Some("run.cancelled"),
        "{streamed:?}"
    );

    // Every run ends once, succeeded, seen from a surviving node; its events are in order with
    // no gap or duplicate, and end with exactly one terminal event.
    let mut keyed = Vec::new();
    for id in &ids {
        let (status, text) = get(&front.url(&format!("/v1/runs/{id}/wait?timeout_s=60"))).await;
        assert_eq!(status, 200, "{text}");
        let run = json(&text);
        assert_eq!(run["status"], "succeeded", "{text}");
        let events = events(front, id).await;
        let seqs: Vec<i64> = events.iter().map(|(seq, _, _)| *seq).collect();
        let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(seqs, expected, "{id}: {events:?}");
        let terminal = events
            .iter()
            .filter(|(_, k, _)| {
                matches!(
                    k.as_str(),
                    "run.succeeded" | "run.failed" | "run.timed_out" | "run.cancelled"
                )
            })
            .count();
        assert_eq!(terminal, 1, "{id}: {events:?}");
        assert_eq!(
            events.last().map(|(_, k, _)| k.as_str()),
            Some("run.succeeded")
        );
        if run["concurrency_key"] == "k" {
            keyed.push(run);
        }
    }
    let in_db: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE status = 'succeeded'")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(
        in_db, RUNS as i64,
        "runs lost or duplicated in the database"
    );

    // The key held across nodes: its runs' [started, finished] never overlap.
    assert_eq!(keyed.len(), KEYED);
    let mut spans: Vec<(String, String)> = keyed
        .iter()
        .map(|r| {
            (
                r["started_at"].as_str().expect("started").to_string(),
                r["finished_at"].as_str().expect("finished").to_string(),
            )
        })
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "two runs of one key overlapped: {pair:?}"
        );
    }

    // The registry: the survivors up, with their agents; the dead node gone.
    let deadline = Instant::now() + Duration::from_secs_f64(LEASE_TTL_S * 3.0);
    let listed = loop {
        let listed = nodes(front).await;
        if listed[victim_name]["status"] == "gone" {
            break listed;
        }
        assert!(Instant::now() < deadline, "never marked gone: {listed:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (name, n) in &listed {
        if name != victim_name {
            assert_eq!(n["status"], "up", "{n}");
            assert_eq!(n["agents"], json!([DURABLE_ID]), "{n}");
        }
    }
    match layout {
        Layout::ThreeServing => assert_eq!(listed.len(), 3, "{listed:?}"),
        Layout::WorkersBehindOneFront => {
            assert_eq!(listed.len(), 4, "{listed:?}");
            assert_eq!(listed["front"]["role"], "serve");
            assert_eq!(listed["front"]["capacity"], 0);
            assert_eq!(listed["w2"]["role"], "worker");
            // Only the workers executed anything.
            let (_, front_metrics) = get(&front.url("/metrics")).await;
            assert!(
                front_metrics.contains("agentry_attempts_ended_total{status=\"succeeded\"} 0"),
                "{front_metrics}"
            );
            let (_, worker_metrics) = get(&executors[0].url("/metrics")).await;
            assert!(
                !worker_metrics.contains("agentry_attempts_ended_total{status=\"succeeded\"} 0"),
                "{worker_metrics}"
            );
        }
    }
    drop(executors);
    drop(fronts);
}

#[tokio::test(flavor = "multi_thread")]
async fn three_serving_nodes_survive_one_sigkilled_mid_load() {
    cluster_survives_a_sigkilled_node(Layout::ThreeServing).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_behind_one_serving_node_survive_one_sigkilled_mid_load() {
    cluster_survives_a_sigkilled_node(Layout::WorkersBehindOneFront).await;
}

/// A worker's admin port serves the probes and the metrics, and nothing of the API; a worker
/// without a shared database refuses to start; a second process under a live node's name is
/// refused (it would requeue the live node's runs), while the same node restarted on its state
/// directory right after a SIGKILL starts at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_serves_only_probes_and_metrics_and_names_are_not_shared() {
    let schema = schema();
    let state = tempfile::tempdir().expect("tempdir");
    let mut w = node(&schema, "solo", true, &[])
        .state_dir(state.path())
        .start();
    assert_eq!(get(&w.url("/healthz")).await.0, 200);
    let (status, text) = get(&w.url("/readyz")).await;
    assert_eq!(status, 200, "{text}");
    let (status, metrics) = get(&w.url("/metrics")).await;
    assert_eq!(status, 200, "{metrics}");
    assert!(metrics.contains("agentry_build_info{"), "{metrics}");
    assert!(metrics.contains("role=\"worker\""), "{metrics}");
    assert!(metrics.contains("agentry_store_up 1"), "{metrics}");
    assert!(
        metrics.contains("agentry_agent_live_workers{agent="),
        "{metrics}"
    );
    for path in ["/v1/runs", "/v1/agents", "/v1/nodes"] {
        assert_eq!(get(&w.url(path)).await.0, 404, "{path}");
    }
    assert_eq!(
        post(&w.url("/v1/runs"), "{}").await.0,
        404,
        "a worker must not accept runs"
    );

    let err = server(fixture("durable"))
        .worker()
        .try_start()
        .err()
        .expect("a worker without --database must not start");
    assert!(err.contains("a worker needs --database"), "{err}");

    let err = node(&schema, "solo", false, &[])
        .try_start()
        .err()
        .expect("a second process under a live node's name must not start");
    assert!(err.contains("in use by another live node"), "{err}");

    w.stop(nix::sys::signal::Signal::SIGKILL);
    // Its record is fresh (it reported within the lease TTL), yet this is no second live
    // process: it holds the state directory's lock, so the holder is dead.
    let again = node(&schema, "solo", true, &[])
        .state_dir(state.path())
        .try_start()
        .unwrap_or_else(|log| panic!("the restarted node was refused:\n{log}"));
    let (status, text) = get(&again.url("/readyz")).await;
    assert_eq!(status, 200, "{text}");
}
