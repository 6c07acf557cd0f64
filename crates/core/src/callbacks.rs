//! Callbacks (`docs/callbacks.md`): a run created with a `callback_url` gets one signed POST
//! when it reaches a terminal state. The rules live here: which URLs are accepted, which
//! addresses are private (refused unless allowed, checked on the resolved address), the
//! payload, the Standard Webhooks signature, and the retry schedule. The outbox is the
//! store's (`CallbackStore`); the engine's deliverer sends through a `CallbackTransport`.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::value::RawValue;

use crate::runs::Run;

/// Longest callback URL accepted.
pub const MAX_URL_CHARS: usize = 2048;

/// Why a callback URL was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadUrl(pub String);

/// Checks a callback URL's form: `http` or `https`, a host, no credentials in it. Whether its
/// address is private is checked where it is resolved.
pub fn check_url(url: &str) -> Result<url::Url, BadUrl> {
    if url.chars().count() > MAX_URL_CHARS {
        return Err(BadUrl(format!(
            "a callback URL is at most {MAX_URL_CHARS} characters"
        )));
    }
    let parsed = url::Url::parse(url).map_err(|e| BadUrl(format!("not a URL: {e}")))?;
    match parsed.scheme() {
        "http" | "https" => {}
        _ => return Err(BadUrl("a callback URL is http:// or https://".into())),
    }
    if parsed.host().is_none() {
        return Err(BadUrl("a callback URL needs a host".into()));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(BadUrl(
            "a callback URL carries no credentials (the signature authenticates us)".into(),
        ));
    }
    Ok(parsed)
}

/// The host of a checked URL when it is an IP address literal.
pub fn literal_ip(url: &url::Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    }
}

/// Whether an address is one a callback may not reach unless private callbacks are allowed:
/// loopback, private (RFC 1918, unique local), link-local (cloud metadata lives there),
/// shared (CGNAT), unspecified, broadcast, multicast, documentation and benchmarking ranges,
/// and IPv6 forms of those IPv4 addresses.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..=127).contains(&b))
                || (a == 198 && (18..=19).contains(&b))
                // IETF protocol assignments (192.0.0.0/24; cloud metadata lives there on
                // some clouds) and the deprecated 6to4 relay anycast.
                || (a == 192 && b == 0 && v4.octets()[2] == 0)
                || (a == 192 && b == 88 && v4.octets()[2] == 99)
                || a >= 240
        }
        IpAddr::V6(v6) => {
            // IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d) forms.
            if let Some(v4) = v6.to_ipv4() {
                return is_private(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8
                // NAT64 and 6to4 embed an IPv4 address that may be private.
                || first == 0x0064
                || first == 0x2002
                // Teredo, and the deprecated site-local range.
                || (first == 0x2001 && v6.segments()[1] == 0)
                || (first & 0xffc0) == 0xfec0
        }
    }
}

/// The body of a run's callback, as documented: `type`, `run_id`, `agent_id`, `entrypoint`,
/// `status`, `output`, `error`, `attempt`, `duration_ms`, `timestamp` (RFC 3339, when the
/// delivery is made).
pub fn payload(run: &Run, now_ms: i64) -> String {
    let raw = |text: &Option<String>| {
        text.as_deref()
            .and_then(|t| RawValue::from_string(t.to_string()).ok())
    };
    // A traceback stays inside: the receiver is a third party, and tracebacks are for admins.
    let error = run.error.as_deref().and_then(|t| {
        let mut e: serde_json::Map<String, serde_json::Value> = serde_json::from_str(t).ok()?;
        e.remove("traceback");
        Some(serde_json::Value::Object(e))
    });
    let duration_ms = match (run.started_at, run.finished_at) {
        (Some(s), Some(f)) => Some(f.saturating_sub(s)),
        _ => None,
    };
    serde_json::json!({
        "type": "run.finished",
        "run_id": run.id,
        "agent_id": run.agent,
        "entrypoint": run.entrypoint,
        "status": run.status.as_str(),
        "output": raw(&run.result),
        "error": error,
        "attempt": run.attempt,
        "duration_ms": duration_ms,
        "timestamp": crate::time::rfc3339_ms(now_ms),
    })
    .to_string()
}

/// The `webhook-id` of a run's callback: the same on every attempt and re-send, so a receiver
/// that saw it before can tell a repeat.
pub fn message_id(run_id: &str) -> String {
    format!("cb_{run_id}")
}

/// How long after its `n`th failed attempt (1, 2, …) a callback is tried again: `base` doubled
/// each time, at most `max`, then scaled by a jitter factor from 0.5 to 1.0 (`random` in
/// 0..1), so that receivers coming back up are not hit by every sender at once.
pub fn retry_after(n: u32, base: Duration, max: Duration, random: f64) -> Duration {
    let doubled = base.saturating_mul(1u32 << n.saturating_sub(1).min(20));
    doubled.min(max).mul_f64(0.5 + 0.5 * random.clamp(0.0, 1.0))
}

/// Where a run's callback stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    /// Waiting for the run to end, or for its next attempt.
    Pending,
    Delivered,
    /// Every attempt of the last round failed (a re-send starts a new round).
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Delivered, Self::Failed]
            .into_iter()
            .find(|d| d.as_str() == s)
    }
}

/// One attempt to deliver a callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryAttempt {
    /// 1, 2, 3, … per run, across re-sends.
    pub n: u32,
    pub at: i64,
    /// The receiver's status; `None` when no answer came.
    pub status_code: Option<u16>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    pub duration_ms: i64,
    pub node: String,
}

/// A run's callback as the outbox holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callback {
    pub run_id: String,
    pub url: String,
    pub state: DeliveryState,
    /// Attempts made, in all rounds.
    pub attempts: u32,
    /// Attempts made before this round (a re-send starts a round).
    pub round_start: u32,
    /// Which round this is: 0, then one more per re-send.
    pub round: u32,
    /// When the next attempt is due (once the run has ended).
    pub next_at: i64,
    pub delivered_at: Option<i64>,
}

/// A callback due now, leased to the caller, with its run as it ended.
#[derive(Debug, Clone)]
pub struct DueCallback {
    pub callback: Callback,
    pub run: Run,
}

/// What an attempt leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered,
    RetryAt(i64),
    Failed,
}

impl AttemptOutcome {
    /// What the outbox row records after an attempt made `at` with this outcome: its state,
    /// when the next attempt is due (0: none), and when it was delivered.
    pub fn stored(self, at: i64) -> (DeliveryState, i64, Option<i64>) {
        match self {
            Self::Delivered => (DeliveryState::Delivered, 0, Some(at)),
            Self::RetryAt(t) => (DeliveryState::Pending, t, None),
            Self::Failed => (DeliveryState::Failed, 0, None),
        }
    }
}

/// What a callback's transport answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// The receiver's status code.
    Answered(u16),
    /// The address was refused: it is private (and private callbacks are not allowed).
    Refused(String),
    /// No answer: DNS, connection, timeout.
    Failed(String),
}

/// How callbacks leave this node: an HTTP client that connects only where it may.
#[async_trait::async_trait]
pub trait CallbackTransport: Send + Sync {
    async fn post(
        &self,
        url: &str,
        headers: &[(&str, String)],
        body: String,
        timeout: Duration,
    ) -> Sent;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_addresses_are_named() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:a00:1::",
            "::127.0.0.1",
            "192.0.0.192",
            "2001:0:4136:e378::1",
            "fec0::1",
        ] {
            assert!(is_private(ip.parse().expect(ip)), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(!is_private(ip.parse().expect(ip)), "{ip}");
        }
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("http://example.com/hook?x=1").is_ok());
        assert!(check_url("https://example.com/hook").is_ok());
        for bad in [
            "ftp://example.com/",
            "not a url",
            "https://user:pw@example.com/",
            "file:///etc/passwd",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        let u = check_url("http://[::1]:8080/").expect("url");
        assert_eq!(literal_ip(&u), Some("::1".parse().expect("ip")));
        let u = check_url("http://0x7f.1/").expect("url");
        assert_eq!(
            literal_ip(&u),
            Some("127.0.0.1".parse().expect("ip")),
            "a hex IPv4 form is an address, not a name"
        );
    }

    #[test]
    fn retries_back_off_with_jitter_up_to_the_bound() {
        let base = Duration::from_secs(2);
        let max = Duration::from_secs(60);
        assert_eq!(retry_after(1, base, max, 1.0), Duration::from_secs(2));
        assert_eq!(retry_after(3, base, max, 1.0), Duration::from_secs(8));
        assert_eq!(retry_after(3, base, max, 0.0), Duration::from_secs(4));
        assert_eq!(retry_after(30, base, max, 1.0), max);
    }
}
