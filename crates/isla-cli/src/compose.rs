//! `isla compose up|down|ps|logs`: stack files in the docker-compose format (crate
//! isla-compose plans them, isla-core's manager and isla-net carry the plan out). A failed `up`
//! removes what it made itself, newest first; instances and networks that were there before
//! are left alone.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use isla_compose::{Plan, LABEL_PROJECT, LABEL_SERVICE};
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
    },
    /// Stop and remove the project's instances, then its networks.
    Down {
        /// Accepted for compatibility: isla compose has only bind mounts, which are never removed.
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
    },
}

pub fn run(args: &ComposeArgs) -> Result<i32> {
    let plan = isla_compose::load(&args.file, args.project.as_deref())?;
    let open = || Manager::open(&args.root).with_context(|| format!("opening isla state at {}", args.root.display()));
    match &args.cmd {
        ComposeCmd::Up { detach: false } => {
            bail!("attached `up` is not implemented; use `isla compose up -d` and `isla compose logs`")
        }
        ComposeCmd::Up { detach: true } => up(&open()?, &args.root, &plan),
        ComposeCmd::Down { volumes: _, timeout } => down(&open()?, &args.root, &plan, Duration::from_secs(*timeout)),
        ComposeCmd::Ps { output } => ps(&open()?, &plan, *output),
        ComposeCmd::Logs { service, tail } => logs(&open()?, &plan, service.as_deref(), *tail),
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
    Instance(String),
}

fn up(m: &Manager, root: &std::path::Path, plan: &Plan) -> Result<i32> {
    let nets = Networks::open(root).with_context(|| format!("opening the network state in {}", root.display()))?;
    let mut made = Vec::new();
    let result = up_steps(m, &nets, plan, &mut made);
    if let Err(e) = result {
        for step in made.iter().rev() {
            let undone = match step {
                Made::Instance(n) => m.remove(n, true).map(|_| ()).map_err(anyhow::Error::from),
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

fn up_steps(m: &Manager, nets: &Networks, plan: &Plan, made: &mut Vec<Made>) -> Result<()> {
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
    for s in &plan.services {
        let name = &s.spec.name;
        let existing = match m.get(name) {
            Ok(i) => Some(i),
            Err(isla_core::Error::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        match existing {
            Some(i) if i.spec.labels.get(LABEL_PROJECT) != Some(&plan.project) => {
                bail!("service {}: the name {name} is taken by an instance of another project or of `isla run`; set container_name or remove it", s.service)
            }
            Some(i) if i.status.is_active() => println!("{name} running"),
            Some(_) => {
                m.start(name, false).with_context(|| format!("service {}: starting {name}", s.service))?;
                println!("{name} started");
            }
            None => {
                m.create(s.spec.clone()).with_context(|| format!("service {}: creating {name}", s.service))?;
                made.push(Made::Instance(name.clone()));
                m.start(name, false).with_context(|| format!("service {}: starting {name}", s.service))?;
                println!("{name} started");
            }
        }
    }
    Ok(())
}

fn down(m: &Manager, root: &std::path::Path, plan: &Plan, timeout: Duration) -> Result<i32> {
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
    if failed > 0 {
        bail!("project {}: {failed} instances or networks were not removed", plan.project);
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

fn logs(m: &Manager, plan: &Plan, service: Option<&str>, tail: Option<usize>) -> Result<i32> {
    if let Some(s) = service {
        if !plan.services.iter().any(|p| p.service == s) {
            bail!("there is no service `{s}` in the stack file");
        }
    }
    let list = instances(m, &plan.project)?;
    let width = list.iter().map(|i| i.spec.name.len()).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for i in list {
        if service.is_some_and(|s| i.spec.labels.get(LABEL_SERVICE).map(String::as_str) != Some(s)) {
            continue;
        }
        for r in m.logs(&i.id, tail)? {
            write!(out, "{:<width$} | ", i.spec.name)?;
            out.write_all(&r.text)?;
            if r.full {
                writeln!(out)?;
            }
        }
    }
    Ok(0)
}
