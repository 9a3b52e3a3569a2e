//! Container state: the OCI `state` document and the runtime's own record, stored as JSON under
//! the runtime root (`<root>/<id>/state.json`), always replaced atomically (write, then rename).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

use crate::cgroups::CgroupDriver;
use crate::error::{io, Result};

/// Lifecycle status, as the runtime spec names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        };
        f.write_str(s)
    }
}

/// The `state` document (runtime spec, plus runc's `rootfs`, `created` and `owner`, which
/// containerd's shim reads).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    pub pid: i32,
    pub status: Status,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: String,
    pub owner: String,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

/// What the runtime keeps about a container between commands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub state: State,
    /// Start time of the init (field 22 of /proc/PID/stat), to tell it from a reused pid.
    pub init_start: u64,
    pub cgroup_driver: CgroupDriver,
    pub cgroup_path: Option<PathBuf>,
    pub cgroup_enabled: bool,
    pub spec: Spec,
}

impl Record {
    /// Write atomically to `dir/state.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec(self)
            .map_err(|e| crate::error::Error::Io { what: "encoding state".into(), source: e.into() })?;
        write_atomic(&dir.join("state.json"), &json)
    }

    /// Read `dir/state.json`.
    pub fn load(dir: &Path) -> Result<Record> {
        let path = dir.join("state.json");
        let text = std::fs::read(&path).map_err(io(path.display().to_string()))?;
        serde_json::from_slice(&text).map_err(|e| crate::error::Error::Io {
            what: format!("{}: damaged state file (delete the directory to forget the container)", path.display()),
            source: e.into(),
        })
    }
}

/// Write a file through a temporary name and rename, so readers never see half of it.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data).map_err(io(tmp.display().to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        crate::error::Error::Io { what: path.display().to_string(), source: e }
    })
}

/// Start time of a process in clock ticks since boot, `None` if it is gone or a zombie.
pub fn process_start(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Now as RFC 3339 UTC with nanoseconds (what Go's time.Time parses in runc's `created`).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_has_the_right_shape() {
        let s = now_rfc3339();
        assert_eq!(s.len(), 30, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z') && &s[10..11] == "T", "{s}");
    }

    #[test]
    fn own_process_has_a_start_time() {
        assert!(process_start(std::process::id() as i32).is_some());
        assert!(process_start(i32::MAX).is_none());
    }
}
