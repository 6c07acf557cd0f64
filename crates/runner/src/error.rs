//! How a call to an agent can fail: the executor's error, `agentry_core::executor::CallError`,
//! which the API maps onto the error taxonomy and onto RunAgent's envelopes.

pub use agentry_core::executor::CallError;
