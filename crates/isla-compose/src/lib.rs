//! isla-compose: stack files in the docker-compose format, for `isla compose up|down|ps|logs`.
//!
//! [`load`] reads a file ([`file::ComposeFile`], deserialized with serde_yaml and
//! `deny_unknown_fields`, so a key isla does not implement is an error that names the field, its
//! line and its column) and turns it into a [`Plan`]: the project's networks
//! ([`PlannedNetwork`], isla-net specs) and one [`isla_core::InstanceSpec`] per service
//! ([`PlannedService`]) in dependency order (`depends_on`; a cycle is refused naming the
//! services in it). Nothing here touches the system: the CLI (`crates/isla-cli/src/compose.rs`)
//! carries the plan out through [`isla_core::Manager`] and rolls back what a failed `up` made.
//!
//! String values are interpolated (`${VAR}`, `${VAR:-default}`, `${VAR:?error}`, `$$`, ...)
//! with the caller's environment and the `.env` file beside the stack file ([`interpolate`]),
//! while serde reads them. The plan also lists the project's named volumes
//! ([`PlannedVolume`], `<project>_<key>`) and, for a service with `build:`, how its image is
//! built ([`PlannedBuild`]; named `<project>-<service>` unless `image:` is given).
//!
//! Values are checked while they are deserialized (ports, volumes, sizes, restart policies), so
//! their errors carry serde_yaml's location too. Hand-written part: the dependency sort (a
//! depth-first search of a few services; it also yields the cycle for the error message).

pub mod file;
pub mod interpolate;
mod plan;

pub use interpolate::Vars;
pub use plan::{
    load, parse, parse_with, plan, project_name, Plan, PlannedBuild, PlannedNetwork, PlannedService, PlannedVolume,
    LABEL_PROJECT, LABEL_SERVICE, LABEL_VOLUME,
};

/// Errors of reading and planning a stack file; each names the file and the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be read.
    #[error("{file}: cannot read the stack file: {source}")]
    Read {
        /// The file.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// Malformed YAML, an unknown key or a bad value; serde_yaml's message names the field path,
    /// the line and the column.
    #[error("{file}: {msg}")]
    Syntax {
        /// The file.
        file: String,
        /// serde_yaml's message.
        msg: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// 1-based column, when known.
        column: Option<usize>,
    },
    /// A value that is well-formed but does not fit the rest of the file.
    #[error("{file}: {field}: {msg}")]
    Invalid {
        /// The file.
        file: String,
        /// The field path, e.g. `services.web.depends_on`.
        field: String,
        /// What is wrong and how to fix it.
        msg: String,
    },
    /// The `.env` file beside the stack file cannot be read (the message names the line).
    #[error("{file}: {msg}")]
    EnvFile {
        /// The `.env` file.
        file: String,
        /// What is wrong.
        msg: String,
    },
    /// `depends_on` goes round in a circle.
    #[error("{file}: services.*.depends_on: the services depend on each other in a cycle: {cycle}")]
    Cycle {
        /// The file.
        file: String,
        /// The services, e.g. `a -> b -> a`.
        cycle: String,
    },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
