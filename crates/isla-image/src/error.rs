//! The crate's error type: every variant names what was being handled (a file, a layer entry,
//! a registry URL, a Containerfile line) so that the message alone tells the user what to fix.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in the image store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system operation failed on `path`.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Input (a file, an argument, a JSON document) is malformed.
    #[error("{what}: {msg}")]
    Invalid { what: String, msg: String },
    /// Content did not hash to the digest it was announced with.
    #[error("{what}: digest mismatch: expected {expected}, got {actual} (the content is corrupt or was tampered with; nothing was stored)")]
    DigestMismatch { what: String, expected: String, actual: String },
    /// A layer tarball entry would escape the layer or is otherwise refused.
    #[error("layer {layer}: entry {entry:?}: {msg}")]
    UnsafeEntry { layer: String, entry: String, msg: String },
    /// No image by that name or digest.
    #[error("image {0:?} not found (see `isla image ls`)")]
    NotFound(String),
    /// A registry refused or failed a request.
    #[error("registry {url}: {msg}")]
    Registry { url: String, msg: String },
    /// A Containerfile instruction is wrong or failed.
    #[error("{file}:{line}: {msg}")]
    Build { file: String, line: usize, msg: String },
    /// A RUN step failed.
    #[error("RUN {cmd:?}: {msg}")]
    Run { cmd: String, msg: String },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(what: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Invalid { what: what.into(), msg: msg.into() }
    }
}

/// Attaches a path to `std::io` and `rustix` errors.
pub(crate) trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T, E: Into<std::io::Error>> IoContext<T> for std::result::Result<T, E> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|e| Error::Io { path: path.to_path_buf(), source: e.into() })
    }
}
