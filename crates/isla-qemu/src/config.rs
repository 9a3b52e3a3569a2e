//! The VM's configuration (`config.json` in its directory): typed, serde, validated at the edge.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{QemuError, Result};

/// Largest guest memory accepted (MiB) when the host's size cannot be read.
const MAX_MEMORY_MIB: u32 = 4 << 20;
/// Smallest guest memory accepted (MiB): less does not hold a Linux kernel and its initramfs.
const MIN_MEMORY_MIB: u32 = 16;
/// Most vCPUs accepted (q35's limit without an IOMMU and x2APIC set-up).
const MAX_CPUS: u32 = 255;

/// A full VM: what QEMU is asked to emulate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuConfig {
    /// VM name: letters, digits, `.`, `_`, `-`; at most 64 characters.
    pub name: String,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// Number of vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default)]
    pub accel: Accel,
    #[serde(default)]
    pub machine: Machine,
    /// QEMU CPU model (`host`, `max`, `qemu64`, `Skylake-Server`...); default from
    /// [`ResolvedAccel::default_cpu_model`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
    /// Disks in the order the guest sees them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// An ISO image in a CD-ROM drive (IDE, read-only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cdrom: Option<Cdrom>,
    /// Direct kernel boot (no bootloader): kernel, initrd and command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelBoot>,
    /// Network interfaces (virtio-net), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<NicConfig>,
    /// A VNC display (with a standard VGA card); none means no display at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc: Option<Vnc>,
    /// Where the first serial port goes.
    #[serde(default)]
    pub serial: Serial,
    /// Linked clones whose disks have this VM's disks as backing files (kept by
    /// [`crate::Vm::clone_linked`]; while one exists this VM cannot start or change its disks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub linked_clones: Vec<PathBuf>,
    /// The VM this one is a linked clone of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linked_from: Option<PathBuf>,
}

fn default_memory() -> u32 {
    512
}

fn default_cpus() -> u32 {
    1
}

/// Which accelerator runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when `/dev/kvm` opens and the host's KVM is not nested PVM; TCG otherwise.
    #[default]
    Auto,
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulator (binary translation).
    Tcg,
}

/// The machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// Modern PC (ICH9, PCIe, AHCI): what libvirt uses for new VMs.
    #[default]
    Q35,
    /// The 1996 PC (i440FX, PIIX, IDE).
    Pc,
    /// Minimal machine without PCI or firmware: virtio-mmio devices and direct kernel boot only.
    Microvm,
}

impl Machine {
    pub fn as_str(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Pc => "pc",
            Machine::Microvm => "microvm",
        }
    }
}

/// Disk image format (kept in the configuration once detected, so a guest that writes a qcow2
/// header into a raw disk cannot change how it is opened next time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

impl From<isla_disk::Format> for DiskFormat {
    fn from(f: isla_disk::Format) -> Self {
        match f {
            isla_disk::Format::Raw => DiskFormat::Raw,
            isla_disk::Format::Qcow2 => DiskFormat::Qcow2,
        }
    }
}

impl From<DiskFormat> for isla_disk::Format {
    fn from(f: DiskFormat) -> Self {
        match f {
            DiskFormat::Raw => isla_disk::Format::Raw,
            DiskFormat::Qcow2 => isla_disk::Format::Qcow2,
        }
    }
}

/// The bus a disk sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskInterface {
    /// virtio-blk: fastest, needs a virtio driver in the guest.
    #[default]
    Virtio,
    /// IDE/AHCI (SATA on q35): every OS installer has a driver.
    Ide,
    /// virtio-scsi with a SCSI disk.
    Scsi,
}

/// One disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// Detected by [`crate::Vm::create`] when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub interface: DiskInterface,
    /// Firmware boot order (lowest first); disks without one are tried after those with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_index: Option<u32>,
}

impl DiskConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskConfig {
            path: path.into(),
            format: None,
            read_only: false,
            interface: DiskInterface::Virtio,
            boot_index: None,
        }
    }
}

/// An ISO image in a CD-ROM drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cdrom {
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_index: Option<u32>,
}

/// Direct kernel boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelBoot {
    /// bzImage (or an ELF vmlinux with a PVH note).
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (add `console=ttyS0` to see it on the serial port).
    #[serde(default)]
    pub append: String,
}

/// One network interface (virtio-net).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum NicConfig {
    /// An existing TAP device (isla-net's `attach_tap` makes `isla-t*` ones on a network's
    /// bridge); isla opens it and hands QEMU the descriptor, as libvirt does.
    Tap {
        ifname: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<String>,
    },
    /// QEMU's user-mode network (slirp): NAT to the host's network without any host set-up; the
    /// guest is reached only through `hostfwd` port forwards.
    User {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        hostfwd: Vec<HostFwd>,
    },
}

impl NicConfig {
    pub fn mac(&self) -> Option<&str> {
        match self {
            NicConfig::Tap { mac, .. } | NicConfig::User { mac, .. } => mac.as_deref(),
        }
    }

    pub fn set_mac(&mut self, new: String) {
        match self {
            NicConfig::Tap { mac, .. } | NicConfig::User { mac, .. } => *mac = Some(new),
        }
    }
}

/// A port forward of user-mode networking: `host_addr:host_port` on the host to `guest_port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFwd {
    #[serde(default)]
    pub proto: FwdProto,
    /// Host address to listen on (default 127.0.0.1: forwards stay on the host).
    #[serde(default = "loopback")]
    pub host_addr: Ipv4Addr,
    pub host_port: u16,
    pub guest_port: u16,
}

fn loopback() -> Ipv4Addr {
    Ipv4Addr::LOCALHOST
}

impl std::str::FromStr for HostFwd {
    type Err = QemuError;
    /// `[tcp|udp:][ADDR:]HOSTPORT-:GUESTPORT` (QEMU's hostfwd syntax without the guest address),
    /// e.g. `tcp:127.0.0.1:2222-:22` or `8080-:80`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            QemuError::config(
                "hostfwd",
                format!("`{s}` is not [tcp|udp:][ADDR:]HOSTPORT-:GUESTPORT (example: tcp:127.0.0.1:2222-:22)"),
            )
        };
        let (host, guest) = s.split_once("-:").ok_or_else(bad)?;
        let guest_port: u16 = guest.parse().map_err(|_| bad())?;
        let (proto, rest) = match host.split_once(':') {
            Some(("tcp", r)) => (FwdProto::Tcp, r),
            Some(("udp", r)) => (FwdProto::Udp, r),
            _ => (FwdProto::Tcp, host),
        };
        let (host_addr, port) = match rest.rsplit_once(':') {
            Some(("", p)) => (Ipv4Addr::LOCALHOST, p),
            Some((a, p)) => (a.parse().map_err(|_| bad())?, p),
            None => (Ipv4Addr::LOCALHOST, rest),
        };
        let host_port: u16 = port.parse().map_err(|_| bad())?;
        Ok(HostFwd { proto, host_addr, host_port, guest_port })
    }
}

/// Transport of a port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FwdProto {
    #[default]
    Tcp,
    Udp,
}

impl FwdProto {
    pub fn as_str(self) -> &'static str {
        match self {
            FwdProto::Tcp => "tcp",
            FwdProto::Udp => "udp",
        }
    }
}

/// A VNC display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vnc {
    /// `127.0.0.1:N`: TCP port 5900 + N on the loopback address only.
    Tcp(u16),
    /// A unix socket `vnc.sock` in the VM's directory.
    Unix,
}

/// Where the first serial port goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Serial {
    /// `serial.log` in the VM's directory (rewritten at each start).
    #[default]
    File,
    /// A unix socket `serial.sock` in the VM's directory (`socat - UNIX:serial.sock` for a console).
    Socket,
    /// No serial port.
    None,
}

impl QemuConfig {
    /// A configuration with defaults: 512 MiB, 1 vCPU, `auto` accelerator, q35, serial to a file.
    pub fn new(name: impl Into<String>) -> Self {
        QemuConfig {
            name: name.into(),
            memory_mib: default_memory(),
            cpus: default_cpus(),
            accel: Accel::Auto,
            machine: Machine::Q35,
            cpu_model: None,
            disks: Vec::new(),
            cdrom: None,
            kernel: None,
            nics: Vec::new(),
            vnc: None,
            serial: Serial::File,
            linked_clones: Vec::new(),
            linked_from: None,
        }
    }

    /// Checks every field, and that the files it names exist: the errors name the field and the fix.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        let max_mem =
            isla_vmm::host::mem_total().map_or(MAX_MEMORY_MIB, |b| (b >> 20).min(u64::from(MAX_MEMORY_MIB)) as u32);
        if self.memory_mib < MIN_MEMORY_MIB || self.memory_mib > max_mem {
            return Err(QemuError::config(
                "memory_mib",
                format!(
                    "{} MiB is out of range: give {MIN_MEMORY_MIB} to {max_mem} MiB (the host's RAM)",
                    self.memory_mib
                ),
            ));
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(QemuError::config("cpus", format!("{} is out of range: give 1 to {MAX_CPUS}", self.cpus)));
        }
        if self.disks.is_empty() && self.cdrom.is_none() && self.kernel.is_none() {
            return Err(QemuError::config("disks", "nothing to boot from: add a disk, a cdrom ISO or a kernel"));
        }
        let mut boot_indexes = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            let field = format!("disks[{i}]");
            let format = existing_file(&d.path, &format!("{field}.path"))
                .and_then(|()| isla_disk::detect(&d.path).map_err(QemuError::from))?;
            if d.format == Some(DiskFormat::Qcow2) && format != isla_disk::Format::Qcow2 {
                return Err(QemuError::config(
                    format!("{field}.format"),
                    format!("{} is not a qcow2 image; set format to raw", d.path.display()),
                ));
            }
            if self.machine == Machine::Microvm && d.interface != DiskInterface::Virtio {
                return Err(QemuError::config(
                    format!("{field}.interface"),
                    "the microvm machine has no IDE or SCSI controller: use virtio",
                ));
            }
            boot_indexes.extend(d.boot_index.map(|b| (b, format!("{field}.boot_index"))));
        }
        if let Some(c) = &self.cdrom {
            existing_file(&c.path, "cdrom.path")?;
            if self.machine == Machine::Microvm {
                return Err(QemuError::config("cdrom", "the microvm machine has no CD-ROM drive: use q35 or pc"));
            }
            boot_indexes.extend(c.boot_index.map(|b| (b, "cdrom.boot_index".to_string())));
        }
        boot_indexes.sort();
        if let Some(w) = boot_indexes.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(QemuError::config(&w[1].1, format!("boot index {} is also used by {}", w[1].0, w[0].1)));
        }
        match &self.kernel {
            Some(k) => {
                existing_file(&k.kernel, "kernel.kernel")?;
                if let Some(i) = &k.initrd {
                    existing_file(i, "kernel.initrd")?;
                }
            }
            None if self.machine == Machine::Microvm => {
                return Err(QemuError::config("kernel", "the microvm machine has no firmware: give a kernel"));
            }
            None => {}
        }
        for (i, n) in self.nics.iter().enumerate() {
            if let NicConfig::Tap { ifname, .. } = n {
                if ifname.is_empty() || ifname.len() > 15 || ifname.contains(['/', ' ', ',', '\0']) {
                    return Err(QemuError::config(
                        format!("nics[{i}].ifname"),
                        format!("`{ifname}` is not an interface name (1 to 15 characters, no '/', ',' or spaces)"),
                    ));
                }
            }
            if let NicConfig::User { hostfwd, .. } = n {
                if let Some(f) = hostfwd.iter().find(|f| f.host_port == 0 || f.guest_port == 0) {
                    return Err(QemuError::config(format!("nics[{i}].hostfwd"), format!("port 0 in {f:?}")));
                }
            }
            if let Some(m) = n.mac() {
                parse_mac(m).map_err(|msg| QemuError::config(format!("nics[{i}].mac"), msg))?;
            }
        }
        if let Some(m) = &self.cpu_model {
            if m.is_empty() || !m.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c)) {
                return Err(QemuError::config(
                    "cpu_model",
                    format!("`{m}` is not a CPU model name (see `qemu-system-x86_64 -cpu help`)"),
                ));
            }
        }
        if let Some(Vnc::Tcp(n)) = self.vnc {
            if n > 99 {
                return Err(QemuError::config("vnc", format!("display {n}: use 0 to 99 (TCP port 5900 + N)")));
            }
        }
        if self.accel == Accel::Kvm && !kvm_usable() {
            return Err(QemuError::config("accel", "kvm: /dev/kvm cannot be opened here; use tcg or auto"));
        }
        Ok(())
    }
}

/// Checks a name isla uses in paths and monitor commands: 1 to `max` letters, digits, `.`, `_`
/// or `-`, not starting with `.`; `extra` is one more condition and its wording.
pub(crate) fn check_name(field: &str, name: &str, max: usize, extra: (bool, &str)) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= max
        && !name.starts_with('.')
        && name.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
        && extra.0;
    if ok {
        return Ok(());
    }
    Err(QemuError::config(
        field,
        format!("`{name}`: use 1 to {max} letters, digits, '.', '_' or '-', not starting with '.'{}", extra.1),
    ))
}

fn validate_name(name: &str) -> Result<()> {
    check_name("name", name, 64, (true, ""))
}

fn existing_file(path: &Path, field: &str) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(QemuError::config(field, format!("{} is not a regular file", path.display()))),
        Err(e) => Err(QemuError::config(field, format!("{}: {e}", path.display()))),
    }
}

/// Parses `52:54:00:12:34:56`; refuses multicast addresses (a NIC cannot have one).
pub fn parse_mac(s: &str) -> std::result::Result<[u8; 6], String> {
    let bad = || format!("`{s}` is not a MAC address like 52:54:00:12:34:56");
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 == 1 {
        return Err(format!("`{s}` is a multicast address: the first byte must be even"));
    }
    Ok(mac)
}

/// A random MAC address in QEMU's locally administered range 52:54:00.
pub(crate) fn random_mac() -> Result<String> {
    let mut b = [0u8; 3];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .map_err(|e| QemuError::io("/dev/urandom", "read", e))?;
    Ok(format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2]))
}

/// True when `/dev/kvm` opens for reading and writing.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// The accelerator a VM actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResolvedAccel {
    Kvm,
    Tcg,
}

impl fmt::Display for ResolvedAccel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResolvedAccel::Kvm => "kvm",
            ResolvedAccel::Tcg => "tcg",
        })
    }
}

impl ResolvedAccel {
    /// The CPU model used when the configuration names none: with TCG `max` (every feature
    /// TCG emulates), but `qemu64` on `microvm`, where `max` makes the kernel calibrate its TSC
    /// against a PIT that machine lacks (it hung); with KVM `host`, except on a nested PVM host,
    /// where QEMU aborts setting `host`'s and `max`'s MSRs (IA32_ARCH_CAPABILITIES) and
    /// `qemu64` is what starts.
    pub fn default_cpu_model(self, machine: Machine) -> &'static str {
        match self {
            ResolvedAccel::Tcg if machine == Machine::Microvm => "qemu64",
            ResolvedAccel::Tcg => "max",
            ResolvedAccel::Kvm if isla_vmm::host::is_nested_pvm() => "qemu64",
            ResolvedAccel::Kvm => "host",
        }
    }
}

impl Accel {
    /// Chooses the accelerator and says why. `auto` takes KVM only when `/dev/kvm` opens and the
    /// host's KVM is not nested PVM: there an ordinary guest kernel runs in the host's instruction
    /// emulator and stops at the first instruction it lacks (measured in docs/qemu.md), while
    /// TCG boots it in about a second.
    pub fn resolve(self) -> (ResolvedAccel, &'static str) {
        match self {
            Accel::Kvm => (ResolvedAccel::Kvm, "kvm requested"),
            Accel::Tcg => (ResolvedAccel::Tcg, "tcg requested"),
            Accel::Auto if !kvm_usable() => (ResolvedAccel::Tcg, "/dev/kvm is not usable"),
            Accel::Auto if isla_vmm::host::is_nested_pvm() => {
                (ResolvedAccel::Tcg, "the host's KVM is nested PVM, which cannot run an ordinary guest kernel")
            }
            Accel::Auto => (ResolvedAccel::Kvm, "/dev/kvm is usable"),
        }
    }
}

/// The path of `qemu-system-x86_64` (from `ISLA_QEMU` if set, else the first on PATH).
pub fn qemu_binary() -> Result<PathBuf> {
    find_qemu(std::env::var_os("ISLA_QEMU"), std::env::var_os("PATH"))
}

fn find_qemu(forced: Option<std::ffi::OsString>, path: Option<std::ffi::OsString>) -> Result<PathBuf> {
    if let Some(p) = forced {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(QemuError::NotInstalled) };
    }
    let path = path.unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .ok_or(QemuError::NotInstalled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostfwd_syntax() {
        let f: HostFwd = "tcp:127.0.0.1:2222-:22".parse().unwrap();
        assert_eq!(
            f,
            HostFwd { proto: FwdProto::Tcp, host_addr: Ipv4Addr::LOCALHOST, host_port: 2222, guest_port: 22 }
        );
        let f: HostFwd = "udp::5353-:53".parse().unwrap();
        assert_eq!((f.proto, f.host_port, f.guest_port), (FwdProto::Udp, 5353, 53));
        let f: HostFwd = "8080-:80".parse().unwrap();
        assert_eq!((f.host_addr, f.host_port, f.guest_port), (Ipv4Addr::LOCALHOST, 8080, 80));
        for bad in ["", "8080", "8080-80", "tcp:x:1-:2", "70000-:1", "1-:x"] {
            let e = bad.parse::<HostFwd>().unwrap_err().to_string();
            assert!(e.contains("HOSTPORT-:GUESTPORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn macs() {
        assert_eq!(parse_mac("52:54:00:ab:cd:ef").unwrap(), [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        assert!(parse_mac("01:00:5e:00:00:01").unwrap_err().contains("multicast"));
        for bad in ["52:54:00:ab:cd", "52:54:00:ab:cd:eg", "5254:00:ab:cd:ef:00", ""] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        let m = random_mac().unwrap();
        assert!(m.starts_with("52:54:00:") && parse_mac(&m).is_ok(), "{m}");
    }

    #[test]
    fn missing_qemu_says_what_to_install() {
        let e = find_qemu(None, Some("/nonexistent:/also-not".into())).unwrap_err().to_string();
        assert_eq!(e, "qemu-system-x86_64 was not found on PATH: install it with `apt-get install qemu-system-x86`");
        assert!(find_qemu(Some("/nonexistent/qemu".into()), None).is_err());
        let d = tempfile::tempdir().unwrap();
        let fake = d.path().join("qemu-system-x86_64");
        std::fs::write(&fake, "").unwrap();
        assert_eq!(find_qemu(None, Some(d.path().as_os_str().to_owned())).unwrap(), fake);
    }

    #[test]
    fn json_round_trip_and_unknown_fields() {
        let json = r#"{"name":"web","memory_mib":256,"disks":[{"path":"/x.qcow2","interface":"ide","boot_index":1}],
            "nics":[{"type":"user","hostfwd":[{"host_port":2222,"guest_port":22}]},{"type":"tap","ifname":"isla-t1"}],
            "vnc":{"tcp":3},"serial":"socket"}"#;
        let c: QemuConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.cpus, 1);
        assert_eq!(c.machine, Machine::Q35);
        assert_eq!(c.disks[0].interface, DiskInterface::Ide);
        assert_eq!(c.vnc, Some(Vnc::Tcp(3)));
        let back: QemuConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let e = serde_json::from_str::<QemuConfig>(r#"{"name":"a","memory":5}"#).unwrap_err().to_string();
        assert!(e.contains("unknown field `memory`"), "{e}");
    }
}
