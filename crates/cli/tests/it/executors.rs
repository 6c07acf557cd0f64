//! Executors other than the local pool (`docs/executors.md`), end to end on loopback: an agent
//! whose code runs on a second `agentry serve`, the same against RunAgent 0.1.49's own server,
//! and n8n-style webhook entrypoints against a local receiver.

use std::sync::Arc;

use agentry_core::settings::{AgentSettings, RemoteSettings};
use axum::extract::State;
use axum::http::HeaderMap;
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::common::app::TestApp;
use crate::common::*;

/// The remote settings of the server at `url`, with no API key.
fn remote_at(url: &str) -> RemoteSettings {
    RemoteSettings {
        url: url.to_string(),
        agent_id: None,
        max_concurrency: None,
        api_key_env: None,
        api_key_file: None,
    }
}

/// The compat fixture served by `front`, its code run by the server at `url`.
async fn front_for(url: &str) -> TestApp {
    front_with(remote_at(url), Vec::new(), None).await
}

/// As `front_for`, serving the agents of `more` too, trusting the roots of `ca_file`.
async fn front_with(
    remote: RemoteSettings,
    more: Vec<std::path::PathBuf>,
    ca_file: Option<std::path::PathBuf>,
) -> TestApp {
    let mut agents = vec![fixture("compat")];
    agents.extend(more);
    TestApp::start(agents, move |c| {
        c.agents.insert(
            "compat_fixture".into(),
            AgentSettings {
                remote: Some(remote),
                ..Default::default()
            },
        );
        c.outbound.ca_file = ca_file;
    })
    .await
}

/// What the front answers for the calls both remote tests make: a sync call, a durable run, a
/// stream, a durable run of a stream, and an agent's exception.
async fn exercise(front: &TestApp) {
    let (status, text) = post(
        &front.url("/v1/agents/compat_fixture/entrypoints/echo/invoke"),
        r#"{"input": {"message": "hi"}}"#,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["output"], json!({"message": "hi"}));

    let body =
        json!({"agent": "compat_fixture", "entrypoint": "echo", "input": {"message": "run"}});
    let (status, text) = post(&front.url("/v1/runs/wait?timeout_s=30"), &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let run = json(&text);
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], json!({"message": "run"}));

    let (status, text) = post(
        &front.url("/v1/agents/compat_fixture/entrypoints/echo_stream/stream"),
        r#"{"input": {"message": "s", "n": 3}}"#,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    for i in 0..3 {
        assert!(
            text.contains(&format!(r#"{{"i": {i}, "message": "s"}}"#)),
            "{text}"
        );
    }

    let body = json!({"agent": "compat_fixture", "entrypoint": "echo_stream",
                      "input": {"message": "d", "n": 2}});
    let (status, text) = post(&front.url("/v1/runs/wait?timeout_s=30"), &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let run = json(&text);
    assert_eq!(run["status"], "succeeded", "{run}");
    let id = run["id"].as_str().expect("id");
    let (_, events) = get(&front.url(&format!("/v1/runs/{id}/events"))).await;
    assert_eq!(events.matches("event: run.chunk").count(), 2, "{events}");

    let body = json!({"agent": "compat_fixture", "entrypoint": "boom", "max_attempts": 1});
    let (status, text) = post(&front.url("/v1/runs/wait?timeout_s=30"), &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let run = json(&text);
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("boom"),
        "{run}"
    );
}

#[tokio::test]
async fn a_remote_agent_runs_on_a_second_agentry_serve() {
    let back = TestApp::start(vec![fixture("compat")], |_| {}).await;
    let front = front_for(&back.url("")).await;
    let (status, text) = get(&front.url("/v1/agents/compat_fixture")).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("remote server"), "{text}");
    exercise(&front).await;
    // The front has no workers of its own: with the second server gone, calls are refused.
    back.stop().await;
    let (status, text) = post(
        &front.url("/v1/agents/compat_fixture/entrypoints/echo/invoke"),
        r#"{"input": {"message": "hi"}}"#,
    )
    .await;
    assert_eq!(status, 503, "{text}");
    assert_eq!(json(&text)["error"]["code"], "unavailable");
    front.stop().await;
}

/// A second server with API keys: the front sends the key from `api_key_file` with every call
/// and stream, and without it is refused.
#[tokio::test]
async fn a_remote_agent_sends_its_api_key_to_a_server_with_keys() {
    let state = tempfile::tempdir().expect("state");
    let key = create_key(&[
        "--state-dir".as_ref(),
        state.path().as_os_str(),
        "--scope".as_ref(),
        "invoke".as_ref(),
    ]);
    let state_dir = state.path().to_path_buf();
    let back = TestApp::start(vec![fixture("compat")], move |c| c.state_dir = state_dir).await;
    let key_file = state.path().join("remote-key");
    std::fs::write(&key_file, format!("{key}\n")).expect("key file");

    let mut remote = remote_at(&back.url(""));
    remote.api_key_file = Some(key_file);
    let front = front_with(remote, Vec::new(), None).await;
    exercise(&front).await;
    front.stop().await;

    let keyless = front_for(&back.url("")).await;
    let (status, text) = post(
        &keyless.url("/v1/agents/compat_fixture/entrypoints/echo/invoke"),
        r#"{"input": {"message": "hi"}}"#,
    )
    .await;
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains("401"),
        "the remote's refusal is named: {text}"
    );
    let (status, text) = post(
        &keyless.url("/v1/agents/compat_fixture/entrypoints/echo_stream/stream"),
        r#"{"input": {"message": "s", "n": 2}}"#,
    )
    .await;
    assert_eq!(
        status, 503,
        "a stream without the key does not start: {text}"
    );
    keyless.stop().await;
    back.stop().await;
}

/// A remote key that would leak, or could not work, stops the start, saying why.
#[tokio::test]
async fn a_remote_key_that_would_leak_or_is_empty_stops_the_start() {
    let dir = tempfile::tempdir().expect("dir");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").expect("write");
    let key = dir.path().join("key");
    std::fs::write(&key, "k").expect("write");
    let attempt = |remote: RemoteSettings| {
        TestApp::start_error(vec![fixture("compat")], move |config| {
            config.workers.count = None;
            config.agents.insert(
                "compat_fixture".into(),
                AgentSettings {
                    remote: Some(remote),
                    ..Default::default()
                },
            );
        })
    };
    let with = |f: &dyn Fn(&mut RemoteSettings)| {
        let mut r = remote_at("http://127.0.0.1:9");
        f(&mut r);
        r
    };
    let cases = [
        (
            with(&|r| r.api_key_env = Some("AGENTRY_DATABASE_URL".into())),
            "AGENTRY_",
        ),
        (
            with(&|r| {
                r.api_key_env = Some("PATH".into());
                r.api_key_file = Some(key.clone());
            }),
            "not both",
        ),
        (with(&|r| r.api_key_file = Some(empty.clone())), "is empty"),
        (
            with(&|r| r.url = "http://user:pw@127.0.0.1:9".into()),
            "carries credentials",
        ),
        (with(&|r| r.api_key_file = Some(key.clone())), "started"),
    ];
    for (remote, said) in cases {
        let got = attempt(remote.clone()).await;
        assert!(got.contains(said), "{remote:?}: {got}");
    }
}

#[tokio::test]
async fn a_remote_agent_runs_on_runagents_own_server() {
    let Some(venv) = crate::runagent_sdk::venv() else {
        return;
    };
    let work = tempfile::tempdir().expect("work");
    let agent = work.path().join("agent/compat");
    crate::runagent_sdk::copy_dir(&fixture("compat"), &agent);
    let port = crate::runagent_sdk::free_port();
    let _runagent =
        crate::runagent_sdk::start_runagent(&venv, &work.path().join("cache"), &agent, port);
    let front = front_for(&format!("http://127.0.0.1:{port}")).await;
    exercise(&front).await;
    front.stop().await;
}

/// A receiver for webhook calls: it records each request and answers a fixed JSON.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<(String, HeaderMap, String)>>>,
}

async fn answer(
    State(r): State<Receiver>,
    method: axum::http::Method,
    headers: HeaderMap,
    body: String,
) -> axum::Json<Value> {
    r.got.lock().push((method.to_string(), headers, body));
    axum::Json(json!({"reply": {"text": "from n8n", "score": 0.5}, "items": [1, 2]}))
}

/// Serves the webhook receiver on loopback; its port.
async fn webhook_receiver(receiver: &Receiver) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let app = axum::Router::new()
        .route("/webhook/flow", axum::routing::post(answer).get(answer))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

/// A folder holding an n8n-style agent (`flows`) whose two webhook entrypoints call `url`.
fn webhook_agent(url: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("dir");
    let config = json!({
        "agent_name": "flows", "description": "n8n fixture", "framework": "n8n", "template": "",
        "version": "1.0.0", "created_at": "2025-01-01T00:00:00Z",
        "template_source": {"repo_url": "", "author": "", "path": ""},
        "agent_architecture": {"entrypoints": [
            {"webhook_url": url, "method": "post", "tag": "ask", "timeout": 10,
             "extractor": {"answer": "$.reply.text", "missing": "$.nope"}},
            {"webhook_url": url, "method": "get", "tag": "status"}
        ]},
        "env_vars": {}, "agent_id": "77777777-8888-9999-0000-111111111111"
    });
    std::fs::write(dir.path().join("runagent.config.json"), config.to_string()).expect("config");
    dir
}

#[tokio::test]
async fn an_n8n_webhook_entrypoint_calls_its_url() {
    let receiver = Receiver::default();
    let port = webhook_receiver(&receiver).await;
    let dir = webhook_agent(&format!("http://127.0.0.1:{port}/webhook/flow"));
    let server = TestApp::start(vec![dir.path().to_path_buf()], |_| {}).await;

    let (status, text) = post(
        &server.url("/v1/agents/flows/entrypoints/ask/invoke"),
        r#"{"input": {"payload": {"question": "why?"}}}"#,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        json(&text)["output"],
        json!({"answer": "from n8n", "missing": null})
    );
    // RunAgent's protocol: the same result, as Python's json.dumps would write it.
    let (status, text) = post(
        &server.url("/api/v1/agents/77777777-8888-9999-0000-111111111111/run"),
        r#"{"entrypoint_tag": "ask", "input_args": [{"question": "positional"}]}"#,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let data: Value =
        serde_json::from_str(json(&text)["data"].as_str().expect("data")).expect("inner");
    assert_eq!(
        data["payload"],
        r#"{"answer": "from n8n", "missing": null}"#
    );

    let body = json!({"agent": "flows", "entrypoint": "status"});
    let (status, text) = post(&server.url("/v1/runs/wait?timeout_s=30"), &body.to_string()).await;
    assert_eq!(status, 200, "{text}");
    let run = json(&text);
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"]["items"], json!([1, 2]));

    // Two keyword arguments are refused as RunAgent refuses them.
    let (status, text) = post(
        &server.url("/v1/agents/flows/entrypoints/ask/invoke"),
        r#"{"input": {"payload": 1, "other": 2}}"#,
    )
    .await;
    assert_eq!(status, 500, "{text}");
    assert!(
        text.contains("Only 'payload' keyword argument is allowed."),
        "{text}"
    );

    let got = receiver.got.lock().clone();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(
        (got[0].0.as_str(), got[0].2.as_str()),
        ("POST", r#"{"question":"why?"}"#)
    );
    assert_eq!(
        got[0].1.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    assert_eq!(got[1].2, r#"{"question":"positional"}"#);
    // A durable run's call carries the run's id and attempt as its idempotency key.
    assert_eq!(got[2].0, "GET");
    assert_eq!(
        got[2]
            .1
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok()),
        Some(format!("{}:1", run["id"].as_str().expect("id")).as_str())
    );
    server.stop().await;
}

/// `https://` remote servers and webhooks (`wss://` for streams), behind a TLS front whose
/// certificate a per-test CA signed: trusted through `outbound.ca_file`, and refused without
/// it (the system's trust store does not know that CA), so the certificate is really checked.
#[tokio::test]
async fn remote_servers_and_webhooks_are_called_over_https_with_verified_certificates() {
    let ca = crate::common::tls::TestCa::new();
    let back = TestApp::start(vec![fixture("compat")], |_| {}).await;
    let back_tls = ca.front(([127, 0, 0, 1], back.port).into()).await;
    let receiver = Receiver::default();
    let hook_port = webhook_receiver(&receiver).await;
    let hook_tls = ca.front(([127, 0, 0, 1], hook_port).into()).await;
    let flows = webhook_agent(&format!("https://localhost:{}/webhook/flow", hook_tls.port));

    let remote = format!("https://localhost:{}", back_tls.port);
    let front = front_with(
        remote_at(&remote),
        vec![flows.path().to_path_buf()],
        Some(ca.root_file.clone()),
    )
    .await;
    // Calls, a durable run, a stream over wss://, a stream run and an agent's error.
    exercise(&front).await;
    let (status, text) = post(
        &front.url("/v1/agents/flows/entrypoints/ask/invoke"),
        r#"{"input": {"payload": {"question": "tls?"}}}"#,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(json(&text)["output"]["answer"], "from n8n", "{text}");
    assert_eq!(receiver.got.lock().len(), 1);
    front.stop().await;

    // The same servers, not trusted: nothing gets through, and a certificate refused once is
    // not tried again (one handshake per call, not the retries of a refused connection).
    let untrusting = front_with(remote_at(&remote), vec![flows.path().to_path_buf()], None).await;
    for (path, tls) in [
        (
            "/v1/agents/compat_fixture/entrypoints/echo/invoke",
            &back_tls,
        ),
        ("/v1/agents/flows/entrypoints/ask/invoke", &hook_tls),
    ] {
        let before = tls.connections();
        let (status, text) = post(
            &untrusting.url(path),
            r#"{"input": {"payload": {"question": "tls?"}}}"#,
        )
        .await;
        assert_eq!(status, 503, "{path}: {text}");
        assert!(
            text.to_lowercase().contains("certificate"),
            "{path}: {text}"
        );
        assert_eq!(tls.connections() - before, 1, "{path}: one handshake");
    }
    let (status, text) = post(
        &untrusting.url("/v1/agents/compat_fixture/entrypoints/echo_stream/stream"),
        r#"{"input": {"message": "s", "n": 3}}"#,
    )
    .await;
    assert_eq!(
        status, 503,
        "a stream of an untrusted server does not start: {text}"
    );
    assert!(text.contains("invalid peer certificate"), "{text}");
    assert_eq!(
        receiver.got.lock().len(),
        1,
        "no webhook call arrived untrusted"
    );
    untrusting.stop().await;
    back.stop().await;
}

/// Cancelling a durable run of a remote streaming entrypoint stops its stream at once: the
/// run ends `cancelled` with the chunks it had, and the second server sees its client go.
#[tokio::test]
async fn cancelling_a_remote_stream_run_ends_it_cancelled() {
    let back = TestApp::start(vec![fixture("faulty")], |_| {}).await;
    let remote = remote_at(&back.url(""));
    let front = TestApp::start(vec![fixture("faulty")], move |c| {
        c.agents.insert(
            "faulty".into(),
            AgentSettings {
                remote: Some(remote),
                ..Default::default()
            },
        );
    })
    .await;
    let marker = tempfile::NamedTempFile::new().expect("marker");
    let body = json!({"agent": "faulty", "entrypoint": "endless_stream",
                      "input": {"marker": marker.path(), "delay_s": 0.05}});
    let (status, text) = post(&front.url("/v1/runs"), &body.to_string()).await;
    assert_eq!(status, 202, "{text}");
    let id = json(&text)["id"].as_str().expect("id").to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, text) = get(&front.url(&format!("/v1/runs/{id}"))).await;
        if json(&text)["status"] == "running" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not started: {text}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Let some chunks through before the cancel.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let (status, text) = post(&front.url(&format!("/v1/runs/{id}/cancel")), "").await;
    assert!(status == 200 || status == 202, "{status} {text}");
    let (status, text) = get(&front.url(&format!("/v1/runs/{id}/wait?timeout_s=10"))).await;
    assert_eq!(status, 200, "{text}");
    let run = json(&text);
    assert_eq!(run["status"], "cancelled", "{run}");
    // It stopped when asked, not when the engine gave up waiting and killed the call.
    let message = run["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.contains("grace period"), "{run}");
    // The chunks before the cancel were kept (the events of an ended run, then the end).
    let (_, events) = get(&front.url(&format!("/v1/runs/{id}/events"))).await;
    assert!(events.matches("event: run.chunk").count() >= 1, "{events}");
    front.stop().await;
    back.stop().await;
}

/// A run names one of its agent's executors: runs that name `backend` go to the second server,
/// the others stay on the local workers; an unknown name is refused before anything is stored.
#[tokio::test]
async fn a_run_names_its_executor_and_the_default_stays_local() {
    let back = TestApp::start(vec![fixture("compat")], |_| {}).await;
    let remote = remote_at(&back.url(""));
    let front = TestApp::start(vec![fixture("compat")], move |c| {
        c.agents.insert(
            "compat_fixture".into(),
            AgentSettings {
                executors: [("backend".to_string(), remote)].into(),
                ..Default::default()
            },
        );
    })
    .await;
    let run = |executor: Option<&str>| {
        let mut body = json!({"agent": "compat_fixture", "entrypoint": "echo",
                              "input": {"message": "m"}, "max_attempts": 1});
        if let Some(e) = executor {
            body["executor"] = e.into();
        }
        let url = front.url("/v1/runs/wait?timeout_s=30");
        async move { post(&url, &body.to_string()).await }
    };
    for executor in [Some("backend"), None] {
        let (status, text) = run(executor).await;
        assert_eq!(status, 200, "{text}");
        let done = json(&text);
        assert_eq!(done["status"], "succeeded", "{text}");
        // The run's view names its executor (absent: the default).
        let id = done["id"].as_str().expect("id");
        let (_, text) = get(&front.url(&format!("/v1/runs/{id}"))).await;
        assert_eq!(json(&text)["executor"], json!(executor), "{text}");
    }
    let (status, text) = run(Some("nope")).await;
    assert_eq!(status, 422, "{text}");
    assert_eq!(
        json(&text)["error"]["details"]["errors"][0]["path"],
        "executor",
        "{text}"
    );
    // A schedule names one too: its fire's run goes there, and an unknown name is refused.
    let schedule = |executor: &str| {
        json!({"agent": "compat_fixture", "entrypoint": "echo", "input": {"message": "s"},
               "every": "1s", "times": 1, "executor": executor})
        .to_string()
    };
    let (status, text) = post(&front.url("/v1/schedules"), &schedule("nope")).await;
    assert_eq!(status, 422, "{text}");
    let (status, text) = post(&front.url("/v1/schedules"), &schedule("backend")).await;
    assert_eq!(status, 201, "{text}");
    let id = json(&text)["id"].as_str().expect("id").to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let fired = loop {
        let (_, text) = get(&front.url(&format!("/v1/schedules/{id}/fires"))).await;
        let fires = json(&text);
        if let Some(run_id) = fires["fires"][0]["run_id"].as_str() {
            break run_id.to_string();
        }
        assert!(std::time::Instant::now() < deadline, "no fire: {fires}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let (_, text) = get(&front.url(&format!("/v1/runs/{fired}/wait?timeout_s=20"))).await;
    assert_eq!(json(&text)["status"], "succeeded", "{text}");
    let (_, text) = get(&front.url(&format!("/v1/runs/{fired}"))).await;
    assert_eq!(json(&text)["executor"], "backend", "{text}");
    // With the second server gone, only the runs that name it fail.
    back.stop().await;
    let (status, text) = run(Some("backend")).await;
    assert_eq!(status, 200, "{text}");
    let failed = json(&text);
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "unavailable", "{failed}");
    let (_, text) = run(None).await;
    assert_eq!(json(&text)["status"], "succeeded", "{text}");
    front.stop().await;
}
