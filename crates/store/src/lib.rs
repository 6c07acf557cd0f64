//! Storage: the durable run store (the `RunStore` trait of `agentry-core`, implemented here for
//! SQLite), the rate-limit buckets nodes share (`SharedBuckets`, in PostgreSQL; the run store
//! will follow it there), and RunAgent's local database, which Agentry keeps up
//! to date so that RunAgent's SDKs discover our servers by `agent_id` and its invocation-history
//! endpoints work.

pub mod postgres;
pub mod runagent;
pub mod sqlite;
mod transitions;

pub use postgres::{MIGRATIONS as PG_MIGRATIONS, MigrationState, PgBuckets, PgOptions, PgStore};
pub use runagent::{History, HistoryBounds, InvocationLog, RunAgentDb};
pub use sqlite::{Durability, SqliteOptions, SqliteStore};
