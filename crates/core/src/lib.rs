//! Agentry's domain: what an agent is (its RunAgent configuration and entrypoints), the error
//! taxonomy every layer maps into, and the small value types shared by the runner, the API and
//! the CLI. This crate does no networking and spawns nothing; it only reads configuration files.

pub mod agent;
pub mod callbacks;
pub mod config;
pub mod error;
pub mod events;
pub mod executor;
pub mod settings;
pub mod time;

pub use config::{AgentConfig, ConfigError, Entrypoint, EntrypointKind};
pub use error::ErrorCode;
pub use settings::Config;
pub mod keys;
pub mod nodes;
pub mod runs;
pub mod schedules;
pub mod schema;
pub mod store;
pub mod triggers;
pub mod webhooks;

pub use store::{
    FireBatch, Fired, InUse, Invocation, InvocationHistory, KeyStore, RunStore, SchedulePlanner,
    ScheduleStore, ScheduleWrite, SharedBuckets, SharedTats, StoreChange, StoreChanges, StoreError,
};
