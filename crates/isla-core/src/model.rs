//! The instance model shared by the three kinds: what the user asked for ([`InstanceSpec`]) and
//! what the manager knows about it ([`Instance`], [`Status`]), with the parsers for Docker's flag
//! syntaxes (`-v`, `-e`, `--memory`, `--cpus`, `--restart`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use isla_net::PortSpec;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What runs the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A container on isla's OCI runtime.
    Container,
    /// A microVM on isla's KVM monitor.
    Microvm,
    /// A full VM on QEMU.
    Vm,
}

impl Kind {
    /// The name used on the command line and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Container => "container",
            Kind::Microvm => "microvm",
            Kind::Vm => "vm",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "container" => Ok(Kind::Container),
            "microvm" => Ok(Kind::Microvm),
            "vm" => Ok(Kind::Vm),
            _ => Err(Error::invalid("--kind", format!("`{s}`: expected container, microvm or vm"))),
        }
    }
}

/// Docker's restart policies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "policy")]
pub enum RestartPolicy {
    /// Never restart (the default).
    #[default]
    No,
    /// Restart after a non-zero exit, at most `max` times (0: no limit).
    OnFailure {
        /// Maximum number of restarts; 0 means unlimited.
        max: u32,
    },
    /// Restart after every exit, unless stopped by the user.
    Always,
    /// Like `always`; the difference (not restarting after a host reboot when stopped) needs a
    /// daemon, which this round does not have.
    UnlessStopped,
}

impl FromStr for RestartPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad =
            || Error::invalid("--restart", format!("`{s}`: expected no, always, unless-stopped or on-failure[:N]"));
        match s.split_once(':') {
            None => match s {
                "no" => Ok(RestartPolicy::No),
                "always" => Ok(RestartPolicy::Always),
                "unless-stopped" => Ok(RestartPolicy::UnlessStopped),
                "on-failure" => Ok(RestartPolicy::OnFailure { max: 0 }),
                _ => Err(bad()),
            },
            Some(("on-failure", n)) => Ok(RestartPolicy::OnFailure { max: n.parse().map_err(|_| bad())? }),
            Some(_) => Err(bad()),
        }
    }
}

impl RestartPolicy {
    /// Whether an instance that exited with `code` after `restarts` restarts is started again.
    pub fn restarts(&self, code: i32, restarts: u32) -> bool {
        match self {
            RestartPolicy::No => false,
            RestartPolicy::OnFailure { max } => code != 0 && (*max == 0 || restarts < *max),
            RestartPolicy::Always | RestartPolicy::UnlessStopped => true,
        }
    }
}

/// A mount `-v HOST:GUEST[:ro]` (bind mount of a host directory) or `-v NAME:GUEST[:ro]` (a
/// named volume, `<root>/volumes/NAME/_data`, made on first use; see [`crate::volume`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Absolute host directory (created if missing, as Docker does). For a named volume it is
    /// filled in by [`crate::Manager::create`] (empty until then).
    pub host: PathBuf,
    /// Absolute path inside the instance.
    pub guest: String,
    /// Mounted read-only.
    pub readonly: bool,
    /// The named volume, if this is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Volume {
    /// A bind mount of the host directory `host`.
    pub fn bind(host: impl Into<PathBuf>, guest: impl Into<String>, readonly: bool) -> Volume {
        Volume { host: host.into(), guest: guest.into(), readonly, name: None }
    }

    /// A named volume (its host directory is filled in when an instance is created).
    pub fn named(name: impl Into<String>, guest: impl Into<String>, readonly: bool) -> Volume {
        Volume { host: PathBuf::new(), guest: guest.into(), readonly, name: Some(name.into()) }
    }
}

/// Checks a volume name (Docker's rule: letters, digits, `_`, `.` and `-`, starting with a
/// letter or digit; isla also caps the length at 128).
pub fn check_volume_name(name: &str) -> Result<()> {
    if docker_name(name, 128) {
        return Ok(());
    }
    Err(Error::invalid(
        "volume name",
        format!("`{name}`: use letters, digits, `_`, `.` or `-`, starting with a letter or digit (at most 128)"),
    ))
}

/// Docker's rule for instance and volume names: 1 to `max` letters, digits, `_`, `.` and `-`,
/// starting with a letter or digit.
fn docker_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

impl FromStr for Volume {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::invalid(
                "-v",
                format!("`{s}`: {why} (expected /HOST/DIR:/GUEST/DIR[:ro|rw] or NAME:/GUEST/DIR[:ro|rw])"),
            )
        };
        let parts: Vec<&str> = s.split(':').collect();
        let (host, guest, readonly) = match parts.as_slice() {
            [h, g] => (*h, *g, false),
            [h, g, "ro"] => (*h, *g, true),
            [h, g, "rw"] => (*h, *g, false),
            [_, _, o] => return Err(bad(&format!("unknown option `{o}`"))),
            _ => return Err(bad("wrong number of fields")),
        };
        if !guest.starts_with('/') || guest.split('/').any(|c| c == "..") {
            return Err(bad("the guest path must be absolute and without `..`"));
        }
        if host.starts_with('/') {
            return Ok(Volume::bind(host, guest, readonly));
        }
        if host.contains('/') {
            return Err(bad("a host path must be absolute; a name without `/` is a named volume"));
        }
        check_volume_name(host).map_err(|e| bad(&e.to_string()))?;
        Ok(Volume::named(host, guest, readonly))
    }
}

/// Parses a memory size: bytes, or a number with b, k, m, g (any case, optional trailing `b`).
pub fn parse_memory(s: &str) -> Result<u64> {
    let bad = || Error::invalid("--memory", format!("`{s}`: expected a size such as 64m, 512k, 1g or a byte count"));
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').filter(|r| r.ends_with(['k', 'm', 'g'])).unwrap_or(&t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'm')) => (&t[..i], 1 << 20),
        Some((i, 'g')) => (&t[..i], 1 << 30),
        Some((i, 'b')) => (&t[..i], 1),
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let bytes = n.checked_mul(mult).ok_or_else(bad)?;
    if bytes < 6 << 20 {
        return Err(Error::invalid("--memory", format!("`{s}`: the minimum is 6m")));
    }
    Ok(bytes)
}

/// Parses `--cpus` (a positive decimal number of CPUs, e.g. 0.5).
pub fn parse_cpus(s: &str) -> Result<f64> {
    match s.parse::<f64>() {
        Ok(c) if (0.01..=1024.0).contains(&c) => Ok(c),
        _ => Err(Error::invalid("--cpus", format!("`{s}`: expected a number of CPUs between 0.01 and 1024"))),
    }
}

/// Checks an instance name (Docker's rule, and short enough to be a hostname).
pub fn check_name(name: &str) -> Result<()> {
    if docker_name(name, 63) {
        return Ok(());
    }
    Err(Error::invalid(
        "--name",
        format!("`{name}`: use 1-63 letters, digits, `_`, `.` or `-`, starting with a letter or digit"),
    ))
}

/// Everything the user asked for when creating an instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Unique name (also the hostname and the DNS name on its network).
    pub name: String,
    /// Container, microVM or VM.
    pub kind: Kind,
    /// Image name (containers; microVMs booting a container image).
    #[serde(default)]
    pub image: Option<String>,
    /// Kernel (microVMs and VMs without an image).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Root file system disk (microVMs and VMs without an image).
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// Command line; replaces the image's CMD (the ENTRYPOINT stays in front).
    #[serde(default)]
    pub command: Vec<String>,
    /// `K=V` settings added to (and overriding) the image's environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory (default: the image's, else `/`).
    #[serde(default)]
    pub workdir: Option<String>,
    /// Published ports (`-p`).
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// Bind mounts (`-v`).
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// CPU limit in CPUs.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Memory limit in bytes.
    #[serde(default)]
    pub memory: Option<u64>,
    /// What happens when the instance exits.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Network to attach to (default [`crate::DEFAULT_NETWORK`]); `none` for no network.
    #[serde(default)]
    pub network: Option<String>,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Remove the instance when it exits (`--rm`).
    #[serde(default)]
    pub auto_remove: bool,
}

impl InstanceSpec {
    /// A container spec for `image` with everything else at its default.
    pub fn container(name: impl Into<String>, image: impl Into<String>) -> Self {
        InstanceSpec {
            name: name.into(),
            kind: Kind::Container,
            image: Some(image.into()),
            kernel: None,
            rootfs: None,
            command: Vec::new(),
            env: Vec::new(),
            workdir: None,
            ports: Vec::new(),
            volumes: Vec::new(),
            cpus: None,
            memory: None,
            restart: RestartPolicy::No,
            network: None,
            labels: BTreeMap::new(),
            auto_remove: false,
        }
    }

    /// The network this instance joins, or None for `--network none`.
    pub fn network_name(&self) -> Option<&str> {
        match self.network.as_deref() {
            Some("none") => None,
            Some(n) => Some(n),
            None => Some(crate::DEFAULT_NETWORK),
        }
    }

    /// Checks everything that can be checked without touching the system.
    pub fn validate(&self) -> Result<()> {
        check_name(&self.name)?;
        for e in &self.env {
            if e.is_empty() || e.starts_with('=') {
                return Err(Error::invalid("-e", format!("`{e}`: expected KEY=VALUE")));
            }
        }
        if let Some(w) = &self.workdir {
            if !w.starts_with('/') {
                return Err(Error::invalid("--workdir", format!("`{w}`: must be an absolute path")));
            }
        }
        if !self.ports.is_empty() && self.network_name().is_none() {
            return Err(Error::invalid("-p", "published ports need a network; drop --network none"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.ports {
            if !seen.insert((p.host_port, p.proto)) {
                return Err(Error::invalid("-p", format!("host port {}/{} is given twice", p.host_port, p.proto)));
            }
        }
        if self.auto_remove && self.restart != RestartPolicy::No {
            return Err(Error::invalid("--rm", "cannot be combined with a --restart policy"));
        }
        match self.kind {
            Kind::Container if self.image.is_none() => Err(Error::invalid("image", "a container needs an image")),
            _ => Ok(()),
        }
    }
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "state", content = "exit_code")]
pub enum Status {
    /// Made, never started (or being started).
    Created,
    /// Its process runs.
    Running,
    /// Frozen.
    Paused,
    /// Stopped by the user (`stop`, `kill`); the exit code is kept in [`Instance::exit_code`].
    Stopped,
    /// Ended on its own with this code (128+N when killed by signal N).
    Exited(i32),
    /// Its supervisor vanished (killed, machine crash); its resources were released by
    /// [`crate::Manager::open`].
    Dead,
}

impl Status {
    /// Whether the instance has a live process.
    pub fn is_active(self) -> bool {
        matches!(self, Status::Running | Status::Paused)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Created => f.write_str("created"),
            Status::Running => f.write_str("running"),
            Status::Paused => f.write_str("paused"),
            Status::Stopped => f.write_str("stopped"),
            Status::Exited(c) => write!(f, "exited ({c})"),
            Status::Dead => f.write_str("dead"),
        }
    }
}

/// One instance as the manager records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    /// 32 hex digits; the first 12 are shown.
    pub id: String,
    /// What was asked.
    pub spec: InstanceSpec,
    /// Current status.
    pub status: Status,
    /// Last exit code (also after `stop`).
    pub exit_code: Option<i32>,
    /// The instance's main process (container init, VM monitor, QEMU) while it runs.
    pub pid: Option<i32>,
    /// Its start time (clock ticks since boot), which tells it from a later process that
    /// reuses the pid.
    pub pid_start: Option<u64>,
    /// The supervisor process while it runs.
    pub supervisor_pid: Option<i32>,
    /// RFC 3339 times.
    pub created: String,
    /// Last start.
    pub started: Option<String>,
    /// Last end.
    pub finished: Option<String>,
    /// Restarts done by the restart policy since the last `start`.
    pub restart_count: u32,
    /// Network attachment while running.
    pub attachment: Option<isla_net::Attachment>,
    /// The last start failure or abnormal end.
    pub error: Option<String>,
    /// stdout/stderr log.
    pub log_path: PathBuf,
}

impl Instance {
    /// The main process, if it is still the one that was started.
    pub fn main_process(&self) -> Option<crate::proc::Owner> {
        let o = crate::proc::Owner { pid: self.pid?, start: self.pid_start? };
        o.alive().then_some(o)
    }

    /// The first 12 hex digits of the id.
    pub fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(12)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_syntaxes() {
        let v: Volume = "/srv/data:/data:ro".parse().unwrap();
        assert_eq!(v, Volume::bind("/srv/data", "/data", true));
        assert!(!"/a:/b".parse::<Volume>().unwrap().readonly);
        assert_eq!("data:/data:ro".parse::<Volume>().unwrap(), Volume::named("data", "/data", true));
        for bad in ["./data:/data", "a/b:/data", "-x:/data", "/a:b", "/a:/b:xx", "/a", "/a:/../b", ":/a"] {
            assert!(bad.parse::<Volume>().is_err(), "{bad}");
        }
        assert_eq!(parse_memory("64m").unwrap(), 64 << 20);
        assert_eq!(parse_memory("1G").unwrap(), 1 << 30);
        assert_eq!(parse_memory("8192kb").unwrap(), 8 << 20);
        assert_eq!(parse_memory("10485760").unwrap(), 10 << 20);
        for bad in ["", "x", "1m", "99999999999999g", "-5m"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_cpus("0.5").unwrap(), 0.5);
        assert!(parse_cpus("0").is_err() && parse_cpus("nan").is_err());
        assert_eq!("on-failure:3".parse::<RestartPolicy>().unwrap(), RestartPolicy::OnFailure { max: 3 });
        assert!("sometimes".parse::<RestartPolicy>().is_err());
        assert!(check_name("web-1").is_ok() && check_name("-x").is_err() && check_name("a b").is_err());
    }

    #[test]
    fn restart_policy_decisions() {
        assert!(!RestartPolicy::No.restarts(1, 0));
        let p = RestartPolicy::OnFailure { max: 2 };
        assert!(p.restarts(1, 1) && !p.restarts(1, 2) && !p.restarts(0, 0));
        assert!(RestartPolicy::Always.restarts(0, 100));
    }

    #[test]
    fn validation_names_the_flag() {
        let mut s = InstanceSpec::container("web", "busybox");
        s.env = vec!["=x".into()];
        assert!(s.validate().unwrap_err().to_string().starts_with("-e:"));
        s.env.clear();
        s.ports = vec!["8080:80".parse().unwrap(), "8080:81".parse().unwrap()];
        assert!(s.validate().unwrap_err().to_string().contains("given twice"));
        s.ports.truncate(1);
        s.network = Some("none".into());
        assert!(s.validate().is_err());
        s.network = None;
        assert!(s.validate().is_ok());
    }
}
