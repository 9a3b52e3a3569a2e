//! The manager's errors: each names the instance, file or field at fault and what to do.

use std::path::PathBuf;

/// Errors of the instance manager.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad user input (a flag value, a name, a volume or port syntax).
    #[error("{field}: {msg}")]
    Invalid {
        /// The flag or field.
        field: String,
        /// What is wrong and how to fix it.
        msg: String,
    },
    /// Another instance already has this name.
    #[error("name `{0}` is already in use by another instance; choose another --name or remove it with `isla rm {0}`")]
    NameInUse(String),
    /// No instance with this name or id.
    #[error("no instance named `{0}` (see `isla ps -a`)")]
    NotFound(String),
    /// An id prefix matches several instances.
    #[error("`{0}` matches several instances; give more of the id or the name")]
    Ambiguous(String),
    /// No named volume of this name.
    #[error("no volume named `{0}` (see `isla volume ls`)")]
    NoSuchVolume(String),
    /// A named volume is mounted by instances.
    #[error("volume `{name}` is in use by {users}; remove those instances first (`isla rm`)")]
    VolumeInUse {
        /// The volume.
        name: String,
        /// The instances, comma-separated.
        users: String,
    },
    /// The operation does not fit the instance's current state.
    #[error("instance `{name}` is {status}: {msg}")]
    State {
        /// Instance name.
        name: String,
        /// Its status.
        status: String,
        /// What to do instead.
        msg: String,
    },
    /// Something the drivers cannot do yet (the message says what and what to use instead).
    #[error("{0} (see docs/manager.md)")]
    Unsupported(String),
    /// The state database.
    #[error("state database {path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// A file or directory.
    #[error("{what}: {source}")]
    Io {
        /// The file and the action.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The image store.
    #[error(transparent)]
    Image(#[from] isla_image::Error),
    /// A disk image.
    #[error("disk image: {0}")]
    Disk(#[from] isla_disk::DiskError),
    /// The container runtime.
    #[error("container runtime: {0}")]
    Runtime(#[from] isla_container::Error),
    /// Networking.
    #[error("network: {0}")]
    Net(#[from] isla_net::Error),
    /// The supervisor of an instance failed or died.
    #[error("instance `{name}`: {msg}")]
    Supervisor {
        /// Instance name.
        name: String,
        /// What happened.
        msg: String,
    },
}

/// Result with the manager's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid { field: field.into(), msg: msg.into() }
    }
}

/// `map_err` helper for I/O errors: `.map_err(io(format!("writing {}", p.display())))`.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// `map_err` helper for nix errors.
pub(crate) fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> Error {
    let what = what.into();
    move |e| Error::Io { what, source: std::io::Error::from(e) }
}
