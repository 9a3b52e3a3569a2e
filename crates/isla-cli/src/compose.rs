//! `isla compose up|down|ps|logs`: stack files in the docker-compose format (crate
//! isla-compose plans them, isla-core's manager and isla-net carry the plan out; services with
//! `build:` are built with `isla build`'s machinery). A failed `up` removes what it made itself
//! (instances, networks, named volumes), newest first; what was there before is left alone.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use isla_compose::{Plan, PlannedService, LABEL_PROJECT, LABEL_SERVICE};
use isla_core::{Instance, Manager};
use isla_net::Networks;

#[derive(Args)]
pub struct ComposeArgs {
    /// The stack file.
    #[arg(short = 'f', long = "file", global = true, default_value = "compose.yaml")]
    file: PathBuf,
    /// Project name (default: the file's `name:`, else its directory's name).
    #[arg(short = 'p', long = "project-name", global = true)]
    project: Option<String>,
    /// isla's state directory (database, instances, images, networks).
    #[arg(long, global = true, default_value = isla_core::DEFAULT_ROOT)]
    root: PathBuf,
    #[command(subcommand)]
    cmd: ComposeCmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum ComposeCmd {
    /// Create the networks and start the services in dependency order.
    Up {
        /// Detached: return once every service runs (required: attached mode is not implemented).
        #[arg(short = 'd', long)]
        detach: bool,
        /// Build the images of services with `build:` even if they exist (and recreate the
        /// services whose image changed).
        #[arg(long)]
        build: bool,
    },
    /// Stop and remove the project's instances, then its networks (and with -v its volumes).
    Down {
        /// Also remove the project's named volumes (not external ones; bind-mounted host
        /// folders are never removed).
        #[arg(short = 'v', long)]
        volumes: bool,
        /// Seconds to wait after SIGTERM before SIGKILL.
        #[arg(short = 't', long, default_value_t = 10)]
        timeout: u64,
    },
    /// List the project's instances.
    Ps {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Print the output of the project's services (or of one).
    Logs {
        /// Only this service.
        service: Option<String>,
        /// Only the last N lines of each service.
        #[arg(short = 'n', long)]
        tail: Option<usize>,
        /// Keep printing new output until no instance of the project (or service) runs (no
        /// `-f`: that is the stack file here).
        #[arg(long)]
        follow: bool,
    },
}

pub fn run(args: &ComposeArgs) -> Result<i32> {
    let plan = isla_compose::load(&args.file, args.project.as_deref())?;
    for w in &plan.warnings {
        eprintln!("isla: warning: {}: {w}", args.file.display());
    }
    let open = || Manager::open(&args.root).with_context(|| format!("opening isla state at {}", args.root.display()));
    match &args.cmd {
        ComposeCmd::Up { detach: false, .. } => {
            bail!("attached `up` is not implemented; use `isla compose up -d` and `isla compose logs`")
        }
        ComposeCmd::Up { detach: true, build } => up(&open()?, &args.root, &plan, *build),
        ComposeCmd::Down { volumes, timeout } => {
            down(&open()?, &args.root, &plan, Duration::from_secs(*timeout), *volumes)
        }
        ComposeCmd::Ps { output } => ps(&open()?, &plan, *output),
        ComposeCmd::Logs { service, tail, follow } => logs(&open()?, &plan, service.as_deref(), *tail, *follow),
    }
}

/// The project's instances, oldest first.
fn instances(m: &Manager, project: &str) -> Result<Vec<Instance>> {
    Ok(m.list(true)?
        .into_iter()
        .filter(|i| i.spec.labels.get(LABEL_PROJECT).map(String::as_str) == Some(project))
        .collect())
}

/// What an `up` made, to be undone if a later step fails.
enum Made {
    Network(String),
    Volume(String),
    Instance(String),
}

fn up(m: &Manager, root: &std::path::Path, plan: &Plan, build: bool) -> Result<i32> {
    let nets = Networks::open(root).with_context(|| format!("opening the network state in {}", root.display()))?;
    let mut made = Vec::new();
    let result = up_steps(m, &nets, plan, build, &mut made);
    if let Err(e) = result {
        for step in made.iter().rev() {
            let undone = match step {
                Made::Instance(n) => m.remove(n, true).map(|_| ()).map_err(anyhow::Error::from),
                Made::Volume(n) => m.volume_remove(n).map_err(anyhow::Error::from),
                Made::Network(n) => nets.remove(n, true).map_err(anyhow::Error::from),
            };
            if let Err(e2) = undone {
                eprintln!("isla: warning: rolling back: {e2:#}");
            }
        }
        return Err(e.context(format!("project {}: nothing of this `up` was kept", plan.project)));
    }
    Ok(0)
}

/// Builds the image of a service with `build:` when `always` or when the store lacks it;
/// whether the image changed.
fn build_service(m: &Manager, s: &PlannedService, always: bool) -> Result<bool> {
    let (Some(b), Some(image)) = (&s.build, s.spec.image.as_deref()) else { return Ok(false) };
    let images = &m.env().images;
    let old = match images.resolve(image) {
        Ok(_) if !always => return Ok(false),
        Ok(i) => Some(i.digest),
        Err(isla_image::Error::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    println!("service {}: building {image} from {}", s.service, b.context.display());
    let r = crate::image::build_image(images, &b.context, b.file.as_deref(), Some(image), &b.args)
        .with_context(|| format!("service {}: building {image}", s.service))?;
    Ok(old.as_ref() != Some(&r.digest))
}

fn up_steps(m: &Manager, nets: &Networks, plan: &Plan, build: bool, made: &mut Vec<Made>) -> Result<()> {
    // Builds first: a broken Containerfile stops `up` before anything is made.
    let mut rebuilt = Vec::new();
    for s in &plan.services {
        if build_service(m, s, build)? {
            rebuilt.push(s.service.as_str());
        }
    }
    for n in &plan.networks {
        match nets.inspect(&n.spec.name) {
            Ok(_) => {}
            Err(isla_net::Error::NoSuchNetwork(_)) if !n.external => {
                nets.create(&n.spec).with_context(|| format!("creating network {}", n.spec.name))?;
                made.push(Made::Network(n.spec.name.clone()));
                println!("network {} created", n.spec.name);
            }
            Err(isla_net::Error::NoSuchNetwork(_)) => {
                bail!("network {} is external but does not exist; make it with `isla network create`", n.spec.name)
            }
            Err(e) => return Err(e.into()),
        }
    }
    for v in &plan.volumes {
        if v.external {
            m.volume_get(&v.name).with_context(|| {
                format!("volume {} is external but does not exist; make it with `isla volume create`", v.name)
            })?;
            continue;
        }
        if m.volume_create(&v.name, &v.labels).with_context(|| format!("creating volume {}", v.name))?.1 {
            made.push(Made::Volume(v.name.clone()));
            println!("volume {} created", v.name);
        }
    }
    for s in &plan.services {
        let name = &s.spec.name;
        let existing = match m.get(name) {
            Ok(i) => Some(i),
            Err(isla_core::Error::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let create = |made: &mut Vec<Made>| -> Result<()> {
            m.create(s.spec.clone()).with_context(|| format!("service {}: creating {name}", s.service))?;
            made.push(Made::Instance(name.clone()));
            Ok(())
        };
        match existing {
            Some(i) if i.spec.labels.get(LABEL_PROJECT) != Some(&plan.project) => {
                bail!("service {}: the name {name} is taken by an instance of another project or of `isla run`; set container_name or remove it", s.service)
            }
            // A rebuilt image: the old instance goes, a new one runs the new image.
            Some(_) if rebuilt.contains(&s.service.as_str()) => {
                m.stop(name, Duration::from_secs(10))?;
                m.remove(name, true).with_context(|| format!("service {}: removing the old {name}", s.service))?;
                create(made)?;
            }
            Some(i) if i.status.is_active() => {
                println!("{name} running");
                continue;
            }
            Some(_) => {}
            None => create(made)?,
        }
        m.start(name, false).with_context(|| format!("service {}: starting {name}", s.service))?;
        println!("{name} started");
    }
    Ok(())
}

fn down(m: &Manager, root: &std::path::Path, plan: &Plan, timeout: Duration, volumes: bool) -> Result<i32> {
    let mut failed = 0;
    // Newest first: dependents go before what they depend on.
    for i in instances(m, &plan.project)?.iter().rev() {
        let name = &i.spec.name;
        match m.stop(name, timeout).and_then(|_| m.remove(name, true)) {
            Ok(_) => println!("{name} removed"),
            Err(e) => {
                eprintln!("isla: error: {name}: {e}");
                failed += 1;
            }
        }
    }
    let nets = Networks::open(root).with_context(|| format!("opening the network state in {}", root.display()))?;
    for n in plan.networks.iter().filter(|n| !n.external) {
        match nets.remove(&n.spec.name, false) {
            Ok(()) => println!("network {} removed", n.spec.name),
            Err(isla_net::Error::NoSuchNetwork(_)) => {}
            Err(e) => {
                eprintln!("isla: error: network {}: {e}", n.spec.name);
                failed += 1;
            }
        }
    }
    for v in plan.volumes.iter().filter(|v| volumes && !v.external) {
        match m.volume_remove(&v.name) {
            Ok(()) => println!("volume {} removed", v.name),
            Err(isla_core::Error::NoSuchVolume(_)) => {}
            Err(e) => {
                eprintln!("isla: error: volume {}: {e}", v.name);
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("project {}: {failed} instances, networks or volumes were not removed", plan.project);
    }
    Ok(0)
}

fn ports(i: &Instance) -> String {
    let p: Vec<String> = i
        .spec
        .ports
        .iter()
        .map(|p| format!("{}:{}->{}/{}", p.host_ip, p.host_port, p.container_port, p.proto))
        .collect();
    p.join(", ")
}

fn ps(m: &Manager, plan: &Plan, output: Output) -> Result<i32> {
    let list = instances(m, &plan.project)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
        Output::Table => {
            println!("{:<24} {:<12} {:<10} {:<12} PORTS", "NAME", "SERVICE", "KIND", "STATUS");
            for i in &list {
                let service = i.spec.labels.get(LABEL_SERVICE).map(String::as_str).unwrap_or("-");
                let status = i.status.to_string();
                println!("{:<24} {:<12} {:<10} {:<12} {}", i.spec.name, service, i.spec.kind, status, ports(i));
            }
        }
    }
    Ok(0)
}

fn logs(m: &Manager, plan: &Plan, service: Option<&str>, tail: Option<usize>, follow: bool) -> Result<i32> {
    if let Some(s) = service {
        if !plan.services.iter().any(|p| p.service == s) {
            bail!("there is no service `{s}` in the stack file");
        }
    }
    let list: Vec<Instance> = instances(m, &plan.project)?
        .into_iter()
        .filter(|i| service.is_none_or(|s| i.spec.labels.get(LABEL_SERVICE).map(String::as_str) == Some(s)))
        .collect();
    let width = list.iter().map(|i| i.spec.name.len()).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    let mut print = |i: &Instance, recs: &[isla_core::logs::Record]| -> Result<()> {
        for r in recs {
            write!(out, "{:<width$} | ", i.spec.name)?;
            out.write_all(&r.text)?;
            if r.full {
                writeln!(out)?;
            }
        }
        Ok(out.flush()?)
    };
    let mut offsets = Vec::new();
    for i in &list {
        let (mut recs, offset) = m.logs_from(&i.id, 0)?;
        if let Some(n) = tail {
            recs.drain(..isla_core::logs::tail_start(&recs, n));
        }
        print(i, &recs)?;
        offsets.push(offset);
    }
    if !follow {
        return Ok(0);
    }
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let mut running = false;
        for (i, offset) in list.iter().zip(offsets.iter_mut()) {
            // Status before the log: the last lines of an instance that just ended are read.
            let Ok(now) = m.get(&i.id) else { continue };
            running |= now.status.is_active();
            let (recs, next) = m.logs_from(&i.id, *offset)?;
            *offset = next;
            print(i, &recs)?;
        }
        if !running {
            return Ok(0);
        }
    }
}
