//! The OpenAPI description: generated from the router (every documented operation is served;
//! every native route is documented by construction), per-entrypoint paths with schemas and
//! docstrings, a snapshot of the whole document, and Swagger UI served from the binary.

use std::time::Duration;

use crate::common::app::app;
use crate::common::*;
use serde_json::Value;

async fn spec(srv: &impl Served) -> Value {
    let (status, text) = get(&srv.url("/openapi.json")).await;
    assert_eq!(status, 200, "{text}");
    json(&text)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_spec_matches_its_snapshot() {
    let srv = app(fixture("typed")).start().await;
    let spec = spec(&srv).await;
    assert_eq!(spec["openapi"], "3.1.0");
    // `cargo insta review` after an intended change; CI (CI=true) fails on any difference.
    insta::assert_json_snapshot!("openapi", spec);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_operation_is_served() {
    let srv = app(fixture("typed")).start().await;
    let spec = spec(&srv).await;
    let paths = spec["paths"].as_object().expect("paths");
    assert!(paths.len() >= 20, "{}", paths.len());
    let client = client();
    for (path, item) in paths {
        // Placeholders for path parameters: an unknown run is a typed 404, not a missing route.
        let url = srv.url(
            &path
                .replace("{agent}", "typed_fixture")
                .replace("{tag}", "profile")
                .replace("{id}", "run_nope"),
        );
        for method in item.as_object().expect("item").keys() {
            let req = match method.as_str() {
                "get" => client.get(&url),
                "post" => client.post(&url).body("{}"),
                "delete" => client.delete(&url),
                "patch" => client
                    .patch(&url)
                    .header("content-type", "application/json")
                    .body("{}"),
                other => panic!("unexpected method {other} on {path}"),
            };
            let resp = req.send().await.expect("request");
            let status = resp.status().as_u16();
            // An endless stream (the event bus) is not read to its end.
            let streaming = resp
                .headers()
                .get("content-type")
                .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
            let text = if streaming && path == "/v1/events" {
                String::new()
            } else {
                resp.text().await.unwrap_or_default()
            };
            assert!(
                !text.contains("no such route"),
                "{method} {path} is documented but not served: {status} {text}"
            );
            assert_ne!(status, 405, "{method} {path}: {text}");
            // Every documented status of the operation includes the one we got.
            let documented = item[method]["responses"].as_object().expect("responses");
            assert!(
                documented.contains_key(&status.to_string()),
                "{method} {path} answered {status}, documented {:?}",
                documented.keys().collect::<Vec<_>>()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_entrypoint_has_its_own_path_with_schema_and_docstring() {
    let srv = app(fixture("typed")).start().await;
    let spec = spec(&srv).await;
    let profile = &spec["paths"]["/v1/agents/typed_fixture/entrypoints/profile/invoke"]["post"];
    assert_eq!(profile["summary"], "Describe a person.");
    assert!(
        profile["description"]
            .as_str()
            .unwrap_or_default()
            .contains("exactly what the coercions delivered"),
        "{profile}"
    );
    assert_eq!(profile["tags"][0], "entrypoints");
    let body = &profile["requestBody"];
    assert_eq!(body["required"], true);
    let schema = &body["content"]["application/json"]["schema"];
    let input = &schema["properties"]["input"]["anyOf"][0];
    assert_eq!(input["properties"]["age"]["type"], "integer");
    assert_eq!(input["properties"]["mode"]["enum"][1], "long");
    assert_eq!(
        schema["properties"]["args"]["prefixItems"][0]["type"],
        "string"
    );
    // The 200 and the errors are the generic operation's.
    assert!(profile["responses"]["422"].is_object() && profile["responses"]["200"].is_object());
    // A streaming tag is documented under /stream only.
    let paths = spec["paths"].as_object().expect("paths");
    assert!(paths.contains_key("/v1/agents/typed_fixture/entrypoints/count_stream/stream"));
    assert!(!paths.contains_key("/v1/agents/typed_fixture/entrypoints/count_stream/invoke"));
    // Errors are one schema, listing every code.
    let codes = &spec["components"]["schemas"]["ErrorBody"]["properties"]["code"]["enum"];
    for code in [
        "authentication_error",
        "validation_error",
        "agent_error",
        "upgrade_required",
    ] {
        assert!(
            codes.as_array().is_some_and(|c| c.contains(&code.into())),
            "{code}: {codes}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn swagger_ui_is_served_from_the_binary_and_the_spec_needs_a_key() {
    let state = tempfile::tempdir().expect("state");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["keys", "create", "--scope", "runs:read", "--state-dir"])
        .arg(state.path())
        .output()
        .expect("keys create");
    let key = json(&String::from_utf8_lossy(&out.stdout))["key"]
        .as_str()
        .expect("key")
        .to_string();
    let srv = server(fixture("typed")).state_dir(state.path()).start();
    assert!(srv.wait_log("authentication is on", Duration::from_secs(5)));

    // The UI's files are public and carry no data.
    let (status, html) = get(&srv.url("/docs/")).await;
    assert_eq!(status, 200);
    assert!(html.contains("swagger-ui"), "{html}");
    let (status, init) = get(&srv.url("/docs/swagger-initializer.js")).await;
    assert_eq!(status, 200);
    assert!(init.contains("\"url\": \"/openapi.json\""), "{init}");
    assert!(!init.contains("queryConfigEnabled\": true"), "{init}");
    let (status, css) = get(&srv.url("/docs/swagger-ui.css")).await;
    assert_eq!(status, 200);
    assert!(css.len() > 10_000);

    // The spec needs a key: Bearer, or a query token (what the UI's top bar can send).
    let (status, _) = get(&srv.url("/openapi.json")).await;
    assert_eq!(status, 401);
    let (status, _) = get(&srv.url("/openapi.json?token=ak_bogus_bogus")).await;
    assert_eq!(status, 401);
    let (status, text) = get(&srv.url(&format!("/openapi.json?token={key}"))).await;
    assert_eq!(status, 200);
    assert_eq!(json(&text)["openapi"], "3.1.0");
    let resp = client()
        .get(srv.url("/openapi.json"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    // Query tokens are taken nowhere else.
    let (status, _) = get(&srv.url(&format!("/v1/runs?token={key}"))).await;
    assert_eq!(status, 401);
    assert!(!srv.log_text().contains(&key), "the key reached the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_routes_refuse_plain_http_with_426() {
    let srv = app(fixture("typed")).start().await;
    for path in [
        "/v1/agents/typed_fixture/entrypoints/count_stream/ws",
        "/v1/runs/run_nope/events/ws",
    ] {
        let (status, text) = get(&srv.url(path)).await;
        let v = json(&text);
        if path.starts_with("/v1/runs") {
            // The run is looked up first.
            assert_eq!(
                (status, &v["error"]["code"]),
                (404, &"run_not_found".into()),
                "{text}"
            );
        } else {
            assert_eq!(
                (status, &v["error"]["code"]),
                (426, &"upgrade_required".into()),
                "{text}"
            );
        }
    }
}
