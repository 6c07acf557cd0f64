//! Durable runs end to end: real server, real SQLite file, real Python workers. Most tests run
//! the application in the test process (`app`); those that kill or restart it spawn the binary.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::common::app::app;
pub(crate) use crate::common::sse::{events, sse};
use crate::common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};

fn durable() -> std::path::PathBuf {
    fixture("durable")
}

async fn create(srv: &impl Served, body: Value) -> Value {
    let (status, text) = post(&srv.url("/v1/runs"), &body.to_string()).await;
    assert_eq!(status, 202, "{text}");
    json(&text)
}

async fn wait(srv: &impl Served, id: &str) -> Value {
    let (status, text) = get(&srv.url(&format!("/v1/runs/{id}/wait?timeout_s=60"))).await;
    assert_eq!(status, 200, "{text}");
    json(&text)
}

fn kinds(evs: &[(i64, String, Value)]) -> Vec<&str> {
    evs.iter().map(|(_, k, _)| k.as_str()).collect()
}

const TERMINAL: [&str; 4] = [
    "run.succeeded",
    "run.failed",
    "run.timed_out",
    "run.cancelled",
];

#[tokio::test(flavor = "multi_thread")]
async fn a_run_is_stored_executed_listed_and_logged() {
    let srv = app(durable()).start().await;
    let run = create(&srv, json!({"agent": "durable", "entrypoint": "work", "input": {"i": 7}, "metadata": {"who": "test"}})).await;
    let id = run["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("run_"));
    let done = wait(&srv, &id).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["output"], json!({"i": 7}));
    assert_eq!(done["attempt"], 1);
    assert_eq!(done["metadata"], json!({"who": "test"}));
    assert_eq!(done["agent_name"], "durable");
    assert!(done["finished_at"].is_string());
    let evs = events(&srv, &id).await;
    assert_eq!(kinds(&evs), ["run.queued", "run.started", "run.succeeded"]);
    assert_eq!(evs.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(evs[2].2["data"]["result"], json!({"i": 7}));

    // A streaming entrypoint's chunks become run.chunk events.
    let s = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "counts_stream", "input": {"n": 3}}),
    )
    .await;
    let sid = s["id"].as_str().expect("id");
    assert_eq!(wait(&srv, sid).await["status"], "succeeded");
    let evs = events(&srv, sid).await;
    let chunks: Vec<&Value> = evs
        .iter()
        .filter(|e| e.1 == "run.chunk")
        .map(|e| &e.2["data"])
        .collect();
    assert_eq!(
        chunks,
        [
            &json!({"index": 0, "value": {"k": 0}}),
            &json!({"index": 1, "value": {"k": 1}}),
            &json!({"index": 2, "value": {"k": 2}})
        ]
    );

    // Listing: filters and cursor paging, newest first.
    for i in 0..4 {
        create(
            &srv,
            json!({"agent": "durable", "entrypoint": "work", "input": {"i": i}}),
        )
        .await;
    }
    let (status, page1) = get(&srv.url("/v1/runs?entrypoint=work&limit=3")).await;
    assert_eq!(status, 200);
    let page1 = json(&page1);
    assert_eq!(page1["runs"].as_array().map(Vec::len), Some(3));
    assert_eq!(page1["runs"][0]["input"], json!({"i": 3}));
    let cursor = page1["next_cursor"].as_str().expect("cursor");
    let page2 = json(
        &get(&srv.url(&format!("/v1/runs?entrypoint=work&limit=3&cursor={cursor}")))
            .await
            .1,
    );
    let ids2: Vec<&Value> = page2["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| &r["input"]["i"])
        .collect();
    assert_eq!(ids2, [&json!(0), &json!(7)]);
    assert!(page2["next_cursor"].is_null());
    let by_agent = json(
        &get(&srv.url("/v1/runs?agent=durable&entrypoint=counts_stream"))
            .await
            .1,
    );
    assert_eq!(by_agent["runs"].as_array().map(Vec::len), Some(1));
    let (status, _) = get(&srv.url("/v1/runs?status=bogus")).await;
    assert_eq!(status, 422);
    let (status, body) = get(&srv.url("/v1/runs/run_nope")).await;
    assert_eq!(status, 404);
    assert_eq!(json(&body)["error"]["code"], "run_not_found");
    // Sync invocations are not runs.
    let (status, _) = post(
        &srv.url("/v1/agents/durable/entrypoints/work/invoke"),
        r#"{"input": {"i": 1}}"#,
    )
    .await;
    assert_eq!(status, 200);
    let all = json(&get(&srv.url("/v1/runs?limit=100")).await.1);
    assert_eq!(all["runs"].as_array().map(Vec::len), Some(6));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_before_anything_is_stored() {
    let srv = app(durable())
        .arg("--max-run-input-bytes")
        .arg("1000")
        .start()
        .await;
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({"agent": "nope", "entrypoint": "work", "input": {"i": 1}}),
            404,
            "agent_not_found",
        ),
        (
            json!({"agent": "durable", "entrypoint": "nope", "input": {"i": 1}}),
            404,
            "entrypoint_not_found",
        ),
        (
            json!({"agent": "durable", "entrypoint": "work", "input": {"i": "x"}}),
            422,
            "validation_error",
        ),
        (
            json!({"agent": "durable", "entrypoint": "work", "input": {}}),
            422,
            "validation_error",
        ),
        (
            json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1, "j": 2}}),
            422,
            "validation_error",
        ),
        (
            json!({"agent": "durable", "entrypoint": "work", "input": [1]}),
            422,
            "validation_error",
        ),
        (
            json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}, "bogus": 1}),
            422,
            "validation_error",
        ),
        (
            json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}, "max_attempts": 0}),
            422,
            "validation_error",
        ),
        (
            json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}, "delay_s": 1, "run_at": "2030-01-01T00:00:00Z"}),
            422,
            "validation_error",
        ),
        (
            json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}, "run_at": "tomorrow"}),
            422,
            "validation_error",
        ),
        (
            json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1, "pad": "x".repeat(2000)}}),
            413,
            "payload_too_large",
        ),
        (
            json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}, "backoff": {"base": 0.5}}),
            422,
            "validation_error",
        ),
    ];
    for (body, status, code) in cases {
        let (got, text) = post(&srv.url("/v1/runs"), &body.to_string()).await;
        assert_eq!(got, status, "{body} -> {text}");
        assert_eq!(json(&text)["error"]["code"], code, "{text}");
    }
    // The schema check names the field and the expected type.
    let (_, text) = post(
        &srv.url("/v1/runs"),
        r#"{"agent":"durable","entrypoint":"work","input":{"i":"x"}}"#,
    )
    .await;
    let errors = &json(&text)["error"]["details"]["errors"];
    assert_eq!(errors[0]["path"], "input.i");
    assert_eq!(errors[0]["expected"], "integer");
    // Malformed JSON.
    let (got, _) = post(&srv.url("/v1/runs"), "{not json").await;
    assert_eq!(got, 422);
    // The context parameter is not part of the input.
    let (got, text) = post(
        &srv.url("/v1/runs"),
        r#"{"agent":"durable","entrypoint":"whoami","input":{"ctx":1}}"#,
    )
    .await;
    assert_eq!(got, 422, "{text}");
    let all = json(&get(&srv.url("/v1/runs")).await.1);
    assert_eq!(
        all["runs"],
        json!([]),
        "nothing may be stored for refused requests"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_keys_return_the_same_run_or_conflict() {
    let srv = app(durable()).start().await;
    let body = json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}, "idempotency_key": "order-42"});
    let first = create(&srv, body.clone()).await;
    let r = client()
        .post(srv.url("/v1/runs"))
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers().get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    let again: Value = r.json().await.expect("json");
    assert_eq!(again["id"], first["id"]);
    let other = json!({"agent": "durable", "entrypoint": "work", "input": {"i": 2}, "idempotency_key": "order-42"});
    let (status, text) = post(&srv.url("/v1/runs"), &other.to_string()).await;
    assert_eq!(status, 409, "{text}");
    let err = json(&text);
    assert_eq!(err["error"]["code"], "idempotency_conflict");
    assert_eq!(err["error"]["details"]["run_id"], first["id"]);
    let all = json(&get(&srv.url("/v1/runs")).await.1);
    assert_eq!(all["runs"].as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn retriable_failures_retry_with_backoff_until_attempts_run_out() {
    let srv = app(durable()).start().await;
    let backoff = json!({"base": 1.0, "max_s": 0.3, "jitter": 0.0});
    let run = create(&srv, json!({"agent": "durable", "entrypoint": "flaky", "input": {"fail_times": 2}, "backoff": backoff})).await;
    let id = run["id"].as_str().expect("id");
    let done = wait(&srv, id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 3);
    assert_eq!(done["output"], json!({"attempt": 3}));
    let evs = events(&srv, id).await;
    assert_eq!(
        kinds(&evs),
        [
            "run.queued",
            "run.started",
            "run.retrying",
            "run.started",
            "run.retrying",
            "run.started",
            "run.succeeded"
        ]
    );
    let retry = &evs[2].2["data"];
    assert_eq!(retry["delay_ms"], 300);
    assert_eq!(retry["error"]["code"], "agent_error");
    assert_eq!(retry["error"]["type"], "ValueError");
    // The backoff was waited out: each start comes at least 0.3 s after the failure before it.
    let at = |i: usize| {
        chrono::DateTime::parse_from_rfc3339(evs[i].2["at"].as_str().expect("at")).expect("time")
    };
    assert!(
        at(3) - at(2) >= chrono::Duration::milliseconds(250),
        "{evs:?}"
    );
    assert!(
        at(5) - at(4) >= chrono::Duration::milliseconds(250),
        "{evs:?}"
    );

    // Out of attempts: failed, and listed as such (the dead letters).
    let run = create(&srv, json!({"agent": "durable", "entrypoint": "flaky", "input": {"fail_times": 5}, "max_attempts": 2, "backoff": backoff})).await;
    let id = run["id"].as_str().expect("id");
    let done = wait(&srv, id).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["attempt"], 2);
    assert_eq!(done["error"]["message"], "attempt 2 fails on purpose");
    assert!(
        done["error"].get("traceback").is_none(),
        "tracebacks are not exposed by default"
    );
    let failed = json(&get(&srv.url("/v1/runs?status=failed")).await.1);
    assert_eq!(failed["runs"][0]["id"], id);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_retriable_error_fails_at_once() {
    let srv = app(durable()).start().await;
    let run = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "fatal", "max_attempts": 5}),
    )
    .await;
    let done = wait(&srv, run["id"].as_str().expect("id")).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["attempt"], 1);
    assert_eq!(done["error"]["type"], "NonRetriableError");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_run_times_out_and_its_worker_is_replaced() {
    let srv = app(durable()).start().await;
    let t = Instant::now();
    let run = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "hang", "timeout_s": 1, "max_attempts": 3}),
    )
    .await;
    let done = wait(&srv, run["id"].as_str().expect("id")).await;
    assert_eq!(done["status"], "timed_out", "{done}");
    assert_eq!(done["attempt"], 1, "a deadline is final, not retried");
    assert_eq!(done["error"]["code"], "timeout_error");
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_workers_fine(&srv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_and_running_runs_can_be_cancelled() {
    let srv = app(durable()).args(["--cancel-grace-s", "1"]).start().await;
    // Queued (delayed): cancelled at once.
    let run = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}, "delay_s": 60}),
    )
    .await;
    let id = run["id"].as_str().expect("id");
    let (status, text) = post(&srv.url(&format!("/v1/runs/{id}/cancel")), "").await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["status"], "cancelled");
    assert_eq!(
        kinds(&events(&srv, id).await),
        ["run.queued", "run.cancelled"]
    );

    // Running, cooperative: ctx.cancelled turns true and it stops well within the grace.
    let run = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "cooperative"}),
    )
    .await;
    let id = run["id"].as_str().expect("id").to_string();
    wait_status(&srv, &id, "running").await;
    let t = Instant::now();
    let (status, _) = post(&srv.url(&format!("/v1/runs/{id}/cancel")), "").await;
    assert_eq!(status, 202);
    let done = wait(&srv, &id).await;
    assert_eq!(done["status"], "cancelled");
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "took {:?}",
        t.elapsed()
    );
    assert!(kinds(&events(&srv, &id).await).contains(&"run.cancel_requested"));

    // Running, ignoring the request: killed after the grace period.
    let run = create(&srv, json!({"agent": "durable", "entrypoint": "stubborn"})).await;
    let id = run["id"].as_str().expect("id").to_string();
    wait_status(&srv, &id, "running").await;
    let t = Instant::now();
    post(&srv.url(&format!("/v1/runs/{id}/cancel")), "").await;
    let done = wait(&srv, &id).await;
    assert_eq!(done["status"], "cancelled");
    assert!(t.elapsed() >= Duration::from_millis(900) && t.elapsed() < Duration::from_secs(10));

    // Async: the task is cancelled.
    let run = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "async_wait"}),
    )
    .await;
    let id = run["id"].as_str().expect("id").to_string();
    wait_status(&srv, &id, "running").await;
    post(&srv.url(&format!("/v1/runs/{id}/cancel")), "").await;
    assert_eq!(wait(&srv, &id).await["status"], "cancelled");

    // Cancelling a finished run changes nothing.
    let (status, text) = post(&srv.url(&format!("/v1/runs/{id}/cancel")), "").await;
    assert_eq!(status, 200);
    assert_eq!(json(&text)["status"], "cancelled");
    let (status, _) = post(&srv.url("/v1/runs/run_nope/cancel"), "").await;
    assert_eq!(status, 404);
    // The workers are fine afterwards.
    assert_workers_fine(&srv).await;
}

/// After a refused write (runs 1 was stored before, 2 refused): run 3 succeeds, and the store
/// holds exactly runs 3 and 1.
async fn assert_recovered_and_nothing_stored(srv: &impl Served) {
    let again = create(
        srv,
        json!({"agent": "durable", "entrypoint": "work", "input": {"i": 3}}),
    )
    .await;
    assert_eq!(
        wait(srv, again["id"].as_str().expect("id")).await["status"],
        "succeeded"
    );
    let all = json(&get(&srv.url("/v1/runs")).await.1);
    let inputs: Vec<&Value> = all["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| &r["input"]["i"])
        .collect();
    assert_eq!(inputs, [&json!(3), &json!(1)]);
}

/// A plain run still succeeds (the workers survived what the test did).
async fn assert_workers_fine(srv: &impl Served) {
    let next = create(
        srv,
        json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}}),
    )
    .await;
    assert_eq!(
        wait(srv, next["id"].as_str().expect("id")).await["status"],
        "succeeded"
    );
}

async fn wait_status(srv: &impl Served, id: &str, status: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let v = json(&get(&srv.url(&format!("/v1/runs/{id}"))).await.1);
        if v["status"] == status {
            // Give the worker a moment to be inside the call.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        assert!(Instant::now() < end, "run {id} never became {status}: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_sharing_a_concurrency_key_run_one_at_a_time_in_order() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("log.txt");
    let srv = server(durable())
        .env("DURABLE_LOG", log.to_str().expect("path"))
        .start();
    let mut ids = Vec::new();
    for i in 0..6 {
        let key = if i % 2 == 0 { "k" } else { "k" };
        let r = create(&srv, json!({"agent": "durable", "entrypoint": "ordered", "input": {"key": key, "i": i}, "concurrency_key": key})).await;
        ids.push(r["id"].as_str().expect("id").to_string());
    }
    for id in &ids {
        assert_eq!(wait(&srv, id).await["status"], "succeeded");
    }
    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
    let order: Vec<&str> = lines
        .iter()
        .filter(|l| l[0] == "begin")
        .map(|l| l[2])
        .collect();
    assert_eq!(
        order,
        ["0", "1", "2", "3", "4", "5"],
        "runs of one key start in enqueue order"
    );
    // Never two at once: every begin follows the previous end.
    let seq: Vec<&str> = lines.iter().map(|l| l[0]).collect();
    assert_eq!(seq, ["begin", "end"].repeat(6), "{text}");
    // Without a key they overlap (2 workers).
    let free: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..4 {
            let r = create(&srv, json!({"agent": "durable", "entrypoint": "ordered", "input": {"key": "free", "i": i}})).await;
            v.push(r["id"].as_str().expect("id").to_string());
        }
        v
    };
    for id in &free {
        wait(&srv, id).await;
    }
    let text = std::fs::read_to_string(&log).expect("log");
    let free_seq: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" free "))
        .map(|l| l.split(' ').next().unwrap_or(""))
        .collect();
    assert_ne!(
        free_seq,
        ["begin", "end"].repeat(4),
        "runs without a key should run side by side"
    );
}

/// The next run of a concurrency key starts as soon as the previous one ends, not at the
/// dispatcher's next poll (1 s): six runs of 100 ms of one key take well under the five
/// seconds five polls would.
#[tokio::test(flavor = "multi_thread")]
async fn the_next_run_of_a_key_starts_when_the_previous_ends() {
    let srv = server(durable()).start();
    // Warm: the first call of an entrypoint is not what is measured.
    let first = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "work", "input": {"i": -1}}),
    )
    .await;
    wait(&srv, first["id"].as_str().expect("id")).await;
    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    for i in 0..6 {
        // 100 ms each: all six are queued while the first still runs.
        let r = create(&srv, json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": i, "ms": 100}, "concurrency_key": "chain"})).await;
        ids.push(r["id"].as_str().expect("id").to_string());
    }
    for id in &ids {
        assert_eq!(wait(&srv, id).await["status"], "succeeded");
    }
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_millis(2500),
        "six keyed runs took {took:?}: the next of a key waited for the poll"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_reattaching_with_last_event_id_gets_every_event_once_in_order() {
    let srv = app(durable()).start().await;
    let run = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "chatty", "input": {"n": 60, "ms": 15}}),
    )
    .await;
    let id = run["id"].as_str().expect("id").to_string();
    // First connection: read a few events, then drop it mid-run.
    let mut seen: Vec<(i64, String)> = Vec::new();
    {
        let r = client()
            .get(srv.url(&format!("/v1/runs/{id}/events")))
            .send()
            .await
            .expect("sse");
        assert_eq!(
            r.headers().get("content-type").map(|v| v.as_bytes()),
            Some(&b"text/event-stream"[..])
        );
        let mut body = r.bytes_stream();
        let mut buf = String::new();
        while seen.len() < 10 {
            let piece = body.next().await.expect("more").expect("bytes");
            buf.push_str(&String::from_utf8_lossy(&piece));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                if let Some((i, k, _)) = sse(&block).into_iter().next() {
                    seen.push((i, k));
                }
            }
        }
    }
    let last = seen.last().expect("events").0;
    let status_now = json(&get(&srv.url(&format!("/v1/runs/{id}"))).await.1)["status"].clone();
    assert_eq!(status_now, "running", "the test must re-attach mid-run");
    // Re-attach with Last-Event-ID: the rest, live, until the terminal event.
    let r = client()
        .get(srv.url(&format!("/v1/runs/{id}/events")))
        .header("Last-Event-ID", last.to_string())
        .send()
        .await
        .expect("sse");
    let rest = sse(&r.text().await.expect("body"));
    seen.extend(rest.iter().map(|(i, k, _)| (*i, k.clone())));
    let seqs: Vec<i64> = seen.iter().map(|e| e.0).collect();
    let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
    assert_eq!(seqs, expected, "every event exactly once, in order, no gap");
    assert_eq!(seen.last().map(|e| e.1.as_str()), Some("run.succeeded"));
    assert_eq!(seen.iter().filter(|e| e.1 == "tick").count(), 60);
    assert!(seen.iter().any(|e| e.1 == "run.log"));
    // The stored log is the same sequence.
    let stored = events(&srv, &id).await;
    assert_eq!(
        stored
            .iter()
            .map(|e| (e.0, e.1.clone()))
            .collect::<Vec<_>>(),
        seen
    );
    // ?after= works the same, and a bad Last-Event-ID is refused.
    let tail = sse(
        &get(&srv.url(&format!("/v1/runs/{id}/events?after={}", seqs.len() - 2)))
            .await
            .1,
    );
    assert_eq!(tail.len(), 2);
    let r = client()
        .get(srv.url(&format!("/v1/runs/{id}/events")))
        .header("Last-Event-ID", "x")
        .send()
        .await
        .expect("sse");
    assert_eq!(r.status().as_u16(), 422);
    for bad in [
        "events?after=x",
        "wait?timeout_s=nope",
        "wait?timeout_s=9999",
    ] {
        let (status, text) = get(&srv.url(&format!("/v1/runs/{id}/{bad}"))).await;
        assert_eq!(status, 422, "{bad}: {text}");
        assert_eq!(json(&text)["error"]["code"], "validation_error");
    }

    // The WebSocket variant: the same events as JSON messages, then a close.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(srv.ws_url(&format!("/v1/runs/{id}/events/ws?after=0")))
            .await
            .expect("ws");
    let mut ws_seqs = Vec::new();
    while let Some(Ok(msg)) = ws.next().await {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            ws_seqs.push(json(&t)["seq"].as_i64().expect("seq"));
        }
    }
    assert_eq!(ws_seqs, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_context_reaches_plain_invocations_inert() {
    let srv = app(durable()).start().await;
    let (status, text) = post(
        &srv.url("/v1/agents/durable/entrypoints/whoami/invoke"),
        "{}",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        json(&text)["output"],
        json!({"run_id": null, "attempt": 1, "state": null})
    );
    let v = json(&get(&srv.url("/v1/agents/durable")).await.1);
    let whoami = v["entrypoints"]
        .as_array()
        .expect("eps")
        .iter()
        .find(|e| e["tag"] == "whoami")
        .cloned()
        .expect("whoami");
    assert_eq!(
        whoami["input_schema"]["properties"],
        json!({}),
        "ctx is not an input"
    );
    let run = create(&srv, json!({"agent": "durable", "entrypoint": "whoami"})).await;
    let id = run["id"].as_str().expect("id");
    assert_eq!(
        wait(&srv, id).await["output"],
        json!({"run_id": id, "attempt": 1, "state": null})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn create_and_wait_and_create_and_stream() {
    let srv = app(durable()).start().await;
    let (status, text) = post(
        &srv.url("/v1/runs/wait?timeout_s=30"),
        &json!({"agent": "durable", "entrypoint": "work", "input": {"i": 5}}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v = json(&text);
    assert_eq!(
        (v["status"].as_str(), &v["output"]),
        (Some("succeeded"), &json!({"i": 5}))
    );
    let (status, text) = post(
        &srv.url("/v1/runs/stream"),
        &json!({"agent": "durable", "entrypoint": "chatty", "input": {"n": 3, "ms": 1}})
            .to_string(),
    )
    .await;
    assert_eq!(status, 200);
    let evs = sse(&text);
    assert_eq!(evs.first().map(|e| e.1.as_str()), Some("run.queued"));
    assert_eq!(evs.last().map(|e| e.1.as_str()), Some("run.succeeded"));
    // A wait that times out answers with the run as it stands.
    let run = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": 1, "ms": 3000}}),
    )
    .await;
    let t = Instant::now();
    let (status, text) = get(&srv.url(&format!(
        "/v1/runs/{}/wait?timeout_s=0.3",
        run["id"].as_str().expect("id")
    )))
    .await;
    assert_eq!(status, 200);
    assert!(["queued", "running"].contains(&json(&text)["status"].as_str().unwrap_or("")));
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_runs_are_deleted_after_the_retention_age() {
    // 0.0003 h ≈ 1 s.
    let srv = app(durable())
        .args(["--run-retention-h", "0.0003"])
        .start()
        .await;
    let done = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}}),
    )
    .await;
    let queued = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "work", "input": {"i": 2}, "delay_s": 600}),
    )
    .await;
    let done_id = done["id"].as_str().expect("id");
    wait(&srv, done_id).await;
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _) = get(&srv.url(&format!("/v1/runs/{done_id}"))).await;
        if status == 404 {
            break;
        }
        assert!(Instant::now() < end, "the finished run was never deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = get(&srv.url(&format!("/v1/runs/{}/events", done_id))).await;
    assert_eq!(status, 404);
    let (status, _) =
        get(&srv.url(&format!("/v1/runs/{}", queued["id"].as_str().expect("id")))).await;
    assert_eq!(status, 200, "unfinished runs are kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_locked_database_answers_503_and_loses_nothing() {
    let state = tempfile::tempdir().expect("state");
    let srv = app(durable())
        .state_dir(state.path())
        .args(["--runs-db-busy-timeout-s", "0.3"])
        .start()
        .await;
    let ok = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}}),
    )
    .await;
    wait(&srv, ok["id"].as_str().expect("id")).await;
    // Another process takes the database's write lock and holds it.
    let db = state.path().join("agentry.db");
    let mut locker = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(3)",
        ])
        .arg(&db)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(locker.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read");
    assert_eq!(line.trim(), "locked");
    let (status, text) = post(
        &srv.url("/v1/runs"),
        &json!({"agent": "durable", "entrypoint": "work", "input": {"i": 2}}).to_string(),
    )
    .await;
    assert_eq!(status, 503, "{text}");
    let err = json(&text);
    assert_eq!(err["error"]["code"], "unavailable");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("locked"),
        "{text}"
    );
    let _ = locker.wait();
    // The lock is gone: the server works again, and the refused run was never stored.
    assert_recovered_and_nothing_stored(&srv).await;
}

/// The acceptance test of durability: SIGKILL the server part-way through 200 runs of a 50 ms
/// agent and a checkpointing run, restart it on the same state, and account for every run.
#[tokio::test(flavor = "multi_thread")]
async fn runs_survive_a_sigkill_of_the_server() {
    let state = tempfile::tempdir().expect("state");
    let log = state.path().join("executions.txt");
    let start = |s: &std::path::Path| {
        server(durable())
            .state_dir(s)
            .env("DURABLE_LOG", log.to_str().expect("path"))
            .start()
    };
    let mut srv = start(state.path());
    // The checkpointing run first, so that it is running when the kill comes.
    let cp = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "checkpointer", "input": {"steps": 40, "ms": 50}}),
    )
    .await;
    let cp_id = cp["id"].as_str().expect("id").to_string();
    let mut ids = Vec::new();
    for i in 0..200 {
        let r = create(
            &srv,
            json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": i, "ms": 50}}),
        )
        .await;
        ids.push(r["id"].as_str().expect("id").to_string());
    }
    // Let some finish and the checkpointer save a checkpoint, then kill the server outright
    // (its workers die with it).
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let done = json(&get(&srv.url("/v1/runs?status=succeeded&limit=500")).await.1);
        let n = done["runs"].as_array().map_or(0, Vec::len);
        let saved = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("checkpoint ");
        if n >= 20 && saved {
            break;
        }
        assert!(Instant::now() < until, "no progress: {n} done");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = json(&get(&srv.url("/v1/runs?status=succeeded&limit=500")).await.1);
    let succeeded_before: Vec<String> = before["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| r["id"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        !succeeded_before.is_empty() && succeeded_before.len() < 150,
        "kill should land part-way: {} done",
        succeeded_before.len()
    );
    let cp_now = json(&get(&srv.url(&format!("/v1/runs/{cp_id}"))).await.1);
    assert_eq!(cp_now["status"], "running");
    srv.stop(nix::sys::signal::Signal::SIGKILL);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let restarted = Instant::now();
    let srv = start(state.path());
    for id in ids.iter().chain(std::iter::once(&cp_id)) {
        let done = wait(&srv, id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        let evs = events(&srv, id).await;
        let terminal = evs
            .iter()
            .filter(|e| TERMINAL.contains(&e.1.as_str()))
            .count();
        assert_eq!(terminal, 1, "exactly one terminal event: {evs:?}");
        let seqs: Vec<i64> = evs.iter().map(|e| e.0).collect();
        assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
    }
    // Requeued at start-up, not after the 30 s lease expired.
    assert!(
        restarted.elapsed() < Duration::from_secs(25),
        "took {:?}",
        restarted.elapsed()
    );
    // Runs that had succeeded before the kill never ran again; the others ran to completion.
    let text = std::fs::read_to_string(&log).expect("log");
    let mut starts: HashMap<&str, usize> = HashMap::new();
    let mut dones: HashMap<&str, usize> = HashMap::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        match f[0] {
            "start" => *starts.entry(f[1]).or_default() += 1,
            "done" => *dones.entry(f[1]).or_default() += 1,
            _ => {}
        }
    }
    for id in &succeeded_before {
        assert_eq!(
            starts.get(id.as_str()),
            Some(&1),
            "{id} succeeded before the kill and must not run again"
        );
    }
    for id in &ids {
        assert!(
            dones.get(id.as_str()).copied().unwrap_or(0) >= 1,
            "{id} never completed"
        );
    }
    let requeued = ids
        .iter()
        .filter(|id| starts.get(id.as_str()).copied().unwrap_or(0) > 1)
        .count();
    let all = json(&get(&srv.url("/v1/runs?limit=500")).await.1);
    let max_attempt = all["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| r["attempt"].as_u64().unwrap_or(0))
        .max();
    assert!(
        requeued == 0 || max_attempt >= Some(2),
        "extra attempts show in `attempt`"
    );
    // The checkpointing run resumed from its last checkpoint, not from zero.
    let cp_done = wait(&srv, &cp_id).await;
    let resumed_from = cp_done["output"]["resumed_from"]
        .as_u64()
        .expect("resumed_from");
    assert!(resumed_from > 0, "{cp_done}");
    assert_eq!(cp_done["attempt"], 2);
    let evs = events(&srv, &cp_id).await;
    let steps: Vec<u64> = evs
        .iter()
        .filter(|e| e.1 == "step")
        .map(|e| e.2["data"]["step"].as_u64().unwrap_or(0))
        .collect();
    assert!(steps.contains(&39) && steps.contains(&0));
    assert!(kinds(&evs).contains(&"run.checkpoint"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_restart_requeues_unfinished_runs_without_using_an_attempt() {
    let state = tempfile::tempdir().expect("state");
    let mut srv = server(durable())
        .state_dir(state.path())
        .args(["--shutdown-grace-s", "0.3"])
        .start();
    let run = create(&srv, json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": 1, "ms": 4000}, "max_attempts": 1})).await;
    let id = run["id"].as_str().expect("id").to_string();
    wait_status(&srv, &id, "running").await;
    assert_eq!(srv.stop(nix::sys::signal::Signal::SIGTERM), Some(0));
    // Handed back as it stopped: queued again, for this node's next life or any other node.
    assert!(
        srv.log_text()
            .contains("handed unfinished runs back to the queue"),
        "{}",
        srv.log_text()
    );
    let srv = server(durable()).state_dir(state.path()).start();
    let done = wait(&srv, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["attempt"], 2,
        "max_attempts 1: the handed-back attempt was not counted"
    );
}

/// A small tmpfs, unmounted on drop. Needs root (CI runs as root); fails loudly otherwise.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new(size: &str) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "this test mounts a tmpfs to fill a disk and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_answers_503_and_loses_nothing() {
    let disk = Tmpfs::new("1m");
    let db = disk.0.path().join("agentry.db");
    let srv = app(durable())
        .args(["--runs-db", db.to_str().expect("path")])
        .start()
        .await;
    let ok = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}}),
    )
    .await;
    wait(&srv, ok["id"].as_str().expect("id")).await;
    // Fill the disk to the last byte.
    let filler = disk.0.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
    }
    let body = json!({"agent": "durable", "entrypoint": "work", "input": {"i": 2}}).to_string();
    let (status, text) = post(&srv.url("/v1/runs"), &body).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("disk is full"), "{text}");
    // Room again: the server carries on; the refused run was never stored.
    std::fs::remove_file(&filler).expect("rm");
    assert_recovered_and_nothing_stored(&srv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_are_renewed_with_spaced_heartbeats_and_delays_are_honoured() {
    // A run three times longer than its lease: renewals keep it, nobody requeues it.
    let srv = app(durable())
        .args(["--lease-ttl-s", "0.6", "--heartbeat-event-s", "0.4"])
        .start()
        .await;
    let run = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": 1, "ms": 2000}}),
    )
    .await;
    let id = run["id"].as_str().expect("id");
    let done = wait(&srv, id).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["attempt"], 1, "the lease was renewed, not lost");
    let evs = events(&srv, id).await;
    assert!(!kinds(&evs).contains(&"run.retrying"), "{evs:?}");
    let beats: Vec<chrono::DateTime<chrono::FixedOffset>> = evs
        .iter()
        .filter(|e| e.1 == "run.heartbeat")
        .map(|e| chrono::DateTime::parse_from_rfc3339(e.2["at"].as_str().expect("at")).expect("t"))
        .collect();
    assert!(
        beats.len() >= 2 && beats.len() <= 6,
        "{} heartbeats",
        beats.len()
    );
    for w in beats.windows(2) {
        assert!(
            w[1] - w[0] >= chrono::Duration::milliseconds(300),
            "{beats:?}"
        );
    }
    // A delayed run waits for its time.
    let run = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}, "delay_s": 0.7}),
    )
    .await;
    let done = wait(&srv, run["id"].as_str().expect("id")).await;
    let at = |k: &str| chrono::DateTime::parse_from_rfc3339(done[k].as_str().expect(k)).expect("t");
    assert!(
        at("started_at") - at("created_at") >= chrono::Duration::milliseconds(690),
        "{done}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_per_agent_and_global_caps_limit_runs_at_once() {
    let dir = tempfile::tempdir().expect("dir");
    for (flag, name) in [
        ("--max-running-runs-per-agent", "agent"),
        ("--max-running-runs", "global"),
    ] {
        let log = dir.path().join(format!("{name}.txt"));
        let srv = server(durable())
            .args([flag, "1"])
            .env("DURABLE_LOG", log.to_str().expect("path"))
            .start();
        let mut ids = Vec::new();
        for i in 0..4 {
            let r = create(
                &srv,
                json!({"agent": "durable", "entrypoint": "ordered", "input": {"key": name, "i": i}}),
            )
            .await;
            ids.push(r["id"].as_str().expect("id").to_string());
        }
        for id in &ids {
            assert_eq!(wait(&srv, id).await["status"], "succeeded");
        }
        let text = std::fs::read_to_string(&log).expect("log");
        let seq: Vec<&str> = text
            .lines()
            .map(|l| l.split(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(
            seq,
            ["begin", "end"].repeat(4),
            "{flag} 1: one at a time\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_server_on_the_same_state_dir_or_database_is_refused_and_touches_no_run() {
    let state = tempfile::tempdir().expect("state");
    let first = server(durable()).state_dir(state.path()).start();
    let run = create(
        &first,
        json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": 1, "ms": 2000}}),
    )
    .await;
    let id = run["id"].as_str().expect("id").to_string();
    wait_status(&first, &id, "running").await;
    // The same state directory, and another one over the same database: both refused, naming
    // the first server, before either could requeue its running run.
    let db = state.path().join("agentry.db");
    let other = tempfile::tempdir().expect("other state");
    for second in [
        server(durable()).state_dir(state.path()),
        server(durable())
            .state_dir(other.path())
            .args(["--runs-db", db.to_str().expect("path")]),
    ] {
        let log = second
            .try_start()
            .err()
            .expect("a second server is refused");
        assert!(log.contains("already serves from"), "{log}");
        assert!(log.contains(&format!("pid {}", first.pid())), "{log}");
    }
    let done = wait(&first, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1, "the run was never requeued: {done}");
    let evs = events(&first, &id).await;
    assert!(!kinds(&evs).contains(&"run.retrying"), "{:?}", kinds(&evs));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_paused_past_its_lease_ends_the_run_once_and_never_cancelled() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let srv = server(durable()).args(["--lease-ttl-s", "1"]).start();
    let run = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": 1, "ms": 3000}}),
    )
    .await;
    let id = run["id"].as_str().expect("id").to_string();
    wait_status(&srv, &id, "running").await;
    // Paused for three lease lifetimes while its run goes on; then it resumes, finds its lease
    // expired (its own reaper requeues the run) and claims the next attempt itself.
    let pid = Pid::from_raw(i32::try_from(srv.pid()).expect("pid"));
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    let done = wait(&srv, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["cancel_requested"], false, "{done}");
    let attempt = done["attempt"].as_u64().expect("attempt");
    assert!(attempt <= 2, "at most one extra attempt: {done}");
    let evs = events(&srv, &id).await;
    let ends: Vec<&str> = kinds(&evs)
        .into_iter()
        .filter(|k| TERMINAL.contains(k))
        .collect();
    assert_eq!(ends, ["run.succeeded"], "{:?}", kinds(&evs));
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_queued_behind_the_only_worker_do_not_time_out_before_their_code_starts() {
    let srv = app(durable()).args(["--workers", "1"]).start().await;
    // Five runs of 0.6 s each on one worker: the last waits 2.4 s, longer than any run's
    // 1.5 s timeout. Each one's deadline starts when its code does.
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = create(
            &srv,
            json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": i, "ms": 600}, "timeout_s": 1.5}),
        )
        .await;
        ids.push(r["id"].as_str().expect("id").to_string());
    }
    let mut starts = Vec::new();
    for id in &ids {
        let done = wait(&srv, id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["attempt"], 1, "{done}");
        let evs = events(&srv, id).await;
        assert_eq!(
            kinds(&evs),
            ["run.queued", "run.started", "run.succeeded"],
            "{id}"
        );
        starts.push(done["started_at"].as_str().expect("started_at").to_string());
    }
    // They ran one after another: `started_at` is when each one's code started, so the last
    // started well past the 1.5 s the first one's timeout allowed from the same moment.
    let at = |t: &String| {
        chrono::DateTime::parse_from_rfc3339(t)
            .expect("rfc3339")
            .timestamp_millis()
    };
    let first = starts.iter().map(at).min().expect("starts");
    let last = starts.iter().map(at).max().expect("starts");
    assert!(last - first >= 2000, "{starts:?}");
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb / 1024.0
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_agent_fails_with_a_clear_error_and_the_server_stays_small() {
    // 200 MB of events at 64 KiB each, against a cap of 16 MiB of events per attempt.
    let srv = server(durable())
        .args(["--max-event-bytes-per-attempt", "16777216"])
        .start();
    let run = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "flood", "input": {"mb": 200}, "max_attempts": 3}),
    )
    .await;
    let id = run["id"].as_str().expect("id").to_string();
    let mut peak: f64 = 0.0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        peak = peak.max(rss_mib(srv.pid()));
        let v = json(&get(&srv.url(&format!("/v1/runs/{id}"))).await.1);
        if v["status"] != "queued" && v["status"] != "running" {
            break v;
        }
        assert!(Instant::now() < deadline, "the flood never ended: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["attempt"], 1, "not retried: {done}");
    assert_eq!(done["error"]["code"], "payload_too_large", "{done}");
    assert!(
        done["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("runs.max_event_bytes_per_attempt")),
        "{done}"
    );
    // The server holds no more than the cap and its working set (about 30 MiB idle).
    assert!(peak < 150.0, "server RSS peaked at {peak:.0} MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_that_leaves_frees_what_it_held_at_once() {
    let srv = app(durable()).start().await;
    let run = create(
        &srv,
        json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": 1, "ms": 30000}}),
    )
    .await;
    let id = run["id"].as_str().expect("id").to_string();
    wait_status(&srv, &id, "running").await;
    let hub = srv.state.engine.hub();
    let until_followers = |n: usize| async move {
        let deadline = Instant::now() + Duration::from_secs(2);
        while hub.followed() != n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        hub.followed()
    };
    // SSE: read the log so far, then leave while the run is silent.
    let resp = client()
        .get(srv.url(&format!("/v1/runs/{id}/events")))
        .send()
        .await
        .expect("sse");
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("an event").expect("bytes");
    assert!(String::from_utf8_lossy(&first).contains("run.queued"));
    assert_eq!(until_followers(1).await, 1);
    drop(body);
    assert_eq!(
        until_followers(0).await,
        0,
        "the SSE follower outlived its client"
    );
    // The event WebSocket, the same.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(srv.ws_url(&format!("/v1/runs/{id}/events/ws")))
            .await
            .expect("ws");
    assert!(ws.next().await.is_some());
    assert_eq!(until_followers(1).await, 1);
    drop(ws);
    assert_eq!(
        until_followers(0).await,
        0,
        "the WebSocket follower outlived its client"
    );
    let (status, _) = post(&srv.url(&format!("/v1/runs/{id}/cancel")), "{}").await;
    assert_eq!(status, 202);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_leases_only_what_its_workers_can_start_soon() {
    let srv = app(durable()).args(["--workers", "1"]).start().await;
    // Eight long sync runs for one worker: two leased (the one running and the next), the
    // rest left queued for whichever node has room.
    let mut ids = Vec::new();
    for i in 0..8 {
        let r = create(
            &srv,
            json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": i, "ms": 1500}}),
        )
        .await;
        ids.push(r["id"].as_str().expect("id").to_string());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let listed = json(&get(&srv.url("/v1/runs?status=running&limit=100")).await.1);
    let running = listed["runs"].as_array().map_or(0, Vec::len);
    assert!(
        (1..=2).contains(&running),
        "{running} runs leased for one worker: {listed}"
    );
    for id in &ids {
        let (status, _) = post(&srv.url(&format!("/v1/runs/{id}/cancel")), "").await;
        assert!(status == 200 || status == 202, "{status}");
    }
}

/// Every frame kind of a run is flow-controlled, not only its chunks: an agent that floods
/// events and log lines stops once its window (`workers.stream_window`, 64) is used up, until
/// the server takes what it sent; then it goes on, and nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_flooding_events_and_logs_waits_for_the_server_to_take_them() {
    use agentry_core::executor::RunItem;
    use futures_util::FutureExt;
    let app = app(durable()).start().await;
    let agent = app.state.agents.get("durable").expect("agent");
    let n = 5000;
    let mut call = agent
        .executor
        .run(
            "chatter",
            &json!({ "n": n }).to_string(),
            r#"{"id":"flow-1","attempt":1,"state":null}"#,
            Duration::from_secs(60),
        )
        .await
        .expect("run");
    // Unread for a while: without flow control the agent would send all 10,000 frames.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut waiting = 0;
    // `unconstrained`: tokio's cooperative budget would stop the count at 128 otherwise.
    while let Some(Some(item)) =
        tokio::task::unconstrained(std::future::poll_fn(|cx| call.poll_next(cx))).now_or_never()
    {
        assert!(
            matches!(item, RunItem::Event { .. } | RunItem::Log { .. }),
            "the agent is not done yet"
        );
        waiting += 1;
    }
    assert!(
        (1..=3 * 64).contains(&waiting),
        "{waiting} frames were waiting: the window is 64"
    );
    // Read on: every frame arrives, then the result.
    let (mut events, mut logs) = (0, 0);
    loop {
        match std::future::poll_fn(|cx| call.poll_next(cx))
            .await
            .expect("an item")
        {
            RunItem::Event { .. } => events += 1,
            RunItem::Log { .. } => logs += 1,
            RunItem::Result(p) => {
                assert_eq!(json(p.as_str()), json!({ "n": n }));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(events + logs + waiting, 2 * n);
}

/// A cancelled run that goes on flooding gets no more room: once its window is used up, its
/// next event raises the cancellation in the agent, instead of the window turning off.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_run_that_keeps_emitting_is_stopped_at_its_window() {
    use agentry_core::executor::{CallError, RunItem};
    let app = app(durable()).start().await;
    let agent = app.state.agents.get("durable").expect("agent");
    let mut call = agent
        .executor
        .run(
            "chatter",
            &json!({ "n": 50_000 }).to_string(),
            r#"{"id":"flow-2","attempt":1,"state":null}"#,
            Duration::from_secs(60),
        )
        .await
        .expect("run");
    // Blocked at its window, then cancelled: the agent never looks at ctx.cancelled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    call.cancel();
    let mut frames = 0;
    let end = loop {
        match std::future::poll_fn(|cx| call.poll_next(cx))
            .await
            .expect("an item")
        {
            RunItem::Event { .. } | RunItem::Log { .. } => frames += 1,
            other => break other,
        }
    };
    assert!(
        matches!(end, RunItem::Failed(CallError::Cancelled)),
        "{end:?}"
    );
    assert!(
        frames <= 3 * 64,
        "{frames} frames after the window was used up"
    );
}

/// `[agents.durable.entrypoints.work] priority = 7`: runs that give none get it; a run that
/// gives one keeps its own.
#[tokio::test]
async fn an_entrypoint_priority_is_the_default_of_its_runs() {
    let app = crate::common::app::TestApp::start(vec![fixture("durable")], |c| {
        let work = agentry_core::settings::EntrypointSettings {
            priority: Some(7),
            ..Default::default()
        };
        c.agents.insert(
            "durable".into(),
            agentry_core::settings::AgentSettings {
                entrypoints: [("work".to_string(), work)].into(),
                ..Default::default()
            },
        );
    })
    .await;
    for (body, expected) in [
        (
            json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}}),
            7,
        ),
        (
            json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}, "priority": -2}),
            -2,
        ),
        (
            json!({"agent": "durable", "entrypoint": "sleepy", "input": {"i": 1}}),
            0,
        ),
    ] {
        let (status, text) = post(&app.url("/v1/runs"), &body.to_string()).await;
        assert_eq!(status, 202, "{text}");
        assert_eq!(json(&text)["priority"], expected, "{body}");
    }
    app.stop().await;
}

/// `max_concurrency` on an entrypoint: its runs never overlap (cap 1) although workers are
/// free, on one SQLite node and across two nodes on PostgreSQL; runs of other entrypoints are
/// not held back.
#[tokio::test]
async fn an_entrypoint_cap_keeps_its_runs_from_overlapping_on_one_node_and_across_nodes() {
    use agentry_core::settings::{AgentSettings, EntrypointSettings};
    let capped = |c: &mut agentry_server::Config| {
        c.agents.insert(
            "durable".into(),
            AgentSettings {
                entrypoints: [(
                    "sleepy".to_string(),
                    EntrypointSettings {
                        max_concurrency: Some(1),
                        ..Default::default()
                    },
                )]
                .into(),
                ..Default::default()
            },
        );
    };
    async fn check(nodes: &[&crate::common::app::TestApp]) {
        let mut ids = Vec::new();
        for i in 0..4 {
            let body = serde_json::json!({"agent": "durable", "entrypoint": "sleepy",
                                          "input": {"i": i, "ms": 300}});
            let (status, text) =
                post(&nodes[i % nodes.len()].url("/v1/runs"), &body.to_string()).await;
            assert_eq!(status, 202, "{text}");
            ids.push(json(&text)["id"].as_str().expect("id").to_string());
        }
        // Another entrypoint's run goes by while `sleepy` is at its cap.
        let body = serde_json::json!({"agent": "durable", "entrypoint": "work", "input": {"i": 9}});
        let (status, text) = post(
            &nodes[0].url("/v1/runs/wait?timeout_s=5"),
            &body.to_string(),
        )
        .await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(json(&text)["status"], "succeeded", "{text}");
        let mut spans = Vec::new();
        for id in &ids {
            let (status, text) =
                get(&nodes[0].url(&format!("/v1/runs/{id}/wait?timeout_s=60"))).await;
            assert_eq!(status, 200, "{text}");
            let run = json(&text);
            assert_eq!(run["status"], "succeeded", "{run}");
            let at = |k: &str| {
                chrono::DateTime::parse_from_rfc3339(run[k].as_str().expect(k))
                    .expect("a time")
                    .timestamp_millis()
            };
            spans.push((at("started_at"), at("finished_at")));
        }
        spans.sort_unstable();
        for pair in spans.windows(2) {
            assert!(
                pair[0].1 <= pair[1].0,
                "runs of a capped entrypoint overlapped: {spans:?}"
            );
        }
    }
    let one = crate::common::app::TestApp::start(vec![fixture("durable")], capped).await;
    check(&[&one]).await;
    one.stop().await;

    let schema = crate::common::pg::schema();
    let on_pg = |c: &mut agentry_server::Config| {
        capped(c);
        c.store.database_url = Some(crate::common::pg::pg_url());
        c.store.database_schema = Some(schema.to_string());
    };
    let a = crate::common::app::TestApp::start(vec![fixture("durable")], on_pg).await;
    let b = crate::common::app::TestApp::start(vec![fixture("durable")], on_pg).await;
    check(&[&a, &b]).await;
    a.stop().await;
    b.stop().await;
}
