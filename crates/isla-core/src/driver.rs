//! The interface every kind of instance implements, and the context drivers work in.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::error::{io, Result};
use crate::model::{Instance, InstanceSpec, Kind, Status};

/// Where things live and which binary to run for helper processes.
#[derive(Clone)]
pub struct Env {
    /// The manager's root (default [`crate::DEFAULT_ROOT`]).
    pub root: PathBuf,
    /// The image store, `<root>/images`.
    pub images: isla_image::Store,
    /// The `isla` binary: runs supervisors (`isla __supervise`) and the runtime (`isla runtime`).
    pub helper: PathBuf,
}

impl Env {
    /// `<root>/instances/<id>`: the bundle, the log, the supervisor's own log.
    pub fn instance_dir(&self, id: &str) -> PathBuf {
        self.root.join("instances").join(id)
    }

    /// `<root>/volumes/<name>`: a named volume (its files are in `_data`).
    pub fn volume_dir(&self, name: &str) -> PathBuf {
        self.root.join("volumes").join(name)
    }

    /// `<root>/volumes/<name>/_data`: what instances mount.
    pub fn volume_data(&self, name: &str) -> PathBuf {
        self.volume_dir(name).join("_data")
    }

    /// The container runtime's state directory.
    pub fn runtime_root(&self) -> PathBuf {
        self.root.join("runtime")
    }

    /// The networks of this root.
    pub fn networks(&self) -> Result<isla_net::Networks> {
        Ok(isla_net::Networks::open(&self.root)?)
    }
}

/// The write ends the instance's stdout and stderr go to (the supervisor reads the other ends).
pub struct Stdio {
    /// Standard output.
    pub out: OwnedFd,
    /// Standard error.
    pub err: OwnedFd,
}

/// What [`Driver::start`] started.
pub struct Launched {
    /// The main process, a child of the calling supervisor.
    pub pid: i32,
    /// Its network attachment.
    pub attachment: Option<isla_net::Attachment>,
    /// A file the instance writes its console to instead of the stdio pipes (a VM's serial
    /// port): the supervisor copies what is appended to it into the log.
    pub follow: Option<PathBuf>,
    /// Whatever must live as long as the main process runs (e.g. a handle owning it).
    pub keep: Option<Box<dyn std::any::Any>>,
}

/// What `exec` runs.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    /// Program and arguments.
    pub args: Vec<String>,
    /// Extra `K=V` settings.
    pub env: Vec<String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// Allocate a terminal.
    pub tty: bool,
}

/// What a command run by `exec` printed, and how it ended (the daemon's `exec`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExecOutput {
    /// Exit code (128+N when killed by signal N).
    pub exit_code: i32,
    /// Standard output (invalid UTF-8 replaced).
    pub stdout: String,
    /// Standard error (invalid UTF-8 replaced).
    pub stderr: String,
}

/// Resource use of a running instance.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// CPU time used, nanoseconds.
    pub cpu_ns: u64,
    /// Memory in use, bytes.
    pub memory: u64,
    /// Memory limit, bytes (None: unlimited).
    pub memory_limit: Option<u64>,
    /// Processes (or vCPUs).
    pub pids: u64,
}

/// One kind of instance. The manager records state and runs the supervisor; a driver makes
/// and releases the real things (root file systems, runtime state, cgroups, network links).
/// Every release method is idempotent: it is called again after a crash.
pub trait Driver {
    /// The kind this driver runs.
    fn kind(&self) -> Kind;
    /// Checks a spec against the system before anything is recorded (image present, ...).
    fn check(&self, env: &Env, spec: &InstanceSpec) -> Result<()>;
    /// Makes what the instance needs on disk.
    fn create(&self, env: &Env, inst: &Instance) -> Result<()>;
    /// Starts the instance's main process as a child of the calling process (the supervisor),
    /// with its output on `stdio`, and plugs it into its network. On error nothing of the run
    /// is left.
    fn start(&self, env: &Env, inst: &Instance, stdio: Stdio) -> Result<Launched>;
    /// Releases what a run holds (runtime state, cgroup, network link, mounts) once the main
    /// process has ended, killing it first if it still runs.
    fn release(&self, env: &Env, inst: &Instance) -> Result<()>;
    /// Asks the instance to stop (SIGTERM or the guest's power-off), SIGKILL after `timeout`.
    /// Returns once the main process has ended.
    fn stop(&self, env: &Env, inst: &Instance, timeout: Duration) -> Result<()>;
    /// Sends a signal to the main process.
    fn kill(&self, env: &Env, inst: &Instance, signal: isla_container::Signal) -> Result<()>;
    /// Freezes the instance.
    fn pause(&self, env: &Env, inst: &Instance) -> Result<()>;
    /// Thaws it.
    fn resume(&self, env: &Env, inst: &Instance) -> Result<()>;
    /// Deletes everything the instance has (after [`Driver::release`]).
    fn remove(&self, env: &Env, inst: &Instance) -> Result<()>;
    /// The live state as the runtime sees it (None: nothing runs).
    fn state(&self, env: &Env, inst: &Instance) -> Result<Option<Status>>;
    /// Runs a command in the running instance with the caller's stdio; its exit code.
    fn exec(&self, env: &Env, inst: &Instance, req: &ExecRequest) -> Result<i32>;
    /// Runs a command in the running instance and returns its output and exit code.
    fn exec_output(&self, _env: &Env, inst: &Instance, _req: &ExecRequest) -> Result<ExecOutput> {
        Err(crate::Error::Unsupported(format!(
            "exec with captured output is not available for {} instances",
            inst.spec.kind
        )))
    }
    /// The log file.
    fn logs(&self, inst: &Instance) -> PathBuf {
        inst.log_path.clone()
    }
    /// Resource use.
    fn stats(&self, env: &Env, inst: &Instance) -> Result<Stats>;
    /// The instance's exit code, given the exit code of its main process (a VM's guest may
    /// report its program's status another way than its monitor's exit).
    fn exit_code(&self, _env: &Env, _inst: &Instance, code: i32) -> i32 {
        code
    }
}

/// Polls `done` every 20 ms until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU time, resident memory and threads of a process that runs an instance (a VM monitor).
pub fn process_stats(pid: i32, memory_limit: Option<u64>) -> Result<Stats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(io(format!("reading /proc/{pid}/stat")))?;
    let fields: Vec<&str> = stat.rsplit_once(") ").map(|(_, r)| r.split(' ').collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100).max(1) as u64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let value = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(Stats {
        // utime + stime: fields 14 and 15 of stat(5), 11 and 12 after the command name.
        cpu_ns: (ticks(11) + ticks(12)) * 1_000_000_000 / hz,
        memory: value("VmRSS:") * 1024,
        memory_limit,
        pids: value("Threads:"),
    })
}

/// Deletes `<root>/instances/<id>` (a missing directory is fine).
pub fn remove_instance_dir(env: &Env, id: &str) -> Result<()> {
    let dir = env.instance_dir(id);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(format!("removing {}", dir.display()))(e)),
        _ => Ok(()),
    }
}

/// Makes sure the DNS responder of network `net` runs (`isla __dns`, started by the first
/// instance on the network; see `isla_net::Networks::ensure_dns`) and returns the name server
/// the instance should use. A responder that cannot start (port 53 of the gateway address held by
/// another DNS server, say) is logged and gives `None`: the instance still starts, containers
/// resolve their peers through `/etc/hosts`, and the warning says why names do not resolve.
pub fn network_dns(env: &Env, nets: &isla_net::Networks, net: &str) -> Option<std::net::Ipv4Addr> {
    let mut cmd = std::process::Command::new(&env.helper);
    cmd.arg("__dns").arg("--root").arg(&env.root).arg(net);
    // Its log is a file: plain text, and the line that says where it serves.
    cmd.env("NO_COLOR", "1");
    if std::env::var_os("ISLA_LOG").is_none() {
        cmd.env("ISLA_LOG", "info");
    }
    nets.ensure_dns(net, cmd).unwrap_or_else(|e| {
        tracing::warn!("{e}; names on network {net} are not served by DNS");
        None
    })
}

/// `/etc/resolv.conf` for an instance on network `net` whose root isla writes (containers, and
/// container images booted as microVMs): the network's responder first, then the host's own
/// non-loopback name servers (see `isla_net::dns::resolv_conf`).
pub(crate) fn instance_resolv_conf(env: &Env, nets: &isla_net::Networks, net: &str) -> String {
    let dns = network_dns(env, nets, net);
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    isla_net::dns::resolv_conf(dns, net, &host)
}

/// The name servers of a VM guest on network `net` ([`network_dns`] and one of the host's, see
/// `isla_net::dns::guest_servers`), for the kernel's `ip=` argument.
pub fn guest_dns(env: &Env, nets: &isla_net::Networks, net: &str) -> Vec<std::net::Ipv4Addr> {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    isla_net::dns::guest_servers(network_dns(env, nets, net), &host)
}

/// Detaches the instance from its network; an instance that is not attached (or whose network
/// is gone) is fine. Whether a link was detached.
pub fn detach_network(env: &Env, inst: &Instance) -> Result<bool> {
    let Some(net) = inst.spec.network_name() else { return Ok(false) };
    match env.networks()?.detach(net, &inst.id) {
        Ok(()) => Ok(true),
        Err(isla_net::Error::NotAttached { .. } | isla_net::Error::NoSuchNetwork(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
