//! [`Manager`]: the instance lifecycle over the store and the drivers, and the repair of
//! operations a crash left half done ([`Manager::reconcile`], run by [`Manager::open`]).

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use isla_container::Signal;
use serde::Serialize;

use crate::container::ContainerDriver;
use crate::driver::{wait_until, Driver, Env, ExecOutput, ExecRequest, Stats};
use crate::error::{io, sys, Error, Result};
use crate::microvm::MicrovmDriver;
use crate::model::{Instance, InstanceSpec, Kind, Status};
use crate::proc::{crash_point, new_id, now_rfc3339, Owner};
use crate::store::{Intent, Record, Store};
use crate::vm::VmDriver;

/// The default root: database, instances, images, networks and runtime state below it.
pub const DEFAULT_ROOT: &str = "/var/lib/isla";
/// The network instances join when none is given (NAT, made on first use).
pub const DEFAULT_NETWORK: &str = "isla0";

static CONTAINER: ContainerDriver = ContainerDriver;
static MICROVM: MicrovmDriver = MicrovmDriver;
static VM: VmDriver = VmDriver;

/// The driver of `kind`.
pub fn driver(kind: Kind) -> Result<&'static dyn Driver> {
    match kind {
        Kind::Container => Ok(&CONTAINER),
        Kind::Microvm => Ok(&MICROVM),
        Kind::Vm => Ok(&VM),
    }
}

/// What [`Manager::reconcile`] repaired.
#[derive(Debug, Default, Serialize)]
pub struct ReconcileReport {
    /// Half-created instances rolled back (names).
    pub rolled_back: Vec<String>,
    /// Half-removed instances whose removal was finished.
    pub removed: Vec<String>,
    /// Instances whose supervisor vanished, now `dead` with their resources released.
    pub dead: Vec<String>,
    /// Repairs that failed (retried at the next open).
    pub failed: Vec<String>,
}

/// A started instance; for an attached start, [`Started::wait`] gives the exit code.
pub struct Started {
    /// The instance as it was when it started.
    pub instance: Instance,
    child: Child,
}

impl Started {
    /// Waits for the supervisor of an attached start: the instance's exit code. SIGINT,
    /// SIGTERM, SIGHUP and SIGQUIT sent to this process meanwhile are passed on to the
    /// supervisor, which passes them to the instance (Docker's sig-proxy).
    pub fn wait(mut self) -> Result<i32> {
        crate::sig::catch_forwarded()?;
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let st = loop {
            if let Some(s) = crate::sig::take() {
                let _ = nix::sys::signal::kill(pid, s);
            }
            match self.child.try_wait().map_err(io("waiting for the supervisor"))? {
                Some(st) => break st,
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        Ok(st.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0)))
    }
}

/// Reads the supervisor's one-line report (`ok` or `error: ...`). The supervisor's own exit
/// ends the wait too: the instance's init, cloned before the supervisor writes, holds a copy of
/// the pipe until its exec, so EOF alone cannot be relied on.
fn read_ready(r: std::os::fd::OwnedFd, child: &mut Child) -> Result<String> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut f = fs::File::from(r);
    let mut msg = Vec::new();
    loop {
        let readable = {
            let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(&f), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(100u16)) {
                Ok(n) => n > 0,
                Err(nix::errno::Errno::EINTR) => false,
                Err(e) => return Err(sys("waiting for the supervisor")(e)),
            }
        };
        if readable {
            let mut buf = [0u8; 4096];
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    msg.extend_from_slice(&buf[..n]);
                    if msg.ends_with(b"\n") {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io("reading the supervisor's report")(e)),
            }
        } else if child.try_wait().map_err(io("waiting for the supervisor"))?.is_some() {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&msg).into_owned())
}

/// The instance manager of one root.
pub struct Manager {
    env: Env,
    store: Store,
}

impl Manager {
    /// Opens the manager at `root` (created if missing) and repairs what crashed operations
    /// left ([`Manager::reconcile`]). Helper processes run the current executable.
    pub fn open(root: &Path) -> Result<Manager> {
        let helper = std::env::current_exe().map_err(io("finding the isla executable"))?;
        let m = Manager::open_with_helper(root, helper)?;
        m.reconcile()?;
        Ok(m)
    }

    /// Opens without repairing anything, with `helper` as the `isla` binary (supervisors and
    /// `isla runtime exec` run it).
    pub fn open_with_helper(root: &Path, helper: PathBuf) -> Result<Manager> {
        // Logs, bundles and the database are root's business only.
        for d in [root.to_path_buf(), root.join("instances")] {
            std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700)
                .create(&d)
                .map_err(io(format!("creating {}", d.display())))?;
        }
        let images = isla_image::Store::open(root.join("images"))?;
        let store = Store::open(root)?;
        Ok(Manager { env: Env { root: root.to_path_buf(), images, helper }, store })
    }

    /// Paths and stores the drivers use.
    pub fn env(&self) -> &Env {
        &self.env
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Creates an instance (not started). On any error nothing of it remains.
    /// Without a name, the instance is named `i-` and the first 10 digits of its id.
    pub fn create(&self, mut spec: InstanceSpec) -> Result<Instance> {
        let id = new_id()?;
        if spec.name.is_empty() {
            spec.name = format!("i-{}", &id[..10]);
        }
        for v in &mut spec.volumes {
            if let Some(n) = &v.name {
                crate::model::check_volume_name(n)?;
                v.host = self.env.volume_data(n);
            }
        }
        spec.validate()?;
        let d = driver(spec.kind)?;
        d.check(&self.env, &spec)?;
        let inst = Instance {
            log_path: self.env.instance_dir(&id).join("log"),
            id,
            spec,
            status: Status::Created,
            exit_code: None,
            pid: None,
            pid_start: None,
            supervisor_pid: None,
            created: now_rfc3339(),
            started: None,
            finished: None,
            restart_count: 0,
            attachment: None,
            error: None,
        };
        self.store.insert_creating(&inst, Owner::current())?;
        crash_point("create:recorded");
        let dir = self.env.instance_dir(&inst.id);
        let made = fs::create_dir(&dir)
            .map_err(io(format!("creating {}", dir.display())))
            .and_then(|()| d.create(&self.env, &inst))
            .and_then(|()| {
                crash_point("create:prepared");
                self.store.set_intent(&inst.id, None)
            });
        if let Err(e) = made {
            if let Err(e2) = d.remove(&self.env, &inst) {
                tracing::warn!("rolling back {}: {e2}", inst.spec.name);
            }
            self.store.delete(&inst.id)?;
            return Err(e);
        }
        Ok(inst)
    }

    /// Starts an instance through a new supervisor process. Detached (`attach == false`) the
    /// supervisor leaves the caller's session and writes output only to the log; attached it
    /// also copies the output to the caller's stdout/stderr and [`Started::wait`] returns the
    /// exit code. Returns once the instance runs (or with the reason it could not start).
    pub fn start(&self, what: &str, attach: bool) -> Result<Started> {
        let rec = self.store.find(what)?;
        let inst = &rec.instance;
        self.check_idle(&rec, "it is running already")?;
        driver(inst.spec.kind)?;
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
        nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty())).map_err(sys("fcntl"))?;
        let mut cmd = Command::new(&self.env.helper);
        cmd.arg("__supervise").arg("--root").arg(&self.env.root);
        cmd.arg("--ready-fd").arg(w.as_raw_fd().to_string());
        if attach {
            cmd.arg("--attach");
        } else {
            let log = self.env.instance_dir(&inst.id).join("supervisor.log");
            let f =
                fs::OpenOptions::new().create(true).append(true).open(&log).map_err(io(log.display().to_string()))?;
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(f);
        }
        cmd.arg(&inst.id);
        let mut child = cmd.spawn().map_err(io(format!("starting {} __supervise", self.env.helper.display())))?;
        drop(w);
        let msg = read_ready(r, &mut child)?;
        let fail = |msg: String| Error::Supervisor { name: inst.spec.name.clone(), msg };
        match msg.trim_end() {
            "ok" => Ok(Started { instance: self.store.find(&inst.id)?.instance, child }),
            m if m.starts_with("error: ") => {
                let _ = child.wait();
                Err(fail(m["error: ".len()..].to_string()))
            }
            _ => {
                let st = child.wait().map_err(io("waiting for the supervisor"))?;
                Err(fail(format!(
                    "its supervisor ended ({st}) before the instance started; see {}",
                    self.env.instance_dir(&inst.id).join("supervisor.log").display()
                )))
            }
        }
    }

    /// Creates and starts; if the start fails, the new instance is removed again.
    pub fn run(&self, spec: InstanceSpec, attach: bool) -> Result<Started> {
        let inst = self.create(spec)?;
        match self.start(&inst.id, attach) {
            Ok(s) => Ok(s),
            Err(e) => {
                if let Ok(rec) = self.store.find(&inst.id) {
                    if let Err(e2) = self.remove_record(&rec) {
                        tracing::warn!("removing {} after a failed start: {e2}", inst.spec.name);
                    }
                }
                Err(e)
            }
        }
    }

    fn check_idle(&self, rec: &Record, msg: &str) -> Result<()> {
        let inst = &rec.instance;
        if let Some((intent, o)) = rec.intent {
            if o.alive() {
                let what = if intent == Intent::Creating { "being created" } else { "being removed" };
                return Err(self.state_err(inst, &format!("{what} by process {}", o.pid)));
            }
        }
        if rec.supervisor.is_some_and(|s| s.alive()) {
            return Err(self.state_err(inst, msg));
        }
        Ok(())
    }

    fn state_err(&self, inst: &Instance, msg: &str) -> Error {
        Error::State { name: inst.spec.name.clone(), status: inst.status.to_string(), msg: msg.to_string() }
    }

    /// Waits until no live supervisor holds `id` (or the row is gone).
    fn wait_supervisor_gone(&self, id: &str, timeout: Duration) -> bool {
        wait_until(timeout, || match self.store.get(id) {
            Ok(Some(r)) => !r.supervisor.is_some_and(|s| s.alive()),
            _ => true,
        })
    }

    /// Stops a running instance (SIGTERM, SIGKILL after `timeout`); the restart policy does
    /// not apply. Stopping a stopped instance is not an error.
    pub fn stop(&self, what: &str, timeout: Duration) -> Result<Instance> {
        let rec = self.store.find(what)?;
        let inst = &rec.instance;
        if rec.supervisor.is_some_and(|s| s.alive()) {
            self.store.request_stop(&inst.id)?;
            driver(inst.spec.kind)?.stop(&self.env, inst, timeout)?;
            if !self.wait_supervisor_gone(&inst.id, Duration::from_secs(20)) {
                return Err(Error::Supervisor {
                    name: inst.spec.name.clone(),
                    msg: "the instance ended but its supervisor did not finish within 20 s".into(),
                });
            }
        }
        match self.store.get(&inst.id)? {
            Some(r) => Ok(r.instance),
            None => Ok(inst.clone()),
        }
    }

    /// Stops (if running) and starts again, detached.
    pub fn restart(&self, what: &str, timeout: Duration) -> Result<Started> {
        let inst = self.stop(what, timeout)?;
        self.start(&inst.id, false)
    }

    /// Sends `signal` to the instance's main process. SIGKILL, SIGTERM and SIGINT count as a
    /// user stop (no restart by the policy); after SIGKILL this returns once the supervisor has
    /// recorded the end.
    pub fn kill(&self, what: &str, signal: Signal) -> Result<()> {
        let rec = self.store.find(what)?;
        if !rec.supervisor.is_some_and(|s| s.alive()) {
            return Err(self.state_err(&rec.instance, "it is not running"));
        }
        if matches!(signal, Signal::SIGKILL | Signal::SIGTERM | Signal::SIGINT) {
            self.store.request_stop(&rec.instance.id)?;
        }
        driver(rec.instance.spec.kind)?.kill(&self.env, &rec.instance, signal)?;
        if signal == Signal::SIGKILL && !self.wait_supervisor_gone(&rec.instance.id, Duration::from_secs(20)) {
            return Err(Error::Supervisor {
                name: rec.instance.spec.name.clone(),
                msg: "killed, but its supervisor did not finish within 20 s".into(),
            });
        }
        Ok(())
    }

    /// Freezes a running instance.
    pub fn pause(&self, what: &str) -> Result<Instance> {
        let rec = self.store.find(what)?;
        if rec.instance.status != Status::Running {
            return Err(self.state_err(&rec.instance, "only a running instance can be paused"));
        }
        driver(rec.instance.spec.kind)?.pause(&self.env, &rec.instance)?;
        self.store.set_status(&rec.instance.id, Status::Paused, None, None)?;
        Ok(self.store.find(&rec.instance.id)?.instance)
    }

    /// Thaws a paused instance.
    pub fn resume(&self, what: &str) -> Result<Instance> {
        let rec = self.store.find(what)?;
        if rec.instance.status != Status::Paused {
            return Err(self.state_err(&rec.instance, "only a paused instance can be resumed"));
        }
        driver(rec.instance.spec.kind)?.resume(&self.env, &rec.instance)?;
        self.store.set_status(&rec.instance.id, Status::Running, None, None)?;
        Ok(self.store.find(&rec.instance.id)?.instance)
    }

    /// Removes an instance and everything it holds. A running one needs `force` (it is killed).
    pub fn remove(&self, what: &str, force: bool) -> Result<Instance> {
        let rec = self.store.find(what)?;
        let inst = rec.instance.clone();
        if let Some((_, o)) = rec.intent.filter(|(_, o)| o.alive()) {
            return Err(self.state_err(&inst, &format!("another isla process ({}) is working on it", o.pid)));
        }
        if rec.supervisor.is_some_and(|s| s.alive()) {
            if !force {
                return Err(self.state_err(&inst, "stop it first, or remove it with --force"));
            }
            self.stop(&inst.id, Duration::ZERO)?;
        }
        // An --rm instance removes itself when it ends.
        if let Some(rec) = self.store.get(&inst.id)? {
            self.remove_record(&rec)?;
        }
        Ok(inst)
    }

    /// The removal steps, behind a `removing` intent.
    pub(crate) fn remove_record(&self, rec: &Record) -> Result<()> {
        let inst = &rec.instance;
        self.store.set_intent(&inst.id, Some((Intent::Removing, Owner::current())))?;
        crash_point("remove:marked");
        driver(inst.spec.kind)?.remove(&self.env, inst)?;
        crash_point("remove:released");
        self.store.delete(&inst.id)
    }

    /// Instances, oldest first: with `all`, every one; otherwise the running and paused ones.
    /// Instances being created or removed are left out.
    pub fn list(&self, all: bool) -> Result<Vec<Instance>> {
        Ok(self
            .store
            .list()?
            .into_iter()
            .filter(|r| r.intent.is_none() && (all || r.instance.status.is_active()))
            .map(|r| r.instance)
            .collect())
    }

    /// One instance by name, id or id prefix.
    pub fn get(&self, what: &str) -> Result<Instance> {
        Ok(self.store.find(what)?.instance)
    }

    /// The log records of an instance (the last `tail` lines with `Some`).
    pub fn logs(&self, what: &str, tail: Option<usize>) -> Result<Vec<crate::logs::Record>> {
        let inst = self.get(what)?;
        crate::logs::read(&driver(inst.spec.kind)?.logs(&inst), tail)
    }

    /// The log records written after byte `offset`, up to the last complete line, and the
    /// offset to continue from (`logs --follow`; see [`crate::logs::read_from`]).
    pub fn logs_from(&self, what: &str, offset: u64) -> Result<(Vec<crate::logs::Record>, u64)> {
        let inst = self.get(what)?;
        crate::logs::read_from(&driver(inst.spec.kind)?.logs(&inst), offset)
    }

    /// Runs a command in a running instance with this process's stdio; its exit code.
    pub fn exec(&self, what: &str, req: &ExecRequest) -> Result<i32> {
        let inst = self.exec_target(what, req)?;
        driver(inst.spec.kind)?.exec(&self.env, &inst, req)
    }

    /// Runs a command in a running instance; its output and exit code.
    pub fn exec_output(&self, what: &str, req: &ExecRequest) -> Result<ExecOutput> {
        let inst = self.exec_target(what, req)?;
        driver(inst.spec.kind)?.exec_output(&self.env, &inst, req)
    }

    fn exec_target(&self, what: &str, req: &ExecRequest) -> Result<Instance> {
        let inst = self.get(what)?;
        if inst.status != Status::Running {
            return Err(self.state_err(&inst, "exec needs a running instance"));
        }
        if req.args.is_empty() {
            return Err(Error::invalid("exec", "give a command to run"));
        }
        Ok(inst)
    }

    /// Resource use of a running instance.
    pub fn stats(&self, what: &str) -> Result<(Instance, Stats)> {
        let inst = self.get(what)?;
        let s = driver(inst.spec.kind)?.stats(&self.env, &inst)?;
        Ok((inst, s))
    }

    /// Repairs what crashed processes left: half-created instances are rolled back, half-removed
    /// ones removed, and instances whose supervisor died are released and marked `dead`. Only
    /// operations whose owner process is gone are touched, so concurrent commands are safe.
    pub fn reconcile(&self) -> Result<ReconcileReport> {
        let lock_path = self.env.root.join("reconcile.lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(lock_path.display().to_string()))?;
        let _lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| sys(format!("locking {}", lock_path.display()))(e))?;
        let mut rep = ReconcileReport::default();
        for listed in self.store.list()? {
            // Liveness first, then the row again: a process found dead cannot change the row
            // any more, so if the row still names it, it died without finishing. (Reading the
            // row first would race with an owner that finishes and exits in between.)
            let dead_intent = listed.intent.filter(|(_, o)| !o.alive());
            let dead_sup = listed.supervisor.filter(|s| !s.alive());
            if dead_intent.is_none() && dead_sup.is_none() {
                continue;
            }
            let Some(rec) = self.store.get(&listed.instance.id)? else { continue };
            let inst = &rec.instance;
            let name = inst.spec.name.clone();
            let result = match (rec.intent, rec.supervisor) {
                (Some(i), _) if Some(i) == dead_intent => {
                    if i.0 == Intent::Creating {
                        rep.rolled_back.push(name.clone());
                    } else {
                        rep.removed.push(name.clone());
                    }
                    driver(inst.spec.kind)
                        .and_then(|d| d.remove(&self.env, inst))
                        .and_then(|()| self.store.delete(&inst.id))
                }
                (None, Some(s)) if Some(s) == dead_sup => {
                    rep.dead.push(name.clone());
                    driver(inst.spec.kind).and_then(|d| d.release(&self.env, inst)).and_then(|()| {
                        let msg = "its supervisor ended without recording the exit (killed?); resources released";
                        self.store.set_ended(&inst.id, Status::Dead, None, &now_rfc3339(), Some(msg))?;
                        self.store.release_supervisor(&inst.id)
                    })
                }
                _ => Ok(()),
            };
            if let Err(e) = result {
                tracing::warn!("repairing instance {name}: {e}");
                rep.failed.push(format!("{name}: {e}"));
            }
        }
        Ok(rep)
    }
}
