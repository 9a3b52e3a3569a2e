//! The `Vm` handle: one VM directory, its QEMU process and its lifecycle.

use std::fmt;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cmdline::qemu_args;
use crate::config::{check_name, qemu_binary, random_mac, DiskFormat, NicConfig, QemuConfig, ResolvedAccel};
use crate::error::{QemuError, Result};
use crate::process;
use crate::qmp::{Qmp, RunStatus};

/// Timeout of each QMP call isla makes (savevm of a large guest can take longer: see
/// [`SNAPSHOT_TIMEOUT`]).
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of savevm/loadvm/delvm: they copy guest RAM into or out of the qcow2 file.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `start` waits for QEMU's monitor to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `shutdown` waits after `quit` before killing.
const QUIT_GRACE: Duration = Duration::from_secs(5);

/// The files of a VM directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub dir: PathBuf,
    /// The configuration (written by isla).
    pub config: PathBuf,
    /// QMP monitor socket (QEMU removes it when it exits cleanly).
    pub qmp: PathBuf,
    /// QEMU's pid file (QEMU writes, locks, and removes it when it exits cleanly).
    pub pid: PathBuf,
    /// QEMU's standard output and error.
    pub qemu_log: PathBuf,
    pub serial_log: PathBuf,
    pub serial_sock: PathBuf,
    pub vnc_sock: PathBuf,
    /// How the last QEMU process ended, when isla saw it end.
    pub exit: PathBuf,
}

impl VmPaths {
    pub fn new(dir: &Path) -> Self {
        let f = |n: &str| dir.join(n);
        VmPaths {
            dir: dir.to_path_buf(),
            config: f("config.json"),
            qmp: f("qmp.sock"),
            pid: f("qemu.pid"),
            qemu_log: f("qemu.log"),
            serial_log: f("serial.log"),
            serial_sock: f("serial.sock"),
            vnc_sock: f("vnc.sock"),
            exit: f("exit.json"),
        }
    }
}

/// What a VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// QEMU runs and so do the vCPUs.
    Running,
    /// QEMU runs, the vCPUs are stopped (paused, or saving/restoring a snapshot).
    Paused,
    /// No QEMU process: never started, powered off, or stopped by isla.
    Shutoff,
    /// QEMU died without cleaning up, exited with an error, or stopped on a KVM internal error
    /// or a guest panic.
    Crashed,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutoff => "shut off",
            VmState::Crashed => "crashed",
        })
    }
}

/// [`Vm::status`]'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub state: VmState,
    /// QEMU's pid while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// QEMU's own run state (`query-status`) while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_status: Option<String>,
    /// Why it is crashed or how it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// How the last QEMU process ended (`exit.json`), recorded by whichever isla process saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ExitRecord {
    code: Option<i32>,
    signal: Option<i32>,
    /// isla stopped it on purpose (kill, or quit after a shutdown timeout).
    by_isla: bool,
}

impl ExitRecord {
    fn from_status(s: ExitStatus, by_isla: bool) -> Self {
        ExitRecord { code: s.code(), signal: s.signal(), by_isla }
    }

    fn crashed(&self) -> bool {
        !self.by_isla && self.code != Some(0)
    }

    fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(0), _) => "QEMU exited normally".into(),
            (Some(1), _) => "QEMU exited with status 1 (a guest panic, or an error: see qemu.log)".into(),
            (Some(c), _) => format!("QEMU exited with status {c} (see qemu.log)"),
            (None, Some(s)) => format!("QEMU was killed by signal {s}"),
            (None, None) => "QEMU ended".into(),
        }
    }
}

/// How [`Vm::shutdown`] ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownOutcome {
    /// It was not running.
    AlreadyOff,
    /// The guest powered off after the ACPI power button.
    Acpi,
    /// The guest did not react in time; QEMU was told to quit.
    Quit,
    /// QEMU did not quit either and was killed.
    Killed,
}

/// An internal snapshot (disks, and with `vm_state_size > 0` RAM and devices too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    /// Bytes of saved RAM and device state: 0 for a disk-only snapshot taken while shut off.
    pub vm_state_size: u64,
    /// When it was taken (seconds since the epoch).
    pub date_sec: u64,
}

/// What [`Vm::start`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartInfo {
    pub pid: u32,
    pub accel: ResolvedAccel,
    /// Why this accelerator.
    pub accel_reason: String,
    pub cpu_model: String,
    pub qemu_version: Option<String>,
}

/// A full VM kept in a directory (`config.json`, `qmp.sock`, `qemu.pid`, `serial.log`,
/// `qemu.log`). Any isla process can open the directory again and drive a running VM: the
/// pid file and the QMP socket are the state, not this handle.
pub struct Vm {
    paths: VmPaths,
    config: QemuConfig,
    /// The QEMU process when this handle started it (reaped by `status`, or by a thread when
    /// the handle is dropped).
    child: Option<Child>,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm").field("dir", &self.paths.dir).field("name", &self.config.name).finish()
    }
}

impl Vm {
    /// Creates a VM directory with `config.json`: validates the configuration, records each
    /// disk's format (detected when not given) and gives every NIC without a MAC a random one.
    /// Refuses a directory that already holds a VM.
    pub fn create(dir: &Path, mut config: QemuConfig) -> Result<Vm> {
        config.validate()?;
        for d in &mut config.disks {
            if d.format.is_none() {
                d.format = Some(isla_disk::detect(&d.path)?.into());
            }
        }
        for n in &mut config.nics {
            if n.mac().is_none() {
                n.set_mac(random_mac()?);
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| QemuError::io(dir, "create VM directory", e))?;
        let paths = VmPaths::new(dir);
        if paths.config.exists() {
            return Err(QemuError::config(
                "dir",
                format!("{} already holds a VM; choose another directory or delete that VM", dir.display()),
            ));
        }
        let vm = Vm { paths, config, child: None };
        vm.save_config()?;
        Ok(vm)
    }

    /// Opens an existing VM directory (after a restart of the manager, say).
    pub fn open(dir: &Path) -> Result<Vm> {
        let paths = VmPaths::new(dir);
        let text = std::fs::read_to_string(&paths.config).map_err(|e| QemuError::io(&paths.config, "read", e))?;
        let config: QemuConfig = serde_json::from_str(&text)
            .map_err(|e| QemuError::BadStateFile { path: paths.config.clone(), msg: e.to_string() })?;
        Ok(Vm { paths, config, child: None })
    }

    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn paths(&self) -> &VmPaths {
        &self.paths
    }

    /// Writes config.json atomically (temporary file, fsync, rename).
    fn save_config(&self) -> Result<()> {
        write_json(&self.paths.config, &self.config)
    }

    /// Connects to the running VM's monitor.
    pub fn qmp(&self, timeout: Duration) -> Result<Qmp> {
        Qmp::connect(&self.paths.qmp, timeout)
    }

    /// The pid of this VM's live QEMU process, if there is one.
    fn live_pid(&mut self) -> Option<u32> {
        self.reap();
        let pid = process::read_pidfile(&self.paths.pid)?;
        process::is_our_qemu(pid, &self.paths.qmp).then_some(pid)
    }

    /// Collects the exit status of a QEMU process this handle started, if it ended.
    fn reap(&mut self) {
        if let Some(c) = &mut self.child {
            let mut ended = c.try_wait().ok().flatten();
            // QEMU removes its pid file just before it exits: give it a moment to finish, so the
            // exit status is recorded by the time the VM reads as shut off.
            let deadline = Instant::now() + Duration::from_secs(2);
            while ended.is_none() && !self.paths.pid.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
                ended = c.try_wait().ok().flatten();
            }
            if let Some(st) = ended {
                self.child = None;
                let _ = write_json(&self.paths.exit, &ExitRecord::from_status(st, false));
            }
        }
    }

    /// The VM's state, from its QEMU process and QMP `query-status`.
    pub fn status(&mut self) -> Result<VmStatus> {
        let name = self.config.name.clone();
        if let Some(pid) = self.live_pid() {
            let RunStatus { status, .. } = self.qmp(QMP_TIMEOUT)?.query_status()?;
            let (state, detail) = match status.as_str() {
                "running" => (VmState::Running, None),
                "internal-error" => (
                    VmState::Crashed,
                    Some("the accelerator stopped the guest (KVM internal error): see qemu.log".into()),
                ),
                "guest-panicked" => (VmState::Crashed, Some("the guest kernel panicked".into())),
                "shutdown" => (VmState::Shutoff, Some("the guest powered off; QEMU still runs".into())),
                _ => (VmState::Paused, None),
            };
            return Ok(VmStatus { name, state, pid: Some(pid), qemu_status: Some(status), detail });
        }
        if let Some(pid) = process::read_pidfile(&self.paths.pid) {
            // QEMU removes its pid file when it exits normally.
            let detail =
                format!("QEMU (pid {pid}) ended without removing its pid file: it crashed or was killed; see qemu.log");
            return Ok(VmStatus { name, state: VmState::Crashed, pid: None, qemu_status: None, detail: Some(detail) });
        }
        let exit: Option<ExitRecord> =
            std::fs::read_to_string(&self.paths.exit).ok().and_then(|t| serde_json::from_str(&t).ok());
        let (state, detail) = match exit {
            Some(e) if e.crashed() => (VmState::Crashed, Some(e.describe())),
            Some(e) if e.by_isla => (VmState::Shutoff, Some("stopped by isla".into())),
            Some(e) => (VmState::Shutoff, Some(e.describe())),
            None => (VmState::Shutoff, None),
        };
        Ok(VmStatus { name, state, pid: None, qemu_status: None, detail })
    }

    fn wrong_state(&self, state: VmState, msg: impl Into<String>) -> QemuError {
        QemuError::WrongState { name: self.config.name.clone(), state, msg: msg.into() }
    }

    /// Refuses changes to a VM whose disks back linked clones.
    fn check_not_base(&self) -> Result<()> {
        let clones: Vec<String> = self
            .config
            .linked_clones
            .iter()
            .filter(|d| d.join("config.json").exists())
            .map(|d| d.display().to_string())
            .collect();
        if clones.is_empty() {
            return Ok(());
        }
        Err(QemuError::config(
            "linked_clones",
            format!(
                "VM `{}` is the base of linked clone(s) {}: its disks are their backing files and must not change; delete the clones first",
                self.config.name,
                clones.join(", ")
            ),
        ))
    }

    /// Starts QEMU detached from the caller (own process group; standard output and error in
    /// `qemu.log`) and waits until its monitor answers. The accelerator is chosen here (see
    /// [`crate::Accel::resolve`]) and logged.
    pub fn start(&mut self) -> Result<StartInfo> {
        let st = self.status()?;
        if matches!(st.state, VmState::Running | VmState::Paused) || st.pid.is_some() {
            return Err(self.wrong_state(st.state, "it is already started"));
        }
        self.check_not_base()?;
        self.config.validate()?;
        let bin = qemu_binary()?;
        let (accel, reason) = self.config.accel.resolve();
        tracing::info!(vm = %self.config.name, %accel, "accelerator: {accel} ({reason})");
        for p in [&self.paths.pid, &self.paths.qmp, &self.paths.exit, &self.paths.serial_sock, &self.paths.vnc_sock] {
            remove_if_exists(p)?;
        }
        // TAPs are opened here and their descriptors inherited by QEMU (as libvirt does), so a
        // missing TAP is an error now rather than a new device QEMU would create.
        let mut taps = Vec::new();
        for n in &self.config.nics {
            if let NicConfig::Tap { ifname, .. } = n {
                let f = isla_net::open_tap(ifname, true)?;
                rustix::io::fcntl_setfd(&f, rustix::io::FdFlags::empty())
                    .map_err(|e| QemuError::io(format!("/dev/net/tun ({ifname})"), "clear close-on-exec", e.into()))?;
                taps.push(f);
            }
        }
        let fds: Vec<_> = taps.iter().map(|f| f.as_raw_fd()).collect();
        let args = qemu_args(&self.config, &self.paths, accel, &fds);
        let log = File::create(&self.paths.qemu_log).map_err(|e| QemuError::io(&self.paths.qemu_log, "create", e))?;
        let log2 = log.try_clone().map_err(|e| QemuError::io(&self.paths.qemu_log, "dup", e))?;
        tracing::debug!(vm = %self.config.name, "{} {:?}", bin.display(), args);
        let mut child = Command::new(&bin)
            .args(&args)
            .current_dir(&self.paths.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(|e| QemuError::io(&bin, "start", e))?;
        drop(taps);
        let pid = child.id();
        let deadline = Instant::now() + START_TIMEOUT;
        let version = loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(QemuError::StartFailed { status: st.to_string(), log: log_tail(&self.paths.qemu_log) });
            }
            if self.paths.qmp.exists() && self.paths.pid.exists() {
                if let Ok(q) = self.qmp(QMP_TIMEOUT) {
                    break q.qemu_version();
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(QemuError::StartFailed {
                    status: format!("no monitor after {START_TIMEOUT:?}, killed"),
                    log: log_tail(&self.paths.qemu_log),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.child = Some(child);
        let cpu_model =
            self.config.cpu_model.clone().unwrap_or_else(|| accel.default_cpu_model(self.config.machine).to_string());
        Ok(StartInfo { pid, accel, accel_reason: reason.to_string(), cpu_model, qemu_version: version })
    }

    fn require_live(&mut self, what: &str) -> Result<Qmp> {
        let st = self.status()?;
        if st.pid.is_none() {
            return Err(self.wrong_state(st.state, format!("cannot {what}: start it first")));
        }
        self.qmp(QMP_TIMEOUT)
    }

    /// Pauses the vCPUs (QMP `stop`).
    pub fn pause(&mut self) -> Result<()> {
        self.require_live("pause")?.stop()
    }

    /// Resumes the vCPUs (QMP `cont`).
    pub fn resume(&mut self) -> Result<()> {
        self.require_live("resume")?.cont()
    }

    /// Resets the machine. With `-no-reboot` (always set by isla) QEMU then exits: this is a
    /// hard power-off for the guest.
    pub fn reset(&mut self) -> Result<()> {
        self.require_live("reset")?.system_reset()
    }

    /// Waits up to `timeout` for QEMU to exit; true if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.live_pid().is_none() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Presses the ACPI power button and waits up to `timeout` for the guest to power off;
    /// then tells QEMU to quit, and kills it if it is still there 5 s later.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<ShutdownOutcome> {
        if self.live_pid().is_none() {
            return Ok(ShutdownOutcome::AlreadyOff);
        }
        if let Ok(mut q) = self.qmp(QMP_TIMEOUT) {
            if q.system_powerdown().is_ok() {
                drop(q);
                if self.wait_exit(timeout) {
                    return Ok(ShutdownOutcome::Acpi);
                }
            }
        }
        tracing::info!(vm = %self.config.name, "no power-off after {timeout:?}: quitting QEMU");
        if let Ok(mut q) = self.qmp(QMP_TIMEOUT) {
            if q.quit().is_ok() {
                drop(q);
                if self.wait_exit(QUIT_GRACE) {
                    self.record_stop();
                    return Ok(ShutdownOutcome::Quit);
                }
            }
        }
        self.kill()?;
        Ok(ShutdownOutcome::Killed)
    }

    /// Marks the last exit as isla's doing (overwriting what the reaper wrote).
    fn record_stop(&mut self) {
        let code = self.child.take().and_then(|mut c| c.wait().ok()).map(|s| s.code());
        let rec = ExitRecord { code: code.flatten(), signal: None, by_isla: true };
        let _ = write_json(&self.paths.exit, &rec);
    }

    /// Kills QEMU at once (SIGKILL): the guest loses what it had not written. The VM is then
    /// shut off (not crashed).
    pub fn kill(&mut self) -> Result<()> {
        let Some(pid) = self.live_pid() else {
            return Ok(());
        };
        process::kill(pid).map_err(|e| QemuError::io(format!("/proc/{pid}"), "kill QEMU", e))?;
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        } else if !self.wait_exit(QUIT_GRACE) {
            return Err(QemuError::io(
                format!("/proc/{pid}"),
                "wait for QEMU to die",
                std::io::ErrorKind::TimedOut.into(),
            ));
        }
        // A killed QEMU leaves these behind.
        remove_if_exists(&self.paths.pid)?;
        remove_if_exists(&self.paths.qmp)?;
        write_json(&self.paths.exit, &ExitRecord { code: None, signal: Some(9), by_isla: true })
    }

    /// Writable qcow2 disks (those internal snapshots cover); a writable raw disk is an error,
    /// as in QEMU.
    fn snapshot_disks(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for (i, d) in self.config.disks.iter().enumerate() {
            if d.read_only {
                continue;
            }
            match d.format {
                Some(DiskFormat::Qcow2) => out.push(d.path.clone()),
                _ => {
                    return Err(QemuError::config(
                        format!("disks[{i}]"),
                        format!(
                            "{} is a writable raw disk: internal snapshots need qcow2 (convert it with `isla disk convert -O qcow2`) or mark it read_only",
                            d.path.display()
                        ),
                    ))
                }
            }
        }
        if out.is_empty() {
            return Err(QemuError::config("disks", "no writable qcow2 disk to hold snapshots"));
        }
        Ok(out)
    }

    /// Takes snapshot `name`: running (or paused), a full one through QMP `savevm` (disks, RAM
    /// and devices); shut off, a disk-only one on every writable qcow2 disk.
    pub fn snapshot_create(&mut self, name: &str) -> Result<()> {
        validate_snapshot_name(name)?;
        let disks = self.snapshot_disks()?;
        if self.live_pid().is_some() {
            return Qmp::connect(&self.paths.qmp, SNAPSHOT_TIMEOUT)?.savevm(name);
        }
        self.check_not_base()?;
        for (i, d) in disks.iter().enumerate() {
            if let Err(e) = isla_disk::snapshot::create(d, name) {
                for done in &disks[..i] {
                    let _ = isla_disk::snapshot::delete(done, name);
                }
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// The snapshots present on all writable qcow2 disks.
    pub fn snapshot_list(&mut self) -> Result<Vec<Snapshot>> {
        let disks = self.snapshot_disks()?;
        let per_disk: Vec<Vec<Snapshot>> = if self.live_pid().is_some() {
            let blocks = self.qmp(QMP_TIMEOUT)?.query_block()?;
            // QEMU reports each disk under its -drive id: disk<i>.
            self.config
                .disks
                .iter()
                .enumerate()
                .filter(|(_, d)| !d.read_only)
                .map(|(i, _)| {
                    let id = format!("disk{i}");
                    let img = blocks.iter().find(|b| b.device == id).and_then(|b| b.inserted.as_ref()?.image.as_ref());
                    img.map(|m| {
                        m.snapshots
                            .iter()
                            .map(|s| Snapshot {
                                id: s.id.clone(),
                                name: s.name.clone(),
                                vm_state_size: s.vm_state_size,
                                date_sec: s.date_sec,
                            })
                            .collect()
                    })
                    .unwrap_or_default()
                })
                .collect()
        } else {
            let mut v = Vec::new();
            for d in &disks {
                let list = isla_disk::snapshot::list(d)?;
                v.push(
                    list.into_iter()
                        .map(|s| Snapshot {
                            id: s.id,
                            name: s.name,
                            vm_state_size: s.vm_state_size,
                            date_sec: u64::from(s.date_sec),
                        })
                        .collect(),
                );
            }
            v
        };
        let mut iter = per_disk.into_iter();
        let first = iter.next().unwrap_or_default();
        let rest: Vec<Vec<Snapshot>> = iter.collect();
        Ok(first.into_iter().filter(|s| rest.iter().all(|r| r.iter().any(|o| o.name == s.name))).collect())
    }

    fn require_snapshot(&mut self, name: &str) -> Result<Snapshot> {
        self.snapshot_list()?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| QemuError::NoSuchSnapshot { name: self.config.name.clone(), snapshot: name.to_string() })
    }

    /// Returns the VM to snapshot `name`: running, QMP `loadvm` (which needs a snapshot taken
    /// while running); shut off, every writable qcow2 disk goes back to it.
    pub fn snapshot_apply(&mut self, name: &str) -> Result<()> {
        self.require_snapshot(name)?;
        if self.live_pid().is_some() {
            let mut q = Qmp::connect(&self.paths.qmp, SNAPSHOT_TIMEOUT)?;
            let was_running = q.query_status()?.running;
            let r = q.loadvm(name);
            // A failed loadvm leaves the vCPUs stopped; run them again as they were.
            if r.is_err() && was_running && !q.query_status()?.running {
                q.cont()?;
            }
            return r;
        }
        self.check_not_base()?;
        for d in self.snapshot_disks()? {
            isla_disk::snapshot::apply(&d, name)?;
        }
        Ok(())
    }

    /// Deletes snapshot `name` (QMP `delvm` while running, from every qcow2 disk otherwise).
    pub fn snapshot_delete(&mut self, name: &str) -> Result<()> {
        self.require_snapshot(name)?;
        if self.live_pid().is_some() {
            return Qmp::connect(&self.paths.qmp, SNAPSHOT_TIMEOUT)?.delvm(name);
        }
        self.check_not_base()?;
        for d in self.snapshot_disks()? {
            isla_disk::snapshot::delete(&d, name)?;
        }
        Ok(())
    }

    /// Makes a linked clone in `new_dir`: each writable disk becomes a thin qcow2 overlay whose
    /// backing file is this VM's disk; read-only disks, the ISO and the kernel are shared; NICs
    /// get new MACs. This VM must be shut off and then becomes the clones' base: it cannot
    /// start, take or apply snapshots, or be deleted until they are deleted (its disks must not
    /// change under them).
    pub fn clone_linked(&mut self, new_dir: &Path, new_name: &str) -> Result<Vm> {
        let st = self.status()?;
        if st.pid.is_some() {
            return Err(self.wrong_state(st.state, "shut it down before cloning"));
        }
        let mut cfg = self.config.clone();
        cfg.name = new_name.to_string();
        cfg.linked_clones.clear();
        let me = std::fs::canonicalize(&self.paths.dir).map_err(|e| QemuError::io(&self.paths.dir, "resolve", e))?;
        cfg.linked_from = Some(me);
        for n in &mut cfg.nics {
            n.set_mac(random_mac()?);
        }
        if VmPaths::new(new_dir).config.exists() {
            return Err(QemuError::config("dir", format!("{} already holds a VM", new_dir.display())));
        }
        std::fs::create_dir_all(new_dir).map_err(|e| QemuError::io(new_dir, "create VM directory", e))?;
        let mut made = Vec::new();
        let result = (|| {
            for (i, d) in cfg.disks.iter_mut().enumerate() {
                if d.read_only {
                    continue;
                }
                let base = std::fs::canonicalize(&d.path).map_err(|e| QemuError::io(&d.path, "resolve", e))?;
                let fmt = match d.format {
                    Some(f) => f,
                    None => isla_disk::detect(&base)?.into(),
                };
                let overlay = new_dir.join(format!("disk{i}.qcow2"));
                let opts = isla_disk::CreateOptions {
                    format: isla_disk::Format::Qcow2,
                    size: None,
                    backing: Some((base, fmt.into())),
                    cluster_size: None,
                };
                isla_disk::create(&overlay, &opts)?;
                made.push(overlay.clone());
                d.path = overlay;
                d.format = Some(DiskFormat::Qcow2);
            }
            Vm::create(new_dir, cfg)
        })();
        let clone = match result {
            Ok(c) => c,
            Err(e) => {
                for f in &made {
                    let _ = std::fs::remove_file(f);
                }
                return Err(e);
            }
        };
        let clone_dir = std::fs::canonicalize(new_dir).map_err(|e| QemuError::io(new_dir, "resolve", e))?;
        self.config.linked_clones.push(clone_dir);
        self.save_config()?;
        Ok(clone)
    }

    /// Deletes the VM: its directory and the disks inside it (disks elsewhere are the user's and
    /// stay). The VM must be shut off and have no linked clones; a clone is unregistered from
    /// its base.
    pub fn delete(mut self) -> Result<()> {
        let st = self.status()?;
        if st.pid.is_some() {
            return Err(self.wrong_state(st.state, "shut it down or kill it before deleting"));
        }
        self.check_not_base()?;
        if let Some(base_dir) = &self.config.linked_from {
            if let Ok(mut base) = Vm::open(base_dir) {
                let me = std::fs::canonicalize(&self.paths.dir).ok();
                base.config.linked_clones.retain(|d| Some(d) != me.as_ref());
                base.save_config()?;
            }
        }
        std::fs::remove_dir_all(&self.paths.dir).map_err(|e| QemuError::io(&self.paths.dir, "remove", e))
    }

    /// Waits up to `timeout` for `text` to appear in `serial.log`; true if it did.
    pub fn wait_for_serial(&self, text: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(b) = std::fs::read(&self.paths.serial_log) {
                if String::from_utf8_lossy(&b).contains(text) {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    /// A QEMU process this handle started is reaped by a thread when it ends, so a long-lived
    /// manager leaves no zombie (the process itself keeps running).
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let exit = self.paths.exit.clone();
            std::thread::spawn(move || {
                if let Ok(st) = c.wait() {
                    if !exit.exists() {
                        let _ = write_json(&exit, &ExitRecord::from_status(st, false));
                    }
                }
            });
        }
    }
}

fn validate_snapshot_name(name: &str) -> Result<()> {
    // HMP splits its arguments on spaces; an all-digit name would be taken for a snapshot id.
    let not_id = !name.bytes().all(|c| c.is_ascii_digit());
    check_name("snapshot", name, 128, (not_id, ", not only digits"))
}

fn remove_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(QemuError::io(p, "remove", e)),
        _ => Ok(()),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text =
        serde_json::to_string_pretty(value).map_err(|e| QemuError::io(path, "serialize", std::io::Error::other(e)))?;
    let mut f = File::create(&tmp).map_err(|e| QemuError::io(&tmp, "create", e))?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| QemuError::io(&tmp, "write", e))?;
    std::fs::rename(&tmp, path).map_err(|e| QemuError::io(path, "replace", e))
}

/// The last lines of a log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    if tail.is_empty() {
        format!("nothing in {}", path.display())
    } else {
        tail
    }
}
