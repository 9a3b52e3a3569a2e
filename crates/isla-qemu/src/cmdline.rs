//! The `qemu-system-x86_64` command line for a configuration: a pure function, unit-tested.

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::Path;

use crate::config::{DiskInterface, Machine, NicConfig, QemuConfig, ResolvedAccel, Serial, Vnc};
use crate::vm::VmPaths;

/// Escapes a value for QEMU's `key=value,...` option syntax (a comma is written twice).
fn esc(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// The arguments (without the program name). `tap_fds[i]` is the open TAP descriptor of the
/// i-th TAP interface, inherited by QEMU. Formats and MACs must have been resolved by
/// [`crate::Vm::create`]; a missing format is left to QEMU's probing.
pub(crate) fn qemu_args(cfg: &QemuConfig, paths: &VmPaths, accel: ResolvedAccel, tap_fds: &[RawFd]) -> Vec<OsString> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("guest={},debug-threads=on", cfg.name)]);
    let machine = match cfg.machine {
        Machine::Microvm => "microvm,acpi=on".to_string(),
        m => m.as_str().to_string(),
    };
    push(&["-machine", &machine, "-accel", &accel.to_string()]);
    push(&["-cpu", cfg.cpu_model.as_deref().unwrap_or(accel.default_cpu_model(cfg.machine))]);
    push(&["-m", &format!("{}M", cfg.memory_mib), "-smp", &cfg.cpus.to_string()]);
    // Nothing but what the configuration asks for; a guest panic (pvpanic) makes QEMU exit
    // with status 1 so it shows as crashed; a guest reboot ends QEMU too (as `poweroff`).
    push(&["-nodefaults", "-no-user-config", "-no-reboot", "-action", "panic=exit-failure"]);
    if cfg.machine != Machine::Microvm {
        push(&["-device", "pvpanic"]);
    }
    push(&["-pidfile", &paths.pid.to_string_lossy()]);
    push(&["-chardev", &format!("socket,id=qmp,path={},server=on,wait=off", esc(&paths.qmp))]);
    push(&["-mon", "chardev=qmp,mode=control"]);
    match cfg.serial {
        Serial::File => push(&["-chardev", &format!("file,id=ser0,path={}", esc(&paths.serial_log))]),
        Serial::Socket => {
            push(&["-chardev", &format!("socket,id=ser0,path={},server=on,wait=off", esc(&paths.serial_sock))])
        }
        Serial::None => {}
    }
    if cfg.serial != Serial::None {
        push(&["-serial", "chardev:ser0"]);
    }
    match cfg.vnc {
        Some(v) => {
            let where_ = match v {
                Vnc::Tcp(n) => format!("127.0.0.1:{n}"),
                Vnc::Unix => format!("unix:{}", esc(&paths.vnc_sock)),
            };
            push(&["-vnc", &where_, "-device", "VGA"]);
        }
        None => push(&["-display", "none"]),
    }
    let (blk, net) = match cfg.machine {
        Machine::Microvm => ("virtio-blk-device", "virtio-net-device"),
        _ => ("virtio-blk-pci", "virtio-net-pci"),
    };
    if cfg.disks.iter().any(|d| d.interface == DiskInterface::Scsi) {
        push(&["-device", "virtio-scsi-pci,id=scsi0"]);
    }
    for (i, d) in cfg.disks.iter().enumerate() {
        let mut drive = format!("file={},if=none,id=disk{i},cache=writeback,discard=unmap", esc(&d.path));
        if let Some(f) = d.format {
            drive.push_str(&format!(",format={}", f.as_str()));
        }
        if d.read_only {
            drive.push_str(",readonly=on");
        }
        let mut dev = match d.interface {
            DiskInterface::Virtio => format!("{blk},drive=disk{i}"),
            DiskInterface::Ide => format!("ide-hd,drive=disk{i}"),
            DiskInterface::Scsi => format!("scsi-hd,bus=scsi0.0,drive=disk{i}"),
        };
        if let Some(b) = d.boot_index {
            dev.push_str(&format!(",bootindex={b}"));
        }
        push(&["-drive", &drive, "-device", &dev]);
    }
    if let Some(c) = &cfg.cdrom {
        push(&["-drive", &format!("file={},if=none,id=cd0,media=cdrom,readonly=on,format=raw", esc(&c.path))]);
        let mut dev = "ide-cd,drive=cd0".to_string();
        if let Some(b) = c.boot_index {
            dev.push_str(&format!(",bootindex={b}"));
        }
        push(&["-device", &dev]);
    }
    if let Some(k) = &cfg.kernel {
        push(&["-kernel", &k.kernel.to_string_lossy()]);
        if let Some(i) = &k.initrd {
            push(&["-initrd", &i.to_string_lossy()]);
        }
        if !k.append.is_empty() {
            push(&["-append", &k.append]);
        }
    }
    let mut taps = tap_fds.iter();
    for (i, n) in cfg.nics.iter().enumerate() {
        let netdev = match n {
            // A TAP without its descriptor (not opened) is left out rather than opened by
            // QEMU under a name isla did not check; `Vm::start` always passes them.
            NicConfig::Tap { .. } => match taps.next() {
                Some(fd) => format!("tap,id=net{i},fd={fd},vhost=off"),
                None => continue,
            },
            NicConfig::User { hostfwd, .. } => {
                let mut s = format!("user,id=net{i}");
                for f in hostfwd {
                    s.push_str(&format!(
                        ",hostfwd={}:{}:{}-:{}",
                        f.proto.as_str(),
                        f.host_addr,
                        f.host_port,
                        f.guest_port
                    ));
                }
                s
            }
        };
        let mut dev = format!("{net},netdev=net{i}");
        if let Some(m) = n.mac() {
            dev.push_str(&format!(",mac={m}"));
        }
        push(&["-netdev", &netdev, "-device", &dev]);
    }
    a.into_iter().map(OsString::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cdrom, DiskConfig, DiskFormat, HostFwd, KernelBoot};

    fn args(cfg: &QemuConfig, accel: ResolvedAccel, fds: &[RawFd]) -> String {
        let p = VmPaths::new(Path::new("/vms/a,b"));
        let v = qemu_args(cfg, &p, accel, fds);
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn full_vm_command_line() {
        let mut c = QemuConfig::new("web");
        c.memory_mib = 1024;
        c.cpus = 2;
        c.cpu_model = Some("Skylake-Server".into());
        let mut d = DiskConfig::new("/img/root.qcow2");
        d.format = Some(DiskFormat::Qcow2);
        d.boot_index = Some(2);
        let mut s = DiskConfig::new("/img/data.raw");
        s.format = Some(DiskFormat::Raw);
        s.interface = DiskInterface::Scsi;
        s.read_only = true;
        c.disks = vec![d, s];
        c.cdrom = Some(Cdrom { path: "/iso/debian.iso".into(), boot_index: Some(1) });
        c.nics = vec![
            NicConfig::Tap { ifname: "isla-t1".into(), mac: Some("52:54:00:00:00:01".into()) },
            NicConfig::User { mac: None, hostfwd: vec!["tcp:127.0.0.1:2222-:22".parse::<HostFwd>().unwrap()] },
        ];
        c.vnc = Some(Vnc::Tcp(3));
        let s = args(&c, ResolvedAccel::Kvm, &[7]);
        for want in [
            "-machine q35 -accel kvm -cpu Skylake-Server -m 1024M -smp 2",
            "-nodefaults -no-user-config -no-reboot -action panic=exit-failure -device pvpanic",
            "-pidfile /vms/a,b/qemu.pid",
            "-chardev socket,id=qmp,path=/vms/a,,b/qmp.sock,server=on,wait=off -mon chardev=qmp,mode=control",
            "-chardev file,id=ser0,path=/vms/a,,b/serial.log -serial chardev:ser0",
            "-vnc 127.0.0.1:3 -device VGA",
            "-device virtio-scsi-pci,id=scsi0",
            "-drive file=/img/root.qcow2,if=none,id=disk0,cache=writeback,discard=unmap,format=qcow2 -device virtio-blk-pci,drive=disk0,bootindex=2",
            "-drive file=/img/data.raw,if=none,id=disk1,cache=writeback,discard=unmap,format=raw,readonly=on -device scsi-hd,bus=scsi0.0,drive=disk1",
            "-device ide-cd,drive=cd0,bootindex=1",
            "-netdev tap,id=net0,fd=7,vhost=off -device virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01",
            "-netdev user,id=net1,hostfwd=tcp:127.0.0.1:2222-:22 -device virtio-net-pci,netdev=net1",
        ] {
            assert!(s.contains(want), "missing `{want}` in\n{s}");
        }
        assert!(!s.contains("-display none"));
    }

    #[test]
    fn microvm_kernel_boot_tcg() {
        let mut c = QemuConfig::new("m");
        c.machine = Machine::Microvm;
        c.kernel = Some(KernelBoot {
            kernel: "/k/bzImage".into(),
            initrd: Some("/k/initrd".into()),
            append: "console=ttyS0".into(),
        });
        c.disks = vec![DiskConfig::new("/d.raw")];
        c.serial = Serial::Socket;
        let s = args(&c, ResolvedAccel::Tcg, &[]);
        for want in [
            "-machine microvm,acpi=on -accel tcg -cpu qemu64",
            "-display none",
            "-device virtio-blk-device,drive=disk0",
            "-kernel /k/bzImage -initrd /k/initrd -append console=ttyS0",
            "socket,id=ser0,path=/vms/a,,b/serial.sock,server=on,wait=off",
        ] {
            assert!(s.contains(want), "missing `{want}` in\n{s}");
        }
        assert!(!s.contains("pvpanic"));
    }
}
