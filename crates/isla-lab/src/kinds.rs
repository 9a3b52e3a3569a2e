//! Starting one instance of each kind (isla's own and the peers), all running the same
//! `lab.sh`, and stopping it again. An [`Instance`] gives the lab its log (where the script's
//! `LAB ...` lines appear), the network namespace and address of its servers, and the host
//! processes charged with its memory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::host::{self, run_ok, Guard, Netns};
use crate::model::Kind;
use crate::script::LAB_SH;
use crate::{Error, Result};

/// What the script does once started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Probes, then waits: an idle instance.
    Probe,
    /// Probes, sysbench, fio, then the servers (httpd, iperf3 -s).
    Work,
}

/// The guest side: kernels, the lab initramfs, the tools disk.
#[derive(Debug, Clone)]
pub struct Guest {
    /// ELF vmlinux for isla's monitor and Firecracker (the nested flavour on nested hosts).
    pub microvm_kernel: PathBuf,
    /// bzImage (standard flavour) for QEMU.
    pub vm_kernel: PathBuf,
    /// The kit's initramfs with the lab's cpio appended.
    pub initramfs: PathBuf,
    /// ext4 image with the tools (None: tools missing on the host).
    pub tools_image: Option<PathBuf>,
}

/// What every launch shares.
#[derive(Debug, Clone)]
pub struct Env {
    /// The isla binary.
    pub isla: PathBuf,
    /// Working directory (bundles, consoles, disks).
    pub dir: PathBuf,
    pub token: String,
    pub sentinel_pid: u32,
    pub marker: PathBuf,
    pub seconds: u64,
    pub fio_size: String,
    pub guest: Option<Guest>,
    /// The tools' closure for container root file systems (None: tools missing on the host).
    pub tools: Option<std::collections::BTreeSet<PathBuf>>,
    /// How long a guest may take to reach the script.
    pub boot_limit: Duration,
}

/// Who starts the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launcher {
    /// isla's OCI runtime (`isla runtime`), or a peer with runc's command line.
    Oci { name: String, bin: PathBuf, isla: bool },
    /// isla's monitor (`isla vm run`).
    IslaMicrovm,
    /// Firecracker (`--no-api --config-file`).
    Firecracker(PathBuf),
    /// isla-qemu through `isla qemu`.
    IslaVm,
    /// A plain QEMU command line.
    Qemu(PathBuf),
}

impl Launcher {
    pub fn kind(&self) -> Kind {
        match self {
            Launcher::Oci { .. } => Kind::Container,
            Launcher::IslaMicrovm | Launcher::Firecracker(_) => Kind::Microvm,
            Launcher::IslaVm | Launcher::Qemu(_) => Kind::Vm,
        }
    }

    pub fn name(&self) -> String {
        match self {
            Launcher::Oci { name, isla: true, .. } => format!("isla runtime ({name})"),
            Launcher::Oci { name, .. } => name.clone(),
            Launcher::IslaMicrovm => "isla microVM".into(),
            Launcher::Firecracker(_) => "firecracker".into(),
            Launcher::IslaVm => "isla vm (QEMU TCG)".into(),
            Launcher::Qemu(_) => "qemu (plain)".into(),
        }
    }

    pub fn is_peer(&self) -> bool {
        !matches!(self, Launcher::Oci { isla: true, .. } | Launcher::IslaMicrovm | Launcher::IslaVm)
    }

    /// How "start" is timed for this launcher.
    pub fn start_method(&self) -> String {
        let to_ready = "until the in-instance script's first line after its probes (\"LAB idle\") appears in the \
                        console or log file (polled every 2 ms)";
        match self {
            Launcher::Oci { .. } => format!(
                "wall time from spawning `create --bundle` (busybox root file system, lab.sh as the process) through \
                 `start` {to_ready}; phases: create, start command, start returned to ready"
            ),
            Launcher::IslaMicrovm => format!(
                "wall time from spawning `isla vm run` (1 vCPU, 128 MiB, kit kernel and initramfs + lab cpio, \
                 isla.check=lab) {to_ready}; phases from the monitor's report (process start to boot start, to \
                 kernel banner, to init exec, to the init's boot marker)"
            ),
            Launcher::Firecracker(_) => {
                format!("wall time from spawning `firecracker --no-api --config-file` (same kernel, initrd, 1 vCPU, 128 MiB) {to_ready}")
            }
            Launcher::IslaVm => format!(
                "wall time from `isla qemu start` (q35, TCG where KVM cannot run a guest kernel, 1 vCPU, 256 MiB, \
                 direct boot of the kit bzImage and initramfs + lab cpio) {to_ready}; phases: the start command, then \
                 to ready"
            ),
            Launcher::Qemu(_) => format!(
                "wall time from spawning qemu-system-x86_64 (same machine, accelerator, kernel and initrd as isla vm, \
                 no QMP) {to_ready}"
            ),
        }
    }
}

/// A running instance; stopped (and its files removed) on drop.
pub struct Instance {
    pub log: PathBuf,
    pub spawned: Instant,
    /// Phases measured while starting (name, ms).
    pub phases: Vec<(String, f64)>,
    /// Where the clients must run to reach its servers, and the address.
    pub netns: Option<PathBuf>,
    pub addr: String,
    /// Host processes charged with its memory (each with its descendants).
    pub pids: Vec<u32>,
    /// Guest RAM size of a VM or microVM, MiB (its mapping is told apart in the memory split).
    pub guest_ram_mib: Option<u64>,
    main: Option<Guard>,
    /// The monitor's JSON report, written when it stops.
    report: Option<PathBuf>,
    stop: Vec<Command>,
    remove: Vec<PathBuf>,
    _netns: Option<Netns>,
}

impl Instance {
    /// Is the instance's process still there (for instances without one: assumed).
    pub fn alive(&mut self) -> bool {
        match &mut self.main {
            Some(g) => g.ended().is_none(),
            None => self.pids.iter().all(|p| Path::new(&format!("/proc/{p}")).exists()),
        }
    }

    /// Waits for a `LAB` line; the time since spawn, and the log.
    pub fn wait(&mut self, text: &str, limit: Duration) -> std::result::Result<(f64, String), String> {
        let log = self.log.clone();
        let (_, s) = host::wait_for_text(&log, text, limit, || self.alive())?;
        Ok((self.spawned.elapsed().as_secs_f64() * 1000.0, s))
    }

    /// Host memory charged to it now: Pss of its processes and their descendants, KiB.
    pub fn memory_kib(&self) -> u64 {
        self.pids.iter().map(|p| host::tree_pss_kib(*p)).sum()
    }

    /// For a guest: (Pss outside the guest RAM mapping, Pss of guest RAM = memory the guest
    /// touched), KiB, over its processes; descendants count as outside.
    pub fn memory_split_kib(&self) -> Option<(u64, u64)> {
        let ram = self.guest_ram_mib? << 20;
        let is_guest = |start: u64, end: u64| end.saturating_sub(start) >= ram / 10 * 9;
        let (mut outside, mut guest) = (0, 0);
        for p in &self.pids {
            let split = isla_vmm::host::pss_split_of(&format!("/proc/{p}/smaps"), is_guest)?;
            let own = host::pss_kib(*p).unwrap_or(split.vmm_kib + split.guest_kib);
            outside += split.vmm_kib + host::tree_pss_kib(*p).saturating_sub(own);
            guest += split.guest_kib;
        }
        Some((outside, guest))
    }

    /// Stops it; the monitor's report if it wrote one.
    pub fn stop(mut self) -> Option<serde_json::Value> {
        self.terminate();
        let r = self.report.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
        r.and_then(|t| serde_json::from_str(&t).ok())
    }

    fn terminate(&mut self) {
        if let Some(g) = &mut self.main {
            // SIGTERM first: isla's monitor then stops the guest cleanly and writes its report.
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(g.pid() as i32), nix::sys::signal::Signal::SIGTERM);
            let t = Instant::now();
            while g.ended().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.main = None;
    }

    fn halt(&mut self) {
        self.terminate();
        for mut c in self.stop.drain(..) {
            let _ = host::run_bounded(&mut c, Duration::from_secs(30));
        }
        for p in self.remove.drain(..) {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The `LAB_*` variables of the script.
fn lab_vars(env: &Env, mode: Mode, disk: &str, ip: Option<&str>) -> Vec<(String, String)> {
    let mut v = vec![
        ("LAB_MODE", if mode == Mode::Work { "work" } else { "probe" }.to_string()),
        ("LAB_TOKEN", env.token.clone()),
        ("LAB_HOSTPID", env.sentinel_pid.to_string()),
        ("LAB_MARKER", env.marker.display().to_string()),
        ("LAB_SECONDS", env.seconds.to_string()),
        ("LAB_SIZE", env.fio_size.clone()),
        ("LAB_DISK", disk.to_string()),
    ];
    if let Some(ip) = ip {
        v.push(("LAB_IP", ip.to_string()));
    }
    v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Guest addresses inside the lab's own network namespaces (never routed from the host's).
const HOST_IP: &str = "10.213.0.1";
const GUEST_IP: &str = "10.213.0.2";

fn guest_cmdline(base: &str, env: &Env, mode: Mode, tools: bool) -> String {
    let mut c = format!("{base} isla.check=lab");
    for (k, v) in lab_vars(env, mode, "/dev/vdb", (mode == Mode::Work).then_some(GUEST_IP)) {
        let k = k.trim_start_matches("LAB_").to_lowercase();
        c.push_str(&format!(" lab.{k}={v}"));
    }
    if tools {
        c.push_str(" lab.toolsdev=/dev/vda");
    }
    c
}

fn file(p: &Path) -> Result<std::fs::File> {
    std::fs::File::create(p).map_err(|e| Error::io(p, e))
}

/// For a guest in Work mode: a namespace with a TAP, the tools disk and a scratch disk.
struct GuestNet {
    ns: Netns,
    tap: String,
    scratch: PathBuf,
}

fn guest_work_setup(env: &Env, dir: &Path, tag: &str) -> Result<GuestNet> {
    let ns = Netns::new(tag)?;
    let tap = format!("lab{tag}0");
    ns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &tap])?;
    ns.ip(&["link", "set", &tap, "up"])?;
    let scratch = dir.join("scratch.raw");
    let f = file(&scratch)?;
    let size = parse_size(&env.fio_size).unwrap_or(64 << 20) + (16 << 20);
    f.set_len(size).map_err(|e| Error::io(&scratch, e))?;
    Ok(GuestNet { ns, tap, scratch })
}

/// Guest RAM in MiB: `idle` for start and density runs; 512 for the workload run (fio's shared
/// libraries alone are about 80 MB, and the guest page cache needs room beside them).
fn guest_mib(mode: Mode, idle: u64) -> u64 {
    match mode {
        Mode::Probe => idle,
        Mode::Work => 512,
    }
}

/// "64M" -> bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let (n, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>().ok().map(|n| n * mult)
}

fn guest(env: &Env) -> Result<&Guest> {
    env.guest.as_ref().ok_or_else(|| Error::Setup("no guest kit".into()))
}

impl Launcher {
    /// Starts instance number `idx` in `mode`.
    pub fn launch(&self, env: &Env, mode: Mode, idx: usize) -> Result<Instance> {
        let tag = format!("{}{idx}", short(self));
        let dir = env.dir.join(format!("{tag}-{}", if mode == Mode::Work { "work" } else { "idle" }));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let log = dir.join("console.log");
        match self {
            Launcher::Oci { .. } => self.container(env, mode, &tag, dir, log),
            Launcher::IslaMicrovm | Launcher::Firecracker(_) => self.microvm(env, mode, &tag, dir, log),
            Launcher::IslaVm | Launcher::Qemu(_) => self.vm(env, mode, &tag, dir, log),
        }
    }

    fn container(&self, env: &Env, mode: Mode, tag: &str, dir: PathBuf, log: PathBuf) -> Result<Instance> {
        let (bin, isla) = match self {
            Launcher::Oci { bin, isla, .. } => (bin.as_path(), *isla),
            _ => return Err(Error::Setup(format!("{} is not a container runtime", self.name()))),
        };
        let rootfs = dir.join("rootfs");
        isla_container::testutil::make_rootfs(&rootfs).map_err(|e| Error::io(&rootfs, e))?;
        if mode == Mode::Work {
            let tools = env.tools.as_ref().ok_or_else(|| Error::Setup("the tools are not installed".into()))?;
            crate::tools::install(tools, &rootfs)?;
        }
        let script = rootfs.join("lab.sh");
        std::fs::write(&script, LAB_SH).map_err(|e| Error::io(&script, e))?;
        let mut spec = isla_container::spec::default_spec(false);
        if let Some(p) = spec.process_mut() {
            p.set_terminal(Some(false));
            p.set_args(Some(vec!["/bin/sh".into(), "/lab.sh".into()]));
            let mut vars = p.env().clone().unwrap_or_default();
            vars.extend(lab_vars(env, mode, "/var/lab-fio.dat", None).into_iter().map(|(k, v)| format!("{k}={v}")));
            p.set_env(Some(vars));
        }
        if let Some(r) = spec.root_mut() {
            r.set_path("rootfs".into());
            r.set_readonly(Some(false));
        }
        let config = dir.join("config.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&spec)?).map_err(|e| Error::io(&config, e))?;
        let state = dir.join("state");
        let global: Vec<String> = if isla {
            vec!["runtime".into(), "--root".into(), state.display().to_string()]
        } else {
            vec!["--root".into(), state.display().to_string()]
        };
        let id = format!("isla-lab-{}-{tag}", std::process::id());
        let pid_file = dir.join("pid");
        let limit = Duration::from_secs(60);
        let spawned = Instant::now();
        let mut create = Command::new(bin);
        create.args(&global).arg("create").arg("--bundle").arg(&dir).arg("--pid-file").arg(&pid_file).arg(&id);
        // The container's process inherits the runtime's stdout: the log.
        let out = file(&log)?;
        let err = out.try_clone().map_err(|e| Error::io(&log, e))?;
        create.stdout(out).stderr(err).stdin(Stdio::null());
        let mut stop = Command::new(bin);
        stop.args(&global).args(["delete", "--force", &id]);
        let mut inst = Instance {
            log,
            spawned,
            phases: Vec::new(),
            netns: None,
            addr: "127.0.0.1".into(),
            pids: Vec::new(),
            guest_ram_mib: None,
            main: None,
            report: None,
            stop: vec![stop],
            remove: vec![dir.clone()],
            _netns: None,
        };
        // Not `output()`: the container keeps the runtime's stdout and stderr open.
        let status = host::status_bounded(&mut create, limit)?;
        if !status.success() {
            let log_text = std::fs::read_to_string(&inst.log).unwrap_or_default();
            return Err(Error::Command(format!("{} create ({status})", bin.display()), host::tail(&log_text, 3)));
        }
        let created = spawned.elapsed();
        inst.phases.push(("create".into(), created.as_secs_f64() * 1000.0));
        run_ok(Command::new(bin).args(&global).args(["start", &id]), limit)?;
        let started = spawned.elapsed();
        inst.phases.push(("start command".into(), (started - created).as_secs_f64() * 1000.0));
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .map_err(|e| Error::io(&pid_file, e))?
            .trim()
            .parse()
            .map_err(|_| Error::Setup(format!("{}: not a pid", pid_file.display())))?;
        inst.pids = vec![pid];
        let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        if mode == Mode::Work {
            // The container has no CAP_NET_ADMIN: its loopback is brought up from outside, as a
            // container network plugin does.
            let mut up = Command::new("nsenter");
            up.arg(format!("--net={}", netns.display())).args(["ip", "link", "set", "lo", "up"]);
            run_ok(&mut up, limit)?;
        }
        inst.netns = Some(netns);
        Ok(inst)
    }

    fn microvm(&self, env: &Env, mode: Mode, tag: &str, dir: PathBuf, log: PathBuf) -> Result<Instance> {
        let g = guest(env)?;
        let work = if mode == Mode::Work { Some(guest_work_setup(env, &dir, tag)?) } else { None };
        let tools = work.is_some() && g.tools_image.is_some();
        let cmdline = guest_cmdline(isla_cmdline(), env, mode, tools);
        let report = dir.join("report.json");
        let program = match self {
            Launcher::Firecracker(fc) => fc,
            _ => &env.isla,
        };
        let mut cmd = in_netns(work.as_ref().map(|w| w.ns.name.as_str()), program);
        match self {
            Launcher::Firecracker(_) => {
                let mut drives = Vec::new();
                if let (Some(w), Some(img)) = (&work, &g.tools_image) {
                    drives.push(serde_json::json!({"drive_id": "tools", "path_on_host": img, "is_root_device": false, "is_read_only": true}));
                    drives.push(serde_json::json!({"drive_id": "scratch", "path_on_host": w.scratch, "is_root_device": false, "is_read_only": false}));
                }
                let mut cfg = serde_json::json!({
                    "boot-source": {"kernel_image_path": g.microvm_kernel, "initrd_path": g.initramfs, "boot_args": cmdline},
                    "drives": drives,
                    "machine-config": {"vcpu_count": 1, "mem_size_mib": guest_mib(mode, 128)},
                });
                if let Some(w) = &work {
                    cfg["network-interfaces"] = serde_json::json!([{"iface_id": "eth0", "guest_mac": "06:00:0a:d5:00:02", "host_dev_name": w.tap}]);
                }
                let path = dir.join("firecracker.json");
                std::fs::write(&path, serde_json::to_vec_pretty(&cfg)?).map_err(|e| Error::io(&path, e))?;
                cmd.arg("--no-api").arg("--config-file").arg(&path);
            }
            _ => {
                cmd.args(["vm", "run", "--quiet", "--cpus", "1", "--memory", &format!("{}M", guest_mib(mode, 128))])
                    .arg("--kernel")
                    .arg(&g.microvm_kernel)
                    .arg("--initrd")
                    .arg(&g.initramfs)
                    .args(["--cmdline", &cmdline])
                    .arg("--console")
                    .arg(format!("file:{}", log.display()))
                    .arg("--report")
                    .arg(&report);
                if let (Some(w), Some(img)) = (&work, &g.tools_image) {
                    cmd.arg("--disk").arg(format!("{},ro,id=tools", img.display()));
                    cmd.arg("--disk").arg(format!("{},id=scratch", w.scratch.display()));
                    cmd.args(["--net", &format!("{},mac=06:00:0a:d5:00:02", w.tap)]);
                }
                cmd.env("ISLA_START_TIME_US", isla_vmm_now_us().to_string());
            }
        }
        let stdout = if matches!(self, Launcher::Firecracker(_)) { file(&log)? } else { file(&dir.join("stdout"))? };
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(file(&dir.join("stderr"))?);
        let spawned = Instant::now();
        let child = Guard(cmd.spawn().map_err(|e| Error::Spawn(format!("{:?}", cmd.get_program()), e))?);
        let pid = child.pid();
        Ok(Instance {
            log,
            spawned,
            phases: Vec::new(),
            netns: work.as_ref().map(|w| w.ns.path()),
            addr: if work.is_some() { GUEST_IP.into() } else { String::new() },
            pids: vec![pid],
            guest_ram_mib: Some(guest_mib(mode, 128)),
            main: Some(child),
            report: (!matches!(self, Launcher::Firecracker(_))).then_some(report),
            stop: Vec::new(),
            remove: vec![dir],
            _netns: work.map(|w| w.ns),
        })
    }

    fn vm(&self, env: &Env, mode: Mode, tag: &str, dir: PathBuf, log: PathBuf) -> Result<Instance> {
        let g = guest(env)?;
        let work = if mode == Mode::Work { Some(guest_work_setup(env, &dir, tag)?) } else { None };
        let tools = work.is_some() && g.tools_image.is_some();
        let cmdline = guest_cmdline("console=ttyS0 reboot=k panic=1 quiet", env, mode, tools);
        let ns = work.as_ref().map(|w| w.ns.name.as_str());
        let spawned;
        let mut inst;
        match self {
            Launcher::Qemu(bin) => {
                let mut cmd = in_netns(ns, bin);
                let accel = isla_qemu::Accel::Auto.resolve().0;
                cmd.args([
                    "-M",
                    "q35",
                    "-accel",
                    &accel.to_string(),
                    "-cpu",
                    accel.default_cpu_model(isla_qemu::Machine::Q35),
                ])
                .args(["-m", &guest_mib(mode, 256).to_string(), "-smp", "1"])
                .args(["-display", "none", "-monitor", "none", "-no-reboot", "-nodefaults"])
                .arg("-kernel")
                .arg(&g.vm_kernel)
                .arg("-initrd")
                .arg(&g.initramfs)
                .args(["-append", &cmdline])
                .arg("-serial")
                .arg(format!("file:{}", log.display()));
                if let (Some(w), Some(img)) = (&work, &g.tools_image) {
                    cmd.arg("-drive").arg(format!("file={},format=raw,if=virtio,readonly=on", img.display()));
                    cmd.arg("-drive").arg(format!("file={},format=raw,if=virtio", w.scratch.display()));
                    cmd.arg("-netdev").arg(format!("tap,id=n0,ifname={},script=no,downscript=no", w.tap));
                    cmd.arg("-device").arg("virtio-net-pci,netdev=n0,mac=06:00:0a:d5:00:02");
                }
                cmd.stdin(Stdio::null()).stdout(file(&dir.join("stdout"))?).stderr(file(&dir.join("stderr"))?);
                spawned = Instant::now();
                let child = Guard(cmd.spawn().map_err(|e| Error::Spawn(bin.display().to_string(), e))?);
                inst = Instance {
                    log,
                    spawned,
                    phases: Vec::new(),
                    netns: None,
                    addr: String::new(),
                    pids: vec![child.pid()],
                    guest_ram_mib: Some(guest_mib(mode, 256)),
                    main: Some(child),
                    report: None,
                    stop: Vec::new(),
                    remove: vec![dir],
                    _netns: None,
                };
            }
            _ => {
                let root = dir.join("root");
                let name = format!("lab-{tag}");
                let mut cfg = isla_qemu::QemuConfig::new(name.clone());
                cfg.memory_mib = guest_mib(mode, 256) as u32;
                if work.is_some() {
                    // The kit kernel drives virtio over MMIO only (no virtio-pci, AHCI or e1000
                    // driver): q35 would give it no disk and no NIC. The workload run uses QEMU's
                    // microvm machine, where the same devices sit on virtio-mmio.
                    cfg.machine = isla_qemu::Machine::Microvm;
                }
                cfg.kernel = Some(isla_qemu::KernelBoot {
                    kernel: g.vm_kernel.clone(),
                    initrd: Some(g.initramfs.clone()),
                    append: cmdline,
                });
                if let (Some(w), Some(img)) = (&work, &g.tools_image) {
                    let mut t = isla_qemu::DiskConfig::new(img);
                    t.format = Some(isla_qemu::DiskFormat::Raw);
                    t.read_only = true;
                    let mut s = isla_qemu::DiskConfig::new(&w.scratch);
                    s.format = Some(isla_qemu::DiskFormat::Raw);
                    cfg.disks = vec![t, s];
                    cfg.nics = vec![isla_qemu::NicConfig::Tap {
                        ifname: w.tap.clone(),
                        mac: Some("06:00:0a:d5:00:02".into()),
                    }];
                }
                let cfg_path = dir.join("vm.json");
                std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg)?).map_err(|e| Error::io(&cfg_path, e))?;
                let ns = work.as_ref().map(|w| w.ns.name.as_str());
                let isla_qemu = |ns: Option<&str>, args: &[&str]| {
                    let mut c = in_netns(ns, &env.isla);
                    c.arg("qemu").arg("--root").arg(&root).args(args);
                    c
                };
                run_ok(isla_qemu(None, &["create", &name, "--config"]).arg(&cfg_path), Duration::from_secs(30))?;
                let mut start = isla_qemu(ns, &["start", &name]);
                let stop = vec![isla_qemu(None, &["kill", &name]), isla_qemu(None, &["delete", &name])];
                spawned = Instant::now();
                inst = Instance {
                    log: root.join("qemu").join(&name).join("serial.log"),
                    spawned,
                    phases: Vec::new(),
                    netns: None,
                    addr: String::new(),
                    pids: Vec::new(),
                    guest_ram_mib: Some(guest_mib(mode, 256)),
                    main: None,
                    report: None,
                    stop,
                    remove: vec![dir],
                    _netns: None,
                };
                run_ok(&mut start, Duration::from_secs(60))?;
                inst.phases.push(("isla qemu start".into(), spawned.elapsed().as_secs_f64() * 1000.0));
                let pid_file = root.join("qemu").join(&name).join("qemu.pid");
                let pid = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse().ok());
                inst.pids = pid.into_iter().collect();
                if inst.pids.is_empty() {
                    return Err(Error::Setup(format!("{}: no QEMU pid after start", pid_file.display())));
                }
            }
        }
        if let Some(w) = work {
            inst.netns = Some(w.ns.path());
            inst.addr = GUEST_IP.into();
            inst._netns = Some(w.ns);
        }
        Ok(inst)
    }
}

/// `program`, run inside the named network namespace when one is given.
fn in_netns(ns: Option<&str>, program: &Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

fn short(l: &Launcher) -> &'static str {
    match l {
        Launcher::Oci { isla: true, .. } => "c",
        Launcher::Oci { .. } => "p",
        Launcher::IslaMicrovm => "m",
        Launcher::Firecracker(_) => "f",
        Launcher::IslaVm => "v",
        Launcher::Qemu(_) => "q",
    }
}

/// The monitor's default command line (the kit kernel's console and reboot settings).
fn isla_cmdline() -> &'static str {
    "console=ttyS0 reboot=k panic=1 pci=off quiet"
}

/// CLOCK_MONOTONIC in microseconds, the clock of the monitor's `ISLA_START_TIME_US`.
fn isla_vmm_now_us() -> u64 {
    isla_vmm::host::now_us()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_names() {
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("xM"), None);
        assert!(Launcher::Firecracker("/fc".into()).is_peer());
        assert!(!Launcher::IslaMicrovm.is_peer());
        assert_eq!(Launcher::Qemu("/q".into()).kind(), Kind::Vm);
    }
}
