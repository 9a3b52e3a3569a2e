//! `isla vm run`: the monitor's arguments and their translation into an [`isla_vmm::VmConfig`].
//!
//! Shared by the `isla` binary and the small `isla-vmm` binary (src/bin/isla-vmm.rs), which is
//! only the monitor: one long-lived process per guest should not keep the code of the whole
//! command-line tool resident (see `main`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser};
use isla_vmm::config::{
    parse_balloon_arg, parse_memory, parse_vsock_arg, ConsoleConfig, DriveConfig, NetConfig, TemplateChoice,
};
use isla_vmm::VmConfig;

#[derive(Args, Clone)]
pub struct RunArgs {
    /// Kernel: ELF vmlinux or bzImage (default: the guest kit's vmlinux).
    #[arg(long, conflicts_with = "config_file")]
    kernel: Option<PathBuf>,
    /// Which guest-kit kernel to use when --kernel is not given.
    #[arg(long, value_enum, default_value = "auto")]
    flavour: crate::kit::Flavour,
    /// Initial RAM disk (default with the kit's kernel: the kit's initramfs).
    #[arg(long, conflicts_with = "config_file")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, conflicts_with = "config_file")]
    cmdline: Option<String>,
    /// Number of vCPUs (1 to 32).
    #[arg(long, default_value_t = 1, conflicts_with = "config_file")]
    cpus: u8,
    /// Guest memory: 128M, 1G, or a number of MiB.
    #[arg(long, default_value = "128M", conflicts_with = "config_file")]
    memory: String,
    /// Firecracker JSON configuration (boot-source, drives, machine-config, network-interfaces,
    /// vsock, balloon, entropy).
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// A virtio block device: PATH[,ro][,id=NAME] (raw or qcow2; repeatable).
    #[arg(long, value_name = "PATH[,ro][,id=NAME]")]
    disk: Vec<String>,
    /// Boot from this ext4 (or other) disk image as /dev/vda: PATH[,ro]. Without --initrd, the
    /// guest kit's initramfs is then left out.
    #[arg(long, value_name = "PATH[,ro]")]
    rootfs: Option<String>,
    /// A virtio network interface on a host TAP device (created if missing): TAP[,mac=MAC].
    #[arg(long, value_name = "TAP[,mac=MAC]")]
    net: Vec<String>,
    /// A virtio-vsock device; the host side listens on this unix socket (Firecracker's hybrid
    /// vsock: write `CONNECT <port>` after connecting): UDS[,cid=N].
    #[arg(long, value_name = "UDS[,cid=N]")]
    vsock: Option<String>,
    /// A virtio-balloon device: MIB[,deflate-on-oom][,stats=SECONDS][,reporting].
    #[arg(long, value_name = "MIB[,...]")]
    balloon: Option<String>,
    /// Leave out the virtio-rng entropy device.
    #[arg(long)]
    no_entropy: bool,
    /// CPU template: auto (baseline on nested hosts, host elsewhere), host, or baseline.
    #[arg(long, default_value = "auto")]
    cpu_template: String,
    /// Serial console: stdio, null, or file:PATH.
    #[arg(long, default_value = "stdio")]
    console: String,
    /// Stop the VM cleanly (exit status 0) when the console prints this text.
    #[arg(long)]
    stop_on_console: Option<String>,
    /// Serve the run-time API on this unix socket (Firecracker's: GET /, PATCH /balloon,
    /// GET /balloon/statistics; `isla vm balloon` is its client).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Write the run's report (timings, exits, memory) as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Do not handle emulation failures with the instruction fallback.
    #[arg(long)]
    no_insn_fallback: bool,
    /// Profile the guest: sample every vCPU's RIP this many times a second and print the hottest
    /// kernel functions, overall and second by second (symbols from the vmlinux or a System.map
    /// beside a bzImage).
    #[arg(long, value_name = "HZ", value_parser = clap::value_parser!(u32).range(1..=1000))]
    profile: Option<u32>,
    /// Print no summary on standard error.
    #[arg(long, short)]
    quiet: bool,
}

impl RunArgs {
    /// The typed configuration these arguments describe (validated by `isla_vmm::run`).
    pub fn to_config(&self) -> Result<VmConfig> {
        let mut cfg = match &self.config_file {
            Some(f) => isla_vmm::firecracker::load(f)?,
            None => {
                let (kernel, initrd) = crate::kit::boot_files(
                    None,
                    self.kernel.as_deref(),
                    self.flavour,
                    self.initrd.as_deref(),
                    self.rootfs.is_some(),
                )?;
                let mut c = VmConfig::new(kernel);
                c.initrd = initrd;
                if let Some(s) = &self.cmdline {
                    c.cmdline = s.clone();
                }
                c.vcpus = self.cpus;
                c.memory = parse_memory(&self.memory)?;
                c
            }
        };
        if let Some(r) = &self.rootfs {
            cfg.drives.insert(0, DriveConfig::parse_arg(r, true)?);
        }
        for d in &self.disk {
            cfg.drives.push(DriveConfig::parse_arg(d, false)?);
        }
        let first_net = cfg.net.len();
        for (i, n) in self.net.iter().enumerate() {
            cfg.net.push(NetConfig::parse_arg(n, first_net + i)?);
        }
        if let Some(v) = &self.vsock {
            cfg.vsock = Some(parse_vsock_arg(v)?);
        }
        if let Some(b) = &self.balloon {
            cfg.balloon = Some(parse_balloon_arg(b)?);
        }
        cfg.entropy &= !self.no_entropy;
        cfg.cpu_template = self.cpu_template.parse::<TemplateChoice>()?;
        cfg.console = self.console.parse::<ConsoleConfig>()?;
        cfg.stop_on_console = self.stop_on_console.clone();
        cfg.insn_fallback = !self.no_insn_fallback;
        cfg.api_socket = self.api_sock.clone();
        cfg.profile_interval = self.profile.map(|hz| std::time::Duration::from_micros(1_000_000 / u64::from(hz)));
        // isla_vmm::run validates the whole configuration before it touches KVM.
        Ok(cfg)
    }
}

pub fn vm_run(args: &RunArgs) -> Result<i32> {
    let cfg = args.to_config()?;
    let report = isla_vmm::run(&cfg)?;
    if let Some(path) = &args.report {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("--report {}", path.display()))?;
    }
    if !args.quiet {
        eprint!("{}", report.summary());
    }
    Ok(report.exit.exit_code())
}

/// Logs to standard error, filtered by ISLA_LOG (default: warnings), for both binaries.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("ISLA_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
}

/// The process status for a command's result (errors are printed).
pub fn exit_code(result: Result<i32>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("isla: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `isla vm run`'s help.
pub const VM_RUN_ABOUT: &str = "Boot a microVM in this process and run it until the guest powers off or reboots";
/// `isla vm run --help`'s text.
pub const VM_RUN_LONG_ABOUT: &str =
    "Boot a microVM in this process and run it until the guest powers off or reboots.\n\n\
     Exit status: 0 guest powered off (or stopped by --stop-on-console), 1 error, 2 usage error, 3 guest asked \
     for a reboot, 4 guest triple-faulted.";

/// `isla vm run` alone: the same arguments as the `isla vm run` subcommand.
#[derive(Parser)]
#[command(name = "isla vm run", about = VM_RUN_ABOUT, long_about = VM_RUN_LONG_ABOUT)]
pub struct VmRunOnly {
    #[command(flatten)]
    pub args: RunArgs,
}
