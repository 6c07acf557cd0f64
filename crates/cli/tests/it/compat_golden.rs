//! Replays every request captured from RunAgent 0.1.49's own server (tests/compat/golden.json,
//! made by tests/compat/capture_golden.py) against `agentry serve`, and compares status codes,
//! headers and bodies byte for byte. Only values that differ on every call are redacted:
//! timestamps, request and invocation ids, durations, the port, and object addresses. The
//! application runs in the test process (`TestApp`).

use crate::common::app::TestApp;
use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn redact(text: &str) -> String {
    let rules = [
        (r#""timestamp":"[^"]*""#, r#""timestamp":"T""#),
        (r#""request_id":"[0-9a-f-]{36}""#, r#""request_id":"R""#),
        (
            r#""invocation_id":"[0-9a-f-]{36}""#,
            r#""invocation_id":"I""#,
        ),
        (r#""execution_time":[0-9.e+-]+"#, r#""execution_time":0"#),
        (r#""uptime_seconds":[0-9.e+-]+"#, r#""uptime_seconds":0"#),
        (r#""port":\d+"#, r#""port":0"#),
        (r"at 0x[0-9a-f]+", "at 0xADDR"),
    ];
    let mut out = text.to_string();
    for (pattern, replacement) in rules {
        out = regex::Regex::new(pattern)
            .expect("regex")
            .replace_all(&out, replacement)
            .into_owned();
    }
    out
}

fn golden() -> serde_json::Value {
    let text =
        std::fs::read_to_string(repo_root().join("tests/compat/golden.json")).expect("golden.json");
    json(&text)
}

#[tokio::test(flavor = "multi_thread")]
async fn http_responses_match_runagent_byte_for_byte() {
    let srv = TestApp::serve(fixture("compat")).await;
    let golden = golden();
    let client = client();
    let mut failures = Vec::new();
    for case in golden["http"].as_array().expect("http cases") {
        let name = case["name"].as_str().unwrap_or_default();
        let method =
            reqwest::Method::from_bytes(case["method"].as_str().unwrap_or("GET").as_bytes())
                .expect("method");
        let mut req = client.request(method, srv.url(case["path"].as_str().unwrap_or("/")));
        if let Some(body) = case["body"].as_str() {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let allow = resp
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap_or_default().to_string());
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap_or_default().to_string());
        let body = resp.text().await.expect("body");
        if u64::from(status) != case["status"].as_u64().unwrap_or_default() {
            failures.push(format!(
                "{name}: status {status}, RunAgent {}\n  ours: {body}",
                case["status"]
            ));
            continue;
        }
        if allow.as_deref() != case["allow"].as_str() {
            failures.push(format!(
                "{name}: allow {allow:?}, RunAgent {:?}",
                case["allow"]
            ));
        }
        if content_type.as_deref() != case["content_type"].as_str() {
            failures.push(format!(
                "{name}: content-type {content_type:?}, RunAgent {:?}",
                case["content_type"]
            ));
        }
        let theirs = redact(case["response"].as_str().unwrap_or_default());
        let ours = redact(&body);
        if theirs != ours {
            failures.push(format!("{name}:\n  RunAgent: {theirs}\n  Agentry:  {ours}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_frames_match_runagent() {
    let srv = TestApp::serve(fixture("compat")).await;
    let golden = golden();
    let mut failures = Vec::new();
    for case in golden["ws"].as_array().expect("ws cases") {
        let name = case["name"].as_str().unwrap_or_default();
        let (mut ws, _) =
            tokio_tungstenite::connect_async(srv.ws_url(case["path"].as_str().unwrap_or("/")))
                .await
                .expect("connect");
        ws.send(Message::Text(
            case["send"].as_str().unwrap_or_default().into(),
        ))
        .await
        .expect("send");
        let mut frames = Vec::new();
        let mut close_code = None;
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(20), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => frames.push(t.to_string()),
                Ok(Some(Ok(Message::Close(frame)))) => {
                    close_code = frame.map(|f| u16::from(f.code));
                    break;
                }
                Ok(Some(Ok(_))) => {}
                Ok(None) | Ok(Some(Err(_))) => break,
                Err(_) => {
                    failures.push(format!("{name}: no close within 20 s"));
                    break;
                }
            }
        }
        let theirs: Vec<String> = case["frames"]
            .as_array()
            .expect("frames")
            .iter()
            .map(|f| redact(f.as_str().unwrap_or_default()))
            .collect();
        let ours: Vec<String> = frames.iter().map(|f| redact(f)).collect();
        if theirs != ours {
            failures.push(format!(
                "{name}:\n  RunAgent: {theirs:?}\n  Agentry:  {ours:?}"
            ));
        }
        // RunAgent leaves the socket open after the terminal frame ("open"); we close with 1000.
        let expected = match &case["close_code"] {
            serde_json::Value::Number(n) => n.as_u64().map(|n| n as u16),
            _ => Some(1000),
        };
        if close_code != expected {
            failures.push(format!(
                "{name}: closed with {close_code:?}, expected {expected:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // An agent id we do not serve: the handshake is refused with 403, as RunAgent does.
    let err = tokio_tungstenite::connect_async(srv.ws_url("/api/v1/agents/nope/run-stream"))
        .await
        .expect_err("must refuse");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status().as_u16(), 403)
        }
        other => panic!("expected HTTP 403, got {other:?}"),
    }
}
