//! Loading the configuration in layers, with figment: the defaults of `agentry_core::Config`,
//! then `agentry.toml` (the path given, else `./agentry.toml` when it exists), then the
//! `AGENTRY_*` environment variables named in `agentry_core::settings::FIELDS`, then flags.
//! Each value remembers the layer it came from, which `agentry config show` prints (secrets
//! redacted).

use std::collections::BTreeMap;
use std::path::PathBuf;

use agentry_core::Config;
use agentry_core::settings::{FIELDS, Field, FieldKind};
use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde_json::json;

/// The file read when none is named.
pub const DEFAULT_FILE: &str = "agentry.toml";

/// Which configuration file to read.
#[derive(Debug, Clone, Default)]
pub enum ConfigFile {
    /// `./agentry.toml` if it exists.
    #[default]
    Default,
    /// This file, which must exist (`--config`, `AGENTRY_CONFIG`).
    Path(PathBuf),
    /// None at all.
    None,
}

/// The layers above the file: environment variables and flags.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub file: ConfigFile,
    /// The environment (`std::env::vars()` for real; tests pass their own).
    pub env: Vec<(String, String)>,
    /// Settings given as flags: the dotted key and the value.
    pub flags: Vec<(&'static str, serde_json::Value)>,
}

impl Sources {
    /// The process's environment, with `AGENTRY_CONFIG` naming the file unless one is given.
    pub fn from_process(
        file: Option<PathBuf>,
        flags: Vec<(&'static str, serde_json::Value)>,
    ) -> Self {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let file = match file.or_else(|| {
            env.iter()
                .find(|(k, v)| k == "AGENTRY_CONFIG" && !v.is_empty())
                .map(|(_, v)| PathBuf::from(v))
        }) {
            Some(p) => ConfigFile::Path(p),
            None => ConfigFile::Default,
        };
        Self { file, env, flags }
    }
}

/// A loaded, validated configuration and where each value came from.
pub struct Loaded {
    pub config: Config,
    figment: Figment,
    /// The file that was read, if any.
    pub file: Option<PathBuf>,
}

const DEFAULTS: &str = "default";
const ENVIRONMENT: &str = "environment";
const FLAGS: &str = "command line";

/// One layer of settings given as dotted keys.
struct Layer {
    name: &'static str,
    data: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name)
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Ok(Profile::Default.collect(self.data.clone()))
    }
}

/// Builds a nested dictionary from dotted keys.
fn nest(pairs: &[(String, serde_json::Value)]) -> anyhow::Result<Dict> {
    let mut root = serde_json::Map::new();
    for (key, value) in pairs {
        let mut parts = key.split('.').peekable();
        let mut at = &mut root;
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                at.insert(part.to_string(), value.clone());
            } else {
                at = at
                    .entry(part.to_string())
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                    .ok_or_else(|| anyhow::anyhow!("{key}: a value and a section at once"))?;
            }
        }
    }
    match Value::serialize(serde_json::Value::Object(root))? {
        Value::Dict(_, dict) => Ok(dict),
        _ => Ok(Dict::new()),
    }
}

fn falsey(text: &str) -> bool {
    matches!(
        text.trim().to_ascii_lowercase().as_str(),
        "" | "0" | "false" | "no" | "off" | "n" | "f"
    )
}

/// The value an environment variable gives its setting.
fn env_value(field: &Field, name: &str, text: &str) -> anyhow::Result<serde_json::Value> {
    Ok(match field.kind {
        FieldKind::Text => json!(text),
        FieldKind::List => json!(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        ),
        FieldKind::Flag => json!(!falsey(text)),
        FieldKind::Negated => json!(falsey(text)),
        FieldKind::Number => {
            let t = text.trim();
            if let Ok(n) = t.parse::<i64>() {
                json!(n)
            } else if let Ok(x) = t.parse::<f64>() {
                json!(x)
            } else {
                anyhow::bail!("{name}={text}: `{}` takes a number", field.key)
            }
        }
    })
}

/// Reads, merges and validates the configuration.
pub fn load(sources: Sources) -> anyhow::Result<Loaded> {
    let defaults = match Value::serialize(Config::default())? {
        Value::Dict(_, dict) => dict,
        _ => Dict::new(),
    };
    let mut figment = Figment::from(Layer {
        name: DEFAULTS,
        data: defaults,
    });
    let file = match &sources.file {
        ConfigFile::Path(p) => {
            if !p.is_file() {
                anyhow::bail!("the configuration file {} does not exist", p.display());
            }
            Some(p.clone())
        }
        ConfigFile::Default => Some(PathBuf::from(DEFAULT_FILE)).filter(|p| p.is_file()),
        ConfigFile::None => None,
    };
    if let Some(path) = &file {
        figment = figment.merge(Toml::file_exact(path));
    }
    let mut from_env = Vec::new();
    for field in FIELDS {
        let Some(name) = field.env else { continue };
        if let Some((_, text)) = sources.env.iter().find(|(k, _)| k == name) {
            from_env.push((field.key.to_string(), env_value(field, name, text)?));
        }
    }
    let mut command_line: std::collections::BTreeSet<String> =
        from_env.iter().map(|(k, _)| k.clone()).collect();
    figment = figment.merge(Layer {
        name: ENVIRONMENT,
        data: nest(&from_env)?,
    });
    let flags: Vec<(String, serde_json::Value)> = sources
        .flags
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    command_line.extend(flags.iter().map(|(k, _)| k.clone()));
    figment = figment.merge(Layer {
        name: FLAGS,
        data: nest(&flags)?,
    });
    let mut config: Config = figment.extract().map_err(|e| {
        let shown = e.to_string();
        anyhow::anyhow!("invalid configuration: {shown}")
    })?;
    config.command_line_keys = command_line;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    Ok(Loaded {
        config,
        figment,
        file,
    })
}

/// A value and where it came from, as `config show` prints them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Shown {
    pub value: serde_json::Value,
    /// `default`, the file's path, `AGENTRY_…` or `--…`.
    pub source: String,
}

impl Loaded {
    /// Where the value of `key` came from, named as a user would look for it.
    pub fn source_of(&self, key: &str) -> String {
        let field = Field::find(key);
        match self.figment.find_metadata(key).map(|m| m.name.as_ref()) {
            Some(ENVIRONMENT) => field
                .and_then(|f| f.env)
                .map_or_else(|| "environment".into(), str::to_string),
            Some(FLAGS) => match field.and_then(|f| f.flag) {
                Some(flag) => format!("--{flag}"),
                None if key == "agent_dirs" => "PATH arguments".into(),
                None => "command line".into(),
            },
            Some(DEFAULTS) | None => DEFAULTS.into(),
            Some(_) => self
                .file
                .as_deref()
                .map_or_else(|| "file".into(), |p| p.display().to_string()),
        }
    }

    /// Every setting with its value (secrets redacted) and source, in documentation order,
    /// then the per-agent settings.
    pub fn show(&self) -> BTreeMap<String, Shown> {
        let tree = serde_json::to_value(&self.config).unwrap_or_default();
        let mut out = BTreeMap::new();
        for field in FIELDS {
            let mut value = lookup(&tree, field.key).clone();
            if field.secret {
                value = redact(&value);
            }
            out.insert(
                field.key.to_string(),
                Shown {
                    value,
                    source: self.source_of(field.key),
                },
            );
        }
        let mut agent_keys = Vec::new();
        leaves("agents", &tree["agents"], &mut agent_keys);
        for key in agent_keys {
            let value = lookup(&tree, &key).clone();
            out.insert(
                key.clone(),
                Shown {
                    value,
                    source: self.source_of(&key),
                },
            );
        }
        out
    }

    /// `show` as text: one `key = value  # source` line per setting.
    pub fn show_text(&self) -> String {
        let shown = self.show();
        let order: Vec<&str> = FIELDS
            .iter()
            .map(|f| f.key)
            .chain(
                shown
                    .keys()
                    .map(String::as_str)
                    .filter(|k| k.starts_with("agents.")),
            )
            .collect();
        let mut text = String::new();
        if let Some(file) = &self.file {
            text.push_str(&format!("# configuration file: {}\n", file.display()));
        } else {
            text.push_str("# no configuration file\n");
        }
        for key in order {
            let Some(s) = shown.get(key) else { continue };
            let value = if s.value.is_null() {
                "(unset)".to_string()
            } else {
                s.value.to_string()
            };
            text.push_str(&format!("{key} = {value}  # {}\n", s.source));
        }
        text
    }
}

fn lookup<'a>(tree: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    key.split('.').fold(tree, |at, part| &at[part])
}

fn leaves(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                leaves(&format!("{prefix}.{k}"), v, out);
            }
        }
        serde_json::Value::Null => {}
        _ => out.push(prefix.to_string()),
    }
}

/// A URL with its password hidden, for messages.
pub fn redact_url(url: &str) -> String {
    redact(&json!(url)).as_str().unwrap_or("***").to_string()
}

/// A secret as `config show` prints it: a URL keeps everything but its password (in the
/// user part, and `password`/`sslpassword` in the query); anything else is replaced whole.
fn redact(value: &serde_json::Value) -> serde_json::Value {
    let Some(text) = value.as_str() else {
        return if value.is_null() {
            value.clone()
        } else {
            json!("***")
        };
    };
    let Some((scheme, rest)) = text.split_once("://") else {
        return json!("***");
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    // The user part ends at the last `@` (a password may hold `/` or `@` unescaped).
    let address = match before_query.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            if userinfo.contains(':') {
                format!("{user}:***@{host}")
            } else {
                format!("{user}@{host}")
            }
        }
        None => before_query.to_string(),
    };
    let query = query.map(|q| {
        q.split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _))
                    if k.eq_ignore_ascii_case("password")
                        || k.eq_ignore_ascii_case("sslpassword") =>
                {
                    format!("{k}=***")
                }
                _ => pair.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&")
    });
    match query {
        Some(q) => json!(format!("{scheme}://{address}?{q}")),
        None => json!(format!("{scheme}://{address}")),
    }
}

/// The markdown table of every setting, generated from `FIELDS` and the defaults; the
/// "Server settings" section of `docs/configuration.md` is this text (a test checks it).
pub fn settings_table() -> String {
    let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
    let mut out = String::from(
        "| key in `agentry.toml` | flag | environment | default | meaning |\n|---|---|---|---|---|\n",
    );
    for f in FIELDS {
        let default = match f.default_doc {
            Some(d) => d.to_string(),
            None => match lookup(&defaults, f.key) {
                serde_json::Value::String(s) => format!("`{s}`"),
                serde_json::Value::Array(a) if a.is_empty() => "none".to_string(),
                v => format!("`{v}`"),
            },
        };
        let flag = match (f.flag, f.kind, f.key) {
            (None, _, "agent_dirs") => "`PATH...`".to_string(),
            (None, _, _) => String::new(),
            (Some(flag), FieldKind::Flag | FieldKind::Negated, _) => format!("`--{flag}`"),
            (Some(flag), FieldKind::List, _) => format!("`--{flag}` (repeatable)"),
            (Some(flag), _, _) => format!("`--{flag}`"),
        };
        let env = f.env.map(|e| format!("`{e}`")).unwrap_or_default();
        out.push_str(&format!(
            "| `{}` | {flag} | {env} | {default} | {} |\n",
            f.key, f.doc
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_all_but_the_password() {
        assert_eq!(
            redact(&json!(
                "postgres://app:s3cret@db.local:5432/x?sslmode=require"
            )),
            json!("postgres://app:***@db.local:5432/x?sslmode=require")
        );
        assert_eq!(redact(&json!("plain")), json!("***"));
        // A password with `/` or `@` in it, and one in the query, are hidden too.
        assert_eq!(
            redact(&json!("postgres://u:p/w@rd@h/db")),
            json!("postgres://u:***@h/db")
        );
        assert_eq!(
            redact(&json!(
                "postgres://db/x?user=app&password=s3cret&sslmode=require"
            )),
            json!("postgres://db/x?user=app&password=***&sslmode=require")
        );
        assert_eq!(redact(&serde_json::Value::Null), serde_json::Value::Null);
    }

    #[test]
    fn env_values_follow_their_kind() {
        let f = Field::find("store.runagent_db").unwrap();
        assert_eq!(env_value(f, "X", "1").unwrap(), json!(false));
        let f = Field::find("gateway.rate_limits").unwrap();
        assert_eq!(
            env_value(f, "X", "invoke=5, runs=2").unwrap(),
            json!(["invoke=5", "runs=2"])
        );
        let f = Field::find("runs.lease_ttl_s").unwrap();
        assert_eq!(env_value(f, "X", "2.5").unwrap(), json!(2.5));
        assert!(env_value(f, "X", "soon").is_err());
    }
}

#[cfg(test)]
mod docs {
    /// `docs/configuration.md` shows exactly the generated settings table.
    #[test]
    fn the_settings_table_in_the_docs_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
        let text = std::fs::read_to_string(path).expect("docs/configuration.md");
        let begin = "<!-- settings:begin -->\n";
        let end = "<!-- settings:end -->";
        let (Some(b), Some(e)) = (text.find(begin), text.find(end)) else {
            panic!("docs/configuration.md lacks the settings markers");
        };
        let table = super::settings_table();
        assert!(
            text[b + begin.len()..e] == table,
            "docs/configuration.md is out of date: replace what is between the settings markers with the output of `agentry config docs`"
        );
    }
}
