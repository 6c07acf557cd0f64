//! The webhooks declared in the configuration, made ready at start-up: each secret read from
//! its variable or file (never from the configuration itself), each target entrypoint found,
//! and each input mapping checked against the parameters its worker reported, so that a hook
//! which could never start a run stops the start instead of answering 422 to every delivery.
//! The event triggers too (`event_triggers`), checked the same way.

use std::collections::HashMap;
use std::sync::Arc;

use agentry_core::Config;
use agentry_core::webhooks::{Hook, WebhookSettings};
use agentry_engine::Agents;
use anyhow::bail;
use serde_json::Value;

/// The hooks by name.
pub fn resolve(config: &Config, agents: &Agents) -> anyhow::Result<HashMap<String, Arc<Hook>>> {
    let mut hooks = HashMap::new();
    let mut problems = Vec::new();
    for (agent_key, tag, settings) in config.webhooks() {
        let at = format!("agents.{agent_key}.entrypoints.{tag}.webhook");
        match resolve_one(config, agents, agent_key, tag, settings) {
            Ok(hook) => {
                hooks.insert(hook.name.clone(), Arc::new(hook));
            }
            Err(why) => problems.push(format!("configuration error: {at}: {why}")),
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(hooks)
}

fn resolve_one(
    config: &Config,
    agents: &Agents,
    agent_key: &str,
    tag: &str,
    settings: &WebhookSettings,
) -> Result<Hook, String> {
    let agent = agents
        .get(agent_key)
        .ok_or_else(|| format!("no agent served here has the name or id `{agent_key}`"))?;
    let secret = crate::secrets::read(
        settings.secret_env.as_deref(),
        settings.secret_file.as_deref(),
    )?
    .ok_or("it has no secret")?;
    let hook = Hook::new(
        settings,
        &agent.config.agent_id,
        tag,
        &secret,
        config.http.max_body_bytes,
    )?;
    if let Some(report) = agent.executor.entrypoint(tag) {
        check_mapping(&hook, &report.schema)?;
    }
    Ok(hook)
}

/// Every mapped parameter exists, and every required one is mapped.
fn check_mapping(hook: &Hook, schema: &Value) -> Result<(), String> {
    let mapped: Vec<&str> = hook.mapped_parameters().collect();
    if mapped.is_empty() {
        return Ok(());
    }
    let props = schema.get("properties").and_then(Value::as_object);
    let open = !matches!(schema.get("additionalProperties"), Some(Value::Bool(false)));
    if let Some(unknown) = mapped
        .iter()
        .find(|p| !open && !props.is_some_and(|props| props.contains_key(**p)))
    {
        return Err(format!(
            "`input.{unknown}`: entrypoint `{}` has no such parameter",
            hook.entrypoint
        ));
    }
    let required = schema.get("required").and_then(Value::as_array);
    if let Some(missing) = required
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find(|r| !mapped.contains(r))
    {
        return Err(format!(
            "`input` maps nothing to `{missing}`, a required parameter of entrypoint `{}`",
            hook.entrypoint
        ));
    }
    Ok(())
}

/// The event triggers declared in the configuration, for the agents served here: each target
/// entrypoint found, each filter checked (`docs/triggers.md`).
pub fn event_triggers(
    config: &Config,
    agents: &Agents,
) -> anyhow::Result<Vec<agentry_core::triggers::EventTrigger>> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (agent_key, tag, settings) in config.event_triggers() {
        let at = settings.setting_path(agent_key, tag);
        let Some(agent) = agents.get(agent_key) else {
            problems.push(format!(
                "configuration error: {at}: no agent served here has the name or id `{agent_key}`"
            ));
            continue;
        };
        if agent.config.entrypoint(tag).is_none() {
            problems.push(format!(
                "configuration error: {at}: agent `{agent_key}` has no entrypoint `{tag}`"
            ));
            continue;
        }
        let resolve = |a: &str| agents.get(a).map(|s| s.config.agent_id.clone());
        match agentry_core::triggers::EventTrigger::new(
            &agent.config.agent_name,
            &agent.config.agent_id,
            tag,
            settings,
            resolve,
        ) {
            // One agent configured under both its name and its id could declare one trigger
            // twice: their runs would share idempotency keys.
            Ok(t)
                if out
                    .iter()
                    .any(|o: &agentry_core::triggers::EventTrigger| o.name == t.name) =>
            {
                problems.push(format!(
                    "configuration error: {at}: another trigger of this entrypoint has the same name (is the agent configured under both its name and its id?)"
                ));
            }
            Ok(t) => out.push(t),
            Err(e) => problems.push(format!("configuration error: {e}")),
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(out)
}
