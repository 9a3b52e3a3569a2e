//! Host-side helpers: processes (Pss, process trees, bounded runs), waiting for a line in a log,
//! network namespaces the lab creates, and facts about the machine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::model::HostInfo;
use crate::{Error, Result};

/// Set by SIGINT or SIGTERM once [`stop_on_signals`] ran: the lab then winds down, stopping and
/// removing every instance it started (the instances' drops do that).
static STOP: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> = std::sync::OnceLock::new();

/// Makes SIGINT and SIGTERM ask the lab to stop cleanly instead of ending the process (which
/// would leave containers, QEMU processes and network namespaces behind).
pub fn stop_on_signals() -> Result<()> {
    let flag = STOP.get_or_init(Default::default).clone();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone())
            .map_err(|e| Error::Setup(format!("installing the signal handler: {e}")))?;
    }
    Ok(())
}

/// Whether a stop was asked for.
pub fn interrupted() -> bool {
    STOP.get().is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
}

/// Pss of one process in KiB (`/proc/PID/smaps_rollup`); `None` once it is gone.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("Pss:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Parent pid of a process.
fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields follow the last ')'.
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Every live pid on the host.
fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let pairs: Vec<(u32, u32)> = all_pids().into_iter().filter_map(|p| Some((p, ppid(p)?))).collect();
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(pairs.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    out
}

/// Sum of Pss over `pid`'s process tree, KiB.
pub fn tree_pss_kib(pid: u32) -> u64 {
    tree(pid).into_iter().filter_map(pss_kib).sum()
}

/// Sends SIGKILL to every process of `pid`'s tree (children first).
pub fn kill_tree(pid: u32) {
    for p in tree(pid).into_iter().rev() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), nix::sys::signal::Signal::SIGKILL);
    }
}

/// A child process killed (with its descendants) on drop.
pub struct Guard(pub Child);

impl Guard {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// The exit status, if it has ended.
    pub fn ended(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().ok().flatten()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            kill_tree(self.0.id());
        }
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to its end, killing it after `limit`; stdout and stderr are collected.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let dir = tempdir_for("run")?;
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let io = |p: &Path| std::fs::File::create(p).map_err(|e| Error::io(p, e));
    cmd.stdin(Stdio::null()).stdout(io(&out_path)?).stderr(io(&err_path)?);
    let status = match status_bounded(cmd, limit) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    let read = |p: &Path| std::fs::read(p).unwrap_or_default();
    let out = Output { status, stdout: read(&out_path), stderr: read(&err_path) };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

/// Runs `cmd` (its standard streams as the caller set them) to its end; killed (with its
/// descendants) after `limit`.
pub fn status_bounded(cmd: &mut Command, limit: Duration) -> Result<std::process::ExitStatus> {
    let what = format!("{:?}", cmd.get_program());
    let mut child = Guard(cmd.spawn().map_err(|e| Error::Spawn(what.clone(), e))?);
    let start = Instant::now();
    loop {
        if let Some(s) = child.ended() {
            return Ok(s);
        }
        if start.elapsed() > limit {
            return Err(Error::Timeout(format!("{what} still running after {} s", limit.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs a command that must succeed within `limit`; its stdout.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> Result<String> {
    let what = format!("{:?}", cmd);
    let out = run_bounded(cmd, limit)?;
    if !out.status.success() {
        return Err(Error::Command(what, format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A fresh directory under the system's temporary directory.
pub fn tempdir_for(what: &str) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "isla-lab-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    Ok(d)
}

/// Waits until `file` holds a line containing `text`, while `alive` says the producer runs.
/// Returns the time waited and the file's text.
pub fn wait_for_text(
    file: &Path,
    text: &str,
    limit: Duration,
    mut alive: impl FnMut() -> bool,
) -> std::result::Result<(Duration, String), String> {
    let start = Instant::now();
    loop {
        let s = std::fs::read(file).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        if s.contains(text) {
            return Ok((start.elapsed(), s));
        }
        if interrupted() {
            return Err("interrupted".into());
        }
        if !alive() {
            let why = telling(&s).map(|l| format!("{l}; ")).unwrap_or_default();
            return Err(format!("ended before printing {text:?}: {why}last output: {}", tail(&s, 3)));
        }
        if start.elapsed() > limit {
            return Err(format!("no {text:?} after {} s; last output: {}", limit.as_secs(), tail(&s, 3)));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The line of a log that best says why a guest or process ended: an emulation failure, a
/// kernel panic, a segfault, else the last line naming an error.
pub fn telling(s: &str) -> Option<&str> {
    let lines = || s.lines().map(|l| l.trim_end_matches('\r'));
    ["INTERNAL_ERROR", "Kernel panic", "segfault"]
        .iter()
        .find_map(|k| lines().find(|l| l.contains(k)))
        .or_else(|| lines().rev().find(|l| l.to_lowercase().contains("error")))
}

/// The last `n` non-empty lines of a text, joined with " | ".
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().map(|l| l.trim_end_matches('\r')).filter(|l| !l.trim().is_empty()).collect();
    let t = lines[lines.len().saturating_sub(n)..].join(" | ");
    if t.is_empty() {
        "(nothing)".into()
    } else {
        t
    }
}

/// A network namespace the lab created (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Netns> {
        let name = format!("isla-lab-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run_ok(Command::new("ip").args(["netns", "add", &name]), Duration::from_secs(10))?;
        let ns = Netns { name };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]), Duration::from_secs(10))?;
        Ok(ns)
    }

    /// Its path, for setns(2) and nsenter(1).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n NS ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args), Duration::from_secs(10)).map(|_| ())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A program on PATH (or an absolute path that exists).
pub fn which(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(name)).find(|c| c.is_file())
}

/// Facts about this machine.
pub fn info() -> HostInfo {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let meminfo = read("/proc/meminfo");
    let mem_total_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let cpuinfo = read("/proc/cpuinfo");
    let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count() as u32;
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let modules = read("/proc/modules");
    HostInfo {
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        cpus,
        mem_total_kib,
        cpu_model,
        nested_pvm: modules.lines().any(|l| l.starts_with("kvm_pvm ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_process_tree() {
        let mut child = Guard(Command::new("sh").args(["-c", "sleep 30 & sleep 30 & wait"]).spawn().unwrap());
        std::thread::sleep(Duration::from_millis(300));
        let t = tree(child.pid());
        assert_eq!(t.len(), 3, "{t:?}");
        assert!(tree_pss_kib(child.pid()) > pss_kib(child.pid()).unwrap());
        kill_tree(child.pid());
        std::thread::sleep(Duration::from_millis(100));
        assert!(child.ended().is_some());
    }

    #[test]
    fn bounded_runs_and_waits() {
        let o = run_bounded(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]), Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            (o.status.code(), o.stdout.as_slice(), o.stderr.as_slice()),
            (Some(3), &b"out\n"[..], &b"err\n"[..])
        );
        let e = run_bounded(Command::new("sleep").arg("5"), Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().contains("still running"), "{e}");
        assert!(run_ok(Command::new("false").args(["x"]), Duration::from_secs(5)).is_err());
        let d = tempdir_for("test-wait").unwrap();
        let f = d.join("log");
        std::fs::write(&f, "a\nLAB ready\n").unwrap();
        assert!(wait_for_text(&f, "LAB ready", Duration::from_secs(1), || true).is_ok());
        let e = wait_for_text(&f, "never", Duration::from_millis(50), || true).unwrap_err();
        assert!(e.contains("LAB ready"), "{e}");
        assert!(wait_for_text(&f, "never", Duration::from_secs(5), || false).unwrap_err().starts_with("ended"));
        std::fs::remove_dir_all(d).unwrap();
        assert_eq!(tail("\n\nx\r\n", 3), "x");
        let log = "a\nIO read failed: bus error\nvcpu: Received KVM_EXIT_INTERNAL_ERROR signal\nexit error\n";
        assert_eq!(telling(log), Some("vcpu: Received KVM_EXIT_INTERNAL_ERROR signal"));
        assert_eq!(telling("x\nan error here\ny\n"), Some("an error here"));
        assert_eq!(telling("all fine\n"), None);
        assert!(which("sh").is_some() && which("/nonexistent/x").is_none());
        assert!(info().cpus >= 1);
    }
}
