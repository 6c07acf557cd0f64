//! API keys end to end: scopes, agent limits, revocation, expiry, WebSocket tokens, the admin
//! routes, and that a key never reaches the log.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::app::{TestApp, app};
use crate::common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};

fn durable() -> std::path::PathBuf {
    fixture("durable")
}

/// `agentry keys create` offline in `state`; returns the key.
fn make_key(state: &Path, args: &[&str]) -> String {
    let mut all: Vec<std::ffi::OsString> = vec!["--state-dir".into(), state.into()];
    all.extend(args.iter().map(Into::into));
    create_key(&all)
}

async fn call(method: &str, url: &str, key: Option<&str>, body: Option<Value>) -> (u16, String) {
    let c = client();
    let mut req = match method {
        "POST" => c.post(url),
        "DELETE" => c.delete(url),
        _ => c.get(url),
    };
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread")]
async fn each_scope_allows_exactly_its_routes() {
    let state = tempfile::tempdir().expect("state");
    let invoke = make_key(state.path(), &["--scope", "invoke"]);
    let read = make_key(state.path(), &["--scope", "runs:read"]);
    let write = make_key(state.path(), &["--scope", "runs:write"]);
    let admin = make_key(state.path(), &["--scope", "admin", "--name", "ops"]);
    let srv = server(durable())
        .agent(fixture("compat"))
        .state_dir(state.path())
        .start();
    assert!(srv.wait_log(
        "authentication is on: 4 active API key(s)",
        Duration::from_secs(5)
    ));

    let compat_run = format!("/api/v1/agents/{COMPAT_ID}/run");
    let compat_body =
        json!({"entrypoint_tag": "echo", "input_args": [], "input_kwargs": {"message": "hi"}});
    let run_body = json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}});
    // (method, path, body, expected status for: none, invoke, runs:read, runs:write, admin)
    let matrix: Vec<(&str, String, Option<Value>, [u16; 5])> = vec![
        ("GET", "/healthz".into(), None, [200, 200, 200, 200, 200]),
        ("GET", "/readyz".into(), None, [200, 200, 200, 200, 200]),
        ("GET", "/v1/agents".into(), None, [401, 200, 200, 200, 200]),
        (
            "POST",
            "/v1/agents/durable/entrypoints/work/invoke".into(),
            Some(json!({"input": {"i": 1}})),
            [401, 200, 403, 403, 200],
        ),
        (
            "POST",
            compat_run.clone(),
            Some(compat_body.clone()),
            [401, 200, 403, 403, 200],
        ),
        (
            "GET",
            "/api/v1/health".into(),
            None,
            [401, 200, 403, 403, 200],
        ),
        (
            "POST",
            "/v1/runs".into(),
            Some(run_body.clone()),
            [401, 403, 403, 202, 202],
        ),
        ("GET", "/v1/runs".into(), None, [401, 403, 200, 403, 200]),
        ("GET", "/v1/keys".into(), None, [401, 403, 403, 403, 200]),
        ("GET", "/v1/nope".into(), None, [401, 404, 404, 404, 404]),
    ];
    let keys = [
        None,
        Some(invoke.as_str()),
        Some(read.as_str()),
        Some(write.as_str()),
        Some(admin.as_str()),
    ];
    for (method, path, body, expected) in &matrix {
        for (key, want) in keys.iter().zip(expected) {
            let (got, text) = call(method, &srv.url(path), *key, body.clone()).await;
            assert_eq!(
                got,
                *want,
                "{method} {path} with {:?}: {text}",
                key.map(|k| &k[..13])
            );
            if got == 401 && path.starts_with("/v1") {
                assert_eq!(json(&text)["error"]["code"], "authentication_error");
            }
            if got == 403 && path.starts_with("/v1") {
                assert_eq!(json(&text)["error"]["code"], "permission_error");
            }
        }
    }
    // RunAgent's routes refuse as FastAPI would, and every 401 names the scheme.
    let r = client()
        .post(srv.url(&compat_run))
        .json(&compat_body)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(
        r.headers().get("www-authenticate").map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );
    assert!(json(&r.text().await.expect("body"))["detail"].is_string());
    // A malformed or unknown key is refused the same way.
    for bad in ["nonsense", "ak_x_y", &format!("{invoke}x")] {
        let (status, _) = call("GET", &srv.url("/v1/agents"), Some(bad), None).await;
        assert_eq!(status, 401, "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_and_expired_keys_are_refused_and_keys_never_reach_the_log() {
    let state = tempfile::tempdir().expect("state");
    let doomed = make_key(state.path(), &["--scope", "invoke"]);
    let short = make_key(state.path(), &["--scope", "invoke", "--expires", "2s"]);
    let srv = server(durable()).state_dir(state.path()).start();
    let url = srv.url("/v1/agents/durable/entrypoints/work/invoke");
    let body = Some(json!({"input": {"i": 1}}));
    assert_eq!(call("POST", &url, Some(&doomed), body.clone()).await.0, 200);
    assert_eq!(call("POST", &url, Some(&short), body.clone()).await.0, 200);
    // Revoked offline while the server runs: refused within seconds.
    let id = agentry_core_key_id(&doomed);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["keys", "revoke", &id, "--state-dir"])
        .arg(state.path())
        .output()
        .expect("revoke");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = call("POST", &url, Some(&doomed), body.clone()).await;
        if status == 401 {
            break;
        }
        assert!(Instant::now() < end, "the revoked key still works");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Expired.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(call("POST", &url, Some(&short), body.clone()).await.0, 401);
    // The list shows ids and state, never keys; last use was recorded.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentry"))
        .args(["keys", "list", "--state-dir"])
        .arg(state.path())
        .output()
        .expect("list");
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!listed.contains(&doomed) && !listed.contains(&short));
    let keys = json(&listed);
    let doomed_row = keys["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["id"] == id)
        .cloned()
        .expect("row");
    assert_eq!(doomed_row["active"], false);
    assert!(doomed_row["revoked_at"].is_string());
    // A wrong key in a query string or header never shows up in the log either.
    let _ = call(
        "GET",
        &srv.url(&format!("/v1/agents?token={doomed}")),
        Some(&short),
        None,
    )
    .await;
    let log = srv.log_text();
    for k in [&doomed, &short] {
        let secret = &k[k.len() - 32..];
        assert!(!log.contains(secret), "a key reached the log");
    }
}

fn agentry_core_key_id(token: &str) -> String {
    // ak_<id>_<secret>
    let rest = &token[3..];
    let id = rest.split('_').next().expect("id");
    format!("ak_{id}")
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_limited_to_agents_and_websocket_tokens() {
    let state = tempfile::tempdir().expect("state");
    let limited = make_key(
        state.path(),
        &[
            "--scope",
            "invoke",
            "--scope",
            "runs:read",
            "--scope",
            "runs:write",
            "--agent",
            "durable",
        ],
    );
    let admin = make_key(state.path(), &["--scope", "admin"]);
    let srv = app(durable())
        .agent(fixture("compat"))
        .state_dir(state.path())
        .start()
        .await;
    let ok = call(
        "POST",
        &srv.url("/v1/agents/durable/entrypoints/work/invoke"),
        Some(&limited),
        Some(json!({"input": {"i": 1}})),
    )
    .await;
    assert_eq!(ok.0, 200);
    let (status, text) = call(
        "POST",
        &srv.url("/v1/agents/compat_fixture/entrypoints/echo/invoke"),
        Some(&limited),
        Some(json!({"input": {"message": "x"}})),
    )
    .await;
    assert_eq!(status, 403, "{text}");
    let (status, _) = call(
        "POST",
        &srv.url(&format!("/api/v1/agents/{COMPAT_ID}/run")),
        Some(&limited),
        Some(json!({"entrypoint_tag": "echo", "input_args": [], "input_kwargs": {"message": "x"}})),
    )
    .await;
    assert_eq!(status, 403);
    // Runs: create only for its agent; other agents' runs do not exist for it.
    let (status, _) = call(
        "POST",
        &srv.url("/v1/runs"),
        Some(&limited),
        Some(json!({"agent": "compat_fixture", "entrypoint": "echo", "input": {"message": "x"}})),
    )
    .await;
    assert_eq!(status, 403);
    let (status, text) = call(
        "POST",
        &srv.url("/v1/runs"),
        Some(&admin),
        Some(json!({"agent": "compat_fixture", "entrypoint": "echo", "input": {"message": "x"}})),
    )
    .await;
    assert_eq!(status, 202, "{text}");
    let other = json(&text)["id"].as_str().expect("id").to_string();
    assert_eq!(
        call(
            "GET",
            &srv.url(&format!("/v1/runs/{other}")),
            Some(&limited),
            None
        )
        .await
        .0,
        404
    );
    assert_eq!(
        call(
            "POST",
            &srv.url(&format!("/v1/runs/{other}/cancel")),
            Some(&limited),
            None
        )
        .await
        .0,
        404
    );
    assert_eq!(
        call("GET", &srv.url("/v1/runs"), Some(&limited), None)
            .await
            .0,
        403
    );
    assert_eq!(
        call(
            "GET",
            &srv.url("/v1/runs?agent=durable"),
            Some(&limited),
            None
        )
        .await
        .0,
        200
    );

    // WebSockets: the key as ?token= (browsers cannot set headers there).
    let path = "/v1/agents/durable/entrypoints/counts_stream/ws";
    assert!(
        tokio_tungstenite::connect_async(srv.ws_url(path))
            .await
            .is_err(),
        "no key: refused"
    );
    let (mut ws, _) =
        tokio_tungstenite::connect_async(srv.ws_url(&format!("{path}?token={limited}")))
            .await
            .expect("ws with token");
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        json!({"input": {"n": 2}}).to_string().into(),
    ))
    .await
    .expect("start");
    let mut chunks = 0;
    while let Some(Ok(msg)) = ws.next().await {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg
            && json(&t)["type"] == "chunk"
        {
            chunks += 1;
        }
    }
    assert_eq!(chunks, 2);
    // A token in the query string of a plain request is not accepted.
    assert_eq!(
        call(
            "GET",
            &srv.url(&format!("/v1/agents?token={limited}")),
            None,
            None
        )
        .await
        .0,
        401
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_managed_over_http_by_admins() {
    let state = tempfile::tempdir().expect("state");
    let admin = make_key(state.path(), &["--scope", "admin"]);
    let srv = app(durable()).state_dir(state.path()).start().await;
    let (status, text) = call(
        "POST",
        &srv.url("/v1/keys"),
        Some(&admin),
        Some(json!({"name": "ci", "scopes": ["invoke"], "expires_in_s": 3600})),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let created = json(&text);
    let key = created["key"].as_str().expect("key").to_string();
    let id = created["id"].as_str().expect("id").to_string();
    assert!(created["expires_at"].is_string());
    let url = srv.url("/v1/agents/durable/entrypoints/work/invoke");
    assert_eq!(
        call("POST", &url, Some(&key), Some(json!({"input": {"i": 1}})))
            .await
            .0,
        200
    );
    let listed = call("GET", &srv.url("/v1/keys"), Some(&admin), None)
        .await
        .1;
    assert!(!listed.contains(&key), "lists never show keys");
    assert_eq!(json(&listed)["keys"].as_array().map(Vec::len), Some(2));
    for bad in [
        json!({"scopes": []}),
        json!({"scopes": ["root"]}),
        json!({"scopes": ["invoke"], "bogus": 1}),
    ] {
        let (status, _) = call(
            "POST",
            &srv.url("/v1/keys"),
            Some(&admin),
            Some(bad.clone()),
        )
        .await;
        assert_eq!(status, 422, "{bad}");
    }
    let (status, text) = call(
        "DELETE",
        &srv.url(&format!("/v1/keys/{id}")),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["active"], false);
    // Revoked through the API: refused at once.
    assert_eq!(
        call("POST", &url, Some(&key), Some(json!({"input": {"i": 1}})))
            .await
            .0,
        401
    );
    assert_eq!(
        call("DELETE", &srv.url("/v1/keys/ak_nope"), Some(&admin), None)
            .await
            .0,
        404
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_required_refuses_everything_until_a_key_exists() {
    let srv = server(durable()).args(["--auth", "required"]).start();
    assert_eq!(get(&srv.url("/healthz")).await.0, 200);
    assert_eq!(get(&srv.url("/v1/agents")).await.0, 401);
    // Without keys and without --auth required, loopback serving is open and says so.
    let open = server(durable()).start();
    assert!(open.wait_log("authentication is off", Duration::from_secs(5)));
    assert_eq!(get(&open.url("/v1/agents")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_answer_429_with_retry_after_and_recover() {
    let state = tempfile::tempdir().expect("state");
    let a = make_key(state.path(), &["--scope", "admin"]);
    let b = make_key(state.path(), &["--scope", "admin"]);
    let srv = app(durable())
        .agent(fixture("compat"))
        .state_dir(state.path())
        .args([
            "--rate-limit",
            "invoke=0.5:3",
            "--agent-rate-limit",
            "runs=0.2:2",
        ])
        .start()
        .await;
    let url = srv.url("/v1/agents/durable/entrypoints/work/invoke");
    let body = Some(json!({"input": {"i": 1}}));
    for _ in 0..3 {
        assert_eq!(call("POST", &url, Some(&a), body.clone()).await.0, 200);
    }
    let r = client()
        .post(&url)
        .bearer_auth(&a)
        .json(&json!({"input": {"i": 1}}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 429);
    let h = r.headers().clone();
    let retry: u64 = h
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("retry-after");
    assert!(retry >= 1);
    assert_eq!(
        h.get("ratelimit-limit").map(|v| v.as_bytes()),
        Some(&b"3"[..])
    );
    assert_eq!(
        h.get("ratelimit-remaining").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    let err = json(&r.text().await.expect("body"));
    assert_eq!(err["error"]["code"], "rate_limit_error");
    let wait = err["error"]["details"]["retry_after_s"]
        .as_f64()
        .expect("retry_after_s");
    assert!(
        wait > 0.0 && wait <= 2.01,
        "one token refills in 2 s: {wait}"
    );
    // Another key has its own bucket; other route classes are not limited.
    assert_eq!(call("POST", &url, Some(&b), body.clone()).await.0, 200);
    assert_eq!(
        call("GET", &srv.url("/v1/agents"), Some(&a), None).await.0,
        200
    );
    // RunAgent's routes share the invoke class and answer as FastAPI would.
    let (status, text) = call(
        "POST",
        &srv.url(&format!("/api/v1/agents/{COMPAT_ID}/run")),
        Some(&a),
        Some(json!({"entrypoint_tag": "echo", "input_args": [], "input_kwargs": {"message": "x"}})),
    )
    .await;
    assert_eq!(status, 429, "{text}");
    assert!(json(&text)["detail"].is_string());
    // It recovers once the bucket refills.
    tokio::time::sleep(Duration::from_secs_f64(wait + 0.05)).await;
    assert_eq!(call("POST", &url, Some(&a), body.clone()).await.0, 200);

    // Per agent: runs of one agent, whoever creates them.
    let run = json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}});
    assert_eq!(
        call("POST", &srv.url("/v1/runs"), Some(&a), Some(run.clone()))
            .await
            .0,
        202
    );
    assert_eq!(
        call("POST", &srv.url("/v1/runs"), Some(&b), Some(run.clone()))
            .await
            .0,
        202
    );
    let (status, text) = call("POST", &srv.url("/v1/runs"), Some(&b), Some(run.clone())).await;
    assert_eq!(status, 429, "{text}");
    let other = json!({"agent": "compat_fixture", "entrypoint": "echo", "input": {"message": "x"}});
    assert_eq!(
        call("POST", &srv.url("/v1/runs"), Some(&b), Some(other))
            .await
            .0,
        202
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_keys_rate_limits_apply_per_client_address() {
    let srv = server(durable())
        .args(["--rate-limit", "other=0.2:2"])
        .start();
    assert_eq!(get(&srv.url("/v1/agents")).await.0, 200);
    assert_eq!(get(&srv.url("/v1/agents")).await.0, 200);
    assert_eq!(get(&srv.url("/v1/agents")).await.0, 429);
    assert_eq!(
        get(&srv.url("/healthz")).await.0,
        200,
        "probes are never limited"
    );
    // A bad rule is refused at start-up.
    let bad = server(durable())
        .args(["--rate-limit", "everything=5"])
        .try_start();
    assert!(bad.is_err_and(|log| log.contains("the class is invoke, runs, hooks or other")));
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_is_off_by_default_and_answers_preflights_for_configured_origins() {
    let preflight = |srv: &TestApp, origin: &str| {
        client()
            .request(reqwest::Method::OPTIONS, srv.url("/v1/runs"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let off = app(durable()).start().await;
    let r = preflight(&off, "https://app.example")
        .await
        .expect("options");
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = client()
        .get(off.url("/v1/agents"))
        .header("origin", "https://app.example")
        .send()
        .await
        .expect("get");
    assert!(r.headers().get("access-control-allow-origin").is_none());

    let state = tempfile::tempdir().expect("state");
    let key = make_key(state.path(), &["--scope", "admin"]);
    let on = app(durable())
        .state_dir(state.path())
        .args(["--cors-origin", "https://app.example"])
        .start()
        .await;
    // The preflight carries no key and is answered before authentication.
    let r = preflight(&on, "https://app.example")
        .await
        .expect("options");
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        r.headers()
            .get("access-control-allow-origin")
            .map(|v| v.as_bytes()),
        Some(&b"https://app.example"[..])
    );
    let allowed = r
        .headers()
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");
    let r = client()
        .get(on.url("/v1/agents"))
        .bearer_auth(&key)
        .header("origin", "https://app.example")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_some());
    let r = preflight(&on, "https://evil.example")
        .await
        .expect("options");
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn only_admin_keys_see_python_tracebacks() {
    let state = tempfile::tempdir().expect("state");
    let admin = make_key(state.path(), &["--scope", "admin"]);
    let user = make_key(
        state.path(),
        &[
            "--scope",
            "invoke",
            "--scope",
            "runs:write",
            "--scope",
            "runs:read",
        ],
    );
    let srv = app(durable()).state_dir(state.path()).start().await;
    let url = srv.url("/v1/agents/durable/entrypoints/fatal/invoke");
    for (key, shown) in [(&user, false), (&admin, true)] {
        let (status, text) = call("POST", &url, Some(key), Some(json!({}))).await;
        assert_eq!(status, 500, "{text}");
        let details = &json(&text)["error"]["details"];
        assert_eq!(details["exception_type"], "NonRetriableError");
        assert_eq!(details.get("traceback").is_some(), shown, "{text}");
    }
    // A failed run: its error and its failure event, read with each key.
    let (status, text) = call(
        "POST",
        &srv.url("/v1/runs/wait"),
        Some(&user),
        Some(json!({"agent": "durable", "entrypoint": "fatal", "input": {}})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let run = json(&text);
    assert_eq!(run["status"], "failed");
    let id = run["id"].as_str().expect("id").to_string();
    for (key, shown) in [(&user, false), (&admin, true)] {
        let (_, text) = call("GET", &srv.url(&format!("/v1/runs/{id}")), Some(key), None).await;
        assert_eq!(
            json(&text)["error"].get("traceback").is_some(),
            shown,
            "{text}"
        );
        let (_, events) = call(
            "GET",
            &srv.url(&format!("/v1/runs/{id}/events")),
            Some(key),
            None,
        )
        .await;
        assert!(events.contains("event: run.failed"), "{events}");
        assert_eq!(events.contains("traceback"), shown, "{events}");
    }
}

/// Every route that names an agent or returns an agent's data, with a key limited to another
/// agent, by every form the path can name it in: refused, or filtered.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_limited_to_another_agent_is_refused_on_every_route_in_every_path_form() {
    const DURABLE_ID: &str = "d0d0d0d0-0000-4000-8000-000000000001";
    let state = tempfile::tempdir().expect("state");
    let all = [
        "--scope",
        "invoke",
        "--scope",
        "runs:read",
        "--scope",
        "runs:write",
    ];
    let by_name = make_key(
        state.path(),
        &[&all[..], &["--agent", "compat_fixture"]].concat(),
    );
    let by_id = make_key(state.path(), &[&all[..], &["--agent", COMPAT_ID]].concat());
    let admin = make_key(state.path(), &["--scope", "admin"]);
    // `durable` first: it is the agent RunAgent's agent-less routes describe.
    let srv = app(durable())
        .agent(fixture("compat"))
        .state_dir(state.path())
        .start()
        .await;
    // Data of `durable`, made by the admin: a run and a RunAgent invocation.
    let (status, text) = call(
        "POST",
        &srv.url("/v1/runs"),
        Some(&admin),
        Some(json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}})),
    )
    .await;
    assert_eq!(status, 202, "{text}");
    let run = json(&text)["id"].as_str().expect("id").to_string();
    let (status, text) = call(
        "POST",
        &srv.url(&format!("/api/v1/agents/{DURABLE_ID}/run")),
        Some(&admin),
        Some(json!({"entrypoint_tag": "work", "input_args": [], "input_kwargs": {"i": 1}})),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let invocation = {
        let url = srv.url(&format!("/api/v1/agents/{DURABLE_ID}/invocations?limit=1"));
        let mut found = None;
        for _ in 0..200 {
            let list = json(&call("GET", &url, Some(&admin), None).await.1);
            if let Some(id) = list["invocations"][0]["invocation_id"].as_str() {
                found = Some(id.to_string());
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        found.expect("the admin's invocation is recorded")
    };

    // Every way a path segment can name `durable`: its name and id, raw and percent-encoded
    // (some or all of it, either case of hex digit), and double-encoded.
    let names = [
        "durable".to_string(),
        "%64urable".to_string(),
        "%64%75%72%61%62%6C%65".to_string(),
        "%64%75%72%61%62%6c%65".to_string(),
        "%2564urable".to_string(),
        DURABLE_ID.to_string(),
        format!("%64{}", &DURABLE_ID[1..]),
        DURABLE_ID.replace('-', "%2D"),
    ];
    let ids = [
        DURABLE_ID.to_string(),
        format!("%64{}", &DURABLE_ID[1..]),
        DURABLE_ID.replace('-', "%2d"),
    ];
    let refused = |status: u16| status == 403 || status == 404;
    for key in [&by_name, &by_id] {
        // The control: the key does reach its own agent.
        let (status, text) = call(
            "GET",
            &srv.url("/v1/agents/compat_fixture"),
            Some(key),
            None,
        )
        .await;
        assert_eq!(status, 200, "{text}");
        for a in &names {
            for (method, path, body) in [
                ("GET", format!("/v1/agents/{a}"), None),
                (
                    "POST",
                    format!("/v1/agents/{a}/entrypoints/work/invoke"),
                    Some(json!({"input": {"i": 1}})),
                ),
                (
                    "POST",
                    format!("/v1/agents/{a}/entrypoints/counts_stream/stream"),
                    Some(json!({"input": {}})),
                ),
            ] {
                let (status, text) = call(method, &srv.url(&path), Some(key), body).await;
                assert!(refused(status), "{method} {path}: {status} {text}");
            }
            let ws = srv.ws_url(&format!(
                "/v1/agents/{a}/entrypoints/counts_stream/ws?token={key}"
            ));
            assert!(
                tokio_tungstenite::connect_async(ws).await.is_err(),
                "ws {a} was accepted"
            );
            let (status, text) = call(
                "GET",
                &srv.url(&format!("/v1/runs?agent={a}")),
                Some(key),
                None,
            )
            .await;
            assert!(
                refused(status) || !text.contains(&run),
                "runs?agent={a}: {status} {text}"
            );
        }
        // Runs created for `durable`, by name or id.
        for a in ["durable", DURABLE_ID] {
            let body = json!({"agent": a, "entrypoint": "work", "input": {"i": 2}});
            for path in ["/v1/runs", "/v1/runs/wait", "/v1/runs/stream"] {
                let (status, text) =
                    call("POST", &srv.url(path), Some(key), Some(body.clone())).await;
                assert!(refused(status), "POST {path} for {a}: {status} {text}");
            }
        }
        // `durable`'s run, by its id.
        for (method, path) in [
            ("GET", format!("/v1/runs/{run}")),
            ("GET", format!("/v1/runs/{run}/wait?timeout_s=1")),
            ("GET", format!("/v1/runs/{run}/events?after=0")),
            ("POST", format!("/v1/runs/{run}/cancel")),
        ] {
            let (status, text) = call(method, &srv.url(&path), Some(key), None).await;
            assert!(refused(status), "{method} {path}: {status} {text}");
        }
        let ws = srv.ws_url(&format!("/v1/runs/{run}/events/ws?token={key}"));
        assert!(tokio_tungstenite::connect_async(ws).await.is_err());
        // Lists show only the key's agents.
        let (status, text) = call("GET", &srv.url("/v1/agents"), Some(key), None).await;
        assert_eq!(status, 200, "{text}");
        let listed: Vec<String> = json(&text)["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .map(|a| a["name"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(listed, ["compat_fixture"], "{text}");
        // RunAgent's routes, whose agent is in the path by id.
        for a in &ids {
            for (method, path, body) in [
                (
                    "POST",
                    format!("/api/v1/agents/{a}/run"),
                    Some(
                        json!({"entrypoint_tag": "work", "input_args": [], "input_kwargs": {"i": 1}}),
                    ),
                ),
                ("GET", format!("/api/v1/agents/{a}/architecture"), None),
                ("GET", format!("/api/v1/agents/{a}/invocations"), None),
                ("GET", format!("/api/v1/agents/{a}/invocations/stats"), None),
            ] {
                let (status, text) = call(method, &srv.url(&path), Some(key), body).await;
                assert!(refused(status), "{method} {path}: {status} {text}");
            }
            let ws = srv.ws_url(&format!("/api/v1/agents/{a}/run-stream?token={key}"));
            assert!(
                tokio_tungstenite::connect_async(ws).await.is_err(),
                "run-stream {a} was accepted"
            );
        }
        for path in [
            format!("/api/v1/invocations/{invocation}"),
            "/api/v1".to_string(),
            "/api/v1/health".to_string(),
            "/openapi.json".to_string(),
            format!("/openapi.json?token={key}"),
        ] {
            let (status, text) = call("GET", &srv.url(&path), Some(key), None).await;
            assert!(refused(status), "GET {path}: {status} {text}");
        }
        // Readiness, but not the names of the agents behind it.
        let (_, text) = call("GET", &srv.url("/readyz"), Some(key), None).await;
        assert_eq!(json(&text).get("agents"), None, "{text}");
    }
    // The admin still sees all of it.
    let (status, _) = call(
        "GET",
        &srv.url(&format!("/api/v1/invocations/{invocation}")),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_makes_only_keys_within_its_rights_and_only_an_unrestricted_admin_lists_or_revokes() {
    let state = tempfile::tempdir().expect("state");
    let admin = make_key(state.path(), &["--scope", "admin"]);
    let limited_admin = make_key(state.path(), &["--scope", "admin", "--agent", "durable"]);
    let srv = app(durable())
        .agent(fixture("compat"))
        .state_dir(state.path())
        .start()
        .await;
    let create = |key: &str, body: Value| {
        let url = srv.url("/v1/keys");
        let key = key.to_string();
        async move { call("POST", &url, Some(&key), Some(body)).await }
    };
    // Within its agents (by name or id): made.
    for agents in [
        json!(["durable"]),
        json!(["d0d0d0d0-0000-4000-8000-000000000001"]),
    ] {
        let (status, text) = create(
            &limited_admin,
            json!({"scopes": ["invoke"], "agents": agents}),
        )
        .await;
        assert_eq!(status, 201, "{text}");
    }
    // Beyond them: refused.
    for body in [
        json!({"scopes": ["invoke"]}),
        json!({"scopes": ["admin"]}),
        json!({"scopes": ["invoke"], "agents": ["compat_fixture"]}),
        json!({"scopes": ["invoke"], "agents": ["durable", "compat_fixture"]}),
    ] {
        let (status, text) = create(&limited_admin, body.clone()).await;
        assert_eq!(status, 403, "{body}: {text}");
        assert_eq!(json(&text)["error"]["code"], "permission_error", "{text}");
    }
    // Listing and revoking: the unrestricted admin only.
    let (status, text) = call("GET", &srv.url("/v1/keys"), Some(&limited_admin), None).await;
    assert_eq!(status, 403, "{text}");
    let (status, text) = call("GET", &srv.url("/v1/keys"), Some(&admin), None).await;
    assert_eq!(status, 200, "{text}");
    let victim = agentry_core_key_id(&admin);
    let (status, text) = call(
        "DELETE",
        &srv.url(&format!("/v1/keys/{victim}")),
        Some(&limited_admin),
        None,
    )
    .await;
    assert_eq!(status, 403, "{text}");
    let (status, _) = call("GET", &srv.url("/v1/keys"), Some(&admin), None).await;
    assert_eq!(status, 200, "the admin key was not revoked");
}

/// What a web page can send to a loopback server with authentication off: a `text/plain` or
/// form POST, a cross-origin WebSocket, a request by a rebound domain. All refused; curl and
/// JSON clients are not.
#[tokio::test(flavor = "multi_thread")]
async fn with_auth_off_browser_style_requests_are_refused_and_plain_clients_are_not() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let srv = app(durable()).start().await;
    let invoke = srv.url("/v1/agents/durable/entrypoints/work/invoke");
    let body = r#"{"input": {"i": 1}}"#;
    let send = |url: String, headers: Vec<(&'static str, String)>, body: &'static str| async move {
        let mut r = client().post(url).body(body);
        for (k, v) in headers {
            r = r.header(k, v);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("body"))
    };
    let ct = |v: &str| ("content-type", v.to_string());
    // Plain clients: JSON, no type, and curl's default form type.
    for headers in [
        vec![ct("application/json")],
        vec![],
        vec![ct("application/x-www-form-urlencoded")],
    ] {
        let (status, text) = send(invoke.clone(), headers, body).await;
        assert_eq!(status, 200, "{text}");
    }
    // A page's simple requests: text/plain, multipart, a form from a browser.
    for headers in [
        vec![ct("text/plain")],
        vec![ct("multipart/form-data; boundary=x")],
        vec![
            ct("application/x-www-form-urlencoded"),
            ("sec-fetch-site", "cross-site".into()),
        ],
    ] {
        let (status, text) = send(invoke.clone(), headers, body).await;
        assert!(status == 415 || status == 403, "{status} {text}");
    }
    // A foreign origin, even with a JSON body.
    let (status, text) = send(
        invoke.clone(),
        vec![
            ct("application/json"),
            ("origin", "https://evil.example".into()),
        ],
        body,
    )
    .await;
    assert_eq!(status, 403, "{text}");
    assert_eq!(json(&text)["error"]["code"], "permission_error");
    // Minting an admin key cross-site, as a text/plain POST: refused, and no key exists.
    let (status, _) = send(
        srv.url("/v1/keys"),
        vec![ct("text/plain"), ("origin", "https://evil.example".into())],
        r#"{"scopes": ["admin"]}"#,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = send(
        srv.url("/v1/keys"),
        vec![ct("text/plain")],
        r#"{"scopes": ["admin"]}"#,
    )
    .await;
    assert_eq!(status, 415);
    let (status, text) = get(&srv.url("/v1/keys")).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["keys"], json!([]), "no key was made");
    // DNS rebinding: a page on evil.example resolved to 127.0.0.1, reading our answers.
    let r = client()
        .get(srv.url("/v1/agents"))
        .header("host", format!("evil.example:{}", srv.port))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 403);
    let r = client()
        .get(srv.url("/v1/agents"))
        .header("host", format!("localhost:{}", srv.port))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 200);
    // WebSockets: a cross-origin handshake is refused; the server's own origin and none pass.
    let ws = srv.ws_url("/v1/agents/durable/entrypoints/counts_stream/ws");
    let mut foreign = ws.clone().into_client_request().expect("request");
    foreign
        .headers_mut()
        .insert("origin", "https://evil.example".parse().expect("header"));
    assert!(tokio_tungstenite::connect_async(foreign).await.is_err());
    let mut own = ws.clone().into_client_request().expect("request");
    own.headers_mut().insert(
        "origin",
        format!("http://127.0.0.1:{}", srv.port)
            .parse()
            .expect("header"),
    );
    assert!(tokio_tungstenite::connect_async(own).await.is_ok());
    assert!(tokio_tungstenite::connect_async(ws).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_details_are_for_key_holders_once_keys_exist() {
    let state = tempfile::tempdir().expect("state");
    let key = make_key(state.path(), &["--scope", "invoke"]);
    let srv = app(durable()).state_dir(state.path()).start().await;
    let (status, text) = get(&srv.url("/readyz")).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        json(&text),
        json!({"status": "ready"}),
        "no details without a key"
    );
    let (status, text) = call("GET", &srv.url("/readyz"), Some(&key), None).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        json(&text)["agents"]["durable"]["live_workers"],
        2,
        "{text}"
    );
    // With authentication off on loopback, the machine's user sees them.
    let open = app(durable()).start().await;
    let (_, text) = get(&open.url("/readyz")).await;
    assert!(json(&text)["agents"]["durable"].is_object(), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotency_keys_belong_to_the_api_key_that_used_them() {
    let state = tempfile::tempdir().expect("state");
    let scopes = ["--scope", "runs:write", "--scope", "runs:read"];
    let a = make_key(state.path(), &scopes);
    let b = make_key(state.path(), &scopes);
    let srv = app(durable()).state_dir(state.path()).start().await;
    let body = json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}, "idempotency_key": "order-7"});
    let create = |key: &str, body: &Value| {
        let (url, key, body) = (srv.url("/v1/runs"), key.to_string(), body.clone());
        async move { call("POST", &url, Some(&key), Some(body)).await }
    };
    let (status, text) = create(&a, &body).await;
    assert_eq!(status, 202, "{text}");
    let a_run = json(&text)["id"].as_str().expect("id").to_string();
    // B's use of the same idempotency key is B's own run: it neither sees A's nor conflicts.
    let (status, text) = create(&b, &body).await;
    assert_eq!(status, 202, "{text}");
    let b_run = json(&text)["id"].as_str().expect("id").to_string();
    assert_ne!(a_run, b_run);
    let mut changed = body.clone();
    changed["input"]["i"] = json!(2);
    // Within one key, the usual rules: the same request replays, another one conflicts.
    let (status, text) = create(&a, &body).await;
    assert_eq!(
        (status, json(&text)["id"].as_str()),
        (200, Some(a_run.as_str())),
        "{text}"
    );
    let (status, text) = create(&b, &changed).await;
    assert_eq!(status, 409, "{text}");
    assert_eq!(json(&text)["error"]["details"]["run_id"], b_run.as_str());
}

/// The event bus over a WebSocket takes the key as `?token=` (browsers cannot set headers on
/// a handshake), refuses a handshake without one, and shows a key limited to one agent only
/// that agent's runs, whatever the filters ask.
#[tokio::test]
async fn the_bus_websocket_takes_a_token_and_shows_only_the_keys_agents() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let state = tempfile::tempdir().expect("state");
    let limited = make_key(
        state.path(),
        &[
            "--scope",
            "runs:read",
            "--scope",
            "runs:write",
            "--agent",
            "durable",
        ],
    );
    let admin = make_key(state.path(), &["--scope", "admin"]);
    let srv = app(durable())
        .agent(fixture("compat"))
        .state_dir(state.path())
        .start()
        .await;
    for (agent, entrypoint, input) in [
        ("compat_fixture", "echo", json!({"message": "other"})),
        ("durable", "work", json!({"i": 1})),
    ] {
        let (status, text) = call(
            "POST",
            &srv.url("/v1/runs/wait?timeout_s=30"),
            Some(&admin),
            Some(json!({"agent": agent, "entrypoint": entrypoint, "input": input})),
        )
        .await;
        assert_eq!(status, 200, "{text}");
    }
    let ws = srv.url("/v1/events/ws").replacen("http", "ws", 1);
    assert!(
        tokio_tungstenite::connect_async(ws.clone()).await.is_err(),
        "no key, no bus"
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("{ws}?token={limited}"))
        .await
        .expect("the bus with a token");
    let mut frames: Vec<Value> = Vec::new();
    while !frames.iter().any(|f| f["type"] == "run.succeeded") {
        match tokio::time::timeout(std::time::Duration::from_secs(20), socket.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => frames.push(serde_json::from_str(&t).expect("json")),
            Ok(Some(Ok(_))) => {}
            other => panic!("the bus ended: {other:?} after {frames:?}"),
        }
    }
    assert!(
        frames.iter().all(|f| f["entrypoint"] == "work"),
        "{frames:?}"
    );
    // Asking for the other agent by name is refused, not answered with its events.
    let asked =
        tokio_tungstenite::connect_async(format!("{ws}?token={limited}&agent=compat_fixture"))
            .await;
    assert!(asked.is_err(), "a limited key opened another agent's bus");
    srv.stop().await;
}
