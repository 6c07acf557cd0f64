//! Runs the store contract (`contract/`) against every backend, each test on a fresh store.

mod contract;

use agentry_store::{SqliteOptions, SqliteStore};

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
