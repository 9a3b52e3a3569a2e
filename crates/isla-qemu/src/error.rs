//! Every failure of the crate, each naming what it was about and, where there is one, the fix.

use std::path::PathBuf;
use std::time::Duration;

use crate::vm::VmState;

/// What can go wrong while configuring, starting or driving a QEMU VM.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A configuration field is wrong; `field` is its JSON path (`disks[1].path`).
    #[error("{field}: {msg}")]
    Config { field: String, msg: String },
    /// A file of the VM (or one it refers to) could not be read, written or created.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` of a VM directory is not valid.
    #[error("{}: {msg}", path.display())]
    BadStateFile { path: PathBuf, msg: String },
    /// The QEMU binary is missing.
    #[error("qemu-system-x86_64 was not found on PATH: install it with `apt-get install qemu-system-x86`")]
    NotInstalled,
    /// QEMU exited while starting; `log` is the end of its standard error.
    #[error("qemu-system-x86_64 exited while starting ({status}): {log}")]
    StartFailed { status: String, log: String },
    /// QEMU answered a QMP command with an error.
    #[error("QMP `{command}` failed: {class}: {desc}")]
    Qmp { command: String, class: String, desc: String },
    /// A QMP command got no answer in time.
    #[error("QMP `{command}`: no answer within {timeout:?} (QEMU busy, hung, or another client holds the monitor)")]
    QmpTimeout { command: String, timeout: Duration },
    /// The QMP connection broke or QEMU sent something that is not QMP.
    #[error("QMP `{command}`: {msg}")]
    QmpProtocol { command: String, msg: String },
    /// A human-monitor command (savevm, loadvm, delvm) reported an error in its output.
    #[error("`{command}` failed: {msg}")]
    Monitor { command: String, msg: String },
    /// The operation does not fit the VM's state (start while running, clone while running...).
    #[error("VM `{name}` is {state}: {msg}")]
    WrongState { name: String, state: VmState, msg: String },
    /// A snapshot name that does not exist.
    #[error("VM `{name}` has no snapshot `{snapshot}` (see `isla qemu snapshot {name} list`)")]
    NoSuchSnapshot { name: String, snapshot: String },
    /// A disk image operation failed.
    #[error(transparent)]
    Disk(#[from] isla_disk::DiskError),
    /// Opening a TAP device failed.
    #[error(transparent)]
    Net(#[from] isla_net::Error),
}

impl QemuError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        QemuError::Io { path: path.into(), op, source }
    }

    pub(crate) fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        QemuError::Config { field: field.into(), msg: msg.into() }
    }
}

/// Result with [`QemuError`].
pub type Result<T, E = QemuError> = std::result::Result<T, E>;
