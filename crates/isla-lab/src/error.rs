//! The lab's errors.

use std::path::{Path, PathBuf};

/// Everything that can stop a lab step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("starting {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("{0}")]
    Timeout(String),
    #[error("{0} failed: {1}")]
    Command(String, String),
    #[error("{0}")]
    Setup(String),
    #[error("--out {path}: {what} (choose another directory or remove it)")]
    Out { path: PathBuf, what: String },
    #[error("rendering {0}: {1}")]
    Render(&'static str, String),
    #[error("interrupted: every instance started was stopped and removed")]
    Interrupted,
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io { path: path.to_path_buf(), source }
    }
}

/// The lab's result type.
pub type Result<T> = std::result::Result<T, Error>;
