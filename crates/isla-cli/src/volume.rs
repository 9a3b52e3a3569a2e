//! `isla volume create|ls|inspect|rm|prune`: named volumes (isla-core's `volume` module), the
//! directories `-v NAME:/path` mounts.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use isla_core::Manager;

#[derive(Args)]
pub struct VolumeArgs {
    /// isla's state directory (database, instances, images, networks, volumes).
    #[arg(long, global = true, default_value = isla_core::DEFAULT_ROOT)]
    root: PathBuf,
    #[command(subcommand)]
    cmd: VolumeCmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a volume (an existing one is left as it is).
    Create {
        name: String,
        /// A label KEY=VALUE.
        #[arg(short = 'l', long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// List volumes.
    Ls {
        /// Print names only.
        #[arg(short, long)]
        quiet: bool,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Show volumes as JSON (mount point, labels, instances using them).
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove volumes and their files (refused while an instance mounts them).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove every volume no instance mounts.
    Prune,
}

pub fn run(args: &VolumeArgs) -> Result<i32> {
    let m = Manager::open(&args.root).with_context(|| format!("opening isla state at {}", args.root.display()))?;
    match &args.cmd {
        VolumeCmd::Create { name, labels } => {
            let labels = labels
                .iter()
                .map(|l| {
                    let (k, v) = l.split_once('=').unwrap_or((l, ""));
                    (k.to_string(), v.to_string())
                })
                .collect();
            m.volume_create(name, &labels)?;
            println!("{name}");
        }
        VolumeCmd::Ls { quiet, output } => {
            let list = m.volume_list()?;
            match output {
                _ if *quiet => list.iter().for_each(|v| println!("{}", v.name)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                Output::Table => {
                    println!("{:<8}  {:<32}  {:<20}  IN USE BY", "DRIVER", "NAME", "CREATED");
                    for v in &list {
                        let created = v.created.get(..19).unwrap_or(&v.created).replace('T', " ");
                        println!("{:<8}  {:<32}  {:<20}  {}", v.driver, v.name, created, v.in_use_by.join(", "));
                    }
                }
            }
        }
        VolumeCmd::Inspect { names } => {
            let mut found = Vec::new();
            let code = crate::lifecycle::each(names, |n| {
                found.push(m.volume_get(n)?);
                Ok(())
            })?;
            println!("{}", serde_json::to_string_pretty(&found)?);
            return Ok(code);
        }
        VolumeCmd::Rm { names } => {
            return crate::lifecycle::each(names, |n| {
                m.volume_remove(n)?;
                println!("{n}");
                Ok(())
            })
        }
        VolumeCmd::Prune => {
            for n in m.volume_prune()? {
                println!("{n}");
            }
        }
    }
    Ok(0)
}
