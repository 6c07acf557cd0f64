//! Worker isolation and lifecycle, with real Python processes: crashes, deadlines, stray output,
//! client disconnects, a slow generator next to health checks, and shutdown.

use std::time::{Duration, Instant};

use crate::common::app::app;
use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const FAULTY: &str = "33333333-4444-5555-6666-777777777777";

fn invoke_url(srv: &impl Served, tag: &str) -> String {
    srv.url(&format!("/v1/agents/faulty/entrypoints/{tag}/invoke"))
}

async fn assert_ok_after(srv: &impl Served) {
    let (status, body) = post(&invoke_url(srv, "ok"), r#"{"input":{"value":"still up"}}"#).await;
    assert_eq!((status, body.as_str()), (200, r#"{"output":"still up"}"#));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashing_agent_fails_its_call_and_the_worker_is_replaced() {
    let srv = server(fixture("faulty")).arg("--workers").arg("1").start();
    let (status, body) = post(&invoke_url(&srv, "crash"), r#"{"input":{"code":7}}"#).await;
    assert_eq!(status, 502, "{body}");
    let v = json(&body);
    assert_eq!(v["error"]["code"], "agent_crashed");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("exited with code 7"),
        "{body}"
    );

    // The compat route answers RunAgent's envelope (HTTP 200, success false) with its own code.
    let (status, body) = post(
        &srv.url(&format!("/api/v1/agents/{FAULTY}/run")),
        r#"{"entrypoint_tag":"segfault","input_args":[],"input_kwargs":{}}"#,
    )
    .await;
    assert_eq!(status, 200);
    let v = json(&body);
    assert_eq!(v["success"], false);
    assert_eq!(v["error"]["code"], "AGENT_CRASHED");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("SIGSEGV"),
        "{body}"
    );

    // With one worker, the next call can only succeed on a respawned worker.
    assert_ok_after(&srv).await;
    assert!(srv.log_text().contains("worker died"), "{}", srv.log_text());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_agent_hits_its_deadline_and_its_worker_is_killed() {
    let srv = server(fixture("faulty")).arg("--workers").arg("1").start();
    let before = descendants(srv.pid());
    let started = Instant::now();
    // `hang` has a 1 s deadline in its config.
    let (status, body) = post(&invoke_url(&srv, "hang"), "{}").await;
    let took = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert_eq!(json(&body)["error"]["code"], "timeout_error");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "took {took:?}"
    );
    // The very next call must wait for the replacement, not land on the worker being killed.
    assert_ok_after(&srv).await;
    // A request may ask for its own deadline.
    let (status, _) = post(
        &invoke_url(&srv, "async_sleep"),
        r#"{"input":{"seconds":5},"timeout_s":0.5}"#,
    )
    .await;
    assert_eq!(status, 504);
    assert_ok_after(&srv).await;
    // The hung worker is gone, replaced by a new one.
    for pid in before {
        assert!(!alive(pid), "worker {pid} survived its deadline");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_output_becomes_log_lines_and_never_corrupts_the_protocol() {
    let srv = server(fixture("faulty")).start();
    let (status, body) = post(
        &invoke_url(&srv, "printer"),
        r#"{"input":{"message":"hello"}}"#,
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"output":{"echo": "hello"}}"#)
    );
    assert!(
        srv.wait_log("printed to stdout: hello", Duration::from_secs(5)),
        "{}",
        srv.log_text()
    );
    assert!(srv.wait_log("and to stderr", Duration::from_secs(5)));
    assert_ok_after(&srv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn env_vars_dotenv_and_working_directory() {
    let srv = app(fixture("faulty")).start().await;
    let (status, body) = post(&invoke_url(&srv, "env_and_cwd"), "{}").await;
    assert_eq!(status, 200, "{body}");
    let out = &json(&body)["output"];
    assert_eq!(out["var"], "from-config");
    assert_eq!(
        out["dotenv"], "dotenv-value",
        ".env overrides env_vars, as in RunAgent"
    );
    assert_eq!(out["cwd"], fixture("faulty").display().to_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_client_that_leaves_mid_stream_stops_the_generator_and_frees_the_worker() {
    let srv = server(fixture("faulty")).arg("--workers").arg("1").start();
    let marker = srv.dirs.path().join("stopped.txt");
    let (mut ws, _) = tokio_tungstenite::connect_async(
        srv.ws_url(&format!("/api/v1/agents/{FAULTY}/run-stream")),
    )
    .await
    .expect("connect");
    let start = serde_json::json!({"entrypoint_tag": "endless_stream", "input_args": [], "input_kwargs": {"marker": marker}});
    ws.send(Message::Text(start.to_string().into()))
        .await
        .expect("send");
    let mut data = 0;
    while data < 5 {
        if let Some(Ok(Message::Text(t))) = ws.next().await
            && t.contains("\"type\":\"data\"")
        {
            data += 1;
        }
    }
    drop(ws); // vanish without a close frame
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marker.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        marker.exists(),
        "the generator was not stopped:\n{}",
        srv.log_text()
    );
    // The only worker is free again.
    assert_ok_after(&srv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_sse_client_that_leaves_mid_stream_stops_the_generator() {
    let srv = server(fixture("faulty")).arg("--workers").arg("1").start();
    let marker = srv.dirs.path().join("sse-stopped.txt");
    let body = serde_json::json!({"input": {"marker": marker}}).to_string();
    let resp = client()
        .post(srv.url("/v1/agents/faulty/entrypoints/endless_stream/stream"))
        .body(body)
        .send()
        .await
        .expect("stream");
    assert_eq!(resp.status().as_u16(), 200);
    let mut bytes = resp.bytes_stream();
    let mut seen = String::new();
    while seen.matches("event: chunk").count() < 3 {
        let piece = bytes.next().await.expect("more").expect("bytes");
        seen.push_str(&String::from_utf8_lossy(&piece));
    }
    drop(bytes);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marker.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(marker.exists(), "the generator was not stopped");
    assert_ok_after(&srv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_stays_fast_while_eight_slow_sync_generators_stream() {
    let srv = app(fixture("faulty"))
        .arg("--workers")
        .arg("8")
        .start()
        .await;
    let mut streams = Vec::new();
    for _ in 0..8 {
        let url = srv.ws_url(&format!("/api/v1/agents/{FAULTY}/run-stream"));
        streams.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
            let start = r#"{"entrypoint_tag":"slow_stream","input_args":[],"input_kwargs":{"n":8,"delay_s":0.25}}"#;
            ws.send(Message::Text(start.into())).await.expect("send");
            let mut chunks = 0;
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Text(t) = m {
                    if t.contains("\"type\":\"data\"") {
                        chunks += 1;
                    }
                    if t.contains("stream_completed") {
                        break;
                    }
                }
            }
            chunks
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = client();
    let mut latencies = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let r = client
            .get(srv.url("/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(r.status().as_u16(), 200);
        r.bytes().await.expect("body");
        latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for s in streams {
        assert_eq!(s.await.expect("stream task"), 8);
    }
    // Coarse on purpose, so that a loaded machine cannot fail it: a server whose streams block
    // its runtime stalls /healthz for a stream's length (8 × 250 ms); a healthy one answers at
    // once. The fine latency figure belongs to bench/, not to a test.
    let slowest = latencies.iter().max().copied().unwrap_or_default();
    assert!(
        slowest < Duration::from_millis(1000),
        "healthz stalled for {slowest:?} while generators stream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn async_entrypoints_share_a_worker() {
    let srv = app(fixture("faulty"))
        .arg("--workers")
        .arg("1")
        .start()
        .await;
    let t = Instant::now();
    let calls = (0..10).map(|_| {
        post_owned(
            invoke_url(&srv, "async_sleep"),
            r#"{"input":{"seconds":1}}"#,
        )
    });
    for (status, body) in futures_util::future::join_all(calls).await {
        assert_eq!((status, body.as_str()), (200, r#"{"output":1}"#));
    }
    // Ten one-second sleeps on one worker finish together, not one after another.
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn short_calls_never_queue_behind_a_slow_one() {
    let srv = app(fixture("faulty"))
        .args(["--workers", "2", "--pipeline-depth", "8"])
        .start()
        .await;
    // Teach the pool that `ok` is short (it only pipelines entrypoints known to be short).
    for _ in 0..20 {
        assert_ok_after(&srv).await;
    }
    let slow_url = invoke_url(&srv, "sleepy");
    let slow = tokio::spawn(async move { post(&slow_url, r#"{"input":{"seconds":3}}"#).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One worker sleeps for 3 s; 64 short calls must all go through the other one meanwhile.
    let t = Instant::now();
    let calls = (0..64).map(|_| post_owned(invoke_url(&srv, "ok"), "{}"));
    for (status, body) in futures_util::future::join_all(calls).await {
        assert_eq!((status, body.as_str()), (200, r#"{"output":"ok"}"#));
    }
    assert!(
        t.elapsed() < Duration::from_millis(2000),
        "short calls waited behind the slow one: {:?}",
        t.elapsed()
    );
    assert_eq!(slow.await.expect("slow call").0, 200);
}

async fn post_owned(url: String, body: &'static str) -> (u16, String) {
    post(&url, body).await
}

/// Calls `spawn_and_hang` (a hung call whose agent started a grandchild process); returns the
/// grandchild's pid and the pending call's status.
async fn start_a_grandchild(
    srv: &Server,
) -> (u32, tokio::task::JoinHandle<Result<u16, reqwest::Error>>) {
    let pidfile = srv.dirs.path().join("grandchild.pid");
    let url = invoke_url(srv, "spawn_and_hang");
    let body = serde_json::json!({"input": {"pidfile": pidfile}}).to_string();
    let hung = tokio::spawn(async move {
        client()
            .post(url)
            .body(body)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pidfile.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let grandchild = std::fs::read_to_string(&pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("pid");
    (grandchild, hung)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_leaves_no_process_behind() {
    let mut srv = server(fixture("faulty"))
        .arg("--workers")
        .arg("2")
        .arg("--shutdown-grace-s")
        .arg("1")
        .start();
    // One worker busy in a hung call that also started a grandchild process.
    let (grandchild, hung) = start_a_grandchild(&srv).await;
    let family = descendants(srv.pid());
    assert!(
        family.len() >= 3,
        "expected 2 workers and a grandchild, found {family:?}"
    );
    assert!(family.contains(&grandchild));
    let code = srv.stop(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(code, Some(0), "exit code");
    // The in-flight call got an answer (an error: its worker was stopped), not a hang.
    let answered = tokio::time::timeout(Duration::from_secs(5), hung).await;
    assert!(answered.is_ok(), "the in-flight request never ended");
    std::thread::sleep(Duration::from_millis(200));
    let survivors: Vec<u32> = family.into_iter().filter(|p| alive(*p)).collect();
    assert!(survivors.is_empty(), "processes left behind: {survivors:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_hog_is_stopped_by_its_limit() {
    let srv = app(fixture("faulty"))
        .args(["--workers", "1", "--worker-memory-mb", "300"])
        .start()
        .await;
    let (status, body) = post(&invoke_url(&srv, "hog_memory"), r#"{"input":{"mb":1024}}"#).await;
    assert_eq!(status, 500, "{body}");
    let v = json(&body);
    assert_eq!(v["error"]["code"], "agent_error");
    assert_eq!(v["error"]["details"]["exception_type"], "MemoryError");
    assert_ok_after(&srv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_result_over_the_frame_limit_fails_cleanly() {
    let srv = app(fixture("faulty"))
        .args(["--workers", "1", "--max-frame-bytes", "100000"])
        .start()
        .await;
    let (status, body) = post(&invoke_url(&srv, "big_output"), r#"{"input":{"n":200000}}"#).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(json(&body)["error"]["code"], "agent_crashed");
    assert_ok_after(&srv).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_loop_is_reported_not_spun() {
    let srv = server(fixture("crashloop"))
        .args(["--workers", "1"])
        .start();
    // Workers die 0.2 s after each start; after five early deaths the agent is in a crash loop,
    // readiness fails and names it, and calls fail fast instead of waiting for a worker.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = None;
    while Instant::now() < deadline {
        let (status, body) = get(&srv.url("/readyz")).await;
        let v = json(&body);
        if status == 503 && v["agents"]["crashloop"]["crash_loop"].is_string() {
            seen = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = seen.unwrap_or_else(|| panic!("no crash loop reported:\n{}", srv.log_text()));
    assert_eq!(v["status"], "not_ready");
    assert_eq!(v["agents"]["crashloop"]["live_workers"], 0);
    // (A respawned worker lives 0.2 s; a call that lands in that window gets 502 instead.)
    let mut answers = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let (status, body) =
            post(&srv.url("/v1/agents/crashloop/entrypoints/ok/invoke"), "{}").await;
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "the call waited {:?}",
            t.elapsed()
        );
        answers.push((status, json(&body)["error"]["code"].clone()));
        if status == 503 {
            break;
        }
    }
    assert!(
        answers.contains(&(503, serde_json::json!("unavailable"))),
        "{answers:?}"
    );
    assert!(
        srv.log_text().contains("crash-looping"),
        "{}",
        srv.log_text()
    );
    // Respawns back off: far fewer than one attempt per 0.2 s over the test's duration.
    let respawns = srv.log_text().matches("worker died").count();
    assert!(respawns < 12, "{respawns} respawns: it spins");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_servers_own_settings_never_reach_a_workers_environment() {
    let srv = server(fixture("faulty"))
        .env("AGENTRY_RATE_LIMIT_POSTGRES_PASSWORD_EXAMPLE", "s3cret")
        .env("AGENTRY_RUNS_DB_BUSY_TIMEOUT_S", "2")
        .start();
    let (status, body) = post(&invoke_url(&srv, "env_and_cwd"), "{}").await;
    assert_eq!(status, 200, "{body}");
    let vars = json(&body)["output"]["agentry_vars"].clone();
    assert_eq!(vars, json!(["AGENTRY_FD", "AGENTRY_MAX_FRAME"]), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_server_leaves_no_worker_and_no_grandchild_behind() {
    let mut srv = server(fixture("faulty")).arg("--workers").arg("1").start();
    let (grandchild, _hung) = start_a_grandchild(&srv).await;
    let family = descendants(srv.pid());
    assert!(family.contains(&grandchild), "{family:?}");
    srv.stop(nix::sys::signal::Signal::SIGKILL);
    // No chance to clean up: the workers see their parent die and take their groups with them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while family.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let survivors: Vec<u32> = family.into_iter().filter(|p| alive(*p)).collect();
    assert!(survivors.is_empty(), "processes left behind: {survivors:?}");
}

/// An agent whose workers die and then cannot start again: runs that were waiting for a worker
/// do not stay leased for ever; they go back to the queue (or fail once their attempts are
/// used), and no more are leased until a worker lives again.
#[tokio::test(flavor = "multi_thread")]
async fn runs_waiting_for_a_worker_that_never_comes_back_do_not_wait_for_ever() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("breaks");
    std::fs::create_dir(&dir).expect("dir");
    // The first worker imports; every later one fails to (the agent broke on disk). Calling
    // `die` kills the worker that runs it.
    let marker = tmp.path().join("started");
    std::fs::write(
        dir.join("agent.py"),
        format!(
            "import os, time\nMARKER = {marker:?}\nif os.path.exists(MARKER):\n    raise ImportError('broken after the first start')\nopen(MARKER, 'w').close()\n\n\ndef die(ctx=None):\n    time.sleep(0.3)\n    os._exit(3)\n",
            marker = marker.display().to_string()
        ),
    )
    .expect("agent");
    std::fs::write(
        dir.join("runagent.config.json"),
        serde_json::json!({
            "agent_name": "breaks", "description": "", "framework": "default", "template": "",
            "version": "1", "created_at": "2025-01-01 00:00:00",
            "template_source": {"repo_url": "", "author": "", "path": ""},
            "agent_architecture": {"entrypoints": [{"file": "agent.py", "module": "die", "tag": "die"}]},
            "agent_id": "b0b0b0b0-0000-4000-8000-000000000001"
        })
        .to_string(),
    )
    .expect("config");
    let srv = server(dir).args(["--workers", "1"]).start();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, text) = post(
            &srv.url("/v1/runs"),
            &serde_json::json!({"agent": "breaks", "entrypoint": "die", "max_attempts": 2})
                .to_string(),
        )
        .await;
        assert_eq!(status, 202, "{text}");
        ids.push(json(&text)["id"].as_str().expect("id").to_string());
    }
    // None stays leased with no worker to run it: each goes back to the queue (where it keeps
    // its remaining attempts until a worker is back), or fails once its attempts are used.
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in &ids {
        loop {
            let run = json(&get(&srv.url(&format!("/v1/runs/{id}"))).await.1);
            if run["status"] == "queued" || run["status"] == "failed" {
                break;
            }
            assert!(Instant::now() < deadline, "a run stayed leased: {run}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // And the node leases none of them while no worker lives.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let running = json(&get(&srv.url("/v1/runs?status=running")).await.1);
    assert_eq!(running["runs"], serde_json::json!([]), "{running}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_the_agent_forks_may_get_sigusr2_without_taking_the_worker_down() {
    let srv = app(fixture("faulty"))
        .arg("--workers")
        .arg("1")
        .start()
        .await;
    let (status, body) = post(&invoke_url(&srv, "fork_and_signal"), "{}").await;
    assert_eq!((status, body.as_str()), (200, r#"{"output":"survived"}"#));
    assert_ok_after(&srv).await;
}
