//! The Agentry application: the one place where the parts are wired together.
//!
//! * `config`: the layered configuration (defaults, `agentry.toml`, `AGENTRY_*` variables,
//!   flags), with the source of every value.
//! * `agents`: reading agent folders and starting their warm workers.
//! * `callbacks`: the signing secret of callbacks, and the HTTP client that sends them only
//!   where it may.
//! * `hooks`: the configured webhooks, their secrets read and their mappings checked.
//! * `lock`: one owner per state directory and run database.
//! * `startup`: [`Application`], which opens the stores, starts the agents and the run engine,
//!   binds, serves, and shuts everything down in order.
//!
//! The `agentry` binary parses flags into a [`Config`], calls this crate, and prints.

pub mod agents;
mod callbacks;
pub mod config;
mod hooks;
mod lock;
mod secrets;
mod startup;

pub use agentry_core::Config;
pub use startup::{Application, Stores, open_store, pg_options, state_dir};
