//! Secrets the configuration names by where they live, never by value (a committed
//! `agentry.toml` must not hold one): an environment variable, or a file whose trailing
//! whitespace is ignored. Webhook secrets and remote servers' API keys are read this way.

use std::path::Path;

/// The secret in `env` (which wins) or in `file`; `None` if neither is given. The error names
/// the variable or file, never the value.
pub fn read(env: Option<&str>, file: Option<&Path>) -> Result<Option<String>, String> {
    match (env, file) {
        (Some(var), _) => std::env::var(var)
            .map(Some)
            .map_err(|_| format!("the variable `{var}` that holds its secret is not set")),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|text| Some(text.trim_end().to_string()))
            .map_err(|e| format!("its secret file {} cannot be read: {e}", path.display())),
        (None, None) => Ok(None),
    }
}
