//! A served agent: its folder's configuration and the executor that runs its code, and the
//! set of agents a node serves, found by id or name.

use std::sync::Arc;
use std::time::Duration;

use crate::AgentConfig;
use crate::executor::{AgentExecutor, Runtime};

/// One served agent: its configuration, the executor that runs its code, and how many of its
/// runs this node leases at once. The API and the engine share it.
///
/// `max_running_runs` is the configured cap (`runs.max_running_per_agent`); without one, the
/// executor says what it can start soon (`run_capacity`).
pub struct ServedAgent {
    pub config: AgentConfig,
    /// Where its code runs.
    pub executor: Arc<dyn AgentExecutor>,
    /// What runs it (the Python interpreter), and why that one.
    pub runtime: Runtime,
    /// The configured cap on runs of this agent leased at once on this node, if any.
    pub max_running_runs: Option<usize>,
    /// Executors a run may name instead of the default (`[agents.<name>.executors.<x>]`).
    pub named_executors: std::collections::BTreeMap<String, Arc<dyn AgentExecutor>>,
}

impl ServedAgent {
    /// Whether a run may name `name` as its executor.
    pub fn has_executor(&self, name: &str) -> bool {
        self.named_executors.contains_key(name)
    }

    /// The executor of a run that named `name` (`None`: the default); `None` when this node
    /// has no executor of that name (its configuration differs from the node that took the run).
    pub fn executor_for(&self, name: Option<&str>) -> Option<&Arc<dyn AgentExecutor>> {
        match name {
            None => Some(&self.executor),
            Some(n) => self.named_executors.get(n),
        }
    }

    /// Runs of this agent this node may lease at once now (0 while its executor can start
    /// none, such as a pool with no live worker).
    pub fn run_capacity(&self) -> usize {
        self.max_running_runs
            .unwrap_or_else(|| self.executor.run_capacity())
    }
}

/// The agents a node serves, found by id or name.
#[derive(Default)]
pub struct Agents {
    list: Vec<Arc<ServedAgent>>,
}

impl Agents {
    pub fn new(list: Vec<Arc<ServedAgent>>) -> Self {
        Self { list }
    }

    /// The agent with this id, else the one with this name.
    pub fn get(&self, key: &str) -> Option<&Arc<ServedAgent>> {
        self.by_id(key)
            .or_else(|| self.list.iter().find(|a| a.config.agent_name == key))
    }

    /// The agent with this id (runs are stored by id).
    pub fn by_id(&self, id: &str) -> Option<&Arc<ServedAgent>> {
        self.list.iter().find(|a| a.config.agent_id == id)
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Arc<ServedAgent>> {
        self.list.iter()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The first agent: RunAgent's server serves one agent, and its agent-less routes
    /// describe that one. `None` only for a node that serves no agent.
    pub fn primary(&self) -> Option<&Arc<ServedAgent>> {
        self.list.first()
    }

    /// Drains every agent's executor at once: calls in flight get `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        futures_util::future::join_all(self.list.iter().map(|a| a.executor.drain(grace))).await;
    }
}

/// A call's arguments as JSON text, ready for the executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arguments {
    pub args: String,
    pub kwargs: String,
}

/// Why a call's arguments were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgumentsError {
    /// `input` is not an object of keyword arguments.
    NotAnObject,
    /// `args` is not a list of positional arguments.
    NotAList,
    /// They do not match the entrypoint's parameters.
    Schema(Vec<crate::schema::SchemaViolation>),
}

impl ServedAgent {
    /// Checks a call's arguments (JSON texts of a list and an object) against the
    /// entrypoint's parameters, and applies the safe coercions of `crate::schema`. The text
    /// goes to the executor as it came unless something was coerced. An entrypoint its
    /// executor never reported (its import failed) is left to fail where it runs.
    pub fn conform(
        &self,
        tag: &str,
        args: &str,
        kwargs: &str,
    ) -> Result<Arguments, ArgumentsError> {
        use serde_json::{Map, Value};
        let mut kwargs_map: Map<String, Value> =
            serde_json::from_str(kwargs).map_err(|_| ArgumentsError::NotAnObject)?;
        let mut args_list: Vec<Value> =
            serde_json::from_str(args).map_err(|_| ArgumentsError::NotAList)?;
        let coerced = match self.executor.entrypoint(tag) {
            None => false,
            Some(report) => {
                let params = crate::schema::Parameters {
                    schema: &report.schema,
                    order: &report.positional_only,
                    var_args: report.var_args,
                };
                crate::schema::conform_call(&mut args_list, &mut kwargs_map, params)
                    .map_err(ArgumentsError::Schema)?
            }
        };
        if !coerced {
            return Ok(Arguments {
                args: args.to_string(),
                kwargs: kwargs.to_string(),
            });
        }
        Ok(Arguments {
            args: Value::Array(args_list).to_string(),
            kwargs: Value::Object(kwargs_map).to_string(),
        })
    }
}
