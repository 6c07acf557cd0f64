//! Storage: the durable run store (the `RunStore` trait of `agentry-core`) on SQLite for one
//! node and on PostgreSQL for several, the rate-limit buckets nodes share (`SharedBuckets`, in
//! PostgreSQL), and RunAgent's local database, which Agentry keeps up to date so that
//! RunAgent's SDKs discover our servers by `agent_id`; its invocation history is kept there, or
//! in the shared PostgreSQL database when nodes share one.

pub mod postgres;
pub mod runagent;
pub mod sqlite;
mod transitions;

pub use postgres::{
    MIGRATIONS as PG_MIGRATIONS, MigrationState, PgBuckets, PgHistory, PgOptions, PgStore,
};
pub use runagent::{History, HistoryBounds, InvocationLog, RunAgentDb};
pub use sqlite::{Durability, SqliteOptions, SqliteStore};
