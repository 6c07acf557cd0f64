//! The CLI as a newcomer uses it: `init` makes a working agent, `validate` accepts it, `serve`
//! serves it, and `run` prints results and stream chunks as they arrive.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn agentry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_agentry"))
}

#[test]
fn init_validate_serve_and_run() {
    let work = tempfile::tempdir().expect("work");
    let dir = work.path().join("hello_agent");
    let out = agentry().arg("init").arg(&dir).output().expect("init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // init refuses to overwrite an agent.
    assert!(
        !agentry()
            .arg("init")
            .arg(&dir)
            .output()
            .expect("init")
            .status
            .success()
    );

    let out = agentry()
        .arg("validate")
        .arg(&dir)
        .arg("--state-dir")
        .arg(work.path().join("s"))
        .output()
        .expect("validate");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("respond_stream") && text.contains("1 agent(s) valid"),
        "{text}"
    );

    let srv = server(dir.clone()).start();
    let out = agentry()
        .args([
            "run",
            "--agent",
            "hello_agent",
            "--tag",
            "respond",
            "--input",
            r#"{"message": "hi", "shout": true}"#,
            "--url",
            &srv.base,
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"reply":"You said: HI"}"#
    );

    // Chunks are printed as they arrive, not all at the end: with 0.3 s between tokens, the
    // first line must show up long before the last.
    let mut child = agentry()
        .args([
            "run",
            "--agent",
            "hello_agent",
            "--tag",
            "respond_stream",
            "--input",
            r#"{"message": "a b c", "delay_s": 0.3}"#,
            "--url",
            &srv.base,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run stream");
    let started = Instant::now();
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a line").expect("utf8");
    let first_at = started.elapsed();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let last_at = started.elapsed();
    assert!(child.wait().expect("wait").success());
    assert_eq!(first, r#"{"token": "You"}"#);
    assert_eq!(rest.len(), 4, "{rest:?}");
    assert!(
        last_at - first_at > Duration::from_millis(600),
        "chunks were not streamed: {first_at:?} vs {last_at:?}"
    );

    // Errors go to stderr with a non-zero exit.
    let out = agentry()
        .args(["run", "--agent", "nope", "--tag", "x", "--url", &srv.base])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("agent_not_found"));
}

#[test]
fn the_examples_validate() {
    for name in ["echo", "async_agent", "token_stream", "pipeline"] {
        let state = tempfile::tempdir().expect("state");
        let out = agentry()
            .arg("validate")
            .arg(example(name))
            .arg("--state-dir")
            .arg(state.path())
            .output()
            .expect("validate");
        assert!(
            out.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_default_relative_state_dir_works_from_any_directory() {
    // As in the README: no --state-dir, so `.agentry` relative to wherever the command runs,
    // while workers run inside the agent folder.
    let cwd = tempfile::tempdir().expect("cwd");
    let out = agentry()
        .arg("validate")
        .arg(example("echo"))
        .current_dir(cwd.path())
        .output()
        .expect("validate");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        cwd.path()
            .join(".agentry/python/agentry_worker.py")
            .is_file()
    );
    let out = agentry()
        .args(["validate", "examples/echo"])
        .current_dir(repo_root())
        .env("AGENTRY_STATE_DIR", "target/test-state")
        .output()
        .expect("validate");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `agentry COMMAND --url <srv> ARGS…`, which must succeed; its JSON output.
fn client_cli(srv: &Server, command: &str, args: &[&str]) -> serde_json::Value {
    let out = agentry()
        .arg(command)
        .args(["--url", &srv.base])
        .args(args)
        .output()
        .expect("agentry");
    assert!(
        out.status.success(),
        "{command} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&String::from_utf8_lossy(&out.stdout))
}

fn runs_cli(srv: &Server, args: &[&str]) -> serde_json::Value {
    client_cli(srv, "runs", args)
}

#[test]
fn runs_commands_create_get_list_wait_cancel_and_follow_events() {
    let srv = server(fixture("durable")).start();
    let created = runs_cli(
        &srv,
        &[
            "create",
            "durable",
            "work",
            "--input",
            r#"{"i": 4}"#,
            "--metadata",
            r#"{"k": 1}"#,
        ],
    );
    let id = created["id"].as_str().expect("id").to_string();
    let done = runs_cli(&srv, &["wait", &id, "--timeout-s", "30"]);
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["output"], serde_json::json!({"i": 4}));
    assert_eq!(
        runs_cli(&srv, &["get", &id])["metadata"],
        serde_json::json!({"k": 1})
    );
    let waited = runs_cli(
        &srv,
        &[
            "create",
            "durable",
            "work",
            "--input",
            r#"{"i": 5}"#,
            "--wait",
        ],
    );
    assert_eq!(waited["status"], "succeeded");
    let delayed = runs_cli(
        &srv,
        &[
            "create",
            "durable",
            "work",
            "--input",
            r#"{"i": 6}"#,
            "--delay-s",
            "60",
        ],
    );
    let did = delayed["id"].as_str().expect("id");
    assert_eq!(runs_cli(&srv, &["cancel", did])["status"], "cancelled");
    let list = runs_cli(&srv, &["list", "--status", "succeeded", "--limit", "1"]);
    assert_eq!(list["runs"].as_array().map(Vec::len), Some(1));
    let cursor = list["next_cursor"].as_str().expect("cursor").to_string();
    let next = runs_cli(
        &srv,
        &["list", "--status", "succeeded", "--cursor", &cursor],
    );
    assert_eq!(next["runs"][0]["id"], id.as_str());
    // `events` prints one JSON event per line and ends with the run.
    let out = agentry()
        .args(["runs", "--url", &srv.base, "events", &id])
        .output()
        .expect("events");
    assert!(out.status.success());
    let types: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| json(l)["type"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(types, ["run.queued", "run.started", "run.succeeded"]);
    // Errors go to stderr with a failing status.
    let out = agentry()
        .args(["runs", "--url", &srv.base, "get", "run_nope"])
        .output()
        .expect("get");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("run_not_found"));
}

#[test]
fn two_agents_that_one_name_would_name_are_refused() {
    // A copy of `durable` with its own id but the same name: keys and routes that say
    // `durable` would name both.
    let tmp = tempfile::tempdir().expect("tmp");
    let copy = tmp.path().join("durable2");
    let ok = std::process::Command::new("cp")
        .arg("-r")
        .arg(fixture("durable"))
        .arg(&copy)
        .status()
        .expect("cp");
    assert!(ok.success());
    let config = copy.join("runagent.config.json");
    let text = std::fs::read_to_string(&config).expect("config");
    let changed = text.replace(
        "d0d0d0d0-0000-4000-8000-000000000001",
        "d0d0d0d0-0000-4000-8000-000000000002",
    );
    assert_ne!(text, changed);
    std::fs::write(&config, changed).expect("write");
    let log = server(fixture("durable"))
        .agent(copy)
        .try_start()
        .err()
        .expect("refused");
    assert!(log.contains("would share the name `durable`"), "{log}");
}

fn schedules_cli(srv: &Server, args: &[&str]) -> serde_json::Value {
    client_cli(srv, "schedules", args)
}

/// `agentry schedules`: create (English one-shot and cron), get with the next slots, update,
/// pause, resume, trigger, fires, list and delete, against a running server.
#[test]
fn schedules_commands_create_get_update_pause_resume_trigger_fires_delete() {
    let srv = server(fixture("durable")).start();
    let once = schedules_cli(
        &srv,
        &[
            "create",
            "durable",
            "work",
            "--input",
            r#"{"i": 1}"#,
            "--at",
            "in 10 minutes",
        ],
    );
    assert_eq!(once["kind"], "once");
    assert_eq!(once["at_text"], "in 10 minutes");
    let cron = schedules_cli(
        &srv,
        &[
            "create",
            "durable",
            "work",
            "--input",
            r#"{"i": 2}"#,
            "--cron",
            "0 9 * * *",
            "--timezone",
            "Europe/Berlin",
            "--name",
            "daily",
            "--overlap",
            "skip",
        ],
    );
    let id = cron["id"].as_str().expect("id").to_string();
    assert_eq!(cron["overlap"], "skip");
    let got = schedules_cli(&srv, &["get", &id, "--next", "3"]);
    assert_eq!(got["next_fires"].as_array().map(Vec::len), Some(3));
    let changed = schedules_cli(&srv, &["update", &id, r#"{"cron": "30 9 * * *"}"#]);
    assert_eq!(changed["cron"], "30 9 * * *");
    assert_eq!(schedules_cli(&srv, &["pause", &id])["paused"], true);
    assert_eq!(schedules_cli(&srv, &["resume", &id])["paused"], false);
    let triggered = schedules_cli(&srv, &["trigger", &id]);
    let run = triggered["run"]["id"].as_str().expect("run").to_string();
    let fires = schedules_cli(&srv, &["fires", &id]);
    assert_eq!(fires["fires"][0]["run_id"], run.as_str());
    let list = schedules_cli(&srv, &["list", "--agent", "durable"]);
    assert_eq!(list["schedules"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        schedules_cli(&srv, &["delete", &id])["deleted"],
        id.as_str()
    );
    let out = agentry()
        .args(["schedules", "--url", &srv.base, "get", &id])
        .output()
        .expect("agentry schedules get");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("schedule_not_found"));
    let out = agentry()
        .args([
            "schedules",
            "--url",
            &srv.base,
            "create",
            "durable",
            "work",
            "--every",
            "1m",
            "--cron",
            "* * * * *",
        ])
        .output()
        .expect("agentry schedules create");
    assert!(!out.status.success(), "two timings are refused by the CLI");
}

#[test]
fn runs_deliveries_shows_a_callbacks_attempts_and_resends_it() {
    let srv = server(fixture("durable"))
        .args([
            "--allow-private-callbacks",
            "--callback-max-attempts",
            "1",
            "--callback-poll-ms",
            "20",
        ])
        .start();
    // Port 9 (discard) on loopback: nothing listens, every attempt fails.
    let created = runs_cli(
        &srv,
        &[
            "create",
            "durable",
            "work",
            "--input",
            r#"{"i": 1}"#,
            "--callback-url",
            "http://127.0.0.1:9/cb",
            "--wait",
        ],
    );
    let id = created["id"].as_str().expect("id").to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut shown = runs_cli(&srv, &["deliveries", &id]);
    while shown["state"] == "pending" && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        shown = runs_cli(&srv, &["deliveries", &id]);
    }
    assert_eq!(shown["state"], "failed", "{shown}");
    assert_eq!(shown["callback_url"], "http://127.0.0.1:9/cb");
    assert_eq!(
        shown["attempts"].as_array().map(Vec::len),
        Some(1),
        "{shown}"
    );
    let resent = runs_cli(&srv, &["deliveries", &id, "--resend"]);
    assert_eq!(resent["state"], "pending", "{resent}");
}
