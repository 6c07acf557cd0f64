//! Rate limits: token buckets per caller (API key, or client IP while authentication is off)
//! and per agent, each per class of route (`invoke`, `runs`, `other`), with the rate and burst
//! of `--key-rate-limit` / `--agent-rate-limit`. A refused request gets 429
//! `rate_limit_error` with `Retry-After` and `RateLimit-*` headers.
//!
//! Buckets are GCRA (one theoretical arrival time per key, updated with one compare-and-swap),
//! kept in this process so that a request never waits for a database. With a shared store
//! (`--rate-limit-postgres`), every node charges what it admitted to the shared buckets every
//! sync interval and takes the others' use back: the sustained rate holds across nodes, and a
//! burst can be exceeded by what the other nodes admit within one interval
//! (`docs/api.md`, "Rate limits").

use std::hash::{BuildHasher, BuildHasherDefault};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use agentry_core::ErrorCode;
use agentry_core::settings::RateSpec;
use agentry_core::{SharedBuckets, StoreError};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;

use crate::error::ApiError;

/// The classes of routes that have their own buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    Invoke,
    Runs,
    /// Webhook deliveries (per sending address: a delivery carries no key).
    Hooks,
    Other,
}

impl RouteClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invoke => "invoke",
            Self::Runs => "runs",
            Self::Hooks => "hooks",
            Self::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "invoke" => Some(Self::Invoke),
            "runs" => Some(Self::Runs),
            "hooks" => Some(Self::Hooks),
            "other" => Some(Self::Other),
            _ => None,
        }
    }
}

/// The clock buckets are kept in: nanoseconds since this process started (monotonic).
fn now_ns() -> i64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as i64
}

/// One caller's or agent's bucket: GCRA state, and what it has admitted since the last sync.
struct KeyState {
    /// The bucket's name in the shared store: `<caller|agent>:<class>:<key>`.
    shared_name: Box<str>,
    /// Theoretical arrival time, in `now_ns` time.
    tat_ns: AtomicI64,
    /// Requests admitted here and not yet charged to the shared bucket.
    unsynced: AtomicU32,
    /// When a request last came (`now_ns`): idle buckets are neither synced nor kept.
    last_used_ns: AtomicI64,
}

/// Buckets of one class of routes, for callers or for agents, with one rate and burst.
struct Bucket {
    spec: RateSpec,
    scope: &'static str,
    class: RouteClass,
    /// Nanoseconds per token.
    interval_ns: i64,
    /// How far ahead of now the TAT may be after admitting a request: burst × interval.
    tolerance_ns: i64,
    /// Keyed by a 64-bit hash of the caller or agent: no allocation per request once seen.
    keys: DashMap<u64, Arc<KeyState>>,
}

impl Bucket {
    fn new(spec: RateSpec, scope: &'static str, class: RouteClass) -> Option<Self> {
        let interval_ns = (1e9 / spec.per_second).round();
        if !(interval_ns.is_finite() && interval_ns >= 1.0) {
            return None;
        }
        let interval_ns = interval_ns as i64;
        Some(Self {
            spec,
            scope,
            class,
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(i64::from(spec.burst.max(1))),
            keys: DashMap::new(),
        })
    }

    fn state(&self, key: &str) -> Arc<KeyState> {
        let hashed = KEY_HASHER.hash_one(key);
        if let Some(state) = self.keys.get(&hashed) {
            return Arc::clone(&state);
        }
        self.insert(hashed, key)
    }

    fn insert(&self, hashed: u64, key: &str) -> Arc<KeyState> {
        let name = format!("{}:{}:{key}", self.scope, self.class.as_str());
        Arc::clone(&self.keys.entry(hashed).or_insert_with(|| {
            Arc::new(KeyState {
                shared_name: name.into_boxed_str(),
                tat_ns: AtomicI64::new(0),
                unsynced: AtomicU32::new(0),
                last_used_ns: AtomicI64::new(0),
            })
        }))
    }

    /// GCRA: admit when the TAT, moved on by one interval, stays within the tolerance of now.
    /// `Err(wait)` when the bucket is empty.
    fn take(&self, key: &str, shared: bool) -> Result<(), Duration> {
        let hashed = KEY_HASHER.hash_one(key);
        match self.keys.get(&hashed) {
            // The common case works under the map's shared read lock, without touching the
            // `Arc`'s counts: every request of a busy key writes to one cache line as it is.
            Some(state) => self.take_from(&state, shared),
            None => self.take_from(&self.insert(hashed, key), shared),
        }
    }

    fn take_from(&self, state: &KeyState, shared: bool) -> Result<(), Duration> {
        let now = now_ns();
        // Idleness is judged in minutes: refresh the time at most every 100 ms.
        if now - state.last_used_ns.load(Ordering::Relaxed) > 100_000_000 {
            state.last_used_ns.store(now, Ordering::Relaxed);
        }
        let mut tat = state.tat_ns.load(Ordering::Acquire);
        loop {
            let next = tat.max(now).saturating_add(self.interval_ns);
            let ahead = next - now;
            if ahead > self.tolerance_ns {
                return Err(Duration::from_nanos((ahead - self.tolerance_ns) as u64));
            }
            match state
                .tat_ns
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if shared {
                        state.unsynced.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Err(current) => tat = current,
            }
        }
    }
}

/// The store's clock minus ours, in nanoseconds: its `now` was read about half-way through an
/// exchange sent at `sent` and answered at `received` (our clock).
fn clock_offset_ns(store_now_us: i64, sent: i64, received: i64) -> i64 {
    store_now_us.saturating_mul(1000) - (sent + (received - sent) / 2)
}

/// Fixed keys, so that a key hashes the same in every process (the shared store is keyed by
/// name, this only spares an allocation per request).
static KEY_HASHER: BuildHasherDefault<std::collections::hash_map::DefaultHasher> =
    BuildHasherDefault::new();

/// Every bucket of the server.
#[derive(Default)]
pub struct RateLimits {
    per_caller: Vec<Bucket>,
    per_agent: Vec<Bucket>,
    /// Whether admissions are counted for a shared store (`share` is running).
    shared: AtomicBool,
}

/// Why a request was refused.
pub struct Limited {
    pub wait: Duration,
    pub spec: RateSpec,
    pub what: &'static str,
}

/// Buckets not used for this long are neither synced nor kept.
const IDLE: Duration = Duration::from_secs(60);

impl RateLimits {
    pub fn new(per_caller: &[(String, RateSpec)], per_agent: &[(String, RateSpec)]) -> Self {
        let build = |list: &[(String, RateSpec)], scope: &'static str| {
            list.iter()
                .filter_map(|(class, spec)| Bucket::new(*spec, scope, RouteClass::parse(class)?))
                .collect()
        };
        Self {
            per_caller: build(per_caller, "caller"),
            per_agent: build(per_agent, "agent"),
            shared: AtomicBool::new(false),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.per_caller.is_empty() && self.per_agent.is_empty()
    }

    pub fn check_caller(&self, class: RouteClass, caller: &str) -> Result<(), Limited> {
        check(
            &self.per_caller,
            class,
            caller,
            self.shared.load(Ordering::Relaxed),
        )
    }

    pub fn check_agent(&self, class: RouteClass, agent: &str) -> Result<(), Limited> {
        check(
            &self.per_agent,
            class,
            agent,
            self.shared.load(Ordering::Relaxed),
        )
    }

    fn buckets(&self) -> impl Iterator<Item = &Bucket> {
        self.per_caller.iter().chain(&self.per_agent)
    }

    /// Forgets buckets that are idle and full again, to bound memory.
    pub fn shrink(&self) {
        let now = now_ns();
        for b in self.buckets() {
            b.keys.retain(|_, s| {
                now - s.last_used_ns.load(Ordering::Relaxed) < IDLE.as_nanos() as i64
                    || s.tat_ns.load(Ordering::Relaxed) > now
                    || s.unsynced.load(Ordering::Relaxed) > 0
            });
        }
    }

    /// One exchange with the shared store: charges what this node admitted since the last one
    /// to the shared buckets, then takes in every bucket some node is drawing on, so that a
    /// caller or agent another node has spent is refused here too.
    pub async fn sync(&self, store: &dyn SharedBuckets) -> Result<(), StoreError> {
        let mut charged = Vec::new();
        let mut charges = Vec::new();
        for b in self.buckets() {
            for entry in b.keys.iter() {
                let s = entry.value();
                let admitted = s.unsynced.swap(0, Ordering::AcqRel);
                if admitted == 0 {
                    continue;
                }
                let charge_us = i64::from(admitted).saturating_mul(b.interval_ns) / 1000;
                charges.push((s.shared_name.to_string(), charge_us));
                charged.push((b.interval_ns, Arc::clone(s), admitted));
            }
        }
        if !charges.is_empty() {
            let sent = now_ns();
            let shared = match store.charge(&charges).await {
                Ok(shared) => shared,
                Err(e) => {
                    // Not charged: count it again next time.
                    for (_, s, admitted) in &charged {
                        s.unsynced.fetch_add(*admitted, Ordering::AcqRel);
                    }
                    return Err(e);
                }
            };
            let offset = clock_offset_ns(shared.now_us, sent, now_ns());
            for ((interval_ns, s, _), tat_us) in charged.iter().zip(&shared.tats_us) {
                // Requests admitted here while the exchange was in flight are not in the
                // shared TAT yet; they stay counted, on top of it.
                let in_flight =
                    i64::from(s.unsynced.load(Ordering::Acquire)).saturating_mul(*interval_ns);
                s.tat_ns.fetch_max(
                    tat_us.saturating_mul(1000) - offset + in_flight,
                    Ordering::AcqRel,
                );
            }
        }
        let sent = now_ns();
        let in_use = store.in_use().await?;
        let offset = clock_offset_ns(in_use.now_us, sent, now_ns());
        for (name, tat_us) in &in_use.buckets {
            let Some((bucket, key)) = self.buckets().find_map(|b| {
                let key = name
                    .strip_prefix(b.scope)?
                    .strip_prefix(':')?
                    .strip_prefix(b.class.as_str())?
                    .strip_prefix(':')?;
                Some((b, key))
            }) else {
                continue; // another configuration's bucket
            };
            let s = bucket.state(key);
            let in_flight =
                i64::from(s.unsynced.load(Ordering::Acquire)).saturating_mul(bucket.interval_ns);
            s.tat_ns.fetch_max(
                tat_us.saturating_mul(1000) - offset + in_flight,
                Ordering::AcqRel,
            );
        }
        Ok(())
    }

    /// Syncs with the shared store every `every` until the process ends, and forgets idle
    /// shared buckets once a minute. While the store is unreachable each node enforces the
    /// limits on its own (logged once per outage).
    pub async fn share(&self, store: Arc<dyn SharedBuckets>, every: Duration) {
        self.shared.store(true, Ordering::Relaxed);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut last_cleanup = Instant::now();
        loop {
            tick.tick().await;
            match self.sync(store.as_ref()).await {
                Ok(()) if failing => {
                    tracing::info!("shared rate limits: the store is reachable again");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    tracing::warn!(
                        "shared rate limits: cannot reach the store ({e}); each node enforces its own limits until it is back"
                    );
                    failing = true;
                }
                Err(_) => {}
            }
            if last_cleanup.elapsed() > IDLE {
                last_cleanup = Instant::now();
                let _ = store.forget_idle(3_600_000_000).await;
            }
        }
    }
}

fn check(buckets: &[Bucket], class: RouteClass, key: &str, shared: bool) -> Result<(), Limited> {
    for b in buckets.iter().filter(|b| b.class == class) {
        b.take(key, shared).map_err(|wait| Limited {
            wait,
            spec: b.spec,
            what: b.scope,
        })?;
    }
    Ok(())
}

impl Limited {
    /// The 429 answer: `Retry-After` in whole seconds (rounded up) and the bucket's numbers.
    /// `runagent`: shaped as RunAgent's routes answer (`{"detail"}`).
    pub fn into_response(self, runagent: bool) -> Response {
        let message = format!(
            "rate limit of {} requests/s (burst {}) per {} exceeded; retry in {:.3} s",
            self.spec.per_second,
            self.spec.burst,
            self.what,
            self.wait.as_secs_f64()
        );
        let mut resp = if runagent {
            (
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                axum::Json(serde_json::json!({"detail": message})),
            )
                .into_response()
        } else {
            ApiError::new(ErrorCode::RateLimitError, message)
                .with_details(serde_json::json!({
                    "retry_after_s": self.wait.as_secs_f64(),
                    "limit_per_s": self.spec.per_second,
                    "burst": self.spec.burst,
                    "per": self.what,
                }))
                .into_response()
        };
        let secs = self.wait.as_secs_f64().ceil().max(1.0) as u64;
        let h = resp.headers_mut();
        for (name, value) in [
            ("retry-after", secs.to_string()),
            ("ratelimit-limit", self.spec.burst.to_string()),
            ("ratelimit-remaining", "0".to_string()),
            ("ratelimit-reset", secs.to_string()),
            (
                "ratelimit-policy",
                format!(
                    "{};w={}",
                    self.spec.burst,
                    (self.spec.burst as f64 / self.spec.per_second).ceil()
                ),
            ),
        ] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        }
        resp
    }
}
