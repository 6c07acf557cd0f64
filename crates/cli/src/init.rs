//! `agentry init PATH`: a working agent with a sync and a streaming entrypoint, made offline.

use std::path::Path;

use anyhow::{Context, bail};

const AGENT_PY: &str = r#""""A starter agent: replace the bodies with your own logic (LangGraph, CrewAI, plain Python...)."""
import time


def respond(message: str, shout: bool = False) -> dict:
    """Answer a message once."""
    reply = message.upper() if shout else message
    return {"reply": f"You said: {reply}"}


def respond_stream(message: str, delay_s: float = 0.05):
    """Stream the answer word by word, as an LLM streams tokens."""
    for word in f"You said: {message}".split():
        time.sleep(delay_s)
        yield {"token": word}
"#;

pub fn init(path: &Path) -> anyhow::Result<()> {
    if path.join("runagent.config.json").exists() {
        bail!("{} already has a runagent.config.json", path.display());
    }
    std::fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "my_agent".into());
    let config = serde_json::json!({
        "agent_name": name,
        "description": "A starter agent made by agentry init",
        "framework": "default",
        "template": "",
        "version": "0.1.0",
        "created_at": chrono_like_now(),
        "template_source": {"repo_url": "", "author": "", "path": ""},
        "agent_architecture": {"entrypoints": [
            {"file": "agent.py", "module": "respond", "tag": "respond"},
            {"file": "agent.py", "module": "respond_stream", "tag": "respond_stream"}
        ]},
        "env_vars": {},
        "agent_id": uuid::Uuid::new_v4().to_string(),
        "auth_settings": {"type": "none"}
    });
    std::fs::write(
        path.join("runagent.config.json"),
        serde_json::to_string_pretty(&config)? + "\n",
    )?;
    let agent_py = path.join("agent.py");
    if !agent_py.exists() {
        std::fs::write(&agent_py, AGENT_PY)?;
    }
    println!("created agent {name} in {}", path.display());
    println!("serve it:  agentry serve {}", path.display());
    println!(
        "call it:   agentry run --agent {name} --tag respond --input '{{\"message\": \"hi\"}}'"
    );
    Ok(())
}

fn chrono_like_now() -> String {
    chrono::Local::now().format("%Y-%m-%d %H:%M:%S").to_string()
}
