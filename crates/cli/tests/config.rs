//! Start-up validation: every broken agent folder is refused with one clear message naming the
//! agent, the entrypoint, the file and the cause, and both `serve` and `validate` exit non-zero.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn write_agent(dir: &Path, entrypoints: &str, code: &str) {
    std::fs::create_dir_all(dir).expect("dir");
    let config = format!(
        r#"{{"agent_name": "broken", "description": "d", "framework": "default", "template": "", "version": "1",
            "created_at": "2025-01-01", "template_source": {{"repo_url": "", "author": "", "path": ""}},
            "agent_architecture": {{"entrypoints": {entrypoints}}}, "agent_id": "44444444-0000-0000-0000-000000000000"}}"#
    );
    std::fs::write(dir.join("runagent.config.json"), config).expect("config");
    std::fs::write(dir.join("agent.py"), code).expect("code");
}

/// Runs `agentry <cmd> <dir>` and returns (exit code, stdout + stderr).
fn run(cmd: &str, dir: &Path) -> (i32, String) {
    let state = tempfile::tempdir().expect("state");
    let out = Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args([
            cmd,
            &dir.display().to_string(),
            "--state-dir",
            &state.path().display().to_string(),
        ])
        .args(if cmd == "serve" {
            vec!["--port", "0", "--no-runagent-db"]
        } else {
            vec![]
        })
        .env("NO_COLOR", "1")
        .output()
        .expect("run agentry");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn assert_refused(dir: &Path, needles: &[&str]) {
    for cmd in ["validate", "serve"] {
        let (code, text) = run(cmd, dir);
        assert_ne!(code, 0, "`agentry {cmd}` accepted a broken agent:\n{text}");
        for needle in needles {
            assert!(
                text.contains(needle),
                "`agentry {cmd}` output lacks {needle:?}:\n{text}"
            );
        }
    }
}

const ONE: &str = r#"[{"file": "agent.py", "module": "run", "tag": "main"}]"#;

#[test]
fn missing_config_file() {
    let dir = tempfile::tempdir().expect("dir");
    assert_refused(
        dir.path(),
        &["no config file found", "runagent.config.json"],
    );
}

#[test]
fn malformed_config_json() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("runagent.config.json"), "{\"agent_name\": ").expect("write");
    assert_refused(dir.path(), &["invalid JSON", "runagent.config.json"]);
}

#[test]
fn yaml_config_is_read() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("runagent.config.yaml"),
        "agent_name: y\ndescription: d\nframework: default\ntemplate: ''\nversion: '1'\ncreated_at: '2025-01-01 00:00:00'\n\
         template_source: {repo_url: '', author: '', path: ''}\nagent_id: 55555555-0000-0000-0000-000000000000\n\
         agent_architecture:\n  entrypoints:\n    - {file: agent.py, module: run, tag: main}\n",
    )
    .expect("yaml");
    std::fs::write(dir.path().join("agent.py"), "def run():\n    return 1\n").expect("code");
    let (code, text) = run("validate", dir.path());
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("runagent.config.yaml") && text.contains("main"),
        "{text}"
    );
}

#[test]
fn missing_required_field() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("runagent.config.json"),
        r#"{"agent_name": "x", "agent_id": "1"}"#,
    )
    .expect("write");
    assert_refused(dir.path(), &["`description` is required"]);
}

#[test]
fn duplicate_tags() {
    let dir = tempfile::tempdir().expect("dir");
    write_agent(
        dir.path(),
        r#"[{"file": "agent.py", "module": "run", "tag": "main"}, {"file": "agent.py", "module": "run", "tag": "main"}]"#,
        "def run():\n    return 1\n",
    );
    assert_refused(dir.path(), &["`main` is used twice"]);
}

#[test]
fn module_that_fails_to_import() {
    let dir = tempfile::tempdir().expect("dir");
    write_agent(
        dir.path(),
        ONE,
        "import module_that_does_not_exist_xyz\n\ndef run():\n    return 1\n",
    );
    assert_refused(
        dir.path(),
        &[
            "agent broken",
            "entrypoint `main`",
            "agent.py",
            "ModuleNotFoundError",
            "module_that_does_not_exist_xyz",
        ],
    );
}

#[test]
fn syntax_error_in_the_agent() {
    let dir = tempfile::tempdir().expect("dir");
    write_agent(dir.path(), ONE, "def run(:\n    return 1\n");
    assert_refused(dir.path(), &["entrypoint `main`", "SyntaxError"]);
}

#[test]
fn missing_file_and_missing_attribute() {
    let dir = tempfile::tempdir().expect("dir");
    write_agent(
        dir.path(),
        r#"[{"file": "nope.py", "module": "run", "tag": "main"}]"#,
        "",
    );
    assert_refused(
        dir.path(),
        &["entrypoint `main`", "nope.py", "FileNotFoundError"],
    );

    let dir = tempfile::tempdir().expect("dir");
    write_agent(
        dir.path(),
        r#"[{"file": "agent.py", "module": "app.invoke", "tag": "main"}]"#,
        "app = object()\n",
    );
    assert_refused(
        dir.path(),
        &["entrypoint `main`", "AttributeError", "invoke"],
    );
}

#[test]
fn target_that_is_not_callable() {
    let dir = tempfile::tempdir().expect("dir");
    write_agent(dir.path(), ONE, "run = 42\n");
    assert_refused(dir.path(), &["entrypoint `main`", "not callable"]);
}

#[test]
fn stream_tag_on_something_that_cannot_stream() {
    let dir = tempfile::tempdir().expect("dir");
    write_agent(
        dir.path(),
        r#"[{"file": "agent.py", "module": "run", "tag": "main_stream"}]"#,
        "def run() -> int:\n    return 1\n",
    );
    assert_refused(dir.path(), &["entrypoint `main_stream`", "cannot stream"]);
}

#[test]
fn validate_reports_the_interpreter_and_entrypoints() {
    let (code, text) = run("validate", &fixture("compat"));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("python 3."), "{text}");
    assert!(
        text.contains("`python3` on PATH") || text.contains("virtualenv"),
        "{text}"
    );
    assert!(
        text.contains("echo_stream") && text.contains("generator"),
        "{text}"
    );
}

#[test]
fn a_venv_in_the_agent_folder_is_preferred() {
    let dir = tempfile::tempdir().expect("dir");
    write_agent(
        dir.path(),
        ONE,
        "import sys\n\ndef run():\n    return sys.prefix\n",
    );
    let status = Command::new("python3")
        .args(["-m", "venv", "--without-pip"])
        .arg(dir.path().join(".venv"))
        .status()
        .expect("venv");
    assert!(status.success());
    let (code, text) = run("validate", dir.path());
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("the agent folder's virtualenv"), "{text}");
    assert!(
        text.contains(&dir.path().join(".venv").display().to_string()),
        "{text}"
    );
}
