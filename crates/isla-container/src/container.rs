//! [`Runtime`] (a state directory and a cgroup driver) and [`Container`] (one container's
//! lifecycle: create, start, state, kill, exec, ps, pause, resume, stats, delete).

use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, Process};

use crate::cgroups::{self, CgroupDriver, CgroupManager, Stats};
use crate::error::{io, sys, Error, Result};
use crate::init::{self, ChildFds, Msg, StartWait, MSG_ERROR, MSG_GO, MSG_HOOKS, MSG_READY};
use crate::plan::{self, Plan, PlanInput};
use crate::state::{self, Record, State, Status};
use crate::{hooks, spec};

/// Default state directory.
pub const DEFAULT_ROOT: &str = "/run/isla-runtime";

/// Options of `create` and `run`.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Write the init's pid here (atomically).
    pub pid_file: Option<PathBuf>,
    /// Unix socket that receives the terminal's master (process.terminal).
    pub console_socket: Option<PathBuf>,
    /// Switch root with MS_MOVE + chroot instead of pivot_root (rootfs on ramfs).
    pub no_pivot: bool,
}

/// Options of `exec`.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    /// Return once the process runs instead of waiting for its exit.
    pub detach: bool,
}

/// The runtime: where state lives and which cgroup driver new containers use.
#[derive(Debug, Clone)]
pub struct Runtime {
    root: PathBuf,
    pub cgroup_driver: CgroupDriver,
}

/// One container known to the runtime.
pub struct Container {
    dir: PathBuf,
    record: Record,
}

/// A cloned init that is not yet a recorded container: killed and cleaned up if dropped.
struct Launch {
    pid: Pid,
    /// The plan's step labels, to describe a failure the init reports after `launch`.
    labels: Vec<String>,
    sock: OwnedFd,
    console: Option<OwnedFd>,
    cleanup: Cleanup,
}

/// Undo for a half-created container: state directory and cgroup.
struct Cleanup {
    dir: Option<PathBuf>,
    cgroup: Option<Box<dyn CgroupManager>>,
    pid: Option<Pid>,
}

impl Cleanup {
    fn disarm(&mut self) -> Option<Box<dyn CgroupManager>> {
        self.dir = None;
        self.pid = None;
        self.cgroup.take()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
        if let Some(cg) = &self.cgroup {
            for p in cg.pids().unwrap_or_default() {
                let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            let _ = cg.destroy();
        }
        if let Some(d) = &self.dir {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// Container ids become directory names: keep them plain.
pub fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidId(id.to_string()))
    }
}

/// How the init waits before its exec.
enum Mode {
    Create,
    Run,
}

impl Runtime {
    /// A runtime keeping state under `root` (created with mode 0700 if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(io(format!("state directory {}", root.display())))?;
        Ok(Runtime { root, cgroup_driver: CgroupDriver::Auto })
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Create a container from `bundle`: namespaces, cgroup, mounts and root are set up and the
    /// init waits for [`Container::start`].
    pub fn create(&self, id: &str, bundle: &Path, opts: &CreateOptions) -> Result<Container> {
        let (container, launch) = self.launch(id, bundle, opts, Mode::Create)?;
        drop(launch.sock);
        Ok(container)
    }

    /// Create, start and wait: the container's exit status (128+N when killed by signal N).
    pub fn run(&self, id: &str, bundle: &Path, opts: &CreateOptions) -> Result<i32> {
        let (mut container, mut launch) = self.launch(id, bundle, opts, Mode::Run)?;
        container.record.state.status = Status::Running;
        container.record.save(&container.dir)?;
        crate::sys::forward_signals(launch.pid);
        let console = launch.console.take().map(crate::console::Relay::start);
        let result = release(&launch.sock, &launch.labels).and_then(|()| {
            let hooks = container.record.spec.hooks().as_ref().and_then(|h| h.poststart().clone()).unwrap_or_default();
            if let Err(e) = hooks::run(&hooks, &container.state_json()?, "poststart") {
                tracing::warn!("{e}");
            }
            wait_exit(launch.pid)
        });
        crate::sys::stop_forwarding();
        drop(console);
        launch.cleanup.disarm();
        let deleted = container.delete(true);
        let code = result?;
        deleted?;
        Ok(code)
    }

    fn launch(&self, id: &str, bundle: &Path, opts: &CreateOptions, mode: Mode) -> Result<(Container, Launch)> {
        check_id(id)?;
        if crate::sys::thread_count() > 1 {
            return Err(Error::Config {
                field: "runtime".into(),
                msg: "create/run/exec clone the calling process and need it single-threaded: call them from a helper process".into(),
            });
        }
        let b = spec::load(bundle)?;
        let process = b
            .spec
            .process()
            .clone()
            .ok_or_else(|| Error::Bundle { bundle: b.dir.clone(), msg: "no process".into() })?;
        let driver = if nix::unistd::geteuid().is_root() {
            self.cgroup_driver.clone()
        } else {
            rootless_driver(&self.cgroup_driver, &b.spec)
        };
        let cgroup_path = b.spec.linux().as_ref().and_then(|l| l.cgroups_path().clone());
        let cg = cgroups::manager(&driver, cgroup_path.as_deref(), id)?;
        let v1_mounts = if cg.as_ref().is_some_and(|c| c.version() == "v1")
            || (cg.is_none() && !cgroups::is_cgroup2(Path::new("/sys/fs/cgroup")))
        {
            cgroups::v1::mounts().unwrap_or_default()
        } else {
            Vec::new()
        };
        let cgroup_v2 = cg.as_ref().is_some_and(|c| c.version() == "v2");
        let dir = self.root.join(id);
        let mut record = Record {
            state: State {
                oci_version: b.spec.version().clone(),
                id: id.to_string(),
                pid: 0,
                status: Status::Creating,
                bundle: b.dir.clone(),
                rootfs: b.rootfs.clone(),
                created: state::now_rfc3339(),
                owner: String::new(),
                annotations: b.spec.annotations().clone().unwrap_or_default(),
            },
            init_start: 0,
            cgroup_driver: driver,
            cgroup_path,
            cgroup_enabled: cg.is_some(),
            spec: b.spec.clone(),
        };
        let hook_state =
            serde_json::to_string(&record.state).map_err(|e| Error::Io { what: "state".into(), source: e.into() })?;
        let input = PlanInput {
            spec: &b.spec,
            bundle: &b.dir,
            rootfs: &b.rootfs,
            no_pivot: opts.no_pivot,
            cgroup_v1_mounts: &v1_mounts,
            cgroup_v2,
            full: true,
        };
        let mut plan = plan::build(&input, &process, Some(hook_state))?;
        if plan.proc.terminal && opts.console_socket.is_none() && matches!(mode, Mode::Create) {
            return Err(crate::error::config(
                "process.terminal",
                "a created container with a terminal needs --console-socket",
            ));
        }
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(Error::Exists(id.to_string())),
            Err(e) => return Err(Error::Io { what: format!("creating {}", dir.display()), source: e }),
        }
        let cleanup = Cleanup { dir: Some(dir.clone()), cgroup: None, pid: None };
        let start = match mode {
            Mode::Run => StartWait::Socket,
            Mode::Create => {
                let fifo = dir.join("exec.fifo");
                nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(sys(format!("mkfifo {}", fifo.display())))?;
                let f = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open(&fifo)
                    .map_err(io(fifo.display().to_string()))?;
                StartWait::Fifo(f.into())
            }
        };
        let console = match &opts.console_socket {
            Some(p) => Some(OwnedFd::from(
                std::os::unix::net::UnixStream::connect(p).map_err(io(format!("--console-socket {}", p.display())))?,
            )),
            None => None,
        };
        let (pid, sock) = spawn(&mut plan, start, console)?;
        let mut launch = Launch { pid, labels: Vec::new(), sock, console: None, cleanup };
        launch.cleanup.pid = Some(pid);
        record.state.pid = pid.as_raw();
        if plan.new_userns {
            write_id_maps(pid, &b.spec)?;
        }
        // The init does its mounts meanwhile; it waits for the go-ahead only where it needs the
        // cgroup (see init::setup).
        if let Some(cg) = &cg {
            cg.create(resources_with_devices(&b.spec).as_ref())?;
        }
        launch.cleanup.cgroup = cg;
        join_cgroup(launch.cleanup.cgroup.as_deref(), pid)?;
        if let Some(adj) = plan.proc.oom_score_adj {
            fs::write(format!("/proc/{pid}/oom_score_adj"), adj.to_string()).map_err(io("process.oomScoreAdj"))?;
        }
        init::send(launch.sock.as_fd(), Msg { tag: MSG_GO, step: 0, label: 0, value: pid.as_raw() })
            .map_err(sys("sync with the init"))?;
        loop {
            let (msg, fd) = recv_with_fd(&launch.sock)?;
            if let Some(fd) = fd {
                launch.console = Some(fd);
                continue;
            }
            match msg {
                None => return Err(init_died(pid)),
                Some(m) if m.tag == MSG_HOOKS => {
                    let st = serde_json::to_vec(&record.state)
                        .map_err(|e| Error::Io { what: "state".into(), source: e.into() })?;
                    if let Some(h) = b.spec.hooks() {
                        hooks::run(h.prestart().as_deref().unwrap_or_default(), &st, "prestart")?;
                        hooks::run(h.create_runtime().as_deref().unwrap_or_default(), &st, "createRuntime")?;
                    }
                    init::send(launch.sock.as_fd(), Msg { tag: MSG_GO, step: 0, label: 0, value: 0 })
                        .map_err(sys("sync with the init"))?;
                }
                Some(m) if m.tag == MSG_READY => break,
                Some(m) if m.tag == MSG_ERROR => {
                    return Err(plan::describe_failure(&plan.labels, m.step, m.label, m.value))
                }
                Some(m) => return Err(Error::Init(format!("unexpected message {}", m.tag))),
            }
        }
        launch.labels = std::mem::take(&mut plan.labels);
        record.init_start = state::process_start(pid.as_raw()).unwrap_or(0);
        record.state.status = Status::Created;
        record.save(&dir)?;
        if let Some(p) = &opts.pid_file {
            state::write_atomic(p, pid.as_raw().to_string().as_bytes())?;
        }
        let cg = launch.cleanup.disarm();
        drop(cg);
        Ok((Container { dir, record }, launch))
    }

    /// The container `id`.
    pub fn load(&self, id: &str) -> Result<Container> {
        check_id(id)?;
        let dir = self.root.join(id);
        if !dir.join("state.json").exists() {
            return Err(Error::NotFound(id.to_string()));
        }
        Ok(Container { record: Record::load(&dir)?, dir })
    }

    /// Every container's state.
    pub fn list(&self) -> Result<Vec<State>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.root).map_err(io(self.root.display().to_string()))?.flatten() {
            if let Some(id) = e.file_name().to_str() {
                if let Ok(c) = self.load(id) {
                    out.push(c.state()?);
                }
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

/// Without root, cgroups are used only when asked for by limits (a delegated hierarchy).
fn rootless_driver(driver: &CgroupDriver, spec: &oci_spec::runtime::Spec) -> CgroupDriver {
    let has_limits = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .is_some_and(|r| r.memory().is_some() || r.cpu().is_some() || r.pids().is_some() || r.block_io().is_some());
    if has_limits {
        driver.clone()
    } else {
        CgroupDriver::Disabled
    }
}

fn init_died(pid: Pid) -> Error {
    let how = match waitpid(pid, None) {
        Ok(WaitStatus::Exited(_, c)) => format!("exited with status {c}"),
        Ok(WaitStatus::Signaled(_, s, _)) => format!("was killed by {s}"),
        _ => "ended".into(),
    };
    Error::Init(format!("the init process {how} before it was ready"))
}

/// The spec's resources, with an allow rule for every device in linux.devices appended to the
/// device rules (as runc does: a device the container is given is a device it may use).
fn resources_with_devices(spec: &oci_spec::runtime::Spec) -> Option<oci_spec::runtime::LinuxResources> {
    let linux = spec.linux().as_ref()?;
    let mut r = linux.resources().clone()?;
    if let Some(rules) = r.devices_mut() {
        for d in linux.devices().iter().flatten() {
            let mut rule = oci_spec::runtime::LinuxDeviceCgroup::default();
            rule.set_allow(true);
            rule.set_typ(Some(d.typ()));
            rule.set_major(Some(d.major()));
            rule.set_minor(Some(d.minor()));
            rule.set_access(Some("rwm".into()));
            rules.push(rule);
        }
    }
    Some(r)
}

/// Put `pid` into every directory of the cgroup.
fn join_cgroup(cg: Option<&dyn CgroupManager>, pid: Pid) -> Result<()> {
    for p in cg.map(|c| c.procs_files()).unwrap_or_default() {
        fs::write(&p, pid.as_raw().to_string())
            .map_err(|e| Error::Cgroup { path: p.clone(), msg: format!("adding pid {pid}: {e}") })?;
    }
    Ok(())
}

/// Clone the init (joining a pid namespace by path around the clone) and return its pid and the
/// runtime's end of the sync socket.
fn spawn(plan: &mut Plan, start: StartWait, console: Option<OwnedFd>) -> Result<(Pid, OwnedFd)> {
    let (parent, child) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(sys("socketpair"))?;
    let own_pidns = match &plan.pid_join {
        Some(fd) => {
            let own = fs::File::open("/proc/self/ns/pid").map_err(io("/proc/self/ns/pid"))?;
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWPID).map_err(sys("joining the pid namespace"))?;
            Some(own)
        }
        None => None,
    };
    let forked = crate::sys::clone_process(plan.clone_flags.bits());
    if let Some(own) = own_pidns {
        let _ = nix::sched::setns(&own, nix::sched::CloneFlags::CLONE_NEWPID);
    }
    match forked.map_err(sys("clone (namespaces in linux.namespaces)"))? {
        crate::sys::Forked::Child => {
            let fds = ChildFds { sock: child, parent_end: parent.as_raw_fd(), start, console };
            init::run(plan, fds)
        }
        crate::sys::Forked::Parent(pid) => Ok((pid, parent)),
    }
}

/// Receive a sync message, and the terminal master if one comes with it.
fn recv_with_fd(sock: &OwnedFd) -> Result<(Option<Msg>, Option<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut buf = [0u8; 16];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    loop {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(r) => {
                let mut fd = None;
                for c in r.cmsgs().map_err(sys("sync message"))? {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        // SAFETY: the kernel just installed these descriptors in this process.
                        fd = fds.first().map(|f| unsafe { OwnedFd::from_raw_fd(*f) });
                    }
                }
                let n = r.bytes;
                if fd.is_some() {
                    return Ok((None, fd));
                }
                if n == 0 {
                    return Ok((None, None));
                }
                return Ok((Some(Msg::decode(&buf)), None));
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::Sys { what: "reading from the init".into(), source: e }),
        }
    }
}

/// Let the init exec and learn whether the exec worked (EOF: the socket closed on exec).
fn release(sock: &OwnedFd, labels: &[String]) -> Result<()> {
    init::send(sock.as_fd(), Msg { tag: MSG_GO, step: 0, label: 0, value: 0 }).map_err(sys("starting the process"))?;
    match recv_with_fd(sock)? {
        (Some(m), _) if m.tag == MSG_ERROR => Err(plan::describe_failure(labels, m.step, m.label, m.value)),
        _ => Ok(()),
    }
}

/// Wait for `pid` and turn its end into a shell-style exit code.
fn wait_exit(pid: Pid) -> Result<i32> {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, c)) => return Ok(c),
            Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::Sys { what: format!("waiting for {pid}"), source: e }),
        }
    }
}

/// Write uid_map and gid_map of a new user namespace (setgroups denied first when not root).
fn write_id_maps(pid: Pid, spec: &oci_spec::runtime::Spec) -> Result<()> {
    let linux = spec.linux().as_ref();
    let fmt = |m: Option<&Vec<oci_spec::runtime::LinuxIdMapping>>| {
        m.into_iter()
            .flatten()
            .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
            .collect::<String>()
    };
    let uid = fmt(linux.and_then(|l| l.uid_mappings().as_ref()));
    let gid = fmt(linux.and_then(|l| l.gid_mappings().as_ref()));
    if !nix::unistd::geteuid().is_root() {
        fs::write(format!("/proc/{pid}/setgroups"), "deny").map_err(io("writing setgroups"))?;
    }
    fs::write(format!("/proc/{pid}/uid_map"), uid).map_err(io("linux.uidMappings: writing uid_map"))?;
    fs::write(format!("/proc/{pid}/gid_map"), gid).map_err(io("linux.gidMappings: writing gid_map"))?;
    Ok(())
}

impl Container {
    /// Container id.
    pub fn id(&self) -> &str {
        &self.record.state.id
    }

    /// Pid of the init (as seen from the runtime).
    pub fn pid(&self) -> i32 {
        self.record.state.pid
    }

    /// The spec the container was created with.
    pub fn spec(&self) -> &oci_spec::runtime::Spec {
        &self.record.spec
    }

    fn cgroup(&self) -> Result<Option<Box<dyn CgroupManager>>> {
        if !self.record.cgroup_enabled {
            return Ok(None);
        }
        cgroups::manager(&self.record.cgroup_driver, self.record.cgroup_path.as_deref(), self.id())
    }

    fn init_alive(&self) -> bool {
        self.pid() > 0 && state::process_start(self.pid()) == Some(self.record.init_start)
    }

    /// Current status, checked against the live process and the freezer.
    pub fn status(&self) -> Status {
        if !self.init_alive() {
            return Status::Stopped;
        }
        match self.record.state.status {
            Status::Running if self.cgroup().ok().flatten().is_some_and(|c| c.frozen().unwrap_or(false)) => {
                Status::Paused
            }
            s => s,
        }
    }

    /// The OCI state document.
    pub fn state(&self) -> Result<State> {
        let mut s = self.record.state.clone();
        s.status = self.status();
        if s.status == Status::Stopped {
            s.pid = 0;
        }
        Ok(s)
    }

    fn state_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(&self.state()?).map_err(|e| Error::Io { what: "state".into(), source: e.into() })
    }

    fn wrong(&self, status: Status, op: &str) -> Error {
        Error::WrongStatus { id: self.id().to_string(), status: status.to_string(), op: op.to_string() }
    }

    /// Let a created container's process run (the exec FIFO wakes the init).
    pub fn start(&mut self) -> Result<()> {
        let st = self.status();
        if st != Status::Created {
            return Err(self.wrong(st, "start (only a created container can start)"));
        }
        let fifo = self.dir.join("exec.fifo");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&fifo)
            .map_err(|e| Error::Init(format!("the init is not waiting on {}: {e}", fifo.display())))?;
        std::io::Write::write_all(&mut f, b"0").map_err(io("waking the init"))?;
        drop(f);
        let _ = fs::remove_file(&fifo);
        self.record.state.status = Status::Running;
        self.record.save(&self.dir)?;
        let hooks = self.record.spec.hooks().as_ref().and_then(|h| h.poststart().clone()).unwrap_or_default();
        if let Err(e) = hooks::run(&hooks, &self.state_json()?, "poststart") {
            tracing::warn!("{e}");
        }
        Ok(())
    }

    /// Send `signal` to the init, or with `all` to every process of the container's cgroup.
    pub fn kill(&self, signal: Signal, all: bool) -> Result<()> {
        let st = self.status();
        if st == Status::Stopped {
            return Err(self.wrong(st, "kill (it is not running)"));
        }
        if all {
            if let Some(cg) = self.cgroup()? {
                for p in cg.pids()? {
                    let _ = nix::sys::signal::kill(Pid::from_raw(p), signal);
                }
                return Ok(());
            }
        }
        nix::sys::signal::kill(Pid::from_raw(self.pid()), signal).map_err(sys(format!("kill {}", self.pid())))
    }

    /// Remove the container: with `force` a live one is killed first. Runs poststop hooks.
    pub fn delete(self, force: bool) -> Result<()> {
        let st = self.status();
        if matches!(st, Status::Running | Status::Paused) && !force {
            return Err(self.wrong(st, "delete (stop it first, or use --force)"));
        }
        let cg = self.cgroup()?;
        if st != Status::Stopped || cg.as_ref().is_some_and(|c| c.pids().is_ok_and(|p| !p.is_empty())) {
            if let Some(cg) = &cg {
                for p in cg.pids().unwrap_or_default() {
                    let _ = nix::sys::signal::kill(Pid::from_raw(p), Signal::SIGKILL);
                }
                if st == Status::Paused {
                    let _ = cg.freeze(false);
                }
            }
            if self.init_alive() {
                let _ = nix::sys::signal::kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while (self.init_alive() || cg.as_ref().is_some_and(|c| c.pids().is_ok_and(|p| !p.is_empty())))
                && Instant::now() < deadline
            {
                // Our own child (a `run` or a test): reap it, or it stays a zombie in the cgroup.
                let _ = waitpid(Pid::from_raw(self.pid()), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        if let Some(cg) = &cg {
            cg.destroy()?;
        }
        let hooks = self.record.spec.hooks().as_ref().and_then(|h| h.poststop().clone()).unwrap_or_default();
        let mut st = self.record.state.clone();
        st.status = Status::Stopped;
        if let Ok(json) = serde_json::to_vec(&st) {
            if let Err(e) = hooks::run(&hooks, &json, "poststop") {
                tracing::warn!("{e}");
            }
        }
        fs::remove_dir_all(&self.dir).map_err(io(format!("removing {}", self.dir.display())))
    }

    /// Pids of the container's processes (from its cgroup; the init alone without one).
    pub fn ps(&self) -> Result<Vec<i32>> {
        match self.cgroup()? {
            Some(cg) => cg.pids(),
            None => Ok(if self.init_alive() { vec![self.pid()] } else { Vec::new() }),
        }
    }

    /// Freeze every process of the container.
    pub fn pause(&self) -> Result<()> {
        let st = self.status();
        if st != Status::Running {
            return Err(self.wrong(st, "pause"));
        }
        self.cgroup()?.ok_or_else(|| self.wrong(st, "pause without a cgroup"))?.freeze(true)
    }

    /// Thaw a paused container.
    pub fn resume(&self) -> Result<()> {
        let st = self.status();
        if st != Status::Paused {
            return Err(self.wrong(st, "resume"));
        }
        self.cgroup()?.ok_or_else(|| self.wrong(st, "resume without a cgroup"))?.freeze(false)
    }

    /// CPU, memory and pids figures of the container's cgroup.
    pub fn stats(&self) -> Result<Stats> {
        match self.cgroup()? {
            Some(cg) => cg.stats(),
            None => Ok(Stats::default()),
        }
    }

    /// Run `process` in the running container's namespaces and cgroup. Returns the exit code,
    /// or with `detach` the new process's pid once it runs.
    pub fn exec(&self, process: &Process, opts: &ExecOptions) -> Result<i32> {
        let st = self.status();
        if !matches!(st, Status::Running | Status::Created) {
            return Err(self.wrong(st, "exec"));
        }
        if crate::sys::thread_count() > 1 {
            return Err(crate::error::config(
                "runtime",
                "exec clones the calling process and needs it single-threaded",
            ));
        }
        let input = PlanInput {
            spec: &self.record.spec,
            bundle: &self.record.state.bundle,
            rootfs: &self.record.state.rootfs,
            no_pivot: false,
            cgroup_v1_mounts: &[],
            cgroup_v2: false,
            full: false,
        };
        let mut plan = plan::build(&input, process, None)?;
        if plan.proc.terminal && opts.console_socket.is_none() && opts.detach {
            return Err(crate::error::config(
                "process.terminal",
                "a detached exec with a terminal needs --console-socket",
            ));
        }
        let pid = self.pid();
        let mut user = Vec::new();
        let mut others = Vec::new();
        let mut mnt = None;
        for ns in self.record.spec.linux().as_ref().and_then(|l| l.namespaces().as_ref()).into_iter().flatten() {
            let name = match ns.typ() {
                LinuxNamespaceType::Mount => "mnt",
                LinuxNamespaceType::Cgroup => "cgroup",
                LinuxNamespaceType::Uts => "uts",
                LinuxNamespaceType::Ipc => "ipc",
                LinuxNamespaceType::User => "user",
                LinuxNamespaceType::Pid => "pid",
                LinuxNamespaceType::Network => "net",
                LinuxNamespaceType::Time => "time",
            };
            let Some(flag) = plan::ns_flag(ns.typ()) else { continue };
            let path = format!("/proc/{pid}/ns/{name}");
            let fd = OwnedFd::from(fs::File::open(&path).map_err(io(path.clone()))?);
            let join = plan::Join { fd, kind: flag };
            match ns.typ() {
                LinuxNamespaceType::Pid => plan.pid_join = Some(join.fd),
                LinuxNamespaceType::User => user.push(join),
                LinuxNamespaceType::Mount => mnt = Some(join),
                _ => others.push(join),
            }
        }
        plan.joins = user.into_iter().chain(others).chain(mnt).collect();
        let console = match &opts.console_socket {
            Some(p) => Some(OwnedFd::from(
                std::os::unix::net::UnixStream::connect(p).map_err(io(format!("--console-socket {}", p.display())))?,
            )),
            None => None,
        };
        let cg = self.cgroup()?;
        let (child, sock) = spawn(&mut plan, StartWait::Socket, console)?;
        let mut guard = Cleanup { dir: None, cgroup: None, pid: Some(child) };
        join_cgroup(cg.as_deref(), child)?;
        init::send(sock.as_fd(), Msg { tag: MSG_GO, step: 0, label: 0, value: child.as_raw() })
            .map_err(sys("sync with the process"))?;
        let mut relay = None;
        loop {
            match recv_with_fd(&sock)? {
                (_, Some(fd)) => relay = Some(crate::console::Relay::start(fd)),
                (None, None) => return Err(init_died(child)),
                (Some(m), _) if m.tag == MSG_READY => break,
                (Some(m), _) if m.tag == MSG_ERROR => {
                    return Err(plan::describe_failure(&plan.labels, m.step, m.label, m.value))
                }
                (Some(m), _) => return Err(Error::Init(format!("unexpected message {}", m.tag))),
            }
        }
        release(&sock, &plan.labels)?;
        guard.pid = None;
        if let Some(p) = &opts.pid_file {
            state::write_atomic(p, child.as_raw().to_string().as_bytes())?;
        }
        if opts.detach {
            return Ok(child.as_raw());
        }
        crate::sys::forward_signals(child);
        let code = wait_exit(child);
        crate::sys::stop_forwarding();
        drop(relay);
        code
    }
}
