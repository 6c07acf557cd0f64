//! The CLI's integration tests, in one test binary (the multi-process cluster tests have their own, `tests/cluster`, so that they never load the machine under the timing-sensitive tests here): one link instead of twelve keeps CI short.
//! Most build the application in this process (`common::app`); the rest spawn the `agentry`
//! binary where a separate process is the point (signals, crashes, the CLI itself).

mod common;

mod api;
mod auth;
mod callbacks;
mod cli;
mod compat_golden;
mod config;
mod event_bus;
mod executors;
mod hooks;
mod limits;
mod openapi;
mod postgres;
mod runagent_sdk;
mod runs;
mod schedules;
mod shared_limits;
mod triggers;
mod validation;
mod workers;
