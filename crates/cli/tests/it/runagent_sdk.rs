//! RunAgent's own Python SDK (runagent==0.1.49, unmodified) against `agentry serve`, by host and
//! port and by `agent_id` discovery alone, compared with the same SDK against RunAgent's server.
//!
//! Needs a virtualenv with runagent==0.1.49 in AGENTRY_TEST_RUNAGENT_VENV (`.ci/run` makes one).
//! Under CI a missing venv fails the test; elsewhere the test says it was skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

pub(crate) fn venv() -> Option<PathBuf> {
    match std::env::var_os("AGENTRY_TEST_RUNAGENT_VENV") {
        Some(v) => Some(PathBuf::from(v)),
        None if std::env::var_os("CI").is_some() => {
            panic!("AGENTRY_TEST_RUNAGENT_VENV must be set in CI")
        }
        None => {
            eprintln!("SKIPPED: set AGENTRY_TEST_RUNAGENT_VENV to a venv with runagent==0.1.49");
            None
        }
    }
}

fn sdk_check(venv: &Path, cache: &Path, out: &Path, args: &[String]) -> serde_json::Value {
    let status = Command::new(venv.join("bin/python"))
        .arg(repo_root().join("tests/compat/sdk_check.py"))
        .arg(out)
        .args(args)
        .env("RUNAGENT_CACHE_DIR", cache)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("python");
    assert!(status.success(), "sdk_check.py failed");
    let text = std::fs::read_to_string(out).expect("results");
    let redacted = regex::Regex::new(r"at 0x[0-9a-f]+")
        .expect("re")
        .replace_all(&text, "at 0xADDR")
        .into_owned();
    json(&redacted)
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// RunAgent's own server on the same fixture, registered in its own cache.
pub(crate) struct RunAgentServer(std::process::Child);

impl Drop for RunAgentServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn start_runagent(venv: &Path, cache: &Path, agent: &Path, port: u16) -> RunAgentServer {
    let status = Command::new(venv.join("bin/runagent"))
        .args(["config", "--register-agent"])
        .arg(agent)
        .env("RUNAGENT_CACHE_DIR", cache)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("runagent config");
    assert!(status.success(), "runagent config --register-agent failed");
    let child = Command::new(venv.join("bin/runagent"))
        .args([
            "serve",
            "--no-animation",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .arg(agent)
        .env("RUNAGENT_CACHE_DIR", cache)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("runagent serve");
    let server = RunAgentServer(child);
    let end = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "RunAgent's server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

pub(crate) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
        }
    }
}

#[test]
fn runagent_python_sdk_gets_the_same_results_and_errors_from_us_as_from_runagent() {
    let Some(venv) = venv() else { return };
    let work = tempfile::tempdir().expect("work");

    // RunAgent itself.
    let ra_cache = work.path().join("ra-cache");
    let ra_agent = work.path().join("ra-agent/compat");
    copy_dir(&fixture("compat"), &ra_agent);
    let ra_port = free_port();
    let ra = start_runagent(&venv, &ra_cache, &ra_agent, ra_port);
    let theirs = sdk_check(
        &venv,
        &ra_cache,
        &work.path().join("theirs.json"),
        &[COMPAT_ID.into(), "127.0.0.1".into(), ra_port.to_string()],
    );
    drop(ra);

    // Agentry, by host and port, then by agent_id alone through RunAgent's database.
    let cache = work.path().join("our-cache");
    let srv = server(fixture("compat")).cache_dir(&cache).start();
    let ours = sdk_check(
        &venv,
        &cache,
        &work.path().join("ours.json"),
        &[COMPAT_ID.into(), "127.0.0.1".into(), srv.port.to_string()],
    );
    let discovered = sdk_check(
        &venv,
        &cache,
        &work.path().join("discovered.json"),
        &[COMPAT_ID.into()],
    );

    assert_eq!(
        ours["echo"]["ok"],
        serde_json::json!({"message": "hi"}),
        "{ours}"
    );
    assert_eq!(
        ours["stream"]["ok"].as_array().map(Vec::len),
        Some(3),
        "{ours}"
    );
    let keys: Vec<&String> = theirs.as_object().expect("object").keys().collect();
    for key in keys {
        assert_eq!(
            ours[key], theirs[key],
            "case {key}: Agentry {} vs RunAgent {}",
            ours[key], theirs[key]
        );
        assert_eq!(
            discovered[key], theirs[key],
            "case {key} (discovery): Agentry {} vs RunAgent {}",
            discovered[key], theirs[key]
        );
    }
}

/// With API keys on, RunAgent's SDK authenticates with `RUNAGENT_API_KEY` (sent as Bearer), and
/// without a valid key it fails with its own authentication error instead of hanging or crashing.
#[test]
fn runagent_python_sdk_uses_runagent_api_key_when_auth_is_on() {
    let Some(venv) = venv() else { return };
    let state = tempfile::tempdir().expect("state");
    let out = Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["keys", "create", "--scope", "invoke", "--state-dir"])
        .arg(state.path())
        .output()
        .expect("keys create");
    assert!(out.status.success());
    let key = json(&String::from_utf8_lossy(&out.stdout))["key"]
        .as_str()
        .expect("key")
        .to_string();
    let cache = tempfile::tempdir().expect("cache");
    let srv = server(fixture("compat"))
        .state_dir(state.path())
        .cache_dir(cache.path())
        .start();
    let script = r#"
import json, sys
from runagent import RunAgentClient
try:
    c = RunAgentClient(agent_id=sys.argv[1], entrypoint_tag="echo", local=True, host="127.0.0.1", port=int(sys.argv[2]))
    print(json.dumps({"ok": c.run(message="hi")}))
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "code": getattr(e, "code", None), "message": str(e)}))
"#;
    let run = |api_key: Option<&str>| {
        let mut cmd = Command::new(venv.join("bin/python"));
        cmd.args(["-c", script, COMPAT_ID, &srv.port.to_string()])
            .env("RUNAGENT_CACHE_DIR", cache.path())
            .env_remove("RUNAGENT_API_KEY")
            .stderr(Stdio::null());
        if let Some(k) = api_key {
            cmd.env("RUNAGENT_API_KEY", k);
        }
        let out = cmd.output().expect("python");
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or_default().to_string();
        json(&last)
    };
    let ok = run(Some(&key));
    assert_eq!(ok["ok"], serde_json::json!({"message": "hi"}), "{ok}");
    for bad in [None, Some("ak_wrong_key")] {
        let refused = run(bad);
        assert!(refused.get("ok").is_none(), "{refused}");
        let text = refused.to_string().to_lowercase();
        assert!(
            text.contains("auth"),
            "a clean authentication error: {refused}"
        );
    }
}

/// A client that offers `permessage-deflate` on RunAgent's WebSocket route gets it, as from
/// RunAgent's server, and receives every frame intact: every chunk, in order, then
/// `stream_completed` and a normal close. RunAgent's TypeScript SDK loses chunks without it.
#[test]
fn a_websocket_client_offering_permessage_deflate_gets_it_and_every_frame_intact() {
    let Some(venv) = venv() else { return };
    let srv = server(fixture("compat")).start();
    let n = 300;
    let out = Command::new(venv.join("bin/python"))
        .arg(repo_root().join("tests/compat/deflate_check.py"))
        .arg(srv.ws_url(&format!("/api/v1/agents/{COMPAT_ID}/run-stream")))
        .arg(n.to_string())
        .stderr(Stdio::inherit())
        .output()
        .expect("python");
    assert!(out.status.success(), "deflate_check.py failed");
    let seen = json(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(
        seen["extensions"],
        serde_json::json!(["permessage-deflate"])
    );
    assert_eq!(seen["close_code"], 1000, "{}", seen["frames"]);
    let frames = seen["frames"].as_array().expect("frames");
    assert_eq!(
        frames.len(),
        n + 2,
        "stream_started, {n} chunks, stream_completed"
    );
    assert_eq!(frames[0]["status"], "stream_started");
    for (i, frame) in frames[1..=n].iter().enumerate() {
        assert_eq!(frame["type"], "data", "{frame}");
        let content = json(frame["content"].as_str().expect("content"));
        let chunk = json(content["payload"].as_str().expect("payload"));
        assert_eq!(chunk["i"], i, "{chunk}");
        assert_eq!(chunk["message"], "z".repeat(200));
    }
    assert_eq!(frames[n + 1]["status"], "stream_completed");
    assert_eq!(frames[n + 1]["total_chunks"], n);
}
