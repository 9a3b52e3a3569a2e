//! `isla network ...`: create, list, inspect, remove and prune networks (crate isla-net).
//! Attaching instances and publishing ports is the instance manager's job; this is the
//! administration side.

mod bench;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use isla_net::{Driver, Network, NetworkSpec, Networks};

#[derive(Args)]
pub struct NetworkArgs {
    /// isla's state directory; networks are kept in ROOT/net.
    #[arg(long, global = true, default_value = "/var/lib/isla")]
    root: PathBuf,
    #[command(subcommand)]
    cmd: NetworkCmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum DriverArg {
    /// Gateway on the host, traffic out is masqueraded.
    Nat,
    /// A plain switch, optionally on a host uplink (--parent); no NAT.
    Bridge,
    /// Instances reach each other and the host only.
    HostOnly,
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create a network: a bridge, its gateway address and its rules.
    Create {
        name: String,
        #[arg(long, short, value_enum, default_value = "nat")]
        driver: DriverArg,
        /// Subnet, e.g. 10.90.0.0/24 (default: the first free /24 of 10.88.0.0/16; required for bridge).
        #[arg(long)]
        subnet: Option<isla_net::Ipv4Net>,
        /// Gateway (default: the subnet's first address for nat and host-only).
        #[arg(long)]
        gateway: Option<Ipv4Addr>,
        /// bridge driver: host interface to enslave to the network's bridge.
        #[arg(long)]
        parent: Option<String>,
    },
    /// List networks.
    Ls {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Print networks (attachments and published ports included) as JSON.
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove networks, their bridges and their rules.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
        /// Also detach the instances still attached (their veth or TAP is deleted).
        #[arg(long, short)]
        force: bool,
    },
    /// Remove unused networks and leftovers of crashed instances (isla- links, stale records).
    Prune,
    /// Recreate missing bridges and rules from the state (after a reboot).
    Restore,
    /// Measure the operations and the data paths of a published port, in namespaces of its own.
    Bench(bench::BenchArgs),
}

pub fn run(args: &NetworkArgs) -> Result<()> {
    let nets = || {
        Networks::open(&args.root)
            .with_context(|| format!("opening the network state in {} (--root)", args.root.display()))
    };
    match &args.cmd {
        NetworkCmd::Create { name, driver, subnet, gateway, parent } => {
            let driver = match driver {
                DriverArg::Nat => Driver::Nat,
                DriverArg::Bridge => Driver::Bridge,
                DriverArg::HostOnly => Driver::HostOnly,
            };
            let spec =
                NetworkSpec { name: name.clone(), driver, subnet: *subnet, gateway: *gateway, parent: parent.clone() };
            let n = nets()?.create(&spec)?;
            println!("{} {} {} {}", n.name, n.driver, n.subnet, n.bridge);
        }
        NetworkCmd::Ls { output: Output::Json } => println!("{}", serde_json::to_string_pretty(&nets()?.list()?)?),
        NetworkCmd::Ls { output: Output::Table } => print_table(&nets()?.list()?),
        NetworkCmd::Inspect { names } => {
            let nets = nets()?;
            // Each network with the pid of its DNS responder (null when none runs).
            let found = names
                .iter()
                .map(|n| -> Result<serde_json::Value> {
                    let mut v = serde_json::to_value(nets.inspect(n)?)?;
                    v["dns_responder"] = nets.dns_responder(n)?.map(|r| r.pid).into();
                    Ok(v)
                })
                .collect::<Result<Vec<_>>>()?;
            println!("{}", serde_json::to_string_pretty(&found)?);
        }
        NetworkCmd::Rm { names, force } => {
            // Each name on its own: one failure does not stop the others, but is reported.
            let nets = nets()?;
            let mut failed = 0;
            for n in names {
                match nets.remove(n, *force) {
                    Ok(()) => println!("{n}"),
                    Err(e) => {
                        eprintln!("isla: error: {e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} networks not removed", names.len());
            }
        }
        NetworkCmd::Prune => {
            let r = nets()?.prune()?;
            for a in &r.stale_attachments {
                println!("stale attachment {a}");
            }
            for n in &r.networks {
                println!("network {n}");
            }
            for l in &r.links {
                println!("link {l}");
            }
        }
        NetworkCmd::Restore => {
            for n in nets()?.restore()? {
                println!("{n}");
            }
        }
        NetworkCmd::Bench(b) => bench::run(b)?,
    }
    Ok(())
}

fn print_table(list: &[Network]) {
    println!("{:<20} {:<10} {:<18} {:<16} {:<16} {:>9}", "NAME", "DRIVER", "SUBNET", "GATEWAY", "BRIDGE", "INSTANCES");
    for n in list {
        let gw = n.gateway.map(|g| g.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<20} {:<10} {:<18} {:<16} {:<16} {:>9}",
            n.name,
            n.driver.as_str(),
            n.subnet.to_string(),
            gw,
            n.bridge,
            n.attachments.len()
        );
    }
}
