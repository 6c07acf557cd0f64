//! Secrets the configuration names by where they live, never by value (a committed
//! `agentry.toml` must not hold one): an environment variable, or a file whose trailing
//! whitespace is ignored. Webhook secrets and remote servers' API keys are read this way.

use std::path::Path;

/// The secret in `env` (which wins) or in `file`; `None` if neither is given. An empty
/// secret is refused. The error names the variable or file, never the value.
pub fn read(env: Option<&str>, file: Option<&Path>) -> Result<Option<String>, String> {
    let secret = match (env, file) {
        (Some(var), _) => match std::env::var(var) {
            Ok(value) => value,
            Err(std::env::VarError::NotPresent) => {
                return Err(format!(
                    "the variable `{var}` that holds its secret is not set"
                ));
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!(
                    "the variable `{var}` that holds its secret is not UTF-8"
                ));
            }
        },
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|text| text.trim_end().to_string())
            .map_err(|e| format!("its secret file {} cannot be read: {e}", path.display()))?,
        (None, None) => return Ok(None),
    };
    if secret.trim().is_empty() {
        return Err(match (env, file) {
            (Some(var), _) => format!("the variable `{var}` that holds its secret is empty"),
            (None, Some(path)) => format!("its secret file {} is empty", path.display()),
            (None, None) => "its secret is empty".into(),
        });
    }
    Ok(Some(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_or_missing_secret_is_refused_by_its_source() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("secret");
        std::fs::write(&file, "s3cret\n").expect("write");
        assert_eq!(read(None, Some(&file)), Ok(Some("s3cret".into())));
        std::fs::write(&file, " \n").expect("write");
        let err = read(None, Some(&file)).expect_err("empty");
        assert!(err.contains("is empty") && !err.contains("s3cret"), "{err}");
        let missing = dir.path().join("missing");
        assert!(read(None, Some(&missing)).is_err());
        let err = read(Some("AGENTRY_TEST_SURELY_UNSET_VARIABLE"), None).expect_err("unset");
        assert!(err.contains("not set"), "{err}");
        assert_eq!(read(None, None), Ok(None));
    }
}
