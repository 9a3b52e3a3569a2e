//! `isla runtime ...`: the OCI runtime with runc's command line, so that containerd's runc shim
//! can drive it. Called through a symbolic link named `isla-runc`, `isla` behaves as this
//! command directly (`isla-runc --root R create --bundle B ID`), which is what
//! `ctr run --runc-binary` and the shim's `BinaryName` option need.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use isla_container::cgroups::CgroupDriver;
use isla_container::{CreateOptions, ExecOptions, Runtime, Status};

/// The runtime's command line (global flags as runc has them).
#[derive(Args, Debug)]
pub struct RuntimeArgs {
    /// State directory.
    #[arg(long, default_value = isla_container::DEFAULT_ROOT, global = true)]
    root: PathBuf,
    /// Append errors to this file (containerd's shim reads it).
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Format of --log: text or json.
    #[arg(long, default_value = "text", global = true)]
    log_format: String,
    /// Accepted for runc compatibility: cgroupsPath in the slice:prefix:name form is understood
    /// without systemd.
    #[arg(long, global = true)]
    systemd_cgroup: bool,
    /// Accepted for runc compatibility (more logging with ISLA_LOG=debug).
    #[arg(long, global = true)]
    debug: bool,
    /// Rootless mode follows the effective uid (runc's `--rootless true|false|auto` is accepted);
    /// with `spec`, write a rootless spec.
    #[arg(long, global = true, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    rootless: Option<String>,
    /// cgroup driver: auto (v2 on unified hosts, v1 otherwise), v1, v2 (the unified hierarchy,
    /// /sys/fs/cgroup/unified on hybrid hosts), none.
    #[arg(long, value_enum, default_value = "auto", global = true)]
    cgroup_driver: Driver,
    #[command(subcommand)]
    cmd: RtCmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Driver {
    Auto,
    V1,
    V2,
    None,
}

#[derive(Subcommand, Debug)]
enum RtCmd {
    /// Create a container: everything set up, the process waits for `start`.
    Create(CreateArgs),
    /// Start a created container's process.
    Start { id: String },
    /// Print a container's state as JSON.
    State { id: String },
    /// Send a signal (default SIGTERM) to the container's init, or with --all to every process.
    Kill {
        #[arg(long, short)]
        all: bool,
        id: String,
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Delete a container (--force kills a running one first).
    Delete {
        #[arg(long, short)]
        force: bool,
        id: String,
    },
    /// Create and start a container; without --detach wait and exit with its status.
    Run(RunArgs),
    /// Run a process in a running container.
    Exec(ExecArgs),
    /// List the processes of a container.
    Ps {
        #[arg(long, short, default_value = "table")]
        format: String,
        id: String,
    },
    /// Freeze every process of a container.
    Pause { id: String },
    /// Thaw a paused container.
    Resume { id: String },
    /// Print resource figures as JSON events (once with --stats, else every --interval).
    Events {
        #[arg(long)]
        stats: bool,
        #[arg(long, default_value = "5s")]
        interval: String,
        id: String,
    },
    /// Write a default config.json into the bundle directory.
    Spec {
        #[arg(long, short, default_value = ".")]
        bundle: PathBuf,
    },
    /// List containers.
    List {
        #[arg(long, short, default_value = "table")]
        format: String,
    },
    /// Time `run` of /bin/true in a busybox bundle: isla, crun and runc side by side.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
struct CreateArgs {
    #[arg(long, short, default_value = ".")]
    bundle: PathBuf,
    #[arg(long)]
    pid_file: Option<PathBuf>,
    #[arg(long)]
    console_socket: Option<PathBuf>,
    #[arg(long)]
    no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long)]
    no_new_keyring: bool,
    /// Accepted for runc compatibility (only 0 is supported).
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
    id: String,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    create: CreateArgs,
    #[arg(long, short)]
    detach: bool,
}

#[derive(Args, Debug)]
struct ExecArgs {
    /// process.json (the spec's process object) instead of a command line.
    #[arg(long, short)]
    process: Option<PathBuf>,
    #[arg(long, short)]
    detach: bool,
    #[arg(long)]
    pid_file: Option<PathBuf>,
    #[arg(long)]
    console_socket: Option<PathBuf>,
    #[arg(long, short)]
    tty: bool,
    #[arg(long)]
    cwd: Option<PathBuf>,
    #[arg(long, short)]
    env: Vec<String>,
    /// uid[:gid]
    #[arg(long, short)]
    user: Option<String>,
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
    id: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Runs per runtime.
    #[arg(long, default_value_t = 50)]
    iterations: usize,
    /// crun binary ("" to leave it out).
    #[arg(long, default_value = "/usr/bin/crun")]
    crun: String,
    /// runc binary ("" to leave it out).
    #[arg(long, default_value = "/usr/sbin/runc")]
    runc: String,
}

/// `isla-runc ARGS`: parse the arguments as runc's command line.
#[derive(Parser, Debug)]
#[command(name = "isla-runc", version, about = "isla's OCI runtime with runc's command line")]
struct AsRunc {
    #[command(flatten)]
    args: RuntimeArgs,
}

/// Entry point when the binary is called as `isla-runc`.
pub fn main_as_runc() -> std::process::ExitCode {
    let cli = AsRunc::parse();
    std::process::ExitCode::from(run(&cli.args) as u8)
}

/// Run a runtime command; errors go to stderr and to --log. Returns the exit status.
pub fn run(a: &RuntimeArgs) -> i32 {
    match dispatch(a) {
        Ok(code) => code,
        Err(e) => {
            let msg = format!("{e:#}");
            eprintln!("isla runtime: error: {msg}");
            if let Some(path) = &a.log {
                let line = if a.log_format == "json" {
                    serde_json::json!({"level": "error", "msg": msg, "time": isla_container::state::now_rfc3339()})
                        .to_string()
                } else {
                    format!("{} error: {msg}", isla_container::state::now_rfc3339())
                };
                if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                    let _ = writeln!(f, "{line}");
                }
            }
            1
        }
    }
}

fn runtime(a: &RuntimeArgs) -> Result<Runtime> {
    let mut rt = Runtime::new(&a.root)?;
    rt.cgroup_driver = match a.cgroup_driver {
        Driver::Auto => CgroupDriver::Auto,
        Driver::V1 => CgroupDriver::V1,
        Driver::None => CgroupDriver::Disabled,
        Driver::V2 => {
            let unified = Path::new("/sys/fs/cgroup/unified");
            CgroupDriver::V2(if unified.exists() { unified.into() } else { "/sys/fs/cgroup".into() })
        }
    };
    Ok(rt)
}

fn create_opts(c: &CreateArgs) -> Result<CreateOptions> {
    if c.preserve_fds != 0 {
        bail!("--preserve-fds is not supported by isla");
    }
    Ok(CreateOptions { pid_file: c.pid_file.clone(), console_socket: c.console_socket.clone(), no_pivot: c.no_pivot })
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn dispatch(a: &RuntimeArgs) -> Result<i32> {
    // Made only by the commands that use the state directory (not spec and bench).
    let rt = || runtime(a);
    match &a.cmd {
        RtCmd::Spec { bundle } => {
            let rootless = a.rootless.as_deref() == Some("true");
            let path = bundle.join("config.json");
            if path.exists() {
                bail!("{} exists already: remove it first", path.display());
            }
            let spec = isla_container::spec::default_spec(rootless);
            std::fs::write(&path, serde_json::to_vec_pretty(&spec)?).with_context(|| path.display().to_string())?;
        }
        RtCmd::Bench(b) => return bench(b),
        RtCmd::Create(c) => {
            rt()?.create(&c.id, &c.bundle, &create_opts(c)?)?;
        }
        RtCmd::Run(r) => {
            let opts = create_opts(&r.create)?;
            if r.detach {
                rt()?.create(&r.create.id, &r.create.bundle, &opts)?.start()?;
            } else {
                return Ok(rt()?.run(&r.create.id, &r.create.bundle, &opts)?);
            }
        }
        RtCmd::Start { id } => rt()?.load(id)?.start()?,
        RtCmd::State { id } => print_json(&rt()?.load(id)?.state()?)?,
        RtCmd::Kill { all, id, signal } => rt()?.load(id)?.kill(isla_container::parse_signal(signal)?, *all)?,
        RtCmd::Delete { force, id } => match rt()?.load(id) {
            Ok(c) => c.delete(*force)?,
            // runc: deleting a missing container with --force is not an error.
            Err(isla_container::Error::NotFound(_)) if *force => {}
            Err(e) => return Err(e.into()),
        },
        RtCmd::Exec(e) => return exec(&rt()?, e),
        RtCmd::Ps { format, id } => {
            let pids = rt()?.load(id)?.ps()?;
            if format == "json" {
                println!("{}", serde_json::to_string(&pids)?);
            } else {
                println!("{:>8}  CMD", "PID");
                for p in pids {
                    let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                    let cmd: String = String::from_utf8_lossy(&cmd).replace('\0', " ");
                    println!("{p:>8}  {}", cmd.trim_end());
                }
            }
        }
        RtCmd::Pause { id } => rt()?.load(id)?.pause()?,
        RtCmd::Resume { id } => rt()?.load(id)?.resume()?,
        RtCmd::Events { stats, interval, id } => {
            let every = parse_interval(interval)?;
            loop {
                let c = rt()?.load(id)?;
                let ev = serde_json::json!({"type": "stats", "id": id, "data": c.stats()?});
                println!("{ev}");
                if *stats || c.status() == Status::Stopped {
                    break;
                }
                std::thread::sleep(every);
            }
        }
        RtCmd::List { format } => {
            let list = rt()?.list()?;
            if format == "json" {
                print_json(&list)?;
            } else {
                println!("{:<24} {:>8} {:<8} {:<30} BUNDLE", "ID", "PID", "STATUS", "CREATED");
                for s in list {
                    println!("{:<24} {:>8} {:<8} {:<30} {}", s.id, s.pid, s.status, s.created, s.bundle.display());
                }
            }
        }
    }
    Ok(0)
}

fn parse_interval(s: &str) -> Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().with_context(|| format!("--interval {s:?}: use e.g. 5s or 500ms"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(60 * n),
        _ => bail!("--interval {s:?}: use e.g. 5s or 500ms"),
    })
}

fn exec(rt: &Runtime, e: &ExecArgs) -> Result<i32> {
    let c = rt.load(&e.id)?;
    if e.preserve_fds != 0 {
        bail!("--preserve-fds is not supported by isla");
    }
    let process: isla_container::Process = match &e.process {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("--process {}", p.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("--process {}: not a runtime-spec process", p.display()))?
        }
        None => {
            if e.command.is_empty() {
                bail!("exec: give a command after the container id, or --process FILE");
            }
            let mut p = c.spec().process().clone().unwrap_or_default();
            p.set_args(Some(e.command.clone()));
            p.set_terminal(Some(e.tty));
            if let Some(cwd) = &e.cwd {
                p.set_cwd(cwd.clone());
            }
            let mut env = p.env().clone().unwrap_or_default();
            env.extend(e.env.iter().cloned());
            p.set_env(Some(env));
            if let Some(u) = &e.user {
                let (uid, gid) = u.split_once(':').unwrap_or((u, "0"));
                p.user_mut().set_uid(uid.parse().with_context(|| format!("--user {u}: uid[:gid] in numbers"))?);
                p.user_mut().set_gid(gid.parse().with_context(|| format!("--user {u}: uid[:gid] in numbers"))?);
            }
            p
        }
    };
    let opts = ExecOptions { pid_file: e.pid_file.clone(), console_socket: e.console_socket.clone(), detach: e.detach };
    let code = c.exec(&process, &opts)?;
    Ok(if e.detach { 0 } else { code })
}

/// p-th percentile (0..=100) of sorted samples, nearest rank.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn bench(b: &BenchArgs) -> Result<i32> {
    let tmp = std::env::temp_dir().join(format!("isla-runtime-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = bench_in(b, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn bench_in(b: &BenchArgs, tmp: &Path) -> Result<i32> {
    use isla_container::testutil::TestBundle;
    // crun refuses hybrid hosts ("cgroups in hybrid mode not supported, drop all controllers from
    // cgroupv2"): give the whole bench a private mount namespace where the unified hierarchy is
    // unmounted, so all three runtimes see the same pure-v1 layout.
    let hybrid = isla_container::testutil::hide_unified_hierarchy().context("private mount namespace for the bench")?;
    let bundle = TestBundle::new(tmp, "bundle", &["/bin/true"])?;
    bundle.write()?;
    let me = std::env::current_exe()?;
    let mut runtimes: Vec<(&str, PathBuf, Vec<String>)> =
        vec![("isla", me.clone(), vec!["runtime".into(), "--root".into(), tmp.join("isla").display().to_string()])];
    for (name, bin) in [("crun", &b.crun), ("runc", &b.runc)] {
        if bin.is_empty() {
            continue;
        }
        if !Path::new(bin).exists() {
            eprintln!("bench: {bin} not found: {name} left out");
            continue;
        }
        runtimes.push((name, PathBuf::from(bin), vec!["--root".into(), tmp.join(name).display().to_string()]));
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); runtimes.len()];
    // One warm-up run each, then the runtimes take turns so that noise hits all of them alike.
    // The order rotates every round: a run leaves asynchronous kernel work behind (network
    // namespace clean-up, RCU callbacks) that would otherwise always land on the same successor.
    for i in 0..=b.iterations {
        for j in 0..runtimes.len() {
            let k = (i + j) % runtimes.len();
            let (name, bin, global) = &runtimes[k];
            let id = format!("bench-{name}-{i}");
            let t = Instant::now();
            let out = Command::new(bin).args(global).args(["run", "--bundle"]).arg(&bundle.dir).arg(&id).output()?;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            if !out.status.success() {
                bail!("{name} run failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
            }
            if i > 0 {
                samples[k].push(ms);
            }
        }
    }
    println!("run of /bin/true in a busybox bundle, {} runs each (wall time of the whole command, ms)", b.iterations);
    if hybrid {
        println!("(hybrid cgroup host: all runtimes ran in a private mount namespace without the unified hierarchy)");
    }
    println!("{:<6} {:>8} {:>8} {:>8} {:>8}  isla vs", "", "median", "p90", "min", "max");
    let mut medians = Vec::new();
    for s in samples.iter_mut() {
        s.sort_by(|a, b| a.total_cmp(b));
        medians.push(percentile(s, 50.0));
    }
    for (k, (name, _, _)) in runtimes.iter().enumerate() {
        let s = &samples[k];
        let ratio = if k == 0 { String::new() } else { format!("{:.2}x faster", medians[k] / medians[0]) };
        println!(
            "{:<6} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {}",
            name,
            medians[k],
            percentile(s, 90.0),
            s.first().copied().unwrap_or(f64::NAN),
            s.last().copied().unwrap_or(f64::NAN),
            ratio
        );
    }
    Ok(0)
}
