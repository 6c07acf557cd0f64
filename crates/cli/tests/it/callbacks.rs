//! Callbacks end to end: real servers, real Python workers, a real HTTP receiver on loopback
//! (so private callbacks are allowed, except where their refusal is the point), the documented
//! Python and JavaScript snippets verifying what arrived.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::common::app::TestApp;
use crate::common::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Got {
    headers: HashMap<String, String>,
    body: Vec<u8>,
    answered: u16,
}

/// A receiver on loopback: it records every request and answers the next scripted status
/// (200 once the script is used up; 0: holds the request a minute, then 200).
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Got>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
    url: String,
}

async fn receive(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let answered = r.script.lock().pop_front().unwrap_or(200);
    r.got.lock().push(Got {
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    v.to_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
        body: body.to_vec(),
        answered,
    });
    if answered == 0 {
        tokio::time::sleep(Duration::from_secs(60)).await;
        return StatusCode::OK;
    }
    StatusCode::from_u16(answered).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

async fn receiver(script: &[u16]) -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let r = Receiver {
        script: Arc::new(Mutex::new(script.iter().copied().collect())),
        url: format!("http://127.0.0.1:{port}/cb"),
        ..Default::default()
    };
    let app = axum::Router::new()
        .route("/cb", axum::routing::post(receive))
        .with_state(r.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    r
}

impl Receiver {
    fn got(&self) -> Vec<Got> {
        self.got.lock().clone()
    }
    async fn wait_for(&self, n: usize, within: Duration) -> Vec<Got> {
        let deadline = Instant::now() + within;
        while self.got.lock().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.got()
    }
}

async fn serve(configure: impl FnOnce(&mut agentry_server::Config)) -> TestApp {
    TestApp::start(vec![fixture("durable")], |c| {
        c.callbacks.allow_private = true;
        c.callbacks.secret = Some(SECRET.into());
        c.callbacks.retry_base_s = 0.1;
        c.callbacks.poll_ms = 20;
        configure(c);
    })
    .await
}

async fn create(node: &impl Served, callback_url: &str, i: i64) -> String {
    let body = json!({"agent": "durable", "entrypoint": "work", "input": {"i": i}, "callback_url": callback_url});
    let (status, text) = post(&node.url("/v1/runs"), &body.to_string()).await;
    assert_eq!(status, 202, "{text}");
    json(&text)["id"].as_str().expect("id").to_string()
}

async fn deliveries(node: &impl Served, id: &str) -> Value {
    let (status, text) = get(&node.url(&format!("/v1/runs/{id}/deliveries"))).await;
    assert_eq!(status, 200, "{text}");
    json(&text)
}

/// Waits until the run's callback is no longer pending.
async fn settled(node: &impl Served, id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let d = deliveries(node, id).await;
        if d["state"] != "pending" || Instant::now() > deadline {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// Runs the documented snippet (`python3` or `node`) on a received callback; whether it
/// said genuine.
fn snippet_verifies(program: &str, file: &str, secret: &str, got: &Got, body: &[u8]) -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    let body_file = dir.path().join("body");
    std::fs::write(&body_file, body).expect("body");
    let status = std::process::Command::new(program)
        .arg(repo_root().join("docs/snippets").join(file))
        .arg(&body_file)
        .arg(&got.headers["webhook-id"])
        .arg(&got.headers["webhook-timestamp"])
        .arg(&got.headers["webhook-signature"])
        .env("CALLBACK_SECRET", secret)
        .status()
        .unwrap_or_else(|e| panic!("{program} must be installed to check the snippets: {e}"));
    status.success()
}

#[tokio::test]
async fn a_callback_is_signed_as_documented_and_verifies_with_the_snippets() {
    let r = receiver(&[]).await;
    let app = serve(|_| {}).await;
    let id = create(&app, &r.url, 5).await;
    let got = r.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let body: Value = serde_json::from_slice(&got[0].body).expect("json body");
    assert_eq!(body["type"], "run.finished");
    assert_eq!(body["run_id"], id.as_str());
    assert_eq!(body["status"], "succeeded");
    assert_eq!(body["output"], json!({"i": 5}), "{body}");
    assert_eq!(body["error"], Value::Null);
    assert_eq!(body["attempt"], 1);
    assert!(body["duration_ms"].is_i64(), "{body}");
    assert!(
        body["timestamp"].as_str().is_some_and(|t| t.contains('T')),
        "{body}"
    );
    assert_eq!(got[0].headers["webhook-id"], format!("cb_{id}"));
    assert_eq!(got[0].headers["content-type"], "application/json");
    for (program, file) in [
        ("python3", "verify_callback.py"),
        ("node", "verify_callback.mjs"),
    ] {
        assert!(
            snippet_verifies(program, file, SECRET, &got[0], &got[0].body),
            "{file} accepts it"
        );
        let mut tampered = got[0].body.clone();
        tampered[3] ^= 1;
        assert!(
            !snippet_verifies(program, file, SECRET, &got[0], &tampered),
            "{file} refuses a changed body"
        );
        assert!(
            !snippet_verifies(
                program,
                file,
                "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                &got[0],
                &got[0].body
            ),
            "{file} refuses another secret"
        );
    }
    let d = settled(&app, &id, Duration::from_secs(5)).await;
    assert_eq!(d["state"], "delivered", "{d}");
    assert_eq!(d["attempts"][0]["status_code"], 200, "{d}");

    // A run that fails: its error, no output.
    let body = json!({"agent": "durable", "entrypoint": "fatal", "max_attempts": 1, "callback_url": r.url});
    let (status, text) = post(&app.url("/v1/runs"), &body.to_string()).await;
    assert_eq!(status, 202, "{text}");
    let got = r.wait_for(2, Duration::from_secs(30)).await;
    let body: Value = serde_json::from_slice(&got[1].body).expect("json body");
    assert_eq!(body["status"], "failed", "{body}");
    assert_eq!(body["output"], Value::Null, "{body}");
    assert!(body["error"]["code"].is_string(), "{body}");
    app.stop().await;
}

#[tokio::test]
async fn a_receiver_that_fails_twice_then_succeeds_gets_one_successful_delivery() {
    let r = receiver(&[500, 503]).await;
    let app = serve(|_| {}).await;
    let id = create(&app, &r.url, 1).await;
    let d = settled(&app, &id, Duration::from_secs(30)).await;
    assert_eq!(d["state"], "delivered", "{d}");
    let codes: Vec<Value> = d["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .map(|a| a["status_code"].clone())
        .collect();
    assert_eq!(codes, vec![json!(500), json!(503), json!(200)], "{d}");
    // Nothing more arrives once delivered; every attempt carried the same message id.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let got = r.got();
    assert_eq!(
        got.iter().map(|g| g.answered).collect::<Vec<_>>(),
        vec![500, 503, 200]
    );
    assert!(
        got.iter()
            .all(|g| g.headers["webhook-id"] == format!("cb_{id}"))
    );
    assert_eq!(got.iter().filter(|g| g.answered == 200).count(), 1);

    // A re-send starts another round: one more delivery.
    let (status, text) = post(&app.url(&format!("/v1/runs/{id}/deliveries")), "").await;
    assert_eq!(status, 202, "{text}");
    let got = r.wait_for(4, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 4, "{got:?}");
    let d = settled(&app, &id, Duration::from_secs(5)).await;
    assert_eq!(d["attempts"].as_array().map(Vec::len), Some(4), "{d}");
    app.stop().await;
}

#[tokio::test]
async fn attempts_stop_at_the_configured_bound_and_the_run_says_failed() {
    let r = receiver(&[500, 500, 500, 500]).await;
    let app = serve(|c| c.callbacks.max_attempts = 3).await;
    let id = create(&app, &r.url, 1).await;
    let d = settled(&app, &id, Duration::from_secs(30)).await;
    assert_eq!(d["state"], "failed", "{d}");
    assert_eq!(d["attempts"].as_array().map(Vec::len), Some(3), "{d}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(r.got().len(), 3);
    app.stop().await;
}

/// The secret is made at the first start and kept in the state directory: the second life
/// signs with the same one, and delivers what the first could not.
#[tokio::test]
async fn a_server_restarted_between_attempts_still_delivers() {
    let r = receiver(&[503]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let start = |state: std::path::PathBuf| {
        TestApp::start(vec![fixture("durable")], move |c| {
            c.state_dir = state;
            c.callbacks.allow_private = true;
            c.callbacks.retry_base_s = 3.0;
            c.callbacks.poll_ms = 20;
        })
    };
    let app = start(state.clone()).await;
    let id = create(&app, &r.url, 2).await;
    assert_eq!(r.wait_for(1, Duration::from_secs(30)).await.len(), 1);
    app.stop().await;
    let app = start(state.clone()).await;
    let d = settled(&app, &id, Duration::from_secs(30)).await;
    assert_eq!(d["state"], "delivered", "{d}");
    let got = r.got();
    assert_eq!(
        got.iter().map(|g| g.answered).collect::<Vec<_>>(),
        vec![503, 200]
    );
    let secret = std::fs::read_to_string(state.join("callback-secret")).expect("the kept secret");
    assert!(secret.starts_with("whsec_"));
    for g in &got {
        assert!(snippet_verifies(
            "python3",
            "verify_callback.py",
            secret.trim(),
            g,
            &g.body
        ));
    }
    app.stop().await;
}

#[tokio::test]
async fn a_callback_to_a_private_address_is_refused_unless_allowed() {
    let r = receiver(&[]).await;
    let app = serve(|c| {
        c.callbacks.allow_private = false;
        c.callbacks.max_attempts = 2;
    })
    .await;
    // An address literal is refused at once.
    for url in [
        r.url.clone(),
        r.url.replace("http://", "https://"),
        "http://[::1]:9/cb".into(),
        "http://169.254.169.254/latest".into(),
    ] {
        let body = json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}, "callback_url": url});
        let (status, text) = post(&app.url("/v1/runs"), &body.to_string()).await;
        assert_eq!(status, 422, "{url}: {text}");
        assert!(text.contains("callback_url"), "{text}");
    }
    // A name is checked on what it resolves to: `localhost` is loopback.
    let by_name = r.url.replace("127.0.0.1", "localhost");
    let id = create(&app, &by_name, 1).await;
    let d = settled(&app, &id, Duration::from_secs(30)).await;
    assert_eq!(d["state"], "failed", "{d}");
    let first = &d["attempts"][0];
    assert_eq!(first["status_code"], Value::Null, "{d}");
    assert!(
        first["error"]
            .as_str()
            .is_some_and(|e| e.contains("private")),
        "{d}"
    );
    assert!(r.got().is_empty(), "nothing reached the receiver");
    // Not a URL, not http(s), or with credentials: refused as input.
    for url in [
        "ftp://example.com/x",
        "nope",
        "https://user:pw@example.com/cb",
    ] {
        let body = json!({"agent": "durable", "entrypoint": "work", "input": {"i": 1}, "callback_url": url});
        let (status, _) = post(&app.url("/v1/runs"), &body.to_string()).await;
        assert_eq!(status, 422, "{url}");
    }
    app.stop().await;
}

/// An `https://` callback goes to a TLS front (its certificate signed by a per-test CA) before
/// the receiver: refused on the certificate while the CA is not trusted, delivered and
/// verifiable once `outbound.ca_file` names it; a certificate for another name, or expired,
/// refused even then.
#[tokio::test]
async fn an_https_callback_is_delivered_only_to_a_verified_certificate() {
    let r = receiver(&[]).await;
    use crate::common::tls::{Presented, TestCa};
    let ca = TestCa::new();
    let backend: std::net::SocketAddr = r
        .url
        .trim_start_matches("http://")
        .trim_end_matches("/cb")
        .parse()
        .expect("receiver address");
    let url = format!("https://localhost:{}/cb", ca.front(backend).await.port);

    let untrusting = serve(|c| c.callbacks.max_attempts = 1).await;
    let id = create(&untrusting, &url, 1).await;
    let d = settled(&untrusting, &id, Duration::from_secs(30)).await;
    assert_eq!(d["state"], "failed", "{d}");
    assert!(
        d["attempts"][0]["error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("certificate")),
        "{d}"
    );
    assert!(r.got().is_empty(), "nothing reached the receiver");
    untrusting.stop().await;

    let app = serve(|c| {
        c.outbound.ca_file = Some(ca.root_file.clone());
        c.callbacks.max_attempts = 1;
    })
    .await;
    for (presented, why) in [
        (Presented::OtherName, "not valid for name"),
        (Presented::Expired, "expired"),
    ] {
        let bad = format!(
            "https://localhost:{}/cb",
            ca.front_presenting(backend, presented).await.port
        );
        let id = create(&app, &bad, 3).await;
        let d = settled(&app, &id, Duration::from_secs(30)).await;
        assert_eq!(d["state"], "failed", "{d}");
        let error = d["attempts"][0]["error"].as_str().unwrap_or_default();
        assert!(error.to_lowercase().contains(why), "{why}: {d}");
    }
    assert!(r.got().is_empty(), "nothing reached the receiver");
    let id = create(&app, &url, 2).await;
    let got = r.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let body: Value = serde_json::from_slice(&got[0].body).expect("json body");
    assert_eq!(body["run_id"], id.as_str(), "{body}");
    assert!(
        snippet_verifies(
            "python3",
            "verify_callback.py",
            SECRET,
            &got[0],
            &got[0].body
        ),
        "the signature verifies"
    );
    let d = settled(&app, &id, Duration::from_secs(5)).await;
    assert_eq!(d["state"], "delivered", "{d}");
    assert_eq!(d["attempts"][0]["status_code"], 200, "{d}");
    app.stop().await;
}

/// Two nodes on one PostgreSQL, both delivering: every run's callback arrives exactly once.
#[tokio::test]
async fn two_nodes_on_postgres_deliver_each_callback_once() {
    let schema = crate::common::pg::schema();
    let r = receiver(&[]).await;
    let on_pg = |c: &mut agentry_server::Config| {
        c.store.database_url = Some(crate::common::pg::pg_url());
        c.store.database_schema = Some(schema.to_string());
    };
    let a = serve(on_pg).await;
    let b = serve(on_pg).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let node: &TestApp = if i % 2 == 0 { &a } else { &b };
        ids.push(create(node, &r.url, i).await);
    }
    let got = r.wait_for(20, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_after = r.got();
    assert_eq!(got.len(), 20);
    let mut per_run: HashMap<String, usize> = HashMap::new();
    for g in &got_after {
        let body: Value = serde_json::from_slice(&g.body).expect("json");
        *per_run
            .entry(body["run_id"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    for id in &ids {
        assert_eq!(per_run.get(id), Some(&1), "{id}: {per_run:?}");
    }
    b.stop().await;
    a.stop().await;
}

/// A node SIGKILLed in the middle of an attempt (the receiver holds the request): its lease
/// runs out and another node on the same PostgreSQL delivers the callback, once.
#[tokio::test]
async fn a_node_sigkilled_mid_attempt_leaves_the_callback_to_another() {
    let schema = crate::common::pg::schema();
    let r = receiver(&[0]).await;
    let node = |dir: &std::path::Path| {
        server(fixture("durable"))
            .args(crate::common::pg::on_postgres(&schema))
            .args([
                "--allow-private-callbacks",
                "--callback-timeout-s",
                "3",
                "--callback-poll-ms",
                "50",
            ])
            .args([
                "--callback-secret-file".to_string(),
                dir.join("secret").display().to_string(),
            ])
            .start()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("secret"), SECRET).expect("secret");
    let mut a = node(dir.path());
    let id = create(&a, &r.url, 3).await;
    assert_eq!(
        r.wait_for(1, Duration::from_secs(30)).await.len(),
        1,
        "a's attempt is held"
    );
    a.stop(nix::sys::signal::Signal::SIGKILL);
    let b = node(dir.path());
    let d = settled(&b, &id, Duration::from_secs(40)).await;
    assert_eq!(d["state"], "delivered", "{d}");
    let attempts = d["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1, "the killed node recorded nothing: {d}");
    assert_eq!(attempts[0]["status_code"], 200, "{d}");
    let got = r.got();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter()
            .all(|g| g.headers["webhook-id"] == format!("cb_{id}"))
    );
    assert!(snippet_verifies(
        "python3",
        "verify_callback.py",
        SECRET,
        &got[1],
        &got[1].body
    ));
}
