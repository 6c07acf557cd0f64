//! Schedules end to end: real servers, real Python workers, SQLite files and the real
//! PostgreSQL server. Every-second schedules keep the tests short; the timing rules themselves
//! (DST gaps and overlaps, English times, missed and overlap policies) are unit-tested in
//! `agentry-core`'s `schedules`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::common::app::{TestApp, app};
use crate::common::pg::*;
use crate::common::*;
use serde_json::{Value, json};

/// Creates a schedule through `node`; its id.
async fn create(node: &impl Served, body: Value) -> String {
    let (status, text) = post(&node.url("/v1/schedules"), &body.to_string()).await;
    assert_eq!(status, 201, "{text}");
    json(&text)["id"].as_str().expect("id").to_string()
}

fn every_second(name: &str) -> Value {
    json!({"agent": "durable", "entrypoint": "work", "input": {"i": 7}, "every": "1s", "name": name})
}

/// Every fire of the schedule, oldest first.
async fn fires(node: &impl Served, id: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, text) = get(&node.url(&format!(
            "/v1/schedules/{id}/fires?limit=500&cursor={cursor}"
        )))
        .await;
        assert_eq!(status, 200, "{text}");
        let page = json(&text);
        out.extend(page["fires"].as_array().expect("fires").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    out.reverse();
    out
}

/// The fires that created a run: (slot in ms, run id).
fn created(fires: &[Value]) -> Vec<(i64, String)> {
    fires
        .iter()
        .filter(|f| f["outcome"] == "created" && f["manual"] == false)
        .map(|f| {
            let slot = chrono::DateTime::parse_from_rfc3339(f["slot"].as_str().expect("slot"))
                .expect("rfc 3339")
                .timestamp_millis();
            (slot, f["run_id"].as_str().expect("run").to_string())
        })
        .collect()
}

/// Every run id the node lists.
async fn all_runs(node: &impl Served) -> Vec<Value> {
    let (status, text) = get(&node.url("/v1/runs?limit=500")).await;
    assert_eq!(status, 200, "{text}");
    json(&text)["runs"].as_array().expect("runs").clone()
}

/// Slots are distinct, and each fire's run exists once: the runs the node holds are exactly
/// the fires' runs.
async fn each_slot_once(node: &impl Served, fired: &[(i64, String)]) {
    let slots: HashSet<i64> = fired.iter().map(|(s, _)| *s).collect();
    assert_eq!(slots.len(), fired.len(), "a slot fired twice: {fired:?}");
    let runs: HashSet<String> = all_runs(node)
        .await
        .iter()
        .map(|r| r["id"].as_str().expect("id").to_string())
        .collect();
    let fire_runs: HashSet<String> = fired.iter().map(|(_, r)| r.clone()).collect();
    assert_eq!(runs, fire_runs, "the runs are not exactly the fires' runs");
}

async fn wait_terminal(node: &impl Served, id: &str) -> Value {
    let (status, text) = get(&node.url(&format!("/v1/runs/{id}/wait?timeout_s=60"))).await;
    assert_eq!(status, 200, "{text}");
    json(&text)
}

/// Waits until `ok(fires)` holds, for at most `within`.
async fn wait_fires(
    node: &impl Served,
    id: &str,
    within: Duration,
    ok: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let f = fires(node, id).await;
        if ok(&f) {
            return f;
        }
        assert!(std::time::Instant::now() < deadline, "never: {f:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An every-second schedule fires N times in N seconds, give or take one, each slot a second
/// after the last, each with its run, fired within the second of its slot, and the runs
/// succeed with the schedule's input.
#[tokio::test(flavor = "multi_thread")]
async fn an_every_second_schedule_fires_n_times_in_n_seconds() {
    let node = app(fixture("durable")).start().await;
    let id = create(&node, every_second("tick")).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (_, text) = post(&node.url(&format!("/v1/schedules/{id}/pause")), "").await;
    assert_eq!(json(&text)["paused"], true, "{text}");
    let all = fires(&node, &id).await;
    let fired = created(&all);
    assert!(
        (4..=6).contains(&fired.len()),
        "{} fires in 5 s: {all:?}",
        fired.len()
    );
    for pair in fired.windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, 1_000, "{fired:?}");
    }
    for f in &all {
        let slot = chrono::DateTime::parse_from_rfc3339(f["slot"].as_str().expect("slot"))
            .expect("slot")
            .timestamp_millis();
        let at = chrono::DateTime::parse_from_rfc3339(f["fired_at"].as_str().expect("at"))
            .expect("at")
            .timestamp_millis();
        assert!(
            (0..1_000).contains(&(at - slot)),
            "fired {} ms late",
            at - slot
        );
    }
    each_slot_once(&node, &fired).await;
    for (_, run) in &fired {
        let run = wait_terminal(&node, run).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["input"], json!({"i": 7}));
    }
    let (_, text) = get(&node.url(&format!("/v1/schedules/{id}"))).await;
    assert_eq!(json(&text)["fires"], fired.len(), "{text}");
}

/// Paused, a schedule fires nothing; resumed, it goes on from its next slot after now (what
/// passed while it was paused does not fire).
#[tokio::test(flavor = "multi_thread")]
async fn a_paused_schedule_fires_nothing_until_resumed() {
    let node = app(fixture("durable")).start().await;
    let id = create(&node, every_second("pausable")).await;
    wait_fires(&node, &id, Duration::from_secs(5), |f| {
        created(f).len() >= 2
    })
    .await;
    let (status, text) = post(&node.url(&format!("/v1/schedules/{id}/pause")), "").await;
    assert_eq!(status, 200, "{text}");
    let paused_at = chrono::Utc::now().timestamp_millis();
    let before = created(&fires(&node, &id).await).len();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        created(&fires(&node, &id).await).len(),
        before,
        "fired while paused"
    );
    let (status, text) = post(&node.url(&format!("/v1/schedules/{id}/resume")), "").await;
    assert_eq!(status, 200, "{text}");
    let resumed_at = chrono::Utc::now().timestamp_millis();
    let resumed = json(&text);
    assert_eq!(resumed["paused"], false);
    let next =
        chrono::DateTime::parse_from_rfc3339(resumed["next_fire_at"].as_str().expect("next"))
            .expect("next")
            .timestamp_millis();
    assert!(next > resumed_at - 50, "resumes from now on: {resumed}");
    let after = wait_fires(&node, &id, Duration::from_secs(5), |f| {
        created(f).len() >= before + 2
    })
    .await;
    let fired = created(&after);
    for (slot, _) in &fired {
        assert!(
            !(paused_at + 50..resumed_at - 50).contains(slot),
            "slot {slot} of the paused time fired"
        );
    }
    each_slot_once(&node, &fired).await;
}

/// The API checks what it is given (timing, bounds, the run against its entrypoint) and says
/// what it understood: a one-shot in English is echoed as an instant, the next slots are
/// shown, a change moves the next slot, a trigger fires now, a delete ends it.
#[tokio::test(flavor = "multi_thread")]
async fn the_schedules_api_checks_what_it_is_given_and_echoes_what_it_understood() {
    let node = app(fixture("durable")).start().await;
    let url = node.url("/v1/schedules");
    let base = json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}});
    let with = |extra: Value| {
        let mut b = base.clone();
        if let (Some(o), Some(e)) = (b.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        b.to_string()
    };
    for (body, status, code) in [
        (with(json!({})), 422, "validation_error"),
        (with(json!({"cron": "61 * * * *"})), 422, "validation_error"),
        (
            with(json!({"cron": "* * * * *", "timezone": "Mars/Base"})),
            422,
            "validation_error",
        ),
        (with(json!({"every": "soon"})), 422, "validation_error"),
        (
            with(json!({"at": "whenever it suits"})),
            422,
            "validation_error",
        ),
        (
            with(json!({"at": "yesterday 9am"})),
            422,
            "validation_error",
        ),
        (
            with(json!({"every": "1m", "surprise": 1})),
            422,
            "validation_error",
        ),
        (
            with(json!({"every": "1m", "input": {"i": "x"}})),
            422,
            "validation_error",
        ),
        (
            with(json!({"every": "1m", "agent": "nobody"})),
            404,
            "agent_not_found",
        ),
        (
            with(json!({"every": "1m", "entrypoint": "nothing"})),
            404,
            "entrypoint_not_found",
        ),
        ("[1]".to_string(), 422, "validation_error"),
        ("{".to_string(), 422, "validation_error"),
    ] {
        let (got, text) = post(&url, &body).await;
        assert_eq!(got, status, "{body}: {text}");
        assert_eq!(json(&text)["error"]["code"], code, "{body}: {text}");
    }
    assert!(
        all_runs(&node).await.is_empty(),
        "a refused schedule made a run"
    );

    // English, echoed as the instant understood, in the zone it names.
    let (status, text) = post(
        &url,
        &with(json!({"at": "tomorrow at 9am Europe/Paris", "name": "once"})),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let once = json(&text);
    assert_eq!(once["kind"], "once");
    assert_eq!(once["at_text"], "tomorrow at 9am Europe/Paris");
    let paris = chrono::Utc::now()
        .with_timezone(&chrono_tz::Europe::Paris)
        .date_naive()
        .succ_opt()
        .expect("tomorrow")
        .and_hms_opt(9, 0, 0)
        .expect("9am")
        .and_local_timezone(chrono_tz::Europe::Paris)
        .single()
        .expect("one 9am")
        .with_timezone(&chrono::Utc);
    let at = chrono::DateTime::parse_from_rfc3339(once["at"].as_str().expect("at")).expect("at");
    assert_eq!(at, paris, "{once}");
    assert_eq!(once["next_fires"].as_array().expect("next").len(), 1);

    // A cron schedule in a zone: its next five, on request.
    let cron = create(
        &node,
        json!({"agent": "durable", "entrypoint": "work", "input": {"i": 2},
               "cron": "0 9 * * 1-5", "timezone": "America/New_York", "name": "weekdays"}),
    )
    .await;
    let (status, text) = get(&node.url(&format!("/v1/schedules/{cron}?next=5"))).await;
    assert_eq!(status, 200, "{text}");
    let next: Vec<chrono::DateTime<chrono_tz::Tz>> = json(&text)["next_fires"]
        .as_array()
        .expect("next")
        .iter()
        .map(|t| {
            chrono::DateTime::parse_from_rfc3339(t.as_str().expect("t"))
                .expect("t")
                .with_timezone(&chrono_tz::America::New_York)
        })
        .collect();
    assert_eq!(next.len(), 5);
    for t in &next {
        use chrono::{Datelike, Timelike};
        assert_eq!((t.hour(), t.minute()), (9, 0), "{t}");
        assert!(t.weekday().number_from_monday() <= 5, "{t}");
    }
    let (status, _) = get(&node.url(&format!("/v1/schedules/{cron}?next=101"))).await;
    assert_eq!(status, 422);

    // A name is one schedule's.
    let (status, text) = post(&url, &with(json!({"every": "1h", "name": "weekdays"}))).await;
    assert_eq!(status, 409, "{text}");
    assert_eq!(
        json(&text)["error"]["details"]["schedule_id"],
        cron.as_str()
    );

    // A change: a merge patch; a new timing moves the next slot; bad changes are refused.
    let patch = |id: &str, body: Value| {
        let url = node.url(&format!("/v1/schedules/{id}"));
        async move {
            let r = client()
                .patch(url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .expect("patch");
            (r.status().as_u16(), r.text().await.expect("body"))
        }
    };
    let (status, text) = patch(
        &cron,
        json!({"cron": null, "every": "1h", "timezone": null, "metadata": {"team": "x"}}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let changed = json(&text);
    assert_eq!(changed["kind"], "every");
    assert_eq!(changed["metadata"], json!({"team": "x"}));
    assert_eq!(changed["next_fires"].as_array().expect("next").len(), 5);
    let (status, text) = patch(&cron, json!({"input": {"i": "nope"}})).await;
    assert_eq!(status, 422, "{text}");
    let (status, text) = patch(&cron, json!({"name": "once"})).await;
    assert_eq!(status, 409, "{text}");
    // The one-shot's time is kept as resolved when something else changes.
    let once_id = once["id"].as_str().expect("id");
    let (status, text) = patch(once_id, json!({"priority": 5})).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["at"], once["at"]);

    // Trigger: a run now, recorded as a manual fire, paused or not.
    post(&node.url(&format!("/v1/schedules/{cron}/pause")), "").await;
    let (status, text) = post(&node.url(&format!("/v1/schedules/{cron}/trigger")), "").await;
    assert_eq!(status, 202, "{text}");
    let triggered = json(&text);
    let run = triggered["run"]["id"].as_str().expect("run").to_string();
    assert_eq!(triggered["fire"]["manual"], true);
    assert_eq!(triggered["run"]["metadata"], json!({"team": "x"}));
    assert_eq!(wait_terminal(&node, &run).await["status"], "succeeded");
    let listed = fires(&node, &cron).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["run_id"], run.as_str());
    let (_, text) = get(&node.url(&format!("/v1/schedules/{cron}"))).await;
    assert_eq!(json(&text)["fires"], 0, "a trigger is not a scheduled fire");

    // The list pages in creation order.
    let (_, text) = get(&node.url("/v1/schedules?limit=1")).await;
    let page = json(&text);
    assert_eq!(page["schedules"][0]["id"], once["id"]);
    let cursor = page["next_cursor"].as_str().expect("cursor");
    let (_, text) = get(&node.url(&format!("/v1/schedules?limit=1&cursor={cursor}"))).await;
    assert_eq!(json(&text)["schedules"][0]["id"], cron.as_str());

    // Deleted: gone, with its fires; its run stays.
    let r = client()
        .delete(node.url(&format!("/v1/schedules/{cron}")))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status().as_u16(), 204);
    for path in [
        format!("/v1/schedules/{cron}"),
        format!("/v1/schedules/{cron}/fires"),
    ] {
        let (status, text) = get(&node.url(&path)).await;
        assert_eq!(status, 404, "{path}: {text}");
        assert_eq!(json(&text)["error"]["code"], "schedule_not_found");
    }
    let (status, _) = post(&node.url(&format!("/v1/schedules/{cron}/trigger")), "").await;
    assert_eq!(status, 404);
    assert_eq!(wait_terminal(&node, &run).await["id"], run.as_str());
}

/// A node restarted in the middle of a slot, after a downtime of several slots: no slot fires
/// twice, every fire has its one run, and the slots missed meanwhile fire once, as the
/// schedule's `missed: once` says (one catch-up fire, then on time again).
#[tokio::test(flavor = "multi_thread")]
async fn a_restart_mid_slot_fires_no_slot_twice_and_catches_up_once() {
    let state = tempfile::tempdir().expect("tempdir");
    let start = || {
        server(fixture("durable"))
            .state_dir(state.path())
            .args(["--schedule-missed-after-s", "1"])
            .start()
    };
    let mut node = start();
    let id = create(&node, every_second("restarted")).await;
    let before = wait_fires(&node, &id, Duration::from_secs(5), |f| {
        created(f).len() >= 2
    })
    .await;
    // Half a slot after the last fire: in the middle of the next.
    let last = created(&before).last().expect("a fire").0;
    let mid = last + 1_500 - chrono::Utc::now().timestamp_millis();
    tokio::time::sleep(Duration::from_millis(mid.max(0) as u64)).await;
    node.stop(nix::sys::signal::Signal::SIGTERM);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let node = start();
    let after = wait_fires(&node, &id, Duration::from_secs(10), |f| {
        created(f).len() >= created(&before).len() + 3
    })
    .await;
    let fired = created(&after);
    each_slot_once(&node, &fired).await;
    let gaps: Vec<i64> = fired
        .windows(2)
        .map(|p| p[1].0 - p[0].0)
        .filter(|d| *d != 1_000)
        .collect();
    assert_eq!(gaps.len(), 1, "one catch-up after the downtime: {fired:?}");
    assert!(
        gaps[0] >= 3_000,
        "the downtime's slots were passed over: {fired:?}"
    );
    // `missed: once`: of the slots that passed while it was down, exactly one fired (`all`
    // would fire each of them; which of `skip` and `once` applies to the latest depends on
    // its lateness, which the unit tests of the plan pin down).
    // The restarted node's first pass fires them in one transaction, at one `fired_at`.
    let last_before = created(&before).last().expect("a fire").0;
    let first_pass = after
        .iter()
        .find(|f| {
            created(std::slice::from_ref(f))
                .first()
                .is_some_and(|(s, _)| *s > last_before)
        })
        .map(|f| f["fired_at"].clone())
        .expect("a fire after the restart");
    let downtime = after.iter().filter(|f| f["fired_at"] == first_pass).count();
    assert_eq!(downtime, 1, "one catch-up fire: {after:?}");
    for (_, run) in &fired {
        assert_eq!(wait_terminal(&node, run).await["status"], "succeeded");
    }
}

/// Three nodes on one PostgreSQL fire ten every-second schedules for a few seconds: every slot
/// fires exactly once across them, with one run, and none is skipped. Halfway, the node that
/// fired most is stopped, so the later slots are fired by another: more than one node takes
/// part by construction, and the survivors carry on without a gap.
#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_on_postgres_fire_each_slot_exactly_once() {
    let schema = schema();
    let mut nodes = Vec::new();
    for n in 0..3 {
        let mut args = on_postgres(&schema);
        args.extend(["--node-name".into(), format!("n{n}")]);
        nodes.push(app(fixture("durable")).args(args).start().await);
    }
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(create(&nodes[i % 3], every_second(&format!("s{i}"))).await);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let fires_by_node = |all: &[Vec<serde_json::Value>]| {
        let mut by_node: HashMap<String, usize> = HashMap::new();
        for f in all.iter().flatten() {
            *by_node
                .entry(f["node"].as_str().expect("node").into())
                .or_default() += 1;
        }
        by_node
    };
    let mut before = Vec::new();
    for id in &ids {
        before.push(fires(&nodes[0], id).await);
    }
    let busiest = fires_by_node(&before)
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(name, _)| name)
        .expect("fires in the first three seconds");
    let index: usize = busiest[1..].parse().expect("a node named nN");
    nodes.remove(index).stop().await;
    // What had fired by the time the node was gone.
    let mut before = Vec::new();
    for id in &ids {
        before.push(fires(&nodes[0], id).await.len());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in &ids {
        let (status, _) = post(&nodes[0].url(&format!("/v1/schedules/{id}/pause")), "").await;
        assert_eq!(status, 200);
    }
    let mut every_fire = Vec::new();
    let mut after_stop = Vec::new();
    for (id, earlier) in ids.iter().zip(&before) {
        let all = fires(&nodes[1], id).await;
        after_stop.push(all[*earlier..].to_vec());
        let fired = created(&all);
        assert!(fired.len() >= 5, "{id}: {fired:?}");
        for pair in fired.windows(2) {
            assert_eq!(
                pair[1].0 - pair[0].0,
                1_000,
                "{id} skipped or repeated: {fired:?}"
            );
        }
        every_fire.extend(fired);
    }
    let later = fires_by_node(&after_stop);
    assert!(
        !later.is_empty() && !later.contains_key(&busiest),
        "after {busiest} stopped, its slots were fired by {later:?}"
    );
    each_slot_once(&nodes[0], &every_fire).await;
    for (_, run) in &every_fire {
        assert_eq!(wait_terminal(&nodes[0], run).await["status"], "succeeded");
    }
}

/// A node SIGKILLed just after it fired a slot (its commit done, its run perhaps not even
/// started): the slot's run exists exactly once, the other node goes on firing the next slots
/// without a gap, and the dead node's run is taken over and finishes.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_sigkilled_just_after_a_fire_leaves_the_slots_run_exactly_once() {
    let schema = schema();
    let start = |name: &str| {
        let mut args = on_postgres(&schema);
        args.extend([
            "--node-name".into(),
            name.into(),
            "--lease-ttl-s".into(),
            "2".into(),
        ]);
        server(fixture("durable")).args(args).start()
    };
    let mut a = start("a");
    let b = start("b");
    let id = create(&b, every_second("killed")).await;
    // The first fire made by `a`, seen at once; then `a` dies.
    let seen = wait_fires(&a, &id, Duration::from_secs(20), |f| {
        f.iter().any(|x| x["node"] == "a")
    })
    .await;
    a.stop(nix::sys::signal::Signal::SIGKILL);
    let killed_slot = seen
        .iter()
        .rev()
        .find(|x| x["node"] == "a")
        .and_then(|x| x["slot"].as_str())
        .expect("a's fire")
        .to_string();
    let after = wait_fires(&b, &id, Duration::from_secs(10), |f| {
        created(f).len() >= created(&seen).len() + 3
    })
    .await;
    post(&b.url(&format!("/v1/schedules/{id}/pause")), "").await;
    let all = fires(&b, &id).await;
    let fired = created(&all);
    for pair in fired.windows(2) {
        assert_eq!(
            pair[1].0 - pair[0].0,
            1_000,
            "skipped or repeated: {fired:?}"
        );
    }
    each_slot_once(&b, &fired).await;
    assert_eq!(
        all.iter()
            .filter(|f| f["slot"] == killed_slot.as_str())
            .count(),
        1,
        "{after:?}"
    );
    for (_, run) in &fired {
        let run = wait_terminal(&b, run).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        let events = crate::common::sse::events(&b, run["id"].as_str().expect("id")).await;
        let ends = events
            .iter()
            .filter(|(_, k, _)| k == "run.succeeded")
            .count();
        assert_eq!(ends, 1, "{events:?}");
    }
}

/// `durable`'s `work` entrypoint with these timers declared.
fn with_timers(timers: Vec<Value>) -> agentry_core::settings::AgentSettings {
    let entrypoint = agentry_core::settings::EntrypointSettings {
        timers: timers
            .into_iter()
            .map(|t| t.as_object().cloned().expect("a timer is an object"))
            .collect(),
        ..Default::default()
    };
    agentry_core::settings::AgentSettings {
        entrypoints: [("work".to_string(), entrypoint)].into(),
        ..Default::default()
    }
}

async fn all_schedules(node: &impl Served) -> Vec<Value> {
    let (status, text) = get(&node.url("/v1/schedules?limit=500")).await;
    assert_eq!(status, 200, "{text}");
    json(&text)["schedules"]
        .as_array()
        .expect("schedules")
        .clone()
}

/// Serves `durable` on `state` (kept across restarts) with `timers`.
async fn serve_timers(
    state: &std::path::Path,
    timers: Vec<Value>,
    also: impl FnOnce(&mut agentry_server::Config),
) -> crate::common::app::TestApp {
    let state = state.to_path_buf();
    crate::common::app::TestApp::start(vec![fixture("durable")], move |c| {
        c.state_dir = state;
        c.agents.insert("durable".into(), with_timers(timers));
        also(c);
    })
    .await
}

#[tokio::test]
async fn a_timer_in_the_configuration_is_declared_once_and_follows_its_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let tick = |i: i64| json!({"name": "tick", "every": "1s", "input": {"i": i}});

    let node = serve_timers(&state, vec![tick(3)], |_| {}).await;
    let list = all_schedules(&node).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let id = list[0]["id"].as_str().expect("id").to_string();
    assert_eq!(list[0]["created_by"], "config");
    assert_eq!(list[0]["name"], "tick");
    assert_eq!(list[0]["input"], json!({"i": 3}));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!fires(&node, &id).await.is_empty(), "the timer fires");
    node.stop().await;

    // The same configuration again: the same schedule, untouched.
    let node = serve_timers(&state, vec![tick(3)], |_| {}).await;
    let list = all_schedules(&node).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["id"], id.as_str());
    let first_start = list[0]["start_at"].clone();
    node.stop().await;

    // Changed: the same schedule, changed, keeping its phase; a second timer is created.
    let nightly = json!({"name": "nightly", "cron": "0 3 * * *", "timezone": "Europe/Berlin", "input": {"i": 1}});
    let node = serve_timers(&state, vec![tick(4), nightly.clone()], |_| {}).await;
    let list = all_schedules(&node).await;
    assert_eq!(list.len(), 2, "{list:?}");
    let tick_now = list.iter().find(|s| s["name"] == "tick").expect("tick");
    assert_eq!(tick_now["id"], id.as_str());
    assert_eq!(tick_now["input"], json!({"i": 4}));
    assert_eq!(tick_now["start_at"], first_start);
    node.stop().await;

    // Taken out of the configuration: its schedule is deleted; an API schedule stays.
    let node = serve_timers(&state, vec![nightly], |_| {}).await;
    create(&node, every_second("from-the-api")).await;
    node.stop().await;
    let node = serve_timers(&state, vec![], |_| {}).await;
    let names: Vec<Value> = all_schedules(&node)
        .await
        .iter()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("from-the-api")]);
    node.stop().await;
}

/// Three nodes starting at once on one PostgreSQL declare one schedule per timer.
#[tokio::test]
async fn nodes_starting_together_on_postgres_declare_each_timer_once() {
    let schema = schema();
    let start = |_: usize| {
        let dir = tempfile::tempdir().expect("tempdir");
        let schema = schema.to_string();
        async move {
            let node = serve_timers(
                &dir.path().join("state"),
                vec![json!({"name": "tick", "every": "1s", "input": {"i": 1}})],
                move |c| {
                    c.store.database_url = Some(pg_url());
                    c.store.database_schema = Some(schema);
                },
            )
            .await;
            (node, dir)
        }
    };
    let (a, b, c) = tokio::join!(start(0), start(1), start(2));
    let list = all_schedules(&a.0).await;
    assert_eq!(list.len(), 1, "{list:?}");
    for (node, _) in [c, b, a] {
        node.stop().await;
    }
}

#[tokio::test]
async fn a_timer_that_cannot_be_declared_stops_the_start() {
    let cases = [
        (json!({"every": "1s"}), "needs a name"),
        (json!({"name": "t", "delay_s": 5}), "RFC 3339"),
        (json!({"name": "t", "at": "tomorrow at 9am"}), "RFC 3339"),
        (
            json!({"name": "t", "every": "1s", "agent": "x"}),
            "declared under",
        ),
        (
            json!({"name": "t", "every": "1s", "colour": "red"}),
            "not a schedule",
        ),
    ];
    for (timer, expected) in cases {
        let mut config = agentry_server::Config::default();
        config
            .agents
            .insert("durable".into(), with_timers(vec![timer.clone()]));
        let said = config.validate().map_err(|e| e.to_string());
        assert!(
            said.as_ref().is_err_and(|e| e.contains(expected)),
            "{timer}: expected `{expected}` in {said:?}"
        );
    }
    // Valid as configuration, refused by the entrypoint: `i` must be an integer.
    let said = TestApp::start_error(vec![fixture("durable")], |config| {
        config.agents.insert(
            "durable".into(),
            with_timers(vec![
                json!({"name": "t", "every": "1s", "input": {"i": "x"}}),
            ]),
        );
    })
    .await;
    assert!(said.contains("timer `t`"), "{said}");
}

/// Two nodes on one PostgreSQL serving different agents, each with its own timers: neither
/// node's start deletes the other's.
#[tokio::test]
async fn a_node_keeps_the_timers_of_agents_it_does_not_serve() {
    let schema = schema();
    let start = |agent: &'static str, tag: &'static str, name: &'static str| {
        let schema = schema.to_string();
        let dir = tempfile::tempdir().expect("tempdir");
        async move {
            let state = dir.path().join("state");
            let node = crate::common::app::TestApp::start(vec![fixture(agent)], move |c| {
                c.state_dir = state;
                c.store.database_url = Some(pg_url());
                c.store.database_schema = Some(schema);
                let entrypoint = agentry_core::settings::EntrypointSettings {
                    timers: vec![
                        json!({"name": name, "every": "1h"})
                            .as_object()
                            .cloned()
                            .expect("object"),
                    ],
                    ..Default::default()
                };
                c.agents.insert(
                    agent.into(),
                    agentry_core::settings::AgentSettings {
                        entrypoints: [(tag.to_string(), entrypoint)].into(),
                        ..Default::default()
                    },
                );
            })
            .await;
            (node, dir)
        }
    };
    let names = |list: Vec<Value>| {
        let mut n: Vec<String> = list
            .iter()
            .filter_map(|s| s["name"].as_str().map(str::to_string))
            .collect();
        n.sort();
        n
    };
    let (a, _da) = start("durable", "hang", "durable-hourly").await;
    let (b, _db) = start("faulty", "ok", "faulty-hourly").await;
    assert_eq!(
        names(all_schedules(&a).await),
        ["durable-hourly", "faulty-hourly"]
    );
    a.stop().await;
    let (a, _da2) = start("durable", "hang", "durable-hourly").await;
    assert_eq!(
        names(all_schedules(&a).await),
        ["durable-hourly", "faulty-hourly"],
        "a's restart left b's timer alone"
    );
    a.stop().await;
    b.stop().await;
}
