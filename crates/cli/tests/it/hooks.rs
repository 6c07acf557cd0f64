//! Webhook triggers end to end: real servers, real Python workers, real HTTP. Deliveries are
//! signed here with `hmac` directly, as a sender would, not with the server's own code.

use std::time::Duration;

use agentry_core::settings::{AgentSettings, EntrypointSettings};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::common::app::TestApp;
use crate::common::*;

/// A Standard Webhooks secret (`whsec_` + base64 of the key).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn hmac_of(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

fn now_s() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The three Standard Webhooks headers of a delivery signed with `SECRET`.
fn standard(id: &str, ts: i64, body: &str) -> Vec<(String, String)> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .expect("base64");
    let sig = hmac_of(
        &key,
        &[
            id.as_bytes(),
            b".",
            ts.to_string().as_bytes(),
            b".",
            body.as_bytes(),
        ],
    );
    vec![
        ("webhook-id".into(), id.into()),
        ("webhook-timestamp".into(), ts.to_string()),
        (
            "webhook-signature".into(),
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(sig)
            ),
        ),
    ]
}

async fn deliver(
    node: &impl Served,
    hook: &str,
    headers: &[(String, String)],
    body: &str,
) -> (u16, Value) {
    let mut req = client()
        .post(node.url(&format!("/v1/hooks/{hook}")))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let resp = req.send().await.expect("delivery");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// `[agents.durable.entrypoints.work.webhook]` with the secret in `secret_file`.
fn hook_settings(secret_file: &std::path::Path, extra: Value) -> AgentSettings {
    let mut hook = json!({
        "name": "orders",
        "secret_file": secret_file,
        "max_body_bytes": 2048,
        "input": {"i": "$.order.n"},
    });
    if let (Some(h), Some(e)) = (hook.as_object_mut(), extra.as_object()) {
        h.extend(e.clone());
    }
    AgentSettings {
        entrypoints: [(
            "work".to_string(),
            EntrypointSettings {
                webhook: Some(serde_json::from_value(hook).expect("hook settings")),
                ..Default::default()
            },
        )]
        .into(),
        ..Default::default()
    }
}

/// Serves the durable fixture with the `orders` hook; `configure` changes more.
async fn serve_with_hook(
    dir: &tempfile::TempDir,
    extra: Value,
    configure: impl FnOnce(&mut agentry_server::Config),
) -> TestApp {
    let secret = dir.path().join("orders.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("secret file");
    TestApp::start(vec![fixture("durable")], move |c| {
        c.agents
            .insert("durable".into(), hook_settings(&secret, extra));
        configure(c);
    })
    .await
}

/// Every run stored, whatever its state.
async fn run_count(app: &TestApp) -> usize {
    let (status, text) = get(&app.url("/v1/runs?limit=500")).await;
    assert_eq!(status, 200, "{text}");
    json(&text)["runs"].as_array().expect("runs").len()
}

#[tokio::test]
async fn a_signed_delivery_starts_a_run_of_the_mapped_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = serve_with_hook(&dir, json!({}), |_| {}).await;
    let body = r#"{"order": {"n": 21, "note": "ignored"}}"#;
    let (status, accepted) = deliver(&app, "orders", &standard("msg_1", now_s(), body), body).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["hook"], "orders");
    assert_eq!(accepted["delivery_id"], "msg_1");
    assert_eq!(accepted["scheme"], "standard");
    let id = accepted["run_id"].as_str().expect("run id");
    let (status, text) = get(&app.url(&format!("/v1/runs/{id}/wait?timeout_s=30"))).await;
    assert_eq!(status, 200, "{text}");
    let run = json(&text);
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["input"], json!({"i": 21}));
    assert_eq!(run["entrypoint"], "work");
    assert_eq!(run["metadata"]["trigger"]["kind"], "webhook");
    assert_eq!(run["metadata"]["trigger"]["delivery_id"], "msg_1");
    app.stop().await;
}

#[tokio::test]
async fn refused_deliveries_answer_401_401_409_413_and_start_no_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = serve_with_hook(&dir, json!({}), |_| {}).await;
    let body = r#"{"order": {"n": 1}}"#;
    let now = now_s();

    // A wrong signature: another key.
    let mut forged = standard("msg_a", now, body);
    forged[2].1 = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(hmac_of(b"guess", &[body.as_bytes()]))
    );
    let (status, err) = deliver(&app, "orders", &forged, body).await;
    assert_eq!(status, 401, "{err}");
    assert_eq!(err["error"]["code"], "authentication_error");
    // A body changed after signing.
    let (status, _) = deliver(
        &app,
        "orders",
        &standard("msg_a", now, body),
        r#"{"order": {"n": 2}}"#,
    )
    .await;
    assert_eq!(status, 401);
    // Unsigned.
    let (status, _) = deliver(&app, "orders", &[], body).await;
    assert_eq!(status, 401);
    // Genuine but stale: ten minutes old, and ten minutes ahead (tolerance 300 s).
    for ts in [now - 600, now + 600] {
        let (status, err) = deliver(&app, "orders", &standard("msg_b", ts, body), body).await;
        assert_eq!(status, 401, "{err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("timestamp")),
            "{err}"
        );
    }
    // Oversized (the hook's limit is 2048 bytes), even when well signed.
    let big = json!({"order": {"n": 1}, "pad": "x".repeat(4096)}).to_string();
    let (status, err) = deliver(&app, "orders", &standard("msg_c", now, &big), &big).await;
    assert_eq!(status, 413, "{err}");
    // An unknown hook.
    let (status, err) = deliver(&app, "nope", &standard("msg_d", now, body), body).await;
    assert_eq!(status, 404, "{err}");
    assert_eq!(err["error"]["code"], "hook_not_found");
    // A body whose mapped input the entrypoint refuses (`i` must be an integer).
    let wrong = r#"{"order": {"n": "many"}}"#;
    let (status, err) = deliver(&app, "orders", &standard("msg_e", now, wrong), wrong).await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(
        run_count(&app).await,
        0,
        "no refused delivery created a run"
    );

    // The first genuine delivery runs; its replay, even re-signed later or with another
    // body, is refused and creates nothing.
    let (status, first) = deliver(&app, "orders", &standard("msg_f", now, body), body).await;
    assert_eq!(status, 202, "{first}");
    for (ts, b) in [
        (now, body),
        (now + 5, body),
        (now + 5, r#"{"order": {"n": 9}}"#),
    ] {
        let (status, err) = deliver(&app, "orders", &standard("msg_f", ts, b), b).await;
        assert_eq!(status, 409, "{err}");
        assert_eq!(err["error"]["details"]["run_id"], first["run_id"], "{err}");
    }
    assert_eq!(run_count(&app).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn github_and_stripe_signatures_are_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = serve_with_hook(&dir, json!({}), |_| {}).await;
    // GitHub: HMAC of the body under the secret as written; the delivery GUID is the id.
    let body = r#"{"order": {"n": 3}}"#;
    let github = vec![
        (
            "x-hub-signature-256".to_string(),
            format!(
                "sha256={}",
                hex::encode(hmac_of(SECRET.as_bytes(), &[body.as_bytes()]))
            ),
        ),
        (
            "x-github-delivery".to_string(),
            "72d3162e-cc78-11e3-81ab-4c9367dc0958".to_string(),
        ),
    ];
    let (status, accepted) = deliver(&app, "orders", &github, body).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["scheme"], "github");
    // A redelivery is refused, and so is the same delivery under another (unsigned) GUID.
    let (status, _) = deliver(&app, "orders", &github, body).await;
    assert_eq!(status, 409);
    let mut regrouped = github.clone();
    regrouped[1].1 = "00000000-0000-0000-0000-000000000000".into();
    let (status, _) = deliver(&app, "orders", &regrouped, body).await;
    assert_eq!(
        status, 409,
        "the GUID is not signed: the signature is the id"
    );
    // Stripe: `t=` and `v1=` over `{t}.{body}`; the event's id is the delivery id, so a
    // retry of the event under a new timestamp is a replay.
    let body = r#"{"id": "evt_1NG8Du2eZvKYlo2C", "order": {"n": 4}}"#;
    let stripe = |t: i64| {
        let sig = hex::encode(hmac_of(
            SECRET.as_bytes(),
            &[t.to_string().as_bytes(), b".", body.as_bytes()],
        ));
        vec![("stripe-signature".to_string(), format!("t={t},v1={sig}"))]
    };
    let (status, accepted) = deliver(&app, "orders", &stripe(now_s()), body).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["delivery_id"], "evt_1NG8Du2eZvKYlo2C");
    let (status, _) = deliver(&app, "orders", &stripe(now_s() + 1), body).await;
    assert_eq!(status, 409);
    let (status, _) = deliver(&app, "orders", &stripe(now_s() - 3600), body).await;
    assert_eq!(status, 401, "a stale Stripe timestamp");
    for id in [&accepted["run_id"]] {
        let (status, text) = get(&app.url(&format!(
            "/v1/runs/{}/wait?timeout_s=30",
            id.as_str().unwrap_or_default()
        )))
        .await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(json(&text)["status"], "succeeded", "{text}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_hook_is_limited_to_its_scheme_and_its_rate_limit_class() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = serve_with_hook(&dir, json!({"scheme": "standard"}), |c| {
        c.gateway.rate_limits = vec!["hooks=0.5:2".into()];
    })
    .await;
    let body = r#"{"order": {"n": 5}}"#;
    let github = vec![(
        "x-hub-signature-256".to_string(),
        format!(
            "sha256={}",
            hex::encode(hmac_of(SECRET.as_bytes(), &[body.as_bytes()]))
        ),
    )];
    let (status, _) = deliver(&app, "orders", &github, body).await;
    assert_eq!(
        status, 401,
        "a standard-only hook reads no GitHub signature"
    );
    let (status, _) = deliver(&app, "orders", &standard("msg_1", now_s(), body), body).await;
    assert_eq!(status, 202);
    let (status, err) = deliver(&app, "orders", &standard("msg_2", now_s(), body), body).await;
    assert_eq!(status, 429, "the burst of 2 is spent: {err}");
    // Other classes are not drawn on.
    let (status, _) = get(&app.url("/v1/runs")).await;
    assert_eq!(status, 200);
    app.stop().await;
}

/// With API keys required the route still takes no key: the signature is the credential.
/// The secret comes from an environment variable, and the hook from `agentry.toml`.
#[tokio::test]
async fn a_hook_from_agentry_toml_needs_no_api_key_when_keys_are_required() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = dir.path().join("agentry.toml");
    std::fs::write(
        &toml,
        "[gateway]\nauth = \"required\"\n\n[agents.durable.entrypoints.work.webhook]\nname = \"orders\"\nsecret_env = \"ORDERS_HOOK_SECRET\"\ninput = { i = \"$.n\" }\n",
    )
    .expect("agentry.toml");
    let srv = server(fixture("durable"))
        .args(["--config".to_string(), toml.display().to_string()])
        .env("ORDERS_HOOK_SECRET", SECRET)
        .start();
    let body = r#"{"n": 8}"#;
    let (status, accepted) =
        deliver(&srv, "orders", &standard("msg_env", now_s(), body), body).await;
    assert_eq!(status, 202, "{accepted}");
    let (status, _) = get(&srv.url("/v1/runs")).await;
    assert_eq!(status, 401, "the other routes still need a key");
    assert!(
        !srv.log_text().contains("MfKQ9r8G"),
        "the secret is never logged"
    );
}

#[tokio::test]
async fn a_hook_that_could_never_start_a_run_stops_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("s");
    std::fs::write(&secret, SECRET).expect("secret");
    let attempt = |settings: AgentSettings| {
        TestApp::start_error(vec![fixture("durable")], move |config| {
            config.agents.insert("durable".into(), settings);
        })
    };
    let cases = [
        (json!({"input": {"nope": "$.n"}}), "no such parameter"),
        (
            json!({"input": {"other": "$.n"}, "secret_file": secret}),
            "no such parameter",
        ),
        (json!({"input": {}}), "started"),
        (json!({"input": {"i": "$["}}), "not a JSONPath"),
        (
            json!({"secret_file": dir.path().join("missing")}),
            "cannot be read",
        ),
        (
            json!({"secret_env": "AGENTRY_TEST_UNSET_HOOK_SECRET", "secret_file": null}),
            "is not set",
        ),
        (json!({"secret_env": "X"}), "exactly one of"),
        (json!({"name": "a/b"}), "must be 1 to 64"),
    ];
    for (extra, expected) in cases {
        let said = attempt(hook_settings(&secret, extra.clone())).await;
        assert!(
            said.contains(expected),
            "{extra}: expected `{expected}` in: {said}"
        );
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Two nodes on one PostgreSQL: the same delivery sent to both at once starts one run; the
/// other node refuses it as a replay.
#[tokio::test]
async fn a_delivery_sent_to_two_nodes_on_postgres_starts_one_run() {
    let schema = crate::common::pg::schema();
    let dir = tempfile::tempdir().expect("tempdir");
    let on_pg = |c: &mut agentry_server::Config| {
        c.store.database_url = Some(crate::common::pg::pg_url());
        c.store.database_schema = Some(schema.to_string());
    };
    let a = serve_with_hook(&dir, json!({}), on_pg).await;
    let b = serve_with_hook(&dir, json!({}), on_pg).await;
    for n in 0..20 {
        let body = json!({"order": {"n": n}}).to_string();
        let headers = standard(&format!("msg_{n}"), now_s(), &body);
        let ((sa, ra), (sb, rb)) = tokio::join!(
            deliver(&a, "orders", &headers, &body),
            deliver(&b, "orders", &headers, &body)
        );
        let mut statuses = [sa, sb];
        statuses.sort();
        assert_eq!(statuses, [202, 409], "{ra} {rb}");
        let first = if sa == 202 { &ra } else { &rb };
        let replay = if sa == 202 { &rb } else { &ra };
        assert_eq!(replay["error"]["details"]["run_id"], first["run_id"]);
    }
    let (status, text) = get(&a.url("/v1/runs?limit=500")).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["runs"].as_array().expect("runs").len(), 20);
    b.stop().await;
    a.stop().await;
}

/// A hook, a default priority and a timer in the agent folder's `agentry.agent.toml`;
/// `agentry.toml` wins where both say something.
#[tokio::test]
async fn an_agent_folder_declares_its_triggers_in_agentry_agent_toml() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = dir.path().join("durable");
    std::fs::create_dir(&agent).expect("agent dir");
    for f in ["agent.py", "runagent.config.json"] {
        std::fs::copy(fixture("durable").join(f), agent.join(f)).expect("copy the fixture");
    }
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).expect("secret");
    std::fs::write(
        agent.join("agentry.agent.toml"),
        format!(
            "[entrypoints.work]\npriority = 3\n[entrypoints.work.webhook]\nname = \"folder-hook\"\nsecret_file = {:?}\n\n[entrypoints.sleepy]\npriority = 5\n\n[[entrypoints.sleepy.timers]]\nname = \"folder-timer\"\nevery = \"1h\"\ninput = {{ i = 1 }}\n",
            secret.display().to_string()
        ),
    )
    .expect("agentry.agent.toml");
    let app = TestApp::start(vec![agent], |c| {
        // agentry.toml's word on `sleepy`'s priority wins over the folder's.
        let sleepy = EntrypointSettings {
            priority: Some(9),
            ..Default::default()
        };
        c.agents.insert(
            "durable".into(),
            AgentSettings {
                entrypoints: [("sleepy".to_string(), sleepy)].into(),
                ..Default::default()
            },
        );
    })
    .await;
    let body = r#"{"i": 2}"#;
    let (status, accepted) = deliver(
        &app,
        "folder-hook",
        &standard("msg_folder", now_s(), body),
        body,
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    let (_, text) = get(&app.url(&format!(
        "/v1/runs/{}",
        accepted["run_id"].as_str().unwrap_or_default()
    )))
    .await;
    assert_eq!(json(&text)["priority"], 3, "the folder's priority: {text}");
    let (status, text) = post(
        &app.url("/v1/runs"),
        r#"{"agent": "durable", "entrypoint": "sleepy", "input": {"i": 1}}"#,
    )
    .await;
    assert_eq!(status, 202, "{text}");
    assert_eq!(json(&text)["priority"], 9, "agentry.toml wins: {text}");
    let (_, text) = get(&app.url("/v1/schedules")).await;
    assert_eq!(
        json(&text)["schedules"][0]["name"],
        "folder-timer",
        "{text}"
    );
    app.stop().await;
}
