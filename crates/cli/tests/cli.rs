//! The CLI as a newcomer uses it: `init` makes a working agent, `validate` accepts it, `serve`
//! serves it, and `run` prints results and stream chunks as they arrive.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

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
    for name in ["echo", "async_agent", "token_stream"] {
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
