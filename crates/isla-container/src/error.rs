//! The runtime's error type: every variant names what failed and, where it can, the fix.

use std::path::PathBuf;

/// Errors from loading bundles, creating and managing containers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bundle (directory, config.json or rootfs) is unusable.
    #[error("bundle {bundle}: {msg}")]
    Bundle { bundle: PathBuf, msg: String },
    /// A field of config.json has a value the runtime cannot apply.
    #[error("config.json: {field}: {msg}")]
    Config { field: String, msg: String },
    /// The container id is not acceptable as a directory name.
    #[error("invalid container id {0:?}: use letters, digits, '.', '_', '+' and '-' (at most 1024 characters)")]
    InvalidId(String),
    /// A container with this id is already in the state directory.
    #[error("container {0:?} already exists (delete it first with `delete {0}`)")]
    Exists(String),
    /// No container with this id.
    #[error("container {0:?} does not exist")]
    NotFound(String),
    /// The operation does not fit the container's current status.
    #[error("container {id:?} is {status}: cannot {op}")]
    WrongStatus { id: String, status: String, op: String },
    /// A cgroup file or directory could not be read, written or created.
    #[error("cgroup {path}: {msg}")]
    Cgroup { path: PathBuf, msg: String },
    /// The container's init process reported a failure while it set the container up.
    #[error("container init failed: {0}")]
    Init(String),
    /// A lifecycle hook failed.
    #[error("hook {path}: {msg}")]
    Hook { path: PathBuf, msg: String },
    /// The seccomp profile could not be compiled.
    #[error("linux.seccomp: {0}")]
    Seccomp(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys { what: String, source: nix::Error },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

/// Result with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a description to an I/O error.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Attach a description to a system-call error.
pub(crate) fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> Error {
    let what = what.into();
    move |source| Error::Sys { what, source }
}

/// A configuration error for `field`.
pub(crate) fn config(field: impl Into<String>, msg: impl Into<String>) -> Error {
    Error::Config { field: field.into(), msg: msg.into() }
}
