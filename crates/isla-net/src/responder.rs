//! The DNS responder of a network as a process of its own, what aardvark-dns is to podman:
//! there is no daemon, so the first instance that joins a network starts one
//! ([`Networks::ensure_dns`]), and it lives until the network has no instance left.
//!
//! One file per network, `<root>/net/dns/<network id>.pid`, is both the record and the lock:
//! the responder holds an exclusive `flock` on it for as long as it runs and writes its pid and
//! start time into it once its socket is bound. So "is one running?" is "is the lock held?",
//! which a crashed responder cannot get wrong (the kernel drops its lock), and two starters
//! racing cannot get two responders (the second finds the lock held by the first, waits for its
//! record, and leaves).
//!
//! The end: a responder checks every second, under the state's shared lock, whether its network
//! still exists and has attachments; if not it closes its socket and drops its lock *before*
//! the state lock, so an attach that it did not see commits only after the lock is free, and
//! that attach's [`Networks::ensure_dns`] starts a new one. [`Networks::detach`],
//! [`Networks::remove`] and [`Networks::prune`] do not wait for that second: when they leave a
//! network without instances they stop its responder (SIGTERM, then wait for its lock) while
//! they still hold the state's exclusive lock, for the same reason.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, Write as _};
use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::fs::{flock, FlockOperation};

use crate::dns::DnsServer;
use crate::model::{Network, State};
use crate::networks::Networks;
use crate::store::Store;
use crate::Error;

/// How often a responder looks whether its network is still in use.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// How long a starter waits for a new responder to report.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new responder waits for a lock held by somebody without a record.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// How long a stop waits for the responder to end.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A responder as recorded in its pid file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Responder {
    /// Its process id.
    pub pid: u32,
    /// Its start time in clock ticks since boot (field 22 of `/proc/PID/stat`), so that a reused
    /// pid is never taken for it.
    pub start: u64,
}

impl Responder {
    /// The pid file's text.
    fn record(self) -> String {
        format!("{} {}\n", self.pid, self.start)
    }

    /// Reads a pid file's text; `None` if it is empty or damaged (a responder that has not
    /// written it yet, or an old one's leftover).
    fn parse(text: &str) -> Option<Responder> {
        let mut w = text.split_whitespace();
        let r = Responder { pid: w.next()?.parse().ok()?, start: w.next()?.parse().ok()? };
        (w.next().is_none() && r.pid > 1).then_some(r)
    }

    /// This process.
    fn current() -> Option<Responder> {
        let pid = std::process::id();
        Some(Responder { pid, start: process_start(pid)? })
    }

    /// Whether this very process still runs.
    fn alive(self) -> bool {
        process_start(self.pid) == Some(self.start)
    }
}

/// Field 22 of `/proc/PID/stat` (start time); `None` if there is no such process or it is a zombie.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: count after the last ')'.
    let mut rest = stat.rsplit_once(") ")?.1.split(' ');
    if rest.next()? == "Z" {
        return None;
    }
    rest.nth(18)?.parse().ok()
}

/// The pid file of network `net_id`'s responder.
fn pid_path(store: &Store, net_id: &str) -> PathBuf {
    store.dir().join("dns").join(format!("{net_id}.pid"))
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io { path: path.to_path_buf(), source: e }
}

/// Opens (creating) a pid file and tries to take its lock without waiting: `Some(file)` holding
/// the lock, `None` if another process holds it.
fn try_lock(path: &Path) -> Result<Option<File>, Error> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(io_err(d))?;
    }
    let f = OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path).map_err(io_err(path))?;
    match flock(&f, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(f)),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(None),
        Err(e) => Err(io_err(path)(e.into())),
    }
}

/// Takes the lock at `path` for a new responder: `None` if another responder holds it. A holder
/// without a record is either a responder about to write it or a [`running`] probe (which holds
/// the lock for microseconds): both are waited for, so a probe never makes a new responder give up.
fn take_lock(path: &Path) -> Result<Option<File>, Error> {
    let end = Instant::now() + LOCK_WAIT;
    loop {
        if let Some(f) = try_lock(path)? {
            return Ok(Some(f));
        }
        if running(path)?.is_some() {
            return Ok(None);
        }
        if Instant::now() >= end {
            return Err(Error::Invalid(format!(
                "{} is locked by a process that does not record itself as its responder",
                path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The responder holding the lock at `path`, if one does (and has written its record).
fn running(path: &Path) -> Result<Option<Responder>, Error> {
    if !path.exists() {
        return Ok(None);
    }
    if try_lock(path)?.is_some() {
        return Ok(None);
    }
    Ok(std::fs::read_to_string(path).ok().as_deref().and_then(Responder::parse).filter(|r| r.alive()))
}

/// Waits until nobody holds the lock at `path`; whether that happened within `timeout`.
fn wait_unlocked(path: &Path, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if matches!(try_lock(path), Ok(Some(_)) | Err(_)) {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a responder serves: the network, if it exists, is the same one (not a new network of the
/// same name), and has instances.
fn in_use<'s>(state: &'s State, name: &str, id: &str) -> Option<&'s Network> {
    state.networks.get(name).filter(|n| n.id == id && !n.attachments.is_empty())
}

/// Stops the responders of the networks of `old` that `new` leaves without instances (or
/// removes). Called with the state's exclusive lock held, after `new` is saved. Failures are
/// logged: the responder also notices by itself within a second.
pub(crate) fn stop_idle(store: &Store, old: &State, new: &State) {
    for net in old.networks.values().filter(|n| in_use(new, &n.name, &n.id).is_none()) {
        let path = pid_path(store, &net.id);
        if let Err(e) = stop(&path) {
            tracing::warn!("stopping the DNS responder of network {}: {e}", net.name);
        }
        if !new.networks.values().any(|n| n.id == net.id) {
            let _ = std::fs::remove_file(path.with_extension("log"));
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Sends SIGTERM to the responder of `path`, if one runs, and waits for its lock to be free.
fn stop(path: &Path) -> Result<(), Error> {
    let Some(r) = running(path)? else { return Ok(()) };
    let pid = rustix::process::Pid::from_raw(r.pid as i32)
        .ok_or_else(|| Error::Invalid(format!("{}: pid {}", path.display(), r.pid)))?;
    match rustix::process::kill_process(pid, rustix::process::Signal::TERM) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => {}
        Err(e) => return Err(io_err(path)(e.into())),
    }
    if wait_unlocked(path, STOP_TIMEOUT) {
        Ok(())
    } else {
        Err(Error::Invalid(format!("DNS responder {} did not end within {STOP_TIMEOUT:?} of SIGTERM", r.pid)))
    }
}

/// Reads one line from `f` within `timeout` (less if the writers close it). Byte by byte, with
/// no buffer, so that `poll` sees everything not read yet.
fn read_line(mut f: File, timeout: Duration) -> std::io::Result<String> {
    let end = Instant::now() + timeout;
    let mut line = Vec::new();
    while !line.ends_with(b"\n") {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"));
        }
        let ts = Timespec { tv_sec: left.as_secs() as i64, tv_nsec: i64::from(left.subsec_nanos()) };
        let ready = {
            let mut fds = [PollFd::new(&f, PollFlags::IN)];
            match poll(&mut fds, Some(&ts)) {
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => 0,
                Err(e) => return Err(e.into()),
            }
        };
        if ready > 0 {
            let mut byte = [0u8; 1];
            if f.read(&mut byte)? == 0 {
                break;
            }
            line.push(byte[0]);
        }
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}

impl Networks {
    /// The responder process serving `network`, if one runs.
    pub fn dns_responder(&self, network: &str) -> Result<Option<Responder>, Error> {
        let net = self.inspect(network)?;
        running(&pid_path(self.store(), &net.id))
    }

    /// Makes sure the DNS responder of `network` runs, and returns the address instances should
    /// use as their name server (`None` for the bridge driver, whose host has no address on the
    /// network). If none runs, `command` is started (the caller's way to run
    /// [`Networks::run_dns_responder`] in a new process, e.g. `isla __dns --root R NETWORK`):
    /// it must detach (fork and exit) and report `ok` or `error: ...` as one line on its
    /// standard output. Its standard error goes to `<root>/net/dns/<network id>.log`.
    pub fn ensure_dns(&self, network: &str, mut command: Command) -> Result<Option<Ipv4Addr>, Error> {
        let net = self.inspect(network)?;
        if !net.host_has_address() {
            return Ok(None);
        }
        let addr = Self::dns_address(&net)?;
        let path = pid_path(self.store(), &net.id);
        if try_lock(&path)?.is_none() {
            return Ok(Some(addr));
        }
        let log = path.with_extension("log");
        let err = OpenOptions::new().create(true).append(true).open(&log).map_err(io_err(&log))?;
        let failed = |msg: String| Error::Dns { network: network.to_string(), msg, log: log.clone() };
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(err);
        let mut child = command.spawn().map_err(|e| failed(format!("starting {:?}: {e}", command.get_program())))?;
        let out = child.stdout.take().map(|o| File::from(std::os::fd::OwnedFd::from(o)));
        // The process forks: the parent's exit is quick; the line comes from the child.
        let status = child.wait().map_err(|e| failed(format!("waiting for it: {e}")))?;
        if !status.success() {
            return Err(failed(format!("it ended with {status}")));
        }
        let line = out
            .ok_or_else(|| failed("no pipe to read its report from".into()))
            .and_then(|o| read_line(o, READY_TIMEOUT).map_err(|e| failed(format!("reading its report: {e}"))))?;
        match line.strip_prefix("error: ") {
            None if line == "ok" => Ok(Some(addr)),
            Some(msg) => Err(failed(msg.to_string())),
            None if line.is_empty() => Err(failed("it ended without reporting".into())),
            None => Err(failed(format!("unexpected report `{line}`"))),
        }
    }

    /// The body of a network's responder process: takes the network's responder lock (if
    /// another process holds it, reports ready and returns at once), binds UDP port 53 on the
    /// gateway address, records itself, calls `ready` (with the error if that failed), then
    /// serves until the network is removed or has no instance left. Answers come from the state
    /// file read per query, so instances attached by any process resolve at once.
    pub fn run_dns_responder(&self, network: &str, ready: impl FnOnce(Result<(), &Error>)) -> Result<(), Error> {
        let setup = (|| -> Result<Option<(Network, DnsServer, File)>, Error> {
            let net = self.inspect(network)?;
            let addr = Self::dns_address(&net)?;
            let path = pid_path(self.store(), &net.id);
            let Some(mut lock) = take_lock(&path)? else { return Ok(None) };
            if in_use(&self.store().load()?, &net.name, &net.id).is_none() {
                return Ok(None);
            }
            let sock = UdpSocket::bind((addr, 53))
                .map_err(|e| Error::Io { path: format!("udp {addr}:53").into(), source: e })?;
            let me = Responder::current().ok_or_else(|| Error::Invalid("cannot read /proc/self/stat".into()))?;
            lock.set_len(0)
                .and_then(|()| lock.rewind())
                .and_then(|()| lock.write_all(me.record().as_bytes()))
                .map_err(io_err(&path))?;
            let store = self.store().clone();
            let (name, id) = (net.name.clone(), net.id.clone());
            let server = DnsServer::spawn(sock, move |q| in_use(&store.load().ok()?, &name, &id)?.resolve(q))
                .map_err(|e| Error::Io { path: "dns thread".into(), source: e })?;
            Ok(Some((net, server, lock)))
        })();
        let (net, server, lock) = match setup {
            Ok(Some(s)) => s,
            Ok(None) => {
                ready(Ok(()));
                return Ok(());
            }
            Err(e) => {
                ready(Err(&e));
                return Err(e);
            }
        };
        tracing::info!("serving DNS for network {} on {}", net.name, server.local_addr());
        ready(Ok(()));
        loop {
            std::thread::sleep(IDLE_CHECK);
            let _state_lock = self.store().lock(false)?;
            match self.store().load() {
                Ok(s) if in_use(&s, &net.name, &net.id).is_some() => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!("reading the network state: {e}; stopping"),
            }
            // Socket closed and lock dropped before the state lock (see the module's comment).
            drop(server);
            drop(lock);
            tracing::info!("network {} has no instances left; DNS responder ends", net.name);
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_records_round_trip_and_damaged_ones_are_ignored() {
        let r = Responder { pid: 4242, start: 987654 };
        assert_eq!(Responder::parse(&r.record()), Some(r));
        for bad in ["", "\n", "12", "x 1", "1 2", "12 34 56", "-5 3"] {
            assert_eq!(Responder::parse(bad), None, "{bad:?}");
        }
        let me = Responder::current().unwrap();
        assert!(me.alive());
        assert!(!Responder { start: me.start + 1, ..me }.alive(), "a reused pid is not the recorded process");
    }

    #[test]
    fn the_lock_is_taken_once_and_freed_with_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dns").join("abc.pid");
        assert_eq!(running(&path).unwrap(), None, "no file, nothing runs");
        let mut held = try_lock(&path).unwrap().expect("first lock");
        assert!(try_lock(&path).unwrap().is_none(), "a second lock is refused while the first is held");
        assert_eq!(running(&path).unwrap(), None, "held but no record yet");
        let me = Responder::current().unwrap();
        held.write_all(me.record().as_bytes()).unwrap();
        assert_eq!(running(&path).unwrap(), Some(me));
        assert!(!wait_unlocked(&path, Duration::from_millis(50)));
        assert!(take_lock(&path).unwrap().is_none(), "a recorded, live holder: no second responder");
        drop(held);
        assert!(wait_unlocked(&path, Duration::from_millis(50)));
        assert_eq!(running(&path).unwrap(), None, "a record without its lock is a dead responder's");
        // A holder without a record (a probe) is waited for, not taken for a responder.
        let probe = try_lock(&path).unwrap().unwrap();
        std::fs::write(&path, "").unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(probe);
        });
        assert!(take_lock(&path).unwrap().is_some());
        release.join().unwrap();
    }

    #[test]
    fn only_an_existing_network_with_instances_is_in_use() {
        let mut net = crate::model::sample_network(crate::Driver::Nat);
        let mut state = State { version: 1, networks: [(net.name.clone(), net.clone())].into() };
        assert!(in_use(&state, &net.name, &net.id).is_none(), "no instances");
        let a = Networks::plan_attach(&state, &net.name, "c1", Some("c1"), crate::AttachKind::Veth).unwrap();
        net.attachments.insert("c1".into(), a);
        state.networks.insert(net.name.clone(), net.clone());
        assert!(in_use(&state, &net.name, &net.id).is_some());
        assert!(in_use(&state, &net.name, "another-id").is_none(), "a new network of the same name");
        assert!(in_use(&State::default(), &net.name, &net.id).is_none(), "removed");
    }

    #[test]
    fn reports_are_read_with_a_timeout() {
        let (r, mut w) = std::io::pipe().unwrap();
        w.write_all(b"ok\nmore").unwrap();
        let r = File::from(std::os::fd::OwnedFd::from(r));
        assert_eq!(read_line(r.try_clone().unwrap(), Duration::from_secs(1)).unwrap(), "ok");
        let (r2, w2) = std::io::pipe().unwrap();
        let r2 = File::from(std::os::fd::OwnedFd::from(r2));
        let e = read_line(r2.try_clone().unwrap(), Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        drop(w2);
        assert_eq!(read_line(r2, Duration::from_secs(1)).unwrap(), "", "EOF without a line");
    }
}
