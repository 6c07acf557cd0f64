//! The native API, bad input on every route, invocation history and RunAgent discovery.

use std::time::Duration;

use crate::common::app::app;
use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread")]
async fn agents_list_entrypoints_with_schemas_and_docs() {
    let srv = app(fixture("compat")).start().await;
    let (status, body) = get(&srv.url("/v1/agents")).await;
    assert_eq!(status, 200);
    let v = json(&body);
    let agent = &v["agents"][0];
    assert_eq!(agent["id"], COMPAT_ID);
    assert_eq!(agent["name"], "compat_fixture");
    assert!(
        agent["python"]["version"]
            .as_str()
            .unwrap_or_default()
            .starts_with("3.")
    );
    let eps = agent["entrypoints"].as_array().expect("entrypoints");
    let find = |tag: &str| eps.iter().find(|e| e["tag"] == tag).cloned().expect(tag);
    let echo = find("echo");
    assert_eq!(echo["doc"], "Echo the message back in a dict.");
    assert_eq!(
        echo["input_schema"],
        json!({"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"], "additionalProperties": false})
    );
    assert_eq!(echo["streaming"], false);
    let add = find("add");
    assert_eq!(
        add["input_schema"]["properties"]["b"],
        json!({"type": "integer", "default": 2})
    );
    assert_eq!(add["input_schema"]["required"], json!(["a"]));
    let stream = find("echo_stream");
    assert_eq!(stream["streaming"], true);
    assert_eq!(stream["kind"], "generator");
    assert_eq!(find("async_stream")["kind"], "asyncgen");

    // By name or by id.
    let (status, by_id) = get(&srv.url(&format!("/v1/agents/{COMPAT_ID}"))).await;
    assert_eq!(status, 200);
    assert_eq!(json(&by_id)["name"], "compat_fixture");
}

#[tokio::test(flavor = "multi_thread")]
async fn schemas_cover_the_type_hints() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("agent.py"),
        r#"from typing import Any, Dict, List, Optional
def typed(s: str, i: int, f: float, b: bool, names: List[str], opts: Dict[str, Any], maybe: Optional[int] = None, *args, **kwargs):
    """Typed."""
    return 1
"#,
    )
    .expect("code");
    std::fs::write(
        dir.path().join("runagent.config.json"),
        r#"{"agent_name": "typed", "description": "d", "framework": "default", "template": "", "version": "1",
            "created_at": "2025-01-01", "template_source": {"repo_url": "", "author": "", "path": ""},
            "agent_architecture": {"entrypoints": [{"file": "agent.py", "module": "typed", "tag": "typed"}]},
            "agent_id": "66666666-0000-0000-0000-000000000000"}"#,
    )
    .expect("config");
    let srv = app(dir.path().to_path_buf()).start().await;
    let (_, body) = get(&srv.url("/v1/agents/typed")).await;
    let ep = &json(&body)["entrypoints"][0];
    assert_eq!(
        ep["input_schema"],
        json!({
            "type": "object",
            "properties": {
                "s": {"type": "string"}, "i": {"type": "integer"}, "f": {"type": "number"}, "b": {"type": "boolean"},
                "names": {"type": "array", "items": {"type": "string"}},
                "opts": {"type": "object"},
                "maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": null}
            },
            "required": ["s", "i", "f", "b", "names", "opts"],
            "additionalProperties": true
        })
    );
    assert_eq!(ep["accepts_args"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn native_invoke_errors_carry_their_status_and_code() {
    let srv = app(fixture("compat")).start().await;
    let invoke =
        |agent: &str, tag: &str| srv.url(&format!("/v1/agents/{agent}/entrypoints/{tag}/invoke"));
    let cases = [
        (
            invoke("nope", "echo"),
            r#"{"input":{}}"#,
            404,
            "agent_not_found",
        ),
        (
            invoke("compat_fixture", "nope"),
            r#"{"input":{}}"#,
            404,
            "entrypoint_not_found",
        ),
        (
            invoke("compat_fixture", "echo_stream"),
            r#"{"input":{}}"#,
            400,
            "wrong_entrypoint_kind",
        ),
        (
            invoke("compat_fixture", "echo"),
            r#"{"input": "#,
            422,
            "validation_error",
        ),
        (
            invoke("compat_fixture", "echo"),
            r#"{"input": [1]}"#,
            422,
            "validation_error",
        ),
        (
            invoke("compat_fixture", "echo"),
            r#"{"input": {}, "bogus": 1}"#,
            422,
            "validation_error",
        ),
        (
            invoke("compat_fixture", "echo"),
            r#"{"input": {}, "timeout_s": -1}"#,
            422,
            "validation_error",
        ),
        (
            invoke("compat_fixture", "boom"),
            r#"{"input": {"message": "x"}}"#,
            500,
            "agent_error",
        ),
        (
            invoke("compat_fixture", "echo"),
            r#"{"input": {"wrong": 1}}"#,
            422,
            "validation_error",
        ),
    ];
    for (url, body, status, code) in cases {
        let (got, text) = post(&url, body).await;
        assert_eq!(got, status, "{url} {body}: {text}");
        let v = json(&text);
        assert_eq!(v["error"]["code"], code, "{text}");
        assert!(
            v["error"]["message"].is_string() && v["error"]["request_id"].is_string(),
            "{text}"
        );
    }
    let (_, text) = post(
        &invoke("compat_fixture", "boom"),
        r#"{"input": {"message": "x"}}"#,
    )
    .await;
    let v = json(&text);
    assert_eq!(v["error"]["message"], "ValueError: boom: x");
    assert_eq!(v["error"]["details"]["exception_type"], "ValueError");
    assert!(
        v["error"]["details"].get("traceback").is_none(),
        "tracebacks are hidden by default"
    );

    // Positional arguments and a successful call.
    let (status, text) = post(
        &invoke("compat_fixture", "add"),
        r#"{"args": [40], "input": {"b": 2}}"#,
    )
    .await;
    assert_eq!((status, text.as_str()), (200, r#"{"output":42}"#));
    // Unknown native routes get the native envelope.
    let (status, text) = get(&srv.url("/v1/nothing/here")).await;
    assert_eq!(status, 404);
    assert!(json(&text)["error"]["code"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn tracebacks_are_shown_when_asked_for() {
    let srv = app(fixture("compat"))
        .arg("--expose-tracebacks")
        .start()
        .await;
    let (_, text) = post(
        &srv.url("/v1/agents/compat_fixture/entrypoints/boom/invoke"),
        r#"{"input": {}}"#,
    )
    .await;
    let tb = json(&text)["error"]["details"]["traceback"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        tb.contains("agent.py") && tb.contains("raise ValueError"),
        "{tb}"
    );
    assert!(
        !tb.contains("agentry_worker.py"),
        "shim frames must not leak into user tracebacks: {tb}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_streams_chunks_then_done_or_error() {
    let srv = app(fixture("compat")).start().await;
    let resp = client()
        .post(srv.url("/v1/agents/compat_fixture/entrypoints/echo_stream/stream"))
        .body(r#"{"input": {"message": "m", "n": 3}}"#)
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.expect("body");
    let chunks: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(
        chunks,
        vec![
            r#"{"i": 0, "message": "m"}"#,
            r#"{"i": 1, "message": "m"}"#,
            r#"{"i": 2, "message": "m"}"#,
            r#"{"chunks":3}"#
        ]
    );
    assert!(text.contains("event: done"));

    let text = client()
        .post(srv.url("/v1/agents/compat_fixture/entrypoints/boom_stream/stream"))
        .body(r#"{"input": {"n": 2}}"#)
        .send()
        .await
        .expect("stream")
        .text()
        .await
        .expect("body");
    assert_eq!(text.matches("event: chunk").count(), 2, "{text}");
    assert!(text.contains("event: error"), "{text}");
    assert!(
        text.contains("mid-stream failure") && text.contains("agent_error"),
        "{text}"
    );

    // The async generator and the list-returning function stream too.
    for (tag, body, n) in [
        ("async_stream", r#"{"input": {"n": 4}}"#, 4),
        ("list_stream", r#"{"input": {"n": 5}}"#, 5),
    ] {
        let text = client()
            .post(srv.url(&format!(
                "/v1/agents/compat_fixture/entrypoints/{tag}/stream"
            )))
            .body(body)
            .send()
            .await
            .expect("stream")
            .text()
            .await
            .expect("body");
        assert_eq!(text.matches("event: chunk").count(), n, "{tag}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn native_websocket_streams_and_answers_unary_calls() {
    let srv = app(fixture("compat")).start().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(
        srv.ws_url("/v1/agents/compat_fixture/entrypoints/echo_stream/ws"),
    )
    .await
    .expect("connect");
    ws.send(Message::Text(
        r#"{"input": {"message": "w", "n": 2}}"#.into(),
    ))
    .await
    .expect("send");
    let mut frames = Vec::new();
    while let Some(Ok(m)) = ws.next().await {
        match m {
            Message::Text(t) => frames.push(t.to_string()),
            Message::Close(f) => {
                assert_eq!(f.map(|f| u16::from(f.code)), Some(1000));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(
        frames,
        vec![
            r#"{"type":"chunk","data":{"i": 0, "message": "w"}}"#,
            r#"{"type":"chunk","data":{"i": 1, "message": "w"}}"#,
            r#"{"type":"done","chunks":2}"#
        ]
    );

    let (mut ws, _) = tokio_tungstenite::connect_async(
        srv.ws_url("/v1/agents/compat_fixture/entrypoints/async_echo/ws"),
    )
    .await
    .expect("connect");
    ws.send(Message::Text(r#"{"input": {"message": "u"}}"#.into()))
        .await
        .expect("send");
    let Some(Ok(Message::Text(t))) = ws.next().await else {
        panic!("no result frame")
    };
    assert_eq!(t.as_str(), r#"{"type":"result","output":{"async": "u"}}"#);

    let err = tokio_tungstenite::connect_async(srv.ws_url("/v1/agents/nope/entrypoints/x/ws"))
        .await
        .expect_err("refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status().as_u16(), 404)
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_bodies_get_413_and_the_server_stays_up() {
    let srv = app(fixture("compat"))
        .args(["--max-body-bytes", "2000"])
        .start()
        .await;
    let big = format!(
        r#"{{"entrypoint_tag":"echo","input_kwargs":{{"message":"{}"}}}}"#,
        "x".repeat(5000)
    );
    let (status, text) = post(&srv.url(&format!("/api/v1/agents/{COMPAT_ID}/run")), &big).await;
    assert_eq!(status, 413, "{text}");
    let big = format!(r#"{{"input":{{"message":"{}"}}}}"#, "x".repeat(5000));
    let (status, text) = post(
        &srv.url("/v1/agents/compat_fixture/entrypoints/echo/invoke"),
        &big,
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(json(&text)["error"]["code"], "payload_too_large");
    // Just under the limit still works.
    let ok = format!(r#"{{"input":{{"message":"{}"}}}}"#, "x".repeat(1500));
    let (status, _) = post(
        &srv.url("/v1/agents/compat_fixture/entrypoints/echo/invoke"),
        &ok,
    )
    .await;
    assert_eq!(status, 200);
    // A WebSocket message over the limit closes that connection with 1009 (too big), and the
    // server goes on.
    for path in [
        "/v1/agents/compat_fixture/entrypoints/echo_stream/ws".to_string(),
        format!("/api/v1/agents/{COMPAT_ID}/run-stream"),
    ] {
        let (mut ws, _) = tokio_tungstenite::connect_async(srv.ws_url(&path))
            .await
            .expect("connect");
        ws.send(Message::Text(big.clone().into()))
            .await
            .expect("send");
        let mut closed_with = None;
        while let Some(frame) = ws.next().await {
            match frame {
                Ok(Message::Close(Some(c))) => {
                    closed_with = Some(u16::from(c.code));
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        assert_eq!(closed_with, Some(1009), "{path}");
    }
    let (status, _) = post(
        &srv.url("/v1/agents/compat_fixture/entrypoints/echo/invoke"),
        &ok,
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_never_takes_the_server_down() {
    let srv = server(fixture("compat")).start();
    let run = srv.url(&format!("/api/v1/agents/{COMPAT_ID}/run"));
    let bodies: Vec<Vec<u8>> = vec![
        b"\xff\xfe\x00garbage".to_vec(),
        b"{\"entrypoint_tag\": \"echo\", \"input_kwargs\": {\"message\": \"\\ud800\"}}".to_vec(),
        b"{\"entrypoint_tag\": \"echo\", \"input_args\": [1,2,3,4,5,6,7,8,9], \"input_kwargs\": {}}".to_vec(),
        b"{\"entrypoint_tag\": \"echo\", \"entrypoint_tag\": \"add\"}".to_vec(),
        vec![b'['; 100_000],
        b"null".to_vec(),
        b"{\"entrypoint_tag\": \"echo\", \"input_kwargs\": {\"message\": 1e400}}".to_vec(),
    ];
    for body in bodies {
        let r = client()
            .post(&run)
            .body(body.clone())
            .send()
            .await
            .expect("answered");
        let status = r.status().as_u16();
        assert!(
            status == 200 || status == 422 || status == 404,
            "{status} for {:?}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
        r.text().await.expect("body");
    }
    // A lone surrogate in a result is escaped, not treated as a broken worker.
    let (status, body) = post(
        &run,
        r#"{"entrypoint_tag":"echo","input_kwargs":{"message":"\ud800"}}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("\"success\":true"), "{body}");
    assert!(
        !srv.log_text().contains("worker died"),
        "{}",
        srv.log_text()
    );
    // WebSocket garbage: binary junk.
    let (mut ws, _) = tokio_tungstenite::connect_async(
        srv.ws_url(&format!("/api/v1/agents/{COMPAT_ID}/run-stream")),
    )
    .await
    .expect("ws");
    ws.send(Message::Binary(vec![0xff, 0x00, 0x13].into()))
        .await
        .expect("send");
    let Some(Ok(Message::Text(t))) = ws.next().await else {
        panic!("no error frame")
    };
    assert!(t.contains("Invalid JSON format"), "{t}");
    let (status, body) = post(
        &srv.url("/v1/agents/compat_fixture/entrypoints/echo/invoke"),
        r#"{"input":{"message":"alive"}}"#,
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"output":{"message": "alive"}}"#)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invocation_history_is_recorded_and_served() {
    let srv = app(fixture("compat")).start().await;
    let run = srv.url(&format!("/api/v1/agents/{COMPAT_ID}/run"));
    post(
        &run,
        r#"{"entrypoint_tag":"echo","input_kwargs":{"message":"one"}}"#,
    )
    .await;
    post(
        &run,
        r#"{"entrypoint_tag":"boom","input_kwargs":{"message":"two"}}"#,
    )
    .await;
    let (status, text) =
        get(&srv.url(&format!("/api/v1/agents/{COMPAT_ID}/invocations?limit=10"))).await;
    assert_eq!(status, 200, "{text}");
    let v = json(&text);
    assert_eq!(v["total_count"], 2, "{text}");
    let list = v["invocations"].as_array().expect("list");
    let ok = list
        .iter()
        .find(|i| i["status"] == "completed")
        .expect("completed");
    assert_eq!(
        ok["input_data"],
        json!({"input_args": [], "input_kwargs": {"message": "one"}})
    );
    assert_eq!(ok["output_data"], json!({"message": "one"}));
    assert_eq!(ok["sdk_type"], "local_server");
    let failed = list
        .iter()
        .find(|i| i["status"] == "failed")
        .expect("failed");
    assert!(
        failed["error_detail"]
            .as_str()
            .unwrap_or_default()
            .ends_with("boom: two")
    );

    let (_, text) = get(&srv.url(&format!(
        "/api/v1/invocations/{}",
        ok["invocation_id"].as_str().unwrap_or_default()
    )))
    .await;
    assert_eq!(json(&text)["invocation_id"], ok["invocation_id"]);
    let (_, text) = get(&srv.url(&format!("/api/v1/agents/{COMPAT_ID}/invocations/stats"))).await;
    let stats = &json(&text)["stats"];
    assert_eq!(stats["total_invocations"], 2);
    assert_eq!(stats["completed_invocations"], 1);
    assert_eq!(stats["success_rate"], 50.0);
    let (status, text) =
        get(&srv.url(&format!("/api/v1/agents/{COMPAT_ID}/invocations?limit=x"))).await;
    assert_eq!(status, 422, "{text}");
}

fn sqlite_row(db: &std::path::Path, agent_id: &str) -> String {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); print(c.execute('select host,port,status from agents where agent_id=?',(sys.argv[2],)).fetchone())",
        ])
        .arg(db)
        .arg(agent_id)
        .output()
        .expect("python3");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runagent_discovery_row_points_at_us() {
    let cache = tempfile::tempdir().expect("cache");
    let srv = server(fixture("compat")).cache_dir(cache.path()).start();
    let row = sqlite_row(&cache.path().join("runagent_local.db"), COMPAT_ID);
    assert_eq!(row, format!("('127.0.0.1', {}, 'serving')", srv.port));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_port_runagents_policy_picks_8450_upward_skipping_recorded_ports() {
    let cache = tempfile::tempdir().expect("cache");
    // Another agent has 8450 recorded: RunAgent never hands that port out again.
    let first = server(fixture("faulty")).cache_dir(cache.path()).start();
    drop(first);
    let db = cache.path().join("runagent_local.db");
    let status = std::process::Command::new("python3")
        .args(["-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('update agents set port=8450'); c.commit()"])
        .arg(&db)
        .status()
        .expect("python3");
    assert!(status.success());
    let state = tempfile::tempdir().expect("state");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args([
            "serve",
            &fixture("compat").display().to_string(),
            "--workers",
            "1",
            "--state-dir",
        ])
        .arg(state.path())
        .env("RUNAGENT_CACHE_DIR", cache.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("serve");
    let mut port = None;
    for _ in 0..300 {
        let row = sqlite_row(&db, COMPAT_ID);
        if row.contains("serving") {
            port = row.split(", ").nth(1).and_then(|p| p.parse::<u16>().ok());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    let port = port.expect("registered");
    assert!(port > 8450, "port {port} should skip the recorded 8450");
}

#[tokio::test(flavor = "multi_thread")]
async fn several_agents_are_served_at_once() {
    let srv = app(fixture("compat"))
        .agent(fixture("faulty"))
        .start()
        .await;
    let (_, text) = get(&srv.url("/v1/agents")).await;
    assert_eq!(json(&text)["agents"].as_array().map(Vec::len), Some(2));
    let (s1, _) = post(
        &srv.url("/v1/agents/compat_fixture/entrypoints/echo/invoke"),
        r#"{"input":{"message":"a"}}"#,
    )
    .await;
    let (s2, _) = post(&srv.url("/v1/agents/faulty/entrypoints/ok/invoke"), "{}").await;
    let (s3, _) = post(
        &srv.url("/api/v1/agents/33333333-4444-5555-6666-777777777777/run"),
        r#"{"entrypoint_tag":"ok","input_kwargs":{}}"#,
    )
    .await;
    assert_eq!((s1, s2, s3), (200, 200, 200));
    let (status, text) = get(&srv.url("/readyz")).await;
    assert_eq!(status, 200, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn refuses_a_public_address_without_auth() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args([
            "serve",
            &fixture("compat").display().to_string(),
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("without authentication"));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_error_carries_the_request_id_of_its_header_and_its_log_line() {
    let srv = server(fixture("compat")).start();
    let client = client();
    let header = |r: &reqwest::Response| {
        r.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .expect("x-request-id")
    };
    // A native error: the body's id is the header's, and the log line of the request has it.
    let r = client
        .get(srv.url("/v1/agents/nobody"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 404);
    let id = header(&r);
    let body = json(&r.text().await.expect("body"));
    assert_eq!(body["error"]["request_id"], id.as_str());
    assert!(
        srv.wait_log(&id, Duration::from_secs(5)),
        "no log line names {id}:\n{}",
        srv.log_text()
    );
    // A client's own id is kept.
    let r = client
        .post(srv.url(&format!("/api/v1/agents/{COMPAT_ID}/run")))
        .header("x-request-id", "client-req-7")
        .json(&json!({"entrypoint_tag": "nope", "input_args": [], "input_kwargs": {}}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(header(&r), "client-req-7");
    let body = json(&r.text().await.expect("body"));
    assert_eq!(
        body["request_id"], "client-req-7",
        "RunAgent's envelope too"
    );
    // A success carries the client's id back; one that is not sane is not echoed.
    let r = client
        .get(srv.url("/v1/agents"))
        .header("x-request-id", "ok-id-1")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(header(&r), "ok-id-1");
    let r = client
        .get(srv.url("/v1/agents/nobody"))
        .header("x-request-id", "has space")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 404);
    assert_ne!(header(&r), "has space");
    // RunAgent's success envelope names the client's id when it sent one.
    let r = client
        .post(srv.url(&format!("/api/v1/agents/{COMPAT_ID}/run")))
        .header("x-request-id", "client-req-8")
        .json(
            &json!({"entrypoint_tag": "echo", "input_args": [], "input_kwargs": {"message": "hi"}}),
        )
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(header(&r), "client-req-8");
    assert_eq!(
        json(&r.text().await.expect("body"))["request_id"],
        "client-req-8"
    );
    // Refusals in front of the handler too.
    let r = client
        .post(srv.url("/v1/agents/compat_fixture/entrypoints/echo/invoke"))
        .body("{not json")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 422);
    let id = header(&r);
    assert_eq!(
        json(&r.text().await.expect("body"))["error"]["request_id"],
        id.as_str()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_application_stops_cleanly_and_closes_its_listener() {
    let app = app(fixture("durable")).start().await;
    let port = app.port;
    let r = client()
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status().as_u16(), 200);
    // `stop` asserts that `run_until_stopped` returned Ok after the shutdown sequence.
    app.stop().await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "nothing listens on {port} after the application stopped"
    );
}

/// RunAgent's current SDKs send `user_id` and `persistent_memory` with every request.
#[tokio::test(flavor = "multi_thread")]
async fn runagent_requests_with_user_id_and_persistent_memory_work_as_without() {
    let srv = app(fixture("compat")).start().await;
    let url = srv.url(&format!("/api/v1/agents/{COMPAT_ID}/run"));
    let plain =
        json!({"entrypoint_tag": "echo", "input_args": [], "input_kwargs": {"message": "hi"}});
    let mut extra = plain.clone();
    extra["user_id"] = json!("user-1");
    extra["persistent_memory"] = json!(true);
    let (a, a_text) = post(&url, &plain.to_string()).await;
    let (b, b_text) = post(&url, &extra.to_string()).await;
    assert_eq!((a, b), (200, 200), "{a_text} / {b_text}");
    let (a, b) = (json(&a_text), json(&b_text));
    assert_eq!(a["success"], true, "{a}");
    assert_eq!(
        (&a["success"], &a["output_data"]),
        (&b["success"], &b["output_data"])
    );
    // The WebSocket stream, with the same fields in its start message.
    let (mut ws, _) = tokio_tungstenite::connect_async(
        srv.ws_url(&format!("/api/v1/agents/{COMPAT_ID}/run-stream")),
    )
    .await
    .expect("ws");
    let start = json!({"entrypoint_tag": "echo_stream", "input_args": [], "input_kwargs": {"message": "hi", "n": 3},
        "user_id": "user-1", "persistent_memory": true});
    ws.send(Message::Text(start.to_string().into()))
        .await
        .expect("send");
    let mut chunks = 0;
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            if t.contains("\"type\":\"data\"") {
                chunks += 1;
            }
            if t.contains("stream_completed") {
                break;
            }
            assert!(!t.contains("\"type\":\"error\""), "{t}");
        }
    }
    assert_eq!(chunks, 3);
    // The history keeps each call's user_id in its client_info.
    let history = srv.url(&format!("/api/v1/agents/{COMPAT_ID}/invocations?limit=10"));
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let rows = loop {
        let (status, text) = get(&history).await;
        assert_eq!(status, 200, "{text}");
        let rows = json(&text)["invocations"].clone();
        if rows.as_array().is_some_and(|r| r.len() >= 3) || std::time::Instant::now() > end {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let users: Vec<(String, serde_json::Value)> = rows
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            let user = r["client_info"]["user_id"].clone();
            (r["sdk_type"].as_str().unwrap_or_default().to_string(), user)
        })
        .collect();
    let with_user = |sdk: &str| {
        users
            .iter()
            .filter(|(s, u)| s == sdk && *u == json!("user-1"))
            .count()
    };
    assert_eq!(users.len(), 3, "{rows}");
    assert_eq!(with_user("local_server"), 1, "{rows}");
    assert_eq!(with_user("websocket_stream"), 1, "{rows}");
}

#[tokio::test(flavor = "multi_thread")]
async fn invocation_history_is_kept_within_its_row_bound() {
    let tmp = tempfile::tempdir().expect("tmp");
    let db = tmp.path().join("runagent_local.db");
    let srv = app(fixture("compat"))
        .args(["--runagent-history-max-rows", "20"])
        .args(["--runagent-db", db.to_str().expect("path")])
        .start()
        .await;
    // Rows of an agent served elsewhere (RunAgent's database is shared), old ones too: never
    // ours to prune.
    let sql = |q: &str| {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); r=c.execute(sys.argv[2]).fetchall(); c.commit(); print(r)",
            ])
            .arg(&db)
            .arg(q)
            .output()
            .expect("python3");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    sql(
        "INSERT INTO agent_invocations (invocation_id, agent_id, input_data, request_timestamp, status) \
         SELECT 'foreign-' || value, 'someone-else', '{}', '2020-01-01 00:00:00.000000', 'completed' \
         FROM json_each('[1,2,3,4,5,6,7,8,9,10]')",
    );
    let run = srv.url(&format!("/api/v1/agents/{COMPAT_ID}/run"));
    for i in 0..60 {
        let body = json!({"entrypoint_tag": "echo", "input_kwargs": {"message": format!("m{i}")}});
        assert_eq!(post(&run, &body.to_string()).await.0, 200);
    }
    let list = srv.url(&format!(
        "/api/v1/agents/{COMPAT_ID}/invocations?limit=1000"
    ));
    let (status, text) = get(&list).await;
    assert_eq!(status, 200, "{text}");
    let v = json(&text);
    let total = v["total_count"].as_u64().expect("count");
    assert!((1..=20).contains(&total), "{total} rows kept");
    // The newest are the ones kept.
    assert!(text.contains("\"m59\""), "{text}");
    assert!(!text.contains("\"m0\""), "{text}");
    assert_eq!(
        sql("SELECT count(*) FROM agent_invocations WHERE agent_id = 'someone-else'"),
        "[(10,)]",
        "another server's rows are left alone"
    );
    // A page larger than the bound the API allows is refused, as FastAPI would.
    let (status, text) = get(&srv.url(&format!(
        "/api/v1/agents/{COMPAT_ID}/invocations?limit=100000"
    )))
    .await;
    assert_eq!(status, 422, "{text}");
    let (status, _) =
        get(&srv.url(&format!("/api/v1/agents/{COMPAT_ID}/invocations?limit=-1"))).await;
    assert_eq!(status, 422);
}
