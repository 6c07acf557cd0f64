//! An agent folder's configuration, read exactly as RunAgent 0.1.49 reads it
//! (`runagent/utils/agent.py` and the `RunAgentConfig` pydantic model): `runagent.config.json`,
//! else `.yaml`, else `.yml`; a `.env` beside it merged over `env_vars`; unknown keys ignored.
//!
//! Agentry's own per-agent settings live under an optional `agentry` key, which RunAgent ignores,
//! so one file serves both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDateTime};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The config file names, in RunAgent's lookup order.
pub const CONFIG_FILE_NAMES: [&str; 3] = [
    "runagent.config.json",
    "runagent.config.yaml",
    "runagent.config.yml",
];

/// The `framework` values RunAgent accepts (its `Framework` enum, HEAD's additions included).
pub const FRAMEWORKS: [&str; 15] = [
    "default",
    "ag2",
    "agno",
    "autogen",
    "crewai",
    "langchain",
    "langgraph",
    "letta",
    "llamaindex",
    "openai",
    "n8n",
    "parlant",
    "openclaw",
    "picoclaw",
    "zeroclaw",
];

/// Why an agent folder cannot be served. Each message names the agent folder and the cause.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{dir}: no config file found (tried runagent.config.json, runagent.config.yaml, runagent.config.yml)"
    )]
    NotFound { dir: PathBuf },
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: invalid {format}: {message}")]
    Syntax {
        file: PathBuf,
        format: &'static str,
        message: String,
    },
    #[error("{file}: {message}")]
    Invalid { file: PathBuf, message: String },
    #[error("{file}: cannot read .env: {message}")]
    DotEnv { file: PathBuf, message: String },
}

/// `template_source` of the config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TemplateSource {
    pub repo_url: String,
    pub author: String,
    pub path: String,
}

/// How an entrypoint is reached.
#[derive(Debug, Clone, PartialEq)]
pub enum EntrypointKind {
    /// A Python callable: `module` is `fn` or `obj.attr.attr` inside `file`.
    Python { file: String, module: String },
    /// An n8n-style webhook entrypoint, served by `agentry-remote`'s `WebhookAgent`.
    Webhook {
        webhook_url: String,
        method: String,
        timeout_s: f64,
    },
}

/// One entrypoint of an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Entrypoint {
    pub tag: String,
    pub kind: EntrypointKind,
    /// `{out_key: JSONPath}` applied to results and stream chunks (may be empty).
    pub extractor: serde_json::Map<String, Value>,
    /// Agentry: the default deadline of a call, from `agentry.entrypoints.<tag>.timeout_s`.
    pub timeout_s: Option<f64>,
    /// Agentry: the default priority of its runs, from `[agents.<name>.entrypoints.<tag>]`.
    pub priority: Option<i32>,
    /// Agentry: at most this many of its durable runs run at once, across every node sharing
    /// the store (`[agents.<name>.entrypoints.<tag>] max_concurrency`).
    pub max_concurrency: Option<usize>,
}

impl Entrypoint {
    /// RunAgent's only signal for streaming: the tag ends with `_stream`.
    pub fn is_streaming(&self) -> bool {
        self.tag.ends_with("_stream")
    }
}

/// Agentry's optional per-agent settings (the `agentry` key of the config file).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentOverrides {
    /// The Python interpreter for this agent's workers.
    pub python: Option<PathBuf>,
    /// Number of warm workers for this agent.
    pub workers: Option<usize>,
    /// Default call deadline for every entrypoint of this agent, in seconds.
    pub timeout_s: Option<f64>,
    /// Per-entrypoint settings, by tag.
    #[serde(default)]
    pub entrypoints: BTreeMap<String, EntrypointOverrides>,
}

/// Agentry's per-entrypoint settings.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EntrypointOverrides {
    pub timeout_s: Option<f64>,
}

/// A loaded, validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The agent folder, absolute.
    pub dir: PathBuf,
    /// The config file that was read.
    pub file: PathBuf,
    pub agent_id: String,
    pub agent_name: String,
    pub description: String,
    pub framework: String,
    pub template: String,
    pub version: String,
    /// `created_at` as pydantic serialises it (ISO 8601).
    pub created_at: String,
    pub template_source: TemplateSource,
    pub entrypoints: Vec<Entrypoint>,
    /// Config `env_vars` with `.env` merged over them, in file order.
    pub env_vars: Vec<(String, String)>,
    pub auth_settings: Value,
    pub persistent_folders: Vec<String>,
    pub overrides: AgentOverrides,
}

impl AgentConfig {
    /// Reads and validates the config of the agent folder at `dir`.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let dir = std::path::absolute(dir).map_err(|source| ConfigError::Read {
            file: dir.to_path_buf(),
            source,
        })?;
        let Some(file) = CONFIG_FILE_NAMES
            .iter()
            .map(|name| dir.join(name))
            .find(|p| p.is_file())
        else {
            return Err(ConfigError::NotFound { dir });
        };
        let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let mut config = Self::parse(&dir, &file, &text)?;
        let env_file = dir.join(".env");
        if env_file.is_file() {
            let pairs = dotenvy::from_path_iter(&env_file).map_err(|e| ConfigError::DotEnv {
                file: env_file.clone(),
                message: e.to_string(),
            })?;
            for pair in pairs {
                let (key, value) = pair.map_err(|e| ConfigError::DotEnv {
                    file: env_file.clone(),
                    message: e.to_string(),
                })?;
                match config.env_vars.iter_mut().find(|(k, _)| *k == key) {
                    Some(slot) => slot.1 = value,
                    None => config.env_vars.push((key, value)),
                }
            }
        }
        Ok(config)
    }

    /// Parses and validates the text of `file` (JSON if it ends in `.json`, else YAML): the part
    /// of `load` that does no I/O, and what `fuzz/` drives with arbitrary input.
    pub fn parse(dir: &Path, file: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: Value = if file.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(text).map_err(|e| ConfigError::Syntax {
                file: file.to_path_buf(),
                format: "JSON",
                message: e.to_string(),
            })?
        } else {
            serde_norway::from_str(text).map_err(|e| ConfigError::Syntax {
                file: file.to_path_buf(),
                format: "YAML",
                message: e.to_string(),
            })?
        };
        Self::from_value(dir, file, raw)
    }

    /// Validates a parsed config document.
    pub fn from_value(dir: &Path, file: &Path, raw: Value) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            message,
        };
        let Value::Object(obj) = raw else {
            return Err(invalid(
                "the config must be an object (or it is empty)".into(),
            ));
        };
        if obj.is_empty() {
            return Err(invalid("the config is empty".into()));
        }
        let string_field = |name: &str| -> Result<String, ConfigError> {
            match obj.get(name) {
                Some(Value::String(s)) => Ok(s.clone()),
                None => Err(invalid(format!("field `{name}` is required"))),
                Some(Value::Null) => Err(invalid(format!("field `{name}` must not be null"))),
                Some(other) => Err(invalid(format!(
                    "field `{name}` must be a string, not {}",
                    json_type_name(other)
                ))),
            }
        };
        let agent_name = string_field("agent_name")?;
        let description = string_field("description")?;
        let framework = string_field("framework")?;
        if !FRAMEWORKS.contains(&framework.as_str()) {
            return Err(invalid(format!(
                "field `framework` is `{framework}`; expected one of {}",
                FRAMEWORKS.join(", ")
            )));
        }
        let template = string_field("template")?;
        let version = string_field("version")?;
        let agent_id = string_field("agent_id")?;
        if !is_route_segment(&agent_id) {
            return Err(invalid(format!(
                "field `agent_id` is `{agent_id}`: it is part of every RunAgent URL, so it may hold only letters, digits and `-`, `_`, `.`, `~`"
            )));
        }
        let created_at = match obj.get("created_at") {
            Some(Value::String(s)) => python_created_at(s),
            None => return Err(invalid("field `created_at` is required".into())),
            Some(other) => {
                return Err(invalid(format!(
                    "field `created_at` must be a datetime string, not {}",
                    json_type_name(other)
                )));
            }
        };
        let template_source: TemplateSource = match obj.get("template_source") {
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| invalid(format!("field `template_source`: {e}")))?,
            None => return Err(invalid("field `template_source` is required".into())),
        };
        let env_vars = match obj.get("env_vars") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Err(invalid(format!(
                        "env_vars.{k} must be a string, not {}",
                        json_type_name(other)
                    ))),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(invalid(format!(
                    "field `env_vars` must be an object, not {}",
                    json_type_name(other)
                )));
            }
        };
        let persistent_folders = match obj.get("persistent_folders") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| invalid(format!("field `persistent_folders`: {e}")))?,
        };
        let auth_settings = match obj.get("auth_settings") {
            None | Some(Value::Null) => serde_json::json!({"type": "none"}),
            Some(v @ Value::Object(_)) => v.clone(),
            Some(other) => {
                return Err(invalid(format!(
                    "field `auth_settings` must be an object, not {}",
                    json_type_name(other)
                )));
            }
        };
        let overrides: AgentOverrides = match obj.get("agentry") {
            None | Some(Value::Null) => AgentOverrides::default(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| invalid(format!("field `agentry`: {e}")))?,
        };
        let entrypoints = parse_entrypoints(obj.get("agent_architecture"), &overrides, &invalid)?;
        for tag in overrides.entrypoints.keys() {
            if !entrypoints.iter().any(|e| &e.tag == tag) {
                return Err(invalid(format!(
                    "agentry.entrypoints.{tag}: no entrypoint has that tag"
                )));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            file: file.to_path_buf(),
            agent_id,
            agent_name,
            description,
            framework,
            template,
            version,
            created_at,
            template_source,
            entrypoints,
            env_vars,
            auth_settings,
            persistent_folders,
            overrides,
        })
    }

    /// The entrypoint with this tag.
    pub fn entrypoint(&self, tag: &str) -> Option<&Entrypoint> {
        self.entrypoints.iter().find(|e| e.tag == tag)
    }

    /// The config as RunAgent's `GET /api/v1` shows it: pydantic's dump, without `env_vars`.
    pub fn info_json(&self) -> Value {
        let entrypoints: Vec<Value> = self
            .entrypoints
            .iter()
            .map(|e| match &e.kind {
                EntrypointKind::Python { file, module } => serde_json::json!({
                    "file": file, "module": module, "tag": e.tag, "extractor": e.extractor,
                }),
                EntrypointKind::Webhook {
                    webhook_url,
                    method,
                    timeout_s,
                } => serde_json::json!({
                    "webhook_url": webhook_url, "method": method, "tag": e.tag,
                    "timeout": timeout_s, "extractor": e.extractor,
                }),
            })
            .collect();
        serde_json::json!({
            "agent_name": self.agent_name,
            "description": self.description,
            "framework": self.framework,
            "template": self.template,
            "version": self.version,
            "created_at": self.created_at,
            "template_source": self.template_source,
            "agent_architecture": {"entrypoints": entrypoints},
            "agent_id": self.agent_id,
            "auth_settings": self.auth_settings,
            "persistent_folders": self.persistent_folders,
        })
    }
}

/// Whether `s` can stand in a URL path segment as it is (RFC 3986's unreserved characters),
/// as agent ids and tags do in the routes.
fn is_route_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

fn parse_entrypoints(
    architecture: Option<&Value>,
    overrides: &AgentOverrides,
    invalid: &dyn Fn(String) -> ConfigError,
) -> Result<Vec<Entrypoint>, ConfigError> {
    let list = match architecture {
        None | Some(Value::Null) => {
            return Err(invalid(
                "`agent_architecture.entrypoints` is missing: an agent needs at least one entrypoint".into(),
            ));
        }
        Some(Value::Object(arch)) => match arch.get("entrypoints") {
            Some(Value::Array(list)) if !list.is_empty() => list,
            Some(Value::Array(_)) | None | Some(Value::Null) => {
                return Err(invalid(
                    "`agent_architecture.entrypoints` is empty: an agent needs at least one entrypoint".into(),
                ));
            }
            Some(other) => {
                return Err(invalid(format!(
                    "`agent_architecture.entrypoints` must be a list, not {}",
                    json_type_name(other)
                )));
            }
        },
        Some(other) => {
            return Err(invalid(format!(
                "`agent_architecture` must be an object, not {}",
                json_type_name(other)
            )));
        }
    };
    let mut out: Vec<Entrypoint> = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let Value::Object(ep) = item else {
            return Err(invalid(format!(
                "entrypoint #{i} must be an object, not {}",
                json_type_name(item)
            )));
        };
        let text = |name: &str| -> Result<String, ConfigError> {
            match ep.get(name) {
                Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(Value::String(_)) => Err(invalid(format!(
                    "entrypoint #{i}: field `{name}` must not be empty"
                ))),
                None | Some(Value::Null) => Err(invalid(format!(
                    "entrypoint #{i}: field `{name}` is required"
                ))),
                Some(other) => Err(invalid(format!(
                    "entrypoint #{i}: field `{name}` must be a string, not {}",
                    json_type_name(other)
                ))),
            }
        };
        let tag = text("tag")?;
        if !is_route_segment(&tag) {
            return Err(invalid(format!(
                "entrypoint #{i}: tag `{tag}` is part of its URLs, so it may hold only letters, digits and `-`, `_`, `.`, `~`"
            )));
        }
        let kind = if ep.contains_key("webhook_url") {
            let method = match ep.get("method") {
                None | Some(Value::Null) => "post".to_string(),
                Some(_) => text("method")?.to_ascii_lowercase(),
            };
            EntrypointKind::Webhook {
                webhook_url: text("webhook_url")?,
                method,
                timeout_s: ep.get("timeout").and_then(Value::as_f64).unwrap_or(30.0),
            }
        } else {
            EntrypointKind::Python {
                file: text("file")?,
                module: text("module")?,
            }
        };
        if let Some(prev) = out.first() {
            let mixed = matches!(prev.kind, EntrypointKind::Python { .. })
                != matches!(kind, EntrypointKind::Python { .. });
            if mixed {
                return Err(invalid(format!(
                    "entrypoint `{tag}`: an agent's entrypoints are either all Python or all webhooks"
                )));
            }
        }
        let extractor = match ep.get("extractor") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(map)) => {
                if let Some((k, _)) = map.iter().find(|(_, v)| !v.is_string()) {
                    return Err(invalid(format!(
                        "entrypoint `{tag}`: extractor.{k} must be a JSONPath string"
                    )));
                }
                map.clone()
            }
            Some(other) => {
                return Err(invalid(format!(
                    "entrypoint `{tag}`: extractor must be an object, not {}",
                    json_type_name(other)
                )));
            }
        };
        if out.iter().any(|e| e.tag == tag) {
            return Err(invalid(format!(
                "entrypoint tag `{tag}` is used twice; tags must be unique"
            )));
        }
        let timeout_s = overrides
            .entrypoints
            .get(&tag)
            .and_then(|o| o.timeout_s)
            .or(overrides.timeout_s);
        if let Some(t) = timeout_s
            && !(t.is_finite() && t > 0.0)
        {
            return Err(invalid(format!(
                "entrypoint `{tag}`: timeout_s must be a positive number of seconds"
            )));
        }
        out.push(Entrypoint {
            tag,
            kind,
            extractor,
            timeout_s,
            priority: None,
            max_concurrency: None,
        });
    }
    Ok(out)
}

/// `created_at` the way pydantic parses and re-serialises it; unparseable values become now
/// (RunAgent's loader does the same).
fn python_created_at(text: &str) -> String {
    let trimmed = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(trimmed) {
        let naive = crate::time::python_isoformat(t.naive_local());
        let offset = t.offset().local_minus_utc();
        return if offset == 0 && (trimmed.ends_with('Z') || trimmed.ends_with('z')) {
            format!("{naive}Z")
        } else {
            let sign = if offset < 0 { '-' } else { '+' };
            let abs = offset.abs();
            format!("{naive}{sign}{:02}:{:02}", abs / 3600, (abs % 3600) / 60)
        };
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(trimmed, format) {
            return crate::time::python_isoformat(t);
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(trimmed, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return crate::time::python_isoformat(t);
    }
    crate::time::python_isoformat(chrono::Local::now().naive_local())
}

fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "agent_name": "a", "description": "d", "framework": "default", "template": "",
            "version": "1", "created_at": "2025-06-25 13:42:03",
            "template_source": {"repo_url": "r", "author": "x", "path": "p"},
            "agent_architecture": {"entrypoints": [{"file": "a.py", "module": "f", "tag": "t"}]},
            "agent_id": "id", "unknown": 1
        })
    }

    fn load(v: Value) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_value(Path::new("/x"), Path::new("/x/runagent.config.json"), v)
    }

    #[test]
    fn accepts_runagent_config_and_ignores_unknown_keys() {
        let c = load(base()).unwrap();
        assert_eq!(c.created_at, "2025-06-25T13:42:03");
        assert_eq!(c.auth_settings, json!({"type": "none"}));
        assert_eq!(c.entrypoints[0].tag, "t");
    }

    #[test]
    fn newer_runagent_fields_are_accepted_and_an_empty_entrypoint_list_is_an_error() {
        let mut v = base();
        v["persistent_folders"] = json!(["data", "cache"]);
        v["metadata"] = json!({"runtime": {"python": "3.11"}, "anything": 1});
        let c = load(v.clone()).unwrap();
        assert_eq!(c.persistent_folders, ["data", "cache"]);
        v["agent_architecture"]["entrypoints"] = json!([]);
        let err = load(v).unwrap_err().to_string();
        assert!(err.contains("needs at least one entrypoint"), "{err}");
    }

    #[test]
    fn ids_and_tags_that_cannot_be_url_segments_are_configuration_errors() {
        for id in ["a/b", "{id}", "*x", "a b", "..", "é"] {
            let mut v = base();
            v["agent_id"] = json!(id);
            let err = load(v).unwrap_err().to_string();
            assert!(err.contains("agent_id"), "{id}: {err}");
        }
        for tag in ["a/b", "{t}", "*", "x?y"] {
            let mut v = base();
            v["agent_architecture"]["entrypoints"][0]["tag"] = json!(tag);
            let err = load(v).unwrap_err().to_string();
            assert!(err.contains("tag"), "{tag}: {err}");
        }
        let mut v = base();
        v["agent_id"] = json!("22222222-3333-4444-5555-666666666666");
        v["agent_architecture"]["entrypoints"][0]["tag"] = json!("main_stream.v2");
        load(v).unwrap();
    }

    #[test]
    fn created_at_forms() {
        assert_eq!(
            python_created_at("2025-01-01T00:00:00Z"),
            "2025-01-01T00:00:00Z"
        );
        assert_eq!(
            python_created_at("2025-01-01T00:00:00.5"),
            "2025-01-01T00:00:00.500000"
        );
        assert_eq!(
            python_created_at("2025-01-01T10:00:00+02:00"),
            "2025-01-01T10:00:00+02:00"
        );
        // Unparseable: now, which is at least a well-formed timestamp.
        assert!(python_created_at("yesterday").starts_with("20"));
    }

    #[test]
    fn rejects_duplicate_tags_and_missing_fields() {
        let mut v = base();
        v["agent_architecture"]["entrypoints"] = json!([
            {"file": "a.py", "module": "f", "tag": "t"}, {"file": "a.py", "module": "g", "tag": "t"}
        ]);
        let err = load(v).unwrap_err().to_string();
        assert!(err.contains("`t` is used twice"), "{err}");

        let mut v = base();
        v["agent_id"] = Value::Null;
        assert!(
            load(v)
                .unwrap_err()
                .to_string()
                .contains("`agent_id` must not be null")
        );

        let mut v = base();
        v.as_object_mut().unwrap().remove("description");
        assert!(
            load(v)
                .unwrap_err()
                .to_string()
                .contains("`description` is required")
        );

        let mut v = base();
        v["framework"] = json!("django");
        assert!(load(v).unwrap_err().to_string().contains("framework"));

        let mut v = base();
        v["agent_architecture"]["entrypoints"] = json!([]);
        assert!(load(v).unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn agentry_overrides_set_timeouts() {
        let mut v = base();
        v["agentry"] = json!({"timeout_s": 5, "entrypoints": {"t": {"timeout_s": 2.5}}});
        let c = load(v).unwrap();
        assert_eq!(c.entrypoints[0].timeout_s, Some(2.5));
        let mut v = base();
        v["agentry"] = json!({"entrypoints": {"nope": {"timeout_s": 2}}});
        assert!(load(v).unwrap_err().to_string().contains("nope"));
        let mut v = base();
        v["agentry"] = json!({"bogus": 1});
        assert!(load(v).is_err());
    }
}
