//! The nodes of a cluster, as they report themselves to the shared store: which agents each
//! executes, how many runs it may hold and holds, and when it was last heard of. A node that
//! stops reporting for a lease TTL is gone: its runs are the reapers' by then.

use serde::Serialize;

/// What a node does: `serve` (HTTP API and execution) or `worker` (execution only, with an
/// admin port for probes and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    #[default]
    Serve,
    Worker,
}

impl NodeRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Serve => "serve",
            Self::Worker => "worker",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "serve" => Some(Self::Serve),
            "worker" => Some(Self::Worker),
            _ => None,
        }
    }
}

/// One node's report of itself, sent at start and every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    /// The node's stable name (`node_name`).
    pub name: String,
    /// This process's lease owner (`name/incarnation`): a restarted node is a new owner.
    pub owner: String,
    /// The id of the node's state directory (`<state_dir>/state-id`): a process holding that
    /// directory's lock knows any earlier holder is dead, so it may take the name over at once.
    /// Empty when unknown. Not shown by the API.
    pub home: String,
    pub role: NodeRole,
    pub version: String,
    /// The agent ids whose runs this node claims.
    pub agents: Vec<String>,
    /// Runs this node may hold at once (`runs.max_running`).
    pub capacity: usize,
    /// Runs it holds now.
    pub running: usize,
}

/// How a node is, as the store last heard of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Reporting.
    Up,
    /// Shut down gracefully (its runs were handed back).
    Stopped,
    /// Silent for longer than a lease TTL (killed, stalled or cut off).
    Gone,
}

/// A node as listed by `GET /v1/nodes`. Times are Unix milliseconds, in the store's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub report: NodeReport,
    pub started_at: i64,
    pub last_seen_at: i64,
    pub status: NodeStatus,
}

/// Why a node may not start under its name.
pub fn name_in_use(name: &str) -> String {
    format!(
        "the node name `{name}` is in use by another live node (it reported within the lease TTL); give each node its own --node-name, or wait for the other to stop"
    )
}
