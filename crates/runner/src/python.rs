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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPython {
    /// What the workers execute.
    pub executable: PathBuf,
    /// `3.11.7`.
    pub version: String,
    /// A sentence saying why this one was chosen.
    pub reason: String,
}

/// Why no interpreter could be used.
#[derive(Debug, thiserror::Error)]
#[error("cannot use Python `{candidate}` ({reason}): {message}")]
pub struct PythonError {
    pub candidate: String,
    pub reason: String,
    pub message: String,
}

/// Resolves interpreters, asking each distinct candidate only once.
#[derive(Default)]
pub struct PythonResolver {
    cache: Mutex<HashMap<PathBuf, Result<(PathBuf, String), String>>>,
}

impl PythonResolver {
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
                .or_insert_with(|| probe(&candidate))
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
