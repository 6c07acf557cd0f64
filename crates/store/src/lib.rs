//! Storage. For now: RunAgent's local database, which Agentry keeps up to date so that
//! RunAgent's SDKs discover our servers by `agent_id` and its invocation-history endpoints work.
//! The durable-run store (one `Store` trait, SQLite and PostgreSQL) will live beside it.

pub mod runagent;

pub use runagent::{Invocation, InvocationLog, RunAgentDb, StoreError};
