//! Runs the store contract (`contract/`) against every backend, each test on a fresh store.

mod contract;

use agentry_store::{PgOptions, PgStore, SqliteOptions, SqliteStore};

/// Instantiates every contract test for one backend: `$open` gives a guard (kept alive for the
/// test) and a fresh store.
macro_rules! contract_tests {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn claims_follow_priority_then_age_and_keys_serialise() {
                let (_keep, store) = $open;
                contract::claims_follow_priority_then_age_and_keys_serialise(&store).await;
            }

            #[tokio::test]
            async fn a_stale_lease_cannot_write_or_complete_the_run() {
                let (_keep, store) = $open;
                contract::a_stale_lease_cannot_write_or_complete_the_run(&store).await;
            }

            #[tokio::test]
            async fn a_restarted_node_requeues_its_previous_lifes_runs_at_once() {
                let (_keep, store) = $open;
                contract::a_restarted_node_requeues_its_previous_lifes_runs_at_once(&store).await;
            }

            #[tokio::test]
            async fn checkpoints_reach_the_next_attempt_and_events_are_numbered() {
                let (_keep, store) = $open;
                contract::checkpoints_reach_the_next_attempt_and_events_are_numbered(&store).await;
            }

            #[tokio::test]
            async fn idempotency_and_retention() {
                let (_keep, store) = $open;
                contract::idempotency_and_retention(&store).await;
            }
            #[tokio::test]
            async fn schedules_fire_each_slot_once_and_move_on() {
                let (_keep, store) = $open;
                contract::schedules_fire_each_slot_once_and_move_on(&store).await;
            }
            #[tokio::test]
            async fn callbacks_are_leased_once_and_a_resend_in_flight_holds() {
                let (_keep, store) = $open;
                contract::callbacks_are_leased_once_and_a_resend_in_flight_holds(&store).await;
            }
            #[tokio::test]
            async fn an_entrypoint_cap_holds_across_claims() {
                let (_keep, store) = $open;
                contract::an_entrypoint_cap_holds_across_claims(&store).await;
            }
            #[tokio::test]
            async fn trigger_cursors_start_at_the_end_and_only_move_forward() {
                let (_keep, store) = $open;
                contract::trigger_cursors_start_at_the_end_and_only_move_forward(&store).await;
            }
            #[tokio::test]
            async fn the_global_log_orders_events_and_forgets_purged_runs() {
                let (_keep, store) = $open;
                contract::the_global_log_orders_events_and_forgets_purged_runs(&store).await;
            }
            #[tokio::test]
            async fn the_last_event_seq_is_the_end_of_the_log() {
                let (_keep, store) = $open;
                contract::the_last_event_seq_is_the_end_of_the_log(&store).await;
            }
        }
    };
}

/// A fresh SQLite store in its own directory.
fn sqlite() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("dir");
    let store =
        SqliteStore::open(&dir.path().join("runs.db"), SqliteOptions::default()).expect("open");
    (dir, store)
}

contract_tests!(sqlite, sqlite());

/// The PostgreSQL server the tests use (127.0.0.1:5432, database `test`, or
/// `AGENTRY_TEST_POSTGRES_URL`). No skipping: without it these tests fail.
fn pg_url() -> String {
    std::env::var("AGENTRY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A schema of its own for one test, dropped with it.
struct PgSchema(String);

impl Drop for PgSchema {
    fn drop(&mut self) {
        let schema = self.0.clone();
        // The test's runtime may be shutting down: drop the schema from a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut c) = sqlx::PgConnection::connect(&pg_url()).await {
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS {schema} CASCADE"
                    )))
                    .execute(&mut c)
                    .await;
                }
            });
        })
        .join();
    }
}

/// A fresh PostgreSQL store in a schema of its own.
async fn postgres() -> (PgSchema, PgStore) {
    let schema = format!(
        "agentry_test_{}",
        uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .get(..16)
            .unwrap_or("x")
    );
    let store = PgStore::connect(&PgOptions {
        url: pg_url(),
        max_connections: 4,
        acquire_timeout: std::time::Duration::from_secs(5),
        batches_in_flight: 1,
        schema: Some(schema.clone()),
    })
    .await
    .expect("PostgreSQL must be running for these tests (see .ci/run)");
    (PgSchema(schema), store)
}

contract_tests!(postgres, postgres().await);

/// Another process holds the database's write lock: every waiting write fails together within
/// about one busy timeout, instead of one after another.
#[tokio::test(flavor = "multi_thread")]
async fn a_locked_database_fails_a_whole_group_at_once() {
    use agentry_core::store::{RunStore, StoreError};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("runs.db");
    let options = SqliteOptions {
        busy_timeout: Duration::from_millis(300),
        ..SqliteOptions::default()
    };
    let store = Arc::new(SqliteStore::open(&path, options).expect("open"));
    let other = rusqlite::Connection::open(&path).expect("another connection");
    other.execute_batch("BEGIN IMMEDIATE").expect("lock");
    let started = Instant::now();
    let writes = (0..40).map(|i| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let run = contract::new_run(&format!("r{i}"), 0, None);
            store.create_run(run, None).await.map(|_| ())
        })
    });
    for write in futures_util::future::join_all(writes).await {
        assert!(matches!(
            write.expect("task"),
            Err(StoreError::Unavailable(_))
        ));
    }
    // Forty writes one after another would take 12 s; a group fails together.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the writes failed one busy timeout after another: {:?}",
        started.elapsed()
    );
    other.execute_batch("ROLLBACK").expect("unlock");
}

/// Another node on the same PostgreSQL schema.
async fn another_node(schema: &PgSchema) -> PgStore {
    PgStore::connect(&PgOptions {
        url: pg_url(),
        max_connections: 4,
        acquire_timeout: std::time::Duration::from_secs(5),
        batches_in_flight: 1,
        schema: Some(schema.0.clone()),
    })
    .await
    .expect("connect")
}

fn claim_for(owner: &str, n: usize) -> agentry_core::runs::ClaimRequest {
    let now = agentry_core::runs::now_ms();
    agentry_core::runs::ClaimRequest {
        node: owner.into(),
        owner: owner.into(),
        now,
        lease_until: now + 60_000,
        per_agent: vec![("a".into(), n)],
        cluster: Default::default(),
        entrypoint_caps: Vec::new(),
    }
}

/// Four nodes claiming the same queue at once (`FOR UPDATE SKIP LOCKED`) never take one run
/// twice, and together take every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_concurrent_claimers_never_take_the_same_run() {
    use agentry_core::store::RunStore;
    let (schema, store) = postgres().await;
    for i in 0..300 {
        store
            .create_run(contract::new_run(&format!("r{i:03}"), 0, None), None)
            .await
            .expect("create");
    }
    let mut nodes = Vec::new();
    for n in 0..4 {
        let node = another_node(&schema).await;
        nodes.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = node
                    .claim_runs(claim_for(&format!("node{n}"), 7))
                    .await
                    .expect("claim");
                if got.runs.is_empty() {
                    break mine;
                }
                mine.extend(got.runs.into_iter().map(|c| c.run.id));
            }
        }));
    }
    let mut all = Vec::new();
    for node in nodes {
        all.extend(node.await.expect("node"));
    }
    let total = all.len();
    all.sort();
    all.dedup();
    assert_eq!((total, all.len()), (300, 300), "claimed twice or lost");
}

/// Runs sharing a concurrency key never run two at a time, whichever node claims them, and run
/// in enqueue order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_a_concurrency_key_holds_across_claimers() {
    use agentry_core::runs::{LeaseRef, Outcome, RunQuery, RunStatus};
    use agentry_core::store::RunStore;
    let (schema, store) = postgres().await;
    for i in 0..40 {
        store
            .create_run(
                contract::new_run(&format!("k{i:02}"), 0, Some("shared")),
                None,
            )
            .await
            .expect("create");
    }
    let order = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut nodes = Vec::new();
    for n in 0..4 {
        let node = another_node(&schema).await;
        let order = std::sync::Arc::clone(&order);
        nodes.push(tokio::spawn(async move {
            let owner = format!("node{n}");
            let mut idle = 0;
            while idle < 50 {
                let got = node.claim_runs(claim_for(&owner, 3)).await.expect("claim");
                if got.runs.is_empty() {
                    idle += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    continue;
                }
                idle = 0;
                assert_eq!(got.runs.len(), 1, "two runs of one key in one claim");
                let run = &got.runs[0].run;
                let running = node
                    .list_runs(RunQuery {
                        status: Some(RunStatus::Running),
                        concurrency_key: Some("shared".into()),
                        limit: 100,
                        ..RunQuery::default()
                    })
                    .await
                    .expect("list");
                assert_eq!(running.len(), 1, "two runs of one key at once: {running:?}");
                order.lock().push(run.id.clone());
                let lease = LeaseRef {
                    run_id: run.id.clone(),
                    owner: owner.clone(),
                    attempt: run.attempt,
                };
                node.finish_run(lease, Outcome::Succeeded { result: "1".into() }, None)
                    .await
                    .expect("finish");
            }
        }));
    }
    for node in nodes {
        node.await.expect("node");
    }
    let order = order.lock().clone();
    let expected: Vec<String> = (0..40).map(|i| format!("k{i:02}")).collect();
    assert_eq!(order, expected);
}

/// Lease expiry is judged on the database's clock: a node whose clock runs a minute ahead
/// (it passes "now" a minute late) does not take another node's fresh lease, while a lease
/// that really expired is taken back whatever the reaper's clock says.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_a_reaper_whose_clock_runs_ahead_leaves_fresh_leases_alone() {
    use agentry_core::runs::now_ms;
    use agentry_core::store::RunStore;
    let (_schema, store) = postgres().await;
    for id in ["fresh", "stale"] {
        store
            .create_run(contract::new_run(id, 0, None), None)
            .await
            .expect("create");
    }
    let mut fresh = claim_for("A", 1);
    fresh.lease_until = fresh.now + 30_000;
    assert_eq!(store.claim_runs(fresh).await.expect("claim").runs.len(), 1);
    let mut stale = claim_for("B", 1);
    stale.lease_until = stale.now - 1;
    assert_eq!(store.claim_runs(stale).await.expect("claim").runs.len(), 1);
    let ahead = now_ms() + 60_000;
    let taken = store
        .recover_leases(ahead, None, Vec::new())
        .await
        .expect("recover");
    let ids: Vec<&str> = taken.iter().map(|f| f.run.id.as_str()).collect();
    assert_eq!(ids, ["stale"], "only the lease that really expired");
}

/// Cluster-wide caps hold across nodes claiming at once: four nodes, each asking for more than
/// the caps allow, never hold more than 3 runs of agent `a`, nor more than 4 runs in all
/// (agents `a` and `b`), at any moment, counted from the database right after each claim;
/// and together they run every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_cluster_caps_hold_across_claimers() {
    use agentry_core::runs::{ClusterCaps, LeaseRef, Outcome, RunQuery, RunStatus};
    use agentry_core::store::RunStore;
    let (schema, store) = postgres().await;
    for i in 0..60 {
        let mut run = contract::new_run(&format!("c{i:02}"), 0, None);
        if i % 2 == 1 {
            run.agent = "b".into();
        }
        store.create_run(run, None).await.expect("create");
    }
    let most = std::sync::Arc::new(parking_lot::Mutex::new((0usize, 0usize)));
    let mut nodes = Vec::new();
    for n in 0..4 {
        let node = another_node(&schema).await;
        let most = std::sync::Arc::clone(&most);
        nodes.push(tokio::spawn(async move {
            let owner = format!("node{n}");
            let mut done = 0;
            let mut idle = 0;
            while idle < 100 {
                let mut request = claim_for(&owner, 5);
                request.per_agent.push(("b".into(), 5));
                request.cluster = ClusterCaps {
                    total: Some(4),
                    per_agent: Some(3),
                };
                let got = node.claim_runs(request).await.expect("claim");
                if got.runs.is_empty() {
                    idle += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    continue;
                }
                idle = 0;
                let running = node
                    .list_runs(RunQuery {
                        status: Some(RunStatus::Running),
                        limit: 100,
                        ..RunQuery::default()
                    })
                    .await
                    .expect("list");
                let of_a = running.iter().filter(|r| r.agent == "a").count();
                {
                    let mut m = most.lock();
                    m.0 = m.0.max(of_a);
                    m.1 = m.1.max(running.len());
                }
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
                for claimed in got.runs {
                    let lease = LeaseRef {
                        run_id: claimed.run.id.clone(),
                        owner: owner.clone(),
                        attempt: claimed.run.attempt,
                    };
                    node.finish_run(lease, Outcome::Succeeded { result: "1".into() }, None)
                        .await
                        .expect("finish");
                    done += 1;
                }
            }
            done
        }));
    }
    let mut done = 0;
    for node in nodes {
        done += node.await.expect("node");
    }
    assert_eq!(done, 60, "every run ran once");
    let (of_a, in_all) = *most.lock();
    assert!(of_a <= 3, "{of_a} runs of agent a at once (cap 3)");
    assert!(in_all <= 4, "{in_all} runs at once (cap 4)");
    // The caps were reached, so the test shows them holding, not just a slow claimer.
    assert!(
        in_all >= 3,
        "only {in_all} at once: the caps were never approached"
    );
}

/// Four nodes fire twenty every-second schedules over the same eleven seconds at once (each
/// sweeping the same moments, in its own order): every slot fires exactly once, with one run,
/// and none is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_each_slot_fires_once_across_nodes() {
    use agentry_core::runs::RunQuery;
    use agentry_core::store::{RunStore, ScheduleStore};
    let (schema, store) = postgres().await;
    let t0 = 1_800_000_000_000;
    for i in 0..20 {
        store
            .create_schedule(contract::every_second(&format!("sch_{i:02}"), None, t0))
            .await
            .expect("create");
    }
    let mut handles = Vec::new();
    for _ in 0..4 {
        handles.push(another_node(&schema).await);
    }
    let together = std::sync::Arc::new(tokio::sync::Barrier::new(4));
    let mut nodes = Vec::new();
    for (n, node) in handles.into_iter().enumerate() {
        let together = std::sync::Arc::clone(&together);
        nodes.push(tokio::spawn(async move {
            together.wait().await;
            let mut fires = Vec::new();
            for step in 0..110 {
                let now = t0 + step * 100 + (n * 7) as i64;
                let batch = node
                    .fire_due(
                        now,
                        &format!("n{n}"),
                        vec!["a".into()],
                        7,
                        contract::planner(),
                    )
                    .await
                    .expect("fire");
                for f in batch.fired {
                    fires.extend(f.fires);
                }
            }
            fires
        }));
    }
    let mut all = Vec::new();
    let mut by_node = std::collections::HashMap::new();
    for n in nodes {
        let fires = n.await.expect("node");
        if let Some(f) = fires.first() {
            *by_node.entry(f.node.clone()).or_insert(0) += fires.len();
        }
        all.extend(fires);
    }
    let mut slots: Vec<(String, i64)> = all
        .iter()
        .map(|f| (f.schedule_id.clone(), f.slot))
        .collect();
    slots.sort();
    let before = slots.len();
    slots.dedup();
    assert_eq!(before, slots.len(), "a slot fired twice");
    assert_eq!(slots.len(), 20 * 11, "every slot of every schedule fired");
    for i in 0..20 {
        let id = format!("sch_{i:02}");
        let mine: Vec<i64> = slots
            .iter()
            .filter(|(s, _)| *s == id)
            .map(|(_, t)| *t)
            .collect();
        assert_eq!(
            mine,
            (0..=10).map(|k| t0 + k * 1_000).collect::<Vec<_>>(),
            "{id}"
        );
    }
    let runs = store
        .list_runs(RunQuery {
            limit: 1_000,
            ..RunQuery::default()
        })
        .await
        .expect("runs");
    assert_eq!(runs.len(), 220, "one run per fire");
    assert!(by_node.len() >= 2, "the nodes shared the work: {by_node:?}");
}
