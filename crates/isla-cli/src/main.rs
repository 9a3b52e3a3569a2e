//! `isla`: one command for microVMs (and, as the project grows, containers and full VMs).
//! Argument parsing and output only; the work is done by the library crates.

mod bench;
mod buildrun;
mod compose;
mod daemon;
mod disk;
mod dns;
mod docs;
mod image;
mod kit;
mod lab;
mod lifecycle;
mod network;
mod peer;
mod qemu;
mod runtime;
mod vmexec;
mod vmrun;
mod volume;

use std::path::Path;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmrun::{exit_code, vm_run, RunArgs, VmRunOnly, VM_RUN_ABOUT, VM_RUN_LONG_ABOUT};

#[derive(Parser)]
#[command(name = "isla", version, about = "microVMs, containers and full VMs under one roof, measured side by side")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// microVMs on isla's own KVM monitor.
    #[command(subcommand)]
    Vm(Box<VmCmd>),
    /// The guest kit: kernel, initramfs and rootfs for microVMs.
    #[command(subcommand)]
    Guest(GuestCmd),
    /// Containers: the OCI runtime, with runc's command line (also as a symlink named isla-runc).
    Runtime(Box<runtime::RuntimeArgs>),
    /// Disk images (raw, qcow2) with qemu-img's conventions.
    #[command(subcommand)]
    Disk(disk::DiskCmd),
    /// Container images: store, import/export, registry, build.
    Image(image::ImageArgs),
    /// Build an image from a Containerfile (same as `isla image build`).
    Build(image::BuildArgs),
    /// Networks: bridges with NAT, bridged or host-only, for containers and microVMs.
    Network(network::NetworkArgs),
    /// Full VMs driven through QEMU: disks, ISO, VNC, snapshots, linked clones.
    Qemu(qemu::QemuArgs),
    /// Named volumes: directories below the state root that outlive instances (`-v NAME:/path`).
    Volume(volume::VolumeArgs),
    /// Stack files in the docker-compose format: up, down, ps, logs.
    Compose(compose::ComposeArgs),
    /// The REST API (unix socket, or TCP with a token): instances, events, Prometheus metrics.
    Daemon(daemon::DaemonArgs),
    #[command(flatten)]
    Lifecycle(Box<lifecycle::LifecycleCmd>),
    /// The comparison lab: VMs, containers and microVMs measured side by side, with a report.
    Lab(Box<lab::LabArgs>),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(docs::CompletionsArgs),
    /// Write man pages for isla and every subcommand.
    Man(docs::ManArgs),
    /// (internal) The DNS responder of one network, started by the first instance on it.
    #[command(name = "__dns", hide = true)]
    Dns(dns::DnsArgs),
}

#[derive(Subcommand)]
enum VmCmd {
    #[command(about = VM_RUN_ABOUT, long_about = VM_RUN_LONG_ABOUT)]
    Run(Box<RunArgs>),
    /// Measure microVM boot time and monitor memory (several runs, median and spread).
    Bench(bench::BenchArgs),
    /// Run a command in a running microVM through its agent (the VM needs a vsock device).
    Exec(vmexec::ExecArgs),
    /// Read or change a running microVM's balloon through its API socket (`--api-sock`).
    Balloon(vmexec::BalloonArgs),
}

#[derive(Subcommand)]
enum GuestCmd {
    /// Build (or find in ~/.cache/isla) the guest kernel, initramfs and rootfs.
    Build,
    /// Print where the guest kit is.
    Path,
}

fn main() -> ExitCode {
    vmrun::init_logging();
    if std::env::args_os().next().is_some_and(|a| Path::new(&a).file_name() == Some("isla-runc".as_ref())) {
        return runtime::main_as_runc();
    }
    // The monitor is one long-lived process per guest: `isla vm run` becomes the small isla-vmm
    // binary installed beside this one (the same arguments), so the guest's monitor does not keep
    // this binary's start-up (relocations, the whole command tree) resident: about 4 MiB of Pss
    // (docs/vmm.md). Without isla-vmm it runs here, parsed on its own.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.len() >= 3 && argv[1] == "vm" && argv[2] == "run" {
        if let Some(vmm) = std::env::current_exe().ok().map(|e| e.with_file_name("isla-vmm")).filter(|p| p.is_file()) {
            use std::os::unix::process::CommandExt;
            let e = std::process::Command::new(&vmm).args(&argv[3..]).exec();
            eprintln!("isla: error: running {}: {e}", vmm.display());
            return ExitCode::from(1);
        }
        let only = VmRunOnly::parse_from(std::iter::once("isla vm run".into()).chain(argv[3..].iter().cloned()));
        return exit_code(vm_run(&only.args));
    }
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Cmd::Vm(v) => match v.as_ref() {
            VmCmd::Run(a) => vm_run(a),
            VmCmd::Bench(a) => bench::run(a).map(|()| 0),
            VmCmd::Exec(a) => vmexec::run(a),
            VmCmd::Balloon(a) => vmexec::balloon(a),
        },
        Cmd::Guest(GuestCmd::Build) => kit::build().map(|k| {
            k.print();
            0
        }),
        Cmd::Guest(GuestCmd::Path) => kit::Kit::find().map(|k| {
            k.print();
            0
        }),
        Cmd::Runtime(a) => return ExitCode::from(runtime::run(a) as u8),
        Cmd::Disk(d) => disk::run(d),
        Cmd::Image(a) => image::run(a).map(|()| 0),
        Cmd::Build(a) => image::build(a).map(|()| 0),
        Cmd::Network(a) => network::run(a).map(|()| 0),
        Cmd::Qemu(a) => qemu::run(a),
        Cmd::Volume(a) => volume::run(a),
        Cmd::Compose(a) => compose::run(a),
        Cmd::Daemon(a) => daemon::run(a),
        Cmd::Lifecycle(c) => lifecycle::run(c),
        Cmd::Lab(a) => lab::run(a).map(|()| 0),
        Cmd::Completions(a) => docs::completions(a).map(|()| 0),
        Cmd::Man(a) => docs::man(a).map(|()| 0),
        Cmd::Dns(a) => dns::run(a),
    };
    exit_code(result)
}
