//! Processes that own instances or operations, identified by pid *and* start time so that a
//! reused pid is not taken for the original owner; ids, times and the crash-test hook.

use std::io::Read;

use crate::error::{io, Result};

/// A process, as recorded in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Process id.
    pub pid: i32,
    /// Start time in clock ticks since boot (field 22 of `/proc/PID/stat`).
    pub start: u64,
}

impl Owner {
    /// This process.
    pub fn current() -> Owner {
        let pid = std::process::id() as i32;
        Owner { pid, start: isla_container::state::process_start(pid).unwrap_or(0) }
    }

    /// Process `pid`, if it exists.
    pub fn of(pid: i32) -> Option<Owner> {
        isla_container::state::process_start(pid).map(|start| Owner { pid, start })
    }

    /// Whether this very process still runs (a zombie counts as gone).
    pub fn alive(&self) -> bool {
        isla_container::state::process_start(self.pid).is_some_and(|s| s == self.start || self.start == 0)
    }
}

/// The current time as RFC 3339 (UTC).
pub fn now_rfc3339() -> String {
    isla_container::state::now_rfc3339()
}

/// A new random instance id: 32 hex digits from the kernel's random source.
pub fn new_id() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).map_err(io("reading /dev/urandom"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Crash-test hook: when `ISLA_CORE_CRASH_AT` equals `point`, the process kills itself with
/// SIGKILL right there, as a power cut or `kill -9` would. Tests use it to check that
/// [`crate::Manager::open`] repairs every step of a multi-step operation.
pub fn crash_point(point: &str) {
    if std::env::var("ISLA_CORE_CRASH_AT").is_ok_and(|p| p == point) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
