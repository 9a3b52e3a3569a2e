//! `isla-qemu`: isla's `vm` kind, a traditional full VM driven through `qemu-system-x86_64`, as
//! libvirt does: disks (raw, qcow2), a CD-ROM ISO, direct kernel boot, virtio-net on a TAP or on
//! QEMU's user-mode network, a VNC display, a serial console, internal snapshots and linked
//! clones. The manager (isla-core) and `isla qemu ...` call it.
//!
//! Main types:
//! - [`QemuConfig`] (serde, `config.json`): name, memory, vCPUs, [`Accel`] (`auto` picks KVM
//!   only where it can run an ordinary guest kernel, TCG otherwise), [`Machine`], disks, ISO,
//!   kernel, NICs, VNC, serial. [`QemuConfig::validate`] checks every field and file first.
//! - [`Vm`]: one VM directory and its QEMU process: `create`, `open` (re-attach after a restart
//!   through the pid file and the QMP socket), `start`, `status` ([`VmState`]: running, paused,
//!   shut off, crashed), `pause`, `resume`, `shutdown` (ACPI, then quit, then kill), `kill`,
//!   snapshots (QMP `savevm`/`loadvm`/`delvm` while running, `isla_disk::snapshot` on the qcow2
//!   files while shut off), `clone_linked` (qcow2 overlays over the VM's disks), `delete`.
//! - [`Qmp`]: a small synchronous QMP client (JSON lines over a unix socket, a timeout on every
//!   call, asynchronous events kept aside). Hand-written: see the [`qmp`] module for why.
//! - [`QemuError`]: every failure, naming the field, file or QMP command and the fix.
//!
//! The VM directory is the state: `config.json`, `qemu.pid` (written, locked and removed on a
//! clean exit by QEMU), `qmp.sock`, `qemu.log` (QEMU's output), `serial.log`, `exit.json` (how
//! the last run ended, when isla saw it). QEMU runs in its own process group, detached from the
//! caller, so a VM outlives the process that started it.

mod cmdline;
pub mod config;
mod error;
mod process;
pub mod qmp;
mod vm;

pub use config::{
    kvm_usable, qemu_binary, Accel, Cdrom, DiskConfig, DiskFormat, DiskInterface, FwdProto, HostFwd, KernelBoot,
    Machine, NicConfig, QemuConfig, ResolvedAccel, Serial, Vnc,
};
pub use error::{QemuError, Result};
pub use qmp::{Qmp, QmpEvent, RunStatus};
pub use vm::{ShutdownOutcome, Snapshot, StartInfo, Vm, VmPaths, VmState, VmStatus, QMP_TIMEOUT, SNAPSHOT_TIMEOUT};
