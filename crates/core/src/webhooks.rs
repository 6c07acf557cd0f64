//! Webhook triggers (`docs/webhooks.md`): a hook declared on an entrypoint turns a signed
//! delivery into a durable run. This module holds the rules: which signature formats are
//! accepted (Standard Webhooks, GitHub's `X-Hub-Signature-256`, Stripe's `Stripe-Signature`,
//! all HMAC-SHA256 compared in constant time), the timestamp tolerance, which id makes a
//! delivery a replay, and how the body becomes the entrypoint's input (a JSONPath per
//! parameter). It reads no files and no environment: the application resolves the secret.

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use serde_json_path::JsonPath;
use sha2::Sha256;

/// Timestamp tolerance when a hook sets none: Standard Webhooks' and Stripe's five minutes.
const DEFAULT_TOLERANCE_S: u64 = 300;
/// Longest delivery id kept as a replay key (the run's idempotency key bound).
const MAX_DELIVERY_ID_CHARS: usize = 256;

/// Which signature formats a hook accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// Whichever of the three a delivery carries (Standard Webhooks first).
    #[default]
    Any,
    /// `webhook-id`, `webhook-timestamp`, `webhook-signature`.
    Standard,
    /// `X-Hub-Signature-256: sha256=<hex>` (the signature is the delivery's id).
    Github,
    /// `Stripe-Signature: t=<unix>,v1=<hex>`.
    Stripe,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::Standard => "standard",
            Self::Github => "github",
            Self::Stripe => "stripe",
        }
    }
    fn accepts(self, scheme: Scheme) -> bool {
        self == Scheme::Any || self == scheme
    }
}

/// A webhook declared on an entrypoint, under
/// `[agents.<name>.entrypoints.<tag>.webhook]` in `agentry.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// The hook's name: it is served at `POST /v1/hooks/{name}`.
    pub name: String,
    /// The environment variable that holds the secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// The file that holds the secret (trailing whitespace ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub scheme: Scheme,
    /// How far a delivery's timestamp may be from now, in seconds (both ways).
    #[serde(default = "default_tolerance_s")]
    pub tolerance_s: u64,
    /// The largest body accepted; `None`: `http.max_body_bytes`.
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// Parameter name → JSONPath into the body (RFC 9535). Without it the body, a JSON
    /// object, is the input as it is.
    #[serde(default)]
    pub input: BTreeMap<String, String>,
}

fn default_tolerance_s() -> u64 {
    DEFAULT_TOLERANCE_S
}

/// Whether `name` may name a hook (it is a path segment): 1 to 64 of `A-Z a-z 0-9 . _ -`,
/// starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Parses one mapping's JSONPath, saying what is wrong with it.
pub fn parse_path(path: &str) -> Result<JsonPath, String> {
    JsonPath::parse(path).map_err(|e| format!("`{path}` is not a JSONPath: {e}"))
}

/// A hook ready to check deliveries: its target, its secret, its rules.
pub struct Hook {
    pub name: String,
    /// The agent's id.
    pub agent: String,
    pub entrypoint: String,
    pub scheme: Scheme,
    pub tolerance_s: u64,
    pub max_body_bytes: usize,
    /// The secret as written: GitHub's and Stripe's key.
    raw_key: Vec<u8>,
    /// Standard Webhooks' key: a `whsec_` secret's base64 decoded, else the secret as written.
    standard_key: Vec<u8>,
    mapping: Vec<(String, JsonPath)>,
}

impl std::fmt::Debug for Hook {
    // The secret is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook")
            .field("name", &self.name)
            .field("agent", &self.agent)
            .field("entrypoint", &self.entrypoint)
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

/// A delivery whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// What makes a second delivery a replay: `webhook-id`, GitHub's signature
    /// (`sha256=<hex>`), or the Stripe event's `id` (else its `t=`).
    pub id: String,
    pub scheme: Scheme,
}

/// Why a delivery was refused before anything was stored (all answered 401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No signature header this hook accepts.
    Unsigned,
    /// A signature header that cannot be read, or a missing companion header.
    Malformed(&'static str),
    /// No signature matched.
    BadSignature,
    /// The timestamp is outside the tolerance.
    Stale {
        timestamp: i64,
        now: i64,
        tolerance_s: u64,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unsigned => f.write_str(
                "the delivery is not signed: send `webhook-signature` (Standard Webhooks), `X-Hub-Signature-256` or `Stripe-Signature`",
            ),
            Self::Malformed(what) => write!(f, "the delivery's signature cannot be read: {what}"),
            Self::BadSignature => f.write_str("the delivery's signature does not match"),
            Self::Stale {
                timestamp,
                now,
                tolerance_s,
            } => write!(
                f,
                "the delivery's timestamp {timestamp} is {} s from now ({now}); at most {tolerance_s} s is accepted",
                now.abs_diff(*timestamp)
            ),
        }
    }
}

/// Why a verified body could not become the entrypoint's input (answered 422).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputError {
    NotJson(String),
    /// Without a mapping the body must be an object of keyword arguments.
    NotAnObject,
}

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotJson(e) => write!(f, "the body is not JSON: {e}"),
            Self::NotAnObject => f.write_str(
                "the body must be a JSON object of the entrypoint's arguments (or the hook needs an `input` mapping)",
            ),
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    // HMAC takes a key of any length; `new_from_slice` cannot fail for it.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for p in parts {
        mac.update(p);
    }
    mac
}

/// Signatures of one delivery looked at, at most: a sender rotating its secret sends two.
const MAX_CANDIDATES: usize = 8;

/// Whether one of `candidates` is the HMAC-SHA256 of `parts` under `key`. The MAC is computed
/// once, whatever the number of candidates (a header of thousands of empty ones must not cost
/// thousands of passes over the body); each candidate of the right length is compared in
/// constant time.
fn any_matches(key: &[u8], parts: &[&[u8]], candidates: impl Iterator<Item = Vec<u8>>) -> bool {
    use subtle::ConstantTimeEq;
    let mut candidates = candidates
        .filter(|c| c.len() == 32)
        .take(MAX_CANDIDATES)
        .peekable();
    if candidates.peek().is_none() {
        return false;
    }
    let expected = mac(key, parts).finalize().into_bytes();
    candidates.fold(false, |found, c| found | bool::from(c.ct_eq(&expected[..])))
}

/// The Standard Webhooks signature of a delivery (`v1,<base64>`), as senders compute it.
pub fn standard_signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    let tag = mac(key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body])
        .finalize()
        .into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

/// The key a Standard Webhooks secret stands for: `whsec_<base64>` decoded, else the text.
pub fn standard_key(secret: &str) -> Result<Vec<u8>, String> {
    match secret.strip_prefix("whsec_") {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("a `whsec_` secret must be base64 after its prefix: {e}")),
        None => Ok(secret.as_bytes().to_vec()),
    }
}

impl Hook {
    /// A hook of `agent`'s entrypoint `entrypoint`, with its secret's text resolved.
    /// `default_max_body` is `http.max_body_bytes`.
    pub fn new(
        settings: &WebhookSettings,
        agent: &str,
        entrypoint: &str,
        secret: &str,
        default_max_body: usize,
    ) -> Result<Self, String> {
        if secret.is_empty() {
            return Err("the secret is empty".into());
        }
        let mapping = settings
            .input
            .iter()
            .map(|(param, path)| Ok((param.clone(), parse_path(path)?)))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            name: settings.name.clone(),
            agent: agent.to_string(),
            entrypoint: entrypoint.to_string(),
            scheme: settings.scheme,
            tolerance_s: settings.tolerance_s,
            max_body_bytes: settings
                .max_body_bytes
                .unwrap_or(default_max_body)
                .min(default_max_body),
            raw_key: secret.as_bytes().to_vec(),
            standard_key: standard_key(secret)?,
            mapping,
        })
    }

    /// The parameters the mapping fills.
    pub fn mapped_parameters(&self) -> impl Iterator<Item = &str> {
        self.mapping.iter().map(|(p, _)| p.as_str())
    }

    /// Checks a delivery's signature (and timestamp, where its format has one). `header`
    /// reads a request header by its lower-case name; `now` is in Unix seconds.
    pub fn verify<'h>(
        &self,
        header: impl Fn(&str) -> Option<&'h str>,
        body: &[u8],
        now: i64,
    ) -> Result<Delivery, Refusal> {
        if self.scheme.accepts(Scheme::Standard)
            && let Some(signatures) = header("webhook-signature")
        {
            return self.verify_standard(&header, signatures, body, now);
        }
        if self.scheme.accepts(Scheme::Stripe)
            && let Some(signature) = header("stripe-signature")
        {
            return self.verify_stripe(signature, body, now);
        }
        if self.scheme.accepts(Scheme::Github)
            && let Some(signature) = header("x-hub-signature-256")
        {
            return self.verify_github(signature, body);
        }
        Err(Refusal::Unsigned)
    }

    fn fresh(&self, timestamp: i64, now: i64) -> Result<(), Refusal> {
        if timestamp.abs_diff(now) > self.tolerance_s {
            return Err(Refusal::Stale {
                timestamp,
                now,
                tolerance_s: self.tolerance_s,
            });
        }
        Ok(())
    }

    fn verify_standard<'h>(
        &self,
        header: &impl Fn(&str) -> Option<&'h str>,
        signatures: &str,
        body: &[u8],
        now: i64,
    ) -> Result<Delivery, Refusal> {
        let id = header("webhook-id").ok_or(Refusal::Malformed("`webhook-id` is missing"))?;
        if id.is_empty() || id.chars().count() > MAX_DELIVERY_ID_CHARS {
            return Err(Refusal::Malformed(
                "`webhook-id` must be 1 to 256 characters",
            ));
        }
        let ts_text = header("webhook-timestamp")
            .ok_or(Refusal::Malformed("`webhook-timestamp` is missing"))?;
        let timestamp: i64 = ts_text.trim().parse().map_err(|_| {
            Refusal::Malformed("`webhook-timestamp` must be whole seconds since 1970")
        })?;
        // The signature is checked before the time, so an unsigned caller learns nothing
        // about the clock; a stale but genuine delivery is still refused.
        let parts: [&[u8]; 5] = [id.as_bytes(), b".", ts_text.trim().as_bytes(), b".", body];
        let candidates = signatures
            .split_ascii_whitespace()
            .filter_map(|s| s.strip_prefix("v1,"))
            .filter_map(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok());
        let signed = any_matches(&self.standard_key, &parts, candidates);
        if !signed {
            return Err(Refusal::BadSignature);
        }
        self.fresh(timestamp, now)?;
        Ok(Delivery {
            id: id.to_string(),
            scheme: Scheme::Standard,
        })
    }

    fn verify_stripe(&self, header: &str, body: &[u8], now: i64) -> Result<Delivery, Refusal> {
        let mut timestamp = None;
        let mut signatures = Vec::new();
        for item in header.split(',') {
            match item.trim().split_once('=') {
                Some(("t", t)) => timestamp = Some(t),
                Some(("v1", sig)) => signatures.push(sig),
                _ => {}
            }
        }
        let ts_text = timestamp.ok_or(Refusal::Malformed("`Stripe-Signature` has no `t=`"))?;
        let ts: i64 = ts_text
            .parse()
            .map_err(|_| Refusal::Malformed("`Stripe-Signature`'s `t=` is not a number"))?;
        let parts: [&[u8]; 3] = [ts_text.as_bytes(), b".", body];
        let candidates = signatures
            .iter()
            .filter_map(|hex_sig| hex::decode(hex_sig).ok());
        let signed = any_matches(&self.raw_key, &parts, candidates);
        if !signed {
            return Err(Refusal::BadSignature);
        }
        self.fresh(ts, now)?;
        // Stripe retries an event under a new timestamp: its id is what repeats.
        let id = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string))
            .filter(|id| !id.is_empty() && id.chars().count() <= MAX_DELIVERY_ID_CHARS)
            .unwrap_or_else(|| format!("t={ts_text}"));
        Ok(Delivery {
            id,
            scheme: Scheme::Stripe,
        })
    }

    fn verify_github(&self, signature: &str, body: &[u8]) -> Result<Delivery, Refusal> {
        let hex_sig = signature
            .trim()
            .strip_prefix("sha256=")
            .ok_or(Refusal::Malformed(
                "`X-Hub-Signature-256` must be `sha256=<hex>`",
            ))?;
        let sig = hex::decode(hex_sig)
            .map_err(|_| Refusal::Malformed("`X-Hub-Signature-256` is not hex"))?;
        if !any_matches(&self.raw_key, &[body], std::iter::once(sig)) {
            return Err(Refusal::BadSignature);
        }
        // GitHub signs no timestamp and not its `X-GitHub-Delivery` header, so anyone holding
        // one genuine delivery could resend it under a new GUID: what makes a replay is the
        // signature, that is the body (a redelivery from GitHub's page is the same body).
        Ok(Delivery {
            id: format!("sha256={}", hex_sig.to_ascii_lowercase()),
            scheme: Scheme::Github,
        })
    }

    /// The entrypoint's input (a JSON object's text) from a verified body: each mapped
    /// parameter gets what its path selects (one node as it is, several as a list, none:
    /// left out, so its default applies); without a mapping the body object is the input.
    pub fn input(&self, body: &[u8]) -> Result<String, InputError> {
        if self.mapping.is_empty() {
            let text = std::str::from_utf8(body).map_err(|e| InputError::NotJson(e.to_string()))?;
            return match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(_)) => Ok(text.to_string()),
                Ok(_) => Err(InputError::NotAnObject),
                Err(e) => Err(InputError::NotJson(e.to_string())),
            };
        }
        let doc: Value =
            serde_json::from_slice(body).map_err(|e| InputError::NotJson(e.to_string()))?;
        let mut input = Map::new();
        for (param, path) in &self.mapping {
            let mut found = path.query(&doc).all();
            let value = match found.len() {
                0 => continue,
                1 => found.swap_remove(0).clone(),
                _ => Value::Array(found.into_iter().cloned().collect()),
            };
            input.insert(param.clone(), value);
        }
        Ok(Value::Object(input).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WebhookSettings {
        WebhookSettings {
            name: "orders".into(),
            secret_env: Some("ORDERS_SECRET".into()),
            secret_file: None,
            scheme: Scheme::Any,
            tolerance_s: DEFAULT_TOLERANCE_S,
            max_body_bytes: None,
            input: BTreeMap::new(),
        }
    }

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn hook(s: &WebhookSettings) -> Hook {
        Hook::new(s, "agent-1", "handle", SECRET, 1 << 20).expect("a hook")
    }

    fn headers<'a>(list: &'a [(&'a str, String)]) -> impl Fn(&str) -> Option<&'a str> {
        move |name| {
            list.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// The example of the Standard Webhooks specification: its secret, id, timestamp, body
    /// and signature.
    #[test]
    fn the_standard_webhooks_example_verifies() {
        let body = br#"{"test": 2432232314}"#;
        let list = [
            ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek".to_string()),
            ("webhook-timestamp", "1614265330".to_string()),
            (
                "webhook-signature",
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".to_string(),
            ),
        ];
        let h = hook(&settings());
        let d = h
            .verify(headers(&list), body, 1_614_265_330)
            .expect("verified");
        assert_eq!(d.id, "msg_p5jXN8AQM9LWM0D4loKWxJek");
        assert_eq!(d.scheme, Scheme::Standard);
        assert_eq!(
            standard_signature(&h.standard_key, &d.id, 1_614_265_330, body),
            list[2].1
        );
        // The same delivery an hour later is stale; one changed byte does not match.
        assert!(matches!(
            h.verify(headers(&list), body, 1_614_268_930),
            Err(Refusal::Stale { .. })
        ));
        assert_eq!(
            h.verify(headers(&list), br#"{"test": 2432232315}"#, 1_614_265_330),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn github_and_stripe_signatures_verify_and_name_their_delivery() {
        let h = hook(&settings());
        let body = br#"{"id":"evt_1","n":3}"#;
        let hex_of =
            |parts: &[&[u8]]| hex::encode(mac(SECRET.as_bytes(), parts).finalize().into_bytes());
        let gh = [
            ("x-hub-signature-256", format!("sha256={}", hex_of(&[body]))),
            (
                "x-github-delivery",
                "72d3162e-cc78-11e3-81ab-4c9367dc0958".to_string(),
            ),
        ];
        let d = h.verify(headers(&gh), body, 0).expect("github");
        assert_eq!(
            (d.scheme, d.id.clone()),
            (Scheme::Github, format!("sha256={}", hex_of(&[body])))
        );
        let stripe = [(
            "stripe-signature",
            format!(
                "t=1700000000,v1={},v0=ignored",
                hex_of(&[b"1700000000", b".", body])
            ),
        )];
        let d = h
            .verify(headers(&stripe), body, 1_700_000_100)
            .expect("stripe");
        assert_eq!((d.scheme, d.id.as_str()), (Scheme::Stripe, "evt_1"));
        assert!(matches!(
            h.verify(headers(&stripe), body, 1_700_000_301),
            Err(Refusal::Stale { .. })
        ));
        // A hook limited to one scheme does not read the others.
        let only_standard = hook(&WebhookSettings {
            scheme: Scheme::Standard,
            ..settings()
        });
        assert_eq!(
            only_standard.verify(headers(&gh), body, 0),
            Err(Refusal::Unsigned)
        );
        assert_eq!(
            h.verify(
                headers(&[("x-hub-signature-256", "sha256=zz".into())]),
                body,
                0
            ),
            Err(Refusal::Malformed("`X-Hub-Signature-256` is not hex"))
        );
    }

    #[test]
    fn the_mapping_picks_each_parameter_from_the_body() {
        let mut s = settings();
        s.input.insert("title".into(), "$.issue.title".into());
        s.input
            .insert("labels".into(), "$.issue.labels[*].name".into());
        s.input.insert("absent".into(), "$.nope".into());
        let h = hook(&s);
        let body = br#"{"issue":{"title":"Crash","labels":[{"name":"bug"},{"name":"p1"}]}}"#;
        let input: Value = serde_json::from_str(&h.input(body).expect("mapped")).expect("json");
        assert_eq!(
            input,
            serde_json::json!({"labels": ["bug", "p1"], "title": "Crash"})
        );
        assert!(matches!(h.input(b"not json"), Err(InputError::NotJson(_))));
        let plain = hook(&settings());
        assert_eq!(plain.input(br#"{"i": 1}"#).as_deref(), Ok(r#"{"i": 1}"#));
        assert_eq!(plain.input(b"[1]"), Err(InputError::NotAnObject));
        assert!(parse_path("$.[").is_err());
    }

    /// Thousands of empty candidates cost one MAC, and match nothing.
    #[test]
    fn a_flood_of_candidate_signatures_is_refused_cheaply() {
        let h = hook(&settings());
        let flood = ["v1,"; 20_000].join(" ");
        let list = [
            ("webhook-id", "msg_1".to_string()),
            ("webhook-timestamp", "100".to_string()),
            ("webhook-signature", flood),
        ];
        assert_eq!(
            h.verify(headers(&list), b"{}", 100),
            Err(Refusal::BadSignature)
        );
        let mut genuine = standard_signature(&h.standard_key, "msg_1", 100, b"{}");
        genuine = format!("{} {genuine}", ["v1,AAAA"; 8].join(" "));
        let list = [
            ("webhook-id", "msg_1".to_string()),
            ("webhook-timestamp", "100".to_string()),
            ("webhook-signature", genuine),
        ];
        assert!(
            h.verify(headers(&list), b"{}", 100).is_ok(),
            "short candidates do not count against the cap"
        );
    }

    #[test]
    fn names_are_path_segments() {
        assert!(valid_name("github-issues.v2"));
        for bad in ["", "-x", "a/b", "a%2Fb", "ü", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_secret_is_never_printed() {
        let printed = format!("{:?}", hook(&settings()));
        assert!(!printed.contains("MfKQ9r8G"), "{printed}");
    }
}
