//! `agentry serve`, `agentry worker` and `agentry validate`: the configuration is loaded in `main`; the
//! application (`agentry_server`) does the rest. This file prints.

use std::time::Duration;

use agentry_server::config::Loaded;
use agentry_server::{Application, state_dir};
use anyhow::Context;

pub async fn serve(loaded: Option<Loaded>) -> anyhow::Result<()> {
    let config = loaded.context("no configuration")?.config;
    Application::build(config)
        .await?
        .run_until_stopped(shutdown_signal())
        .await
}

pub async fn worker(loaded: Option<Loaded>) -> anyhow::Result<()> {
    let config = loaded.context("no configuration")?.config;
    Application::build_worker(config)
        .await?
        .run_until_stopped(shutdown_signal())
        .await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

pub async fn validate(loaded: Option<Loaded>, json: bool) -> anyhow::Result<()> {
    let config = loaded.context("no configuration")?.config;
    let tls = agentry_server::agents::outbound_tls(&config)?;
    let started =
        agentry_server::agents::start(&config, &state_dir(&config)?, Some(1), &tls).await?;
    let mut report = Vec::new();
    for a in &started.agents {
        let c = &a.config;
        let entrypoints: Vec<serde_json::Value> = c
            .entrypoints
            .iter()
            .map(|e| {
                let r = a.executor.entrypoint(&e.tag);
                serde_json::json!({
                    "tag": e.tag, "streaming": e.is_streaming(), "kind": r.map(|r| r.kind.clone()),
                    "input_schema": r.map(|r| r.schema.clone()), "doc": r.and_then(|r| r.doc.clone()),
                })
            })
            .collect();
        report.push(serde_json::json!({
            "agent_id": c.agent_id, "agent_name": c.agent_name, "dir": c.dir, "config_file": c.file,
            "python": {"executable": a.runtime.executable, "version": a.runtime.version, "chosen_because": a.runtime.reason},
            "entrypoints": entrypoints,
        }));
        a.executor.drain(Duration::ZERO).await;
    }
    if json {
        let all = serde_json::json!({"agents": report, "warnings": started.warnings});
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    for (a, r) in started.agents.iter().zip(&report) {
        println!(
            "agent {} ({}) — {}",
            a.config.agent_name,
            a.config.agent_id,
            a.config.file.display()
        );
        println!(
            "  python {} at {} ({})",
            a.runtime.version,
            a.runtime.executable.display(),
            a.runtime.reason
        );
        for e in r["entrypoints"].as_array().into_iter().flatten() {
            let params = e["input_schema"]["properties"]
                .as_object()
                .map(|p| p.keys().cloned().collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            let stream = if e["streaming"].as_bool() == Some(true) {
                "stream "
            } else {
                ""
            };
            println!(
                "  ok  {:<24} {:<10} {stream}({params})",
                e["tag"].as_str().unwrap_or_default(),
                e["kind"].as_str().unwrap_or_default(),
            );
        }
    }
    for w in &started.warnings {
        println!("warning: {w}");
    }
    println!("{} agent(s) valid", started.agents.len());
    Ok(())
}
