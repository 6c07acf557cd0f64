//! Which Python runs an agent, resolved once at start-up to the real interpreter.
//!
//! Order: an explicit interpreter (`--python`, else the agent's `agentry.python`), else the agent
//! folder's `.venv`, else the active virtualenv (`VIRTUAL_ENV`), else `python3` on `PATH`. The
//! candidate is asked for `sys.executable` once, so a pyenv shim (which costs ~50 ms per start)
//! is paid once, not per worker.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use parking_lot::Mutex;

/// The interpreter chosen for an agent, and why.
pub type ResolvedPython = agentry_core::executor::Runtime;

/// Why no interpreter could be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot use Python `{candidate}` ({reason}): {message}")]
pub struct PythonError {
    pub candidate: String,
    pub reason: String,
    pub message: String,
}

/// Resolves interpreters, asking each distinct candidate only once per process, and (with a
/// cache file) once per change of anything that could change the answer.
#[derive(Default)]
pub struct PythonResolver {
    cache: Mutex<HashMap<PathBuf, Result<(PathBuf, String), String>>>,
    cache_file: Option<PathBuf>,
}

/// A probe result remembered across runs, valid while its fingerprint still matches.
#[derive(serde::Serialize, serde::Deserialize)]
struct Remembered {
    fingerprint: String,
    executable: PathBuf,
    version: String,
}

impl PythonResolver {
    /// A resolver that remembers probe results in `file` (in the state directory).
    pub fn with_cache_file(file: PathBuf) -> Self {
        Self {
            cache: Mutex::default(),
            cache_file: Some(file),
        }
    }

    /// Picks and resolves the interpreter for the agent in `agent_dir`.
    pub fn resolve(
        &self,
        explicit: Option<(&Path, &str)>,
        agent_dir: &Path,
    ) -> Result<ResolvedPython, PythonError> {
        let (candidate, reason) = if let Some((path, why)) = explicit {
            (path.to_path_buf(), why.to_string())
        } else if let Some(venv) = venv_python(&agent_dir.join(".venv")) {
            (
                venv,
                format!(
                    "the agent folder's virtualenv {}",
                    agent_dir.join(".venv").display()
                ),
            )
        } else if let Some(venv) = std::env::var_os("VIRTUAL_ENV")
            .map(PathBuf::from)
            .and_then(|v| venv_python(&v).map(|p| (p, v)))
        {
            (
                venv.0,
                format!("the active virtualenv (VIRTUAL_ENV={})", venv.1.display()),
            )
        } else {
            (PathBuf::from("python3"), "`python3` on PATH".to_string())
        };
        let probed = {
            let mut cache = self.cache.lock();
            cache
                .entry(candidate.clone())
                .or_insert_with(|| self.probe_remembered(&candidate))
                .clone()
        };
        match probed {
            Ok((executable, version)) => Ok(ResolvedPython {
                executable,
                version,
                reason,
            }),
            Err(message) => Err(PythonError {
                candidate: candidate.display().to_string(),
                reason,
                message,
            }),
        }
    }
}

impl PythonResolver {
    /// Probes `candidate`, unless the cache file holds an answer whose fingerprint still matches.
    fn probe_remembered(&self, candidate: &Path) -> Result<(PathBuf, String), String> {
        let Some(file) = &self.cache_file else {
            return probe(candidate);
        };
        let key = candidate.display().to_string();
        let mut remembered: HashMap<String, Remembered> = std::fs::read(file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if let Some(r) = remembered.get(&key)
            && std::fs::metadata(&r.executable).is_ok()
            && fingerprint(candidate, Some(&r.executable)) == r.fingerprint
        {
            return Ok((r.executable.clone(), r.version.clone()));
        }
        let answer = probe(candidate)?;
        remembered.insert(
            key,
            Remembered {
                fingerprint: fingerprint(candidate, Some(&answer.0)),
                executable: answer.0.clone(),
                version: answer.1.clone(),
            },
        );
        if let Ok(text) = serde_json::to_vec_pretty(&remembered) {
            let tmp = file.with_extension(format!("tmp.{}", std::process::id()));
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, file);
            }
        }
        Ok(answer)
    }
}

/// Everything that can change what `candidate` runs: where it is found on PATH and the files'
/// modification times, the virtualenv, and pyenv's version selectors (its shims pick the
/// interpreter from PYENV_VERSION, `.python-version` files and `$PYENV_ROOT/version`).
/// `resolved` is included when known, so a replaced interpreter is noticed too.
fn fingerprint(candidate: &Path, resolved: Option<&Path>) -> String {
    fn stamp(p: &Path) -> String {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| format!("{}:{}", p.display(), d.as_nanos()))
            .unwrap_or_else(|| format!("{}:-", p.display()))
    }
    let mut parts = Vec::new();
    let found = if candidate.components().count() == 1 {
        parts.push(std::env::var("PATH").unwrap_or_default());
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(candidate))
                .find(|p| p.is_file())
        })
    } else {
        Some(candidate.to_path_buf())
    };
    if let Some(found) = &found {
        parts.push(stamp(found));
    }
    for var in ["VIRTUAL_ENV", "PYENV_VERSION", "PYENV_ROOT"] {
        parts.push(std::env::var(var).unwrap_or_default());
    }
    let pyenv_root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")));
    if let Some(root) = pyenv_root {
        parts.push(stamp(&root.join("version")));
    }
    if let Ok(mut dir) = std::env::current_dir() {
        loop {
            let marker = dir.join(".python-version");
            if marker.exists() {
                parts.push(stamp(&marker));
            }
            if !dir.pop() {
                break;
            }
        }
    }
    if let Some(r) = resolved {
        parts.push(stamp(r));
    }
    parts.join("|")
}

fn venv_python(venv: &Path) -> Option<PathBuf> {
    ["bin/python3", "bin/python"]
        .iter()
        .map(|p| venv.join(p))
        .find(|p| p.is_file())
}

const PROBE: &str = "import sys; print(sys.executable); print(sys.version.split()[0]); print(sys.version_info >= (3, 8))";

fn probe(candidate: &Path) -> Result<(PathBuf, String), String> {
    let out = Command::new(candidate)
        .args(["-I", "-c", PROBE])
        .output()
        .map_err(|e| format!("cannot run it: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "it exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let (Some(exe), Some(version), Some(ok)) = (lines.next(), lines.next(), lines.next()) else {
        return Err(format!("unexpected answer: {text:?}"));
    };
    if ok.trim() != "True" {
        return Err(format!(
            "Python {version} is too old; Agentry needs 3.8 or newer"
        ));
    }
    // A venv's sys.executable is its own bin/python (what we want: it finds the venv's
    // site-packages); `-I` keeps PYTHONPATH and user site out of the probe only.
    let exe = if exe.is_empty() {
        candidate.to_path_buf()
    } else {
        PathBuf::from(exe)
    };
    Ok((exe, version.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_changes_when_the_interpreter_changes() {
        let dir = std::env::temp_dir().join(format!("agentry-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let candidate = dir.join("python3");
        let resolved = dir.join("python3.11");
        std::fs::write(&candidate, "#!/bin/sh\n").unwrap();
        std::fs::write(&resolved, "binary").unwrap();
        let before = fingerprint(&candidate, Some(&resolved));
        assert_eq!(
            before,
            fingerprint(&candidate, Some(&resolved)),
            "stable while nothing changes"
        );
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&resolved)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_ne!(
            before,
            fingerprint(&candidate, Some(&resolved)),
            "a replaced interpreter is noticed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_remembered_answer_is_reused_and_a_stale_one_is_not() {
        let dir = std::env::temp_dir().join(format!("agentry-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cache = dir.join("interpreters.json");
        let first = PythonResolver::with_cache_file(cache.clone())
            .resolve(Some((Path::new("python3"), "test")), &dir)
            .expect("python3 on PATH");
        let text = std::fs::read_to_string(&cache).expect("cache written");
        assert!(text.contains(&first.version));
        // Poison the remembered version: a fresh resolver trusts the cache while the fingerprint
        // matches, which proves no probe ran.
        let field = format!("\"version\": \"{}\"", first.version);
        std::fs::write(&cache, text.replace(&field, "\"version\": \"9.9.9\"")).unwrap();
        let cached = PythonResolver::with_cache_file(cache.clone())
            .resolve(Some((Path::new("python3"), "test")), &dir)
            .unwrap();
        assert_eq!(cached.version, "9.9.9");
        // A fingerprint that no longer matches forces a real probe.
        let stale = std::fs::read_to_string(&cache)
            .unwrap()
            .replace("\"fingerprint\": \"", "\"fingerprint\": \"stale");
        std::fs::write(&cache, stale).unwrap();
        let probed = PythonResolver::with_cache_file(cache)
            .resolve(Some((Path::new("python3"), "test")), &dir)
            .unwrap();
        assert_eq!(probed.version, first.version);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
