//! isla's OCI runtime: runs OCI bundles (a `config.json` and a root file system) in Linux
//! namespaces and cgroups, with runc's lifecycle (create, start, state, kill, delete) so that
//! containerd's runc shim can drive it through `isla runtime` (or a symlink named `isla-runc`).
//!
//! Main types:
//! - [`Runtime`]: a state directory (default [`DEFAULT_ROOT`]) and a cgroup driver;
//!   [`Runtime::create`], [`Runtime::run`] and [`Runtime::load`] give [`Container`]s.
//! - [`Container`]: `start`, `state`, `kill`, `exec`, `ps`, `pause`, `resume`, `stats`, `delete`.
//! - [`cgroups::CgroupManager`]: one trait over cgroup v1 ([`cgroups::v1::V1`]) and v2
//!   ([`cgroups::v2::V2`]).
//! - [`spec`]: loading and checking bundles (the `oci-spec` crate's types), the default spec.
//!
//! How a container starts: the runtime parses the spec and builds a complete plan (mounts,
//! devices, capabilities as bit masks, the seccomp filter compiled to BPF, argv/envp) before a
//! single `clone(2)` with the CLONE_NEW* flags. The child (the container's init) walks that plan
//! with allocation-free system calls, reports "ready" over a socketpair, and waits for the
//! runtime (`run`) or for `start` to write the exec FIFO (`create`) before it execs the user's
//! program. No helper processes and no re-exec of the runtime binary are involved, which is
//! where most of the speed over runc and crun comes from.
//!
//! The calls that clone (create, run, exec) need a single-threaded caller: the clone skips
//! fork()'s atfork bookkeeping, so a lock held by another thread would stay held in the child.

pub mod cgroups;
mod console;
mod container;
pub mod error;
mod hooks;
mod init;
mod plan;
mod seccomp;
pub mod spec;
pub mod state;
mod sys;
#[cfg(feature = "testutil")]
pub mod testutil;

pub use container::{check_id, Container, CreateOptions, ExecOptions, Runtime, DEFAULT_ROOT};
pub use error::{Error, Result};
pub use nix::sys::signal::Signal;
pub use oci_spec;
pub use oci_spec::runtime::{Process, Spec};
pub use state::{State, Status};

/// A signal by number ("9"), name ("KILL") or full name ("SIGKILL").
pub fn parse_signal(s: &str) -> Result<Signal> {
    use std::str::FromStr;
    let bad = || error::config("signal", format!("{s:?} is not a signal (use a number or a name such as SIGTERM)"));
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| bad());
    }
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") { name } else { format!("SIG{name}") };
    Signal::from_str(&name).map_err(|_| bad())
}
