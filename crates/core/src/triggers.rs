//! Event triggers (`docs/triggers.md`): a run of an entrypoint starts when another run emits a
//! matching event or ends. What a trigger is, as configured (`EventTriggerSettings`, under
//! `[agents.<name>.entrypoints.<tag>.event]`), checked once into an [`EventTrigger`]; which
//! events of the global log it fires on ([`EventTrigger::fires_on`]); and the run it starts
//! ([`EventTrigger::run_request`]). The engine's trigger loop reads the log and stores the runs.
//!
//! Loops are stopped twice: a trigger never fires on events of runs of its own entrypoint (a
//! run never triggers itself, nor its own kind), and a chain (A → B → A → …) stops at
//! `triggers.max_depth`.

use serde::{Deserialize, Serialize};
use serde_json_path::JsonPath;

use crate::events::LoggedEvent;
use crate::runs::RunRequest;

/// The event kinds a trigger fires on when it names none.
pub const DEFAULT_KINDS: [&str; 1] = ["run.succeeded"];
/// The keyword argument that receives the triggering event when a trigger names none.
pub const DEFAULT_ARGUMENT: &str = "event";

/// An event trigger as configured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventTriggerSettings {
    /// Tells one of an entrypoint's `events` from the others (`event` has none). Left out of
    /// the settings' digest when absent, so a trigger's cursor outlives this field's arrival.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The event kinds that fire it (`run.succeeded`, `run.failed`, an agent's own `progress`);
    /// default `["run.succeeded"]`.
    pub kinds: Vec<String>,
    /// Only events of runs of this agent (name or id).
    pub agent: Option<String>,
    /// Only events of runs of this entrypoint.
    pub entrypoint: Option<String>,
    /// A JSONPath into the event's `data` (`$.result.status`); the event matches when its
    /// first match equals `equals` (or, without `equals`, when it matches anything).
    pub field: Option<String>,
    pub equals: Option<serde_json::Value>,
    /// The keyword argument the triggering event is passed in (default `event`).
    pub argument: Option<String>,
}

impl EventTriggerSettings {
    /// Where this trigger is configured, for errors: `agents.<agent>.entrypoints.<tag>.event`,
    /// or `….events.<name>` for a named one.
    pub fn setting_path(&self, agent: &str, tag: &str) -> String {
        match &self.name {
            None => format!("agents.{agent}.entrypoints.{tag}.event"),
            Some(n) => format!("agents.{agent}.entrypoints.{tag}.events.{n}"),
        }
    }
}

/// Whether `name` may name one of an entrypoint's `events`: 1 to 64 letters, digits, `-`, `_`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A trigger checked against the served agents: ready to match events.
#[derive(Debug, Clone)]
pub struct EventTrigger {
    /// `<agent id>/<tag>` (`<agent id>/<tag>/<name>` for one of `events`), in the runs'
    /// idempotency keys: the same on every node, whatever the agent is called there.
    pub name: String,
    /// The stored cursor's name: `name` and a digest of the settings, so that nodes with
    /// different copies of a trigger (a rolling change) never move each other's cursor.
    pub cursor: String,
    /// The agent (its id) and entrypoint whose runs the trigger starts.
    pub agent: String,
    pub entrypoint: String,
    kinds: Vec<String>,
    /// The source agent's id.
    source_agent: Option<String>,
    source_entrypoint: Option<String>,
    field: Option<JsonPath>,
    equals: Option<serde_json::Value>,
    argument: String,
}

/// Why a trigger's settings are refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct TriggerSettingsError {
    pub field: String,
    pub message: String,
}

impl EventTrigger {
    /// Checks the settings declared under `agents.<agent>.entrypoints.<tag>.event`; a source
    /// agent is resolved with `resolve` (a name or id to the id; `None` when not served here:
    /// an agent served only by other nodes must be named by its id, a UUID).
    pub fn new(
        agent_name: &str,
        agent_id: &str,
        tag: &str,
        s: &EventTriggerSettings,
        resolve: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, TriggerSettingsError> {
        let at = s.setting_path(agent_name, tag);
        let err = |field: &str, message: String| TriggerSettingsError {
            field: format!("{at}.{field}"),
            message,
        };
        let kinds: Vec<String> = if s.kinds.is_empty() {
            DEFAULT_KINDS.iter().map(|k| k.to_string()).collect()
        } else {
            s.kinds.clone()
        };
        if kinds.iter().any(|k| k.trim().is_empty()) {
            return Err(err("kinds", "an event kind is empty".into()));
        }
        if s.agent.as_deref().is_some_and(str::is_empty) {
            return Err(err("agent", "must not be empty".into()));
        }
        let source_agent = match s.agent.as_deref() {
            None => None,
            Some(a) => Some(match resolve(a) {
                Some(id) => id,
                None if uuid::Uuid::parse_str(a).is_ok() => a.to_string(),
                None => {
                    return Err(err(
                        "agent",
                        format!(
                            "no agent `{a}` is served here; name an agent served elsewhere by its id"
                        ),
                    ));
                }
            }),
        };
        let field = s
            .field
            .as_deref()
            .map(JsonPath::parse)
            .transpose()
            .map_err(|e| err("field", format!("not a JSONPath: {e}")))?;
        if s.equals.is_some() && field.is_none() {
            return Err(err("equals", "needs `field`".into()));
        }
        let argument = s.argument.clone().unwrap_or(DEFAULT_ARGUMENT.into());
        if argument.is_empty() {
            return Err(err("argument", "must not be empty".into()));
        }
        let name = match &s.name {
            None => format!("{agent_id}/{tag}"),
            Some(n) => format!("{agent_id}/{tag}/{n}"),
        };
        let digest = {
            use sha2::{Digest, Sha256};
            let text = serde_json::to_string(s).unwrap_or_default();
            let d = Sha256::digest(text.as_bytes());
            d[..6]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        Ok(Self {
            cursor: format!("{name}#{digest}"),
            name,
            agent: agent_id.to_string(),
            entrypoint: tag.to_string(),
            kinds,
            source_agent,
            source_entrypoint: s.entrypoint.clone(),
            field,
            equals: s.equals.clone(),
            argument,
        })
    }

    /// Whether this event starts a run: its kind and source match, it is not an event of a
    /// run of the trigger's own entrypoint, and its data's field (if any) has the value.
    pub fn fires_on(&self, e: &LoggedEvent) -> bool {
        if e.agent == self.agent && e.entrypoint == self.entrypoint {
            return false;
        }
        if !self.kinds.iter().any(|k| k == e.event.kind.as_str())
            || self.source_agent.as_ref().is_some_and(|a| *a != e.agent)
            || self
                .source_entrypoint
                .as_ref()
                .is_some_and(|t| *t != e.entrypoint)
        {
            return false;
        }
        let Some(path) = &self.field else {
            return true;
        };
        let Ok(data) = serde_json::from_str::<serde_json::Value>(&e.event.data) else {
            return false;
        };
        match (path.query(&data).first(), &self.equals) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(found), Some(want)) => found == want,
        }
    }

    /// The idempotency key of the run this event starts: one run per trigger and event,
    /// however many nodes read the event, however often.
    pub fn idempotency_key(&self, e: &LoggedEvent) -> String {
        format!("trigger:{}:{}:{}", self.name, e.event.run_id, e.event.seq)
    }

    /// The input of the run this event starts: `{<argument>: <the event>}`. A failure's
    /// traceback is left out: the triggered run's readers may not be allowed to see the
    /// source agent's.
    pub fn input(&self, e: &LoggedEvent) -> String {
        let mut data: serde_json::Value =
            serde_json::from_str(&e.event.data).unwrap_or(serde_json::Value::Null);
        if let Some(error) = data.get_mut("error").and_then(|v| v.as_object_mut()) {
            error.remove("traceback");
        }
        let event = serde_json::json!({
            "run_id": e.event.run_id,
            "agent_id": e.agent,
            "entrypoint": e.entrypoint,
            "type": e.event.kind.as_str(),
            "seq": e.event.seq,
            "at": e.event.at,
            "data": data,
            "correlation_id": chain_id(e),
            "depth": e.depth,
        });
        serde_json::json!({ self.argument.as_str(): event }).to_string()
    }

    /// The run this event starts, for `NewRun::build`; `input` and `key` are
    /// [`Self::input`] and [`Self::idempotency_key`] (the caller keeps them alive).
    pub fn run_request<'a>(
        &'a self,
        e: &'a LoggedEvent,
        input: &'a str,
        key: &'a str,
    ) -> RunRequest<'a> {
        RunRequest {
            agent: &self.agent,
            entrypoint: &self.entrypoint,
            input: Some(input),
            idempotency_key: Some(key),
            idempotency_scope: Some(TRIGGER_SCOPE),
            correlation_id: Some(chain_id(e)),
            ..RunRequest::default()
        }
    }
}

/// The idempotency scope of triggered runs: no API key's keys can find or squat them.
pub const TRIGGER_SCOPE: &str = "trigger:";

/// The chain a triggered run joins: its source's correlation id, else the source run itself.
pub fn chain_id(e: &LoggedEvent) -> &str {
    e.correlation_id.as_deref().unwrap_or(&e.event.run_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventCursor, EventKind};
    use crate::runs::RunEvent;

    fn event(agent: &str, tag: &str, kind: EventKind, data: &str) -> LoggedEvent {
        LoggedEvent {
            cursor: EventCursor { tx: 0, gseq: 7 },
            agent: agent.into(),
            entrypoint: tag.into(),
            correlation_id: None,
            depth: 0,
            event: RunEvent {
                run_id: "r1".into(),
                seq: 3,
                kind,
                data: data.into(),
                at: 0,
            },
        }
    }

    fn trigger(s: EventTriggerSettings) -> EventTrigger {
        EventTrigger::new("b", "B", "step", &s, |a| {
            (a == "a").then(|| "A".to_string())
        })
        .expect("valid")
    }

    #[test]
    fn fires_on_matching_kind_source_and_field_only() {
        let t = trigger(EventTriggerSettings {
            agent: Some("a".into()),
            field: Some("$.result.ok".into()),
            equals: Some(true.into()),
            ..Default::default()
        });
        let ok = r#"{"attempt":1,"result":{"ok":true}}"#;
        assert!(t.fires_on(&event("A", "x", EventKind::Succeeded, ok)));
        assert!(!t.fires_on(&event("A", "x", EventKind::Failed, ok)));
        assert!(!t.fires_on(&event("C", "x", EventKind::Succeeded, ok)));
        let not_ok = r#"{"attempt":1,"result":{"ok":false}}"#;
        assert!(!t.fires_on(&event("A", "x", EventKind::Succeeded, not_ok)));
        assert!(!t.fires_on(&event("A", "x", EventKind::Succeeded, "{}")));
    }

    #[test]
    fn a_named_trigger_has_its_own_name_and_an_unnamed_ones_cursor_is_unchanged() {
        let named = trigger(EventTriggerSettings {
            name: Some("after-a".into()),
            ..Default::default()
        });
        let e = event("A", "x", EventKind::Succeeded, "{}");
        assert_eq!(named.name, "B/step/after-a");
        assert_eq!(named.idempotency_key(&e), "trigger:B/step/after-a:r1:3");
        // The digest of an unnamed trigger is that of its settings as written before `name`
        // existed: cursors kept by earlier versions go on being used.
        let unnamed = trigger(EventTriggerSettings::default());
        let before = r#"{"kinds":[],"agent":null,"entrypoint":null,"field":null,"equals":null,"argument":null}"#;
        let digest = {
            use sha2::{Digest, Sha256};
            Sha256::digest(before.as_bytes())[..6]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        assert_eq!(unnamed.cursor, format!("B/step#{digest}"));
        assert_ne!(named.cursor, unnamed.cursor);
    }

    #[test]
    fn never_fires_on_its_own_entrypoint() {
        let t = trigger(EventTriggerSettings::default());
        assert!(!t.fires_on(&event("B", "step", EventKind::Succeeded, "{}")));
        assert!(t.fires_on(&event("B", "other", EventKind::Succeeded, "{}")));
    }

    #[test]
    fn the_run_carries_the_event_and_the_chain() {
        let t = trigger(EventTriggerSettings {
            argument: Some("source".into()),
            ..Default::default()
        });
        let mut e = event("A", "x", EventKind::Succeeded, r#"{"result":1}"#);
        let input: serde_json::Value = serde_json::from_str(&t.input(&e)).expect("json");
        assert_eq!(input["source"]["run_id"], "r1");
        assert_eq!(input["source"]["data"]["result"], 1);
        assert_eq!(t.idempotency_key(&e), "trigger:B/step:r1:3");
        let failed = event(
            "A",
            "x",
            EventKind::Failed,
            r#"{"error":{"code":"agent_error","traceback":"secret"}}"#,
        );
        assert!(!t.input(&failed).contains("secret"));
        assert_eq!(chain_id(&e), "r1");
        e.correlation_id = Some("c".into());
        assert_eq!(chain_id(&e), "c");
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad = |s: EventTriggerSettings| {
            EventTrigger::new("b", "B", "step", &s, |_| None).expect_err("refused")
        };
        assert!(
            bad(EventTriggerSettings {
                agent: Some("not-served".into()),
                ..Default::default()
            })
            .field
            .ends_with(".agent")
        );
        assert!(
            bad(EventTriggerSettings {
                field: Some("not a path".into()),
                ..Default::default()
            })
            .field
            .ends_with(".field")
        );
        assert!(
            bad(EventTriggerSettings {
                equals: Some(1.into()),
                ..Default::default()
            })
            .field
            .ends_with(".equals")
        );
    }
}
