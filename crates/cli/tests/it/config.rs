//! Start-up validation: every broken agent folder is refused with one clear message naming the
//! agent, the entrypoint, the file and the cause, and both `serve` and `validate` exit non-zero.

use std::path::Path;
use std::process::Command;

use crate::common::*;

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

// ---------------------------------------------------------------------------------------------
// The layered server configuration: agentry.toml, then AGENTRY_* variables, then flags.
// ---------------------------------------------------------------------------------------------

/// Runs `agentry config <args>` in `cwd` with only the given AGENTRY_* variables set.
fn agentry_config(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentry"));
    cmd.arg("config").args(args).current_dir(cwd);
    for (k, _) in std::env::vars() {
        if k.starts_with("AGENTRY_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run agentry config");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_show_layers_file_then_environment_then_flags_and_redacts_secrets() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("agentry.toml"),
        r#"
state_dir = "from-file"
[workers]
count = 5
[runs]
lease_ttl_s = 11
heartbeat_event_s = 7
[http]
max_connections = 100
[gateway]
rate_limit_postgres = "postgres://app:file-secret@db.internal:5432/agentry"
[agents.echo]
workers = 1
[agents.echo.entrypoints.echo]
timeout_s = 2.5
"#,
    )
    .expect("write agentry.toml");
    let env = [
        ("AGENTRY_WORKERS", "3"),
        ("AGENTRY_LEASE_TTL_S", "12"),
        ("AGENTRY_NO_RUNAGENT_DB", "1"),
    ];
    let (code, out, err) = agentry_config(
        dir.path(),
        &[
            "show",
            "--json",
            "--lease-ttl-s",
            "13",
            "--max-body-bytes",
            "2048",
        ],
        &env,
    );
    assert_eq!(code, 0, "{out}{err}");
    let shown = json(&out);
    let at = |key: &str| {
        (
            shown[key]["value"].clone(),
            shown[key]["source"].as_str().unwrap_or("").to_string(),
        )
    };
    // The file beats the default, the environment beats the file, a flag beats both.
    assert_eq!(
        at("state_dir"),
        (serde_json::json!("from-file"), "agentry.toml".into())
    );
    assert_eq!(
        at("http.max_connections"),
        (serde_json::json!(100), "agentry.toml".into())
    );
    assert_eq!(
        at("workers.count"),
        (serde_json::json!(3), "AGENTRY_WORKERS".into())
    );
    assert_eq!(
        at("runs.heartbeat_event_s"),
        (serde_json::json!(7.0), "agentry.toml".into())
    );
    assert_eq!(
        at("runs.lease_ttl_s"),
        (serde_json::json!(13.0), "--lease-ttl-s".into())
    );
    assert_eq!(
        at("http.max_body_bytes"),
        (serde_json::json!(2048), "--max-body-bytes".into())
    );
    assert_eq!(
        at("store.runagent_db"),
        (serde_json::json!(false), "AGENTRY_NO_RUNAGENT_DB".into())
    );
    assert_eq!(
        at("runs.cancel_grace_s"),
        (serde_json::json!(5.0), "default".into())
    );
    assert_eq!(
        at("agents.echo.workers"),
        (serde_json::json!(1), "agentry.toml".into())
    );
    assert_eq!(
        at("agents.echo.entrypoints.echo.timeout_s"),
        (serde_json::json!(2.5), "agentry.toml".into())
    );
    // The password is never printed, in JSON or in text.
    assert_eq!(
        at("gateway.rate_limit_postgres").0,
        serde_json::json!("postgres://app:***@db.internal:5432/agentry")
    );
    assert!(!out.contains("file-secret"), "{out}");
    let (code, text, err) = agentry_config(dir.path(), &["show"], &env);
    assert_eq!(code, 0, "{err}");
    assert!(!text.contains("file-secret"), "{text}");
    assert!(
        text.contains("workers.count = 3  # AGENTRY_WORKERS"),
        "{text}"
    );
    // The same password given as a flag or a variable is redacted too.
    let (_, out, _) = agentry_config(
        dir.path(),
        &[
            "show",
            "--rate-limit-postgres",
            "postgres://u:flag-secret@h/db",
        ],
        &[("AGENTRY_CONFIG", "agentry.toml")],
    );
    assert!(
        !out.contains("flag-secret") && out.contains("postgres://u:***@h/db"),
        "{out}"
    );
}

#[test]
fn config_check_names_the_setting_that_is_wrong() {
    let dir = tempfile::tempdir().expect("dir");
    let (code, out, err) = agentry_config(dir.path(), &["check"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("configuration ok (no configuration file)"),
        "{out}"
    );
    std::fs::write(dir.path().join("agentry.toml"), "[runs]\nlease_ttl_s = 0\n").expect("write");
    let (code, _, err) = agentry_config(dir.path(), &["check"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("runs.lease_ttl_s"), "{err}");
    std::fs::write(dir.path().join("agentry.toml"), "[runs]\nlease_tll_s = 3\n").expect("write");
    let (code, _, err) = agentry_config(dir.path(), &["check"], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("lease_tll_s"),
        "an unknown key is refused: {err}"
    );
    let (code, _, err) = agentry_config(dir.path(), &["check"], &[("AGENTRY_WORKERS", "many")]);
    assert_ne!(code, 0);
    assert!(err.contains("AGENTRY_WORKERS"), "{err}");
    let (code, _, err) = agentry_config(dir.path(), &["check", "--config", "missing.toml"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("missing.toml"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn per_agent_settings_in_agentry_toml_reach_the_agent() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("agentry.toml");
    std::fs::write(
        &config,
        "[agents.faulty]\nworkers = 1\n[agents.faulty.entrypoints.ok]\ntimeout_s = 4.5\n",
    )
    .expect("write");
    // No `--workers`: a flag would win over the file (flags and variables beat per-agent
    // settings, which beat the rest).
    let srv = server(fixture("faulty"))
        .without_default_workers()
        .args(["--config".to_string(), config.display().to_string()])
        .start();
    let (status, body) = get(&srv.url("/v1/agents/faulty")).await;
    assert_eq!(status, 200, "{body}");
    let agent = json(&body);
    assert_eq!(agent["workers"]["live"], 1, "{agent}");
    let ok = agent["entrypoints"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["tag"] == "ok"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(ok["timeout_s"], 4.5, "{agent}");
    // The folder's own setting for `hang` (1 s) still holds.
    let hang = agent["entrypoints"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["tag"] == "hang"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(hang["timeout_s"], 1.0, "{agent}");
}
