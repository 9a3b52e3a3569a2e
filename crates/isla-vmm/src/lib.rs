//! `isla-vmm`: the isla microVM monitor, on the rust-vmm crates (kvm-ioctls, kvm-bindings,
//! vm-memory, linux-loader, vm-superio, acpi_tables through `isla-arch`).
//!
//! One VM per process, as Firecracker does. [`builder::run`] is the boot recipe: it creates the
//! KVM VM and guest memory, loads an ELF vmlinux or a bzImage through the 64-bit boot protocol,
//! writes the boot tables (GDT, page tables, boot_params with e820, ACPI), creates the legacy
//! devices ([`devices`]) and one thread per vCPU ([`vcpu`]), and waits for the guest to power
//! off, reboot or fail. Configuration comes typed and validated from [`config`] (or from a
//! Firecracker JSON file through [`firecracker`]); the run ends in a [`report::RunReport`].
//!
//! On nested (PVM) hosts, where the guest kernel runs under the host's instruction emulator,
//! emulation failures go to the instruction fallback of `isla-insn`; see docs/nested-kvm.md.

pub mod api;
pub mod builder;
pub mod config;
pub mod devices;
pub mod firecracker;
pub mod fpstate;
pub mod host;
pub mod kvm_exit;
pub mod profile;
pub mod report;
pub mod state;
pub mod vcpu;
pub mod virtio;

use std::path::PathBuf;

pub use builder::run;
pub use config::{ConfigError, VmConfig};
pub use report::RunReport;
pub use state::GuestExit;

/// Errors that keep a VM from being built or started.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// The kernel image could not be loaded.
    #[error("--kernel: {path}: {reason}")]
    Kernel {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Any other set-up failure.
    #[error("{0}")]
    Setup(String),
}

/// Maps a failed KVM ioctl to [`VmmError::Kvm`] naming it.
pub(crate) fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// Locks a mutex shared with the vCPU threads; a thread that panicked while holding it does not
/// make the state unusable for the others (the data here stays consistent between statements).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
