//! API keys: what a key may do (scopes, agents), how a key looks, and how it is checked.
//!
//! A key is `ak_<id>_<secret>`: the `ak_<id>` part names the key (in lists, logs and URLs), the
//! secret is 32 random base62 characters. Only the SHA-256 of the whole key is stored, so the
//! database never holds a usable key; a key is shown once, when it is created. A presented key's
//! digest is compared with the stored one in constant time.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a key may do. `admin` may do everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// Call entrypoints: native invoke/stream/ws and every RunAgent route.
    #[serde(rename = "invoke")]
    Invoke,
    /// Read runs and follow their events.
    #[serde(rename = "runs:read")]
    RunsRead,
    /// Create and cancel runs.
    #[serde(rename = "runs:write")]
    RunsWrite,
    /// Manage schedules.
    #[serde(rename = "schedules")]
    Schedules,
    /// Everything, including managing keys.
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 5] = [
        Self::Invoke,
        Self::RunsRead,
        Self::RunsWrite,
        Self::Schedules,
        Self::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invoke => "invoke",
            Self::RunsRead => "runs:read",
            Self::RunsWrite => "runs:write",
            Self::Schedules => "schedules",
            Self::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// A stored key (never the key itself).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    /// `ak_<id>`: the public part of the key.
    pub id: String,
    pub name: Option<String>,
    /// Hex SHA-256 of the whole key.
    pub hash: String,
    pub scopes: Vec<Scope>,
    /// Agent ids or names the key is limited to; `None`: every agent.
    pub agents: Option<Vec<String>>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub last_used_at: Option<i64>,
}

impl ApiKey {
    /// Whether the key grants `scope` (admin grants all).
    pub fn grants(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }

    /// Whether a key with `creator`'s rights may make this one: each scope granted by the
    /// creator, and, for a creator limited to agents, a limit to some of those
    /// (`same_agent(a, b)` says whether two ids or names name one agent). The refusal says
    /// what exceeds, so that no key can mint a key stronger than itself.
    pub fn within(
        &self,
        creator: &ApiKey,
        same_agent: impl Fn(&str, &str) -> bool,
    ) -> Result<(), String> {
        if let Some(until) = creator.expires_at
            && self.expires_at.is_none_or(|t| t > until)
        {
            return Err(format!(
                "the key {} expires, so the keys it makes must expire no later than it does",
                creator.id
            ));
        }
        if let Some(scope) = self.scopes.iter().find(|s| !creator.grants(**s)) {
            return Err(format!(
                "the key {} cannot grant the `{}` scope, which it lacks",
                creator.id,
                scope.as_str()
            ));
        }
        let Some(allowed) = &creator.agents else {
            return Ok(());
        };
        let Some(wanted) = &self.agents else {
            return Err(format!(
                "the key {} is limited to agents, so the keys it makes must be limited to some of them",
                creator.id
            ));
        };
        match wanted
            .iter()
            .find(|w| !allowed.iter().any(|a| same_agent(a, w)))
        {
            Some(outside) => Err(format!(
                "the key {} is not allowed agent `{outside}`",
                creator.id
            )),
            None => Ok(()),
        }
    }

    /// Whether the key may touch the agent known by `id` and `name`.
    pub fn allows_agent(&self, id: &str, name: &str) -> bool {
        self.agents
            .as_ref()
            .is_none_or(|list| list.iter().any(|a| a == id || a == name))
    }

    /// Neither revoked nor expired at `now`.
    pub fn is_active(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|t| now < t)
    }

    /// Whether `token` is this key (constant time in the digest).
    pub fn matches(&self, token: &str) -> bool {
        let presented = hash_token(token);
        presented.as_bytes().ct_eq(self.hash.as_bytes()).into()
    }
}

/// A key as its creator asks for it, before any check.
#[derive(Debug, Clone, Default)]
pub struct KeyRequest {
    /// A label for people.
    pub name: Option<String>,
    /// Scope names (`invoke`, `runs:read`, …); at least one.
    pub scopes: Vec<String>,
    /// Agents (ids or names) the key is limited to; `None`: every agent.
    pub agents: Option<Vec<String>>,
    /// Expire this many seconds after creation.
    pub expires_in_s: Option<u64>,
}

/// Why a key was not created: the field, what it should be, and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct KeyRejection {
    pub field: &'static str,
    pub expected: &'static str,
    pub message: String,
}

impl KeyRequest {
    /// Checks the request and makes the key: the stored record (its hash, never the key) and
    /// the key itself, to be shown once.
    pub fn create(self, now: i64) -> Result<(ApiKey, String), KeyRejection> {
        let mut scopes = Vec::new();
        for s in &self.scopes {
            let scope = Scope::parse(s).ok_or_else(|| KeyRejection {
                field: "scopes",
                expected: "invoke, runs:read, runs:write, schedules or admin",
                message: format!("unknown scope `{s}`"),
            })?;
            if !scopes.contains(&scope) {
                scopes.push(scope);
            }
        }
        if scopes.is_empty() {
            return Err(KeyRejection {
                field: "scopes",
                expected: "at least one scope",
                message: "a key needs at least one scope".into(),
            });
        }
        if self.expires_in_s == Some(0) {
            return Err(KeyRejection {
                field: "expires_in_s",
                expected: "positive seconds",
                message: "`expires_in_s` must be positive".into(),
            });
        }
        if self.agents.as_ref().is_some_and(Vec::is_empty) {
            return Err(KeyRejection {
                field: "agents",
                expected: "at least one agent, or absent",
                message: "`agents` is empty".into(),
            });
        }
        let (id, token) = generate_key();
        let key = ApiKey {
            id,
            name: self.name,
            hash: hash_token(&token),
            scopes,
            agents: self.agents,
            created_at: now,
            expires_at: self
                .expires_in_s
                .map(|s| now.saturating_add((s.min(i64::MAX as u64) as i64).saturating_mul(1000))),
            revoked_at: None,
            last_used_at: None,
        };
        Ok((key, token))
    }
}

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn random_base62(n: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..n)
        .map(|_| BASE62[rng.random_range(0..BASE62.len())] as char)
        .collect()
}

/// A new key: (its id, the whole key to hand to the user once).
pub fn generate_key() -> (String, String) {
    let id = format!("ak_{}", random_base62(10));
    let token = format!("{id}_{}", random_base62(32));
    (id, token)
}

/// Hex SHA-256 of a key.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The id part of a presented key, if it has the shape of one.
pub fn key_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix("ak_")?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then(|| &token[..3 + id.len()])
}

/// Parses `30d`, `12h`, `15m`, `90s` or a plain number of seconds.
pub fn parse_duration_s(text: &str) -> Option<u64> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last()? {
        (i, 'd') => (&t[..i], 86_400),
        (i, 'h') => (&t[..i], 3_600),
        (i, 'm') => (&t[..i], 60),
        (i, 's') => (&t[..i], 1),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()?
        .checked_mul(mult)
        .filter(|s| *s > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(scopes: &[Scope], agents: Option<&[&str]>) -> ApiKey {
        ApiKey {
            id: "ak_test".into(),
            name: None,
            hash: String::new(),
            scopes: scopes.to_vec(),
            agents: agents.map(|a| a.iter().map(|s| s.to_string()).collect()),
            created_at: 0,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
        }
    }

    #[test]
    fn a_key_makes_only_keys_within_its_own_rights() {
        // "echo" and "id-echo" are one agent, by name and by id.
        let same = |a: &str, b: &str| {
            a == b || matches!((a, b), ("echo", "id-echo") | ("id-echo", "echo"))
        };
        let admin = key(&[Scope::Admin], None);
        let limited_admin = key(&[Scope::Admin], Some(&["echo"]));
        assert!(key(&[Scope::Admin], None).within(&admin, same).is_ok());
        assert!(
            key(&[Scope::Invoke], Some(&["other"]))
                .within(&admin, same)
                .is_ok()
        );
        // A limited admin: only keys limited to its agents, by either form.
        assert!(
            key(&[Scope::Invoke], Some(&["id-echo"]))
                .within(&limited_admin, same)
                .is_ok()
        );
        assert!(
            key(&[Scope::Invoke], None)
                .within(&limited_admin, same)
                .is_err()
        );
        assert!(
            key(&[Scope::Invoke], Some(&["echo", "other"]))
                .within(&limited_admin, same)
                .is_err()
        );
        // No scope the creator lacks.
        let runs_reader = key(&[Scope::RunsRead], None);
        assert!(
            key(&[Scope::RunsRead], None)
                .within(&runs_reader, same)
                .is_ok()
        );
        assert!(
            key(&[Scope::Admin], None)
                .within(&runs_reader, same)
                .is_err()
        );
        assert!(
            key(&[Scope::RunsWrite], None)
                .within(&runs_reader, same)
                .is_err()
        );
        // No key outlives the key that made it.
        let mut expiring = key(&[Scope::Admin], None);
        expiring.expires_at = Some(1_000);
        let mut made = key(&[Scope::Invoke], None);
        assert!(
            made.within(&expiring, same).is_err(),
            "a key that never expires"
        );
        made.expires_at = Some(2_000);
        assert!(made.within(&expiring, same).is_err());
        made.expires_at = Some(1_000);
        assert!(made.within(&expiring, same).is_ok());
    }

    #[test]
    fn keys_are_identified_hashed_and_checked() {
        let (id, token) = generate_key();
        assert_eq!(key_id(&token), Some(id.as_str()));
        assert_eq!(token.len(), id.len() + 33);
        let key = ApiKey {
            id,
            name: None,
            hash: hash_token(&token),
            scopes: vec![Scope::Invoke],
            agents: Some(vec!["echo".into()]),
            created_at: 0,
            expires_at: Some(10),
            revoked_at: None,
            last_used_at: None,
        };
        assert!(key.matches(&token));
        assert!(!key.matches(&format!("{token}x")));
        assert!(key.grants(Scope::Invoke) && !key.grants(Scope::RunsRead));
        assert!(key.allows_agent("uuid", "echo") && !key.allows_agent("uuid", "other"));
        assert!(key.is_active(9) && !key.is_active(10));
        assert_eq!(key_id("ak__x"), None);
        assert_eq!(key_id("Bearer"), None);
    }

    #[test]
    fn key_requests_are_checked_before_a_key_is_made() {
        let ok = KeyRequest {
            scopes: vec!["invoke".into(), "invoke".into(), "runs:read".into()],
            expires_in_s: Some(60),
            ..Default::default()
        };
        let (key, token) = ok.create(1_000).unwrap();
        assert_eq!(key.scopes, [Scope::Invoke, Scope::RunsRead]);
        assert_eq!(key.expires_at, Some(61_000));
        assert!(key.matches(&token));
        for (req, field) in [
            (
                KeyRequest {
                    scopes: vec!["root".into()],
                    ..Default::default()
                },
                "scopes",
            ),
            (KeyRequest::default(), "scopes"),
            (
                KeyRequest {
                    scopes: vec!["admin".into()],
                    expires_in_s: Some(0),
                    ..Default::default()
                },
                "expires_in_s",
            ),
            (
                KeyRequest {
                    scopes: vec!["admin".into()],
                    agents: Some(vec![]),
                    ..Default::default()
                },
                "agents",
            ),
        ] {
            assert_eq!(req.create(0).unwrap_err().field, field);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_s("30d"), Some(2_592_000));
        assert_eq!(parse_duration_s("2h"), Some(7200));
        assert_eq!(parse_duration_s("90"), Some(90));
        assert_eq!(parse_duration_s("0s"), None);
        assert_eq!(parse_duration_s("x"), None);
    }
}
