//! The lab run: set-up (tools, guest initramfs, the host's own probe and baseline), then per
//! kind and per launcher the start runs, and for isla's own kinds density and the workloads.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::host::{self, Guard, Netns};
use crate::kinds::{Env, Guest, Instance, Launcher, Mode};
use crate::load::{self, HttpLoad};
use crate::model::{key, Figure, Isolation, Kind, Phase, Probe, Results, RunInfo, Subject};
use crate::script::{self, LAB_SH};
use crate::{tools, Error, Result};

/// The guest kit's files (found by the caller: `isla guest path`).
#[derive(Debug, Clone)]
pub struct KitPaths {
    pub microvm_kernel: PathBuf,
    pub vm_kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub kinds: Vec<Kind>,
    /// Start runs per launcher.
    pub runs: usize,
    /// The isla binary (for `isla runtime`, `isla vm run`, `isla qemu`).
    pub isla: PathBuf,
    /// The guest kit, or why there is none.
    pub kit: std::result::Result<KitPaths, String>,
    pub firecracker: Option<PathBuf>,
    pub crun: Option<PathBuf>,
    pub runc: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
    /// Density: the memory budget.
    pub budget_mib: u64,
    /// Whether /dev/kvm exists (microVMs need it).
    pub kvm: bool,
}

impl Options {
    fn density_bounds(&self, kind: Kind) -> (usize, Duration) {
        match (self.quick, kind) {
            (true, Kind::Container) => (10, Duration::from_secs(30)),
            (true, _) => (2, Duration::from_secs(90)),
            (false, Kind::Container) => (100, Duration::from_secs(120)),
            (false, _) => (8, Duration::from_secs(400)),
        }
    }

    fn seconds(&self) -> u64 {
        if self.quick {
            2
        } else {
            5
        }
    }
}

/// Progress reports: a stage starts (`begin`), a line of news (`note`).
pub trait Progress {
    fn begin(&self, stage: &str);
    fn note(&self, line: &str);
}

/// Runs the lab. Kinds that cannot run here are reported with the reason.
pub fn run(opts: &Options, progress: &dyn Progress) -> Result<Results> {
    let t0 = Instant::now();
    let started_unix =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let dir = host::tempdir_for("run")?;
    let result = run_in(opts, progress, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let (host_baseline, host_probe, subjects) = result?;
    Ok(Results {
        run: RunInfo {
            quick: opts.quick,
            runs: opts.runs,
            kinds: opts.kinds.clone(),
            budget_mib: opts.budget_mib,
            started_unix,
            wall_s: t0.elapsed().as_secs_f64(),
            isla_version: env!("CARGO_PKG_VERSION").into(),
        },
        host: host::info(),
        host_baseline,
        host_probe,
        subjects,
    })
}

type Parts = (Vec<Figure>, Option<Probe>, Vec<Subject>);

fn run_in(opts: &Options, progress: &dyn Progress, dir: &Path) -> Result<Parts> {
    let token = std::fs::read_to_string("/proc/sys/kernel/random/uuid")
        .map(|u| format!("isla-lab-{}", u.trim().replace('-', "")))
        .map_err(|e| Error::io(Path::new("/proc/sys/kernel/random/uuid"), e))?;
    let marker = dir.join("host-marker");
    std::fs::write(&marker, format!("{token}\n")).map_err(|e| Error::io(&marker, e))?;
    // The sentinel: a host process whose command line holds the token (`$0` of the shell).
    let sentinel = Guard(
        Command::new("sh")
            .args(["-c", "sleep 100000; :", &token])
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| Error::Spawn("sh".into(), e))?,
    );
    progress.begin("set-up: tools and guest initramfs");
    let tools = tools::find();
    if let Err(reason) = &tools {
        progress.note(&format!("workload tools: {reason}"));
    }
    let needs_guest = opts.kinds.iter().any(|k| *k != Kind::Container);
    let guest = match (&opts.kit, needs_guest) {
        (Ok(kit), true) => {
            let loader = tools.as_ref().ok().and_then(|files| tools::loader(files).cloned());
            let initramfs = tools::guest_initramfs(&kit.initramfs, loader.as_deref(), dir)?;
            let tools_image = match &tools {
                Ok(files) => Some(tools::tools_image(files, dir)?),
                Err(_) => None,
            };
            Some(Guest {
                microvm_kernel: kit.microvm_kernel.clone(),
                vm_kernel: kit.vm_kernel.clone(),
                initramfs,
                tools_image,
            })
        }
        _ => None,
    };
    let env = Env {
        isla: opts.isla.clone(),
        dir: dir.to_path_buf(),
        token: token.clone(),
        sentinel_pid: sentinel.pid(),
        marker: marker.clone(),
        seconds: opts.seconds(),
        fio_size: if opts.quick { "32M".into() } else { "128M".into() },
        guest,
        tools: tools.as_ref().ok().cloned(),
        boot_limit: Duration::from_secs(if opts.quick { 120 } else { 240 }),
    };

    progress.begin("host: probes and baseline workloads");
    let host_probe = host_script(&env, Mode::Probe, None).ok().and_then(|(o, _script)| o.probe);
    let host_baseline = match &tools {
        Err(reason) => workload_not_run(reason, opts.seconds()),
        Ok(_) => host_baseline(&env, progress),
    };

    let mut subjects = Vec::new();
    for kind in [Kind::Microvm, Kind::Container, Kind::Vm] {
        if !opts.kinds.contains(&kind) {
            continue;
        }
        for launcher in launchers(opts, kind) {
            if host::interrupted() {
                return Err(Error::Interrupted);
            }
            progress.begin(&launcher.name());
            let s = match unavailable(opts, &env, &launcher) {
                Some(reason) => not_run_subject(&launcher, &reason, opts),
                None => subject(&launcher, &env, opts, host_probe.as_ref(), progress),
            };
            subjects.push(s);
        }
    }
    drop(sentinel);
    if host::interrupted() {
        return Err(Error::Interrupted);
    }
    Ok((host_baseline, host_probe, subjects))
}

/// isla's launcher of a kind, then its peers given by path.
fn launchers(opts: &Options, kind: Kind) -> Vec<Launcher> {
    match kind {
        Kind::Container => {
            let mut v = vec![Launcher::Oci { name: "isla".into(), bin: opts.isla.clone(), isla: true }];
            for (name, bin) in [("crun", &opts.crun), ("runc", &opts.runc)] {
                if let Some(b) = bin {
                    v.push(Launcher::Oci { name: name.into(), bin: b.clone(), isla: false });
                }
            }
            v
        }
        Kind::Microvm => {
            let mut v = vec![Launcher::IslaMicrovm];
            v.extend(opts.firecracker.clone().map(Launcher::Firecracker));
            v
        }
        Kind::Vm => {
            let mut v = vec![Launcher::IslaVm];
            v.extend(opts.qemu.clone().map(Launcher::Qemu));
            v
        }
    }
}

/// Why a launcher cannot run here, if it cannot.
fn unavailable(opts: &Options, env: &Env, l: &Launcher) -> Option<String> {
    let bin = match l {
        Launcher::Oci { bin, .. } | Launcher::Firecracker(bin) | Launcher::Qemu(bin) => Some(bin),
        _ => None,
    };
    if let Some(b) = bin {
        if !b.is_file() {
            return Some(format!("{} does not exist", b.display()));
        }
    }
    match l.kind() {
        Kind::Microvm if !opts.kvm => Some("/dev/kvm is missing: microVMs need KVM".into()),
        Kind::Microvm | Kind::Vm if env.guest.is_none() => Some(match &opts.kit {
            Err(e) => format!("no guest kit: {e}"),
            Ok(_) => "no guest kit".into(),
        }),
        Kind::Vm if l == &Launcher::IslaVm && isla_qemu::qemu_binary().is_err() => {
            Some("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".into())
        }
        _ => None,
    }
}

const START_TITLE: &str = "start time (command to workload ready)";
const MEMORY_TITLE: &str = "base memory of one idle instance";
const MEMORY_METHOD: &str = "Pss (/proc/PID/smaps_rollup) summed over the instance's host processes and their \
     descendants (monitor with the guest RAM it touched; QEMU; the container's processes, the runtime having exited), \
     0.5 s after the instance printed its ready line; for guests split by /proc/PID/smaps into the guest RAM mapping \
     and the rest";

fn not_run_subject(l: &Launcher, reason: &str, opts: &Options) -> Subject {
    let mut figures = vec![
        Figure::not_run(key::START, START_TITLE, "ms", l.start_method(), reason.into()),
        Figure::not_run(key::MEMORY, MEMORY_TITLE, "KiB", MEMORY_METHOD.into(), reason.into()),
    ];
    if !l.is_peer() {
        figures.push(Figure::not_run(
            key::DENSITY,
            "density",
            "instances",
            density_method(opts, l.kind()),
            reason.into(),
        ));
    }
    figures.extend(workload_not_run(reason, opts.seconds()));
    Subject {
        name: l.name(),
        kind: l.kind(),
        peer: l.is_peer(),
        figures,
        isolation: Isolation::NotRun { reason: reason.into() },
    }
}

/// One start run: the total, the phases, memory at rest, the probes.
struct StartSample {
    total_ms: f64,
    phases: Vec<(String, f64)>,
    memory_kib: u64,
    /// Guests: (outside guest RAM, guest RAM touched), KiB.
    memory_split: Option<(u64, u64)>,
    output: script::Output,
}

fn start_once(l: &Launcher, env: &Env, idx: usize) -> std::result::Result<StartSample, String> {
    let mut inst = l.launch(env, Mode::Probe, idx).map_err(|e| e.to_string())?;
    let (total_ms, log) = inst.wait("LAB idle", env.boot_limit)?;
    let mut phases = inst.phases.clone();
    if let Some((_, last)) = phases.last() {
        let done: f64 = phases.iter().map(|(_, v)| v).sum::<f64>().max(*last);
        phases.push(("to ready".into(), total_ms - done));
    }
    std::thread::sleep(Duration::from_millis(500));
    let memory_kib = inst.memory_kib();
    let memory_split = inst.memory_split_kib();
    if let Some(report) = inst.stop() {
        for (name, ptr) in [
            ("process start -> boot start", "/phases/vmm_start_to_boot_start_ms"),
            ("boot start -> kernel banner", "/phases/boot_start_to_kernel_banner_ms"),
            ("boot start -> init exec", "/phases/boot_start_to_init_exec_ms"),
            ("process start -> init's boot marker", "/phases/process_start_to_boot_marker_ms"),
        ] {
            if let Some(v) = report.pointer(ptr).and_then(|v| v.as_f64()) {
                phases.push((name.into(), v));
            }
        }
        if let Some(marker) = report.pointer("/phases/process_start_to_boot_marker_ms").and_then(|v| v.as_f64()) {
            phases.push(("init's boot marker -> ready (lab.sh probes)".into(), total_ms - marker));
        }
    }
    Ok(StartSample { total_ms, phases, memory_kib, memory_split, output: script::parse(&log) })
}

/// A failure text without the digits (time stamps, addresses), to compare two failures.
fn strip_times(s: &str) -> String {
    s.chars().filter(|c| !c.is_ascii_digit()).collect()
}

fn subject(l: &Launcher, env: &Env, opts: &Options, host_probe: Option<&Probe>, progress: &dyn Progress) -> Subject {
    let mut samples: Vec<StartSample> = Vec::new();
    let mut notes = Vec::new();
    let mut failure = None;
    for i in 0..opts.runs {
        if host::interrupted() {
            failure = Some("interrupted".into());
            break;
        }
        progress.note(&format!("{}: start run {}/{}", l.name(), i + 1, opts.runs));
        match start_once(l, env, i) {
            Ok(s) => samples.push(s),
            Err(e) => {
                progress.note(&format!("{}: run {} failed ({e}); retrying once", l.name(), i + 1));
                notes.push(format!("run {} failed and was retried: {e}", i + 1));
                match start_once(l, env, i) {
                    Ok(s) => samples.push(s),
                    Err(e2) => {
                        failure = Some(if e2 == e || strip_times(&e2) == strip_times(&e) {
                            format!("run {} failed twice the same way: {e2}", i + 1)
                        } else {
                            format!("run {} failed twice: {e}; then {e2}", i + 1)
                        });
                        break;
                    }
                }
            }
        }
    }
    let reason = failure.clone().unwrap_or_else(|| "no run completed".into());
    let mut start = Figure::from_samples(
        key::START,
        START_TITLE,
        "ms",
        l.start_method(),
        samples.iter().map(|s| s.total_ms).collect(),
        &reason,
    );
    let mut names: Vec<String> = Vec::new();
    for s in &samples {
        for (n, _) in &s.phases {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    for n in names {
        let v: Vec<f64> =
            samples.iter().filter_map(|s| s.phases.iter().find(|(m, _)| *m == n).map(|(_, x)| *x)).collect();
        start = start.with_phase(Phase::new(&n, v));
    }
    for n in &notes {
        start = start.with_note(n.clone());
    }
    if let (Some(f), false) = (&failure, samples.is_empty()) {
        start = start.with_note(format!("stopped early: {f}"));
    }
    let split = |f: fn(&(u64, u64)) -> u64| -> Vec<f64> {
        samples.iter().filter_map(|s| s.memory_split.as_ref().map(|p| f(p) as f64)).collect()
    };
    let memory = Figure::from_samples(
        key::MEMORY,
        MEMORY_TITLE,
        "KiB",
        MEMORY_METHOD.into(),
        samples.iter().map(|s| s.memory_kib as f64).filter(|m| *m > 0.0).collect(),
        &reason,
    )
    .with_phase(Phase::new("monitor or QEMU process, outside guest RAM", split(|p| p.0)))
    .with_phase(Phase::new("guest RAM the guest touched", split(|p| p.1)));
    let isolation = match (samples.first().and_then(|s| s.output.probe.clone()), host_probe) {
        (Some(p), Some(h)) => Isolation::Probed {
            rows: script::compare(&p, h),
            probe: p,
            method: "lab.sh probes run inside the instance (uname -r, boot_id, /proc/1/comm, /proc entries, a host \
                     sentinel process's /proc entry, /sys/class/net, a host marker file, /dev), compared with the \
                     same probes run on the host"
                .into(),
        },
        (_, None) => Isolation::Failed { reason: "the host's own probe failed".into() },
        (None, _) => Isolation::Failed { reason: reason.clone() },
    };
    let mut figures = vec![start, memory];
    if !l.is_peer() {
        progress.note(&format!("{}: density", l.name()));
        figures.extend(density(l, env, opts));
    }
    // Peers run the same workloads (for the peer ratios), unless they could not even start. Plain
    // QEMU is the q35 machine with virtio-pci devices, which the kit's kernel has no driver for;
    // the VM kind's workloads are isla's (QEMU's microvm machine).
    if matches!(l, Launcher::Qemu(_)) {
        let why = "plain QEMU (q35) gives the guest virtio-pci devices, and the kit's kernel has no virtio-pci driver";
        figures.extend(workload_not_run(why, env.seconds));
    } else if l.is_peer() && samples.is_empty() {
        figures.extend(workload_not_run(&format!("the peer did not start: {reason}"), env.seconds));
    } else {
        progress.note(&format!("{}: workloads", l.name()));
        figures.extend(workload(l, env, progress));
    }
    Subject { name: l.name(), kind: l.kind(), peer: l.is_peer(), figures, isolation }
}

fn density_method(opts: &Options, kind: Kind) -> String {
    let (count, time) = opts.density_bounds(kind);
    format!(
        "idle instances started one after another, each waited for until ready, until their summed Pss reaches the \
         {} MiB budget, {count} instances, or {} s",
        opts.budget_mib,
        time.as_secs()
    )
}

fn density(l: &Launcher, env: &Env, opts: &Options) -> Vec<Figure> {
    let (max_count, max_time) = opts.density_bounds(l.kind());
    let budget_kib = opts.budget_mib * 1024;
    let method = density_method(opts, l.kind());
    let start = Instant::now();
    let mut running: Vec<Instance> = Vec::new();
    let mut total = 0;
    let stop_reason = loop {
        if running.len() >= max_count {
            break format!("count bound ({max_count}) reached");
        }
        if start.elapsed() >= max_time {
            break format!("time bound ({} s) reached", max_time.as_secs());
        }
        if host::interrupted() {
            break "interrupted".into();
        }
        let mut inst = match l.launch(env, Mode::Probe, 100 + running.len()) {
            Ok(i) => i,
            Err(e) => break format!("instance {} failed to start: {e}", running.len() + 1),
        };
        if let Err(e) = inst.wait("LAB idle", env.boot_limit) {
            break format!("instance {} did not get ready: {e}", running.len() + 1);
        }
        running.push(inst);
        std::thread::sleep(Duration::from_millis(300));
        total = running.iter().map(Instance::memory_kib).sum::<u64>();
        if total >= budget_kib {
            break format!("memory budget reached ({total} KiB)");
        }
    };
    let n = running.len();
    drop(running);
    if n == 0 {
        let f = Figure::failed(key::DENSITY, "density", "instances", method, stop_reason);
        return vec![f];
    }
    let per = total as f64 / n as f64;
    let note =
        format!("{n} instances held {total} KiB Pss in {:.1} s; stopped: {stop_reason}", start.elapsed().as_secs_f64());
    vec![
        Figure::from_samples(key::DENSITY, "density: idle instances started", "instances", method, vec![n as f64], "")
            .with_note(note),
        Figure::from_samples(
            key::DENSITY_PROJECTED,
            "density: instances per budget (projected)",
            "instances",
            format!(
                "the {} MiB budget divided by the mean Pss per instance of the density run ({per:.0} KiB)",
                opts.budget_mib
            ),
            vec![(budget_kib as f64 / per).floor()],
            "",
        ),
    ]
}

fn cpu_method(seconds: u64) -> String {
    format!(
        "sysbench cpu --cpu-max-prime=10000 --threads=1 --time={seconds} run inside the instance: events per second"
    )
}

fn fio_method(name: &str, seconds: u64) -> String {
    let (rw, bs) = match name {
        "seqwrite" => ("write", "1M"),
        "seqread" => ("read", "1M"),
        _ => ("randread", "4k"),
    };
    format!(
        "fio --rw={rw} --bs={bs} --ioengine=psync --direct=1 --time_based --runtime={seconds} on the instance's disk (host: a \
         file in the lab's directory; container: a file in its root file system; guests: a raw virtio disk backed by a \
         host file). Direct I/O bypasses the page cache of the system that runs fio only: a guest's virtual disk is a \
         buffered host file (QEMU's default cache=writeback; isla's block device), so a guest can read from the \
         host's page cache where the host's own direct I/O cannot, and beat it"
    )
}

fn net_method(seconds: u64) -> String {
    format!(
        "iperf3 -s in the instance; iperf3 -c -t {seconds} from the host side, inside the lab's own network namespace \
         (guests: over a TAP; container and host: over loopback of the namespace): received Mbit/s"
    )
}

fn http_method(what: &str) -> String {
    format!(
        "busybox httpd in the instance serving a 28-byte file; the lab's HTTP/1.0 client (a connection per request, 4 \
         workers, at most 2000 requests or 10 s) from the instance's network namespace: {what}"
    )
}

fn workload_not_run(reason: &str, seconds: u64) -> Vec<Figure> {
    workload_figures(None, &Err(reason.to_string()), &Err(reason.to_string()), reason, seconds)
}

/// Figures from one workload run (the script's output), the iperf3 result and the HTTP result.
fn workload_figures(
    out: Option<&script::Output>,
    net: &std::result::Result<f64, String>,
    http: &std::result::Result<load::HttpResult, String>,
    not_run: &str,
    seconds: u64,
) -> Vec<Figure> {
    let mut v = Vec::new();
    let missing = |k: &str, title: &str, unit: &str, method: String, what: &str| -> Figure {
        match out {
            None => Figure::not_run(k, title, unit, method, not_run.into()),
            Some(o) => {
                let err = o.errors.iter().find(|e| e.starts_with(what)).cloned();
                Figure::failed(
                    k,
                    title,
                    unit,
                    method,
                    err.unwrap_or_else(|| format!("the script printed no {what} result")),
                )
            }
        }
    };
    let retried = |f: Figure, what: &str| -> Figure {
        match out.map(|o| o.retries.iter().filter(|r| r.starts_with(what)).count()).unwrap_or(0) {
            0 => f,
            n => f.with_note(format!("{what} failed {n} time(s) and was run again")),
        }
    };
    v.push(match out.and_then(|o| o.cpu) {
        Some(x) => retried(
            Figure::from_samples(key::CPU, "CPU (sysbench prime)", "events/s", cpu_method(seconds), vec![x], ""),
            "sysbench",
        ),
        None => missing(key::CPU, "CPU (sysbench prime)", "events/s", cpu_method(seconds), "cpu"),
    });
    for (k, name, title, unit, iops) in [
        (key::DISK_SEQ_READ, "seqread", "disk sequential read", "KiB/s", false),
        (key::DISK_SEQ_WRITE, "seqwrite", "disk sequential write", "KiB/s", false),
        (key::DISK_RAND_READ, "randread", "disk random read 4k", "IOPS", true),
    ] {
        let value = out.and_then(|o| o.fio.get(name)).and_then(|l| script::fio_terse(l)).map(|(rbw, riops, wbw, _)| {
            match (name, iops) {
                ("seqwrite", _) => wbw,
                (_, true) => riops,
                _ => rbw,
            }
        });
        v.push(match value {
            Some(x) => retried(Figure::from_samples(k, title, unit, fio_method(name, seconds), vec![x], ""), "fio"),
            None => missing(k, title, unit, fio_method(name, seconds), &format!("fio-{name}")),
        });
    }
    v.push(match (out, net) {
        (None, _) => Figure::not_run(key::NET, "network (iperf3)", "Mbit/s", net_method(seconds), not_run.into()),
        (_, Ok(x)) => Figure::from_samples(key::NET, "network (iperf3)", "Mbit/s", net_method(seconds), vec![*x], ""),
        (_, Err(e)) => Figure::failed(key::NET, "network (iperf3)", "Mbit/s", net_method(seconds), e.clone()),
    });
    type Pick = fn(&load::HttpResult) -> Option<f64>;
    let http_figs: [(&str, &str, &str, Pick); 4] = [
        (key::HTTP_RPS, "web: requests per second", "req/s", |h| (h.requests > 0).then_some(h.requests_per_s)),
        (key::HTTP_P50, "web: latency p50", "ms", |h| h.p50_ms),
        (key::HTTP_P90, "web: latency p90", "ms", |h| h.p90_ms),
        (key::HTTP_P99, "web: latency p99", "ms", |h| h.p99_ms),
    ];
    for (k, title, unit, get) in http_figs {
        let method = http_method(title);
        v.push(match (out, http) {
            (None, _) => Figure::not_run(k, title, unit, method, not_run.into()),
            (_, Ok(h)) => match get(h) {
                Some(x) => {
                    let mut f = Figure::from_samples(k, title, unit, method, vec![x], "");
                    f = f.with_note(format!("{} requests, {} errors in {:.1} s", h.requests, h.errors, h.seconds));
                    if let Some(e) = &h.first_error {
                        f = f.with_note(format!("first error: {e}"));
                    }
                    f
                }
                None => Figure::failed(
                    k,
                    title,
                    unit,
                    method,
                    format!(
                        "no request succeeded ({} errors; first: {})",
                        h.errors,
                        h.first_error.clone().unwrap_or_default()
                    ),
                ),
            },
            (_, Err(e)) => Figure::failed(k, title, unit, method, e.clone()),
        });
    }
    v
}

/// Network clients against a ready instance (or the host baseline's namespace).
fn clients(
    netns: Option<&Path>,
    addr: &str,
    seconds: u64,
) -> (std::result::Result<f64, String>, std::result::Result<load::HttpResult, String>) {
    let net = load::iperf3(netns, addr, seconds);
    let http = match addr.parse() {
        Ok(ip) => load::http(&HttpLoad {
            addr: std::net::SocketAddr::new(ip, 8080),
            path: "/index.html".into(),
            concurrency: 4,
            max_requests: 2000,
            max_time: Duration::from_secs(10),
            netns: netns.map(Path::to_path_buf),
        }),
        Err(_) => Err(format!("no address for the instance ({addr:?})")),
    };
    (net, http)
}

fn workload(l: &Launcher, env: &Env, progress: &dyn Progress) -> Vec<Figure> {
    if env.tools.is_none() {
        return workload_not_run(
            "sysbench, fio or iperf3 is not installed on the host (apt-get install sysbench fio iperf3)",
            env.seconds,
        );
    }
    let limit = env.boot_limit + Duration::from_secs(8 * env.seconds + 120);
    let mut last_err = String::new();
    for attempt in 1..=2 {
        if host::interrupted() {
            break;
        }
        let mut inst = match l.launch(env, Mode::Work, 200 + attempt) {
            Ok(i) => i,
            Err(e) => return workload_not_run(&format!("the instance did not start: {e}"), env.seconds),
        };
        match inst.wait("LAB ready", limit) {
            Ok((_, log)) => {
                let out = script::parse(&log);
                let (net, http) = clients(inst.netns.as_deref(), &inst.addr, env.seconds);
                let mut figs = workload_figures(Some(&out), &net, &http, "", env.seconds);
                if l == &Launcher::IslaVm {
                    let note = "run on QEMU's microvm machine (virtio-mmio): the kit kernel has no driver for q35's \
                                virtio-pci, AHCI or e1000 devices";
                    figs = figs.into_iter().map(|f| f.with_note(note)).collect();
                }
                if l.kind() != Kind::Container {
                    figs = figs.into_iter().map(|f| f.with_note("guest: 1 vCPU, 512 MiB")).collect();
                }
                if attempt > 1 {
                    figs = figs
                        .into_iter()
                        .map(|f| f.with_note(format!("the first workload run failed and was retried: {last_err}")))
                        .collect();
                }
                return figs;
            }
            Err(e) => {
                progress.note(&format!("{}: workload run {attempt} failed: {e}", l.name()));
                last_err = e;
            }
        }
    }
    let reason = format!("the workload run failed twice; last: {last_err}");
    let out = script::parse(&last_err);
    workload_figures(Some(&out), &Err(reason.clone()), &Err(reason), "", env.seconds)
}

/// Runs `lab.sh` on the host (Work: inside a network namespace of the lab's own) until its ready
/// line; the output and the script's process (kept alive by the caller while it uses it).
fn host_script(env: &Env, mode: Mode, ns: Option<&Netns>) -> Result<(script::Output, Guard)> {
    let dir = host::tempdir_for("host")?;
    let script = dir.join("lab.sh");
    std::fs::write(&script, LAB_SH).map_err(|e| Error::io(&script, e))?;
    let log = dir.join("log");
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name, "sh"]);
            c
        }
        None => Command::new("sh"),
    };
    cmd.arg(&script)
        .env("LAB_MODE", if mode == Mode::Work { "work" } else { "probe" })
        .env("LAB_TOKEN", &env.token)
        .env("LAB_HOSTPID", env.sentinel_pid.to_string())
        .env("LAB_MARKER", &env.marker)
        .env("LAB_SECONDS", env.seconds.to_string())
        .env("LAB_SIZE", &env.fio_size)
        .env("LAB_DISK", dir.join("fio.dat"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).map_err(|e| Error::io(&log, e))?)
        .stderr(Stdio::null());
    let mut child = Guard(cmd.spawn().map_err(|e| Error::Spawn("sh lab.sh".into(), e))?);
    let want = if mode == Mode::Work { "LAB ready" } else { "LAB idle" };
    let limit = Duration::from_secs(8 * env.seconds + 120);
    let r = host::wait_for_text(&log, want, limit, || child.ended().is_none());
    let _ = std::fs::remove_file(dir.join("fio.dat"));
    let keep = match r {
        Ok((_, text)) => Ok((script::parse(&text), child)),
        Err(e) => Err(Error::Setup(format!("host lab.sh: {e}"))),
    };
    // The servers (httpd, iperf3 -s -D) run in the namespace, detached from the script: deleting
    // the namespace does not end them, so they are found by the namespace and killed later.
    let _ = std::fs::remove_dir_all(&dir);
    keep
}

fn host_baseline(env: &Env, progress: &dyn Progress) -> Vec<Figure> {
    let ns = match Netns::new("host") {
        Ok(n) => n,
        Err(e) => return workload_not_run(&format!("no network namespace for the host baseline: {e}"), env.seconds),
    };
    let figs = match host_script(env, Mode::Work, Some(&ns)) {
        Ok((out, _guard)) => {
            let (net, http) = clients(Some(&ns.path()), "127.0.0.1", env.seconds);
            workload_figures(Some(&out), &net, &http, "", env.seconds)
        }
        Err(e) => {
            progress.note(&format!("host baseline: {e}"));
            workload_not_run(&e.to_string(), env.seconds)
        }
    };
    kill_netns_processes(&ns.path());
    figs
}

/// Kills every process whose network namespace is the one at `path` (daemons the script left).
fn kill_netns_processes(path: &Path) {
    let Ok(target) = std::fs::metadata(path) else { return };
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir("/proc") else { return };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
            if m.ino() == target.ino() && m.dev() == target.dev() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}
