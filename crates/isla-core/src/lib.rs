//! isla-core: the instance manager behind `isla create|run|start|stop|ps|...`.
//!
//! One model for the three kinds of instance ([`Kind`]: container, microVM, VM): what the user
//! asked for is an [`InstanceSpec`], what the manager knows is an [`Instance`] with its
//! [`Status`]. The [`Manager`] records instances in a SQLite database (`<root>/isla.db`, WAL,
//! versioned schema; [`store`]) and drives them through a [`Driver`] per kind. The container
//! driver ([`container::ContainerDriver`]) is complete: image store root file systems
//! (`isla-image`), an OCI bundle from the spec, isla's runtime (`isla-container`), veth, port
//! publishing and names on a network (`isla-net`). The microVM driver
//! ([`microvm::MicrovmDriver`]) runs `isla vm run` monitors on a TAP with the guest kit, the
//! full-VM driver ([`vm::VmDriver`]) QEMU through `isla-qemu`. A container image boots as a
//! microVM on an ext4 disk made from it (`imagevm`); full VMs take the kit or disks only.
//!
//! Named volumes ([`volume`], `-v NAME:/path`) are directories below the root recorded in the
//! store's `volumes` table; they outlive the instances that mount them.
//!
//! There is no daemon: each started instance gets a small supervisor process
//! ([`supervise::supervise`], run as `isla __supervise`), the parent of the instance's process,
//! which writes its output to the log ([`logs`]), records its exit, applies the restart policy
//! and releases its resources.
//!
//! Crash safety: multi-step operations record an intent (`creating`, `removing`) with their
//! owner's pid and start time before they change anything; [`Manager::open`] rolls back or
//! finishes the intents of dead owners and releases instances whose supervisor died
//! ([`Manager::reconcile`]). A test hook ([`proc::crash_point`]) kills the process with SIGKILL
//! at named steps to prove it.
//!
//! Hand-written parts, and why: the log format (a few lines of CRI's text format, no crate
//! for it) and the signal forwarding (two `sigaction`s; `signal-hook` would add a thread or a
//! self-pipe the supervisor does not need).

pub mod container;
pub mod driver;
pub mod error;
pub mod guest;
mod imagevm;
pub mod logs;
mod manager;
pub mod microvm;
pub mod model;
pub mod proc;
mod sig;
pub mod store;
pub mod supervise;
pub mod vm;
pub mod volume;

pub use driver::{Driver, Env, ExecOutput, ExecRequest, Stats};
pub use error::{Error, Result};
pub use isla_container::Signal;
pub use manager::{driver, Manager, ReconcileReport, Started, DEFAULT_NETWORK, DEFAULT_ROOT};
pub use model::{Instance, InstanceSpec, Kind, RestartPolicy, Status, Volume};
pub use volume::VolumeInfo;
