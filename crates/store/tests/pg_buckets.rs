//! The shared rate-limit buckets against the real PostgreSQL server (127.0.0.1:5432, database
//! `test`, or `AGENTRY_TEST_POSTGRES_URL`). No skipping: without the server these tests fail.

use agentry_core::SharedBuckets;
use agentry_store::PgBuckets;

fn url() -> String {
    std::env::var("AGENTRY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn unique(prefix: &str) -> String {
    format!("test:{prefix}:{}", std::process::id()) + &format!(":{}", rand_suffix())
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

async fn store() -> PgBuckets {
    PgBuckets::connect(&url())
        .await
        .expect("PostgreSQL must be running for these tests (see .ci/run)")
}

#[tokio::test]
async fn a_charge_moves_the_tat_from_now_or_from_where_it_was() {
    let s = store().await;
    let (a, b) = (unique("a"), unique("b"));
    // A new bucket starts at now.
    let first = s
        .charge(&[(a.clone(), 1_000_000), (b.clone(), 0)])
        .await
        .expect("charge");
    assert_eq!(first.tats_us.len(), 2);
    let drift = first.tats_us[0] - first.now_us;
    assert_eq!(drift, 1_000_000, "{first:?}");
    assert_eq!(first.tats_us[1], first.now_us);
    // A TAT ahead of now grows from where it is; one behind now restarts from now.
    let second = s
        .charge(&[(b.clone(), 5), (a.clone(), 500_000)])
        .await
        .expect("charge");
    assert_eq!(
        second.tats_us[1],
        first.tats_us[0] + 500_000,
        "in the order given"
    );
    assert_eq!(second.tats_us[0], second.now_us + 5, "behind now: from now");
    // Reading (a zero charge) changes nothing ahead of now.
    let third = s.charge(&[(a.clone(), 0)]).await.expect("charge");
    assert_eq!(third.tats_us[0], second.tats_us[1]);
}

#[tokio::test]
async fn concurrent_nodes_never_lose_a_charge() {
    let name = unique("shared");
    let start = store()
        .await
        .charge(&[(name.clone(), 0)])
        .await
        .expect("read")
        .now_us;
    let mut tasks = Vec::new();
    for node in 0..4 {
        let name = name.clone();
        let other = unique(&format!("other{node}"));
        tasks.push(tokio::spawn(async move {
            let s = store().await;
            for _ in 0..50 {
                // Several buckets per statement, in different orders on different nodes.
                let mut charges = vec![(name.clone(), 10_000_000), (other.clone(), 1)];
                if node % 2 == 1 {
                    charges.reverse();
                }
                s.charge(&charges).await.expect("charge");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let end = store()
        .await
        .charge(&[(name, 0)])
        .await
        .expect("read")
        .tats_us[0];
    // 200 charges of 10 s each, all far ahead of now: exactly 2,000 s past the start.
    let expected = start + 200 * 10_000_000;
    assert!(
        (end - expected).abs() < 1_000_000,
        "end {end}, expected about {expected}"
    );
}

#[tokio::test]
async fn idle_buckets_are_forgotten() {
    let s = store().await;
    let name = unique("idle");
    s.charge(&[(name.clone(), 0)]).await.expect("charge");
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(s.forget_idle(10_000).await.expect("forget") >= 1);
    // Gone: a charge starts it again from now.
    let again = s.charge(&[(name, 7)]).await.expect("charge");
    assert_eq!(again.tats_us[0], again.now_us + 7);
}
