//! The only unsafe code in Agentry: what a worker process sets up between fork and exec (only
//! async-signal-safe system calls run there, prctl and setrlimit, as POSIX requires in a
//! multi-threaded parent), and registering a worker's pidfd with the reactor.
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

/// A pidfd of our child `pid` (unreaped, so the number is surely that child's), registered with
/// the reactor: it polls readable once the child exits, before anyone reaps it. `None` where
/// the kernel has no pidfds (before 5.3).
pub(crate) fn exit_watch(pid: i32) -> Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    let pid = rustix::process::Pid::from_raw(pid)?;
    let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::NONBLOCK).ok()?;
    // SAFETY: the `AsyncFd` owns the `OwnedFd`, so the descriptor stays open and the same for
    // as long as it is registered, and nothing else closes it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .ok()
}
