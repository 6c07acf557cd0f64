//! Rate limits shared across nodes through the real PostgreSQL server (127.0.0.1:5432,
//! database `test`, or `AGENTRY_TEST_POSTGRES_URL`): two server processes, one bucket. No
//! skipping: without PostgreSQL the servers refuse to start and these tests fail.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;

fn pg_url() -> String {
    std::env::var("AGENTRY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The typed fixture under a fresh agent id, so that its buckets are this test's alone.
fn fresh_agent(dir: &Path) -> (PathBuf, String) {
    let src = fixture("typed");
    let dst = dir.join("agent");
    std::fs::create_dir_all(&dst).expect("mkdir");
    std::fs::copy(src.join("agent.py"), dst.join("agent.py")).expect("copy");
    let id = uuid::Uuid::new_v4().to_string();
    let config = std::fs::read_to_string(src.join("runagent.config.json"))
        .expect("config")
        .replace("33333333-4444-5555-6666-777777777777", &id);
    std::fs::write(dst.join("runagent.config.json"), config).expect("write");
    (dst, id)
}

fn node(agent: &Path, limit: &str) -> Server {
    sharing(agent, limit, &["--rate-limit-postgres", &pg_url()])
}

/// A node with `limit` per agent, sharing it through the database that `through` names.
fn sharing(agent: &Path, limit: &str, through: &[&str]) -> Server {
    server(agent.to_path_buf())
        .args(["--agent-rate-limit", limit, "--rate-limit-sync-ms", "50"])
        .args(through.iter().copied())
        .start()
}

async fn call(srv: &Server) -> (u16, Option<String>) {
    let resp = client()
        .post(srv.url("/v1/agents/typed_fixture/entrypoints/anything/invoke"))
        .body("{}")
        .send()
        .await
        .expect("request");
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (resp.status().as_u16(), retry)
}

#[tokio::test(flavor = "multi_thread")]
async fn what_one_node_spends_the_other_cannot() {
    let dir = tempfile::tempdir().expect("dir");
    let (agent, _) = fresh_agent(dir.path());
    // One request per second, a burst of four, for this agent on every node.
    let a = node(&agent, "invoke=1:4");
    let b = node(&agent, "invoke=1:4");
    assert!(a.wait_log("shared with the other nodes", Duration::from_secs(5)));
    for i in 0..4 {
        assert_eq!(call(&a).await.0, 200, "request {i} on node A");
    }
    // A few sync intervals later node B knows: the bucket is empty everywhere.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let (status, retry) = call(&b).await;
    assert_eq!(status, 429, "node B admitted what node A had spent");
    assert_eq!(retry.as_deref(), Some("1"));
    // And it refills at the shared rate, for both.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(call(&b).await.0, 200);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        call(&a).await.0,
        429,
        "node A admitted what node B had just spent"
    );
}

/// Nodes whose runs are in PostgreSQL share their limits through that database, with no
/// second URL.
#[tokio::test(flavor = "multi_thread")]
async fn nodes_on_one_run_database_share_limits_through_it() {
    let dir = tempfile::tempdir().expect("dir");
    let (agent, _) = fresh_agent(dir.path());
    let schema = crate::common::pg::schema();
    let url = pg_url();
    let through = ["--database", url.as_str(), "--database-schema", &schema];
    let a = sharing(&agent, "invoke=1:3", &through);
    let b = sharing(&agent, "invoke=1:3", &through);
    assert!(b.wait_log("shared with the other nodes", Duration::from_secs(5)));
    for i in 0..3 {
        assert_eq!(call(&a).await.0, 200, "request {i} on node A");
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        call(&b).await.0,
        429,
        "node B admitted what node A had spent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_busy_nodes_stay_within_the_documented_bound() {
    let dir = tempfile::tempdir().expect("dir");
    let (agent, _) = fresh_agent(dir.path());
    let (rate, burst, sync_s, nodes) = (2.0, 6.0, 0.05, 2.0);
    let servers = [node(&agent, "invoke=2:6"), node(&agent, "invoke=2:6")];
    let admitted = Arc::new(AtomicU32::new(0));
    let window = Duration::from_secs(4);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for srv in &servers {
        let url = srv.url("/v1/agents/typed_fixture/entrypoints/anything/invoke");
        let admitted = Arc::clone(&admitted);
        tasks.push(tokio::spawn(async move {
            let c = client();
            while start.elapsed() < window {
                let r = c.post(&url).body("{}").send().await.expect("request");
                if r.status().as_u16() == 200 {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let got = f64::from(admitted.load(Ordering::Relaxed));
    // docs/api.md: at most burst + rate × window, plus what the other nodes admit within one
    // sync interval before they see each other: (nodes − 1) × (burst + rate × interval).
    let bound = burst + rate * elapsed + (nodes - 1.0) * (burst + rate * sync_s);
    // Each node on its own would admit nodes × (burst + rate × window) = 28 here.
    assert!(
        got <= bound.ceil(),
        "admitted {got} in {elapsed:.2} s, bound {bound:.1}"
    );
    assert!(
        got >= burst,
        "admitted only {got}: the shared bucket starved both nodes"
    );
}

#[test]
fn an_unreachable_database_stops_start_up_without_showing_the_password() {
    let dir = tempfile::tempdir().expect("dir");
    let (agent, _) = fresh_agent(dir.path());
    let log = match server(agent)
        .args([
            "--agent-rate-limit",
            "invoke=5",
            "--rate-limit-postgres",
            "postgres://agentry:s3cret-pw@127.0.0.1:1/nowhere",
        ])
        .try_start()
    {
        Ok(_) => panic!("started without its rate-limit database"),
        Err(log) => log,
    };
    assert!(
        log.contains("--rate-limit-postgres: cannot use the database"),
        "{log}"
    );
    assert!(
        !log.contains("s3cret-pw"),
        "the password reached the log: {log}"
    );
}
