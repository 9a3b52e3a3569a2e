//! Control groups: one [`CgroupManager`] trait, two implementations ([`v1::V1`] for the per-
//! controller hierarchies of legacy and hybrid hosts, [`v2::V2`] for the unified hierarchy).
//!
//! A container's cgroup is named by `linux.cgroupsPath`: absolute paths are taken from the root
//! of each hierarchy, relative ones from the runtime's own cgroup (as runc does), and
//! `slice:prefix:name` (systemd form, sent by containerd with `--systemd-cgroup`) becomes
//! `/slice/prefix-name.scope` without asking systemd.

pub mod v1;
pub mod v2;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which cgroup implementation a container uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    /// v2 when /sys/fs/cgroup is the unified hierarchy, v1 otherwise (legacy and hybrid hosts).
    #[default]
    Auto,
    /// The v1 controller hierarchies mounted on this host.
    V1,
    /// The unified hierarchy mounted at this directory (hybrid hosts: /sys/fs/cgroup/unified).
    V2(PathBuf),
    /// No cgroup at all (rootless without delegation); resource limits are then refused.
    Disabled,
}

/// CPU, memory and pids figures of a cgroup, shaped like runc's `events --stats` data.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub cpu: CpuStats,
    pub memory: MemoryStats,
    pub pids: PidsStats,
}

/// CPU time (nanoseconds) and CFS throttling.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CpuStats {
    pub usage: CpuUsage,
    pub throttling: Throttling,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CpuUsage {
    pub total: u64,
    pub kernel: u64,
    pub user: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Throttling {
    pub periods: u64,
    #[serde(rename = "throttledPeriods")]
    pub throttled_periods: u64,
    #[serde(rename = "throttledTime")]
    pub throttled_time: u64,
}

/// Memory use in bytes; `limit` is `u64::MAX` when unlimited.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MemoryStats {
    pub usage: u64,
    pub max: u64,
    pub limit: u64,
    pub failcnt: u64,
    /// Processes the kernel's OOM killer killed in this cgroup.
    pub oom_kill: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PidsStats {
    pub current: u64,
    pub limit: u64,
}

/// A container's cgroup, whatever the version.
pub trait CgroupManager {
    /// "v1" or "v2".
    fn version(&self) -> &'static str;
    /// Create the cgroup directories and apply the limits; on error nothing created stays.
    fn create(&self, resources: Option<&LinuxResources>) -> Result<()>;
    /// The `cgroup.procs` files to write a pid to (or "0", from the process itself) to join.
    fn procs_files(&self) -> Vec<PathBuf>;
    /// Pids of every process in the cgroup.
    fn pids(&self) -> Result<Vec<i32>>;
    /// Freeze (`true`) or thaw the cgroup, waiting until the kernel reports it done.
    fn freeze(&self, frozen: bool) -> Result<()>;
    /// Whether the cgroup is frozen.
    fn frozen(&self) -> Result<bool>;
    /// CPU, memory and pids figures.
    fn stats(&self) -> Result<Stats>;
    /// Remove the cgroup (it must be empty); missing directories are fine.
    fn destroy(&self) -> Result<()>;
    /// The directories the container's cgroup occupies, for `state` and debugging.
    fn paths(&self) -> Vec<PathBuf>;
}

/// A manager for `driver` and the spec's cgroupsPath (None: `isla/<id>` under the runtime's own cgroup).
pub fn manager(driver: &CgroupDriver, cgroups_path: Option<&Path>, id: &str) -> Result<Option<Box<dyn CgroupManager>>> {
    let rel = match cgroups_path {
        None => PathBuf::from(format!("isla/{id}")),
        Some(p) => from_systemd_form(p),
    };
    Ok(match driver {
        CgroupDriver::Disabled => None,
        CgroupDriver::V1 => Some(Box::new(v1::V1::new(&rel)?)),
        CgroupDriver::V2(root) => Some(Box::new(v2::V2::new(root, &rel)?)),
        CgroupDriver::Auto => {
            if is_cgroup2(Path::new("/sys/fs/cgroup")) {
                Some(Box::new(v2::V2::new(Path::new("/sys/fs/cgroup"), &rel)?))
            } else {
                Some(Box::new(v1::V1::new(&rel)?))
            }
        }
    })
}

/// `slice:prefix:name` -> `/slice/prefix-name.scope`; anything else unchanged.
fn from_systemd_form(p: &Path) -> PathBuf {
    let s = p.to_string_lossy();
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() == 3 && !s.starts_with('/') {
        let slice = if parts[0].is_empty() { "system.slice" } else { parts[0] };
        return PathBuf::from(format!("/{slice}/{}-{}.scope", parts[1], parts[2]));
    }
    p.to_path_buf()
}

/// Whether `dir` is a cgroup2 file system.
pub fn is_cgroup2(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Join `base` and a cgroup path (absolute or relative) without letting `..` climb out.
pub(crate) fn join(base: &Path, rel: &Path) -> Result<PathBuf> {
    let mut out = base.to_path_buf();
    for c in rel.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::RootDir | std::path::Component::CurDir => {}
            _ => {
                return Err(crate::error::config(
                    "linux.cgroupsPath",
                    format!("{} must not contain '..'", rel.display()),
                ))
            }
        }
    }
    Ok(out)
}

/// Write `value` to a cgroup file; the error names the file, the value and the spec field.
pub(crate) fn write(dir: &Path, file: &str, value: &str, field: &str) -> Result<()> {
    let path = dir.join(file);
    let r = fs::OpenOptions::new().write(true).open(&path).and_then(|mut f| f.write_all(value.as_bytes()));
    r.map_err(|e| {
        let hint = match e.raw_os_error() {
            Some(libc::ENOENT) => " (this kernel or cgroup has no such file: the controller is not available here)",
            Some(libc::EINVAL) | Some(libc::ERANGE) => " (the kernel refused the value)",
            Some(libc::EBUSY) => " (the cgroup is in use)",
            _ => "",
        };
        let field = if field.is_empty() { String::new() } else { format!(" for {field}") };
        Error::Cgroup { path, msg: format!("writing {value:?}{field}: {e}{hint}") }
    })
}

/// Read a cgroup file as text.
pub(crate) fn read(dir: &Path, file: &str) -> Result<String> {
    let path = dir.join(file);
    fs::read_to_string(&path).map_err(|e| Error::Cgroup { path, msg: format!("reading: {e}") })
}

/// Read a file holding one number ("max" reads as u64::MAX); 0 when the file is absent.
pub(crate) fn read_u64(dir: &Path, file: &str) -> u64 {
    fs::read_to_string(dir.join(file))
        .ok()
        .map(|s| {
            let s = s.trim();
            if s == "max" {
                u64::MAX
            } else {
                s.parse().unwrap_or(0)
            }
        })
        .unwrap_or(0)
}

/// Value of `key` in a flat keyed file ("key value" lines), 0 when absent.
pub(crate) fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// Pids listed in a cgroup.procs file.
pub(crate) fn read_pids(dir: &Path) -> Result<Vec<i32>> {
    Ok(read(dir, "cgroup.procs")?.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// rmdir a cgroup directory, retrying briefly while the kernel still counts exiting tasks.
pub(crate) fn remove_dir(path: &Path) -> Result<()> {
    for attempt in 0..200 {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 199 => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Err(e) => return Err(Error::Cgroup { path: path.to_path_buf(), msg: format!("removing: {e}") }),
        }
    }
    Ok(())
}

/// A byte count from the spec: negative means unlimited (-1) and is refused otherwise.
pub(crate) fn limit_value(v: i64, field: &str, max_word: &str) -> Result<String> {
    match v {
        -1 => Ok(max_word.to_string()),
        v if v < 0 => Err(crate::error::config(field, format!("{v} is not a valid limit (use -1 for no limit)"))),
        v => Ok(v.to_string()),
    }
}

/// Write a byte limit from the spec (`-1`: `max_word`) to a cgroup file.
pub(crate) fn write_limit(dir: &Path, file: &str, v: i64, field: &str, max_word: &str) -> Result<()> {
    write(dir, file, &limit_value(v, field, max_word)?, field)
}

/// Sanity checks that hold for both versions, so that impossible limits fail before any
/// directory is made.
pub(crate) fn validate(r: &LinuxResources) -> Result<()> {
    if let Some(m) = r.memory() {
        if let Some(l) = m.limit() {
            if (0..4096 * 2).contains(&l) {
                return Err(crate::error::config(
                    "linux.resources.memory.limit",
                    format!("{l} bytes is too small for any process (use at least 8192, or -1 for no limit)"),
                ));
            }
            if let Some(s) = m.swap() {
                if s >= 0 && l > 0 && s < l {
                    return Err(crate::error::config(
                        "linux.resources.memory.swap",
                        format!("{s} is less than memory.limit {l}: swap is memory+swap and must be >= limit"),
                    ));
                }
            }
            if let Some(res) = m.reservation() {
                if l > 0 && res > l {
                    return Err(crate::error::config(
                        "linux.resources.memory.reservation",
                        format!("{res} is above memory.limit {l}"),
                    ));
                }
            }
        }
    }
    if let Some(c) = r.cpu() {
        if let Some(p) = c.period() {
            if !(1000..=1_000_000).contains(&p) {
                return Err(crate::error::config(
                    "linux.resources.cpu.period",
                    format!("{p} us is outside the kernel's 1000..1000000 us"),
                ));
            }
        }
        if let Some(q) = c.quota() {
            if q != -1 && !(1000..=i64::MAX / 1000).contains(&q) {
                return Err(crate::error::config(
                    "linux.resources.cpu.quota",
                    format!("{q} us is impossible: use -1 (no limit) or at least 1000 us"),
                ));
            }
        }
        if let Some(s) = c.shares() {
            if s != 0 && !(2..=262_144).contains(&s) {
                return Err(crate::error::config("linux.resources.cpu.shares", format!("{s} is outside 2..262144")));
            }
        }
    }
    Ok(())
}
