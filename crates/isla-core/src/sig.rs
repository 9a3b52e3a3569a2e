//! The supervisor's `unsafe`, all of it: the signal actions (catching what it forwards to the
//! instance, SIGPIPE's default around the clone) and adopting the readiness pipe its parent
//! passed by descriptor number.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use crate::error::{sys, Error, Result};

/// The last signal caught and not yet taken (0: none).
static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    PENDING.store(sig, Ordering::SeqCst);
}

/// Catches SIGINT, SIGTERM, SIGHUP and SIGQUIT (without SA_RESTART, so a blocking `poll` returns
/// EINTR); [`take`] returns them. The handlers are reset to the default by `execve`, so the
/// instance's own process is not affected.
pub fn catch_forwarded() -> Result<()> {
    let act = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe { sigaction(s, &act) }.map_err(sys(format!("sigaction {s}")))?;
    }
    Ok(())
}

/// The signal caught since the last call, if any.
pub fn take() -> Option<Signal> {
    let s = PENDING.swap(0, Ordering::SeqCst);
    Signal::try_from(s).ok()
}

/// Adopts descriptor `fd`, inherited from the parent that named it on the command line.
pub fn adopt_fd(fd: i32) -> Result<OwnedFd> {
    // Refuse a number that is not an open descriptor (or one of stdio), rather than owning a
    // descriptor that something else owns.
    if fd <= 2 || std::fs::symlink_metadata(format!("/proc/self/fd/{fd}")).is_err() {
        return Err(Error::invalid("--ready-fd", format!("{fd} is not an open descriptor")));
    }
    // SAFETY: the descriptor is open (checked above), not stdio, and nothing else in this
    // process refers to it: the parent passed it for this purpose only.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // The instance's processes must not inherit it (the parent reads until it is closed).
    nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
        .map_err(sys("--ready-fd"))?;
    Ok(owned)
}

/// Runs `f` with SIGPIPE at its default action, so that processes cloned and exec'd inside
/// `f` do not inherit the "ignore" Rust's start-up code sets; restores the old action after.
pub fn with_default_sigpipe<T>(f: impl FnOnce() -> T) -> T {
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: installing the default action involves no handler code.
    let old = unsafe { sigaction(Signal::SIGPIPE, &dfl) };
    let r = f();
    if let Ok(old) = old {
        // SAFETY: puts back the action that was installed before (Rust's SIG_IGN).
        let _ = unsafe { sigaction(Signal::SIGPIPE, &old) };
    }
    r
}
