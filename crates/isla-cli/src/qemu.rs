//! `isla qemu ...`: full VMs driven through QEMU (crate isla-qemu), for trying them by hand.
//! Each VM is a directory ROOT/qemu/NAME; the manager will drive the same library.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use isla_qemu::{
    Accel, Cdrom, DiskConfig, DiskFormat, DiskInterface, KernelBoot, Machine, NicConfig, QemuConfig, Serial, Vm, Vnc,
};

use crate::kit;

#[derive(Args)]
pub struct QemuArgs {
    /// isla's state directory; VMs are kept in ROOT/qemu/NAME.
    #[arg(long, global = true, default_value = "/var/lib/isla")]
    root: PathBuf,
    #[command(subcommand)]
    cmd: QemuCmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum QemuCmd {
    /// Define a VM (nothing runs until `start`).
    Create(Box<CreateArgs>),
    /// Start QEMU in the background (serial output in ROOT/qemu/NAME/serial.log).
    Start {
        name: String,
        /// Wait until the serial console prints this text (needs the default file serial).
        #[arg(long)]
        wait_for: Option<String>,
        /// Seconds to wait for --wait-for.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Show a VM's state: running, paused, shut off or crashed.
    Status {
        name: String,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// List VMs and their states.
    Ls {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Pause the vCPUs.
    Pause { name: String },
    /// Resume the vCPUs.
    Resume { name: String },
    /// ACPI power button; quit QEMU after --timeout seconds, kill it if it still runs.
    Shutdown {
        name: String,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Kill QEMU at once (the guest loses unwritten data).
    Kill { name: String },
    /// Internal snapshots: full (RAM too) while running, disk-only while shut off.
    Snapshot {
        name: String,
        #[command(subcommand)]
        op: SnapshotOp,
    },
    /// Linked clone: thin qcow2 overlays over NAME's disks (NAME must be shut off and stays
    /// frozen while the clone exists).
    Clone { name: String, new_name: String },
    /// Delete a shut-off VM, its directory and the disks inside it.
    Delete { name: String },
    /// Print the serial console log.
    Console { name: String },
}

#[derive(Subcommand)]
enum SnapshotOp {
    Create {
        snapshot: String,
    },
    List {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    Apply {
        snapshot: String,
    },
    Delete {
        snapshot: String,
    },
}

#[derive(Args)]
struct CreateArgs {
    name: String,
    /// A whole configuration as JSON (isla-qemu's QemuConfig); the other options are then not allowed.
    #[arg(long, conflicts_with_all = ["disk", "cdrom", "kernel", "kit", "nic"])]
    config: Option<PathBuf>,
    /// Guest memory: 512M, 2G, or a number of MiB.
    #[arg(long, default_value = "512M")]
    memory: String,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelArg,
    #[arg(long, value_enum, default_value = "q35")]
    machine: MachineArg,
    /// QEMU CPU model (default: max with tcg, host with kvm; qemu64 on microvm and on nested PVM hosts).
    #[arg(long)]
    cpu_model: Option<String>,
    /// PATH[,format=raw|qcow2][,if=virtio|ide|scsi][,ro][,boot=N]; repeat for more disks.
    #[arg(long)]
    disk: Vec<String>,
    /// ISO image for the CD-ROM drive (boots first unless --cdrom-boot says otherwise).
    #[arg(long)]
    cdrom: Option<PathBuf>,
    /// Boot index of the CD-ROM.
    #[arg(long, default_value_t = 0)]
    cdrom_boot: u32,
    /// Direct kernel boot: a bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line (default with --kit: console=ttyS0 panic=-1).
    #[arg(long)]
    append: Option<String>,
    /// Boot the guest kit's kernel and initramfs (`isla guest path`).
    #[arg(long, conflicts_with = "kernel")]
    kit: bool,
    /// tap=IFNAME[,mac=M] or user[,mac=M][,hostfwd=[tcp|udp:][ADDR:]PORT-:PORT]...; repeat for more.
    #[arg(long)]
    nic: Vec<String>,
    /// VNC display: N (127.0.0.1, TCP port 5900+N) or `unix` (ROOT/qemu/NAME/vnc.sock).
    #[arg(long)]
    vnc: Option<String>,
    #[arg(long, value_enum, default_value = "file")]
    serial: SerialArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Copy, ValueEnum)]
enum MachineArg {
    Q35,
    Pc,
    Microvm,
}

#[derive(Clone, Copy, ValueEnum)]
enum SerialArg {
    File,
    Socket,
    None,
}

fn vm_dir(root: &Path, name: &str) -> PathBuf {
    root.join("qemu").join(name)
}

fn open(root: &Path, name: &str) -> Result<Vm> {
    let dir = vm_dir(root, name);
    if !dir.join("config.json").exists() {
        bail!("no VM named `{name}` in {} (see `isla qemu ls`)", root.join("qemu").display());
    }
    Ok(Vm::open(&dir)?)
}

fn parse_disk(spec: &str) -> Result<DiskConfig> {
    let mut parts = spec.split(',');
    let mut d = DiskConfig::new(parts.next().unwrap_or_default());
    for p in parts {
        match p.split_once('=') {
            Some(("format", "raw")) => d.format = Some(DiskFormat::Raw),
            Some(("format", "qcow2")) => d.format = Some(DiskFormat::Qcow2),
            Some(("if", "virtio")) => d.interface = DiskInterface::Virtio,
            Some(("if", "ide")) => d.interface = DiskInterface::Ide,
            Some(("if", "scsi")) => d.interface = DiskInterface::Scsi,
            Some(("boot", n)) => d.boot_index = Some(n.parse().with_context(|| format!("--disk {spec}: boot={n}"))?),
            None if p == "ro" => d.read_only = true,
            _ => bail!("--disk {spec}: unknown option `{p}` (format=raw|qcow2, if=virtio|ide|scsi, ro, boot=N)"),
        }
    }
    Ok(d)
}

fn parse_nic(spec: &str) -> Result<NicConfig> {
    let mut parts = spec.split(',');
    let first = parts.next().unwrap_or_default();
    let mut nic = match first.split_once('=') {
        Some(("tap", ifname)) => NicConfig::Tap { ifname: ifname.to_string(), mac: None },
        None if first == "user" => NicConfig::User { mac: None, hostfwd: Vec::new() },
        _ => bail!("--nic {spec}: start with tap=IFNAME or user"),
    };
    for p in parts {
        match (p.split_once('='), &mut nic) {
            (Some(("mac", m)), n) => n.set_mac(m.to_string()),
            (Some(("hostfwd", f)), NicConfig::User { hostfwd, .. }) => hostfwd.push(f.parse()?),
            _ => bail!("--nic {spec}: unknown option `{p}` (mac=M; user also hostfwd=...)"),
        }
    }
    Ok(nic)
}

fn build_config(a: &CreateArgs) -> Result<QemuConfig> {
    if let Some(f) = &a.config {
        let text = std::fs::read_to_string(f).with_context(|| format!("--config {}", f.display()))?;
        let mut c: QemuConfig = serde_json::from_str(&text).with_context(|| format!("--config {}", f.display()))?;
        c.name = a.name.clone();
        return Ok(c);
    }
    let mut c = QemuConfig::new(&a.name);
    let mib = isla_vmm::config::parse_memory(&a.memory)? >> 20;
    c.memory_mib = u32::try_from(mib).with_context(|| format!("--memory {}: too large", a.memory))?;
    c.cpus = a.cpus;
    c.cpu_model = a.cpu_model.clone();
    c.accel = match a.accel {
        AccelArg::Auto => Accel::Auto,
        AccelArg::Kvm => Accel::Kvm,
        AccelArg::Tcg => Accel::Tcg,
    };
    c.machine = match a.machine {
        MachineArg::Q35 => Machine::Q35,
        MachineArg::Pc => Machine::Pc,
        MachineArg::Microvm => Machine::Microvm,
    };
    c.serial = match a.serial {
        SerialArg::File => Serial::File,
        SerialArg::Socket => Serial::Socket,
        SerialArg::None => Serial::None,
    };
    c.disks = a.disk.iter().map(|s| parse_disk(s)).collect::<Result<_>>()?;
    c.cdrom = a.cdrom.clone().map(|path| Cdrom { path, boot_index: Some(a.cdrom_boot) });
    c.nics = a.nic.iter().map(|s| parse_nic(s)).collect::<Result<_>>()?;
    c.vnc = match a.vnc.as_deref() {
        None => None,
        Some("unix") => Some(Vnc::Unix),
        Some(n) => Some(Vnc::Tcp(n.parse().with_context(|| format!("--vnc {n}: give a display number or `unix`"))?)),
    };
    if a.kit {
        let k = kit::Kit::find()?;
        let append = a.append.clone().unwrap_or_else(|| "console=ttyS0 panic=-1".into());
        c.kernel = Some(KernelBoot { kernel: k.bzimage, initrd: Some(k.initramfs), append });
    } else if let Some(kernel) = &a.kernel {
        c.kernel = Some(KernelBoot {
            kernel: kernel.clone(),
            initrd: a.initrd.clone(),
            append: a.append.clone().unwrap_or_default(),
        });
    }
    Ok(c)
}

fn print_status(s: &isla_qemu::VmStatus) {
    let pid = s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    let detail = s.detail.as_deref().unwrap_or("");
    println!("{:<24} {:<9} {:<8} {detail}", s.name, s.state.to_string(), pid);
}

pub fn run(a: &QemuArgs) -> Result<i32> {
    let root = &a.root;
    match &a.cmd {
        QemuCmd::Create(c) => {
            let cfg = build_config(c)?;
            let vm = Vm::create(&vm_dir(root, &c.name), cfg)?;
            println!("{}", vm.paths().dir.display());
        }
        QemuCmd::Start { name, wait_for, timeout } => {
            let mut vm = open(root, name)?;
            let info = vm.start()?;
            eprintln!(
                "{name}: started, pid {}, accelerator {} ({}), CPU model {}",
                info.pid, info.accel, info.accel_reason, info.cpu_model
            );
            if let Some(text) = wait_for {
                if !vm.wait_for_serial(text, Duration::from_secs(*timeout)) {
                    bail!("`{text}` did not appear in {} within {timeout} s", vm.paths().serial_log.display());
                }
            }
        }
        QemuCmd::Status { name, output } => {
            let s = open(root, name)?.status()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&s)?),
                Output::Table => print_status(&s),
            }
        }
        QemuCmd::Ls { output } => {
            let mut all = Vec::new();
            let base = root.join("qemu");
            let mut names: Vec<String> = match std::fs::read_dir(&base) {
                Ok(rd) => rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e).with_context(|| base.display().to_string()),
            };
            names.sort();
            for n in names.iter().filter(|n| vm_dir(root, n).join("config.json").exists()) {
                all.push(open(root, n)?.status()?);
            }
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&all)?),
                Output::Table => {
                    println!("{:<24} {:<9} {:<8} DETAIL", "NAME", "STATE", "PID");
                    all.iter().for_each(print_status);
                }
            }
        }
        QemuCmd::Pause { name } => open(root, name)?.pause()?,
        QemuCmd::Resume { name } => open(root, name)?.resume()?,
        QemuCmd::Shutdown { name, timeout } => {
            let out = open(root, name)?.shutdown(Duration::from_secs(*timeout))?;
            eprintln!("{name}: {}", serde_json::to_value(out)?.as_str().unwrap_or_default());
        }
        QemuCmd::Kill { name } => open(root, name)?.kill()?,
        QemuCmd::Snapshot { name, op } => {
            let mut vm = open(root, name)?;
            match op {
                SnapshotOp::Create { snapshot } => vm.snapshot_create(snapshot)?,
                SnapshotOp::Apply { snapshot } => vm.snapshot_apply(snapshot)?,
                SnapshotOp::Delete { snapshot } => vm.snapshot_delete(snapshot)?,
                SnapshotOp::List { output } => {
                    let list = vm.snapshot_list()?;
                    match output {
                        Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                        Output::Table => {
                            println!("{:<4} {:<24} {:>12}  DATE", "ID", "NAME", "VM STATE");
                            for s in list {
                                println!("{:<4} {:<24} {:>12}  {}", s.id, s.name, s.vm_state_size, s.date_sec);
                            }
                        }
                    }
                }
            }
        }
        QemuCmd::Clone { name, new_name } => {
            let clone = open(root, name)?.clone_linked(&vm_dir(root, new_name), new_name)?;
            println!("{}", clone.paths().dir.display());
        }
        QemuCmd::Delete { name } => open(root, name)?.delete()?,
        QemuCmd::Console { name } => {
            let vm = open(root, name)?;
            let log = &vm.paths().serial_log;
            let bytes = std::fs::read(log).with_context(|| format!("{} (serial is not a file?)", log.display()))?;
            print!("{}", String::from_utf8_lossy(&bytes));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_and_nic_specs() {
        let d = parse_disk("/a,b.qcow2").unwrap_err().to_string();
        assert!(d.contains("unknown option `b.qcow2`"), "{d}");
        let d = parse_disk("/x.img,format=qcow2,if=scsi,ro,boot=2").unwrap();
        assert_eq!(
            (d.format, d.interface, d.read_only, d.boot_index),
            (Some(DiskFormat::Qcow2), DiskInterface::Scsi, true, Some(2))
        );
        let n = parse_nic("user,mac=52:54:00:00:00:09,hostfwd=tcp::2222-:22").unwrap();
        assert!(matches!(&n, NicConfig::User { hostfwd, .. } if hostfwd[0].host_port == 2222));
        assert_eq!(n.mac(), Some("52:54:00:00:00:09"));
        assert!(matches!(parse_nic("tap=isla-t1").unwrap(), NicConfig::Tap { ifname, .. } if ifname == "isla-t1"));
        assert!(parse_nic("tap=isla-t1,hostfwd=1-:2").is_err());
        assert!(parse_nic("bridge=br0").is_err());
    }
}
