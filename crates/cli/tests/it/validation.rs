//! Input validation before Python: every native invoke, stream, WebSocket call and run input is
//! checked against the entrypoint's schema (422 naming each field), with the documented safe
//! coercions applied; the RunAgent routes pass input through untouched. The application runs in
//! the test process (`TestApp`).

use crate::common::app::TestApp;
use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const PROFILE: &str = "/v1/agents/typed_fixture/entrypoints/profile/invoke";

fn typed() -> std::path::PathBuf {
    fixture("typed")
}

async fn invoke(srv: &TestApp, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = post(&srv.url(path), &body.to_string()).await;
    (status, json(&text))
}

#[tokio::test(flavor = "multi_thread")]
async fn safe_coercions_reach_python_as_the_declared_types() {
    let srv = TestApp::serve(typed()).await;
    let (status, v) = invoke(
        &srv,
        PROFILE,
        json!({"input": {"name": "ada", "age": "36", "height": "1.65", "active": "yes",
                         "tags": ["a"], "scores": {"x": 2.0}, "limit": "10"}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let out = &v["output"];
    assert_eq!(
        out["values"],
        json!({"name": "ada", "age": 36, "height": 1.65, "active": true, "tags": ["a"],
               "scores": {"x": 2}, "mode": "short", "limit": 10})
    );
    assert_eq!(
        out["types"],
        json!({"name": "str", "age": "int", "height": "float", "active": "bool", "tags": "list",
               "scores": "dict", "mode": "str", "limit": "int"})
    );
    // Values that already fit are passed as they are: an int for a float stays an int, and
    // `None` for an Optional stays None.
    let (status, v) = invoke(
        &srv,
        PROFILE,
        json!({"input": {"name": "x", "age": 1, "height": 2, "active": 0, "limit": null}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["output"]["types"]["height"], "int");
    assert_eq!(v["output"]["values"]["active"], false);
    assert_eq!(v["output"]["types"]["limit"], "NoneType");
    // Positional arguments are checked and coerced against the parameters they land on.
    let (status, v) = invoke(&srv, PROFILE, json!({"args": ["pos", "7"]})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["output"]["values"]["age"], 7);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_422_names_each_failing_field_before_python_runs() {
    let srv = TestApp::serve(typed()).await;
    let (status, v) = invoke(
        &srv,
        PROFILE,
        json!({"input": {"age": "thirty", "height": "tall", "active": 2, "tags": ["a", 3],
                         "scores": {"x": "many"}, "mode": "medium", "limit": 1.5, "extra": 1}}),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"]["code"], "validation_error");
    let errors = v["error"]["details"]["errors"].as_array().expect("errors");
    let got: Vec<(&str, &str, &str)> = errors
        .iter()
        .map(|e| {
            (
                e["path"].as_str().unwrap_or_default(),
                e["kind"].as_str().unwrap_or_default(),
                e["expected"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("input.name", "missing", "string"),
            ("input.age", "type", "integer"),
            ("input.height", "type", "number"),
            ("input.active", "type", "boolean"),
            ("input.tags[1]", "type", "string"),
            ("input.scores.x", "type", "integer"),
            ("input.mode", "enum", "one of [\"short\",\"long\"]"),
            ("input.limit", "type", "integer or null"),
            ("input.extra", "unknown", "no such parameter"),
        ]
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("input.name is required"),
        "{v}"
    );
    // Too many positional arguments, and one given twice.
    let (status, v) = invoke(
        &srv,
        PROFILE,
        json!({"args": [1, 2, 3.5, true, [], {}, "short", null, 9]}),
    )
    .await;
    assert_eq!(status, 422);
    let errors = &v["error"]["details"]["errors"];
    assert_eq!(errors[0]["path"], "args[0]");
    assert_eq!(errors[0]["expected"], "string");
    assert_eq!(errors[1]["path"], "args[8]");
    assert_eq!(errors[1]["kind"], "arity");
    assert!(errors.get(2).is_none(), "{errors}");
    let (status, v) = invoke(
        &srv,
        PROFILE,
        json!({"args": ["a"], "input": {"name": "b", "age": 1}}),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(v["error"]["details"]["errors"][0]["kind"], "arity");
    // `*args, **kwargs` take anything.
    let (status, v) = invoke(
        &srv,
        "/v1/agents/typed_fixture/entrypoints/anything/invoke",
        json!({"args": [1, "2"], "input": {"k": [true]}}),
    )
    .await;
    assert_eq!(
        (status, &v["output"]),
        (200, &json!({"args": [1, "2"], "kwargs": {"k": [true]}}))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_websockets_and_runs_are_validated_too() {
    let srv = TestApp::serve(typed()).await;
    // SSE: a bad input is a plain 422 before any event.
    let (status, text) = post(
        &srv.url("/v1/agents/typed_fixture/entrypoints/count_stream/stream"),
        r#"{"input": {"n": "lots"}}"#,
    )
    .await;
    assert_eq!(status, 422, "{text}");
    assert_eq!(
        json(&text)["error"]["details"]["errors"][0]["path"],
        "input.n"
    );
    // A coerced one streams.
    let (status, text) = post(
        &srv.url("/v1/agents/typed_fixture/entrypoints/count_stream/stream"),
        r#"{"input": {"n": "2"}}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        text.contains("data: \"0\"")
            && text.contains("data: \"1\"")
            && !text.contains("data: \"2\""),
        "{text}"
    );

    // WebSocket: the error frame carries the same details.
    let (mut ws, _) = tokio_tungstenite::connect_async(
        srv.ws_url("/v1/agents/typed_fixture/entrypoints/count_stream/ws"),
    )
    .await
    .expect("connect");
    ws.send(Message::Text(r#"{"input": {"n": [1]}}"#.into()))
        .await
        .expect("send");
    let frame = ws.next().await.expect("frame").expect("frame");
    let v = json(frame.to_text().unwrap_or_default());
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["code"], "validation_error");
    assert_eq!(v["error"]["details"]["errors"][0]["path"], "input.n");

    // Runs: refused at enqueue (nothing stored), and stored coerced when accepted.
    let (status, text) = post(
        &srv.url("/v1/runs"),
        &json!({"agent": "typed_fixture", "entrypoint": "profile", "input": {"name": "x", "age": "old"}}).to_string(),
    )
    .await;
    assert_eq!(status, 422, "{text}");
    assert_eq!(
        json(&text)["error"]["details"]["errors"][0]["path"],
        "input.age"
    );
    let (_, text) = get(&srv.url("/v1/runs")).await;
    assert_eq!(
        json(&text)["runs"],
        json!([]),
        "a refused run is not stored"
    );
    let (status, text) = post(
        &srv.url("/v1/runs/wait"),
        &json!({"agent": "typed_fixture", "entrypoint": "profile", "input": {"name": "x", "age": "41"}}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let run = json(&text);
    assert_eq!(run["input"]["age"], 41);
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"]["types"]["age"], "int");
}

#[tokio::test(flavor = "multi_thread")]
async fn runagent_routes_pass_input_through_uncoerced() {
    let srv = TestApp::serve(typed()).await;
    let (status, text) = post(
        &srv.url("/api/v1/agents/33333333-4444-5555-6666-777777777777/run"),
        &json!({"entrypoint_tag": "profile", "input_args": [], "input_kwargs": {"name": "x", "age": "41"}}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v = json(&text);
    assert_eq!(v["success"], true, "{v}");
    // RunAgent's envelope: `data` is JSON text whose `payload` is JSON text.
    let data = json(v["data"].as_str().unwrap_or_default());
    let payload = json(data["payload"].as_str().unwrap_or_default());
    assert_eq!(payload["types"]["age"], "str", "{v}");
}
