//! Event triggers end to end (`docs/triggers.md`): the `chain` fixture's entrypoints, chained
//! by its `agentry.agent.toml`, on real workers and real stores (SQLite, and PostgreSQL with
//! two nodes). What ran is read back from the event bus and the runs API.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::app::TestApp;
use crate::common::*;
use crate::event_bus::{BusEvent, read_bus};

/// Starts a run of `start` with this value and correlation id; its id.
async fn start_chain(node: &impl Served, value: i64, correlation: &str) -> String {
    let body = json!({"agent": "chain", "entrypoint": "start", "input": {"value": value},
                      "correlation_id": correlation});
    let (status, text) = post(&node.url("/v1/runs"), &body.to_string()).await;
    assert_eq!(status, 202, "{text}");
    json(&text)["id"].as_str().expect("id").to_string()
}

/// The terminal events on the bus, by entrypoint.
fn ended(events: &[BusEvent]) -> HashMap<String, Vec<Value>> {
    let mut out: HashMap<String, Vec<Value>> = HashMap::new();
    for e in events.iter().filter(|e| e.kind == "run.succeeded") {
        out.entry(e.data["entrypoint"].as_str().unwrap_or_default().into())
            .or_default()
            .push(e.data.clone());
    }
    out
}

/// The runs of one entrypoint of the chain fixture, whatever their state.
async fn runs_of(node: &impl Served, tag: &str) -> Vec<Value> {
    let (status, text) =
        get(&node.url(&format!("/v1/runs?agent=chain&entrypoint={tag}&limit=500"))).await;
    assert_eq!(status, 200, "{text}");
    json(&text)["runs"].as_array().expect("runs").clone()
}

/// Waits until `tag` has `n` runs, all ended, or fails after `within`.
async fn wait_for_runs(node: &impl Served, tag: &str, n: usize, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let runs = runs_of(node, tag).await;
        if runs.len() >= n && runs.iter().all(|r| r["status"] == "succeeded") {
            return runs;
        }
        assert!(
            Instant::now() < deadline,
            "{tag}: wanted {n} ended runs, have {runs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Long enough for the trigger loop (`--trigger-poll-ms 50`) to have read everything so far
/// several times over: what has not fired by then will not.
const SETTLE: Duration = Duration::from_millis(1500);

fn fast_triggers(c: &mut agentry_server::Config) {
    c.triggers.poll_ms = 50;
}

#[tokio::test]
async fn an_event_trigger_chains_a_b_c_with_one_correlation_id() {
    let app = TestApp::start(vec![fixture("chain")], fast_triggers).await;
    let a = start_chain(&app, 7, "order-42").await;
    let events = read_bus(
        &app,
        "/v1/events?correlation_id=order-42",
        None,
        Duration::from_secs(30),
        |e| ended(e).contains_key("step_c"),
    )
    .await;
    let by_tag = ended(&events);
    // Only the chain's events, every one of them carrying its correlation id.
    assert!(
        events
            .iter()
            .all(|e| e.data["correlation_id"] == "order-42"),
        "{events:?}"
    );
    let [start, b, c] = ["start", "step_b", "step_c"].map(|t| {
        let runs = by_tag
            .get(t)
            .unwrap_or_else(|| panic!("no {t} in {events:?}"));
        assert_eq!(runs.len(), 1, "{t}: {runs:?}");
        runs[0].clone()
    });
    assert_eq!(start["run_id"], a.as_str());
    assert_eq!([&start["depth"], &b["depth"], &c["depth"]], [0, 1, 2]);
    // Each run got the event that triggered it, and passed its result on.
    assert_eq!(b["data"]["result"]["from"], a.as_str());
    assert_eq!(c["data"]["result"]["from"], b["run_id"]);
    assert_eq!(c["data"]["result"]["path"], json!(["a", "b", "c"]));
    // The run's own view shows its place in the chain.
    let (status, text) =
        get(&app.url(&format!("/v1/runs/{}", c["run_id"].as_str().expect("id")))).await;
    assert_eq!(status, 200, "{text}");
    let view = json(&text);
    assert_eq!(
        (
            &view["correlation_id"],
            &view["depth"],
            &view["parent_run_id"]
        ),
        (&json!("order-42"), &json!(2), &b["run_id"]),
        "{view}"
    );
    let (_, text) = get(&app.url(&format!("/v1/runs/{a}"))).await;
    let view = json(&text);
    assert_eq!(
        (
            &view["correlation_id"],
            &view["depth"],
            &view["parent_run_id"]
        ),
        (&json!("order-42"), &json!(0), &Value::Null),
        "{view}"
    );

    // A chain whose value fails step_c's filter stops after step_b.
    start_chain(&app, 8, "order-43").await;
    wait_for_runs(&app, "step_b", 2, Duration::from_secs(30)).await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(runs_of(&app, "step_c").await.len(), 1);
    // A run created without a correlation id starts a chain named after itself.
    let body = json!({"agent": "chain", "entrypoint": "start", "input": {"value": 1}});
    let (status, text) = post(&app.url("/v1/runs"), &body.to_string()).await;
    assert_eq!(status, 202, "{text}");
    let lone = json(&text)["id"].as_str().expect("id").to_string();
    let events = read_bus(
        &app,
        &format!("/v1/events?correlation_id={lone}&kind=run.succeeded"),
        None,
        Duration::from_secs(30),
        |e| ended(e).contains_key("step_b"),
    )
    .await;
    assert_eq!(ended(&events)["step_b"][0]["depth"], 1, "{events:?}");
    // Two named triggers of one entrypoint fire independently: `audit` ran after each of the
    // three `start`s and after the one `step_c`, with the event in each trigger's argument.
    wait_for_runs(&app, "audit", 4, Duration::from_secs(30)).await;
    tokio::time::sleep(SETTLE).await;
    let audits = runs_of(&app, "audit").await;
    let mut seen: Vec<String> = audits
        .iter()
        .map(|r| format!("{}/{}", r["output"]["after"], r["output"]["via"]))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            r#""start"/"event""#,
            r#""start"/"event""#,
            r#""start"/"event""#,
            r#""step_c"/"source""#
        ],
        "{audits:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_trigger_never_fires_on_its_own_runs_and_a_cycle_stops_at_max_depth() {
    let app = TestApp::start(vec![fixture("chain")], |c| {
        fast_triggers(c);
        c.triggers.max_depth = 3;
    })
    .await;
    for tag in ["again", "ping"] {
        let body = json!({"agent": "chain", "entrypoint": tag});
        let (status, text) = post(&app.url("/v1/runs"), &body.to_string()).await;
        assert_eq!(status, 202, "{text}");
    }
    // ping (depth 0) → pong (1) → ping (2) → pong (3), which is as deep as chains go.
    wait_for_runs(&app, "pong", 2, Duration::from_secs(30)).await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(
        runs_of(&app, "again").await.len(),
        1,
        "`again` triggered itself"
    );
    assert_eq!(runs_of(&app, "ping").await.len(), 2);
    assert_eq!(runs_of(&app, "pong").await.len(), 2);
    app.stop().await;
}

/// Two nodes on one PostgreSQL both serve the chain: each triggered run exists once, whichever
/// node read the event first.
#[tokio::test]
async fn triggers_fire_once_across_nodes_on_postgres() {
    let schema = crate::common::pg::schema();
    let on_pg = |c: &mut agentry_server::Config| {
        c.store.database_url = Some(crate::common::pg::pg_url());
        c.store.database_schema = Some(schema.to_string());
        fast_triggers(c);
    };
    let one = TestApp::start(vec![fixture("chain")], on_pg).await;
    let two = TestApp::start(vec![fixture("chain")], on_pg).await;
    const CHAINS: usize = 6;
    for i in 0..CHAINS {
        let node: &TestApp = if i % 2 == 0 { &one } else { &two };
        start_chain(node, 7, &format!("pg-{i}")).await;
    }
    let c_runs = wait_for_runs(&one, "step_c", CHAINS, Duration::from_secs(60)).await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(runs_of(&two, "step_b").await.len(), CHAINS);
    assert_eq!(runs_of(&two, "step_c").await.len(), CHAINS, "{c_runs:?}");
    // The named triggers too: one `audit` per `start` and one per `step_c`.
    wait_for_runs(&one, "audit", 2 * CHAINS, Duration::from_secs(60)).await;
    tokio::time::sleep(SETTLE).await;
    assert_eq!(runs_of(&two, "audit").await.len(), 2 * CHAINS);
    for i in 0..CHAINS {
        let events = read_bus(
            &two,
            &format!("/v1/events?correlation_id=pg-{i}&kind=run.succeeded"),
            None,
            Duration::from_secs(10),
            |e| e.len() >= 5,
        )
        .await;
        let mut tags: Vec<&str> = events
            .iter()
            .filter_map(|e| e.data["entrypoint"].as_str())
            .collect();
        tags.sort_unstable();
        assert_eq!(
            tags,
            ["audit", "audit", "start", "step_b", "step_c"],
            "chain pg-{i}"
        );
    }
    one.stop().await;
    two.stop().await;
}

/// A trigger's cursor outlives its node: an event that came while the node was not reading
/// (its poll set far out, then stopped) is read after a restart, and fires once; a second
/// restart fires nothing again.
#[tokio::test]
async fn an_event_seen_by_no_node_before_a_restart_fires_once_after_it() {
    let state = tempfile::tempdir().expect("state");
    let dir = state.path().to_path_buf();
    let asleep = TestApp::start(vec![fixture("chain")], |c| {
        c.state_dir = dir.clone();
        c.triggers.poll_ms = 60_000;
    })
    .await;
    let body = json!({"agent": "chain", "entrypoint": "start", "input": {"value": 8}});
    let (status, text) = post(&asleep.url("/v1/runs/wait?timeout_s=30"), &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        runs_of(&asleep, "step_b").await.is_empty(),
        "the trigger read early"
    );
    asleep.stop().await;
    for _ in 0..2 {
        let dir = state.path().to_path_buf();
        let awake = TestApp::start(vec![fixture("chain")], move |c| {
            c.state_dir = dir;
            fast_triggers(c);
        })
        .await;
        wait_for_runs(&awake, "step_b", 1, Duration::from_secs(30)).await;
        tokio::time::sleep(SETTLE).await;
        assert_eq!(runs_of(&awake, "step_b").await.len(), 1);
        awake.stop().await;
    }
}

/// One agent configured under both its name and its id cannot declare one trigger twice (the
/// two would share their runs' idempotency keys): the start says so.
#[tokio::test]
async fn a_trigger_declared_twice_under_the_agents_name_and_id_stops_the_start() {
    use agentry_core::settings::{AgentSettings, EntrypointSettings};
    let said = TestApp::start_error(vec![fixture("chain")], |config| {
        for key in ["chain", "66666666-7777-8888-9999-000000000000"] {
            let mut a = AgentSettings::default();
            a.entrypoints.insert(
                "audit".into(),
                EntrypointSettings {
                    events: vec![agentry_core::triggers::EventTriggerSettings {
                        name: Some("twice".into()),
                        entrypoint: Some("start".into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            );
            config.agents.insert(key.into(), a);
        }
    })
    .await;
    assert!(said.contains("same name"), "{said}");
}
