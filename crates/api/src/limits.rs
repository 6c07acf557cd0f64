//! Rate limits: token buckets per caller (API key, or client IP while authentication is off)
//! and per agent, each per class of route (`invoke`, `runs`, `other`), with the rate and burst
//! of `--key-rate-limit` / `--agent-rate-limit`. A refused request gets 429
//! `rate_limit_error` with `Retry-After` and `RateLimit-*` headers. Buckets live in this
//! process (GCRA, the `governor` crate): with several nodes each enforces its own share.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use agentry_core::ErrorCode;
use agentry_core::settings::RateSpec;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::AppState;
use crate::auth::Principal;
use crate::error::ApiError;

/// The classes of routes that have their own buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    Invoke,
    Runs,
    Other,
}

impl RouteClass {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "invoke" => Some(Self::Invoke),
            "runs" => Some(Self::Runs),
            "other" => Some(Self::Other),
            _ => None,
        }
    }

    fn of(path: &str) -> Option<Self> {
        if path == "/healthz" || path == "/readyz" {
            None
        } else if path.starts_with("/v1/runs") {
            Some(Self::Runs)
        } else if path.starts_with("/api/v1")
            || (path.starts_with("/v1/agents/")
                && (path.ends_with("/invoke")
                    || path.ends_with("/stream")
                    || path.ends_with("/ws")))
        {
            Some(Self::Invoke)
        } else {
            Some(Self::Other)
        }
    }
}

struct Bucket {
    spec: RateSpec,
    /// Keyed by a 64-bit hash of the caller or agent: no allocation per request.
    limiter: DefaultKeyedRateLimiter<u64>,
}

impl Bucket {
    fn new(spec: RateSpec) -> Option<Self> {
        let period = Duration::try_from_secs_f64(1.0 / spec.per_second).ok()?;
        let quota = Quota::with_period(period)?.allow_burst(NonZeroU32::new(spec.burst.max(1))?);
        Some(Self {
            spec,
            limiter: DefaultKeyedRateLimiter::keyed(quota),
        })
    }

    /// `Err(wait)` when the bucket is empty.
    fn take(&self, key: &str) -> Result<(), Duration> {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let hashed = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .hash_one(key);
        self.limiter
            .check_key(&hashed)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// Every bucket of the server.
#[derive(Default)]
pub struct RateLimits {
    per_caller: Vec<(RouteClass, Bucket)>,
    per_agent: Vec<(RouteClass, Bucket)>,
}

/// Why a request was refused.
pub struct Limited {
    pub wait: Duration,
    pub spec: RateSpec,
    pub what: &'static str,
}

impl RateLimits {
    pub fn new(per_caller: &[(String, RateSpec)], per_agent: &[(String, RateSpec)]) -> Self {
        let build = |list: &[(String, RateSpec)]| {
            list.iter()
                .filter_map(|(class, spec)| Some((RouteClass::parse(class)?, Bucket::new(*spec)?)))
                .collect()
        };
        Self {
            per_caller: build(per_caller),
            per_agent: build(per_agent),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.per_caller.is_empty() && self.per_agent.is_empty()
    }

    pub fn check_caller(&self, class: RouteClass, caller: &str) -> Result<(), Limited> {
        check(&self.per_caller, class, caller, "caller")
    }

    pub fn check_agent(&self, class: RouteClass, agent: &str) -> Result<(), Limited> {
        check(&self.per_agent, class, agent, "agent")
    }

    /// Forgets buckets that are full again (callers seen long ago), to bound memory.
    pub fn shrink(&self) {
        for (_, b) in self.per_caller.iter().chain(&self.per_agent) {
            b.limiter.retain_recent();
            b.limiter.shrink_to_fit();
        }
    }
}

fn check(
    buckets: &[(RouteClass, Bucket)],
    class: RouteClass,
    key: &str,
    what: &'static str,
) -> Result<(), Limited> {
    for (c, b) in buckets {
        if *c == class {
            b.take(key).map_err(|wait| Limited {
                wait,
                spec: b.spec,
                what,
            })?;
        }
    }
    Ok(())
}

impl Limited {
    /// The 429 answer: `Retry-After` in whole seconds (rounded up) and the bucket's numbers.
    pub fn into_response(self, path: &str) -> Response {
        let message = format!(
            "rate limit of {} requests/s (burst {}) per {} exceeded; retry in {:.3} s",
            self.spec.per_second,
            self.spec.burst,
            self.what,
            self.wait.as_secs_f64()
        );
        let mut resp = if path.starts_with("/api/") {
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

/// The middleware (inside authentication, so the caller is known).
pub async fn rate_limit(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.limits.is_empty() {
        return next.run(req).await;
    }
    let path = req.uri().path();
    let Some(class) = RouteClass::of(path) else {
        return next.run(req).await;
    };
    let caller = match req
        .extensions()
        .get::<Principal>()
        .and_then(|p| p.0.as_ref())
    {
        Some(entry) => entry.key.id.clone(),
        None => req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string())
            .unwrap_or_else(|| "unknown".into()),
    };
    if let Err(limited) = state.limits.check_caller(class, &caller) {
        return limited.into_response(path);
    }
    if let Some(agent) = crate::auth::path_agent(path).and_then(|a| state.agent(a))
        && let Err(limited) = state.limits.check_agent(class, &agent.config.agent_id)
    {
        return limited.into_response(path);
    }
    next.run(req).await
}
