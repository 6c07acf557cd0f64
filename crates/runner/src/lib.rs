//! Python worker processes: the protocol, the shim, one worker, and the warm pool per agent.
//!
//! Agent code never runs inside the server. Each agent gets warm Python processes started from
//! the stdlib-only shim in `python/agentry_worker.py` (shipped inside the binary and written out
//! at start-up), which talk to the server over length-prefixed frames on file descriptor 3.

pub mod error;
pub mod pool;
pub mod protocol;
pub mod python;
mod sys;
pub mod worker;

use std::path::{Path, PathBuf};

pub use agentry_core::executor::{CallError, EntrypointReport, Payload, RunItem, ValueType};
pub use pool::{AgentPool, CallStream, PoolConfig, RunCall, StartError};
pub use protocol::ImportFailure;
pub use python::{PythonResolver, ResolvedPython};
pub use worker::{SpawnError, WorkerSpec};

/// The worker shim's source, embedded at build time.
pub const SHIM_SOURCE: &str = include_str!("../python/agentry_worker.py");

/// Writes the shim into `dir` (unless an identical copy is there) and returns its path.
pub fn install_shim(dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("agentry_worker.py");
    if std::fs::read_to_string(&path).ok().as_deref() != Some(SHIM_SOURCE) {
        // Write then rename, so a concurrently starting server never reads half a file.
        let tmp = dir.join(format!("agentry_worker.py.{}.tmp", std::process::id()));
        std::fs::write(&tmp, SHIM_SOURCE)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

/// The JSON the shim reads from `AGENTRY_SPEC`: where the agent is and what to import.
pub fn shim_spec(config: &agentry_core::AgentConfig) -> String {
    let entrypoints: Vec<serde_json::Value> = config
        .entrypoints
        .iter()
        .filter_map(|e| match &e.kind {
            agentry_core::EntrypointKind::Python { file, module } => Some(serde_json::json!({
                "tag": e.tag, "file": file, "module": module, "extractor": e.extractor,
            })),
            agentry_core::EntrypointKind::Webhook { .. } => None,
        })
        .collect();
    serde_json::json!({"agent_dir": config.dir, "entrypoints": entrypoints}).to_string()
}
