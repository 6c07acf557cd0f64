//! The callback deliverer of one node (`docs/callbacks.md`): it leases callbacks due from the
//! outbox (their runs ended, their next attempt's time come), POSTs each, signed in the
//! Standard Webhooks format, and records the attempt and what follows it (delivered, another
//! attempt after a backoff with jitter, or failed once the round's attempts are spent). The
//! outbox is durable and shared, so a callback outlives a restart or its node's death: a lease
//! left by a dead node runs out and another node takes it over. A receiver may therefore see a
//! delivery twice (a node that died after sending, before recording); `webhook-id` is the same
//! on every attempt so it can tell.

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentry_core::callbacks::{
    AttemptOutcome, CallbackTransport, DeliveryAttempt, DueCallback, Sent, message_id, payload,
    retry_after,
};
use agentry_core::runs::now_ms;
use agentry_core::settings::CallbacksConfig;
use agentry_core::store::CallbackStore;

use crate::Engine;

/// Callbacks leased at once; they are sent concurrently.
const BATCH: usize = 32;
/// How long a lease outlasts twice an attempt's deadline before another node may take over
/// (the deadline covers the request; the margin, recording it on a slow store).
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// The longest error text kept per attempt.
const MAX_ERROR_CHARS: usize = 500;

/// What the deliverer needs besides the store and the transport.
pub struct CallbackSettings {
    pub config: CallbacksConfig,
    /// The Standard Webhooks key (a `whsec_` secret decoded).
    pub key: Vec<u8>,
}

struct Deliverer {
    store: Arc<dyn CallbackStore>,
    transport: Arc<dyn CallbackTransport>,
    settings: CallbackSettings,
    owner: String,
    node: String,
}

/// Starts this node's deliverer; it stops with the engine.
pub fn start_deliverer(
    engine: &Engine,
    store: Arc<dyn CallbackStore>,
    transport: Arc<dyn CallbackTransport>,
    settings: CallbackSettings,
) {
    let deliverer = Arc::new(Deliverer {
        store,
        transport,
        settings,
        owner: engine.inner.owner.clone(),
        node: engine.inner.settings.node.clone(),
    });
    engine
        .inner
        .tasks
        .lock()
        .spawn(async move { deliverer.run().await });
}

impl Deliverer {
    async fn run(self: Arc<Self>) {
        let poll = self.settings.config.poll();
        loop {
            let now = now_ms();
            let lease = self.settings.config.timeout() * 2 + LEASE_MARGIN;
            let due = match self
                .store
                .claim_callbacks(&self.owner, now, lease.as_millis() as i64, BATCH)
                .await
            {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!("cannot read the callbacks due: {e}");
                    tokio::time::sleep(poll).await;
                    continue;
                }
            };
            let full = due.len() == BATCH;
            futures_util::future::join_all(due.into_iter().map(|d| self.deliver(d))).await;
            if !full {
                tokio::time::sleep(poll).await;
            }
        }
    }

    async fn deliver(&self, due: DueCallback) {
        let config = &self.settings.config;
        let now = now_ms();
        let body = payload(&due.run, now);
        let id = message_id(&due.run.id);
        let timestamp = now.div_euclid(1000);
        let signature = agentry_core::webhooks::standard_signature(
            &self.settings.key,
            &id,
            timestamp,
            body.as_bytes(),
        );
        let headers = [
            ("content-type", "application/json".to_string()),
            (
                "user-agent",
                concat!("agentry/", env!("CARGO_PKG_VERSION")).to_string(),
            ),
            ("webhook-id", id),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
        ];
        let started = Instant::now();
        let sent = self
            .transport
            .post(&due.callback.url, &headers, body, config.timeout())
            .await;
        let (status_code, error) = match sent {
            Sent::Answered(code) if (200..300).contains(&code) => (Some(code), None),
            Sent::Answered(code) => (Some(code), Some(format!("the receiver answered {code}"))),
            Sent::Refused(why) | Sent::Failed(why) => (None, Some(why)),
        };
        let n = due.callback.attempts + 1;
        let in_round = n.saturating_sub(due.callback.round_start);
        let outcome = if error.is_none() {
            AttemptOutcome::Delivered
        } else if in_round >= config.max_attempts {
            AttemptOutcome::Failed
        } else {
            let wait = retry_after(
                in_round,
                config.retry_base(),
                config.retry_max(),
                rand::random::<f64>(),
            );
            AttemptOutcome::RetryAt(now_ms() + wait.as_millis() as i64)
        };
        let attempt = DeliveryAttempt {
            n,
            at: now,
            status_code,
            error: error.map(|e| e.chars().take(MAX_ERROR_CHARS).collect()),
            duration_ms: started.elapsed().as_millis() as i64,
            node: self.node.clone(),
        };
        match self
            .store
            .record_callback_attempt(
                &due.run.id,
                &self.owner,
                due.callback.round,
                attempt,
                outcome,
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                run_id = %due.run.id,
                "a callback attempt outlasted its lease; another node may deliver it again"
            ),
            // The attempt is made again once the lease runs out: if it had been delivered, the
            // receiver sees it twice (same `webhook-id`).
            Err(e) => tracing::warn!(
                run_id = %due.run.id,
                "cannot record a callback attempt ({e}); it will be made again once its lease runs out"
            ),
        }
    }
}
