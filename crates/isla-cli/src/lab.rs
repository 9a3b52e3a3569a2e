//! `isla lab`: the comparison lab (crates/isla-lab) with a progress bar on standard error, the
//! seed's table on standard output, and the report files under --out.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use isla_lab::{Kind, KitPaths};

use crate::kit::{Flavour, Kit};

#[derive(Args)]
pub struct LabArgs {
    /// Fewer runs, smaller density bounds, shorter workloads (under 10 minutes here).
    #[arg(long)]
    quick: bool,
    /// Kinds to measure, comma-separated: microvm, container, vm.
    #[arg(long, value_delimiter = ',', default_value = "microvm,container,vm")]
    kinds: Vec<Kind>,
    /// Start runs per kind and peer (default 3 with --quick, else 5).
    #[arg(long)]
    runs: Option<usize>,
    /// Write results.json, report.md and report.html here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A Firecracker binary, measured beside isla's microVM.
    #[arg(long)]
    firecracker: Option<PathBuf>,
    /// A crun binary, measured beside isla's runtime.
    #[arg(long)]
    crun: Option<PathBuf>,
    /// A runc binary, measured beside isla's runtime.
    #[arg(long)]
    runc: Option<PathBuf>,
    /// A qemu-system-x86_64 binary, run with a plain command line beside isla's VM.
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Measure nothing: render the tables (and --out's reports) from an earlier results.json.
    #[arg(long, value_name = "RESULTS_JSON")]
    from_results: Option<PathBuf>,
    /// Memory budget for the density measurement, MiB.
    #[arg(long, default_value_t = 1024)]
    budget_mib: u64,
}

struct Bar(ProgressBar);

impl isla_lab::Progress for Bar {
    fn begin(&self, stage: &str) {
        self.0.inc(1);
        self.0.set_message(stage.to_string());
    }
    fn note(&self, line: &str) {
        self.0.set_message(line.to_string());
    }
}

/// Prints the tables and writes --out's files.
fn report(results: &isla_lab::Results, out: Option<&PathBuf>) -> Result<()> {
    print!("{}", isla_lab::render::terminal(results));
    if let Some(out) = out {
        isla_lab::write_report(results, out)?;
        let d = out.display();
        println!("report: {d}/report.html, {d}/report.md, raw samples {d}/results.json");
    }
    Ok(())
}

pub fn run(a: &LabArgs) -> Result<()> {
    if let Some(path) = &a.from_results {
        let text = std::fs::read_to_string(path).with_context(|| format!("--from-results {}", path.display()))?;
        let results: isla_lab::Results = serde_json::from_str(&text)
            .with_context(|| format!("--from-results {}: not a results.json written by isla lab", path.display()))?;
        return report(&results, a.out.as_ref());
    }
    let runs = a.runs.unwrap_or(if a.quick { 3 } else { 5 });
    if runs == 0 {
        bail!("--runs: at least 1");
    }
    if a.kinds.is_empty() {
        bail!("--kinds: name at least one of microvm, container, vm");
    }
    if let Some(out) = &a.out {
        if out.exists() && !out.is_dir() {
            bail!("--out {}: exists and is not a directory", out.display());
        }
    }
    // crun refuses hybrid cgroup hosts: as `isla runtime bench` does, give the whole lab (and so
    // every runtime it starts, isla's too) a private mount namespace without the unified
    // hierarchy. This must happen while the process has one thread, before the progress bar.
    let hybrid = a.kinds.contains(&Kind::Container)
        && isla_container::testutil::hide_unified_hierarchy()
            .context("private mount namespace for the container runs")?;
    let kit = Kit::find().map_err(|e| format!("{e:#}")).map(|k| KitPaths {
        microvm_kernel: k.kernel(Flavour::Auto, false).clone(),
        vm_kernel: k.kernel(Flavour::Standard, true).clone(),
        initramfs: k.initramfs.clone(),
    });
    let opts = isla_lab::Options {
        quick: a.quick,
        kinds: a.kinds.clone(),
        runs,
        isla: std::env::current_exe().context("finding the isla binary")?,
        kit,
        firecracker: a.firecracker.clone(),
        crun: a.crun.clone(),
        runc: a.runc.clone(),
        qemu: a.qemu.clone(),
        budget_mib: a.budget_mib,
        kvm: std::path::Path::new("/dev/kvm").exists(),
    };
    isla_lab::host::stop_on_signals()?;
    let stages = 2
        + a.kinds.len() as u64
        + [&a.firecracker, &a.crun, &a.runc, &a.qemu].iter().filter(|p| p.is_some()).count() as u64;
    let bar = ProgressBar::new(stages);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let results = isla_lab::run(&opts, &Bar(bar.clone()));
    bar.finish_and_clear();
    let results = results?;
    if hybrid {
        println!("(hybrid cgroup host: the runtimes ran in a private mount namespace without the unified hierarchy)");
    }
    report(&results, a.out.as_ref())
}
