//! The run store's contract: what every `RunStore` must do, whatever its database. Claims in
//! priority order under leases, fencing of stale leases, lease recovery, idempotency,
//! checkpoints and retention. Each check takes a fresh, empty store; `run_store.rs` runs the
//! whole suite against each backend (the PostgreSQL store will run the same suite).
#![allow(dead_code)]

use agentry_core::runs::{
    AttemptStart, Backoff, ClaimRequest, CreateOutcome, LeaseRef, NewEvent, NewRun, Outcome,
    RunStatus, now_ms,
};
use agentry_core::store::{RunStore, StoreError};

fn start(node: &str) -> AttemptStart {
    AttemptStart {
        at: now_ms(),
        node: node.into(),
    }
}

pub fn new_run(id: &str, priority: i32, key: Option<&str>) -> NewRun {
    let now = now_ms();
    NewRun {
        id: id.into(),
        agent: "a".into(),
        entrypoint: "e".into(),
        input: "{}".into(),
        idempotency_key: None,
        idempotency_scope: String::new(),
        request_hash: None,
        priority,
        run_at: now,
        timeout_ms: 1000,
        max_attempts: 3,
        backoff: Backoff::default(),
        concurrency_key: key.map(Into::into),
        metadata: "{}".into(),
        created_at: now,
    }
}

fn claim(owner: &str, n: usize, lease_ms: i64) -> ClaimRequest {
    let now = now_ms();
    ClaimRequest {
        node: owner.split('/').next().unwrap_or(owner).into(),
        owner: owner.into(),
        now,
        lease_until: now + lease_ms,
        per_agent: vec![("a".into(), n)],
        cluster: Default::default(),
    }
}

pub async fn claims_follow_priority_then_age_and_keys_serialise(s: &dyn RunStore) {
    for (id, p, k) in [
        ("r1", 0, None),
        ("r2", 5, None),
        ("r3", 0, Some("k")),
        ("r4", 9, Some("k")),
        ("r5", 0, None),
    ] {
        s.create_run(new_run(id, p, k), None).await.expect("create");
    }
    let got = s.claim_runs(claim("n/1", 10, 30_000)).await.expect("claim");
    let ids: Vec<&str> = got.runs.iter().map(|c| c.run.id.as_str()).collect();
    // r4 outranks r3 but was enqueued after it under the same key: it waits for r3.
    assert_eq!(ids, ["r2", "r1", "r3", "r5"]);
    assert!(
        got.runs
            .iter()
            .all(|c| c.run.status == RunStatus::Running && c.run.attempt == 1)
    );
    assert!(
        s.claim_runs(claim("n/1", 10, 30_000))
            .await
            .expect("claim")
            .runs
            .is_empty()
    );
    let lease = LeaseRef {
        run_id: "r3".into(),
        owner: "n/1".into(),
        attempt: 1,
    };
    s.finish_run(lease, Outcome::Succeeded { result: "1".into() }, None)
        .await
        .expect("finish");
    let next = s.claim_runs(claim("n/1", 10, 30_000)).await.expect("claim");
    assert_eq!(
        next.runs
            .iter()
            .map(|c| c.run.id.as_str())
            .collect::<Vec<_>>(),
        ["r4"]
    );
}

pub async fn a_stale_lease_cannot_write_or_complete_the_run(s: &dyn RunStore) {
    s.create_run(new_run("r", 0, None), None)
        .await
        .expect("create");
    // Node A claims with a lease that expires at once; the reaper requeues; node B claims.
    s.claim_runs(claim("A/1", 1, -1)).await.expect("claim");
    let recovered = s
        .recover_leases(now_ms() + 1, None, Vec::new())
        .await
        .expect("recover");
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].run.status, RunStatus::Queued);
    assert_eq!(recovered[0].run.lease_losses, 1);
    // The requeued run is due from the reaper's `now` on.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let b = s.claim_runs(claim("B/1", 1, 30_000)).await.expect("claim");
    assert_eq!(b.runs[0].run.attempt, 2);
    let stale = LeaseRef {
        run_id: "r".into(),
        owner: "A/1".into(),
        attempt: 1,
    };
    let fresh = LeaseRef {
        run_id: "r".into(),
        owner: "B/1".into(),
        attempt: 2,
    };
    let err = s
        .finish_run(
            stale.clone(),
            Outcome::Succeeded {
                result: "\"A\"".into(),
            },
            None,
        )
        .await;
    assert_eq!(err.err(), Some(StoreError::LeaseLost));
    assert_eq!(
        s.append_events(stale.clone(), vec![NewEvent::new("x", "{}")])
            .await
            .err(),
        Some(StoreError::LeaseLost)
    );
    assert_eq!(
        s.save_checkpoint(stale.clone(), "{}".into()).await.err(),
        Some(StoreError::LeaseLost)
    );
    assert_eq!(
        s.start_attempt(stale, start("A")).await.err(),
        Some(StoreError::LeaseLost)
    );
    let renewals = s
        .renew_leases(
            vec![
                LeaseRef {
                    run_id: "r".into(),
                    owner: "A/1".into(),
                    attempt: 1,
                },
                fresh.clone(),
            ],
            now_ms() + 1000,
            vec![],
        )
        .await
        .expect("renew");
    assert_eq!(
        renewals.iter().map(|r| r.held).collect::<Vec<_>>(),
        [false, true]
    );
    let done = s
        .finish_run(
            fresh,
            Outcome::Succeeded {
                result: "\"B\"".into(),
            },
            None,
        )
        .await
        .expect("finish");
    assert_eq!(done.run.result.as_deref(), Some("\"B\""));
    assert_eq!(done.run.status, RunStatus::Succeeded);
}

pub async fn a_restarted_node_requeues_its_previous_lifes_runs_at_once(s: &dyn RunStore) {
    s.create_run(new_run("r", 0, None), None)
        .await
        .expect("create");
    s.claim_runs(claim("N/old", 1, 60_000))
        .await
        .expect("claim");
    // Another node's live lease is left alone; this node's old incarnation's is taken back.
    assert!(
        s.recover_leases(now_ms(), Some(("M".into(), "M/new".into())), Vec::new())
            .await
            .expect("recover")
            .is_empty()
    );
    let back = s
        .recover_leases(now_ms(), Some(("N".into(), "N/new".into())), Vec::new())
        .await
        .expect("recover");
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].events[0].kind, "run.retrying");
}

pub async fn checkpoints_reach_the_next_attempt_and_events_are_numbered(s: &dyn RunStore) {
    s.create_run(new_run("r", 0, None), None)
        .await
        .expect("create");
    let c = s.claim_runs(claim("n/1", 1, 30_000)).await.expect("claim");
    assert_eq!(c.runs[0].checkpoint, None);
    let lease = LeaseRef {
        run_id: "r".into(),
        owner: "n/1".into(),
        attempt: 1,
    };
    s.start_attempt(lease.clone(), start("n"))
        .await
        .expect("start");
    s.save_checkpoint(lease.clone(), "{\"n\":1}".into())
        .await
        .expect("cp");
    s.save_checkpoint(lease.clone(), "{\"n\":2}".into())
        .await
        .expect("cp");
    s.append_events(
        lease.clone(),
        vec![NewEvent::new("a", "1"), NewEvent::new("b", "2")],
    )
    .await
    .expect("events");
    s.finish_run(
        lease,
        Outcome::Retry {
            error: "{}".into(),
            run_at: now_ms(),
            delay_ms: 0,
        },
        None,
    )
    .await
    .expect("retry");
    let c = s.claim_runs(claim("n/1", 1, 30_000)).await.expect("claim");
    assert_eq!(c.runs[0].checkpoint.as_deref(), Some("{\"n\":2}"));
    assert_eq!(c.runs[0].run.started_at, None, "the claim is not the start");
    let second = LeaseRef {
        run_id: "r".into(),
        owner: "n/1".into(),
        attempt: 2,
    };
    // The second attempt's start is written with its outcome, in one commit, before it.
    let done = s
        .finish_run(
            second,
            Outcome::Succeeded { result: "1".into() },
            Some(start("n")),
        )
        .await
        .expect("finish");
    let ended: Vec<&str> = done.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(ended, ["run.started", "run.succeeded"]);
    assert!(done.run.started_at.is_some());
    let evs = s.events_after("r", 0, 100).await.expect("events");
    let kinds: Vec<&str> = evs.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "run.queued",
            "run.started",
            "run.checkpoint",
            "run.checkpoint",
            "a",
            "b",
            "run.retrying",
            "run.started",
            "run.succeeded"
        ]
    );
    assert_eq!(
        evs.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=9).collect::<Vec<_>>()
    );
    assert_eq!(s.events_after("r", 6, 100).await.expect("events").len(), 3);
}

pub async fn idempotency_and_retention(s: &dyn RunStore) {
    let mut a = new_run("r1", 0, None);
    a.idempotency_key = Some("k".into());
    a.request_hash = Some("h1".into());
    assert!(matches!(
        s.create_run(a.clone(), None).await.expect("create"),
        CreateOutcome::Created { .. }
    ));
    let mut same = a.clone();
    same.id = "r2".into();
    assert!(
        matches!(s.create_run(same.clone(), None).await.expect("create"), CreateOutcome::Existing(r) if r.id == "r1")
    );
    same.request_hash = Some("h2".into());
    assert!(
        matches!(s.create_run(same.clone(), None).await.expect("create"), CreateOutcome::Conflict { existing_id } if existing_id == "r1")
    );
    // Another API key's scope: the same idempotency key is a new run, neither the first nor a
    // conflict with it.
    let mut other = same;
    other.id = "r3".into();
    other.idempotency_scope = "ak_other".into();
    assert!(matches!(
        s.create_run(other, None).await.expect("create"),
        CreateOutcome::Created { .. }
    ));
    // Retention removes finished runs only.
    s.create_run(new_run("q", 0, None), None)
        .await
        .expect("create");
    assert_eq!(s.cancel_run("r1", now_ms()).await.map(|_| ()), Ok(()));
    assert_eq!(s.purge_finished(now_ms() + 1, 10).await.expect("purge"), 1);
    assert!(s.get_run("r1").await.expect("get").is_none());
    assert!(
        s.events_after("r1", 0, 10)
            .await
            .expect("events")
            .is_empty()
    );
    assert!(s.get_run("q").await.expect("get").is_some());
}

pub async fn the_last_event_seq_is_the_end_of_the_log(s: &dyn RunStore) {
    assert_eq!(s.last_event_seq("run_missing").await.expect("read"), 0);
    let run = new_run("r1", 0, None);
    s.create_run(run, None).await.expect("create");
    assert_eq!(s.last_event_seq("r1").await.expect("read"), 1);
    let claimed = s.claim_runs(claim("n/1", 1, 30_000)).await.expect("claim");
    assert_eq!(claimed.runs.len(), 1);
    assert_eq!(
        s.last_event_seq("r1").await.expect("read"),
        1,
        "a claim writes no event"
    );
    let lease = LeaseRef {
        run_id: "r1".into(),
        owner: "n/1".into(),
        attempt: 1,
    };
    s.start_attempt(lease, start("n")).await.expect("start");
    let all = s.events_after("r1", 0, 100).await.expect("events");
    assert_eq!(
        s.last_event_seq("r1").await.expect("read"),
        all.len() as i64
    );
    assert_eq!(all.last().map(|e| e.seq), Some(2));
}
