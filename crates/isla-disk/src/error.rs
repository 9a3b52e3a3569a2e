//! The crate's error type.

use std::path::{Path, PathBuf};

/// Everything that can go wrong with an image. Each variant names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{}: {op}: {source}", path.display())]
    Io { path: PathBuf, op: &'static str, source: std::io::Error },
    /// The image's metadata is inconsistent or hostile.
    #[error("{}: corrupt image: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
    /// A valid image that uses a feature this crate does not implement.
    #[error("{}: unsupported: {what}", path.display())]
    Unsupported { path: PathBuf, what: String },
    /// The backing chain cannot be opened (loop, too deep, missing file).
    #[error("{}: backing chain: {what}", path.display())]
    Backing { path: PathBuf, what: String },
    #[error("{}: refcount overflow at host offset {offset:#x}: the refcount reached its maximum ({max}); delete snapshots or convert the image to a wider refcount", path.display())]
    RefcountOverflow { path: PathBuf, offset: u64, max: u64 },
    #[error("{}: the image is in use (another process or handle has it open for writing, or is reading it while this one wants to write); close it first", path.display())]
    Locked { path: PathBuf },
    #[error("{}: the image is open read-only", path.display())]
    ReadOnly { path: PathBuf },
    #[error("request out of range: offset {offset} + length {len} is past the virtual size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A bad argument (size, name, option).
    #[error("{0}")]
    Invalid(String),
}

impl DiskError {
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        DiskError::Io { path: path.to_path_buf(), op, source }
    }
    pub(crate) fn corrupt(path: &Path, what: impl Into<String>) -> Self {
        DiskError::Corrupt { path: path.to_path_buf(), what: what.into() }
    }
    pub(crate) fn unsupported(path: &Path, what: impl Into<String>) -> Self {
        DiskError::Unsupported { path: path.to_path_buf(), what: what.into() }
    }
}
