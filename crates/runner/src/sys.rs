//! The only unsafe code in Agentry: what a worker process sets up between fork and exec.
//! Only async-signal-safe system calls run there (prctl, setrlimit), as POSIX requires in a
//! multi-threaded parent.
#![allow(unsafe_code)]

use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::Signal;

/// Asks the kernel to signal the worker (SIGUSR2) when the server dies, so that the worker takes
/// its whole process group down with it (what the agent spawned too) even when the server was
/// SIGKILLed; checks right after arming that the server has not died already; and applies the
/// memory limit.
pub(crate) fn set_child_limits(cmd: &mut tokio::process::Command, memory_limit_bytes: Option<u64>) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure only makes async-signal-safe syscalls and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Some(Signal::SIGUSR2)).map_err(std::io::Error::from)?;
            // The server may have died between fork and the prctl: then no signal will come.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other(
                    "the server exited while starting a worker",
                ));
            }
            if let Some(limit) = memory_limit_bytes {
                setrlimit(Resource::RLIMIT_AS, limit, limit).map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
}
