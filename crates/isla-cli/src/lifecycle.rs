//! Instance lifecycle with Docker's conventions: `isla create|run|start|stop|restart|pause|
//! resume|kill|rm|ps|inspect|logs|exec|stats` (crate isla-core), and the hidden
//! `isla __supervise` that each started instance runs under.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use isla_core::logs::Stream;
use isla_core::{model, ExecRequest, Instance, InstanceSpec, Kind, Manager, Status};

mod bench;

#[derive(Args, Clone)]
pub struct Root {
    /// isla's state directory (database, instances, images, networks).
    #[arg(long, default_value = isla_core::DEFAULT_ROOT)]
    root: PathBuf,
}

impl Root {
    fn open(&self) -> Result<Manager> {
        Manager::open(&self.root).with_context(|| format!("opening isla state at {}", self.root.display()))
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum KindArg {
    Container,
    Microvm,
    Vm,
}

/// What `create` and `run` share.
#[derive(Args, Clone)]
pub struct CreateArgs {
    #[command(flatten)]
    root: Root,
    /// Name (also the hostname and the DNS name on its network); default: the short id.
    #[arg(long)]
    name: Option<String>,
    /// Publish a port: [HOST_IP:]HOST_PORT:PORT[/tcp|udp].
    #[arg(short = 'p', long = "publish", value_name = "PORT")]
    ports: Vec<String>,
    /// Mount a host directory (/HOST/DIR:/GUEST/DIR[:ro], made if missing) or a named volume
    /// (NAME:/GUEST/DIR[:ro], made on first use; see `isla volume`).
    #[arg(short = 'v', long = "volume", value_name = "VOLUME")]
    volumes: Vec<String>,
    /// Set an environment variable: KEY=VALUE (or KEY to pass this shell's value).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory inside the instance.
    #[arg(short = 'w', long)]
    workdir: Option<String>,
    /// CPU limit, e.g. 0.5.
    #[arg(long)]
    cpus: Option<String>,
    /// Memory limit, e.g. 64m or 1g.
    #[arg(short = 'm', long)]
    memory: Option<String>,
    /// Restart policy: no, always, unless-stopped, on-failure[:N].
    #[arg(long, default_value = "no")]
    restart: String,
    /// Remove the instance when it exits.
    #[arg(long)]
    rm: bool,
    /// Network to join (default isla0, made on first use; `none` for no network).
    #[arg(long, alias = "net")]
    network: Option<String>,
    /// A label KEY=VALUE.
    #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// What runs it.
    #[arg(long, value_enum, default_value = "container")]
    kind: KindArg,
    /// microVM: kernel to boot (default: the guest kit's).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// microVM: ext4 root file system image (default: the guest kit's initramfs).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Image (e.g. busybox, built in); `kit` for a microVM of the guest kit.
    image: String,
    /// Command and arguments (default: the image's CMD); for a microVM, words added to the
    /// kernel command line.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

impl CreateArgs {
    fn spec(&self) -> Result<InstanceSpec> {
        let mut s = InstanceSpec::container(self.name.clone().unwrap_or_default(), self.image.clone());
        s.kind = match self.kind {
            KindArg::Container => Kind::Container,
            KindArg::Microvm => Kind::Microvm,
            KindArg::Vm => Kind::Vm,
        };
        s.command = self.command.clone();
        s.kernel = self.kernel.clone();
        s.rootfs = self.rootfs.clone();
        s.env = self.env.clone();
        s.workdir = self.workdir.clone();
        s.ports = self.ports.iter().map(|p| p.parse()).collect::<Result<_, isla_net::Error>>().context("-p")?;
        s.volumes = self.volumes.iter().map(|v| v.parse()).collect::<Result<_, _>>()?;
        s.cpus = self.cpus.as_deref().map(model::parse_cpus).transpose()?;
        s.memory = self.memory.as_deref().map(model::parse_memory).transpose()?;
        s.restart = self.restart.parse()?;
        s.auto_remove = self.rm;
        s.network = self.network.clone();
        for l in &self.labels {
            let (k, v) = l.split_once('=').unwrap_or((l, ""));
            s.labels.insert(k.to_string(), v.to_string());
        }
        Ok(s)
    }
}

#[derive(Args, Clone)]
pub struct Names {
    #[command(flatten)]
    root: Root,
    /// Instance names or ids.
    #[arg(required = true)]
    names: Vec<String>,
}

#[derive(Subcommand)]
pub enum LifecycleCmd {
    /// Create an instance (not started).
    Create(CreateArgs),
    /// Create and start an instance; without -d, wait for it and exit with its exit code.
    Run {
        #[command(flatten)]
        create: CreateArgs,
        /// Run in the background and print the id.
        #[arg(short, long)]
        detach: bool,
    },
    /// Start instances (detached), or one attached with -a.
    Start {
        #[command(flatten)]
        names: Names,
        /// Attach: show the output and exit with the instance's exit code.
        #[arg(short, long)]
        attach: bool,
    },
    /// Stop instances: SIGTERM, then SIGKILL after the timeout.
    Stop {
        #[command(flatten)]
        names: Names,
        /// Seconds to wait before SIGKILL.
        #[arg(short, long, default_value_t = 10)]
        time: u64,
    },
    /// Stop and start instances.
    Restart {
        #[command(flatten)]
        names: Names,
        /// Seconds to wait before SIGKILL.
        #[arg(short, long, default_value_t = 10)]
        time: u64,
    },
    /// Send a signal to instances (default SIGKILL).
    Kill {
        #[command(flatten)]
        names: Names,
        #[arg(short, long, default_value = "KILL")]
        signal: String,
    },
    /// Freeze instances.
    Pause(Names),
    /// Thaw instances.
    #[command(alias = "unpause")]
    Resume(Names),
    /// Remove instances.
    Rm {
        #[command(flatten)]
        names: Names,
        /// Kill running instances first.
        #[arg(short, long)]
        force: bool,
    },
    /// List instances.
    Ps {
        #[command(flatten)]
        root: Root,
        /// Include instances that do not run.
        #[arg(short, long)]
        all: bool,
        /// Print ids only.
        #[arg(short, long)]
        quiet: bool,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show instances as JSON.
    Inspect(Names),
    /// Print an instance's output.
    Logs {
        #[command(flatten)]
        root: Root,
        name: String,
        /// Only the last N lines.
        #[arg(short = 'n', long)]
        tail: Option<usize>,
        /// Prefix each line with the time it was read.
        #[arg(short, long)]
        timestamps: bool,
        /// Keep printing new output until the instance ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Run a command in a running instance.
    Exec {
        #[command(flatten)]
        root: Root,
        /// KEY=VALUE for the command.
        #[arg(short, long)]
        env: Vec<String>,
        /// Working directory.
        #[arg(short, long)]
        workdir: Option<String>,
        /// Allocate a terminal.
        #[arg(short, long)]
        tty: bool,
        /// Accepted for Docker compatibility (stdin is always passed).
        #[arg(short, long)]
        interactive: bool,
        name: String,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// CPU, memory and process figures of running instances (one sample over half a second).
    Stats {
        #[command(flatten)]
        root: Root,
        /// Instances (default: every running one).
        names: Vec<String>,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Measure instance start-up: `run -d` to an HTTP answer, many `run -d` at once, the
    /// supervisors' memory (in a network namespace of its own, on a scratch root).
    InstanceBench(bench::BenchArgs),
    /// (internal) Supervise one instance: the parent of its process.
    #[command(name = "__supervise", hide = true)]
    Supervise {
        #[command(flatten)]
        root: Root,
        #[arg(long)]
        ready_fd: Option<i32>,
        #[arg(long)]
        attach: bool,
        id: String,
    },
}

/// Runs one lifecycle command; the process's exit code.
pub fn run(cmd: &LifecycleCmd) -> Result<i32> {
    match cmd {
        LifecycleCmd::Create(a) => {
            let inst = a.root.open()?.create(a.spec()?)?;
            println!("{}", inst.id);
            Ok(0)
        }
        LifecycleCmd::Run { create: a, detach } => {
            let started = a.root.open()?.run(a.spec()?, !detach)?;
            if *detach {
                println!("{}", started.instance.id);
                return Ok(0);
            }
            Ok(started.wait()?)
        }
        LifecycleCmd::Start { names, attach } => {
            let m = names.root.open()?;
            if *attach {
                let [name] = names.names.as_slice() else { bail!("start -a takes one instance") };
                return Ok(m.start(name, true)?.wait()?);
            }
            each(&names.names, |n| {
                m.start(n, false)?;
                println!("{n}");
                Ok(())
            })
        }
        LifecycleCmd::Stop { names, time } => {
            let m = names.root.open()?;
            each(&names.names, |n| {
                m.stop(n, Duration::from_secs(*time))?;
                println!("{n}");
                Ok(())
            })
        }
        LifecycleCmd::Restart { names, time } => {
            let m = names.root.open()?;
            each(&names.names, |n| {
                m.restart(n, Duration::from_secs(*time))?;
                println!("{n}");
                Ok(())
            })
        }
        LifecycleCmd::Kill { names, signal } => {
            let sig = isla_container::parse_signal(signal)?;
            let m = names.root.open()?;
            each(&names.names, |n| {
                m.kill(n, sig)?;
                println!("{n}");
                Ok(())
            })
        }
        LifecycleCmd::Pause(names) => {
            let m = names.root.open()?;
            each(&names.names, |n| m.pause(n).map(|_| println!("{n}")).map_err(Into::into))
        }
        LifecycleCmd::Resume(names) => {
            let m = names.root.open()?;
            each(&names.names, |n| m.resume(n).map(|_| println!("{n}")).map_err(Into::into))
        }
        LifecycleCmd::Rm { names, force } => {
            let m = names.root.open()?;
            each(&names.names, |n| m.remove(n, *force).map(|_| println!("{n}")).map_err(Into::into))
        }
        LifecycleCmd::Ps { root, all, quiet, output } => ps(&root.open()?, *all, *quiet, *output),
        LifecycleCmd::Inspect(names) => {
            let m = names.root.open()?;
            let mut found = Vec::new();
            let code = each(&names.names, |n| {
                found.push(m.get(n)?);
                Ok(())
            })?;
            println!("{}", serde_json::to_string_pretty(&found)?);
            Ok(code)
        }
        LifecycleCmd::Logs { root, name, tail, timestamps, follow } => {
            logs(&root.open()?, name, *tail, *timestamps, *follow)
        }
        LifecycleCmd::Exec { root, env, workdir, tty, interactive: _, name, command } => {
            let req = ExecRequest { args: command.clone(), env: env.clone(), workdir: workdir.clone(), tty: *tty };
            Ok(root.open()?.exec(name, &req)?)
        }
        LifecycleCmd::Stats { root, names, output } => stats(&root.open()?, names, *output),
        LifecycleCmd::InstanceBench(a) => bench::run(a).map(|()| 0),
        LifecycleCmd::Supervise { root, ready_fd, attach, id } => {
            let helper = std::env::current_exe().context("finding the isla executable")?;
            Ok(isla_core::supervise::supervise(&root.root, helper, id, *attach, *ready_fd)?)
        }
    }
}

/// Runs `f` for each name; errors are printed and make the exit code 1, the others still run.
pub fn each(names: &[String], mut f: impl FnMut(&str) -> Result<()>) -> Result<i32> {
    let mut code = 0;
    for n in names {
        if let Err(e) = f(n) {
            eprintln!("isla: error: {e:#}");
            code = 1;
        }
    }
    Ok(code)
}

fn ports(i: &Instance) -> String {
    i.spec
        .ports
        .iter()
        .map(|p| format!("{}:{}->{}/{}", p.host_ip, p.host_port, p.container_port, p.proto))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ps(m: &Manager, all: bool, quiet: bool, output: Output) -> Result<i32> {
    let list = m.list(all)?;
    if quiet {
        for i in &list {
            println!("{}", i.short_id());
        }
        return Ok(0);
    }
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    println!(
        "{:<12}  {:<16}  {:<9}  {:<14}  {:<20}  {:<19}  {:<12}  PORTS",
        "ID", "NAME", "KIND", "IMAGE", "COMMAND", "CREATED", "STATUS"
    );
    for i in &list {
        let mut cmd = i.spec.command.join(" ");
        if cmd.chars().count() > 20 {
            cmd = cmd.chars().take(19).collect::<String>() + "…";
        }
        let created = i.created.get(..19).unwrap_or(&i.created).replace('T', " ");
        println!(
            "{:<12}  {:<16}  {:<9}  {:<14}  {:<20}  {:<19}  {:<12}  {}",
            i.short_id(),
            i.spec.name,
            i.spec.kind,
            i.spec.image.as_deref().unwrap_or("-"),
            cmd,
            created,
            i.status.to_string(),
            ports(i)
        );
    }
    Ok(0)
}

fn logs(m: &Manager, name: &str, tail: Option<usize>, timestamps: bool, follow: bool) -> Result<i32> {
    let (mut recs, mut offset) = m.logs_from(name, 0)?;
    if let Some(n) = tail {
        recs.drain(..isla_core::logs::tail_start(&recs, n));
    }
    let mut active = follow && m.get(name)?.status.is_active();
    loop {
        let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
        for r in &recs {
            let w: &mut dyn Write = if r.stream == Stream::Stdout { &mut out } else { &mut err };
            if timestamps {
                write!(w, "{} ", r.time)?;
            }
            w.write_all(&r.text)?;
            if r.full {
                w.write_all(b"\n")?;
            }
        }
        out.flush()?;
        if !active {
            return Ok(0);
        }
        drop((out, err));
        std::thread::sleep(Duration::from_millis(200));
        // Status before the log: the last lines of an instance that just ended are printed.
        active = m.get(name)?.status.is_active();
        (recs, offset) = m.logs_from(name, offset)?;
    }
}

fn stats(m: &Manager, names: &[String], output: Output) -> Result<i32> {
    let names: Vec<String> = if names.is_empty() {
        m.list(false)?.into_iter().filter(|i| i.status == Status::Running).map(|i| i.id).collect()
    } else {
        names.to_vec()
    };
    let t0 = Instant::now();
    let mut first = BTreeMap::new();
    for n in &names {
        first.insert(n.clone(), m.stats(n)?.1.cpu_ns);
    }
    std::thread::sleep(Duration::from_millis(500));
    let wall = t0.elapsed().as_nanos() as f64;
    let mut rows = Vec::new();
    for n in &names {
        let (inst, s) = m.stats(n)?;
        let cpu = (s.cpu_ns.saturating_sub(first[n]) as f64) / wall * 100.0;
        rows.push(serde_json::json!({
            "id": inst.id, "name": inst.spec.name, "cpu_percent": (cpu * 100.0).round() / 100.0,
            "memory": s.memory, "memory_limit": s.memory_limit, "pids": s.pids,
        }));
    }
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    println!("{:<12}  {:<16}  {:>7}  {:>22}  {:>5}", "ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "PIDS");
    let mib = |b: u64| format!("{:.1}MiB", b as f64 / (1u64 << 20) as f64);
    for r in &rows {
        let limit = r["memory_limit"].as_u64().map(mib).unwrap_or_else(|| "-".into());
        println!(
            "{:<12}  {:<16}  {:>6.2}%  {:>22}  {:>5}",
            r["id"].as_str().unwrap_or_default().get(..12).unwrap_or_default(),
            r["name"].as_str().unwrap_or_default(),
            r["cpu_percent"].as_f64().unwrap_or_default(),
            format!("{} / {limit}", mib(r["memory"].as_u64().unwrap_or_default())),
            r["pids"]
        );
    }
    Ok(0)
}
