//! The only unsafe code in Agentry: what a worker process sets up between fork and exec.
//! Only async-signal-safe system calls run there (prctl, setrlimit), as POSIX requires in a
//! multi-threaded parent.
#![allow(unsafe_code)]

use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::Signal;

/// Asks the kernel to SIGKILL the worker when the server dies (so no worker outlives a server
/// killed with SIGKILL), and applies the memory limit.
pub(crate) fn set_child_limits(cmd: &mut tokio::process::Command, memory_limit_bytes: Option<u64>) {
    // SAFETY: the closure only makes async-signal-safe syscalls and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Some(Signal::SIGKILL)).map_err(std::io::Error::from)?;
            if let Some(limit) = memory_limit_bytes {
                setrlimit(Resource::RLIMIT_AS, limit, limit).map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
}
