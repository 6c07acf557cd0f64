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
        callback_url: None,
        correlation_id: None,
        depth: 0,
        parent_run_id: None,
        executor: None,
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
        entrypoint_caps: Vec::new(),
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

/// A schedule firing every second from `start`, of agent `a`, named `name`.
pub fn every_second(id: &str, name: Option<&str>, start: i64) -> agentry_core::schedules::Schedule {
    use agentry_core::schedules::{Schedule, ScheduleSpec};
    let spec: ScheduleSpec = serde_json::from_value(serde_json::json!({
        "agent": "a", "entrypoint": "e", "every": "1s", "name": name,
        "start_at": chrono::DateTime::from_timestamp_millis(start).map(|t| t.to_rfc3339()),
    }))
    .expect("a spec");
    let spec = spec.prepare(start, "UTC").expect("valid");
    Schedule {
        id: id.into(),
        owner: String::new(),
        spec,
        paused: false,
        next_fire_at: Some(start),
        fires: 0,
        last_fire_at: None,
        last_run_id: None,
        version: 1,
        created_at: start,
        updated_at: start,
    }
}

/// The planner of these tests: the schedule's own rules, each fire a plain run of `a`.
pub fn planner() -> agentry_core::store::SchedulePlanner {
    use agentry_core::schedules::{FireOutcome, FirePlan, NewFire, PlanRules, PlannedFire};
    std::sync::Arc::new(|due, now| {
        let rules = PlanRules {
            default_zone: "UTC",
            missed_after_ms: 60_000,
        };
        let plan = due.schedule.plan(now, due.previous_unfinished(), &rules);
        FirePlan {
            fires: plan
                .fires
                .iter()
                .map(|f| match f {
                    PlannedFire::Create(slot) => NewFire {
                        slot: *slot,
                        manual: false,
                        outcome: FireOutcome::Created,
                        run: Some(new_run(&agentry_core::runs::new_run_id(), 0, None)),
                        detail: None,
                    },
                    PlannedFire::SkipOverlap(slot) => NewFire {
                        slot: *slot,
                        manual: false,
                        outcome: FireOutcome::SkippedOverlap,
                        run: None,
                        detail: None,
                    },
                })
                .collect(),
            next_fire_at: plan.next_fire_at,
        }
    })
}

/// Schedules: a fire records each due slot once with its run and moves the schedule on; a
/// second look at the same moment fires nothing; manual fires do not move it; names are
/// unique per owner; a stale update is refused; only the served agents' schedules fire.
pub async fn schedules_fire_each_slot_once_and_move_on<S>(store: &S)
where
    S: agentry_core::store::ScheduleStore + RunStore,
{
    use agentry_core::schedules::{FireOutcome, NewFire};
    use agentry_core::store::ScheduleWrite;
    let t0 = 1_800_000_000_000;
    let s = every_second("sch_a", Some("tick"), t0);
    assert!(matches!(
        store.create_schedule(s.clone()).await.expect("create"),
        ScheduleWrite::Done(_)
    ));
    let twin = every_second("sch_b", Some("tick"), t0);
    assert_eq!(
        store.create_schedule(twin).await.expect("create"),
        ScheduleWrite::NameTaken("sch_a".into())
    );
    let mut other = every_second("sch_c", None, t0);
    other.spec.agent = "b".into();
    store.create_schedule(other).await.expect("create");

    let served = vec!["a".to_string()];
    let batch = store
        .fire_due(t0 + 2_500, "n1", served.clone(), 100, planner())
        .await
        .expect("fire");
    assert_eq!(batch.fired.len(), 1, "only agent a's schedule fires");
    let fired = &batch.fired[0];
    let slots: Vec<i64> = fired.fires.iter().map(|f| f.slot).collect();
    assert_eq!(slots, vec![t0, t0 + 1_000, t0 + 2_000]);
    assert_eq!(fired.runs.len(), 3);
    assert_eq!(fired.schedule.next_fire_at, Some(t0 + 3_000));
    assert_eq!(fired.schedule.fires, 3);
    assert_eq!(fired.schedule.last_fire_at, Some(t0 + 2_000));
    assert_eq!(
        fired.schedule.last_run_id.as_deref(),
        Some(fired.runs[2].0.id.as_str())
    );
    assert_eq!(batch.next_due, Some(t0 + 3_000));
    for (run, event) in &fired.runs {
        let stored = store.get_run(&run.id).await.expect("read").expect("stored");
        assert_eq!(stored.status, RunStatus::Queued);
        assert_eq!(event.seq, 1);
    }

    let again = store
        .fire_due(t0 + 2_500, "n2", served.clone(), 100, planner())
        .await
        .expect("fire");
    assert!(again.fired.is_empty(), "nothing is due twice");

    let manual = store
        .fire_manual(
            "sch_a",
            "n1",
            NewFire {
                slot: t0 + 2_600,
                manual: true,
                outcome: FireOutcome::Created,
                run: Some(new_run("manual-run", 0, None)),
                detail: None,
            },
            t0 + 2_600,
        )
        .await
        .expect("trigger")
        .expect("found");
    assert_eq!(manual.runs.len(), 1);
    assert_eq!(manual.schedule.next_fire_at, Some(t0 + 3_000));
    assert_eq!(manual.schedule.fires, 3, "a manual fire is not counted");
    assert_eq!(manual.schedule.last_run_id.as_deref(), Some("manual-run"));

    let fires = store.list_fires("sch_a", None, 2).await.expect("fires");
    assert_eq!(fires.len(), 2);
    assert!(fires[0].manual && fires[0].run_id.as_deref() == Some("manual-run"));
    assert_eq!(fires[1].slot, t0 + 2_000);
    let older = store
        .list_fires("sch_a", Some(fires[1].seq), 10)
        .await
        .expect("fires");
    assert_eq!(
        older.iter().map(|f| f.slot).collect::<Vec<_>>(),
        vec![t0 + 1_000, t0]
    );

    // A change made against an old version is refused; against the current one it is stored.
    let mut stale = s.clone();
    stale.paused = true;
    assert_eq!(
        store.update_schedule(stale).await.expect("update"),
        ScheduleWrite::Stale
    );
    let mut current = store
        .get_schedule("sch_a")
        .await
        .expect("read")
        .expect("found");
    current.paused = true;
    let ScheduleWrite::Done(paused) = store.update_schedule(current).await.expect("update") else {
        panic!("not stored");
    };
    assert!(paused.paused);
    let none = store
        .fire_due(t0 + 10_000, "n1", served.clone(), 100, planner())
        .await
        .expect("fire");
    assert!(none.fired.is_empty(), "a paused schedule does not fire");
    assert_eq!(none.next_due, None);
    assert_eq!(
        store
            .list_schedules(None, Some(served.clone()), 10)
            .await
            .expect("list")
            .len(),
        1
    );
    assert_eq!(
        store
            .list_schedules(None, None, 10)
            .await
            .expect("list")
            .len(),
        2
    );
    assert_eq!(
        store
            .list_schedules(Some("sch_a".into()), None, 10)
            .await
            .expect("list")
            .iter()
            .map(|s| s.id.as_str())
            .collect::<Vec<_>>(),
        vec!["sch_c"]
    );

    assert_eq!(store.purge_fires(t0 + 2_600, 100).await.expect("purge"), 3);
    assert!(store.delete_schedule("sch_a").await.expect("delete"));
    assert!(!store.delete_schedule("sch_a").await.expect("delete"));
    assert_eq!(store.get_schedule("sch_a").await.expect("read"), None);
    assert!(
        store
            .list_fires("sch_a", None, 10)
            .await
            .expect("fires")
            .is_empty()
    );
}

/// The callback outbox: a row is written with its run, due only once the run has ended,
/// leased to one claimer at a time, written only under its lease, and a re-send made while an
/// attempt is in flight is not undone by that attempt's outcome.
pub async fn callbacks_are_leased_once_and_a_resend_in_flight_holds<S>(s: &S)
where
    S: RunStore + agentry_core::store::CallbackStore,
{
    use agentry_core::callbacks::{AttemptOutcome, DeliveryAttempt, DeliveryState};
    let mut run = new_run("c1", 0, None);
    run.callback_url = Some("http://example.com/cb".into());
    s.create_run(run, None).await.expect("create");
    s.create_run(new_run("plain", 0, None), None)
        .await
        .expect("create");
    assert!(s.get_callback("plain").await.expect("get").is_none());
    let (cb, attempts) = s
        .get_callback("c1")
        .await
        .expect("get")
        .expect("a callback");
    assert_eq!(
        (cb.state, cb.attempts, attempts.len()),
        (DeliveryState::Pending, 0, 0)
    );
    let claim = |owner: &'static str| async move {
        s.claim_callbacks(owner, now_ms() + 1, 60_000, 10)
            .await
            .expect("claim")
    };
    assert!(claim("a").await.is_empty(), "not due before its run ends");
    s.cancel_run("c1", now_ms()).await.expect("cancel");
    let due = claim("a").await;
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].run.id, "c1");
    assert!(due[0].run.status.is_terminal());
    assert!(claim("b").await.is_empty(), "leased to a");

    let attempt = |n| DeliveryAttempt {
        n,
        at: now_ms(),
        status_code: Some(500),
        error: Some("the receiver answered 500".into()),
        duration_ms: 3,
        node: "n1".into(),
    };
    assert!(
        !s.record_callback_attempt("c1", "b", 0, attempt(1), AttemptOutcome::Failed)
            .await
            .expect("record"),
        "b holds no lease"
    );
    // A re-send while a's attempt is in flight; a's attempt then fails for good.
    assert!(s.resend_callback("c1", now_ms()).await.expect("resend"));
    assert!(
        s.record_callback_attempt(
            "c1",
            "a",
            due[0].callback.round,
            attempt(1),
            AttemptOutcome::Failed
        )
        .await
        .expect("record")
    );
    let (cb, attempts) = s
        .get_callback("c1")
        .await
        .expect("get")
        .expect("a callback");
    assert_eq!(cb.state, DeliveryState::Pending, "the re-send stands");
    assert_eq!((cb.attempts, attempts.len()), (1, 1));
    assert_eq!(attempts[0].status_code, Some(500));
    let due = claim("b").await;
    assert_eq!(due.len(), 1, "due again at once");
    assert!(
        s.record_callback_attempt(
            "c1",
            "b",
            due[0].callback.round,
            attempt(2),
            AttemptOutcome::Delivered
        )
        .await
        .expect("record")
    );
    let (cb, attempts) = s
        .get_callback("c1")
        .await
        .expect("get")
        .expect("a callback");
    assert_eq!(cb.state, DeliveryState::Delivered);
    assert_eq!(attempts.iter().map(|a| a.n).collect::<Vec<_>>(), vec![1, 2]);
    assert!(claim("a").await.is_empty(), "nothing more once delivered");
    assert!(!s.resend_callback("plain", now_ms()).await.expect("resend"));
    // Retention takes the outbox row with its run.
    assert_eq!(s.purge_finished(now_ms() + 1, 10).await.expect("purge"), 1);
    assert!(s.get_callback("c1").await.expect("get").is_none());
}

/// The global log: every event once, in order; a purged run's entries go, and numbers are
/// never reused after a purge.
pub async fn the_global_log_orders_events_and_forgets_purged_runs(s: &dyn RunStore) {
    use agentry_core::events::EventCursor;
    let page =
        |after: EventCursor| async move { s.log_after(after, 100, None).await.expect("log") };
    s.create_run(new_run("g1", 0, None), None)
        .await
        .expect("create");
    s.create_run(new_run("g2", 0, None), None)
        .await
        .expect("create");
    s.cancel_run("g1", now_ms()).await.expect("cancel");
    let all = page(EventCursor::default()).await;
    let seen: Vec<(String, i64)> = all
        .events
        .iter()
        .map(|e| (e.event.run_id.clone(), e.event.seq))
        .collect();
    assert_eq!(
        seen,
        vec![("g1".into(), 1), ("g2".into(), 1), ("g1".into(), 2)],
        "insertion order"
    );
    assert!(all.events.windows(2).all(|w| w[0].cursor < w[1].cursor));
    assert_eq!(all.next, all.events[2].cursor);
    assert!(
        page(all.next).await.events.is_empty(),
        "nothing after the end"
    );
    let only_other = s
        .log_after(EventCursor::default(), 100, Some(vec!["nobody".into()]))
        .await
        .expect("log");
    assert!(only_other.events.is_empty());
    assert_eq!(only_other.next, all.next, "what was looked at is passed");
    // g1 purged: its entries go; a later event still comes after every earlier number.
    assert_eq!(s.purge_finished(now_ms() + 1, 10).await.expect("purge"), 1);
    let left = page(EventCursor::default()).await;
    assert!(
        left.events.iter().all(|e| e.event.run_id == "g2"),
        "{left:?}"
    );
    s.create_run(new_run("g3", 0, None), None)
        .await
        .expect("create");
    let after = page(all.next).await;
    assert_eq!(after.events.len(), 1);
    assert_eq!(after.events[0].event.run_id, "g3");
}

/// A trigger's cursor starts at the log's end, only moves forward, and a run's chain comes
/// back with its events in the global log.
pub async fn trigger_cursors_start_at_the_end_and_only_move_forward<S>(s: &S)
where
    S: RunStore + agentry_core::store::TriggerStore,
{
    use agentry_core::events::EventCursor;
    s.create_run(new_run("before", 0, None), None)
        .await
        .expect("create");
    let start = s.trigger_cursor("t").await.expect("cursor");
    // Nothing written before the trigger was first seen is after its cursor. On PostgreSQL the
    // cursor is "past every ended transaction older than the oldest open one": while another
    // transaction on the server (another test) is open, the last moments' events may follow it.
    if start.tx == 0 {
        let page = s.log_after(start, 100, None).await.expect("log");
        assert!(page.events.is_empty(), "{page:?}");
    }
    let mut linked = new_run("linked", 0, None);
    linked.correlation_id = Some("chain-1".into());
    linked.depth = 2;
    linked.parent_run_id = Some("before".into());
    s.create_run(linked, None).await.expect("create");
    // On PostgreSQL an event is served once every older transaction has ended.
    let mut found = None;
    for _ in 0..200 {
        let page = s.log_after(start, 100, None).await.expect("log");
        found = page.events.into_iter().find(|e| e.event.run_id == "linked");
        if found.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let e = &found.expect("the new run's first event");
    assert_eq!(e.event.run_id, "linked");
    assert_eq!(e.correlation_id.as_deref(), Some("chain-1"));
    assert_eq!(e.depth, 2);
    let all = s
        .log_after(EventCursor::default(), 100, None)
        .await
        .expect("log");
    let before = all
        .events
        .iter()
        .find(|e| e.event.run_id == "before")
        .expect("before");
    assert_eq!((before.correlation_id.as_deref(), before.depth), (None, 0));
    // The links are read back as written; a run without any has none.
    assert_eq!(
        s.run_links("linked").await.expect("links"),
        Some(agentry_core::runs::RunLinks {
            correlation_id: Some("chain-1".into()),
            depth: 2,
            parent_run_id: Some("before".into()),
            executor: None,
        })
    );
    assert_eq!(s.run_links("before").await.expect("links"), None);
    // Saved forward, then an older save is ignored; seeing it again does not reset it.
    s.save_trigger_cursor("t", e.cursor).await.expect("save");
    s.save_trigger_cursor("t", start).await.expect("save");
    assert_eq!(s.trigger_cursor("t").await.expect("cursor"), e.cursor);
}

/// An entrypoint's cap holds however many runs are asked for, leaves other entrypoints' runs
/// alone, and frees a place when one of its runs ends.
pub async fn an_entrypoint_cap_holds_across_claims(s: &dyn RunStore) {
    for id in ["e1", "e2", "e3"] {
        s.create_run(new_run(id, 0, None), None)
            .await
            .expect("create");
    }
    let mut other = new_run("f1", 0, None);
    other.entrypoint = "f".into();
    s.create_run(other, None).await.expect("create");
    let capped = |owner: &str| {
        let mut req = claim(owner, 10, 30_000);
        req.entrypoint_caps = vec![agentry_core::runs::EntrypointCap {
            agent: "a".into(),
            entrypoint: "e".into(),
            max: 2,
        }];
        req
    };
    let first = s.claim_runs(capped("n/1")).await.expect("claim");
    let mut ids: Vec<&str> = first.runs.iter().map(|c| c.run.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["e1", "e2", "f1"]);
    assert!(first.held_back, "a cap left a run queued");
    // Another node asking now gets nothing: two of `e` run.
    assert!(
        s.claim_runs(capped("m/1"))
            .await
            .expect("claim")
            .runs
            .is_empty()
    );
    let lease = LeaseRef {
        run_id: "e1".into(),
        owner: "n/1".into(),
        attempt: 1,
    };
    s.finish_run(lease, Outcome::Succeeded { result: "1".into() }, None)
        .await
        .expect("finish");
    let next = s.claim_runs(capped("m/1")).await.expect("claim");
    let ids: Vec<&str> = next.runs.iter().map(|c| c.run.id.as_str()).collect();
    assert_eq!(ids, ["e3"]);
}
