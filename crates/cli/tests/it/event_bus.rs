//! The event bus (`GET /v1/events`) end to end: real servers and workers, SQLite files and the
//! real PostgreSQL server; a real SSE client reading frames as they come.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::app::TestApp;
use crate::common::*;

/// One SSE frame of the bus: its id, type and data.
#[derive(Debug, Clone)]
pub(crate) struct BusEvent {
    pub id: String,
    pub kind: String,
    pub data: Value,
}

/// Reads the bus from `path` (with `Last-Event-ID: resume` if given) until `until` says
/// enough, or `within` passes.
pub(crate) async fn read_bus(
    node: &impl Served,
    path: &str,
    resume: Option<&str>,
    within: Duration,
    until: impl Fn(&[BusEvent]) -> bool,
) -> Vec<BusEvent> {
    let mut req = client().get(node.url(path));
    if let Some(id) = resume {
        req = req.header("last-event-id", id);
    }
    let mut resp = req.send().await.expect("the bus");
    assert_eq!(resp.status(), 200);
    let deadline = Instant::now() + within;
    let mut buf = String::new();
    let mut out = Vec::new();
    while !until(&out) && Instant::now() < deadline {
        let chunk = match tokio::time::timeout(Duration::from_millis(200), resp.chunk()).await {
            Ok(Ok(Some(c))) => c,
            Ok(_) => break,
            Err(_) => continue,
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let (mut id, mut kind, mut data) = (None, None, None);
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("event:") {
                    kind = Some(v.trim().to_string());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = serde_json::from_str(v.trim()).ok();
                }
            }
            if let (Some(id), Some(kind), Some(data)) = (id, kind, data) {
                out.push(BusEvent { id, kind, data });
            }
        }
    }
    out
}

async fn run_to_end(node: &impl Served, i: i64) -> String {
    let body = json!({"agent": "durable", "entrypoint": "work", "input": {"i": i}});
    let (status, text) = post(&node.url("/v1/runs/wait?timeout_s=30"), &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let run = json(&text);
    assert_eq!(run["status"], "succeeded", "{run}");
    run["id"].as_str().expect("id").to_string()
}

/// Each run's events on the bus: its `seq`s in the order they came.
fn per_run(events: &[BusEvent]) -> HashMap<String, Vec<i64>> {
    let mut out: HashMap<String, Vec<i64>> = HashMap::new();
    for e in events {
        out.entry(e.data["run_id"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(e.data["seq"].as_i64().unwrap_or(-1));
    }
    out
}

fn terminal_count(events: &[BusEvent]) -> usize {
    events.iter().filter(|e| e.kind == "run.succeeded").count()
}

#[tokio::test]
async fn the_bus_resumed_after_a_restart_delivers_every_event_once_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let start = |state: std::path::PathBuf| {
        TestApp::start(vec![fixture("durable")], move |c| c.state_dir = state)
    };
    let app = start(state.clone()).await;
    let mut first_ids = Vec::new();
    for i in 0..4 {
        first_ids.push(run_to_end(&app, i).await);
    }
    let all = read_bus(&app, "/v1/events", None, Duration::from_secs(20), |e| {
        terminal_count(e) >= 4
    })
    .await;
    assert_eq!(terminal_count(&all), 4, "{all:?}");
    // Every run's events, each once, in its own order; ids strictly increasing.
    let runs = per_run(&all);
    for id in &first_ids {
        let seqs = &runs[id];
        assert_eq!(*seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "{id}");
    }
    let cut = all.len() / 2;
    let resume_from = all[cut - 1].id.clone();
    app.stop().await;

    let app = start(state).await;
    let later = run_to_end(&app, 9).await;
    let rest = read_bus(
        &app,
        "/v1/events",
        Some(&resume_from),
        Duration::from_secs(20),
        |e| {
            e.iter()
                .any(|x| x.kind == "run.succeeded" && x.data["run_id"] == later.as_str())
        },
    )
    .await;
    let expected: Vec<&str> = all[cut..].iter().map(|e| e.id.as_str()).collect();
    let got: Vec<&str> = rest
        .iter()
        .take(expected.len())
        .map(|e| e.id.as_str())
        .collect();
    assert_eq!(
        got, expected,
        "the rest of the log, once, in order, after the restart"
    );
    let new_run: Vec<&BusEvent> = rest[expected.len()..].iter().collect();
    assert!(
        new_run.iter().all(|e| e.data["run_id"] == later.as_str()),
        "{new_run:?}"
    );
    let unique: HashSet<&str> = rest.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(unique.len(), rest.len(), "no event twice");

    // Filters: one kind; one entrypoint.
    let done = read_bus(
        &app,
        "/v1/events?kind=run.succeeded",
        None,
        Duration::from_secs(10),
        |e| e.len() >= 5,
    )
    .await;
    assert_eq!(done.len(), 5);
    assert!(
        done.iter()
            .all(|e| e.kind == "run.succeeded" && e.data["entrypoint"] == "work")
    );
    let none = read_bus(
        &app,
        "/v1/events?entrypoint=sleepy",
        None,
        Duration::from_millis(600),
        |_| false,
    )
    .await;
    assert!(none.is_empty(), "{none:?}");
    for bad in [
        "/v1/events?after=x",
        "/v1/events?agent=nope",
        "/v1/events?kind=,",
    ] {
        let (status, _) = get(&app.url(bad)).await;
        assert!(status == 422 || status == 404, "{bad}: {status}");
    }
    app.stop().await;
}

/// Two nodes on one PostgreSQL: the bus of either shows the runs of both, and a reader that
/// moves from one node to the other with `Last-Event-ID` misses nothing and sees nothing twice.
#[tokio::test]
async fn the_bus_is_one_log_across_nodes_on_postgres() {
    let schema = crate::common::pg::schema();
    let on_pg = |c: &mut agentry_server::Config| {
        c.store.database_url = Some(crate::common::pg::pg_url());
        c.store.database_schema = Some(schema.to_string());
    };
    let a = TestApp::start(vec![fixture("durable")], on_pg).await;
    let b = TestApp::start(vec![fixture("durable")], on_pg).await;
    // Runs created on both nodes at once.
    let made = futures_util::future::join_all((0..10).map(|i| {
        let (a, b) = (&a, &b);
        async move {
            if i % 2 == 0 {
                run_to_end(a, i).await
            } else {
                run_to_end(b, i).await
            }
        }
    }))
    .await;
    let first = read_bus(&a, "/v1/events", None, Duration::from_secs(20), |e| {
        terminal_count(e) >= 4
    })
    .await;
    let cut = first
        .iter()
        .rposition(|e| e.kind == "run.succeeded")
        .expect("a terminal event");
    let resume = first[cut].id.clone();
    let rest = read_bus(
        &b,
        "/v1/events",
        Some(&resume),
        Duration::from_secs(20),
        |e| terminal_count(e) + terminal_count(&first[..=cut]) >= 10,
    )
    .await;
    let seen: Vec<BusEvent> = first[..=cut].iter().cloned().chain(rest).collect();
    let ids: Vec<&str> = seen.iter().map(|e| e.id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no event twice");
    let runs = per_run(&seen);
    for id in &made {
        let seqs = runs.get(id).unwrap_or_else(|| panic!("{id} missing"));
        assert_eq!(
            *seqs,
            (1..=seqs.len() as i64).collect::<Vec<_>>(),
            "{id}: every event, in order"
        );
        let (_, text) = get(&a.url(&format!("/v1/runs/{id}/events?after=0"))).await;
        let stored = crate::common::sse::sse(&text).len();
        assert_eq!(seqs.len(), stored, "{id}: as many as its own log");
    }
    b.stop().await;
    a.stop().await;
}

/// The bus over a WebSocket: the same events as text frames, each with its cursor as `id`,
/// and `?after=` resumes after one.
#[tokio::test]
async fn the_bus_streams_over_a_websocket_and_resumes_after_an_id() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let app = TestApp::start(vec![fixture("durable")], |_| {}).await;
    let run = run_to_end(&app, 5).await;
    let read = |path: String| async move {
        let (mut ws, _) = tokio_tungstenite::connect_async(path).await.expect("ws");
        let mut frames: Vec<Value> = Vec::new();
        while !frames.iter().any(|f| f["type"] == "run.succeeded") {
            match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => frames.push(json(&t)),
                Ok(Some(Ok(_))) => {}
                other => panic!("the bus ended: {other:?} after {frames:?}"),
            }
        }
        frames
    };
    let all = read(app.ws_url("/v1/events/ws?agent=durable")).await;
    assert!(all.iter().all(|f| f["run_id"] == run.as_str()), "{all:?}");
    let seqs: Vec<i64> = all.iter().filter_map(|f| f["seq"].as_i64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
    let first = all[0]["id"].as_str().expect("an id").to_string();
    let rest = read(app.ws_url(&format!("/v1/events/ws?agent=durable&after={first}"))).await;
    assert_eq!(rest, all[1..].to_vec());
    app.stop().await;
}
