//! Typed microVM configuration, validated at the edge: everything the builder uses has been
//! checked here, and every error names the option and how to fix it.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use isla_arch::cpuid::CpuTemplate;
use isla_arch::layout::CMDLINE_MAX_SIZE;
pub use isla_virtio::balloon::BalloonConfig;
pub use isla_virtio::rate_limiter::RateLimiterConfig;
pub use isla_virtio::vsock::VsockConfig;

/// Most vCPUs a microVM may have.
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest accepted (the kernel, its decompression room and the initrd must fit).
pub const MIN_MEMORY: u64 = 16 << 20;
/// Command line used when none is given: the kernel log stays off the console while the guest
/// boots (`quiet`; each character costs VM exits), warnings and init's own output still show.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Invalid value for an option.
    #[error("{option}: {reason}")]
    Invalid { option: &'static str, reason: String },
    /// A file the configuration names cannot be used.
    #[error("{option}: {path}: {reason}")]
    File { option: &'static str, path: PathBuf, reason: String },
    /// A Firecracker configuration file could not be parsed.
    #[error("{path}: {reason}")]
    ConfigFile { path: PathBuf, reason: String },
    /// A Firecracker field or section isla does not implement yet.
    #[error("{path}: `{field}` is not supported by isla yet: {hint}")]
    Unsupported { path: PathBuf, field: String, hint: String },
}

/// Which CPU template to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TemplateChoice {
    /// `baseline` on nested (PVM) hosts, where the guest kernel is emulated; `host` elsewhere.
    #[default]
    Auto,
    /// A named template.
    Fixed(CpuTemplate),
}

impl TemplateChoice {
    /// The template to use on this host.
    pub fn resolve(self) -> CpuTemplate {
        match self {
            TemplateChoice::Fixed(t) => t,
            TemplateChoice::Auto if crate::host::is_nested_pvm() => CpuTemplate::Baseline,
            TemplateChoice::Auto => CpuTemplate::Host,
        }
    }
}

impl FromStr for TemplateChoice {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "auto" {
            return Ok(TemplateChoice::Auto);
        }
        CpuTemplate::from_str(s)
            .map(TemplateChoice::Fixed)
            .map_err(|e| ConfigError::Invalid { option: "--cpu-template", reason: format!("{e} (or `auto`)") })
    }
}

impl fmt::Display for TemplateChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateChoice::Auto => f.write_str("auto"),
            TemplateChoice::Fixed(t) => t.fmt(f),
        }
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConsoleConfig {
    /// The monitor's standard output (and standard input to the guest).
    #[default]
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded (milestones are still recorded).
    Null,
}

impl FromStr for ConsoleConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(ConsoleConfig::Stdio),
            "null" | "none" => Ok(ConsoleConfig::Null),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(ConsoleConfig::File(PathBuf::from(p))),
                _ => Err(ConfigError::Invalid {
                    option: "--console",
                    reason: format!("`{s}`: expected stdio, null or file:PATH"),
                }),
            },
        }
    }
}

/// A virtio block device (`--disk`, `--rootfs`, or a Firecracker `drives` entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    /// Drive name (also the serial number the guest reads with GET_ID).
    pub id: String,
    /// Backing file: raw or qcow2 (detected from its header).
    pub path: PathBuf,
    /// Root device (adds `root=/dev/vdX` to the command line).
    pub is_root: bool,
    /// Read-only.
    pub read_only: bool,
    /// Bandwidth and operation limits.
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// A virtio network interface on a host TAP device (`--net` or `network-interfaces`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Interface name.
    pub id: String,
    /// Host TAP device (created if it does not exist).
    pub host_dev: String,
    /// Guest MAC address, `xx:xx:xx:xx:xx:xx`.
    pub mac: Option<String>,
    /// Limits on traffic to the guest.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on traffic from the guest.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Splits `VALUE[,key[=value]]...` into the leading value and its options.
fn split_opts(s: &str) -> (&str, Vec<(&str, Option<&str>)>) {
    let mut parts = s.split(',');
    let head = parts.next().unwrap_or_default();
    (
        head,
        parts.filter(|p| !p.is_empty()).map(|p| p.split_once('=').map_or((p, None), |(k, v)| (k, Some(v)))).collect(),
    )
}

fn unknown_opt(option: &'static str, key: &str, known: &str) -> ConfigError {
    ConfigError::Invalid { option, reason: format!("unknown option `{key}` (known: {known})") }
}

impl DriveConfig {
    /// Parses `--disk PATH[,ro][,id=NAME]` (`is_root` for `--rootfs`, which takes the same form).
    pub fn parse_arg(s: &str, is_root: bool) -> Result<Self, ConfigError> {
        let option = if is_root { "--rootfs" } else { "--disk" };
        let (path, opts) = split_opts(s);
        if path.is_empty() {
            return Err(ConfigError::Invalid { option, reason: "expected PATH[,ro][,id=NAME]".into() });
        }
        let p = Path::new(path);
        let default_id = if is_root {
            "rootfs".to_string()
        } else {
            p.file_stem().map_or("disk".into(), |n| n.to_string_lossy().into_owned())
        };
        let mut d = DriveConfig { id: default_id, path: p.into(), is_root, read_only: false, rate_limiter: None };
        for (k, v) in opts {
            match (k, v) {
                ("ro", None) => d.read_only = true,
                ("rw", None) => d.read_only = false,
                ("id", Some(v)) if !v.is_empty() && v.len() <= 20 => d.id = v.into(),
                ("id", _) => return Err(ConfigError::Invalid { option, reason: "id: 1 to 20 characters".into() }),
                _ => return Err(unknown_opt(option, k, "ro, rw, id=NAME")),
            }
        }
        Ok(d)
    }
}

impl NetConfig {
    /// Parses `--net TAP[,mac=MAC][,id=NAME]`.
    pub fn parse_arg(s: &str, index: usize) -> Result<Self, ConfigError> {
        let (tap, opts) = split_opts(s);
        let mut n = NetConfig {
            id: format!("eth{index}"),
            host_dev: tap.into(),
            mac: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        for (k, v) in opts {
            match (k, v) {
                ("mac", Some(m)) => {
                    parse_mac(m, "--net mac")?;
                    n.mac = Some(m.into());
                }
                ("id", Some(v)) if !v.is_empty() => n.id = v.into(),
                _ => return Err(unknown_opt("--net", k, "mac=MAC, id=NAME")),
            }
        }
        Ok(n)
    }
}

/// Parses `--vsock UDS[,cid=N]` (CID 3 unless given).
pub fn parse_vsock_arg(s: &str) -> Result<VsockConfig, ConfigError> {
    let (uds, opts) = split_opts(s);
    if uds.is_empty() {
        return Err(ConfigError::Invalid { option: "--vsock", reason: "expected UDS_PATH[,cid=N]".into() });
    }
    let mut v = VsockConfig { guest_cid: 3, uds_path: uds.into() };
    for (k, val) in opts {
        match (k, val.map(str::parse::<u32>)) {
            ("cid", Some(Ok(c))) => v.guest_cid = c,
            _ => return Err(unknown_opt("--vsock", k, "cid=N")),
        }
    }
    Ok(v)
}

/// Parses `--balloon MIB[,deflate-on-oom][,stats=SECONDS][,reporting]`.
pub fn parse_balloon_arg(s: &str) -> Result<BalloonConfig, ConfigError> {
    let (mib, opts) = split_opts(s);
    let amount_mib = mib.parse().map_err(|_| ConfigError::Invalid {
        option: "--balloon",
        reason: format!("`{mib}`: expected the balloon's size in MiB, e.g. --balloon 32,stats=1"),
    })?;
    let mut b = BalloonConfig { amount_mib, ..Default::default() };
    for (k, v) in opts {
        match (k, v.map(str::parse::<u16>)) {
            ("deflate-on-oom", None) => b.deflate_on_oom = true,
            ("reporting", None) => b.free_page_reporting = true,
            ("stats", Some(Ok(secs))) => b.stats_polling_interval_s = secs,
            _ => return Err(unknown_opt("--balloon", k, "deflate-on-oom, stats=SECONDS, reporting")),
        }
    }
    Ok(b)
}

/// Parses a MAC address `xx:xx:xx:xx:xx:xx`; `option` names the setting in the error.
pub fn parse_mac(s: &str, option: &'static str) -> Result<[u8; 6], ConfigError> {
    let bad =
        || ConfigError::Invalid { option, reason: format!("`{s}`: expected a MAC address like 06:00:ac:10:00:02") };
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(ConfigError::Invalid {
            option,
            reason: format!("`{s}` is a multicast address; the first byte must be even"),
        });
    }
    Ok(mac)
}

/// Everything needed to build and boot one microVM.
#[derive(Debug, Clone, PartialEq)]
pub struct VmConfig {
    /// Kernel: ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Initial RAM disk (uncompressed cpio for the guest kit).
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// CPU template.
    pub cpu_template: TemplateChoice,
    /// Serial console destination.
    pub console: ConsoleConfig,
    /// Block devices.
    pub drives: Vec<DriveConfig>,
    /// Network interfaces.
    pub net: Vec<NetConfig>,
    /// A virtio-vsock device (host side: a unix socket, Firecracker's hybrid convention).
    pub vsock: Option<VsockConfig>,
    /// A virtio-balloon device.
    pub balloon: Option<BalloonConfig>,
    /// A virtio-rng device feeding the guest's `/dev/hwrng` from the host.
    pub entropy: bool,
    /// Stop the VM (cleanly, status `stopped`) when the console prints this text.
    pub stop_on_console: Option<String>,
    /// Handle emulation failures with the instruction fallback (on by default; it only runs on an
    /// exit that would otherwise stop the VM).
    pub insn_fallback: bool,
    /// Sample the guest's RIP at this interval (the guest profiler, [`crate::profile`]); None: off.
    pub profile_interval: Option<std::time::Duration>,
    /// Serve the run-time API ([`crate::api`]) on this unix socket.
    pub api_socket: Option<PathBuf>,
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: 1,
            memory: 128 << 20,
            cpu_template: TemplateChoice::Auto,
            console: ConsoleConfig::Stdio,
            drives: Vec::new(),
            net: Vec::new(),
            vsock: None,
            balloon: None,
            entropy: true,
            stop_on_console: None,
            insn_fallback: true,
            profile_interval: None,
            api_socket: None,
        }
    }

    /// Checks every field against this host; returns the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Invalid {
                option: "--cpus",
                reason: format!("{} vCPUs: must be 1 to {MAX_VCPUS}", self.vcpus),
            });
        }
        if self.memory < MIN_MEMORY {
            return Err(ConfigError::Invalid {
                option: "--memory",
                reason: format!("{} MiB: a guest needs at least {} MiB", self.memory >> 20, MIN_MEMORY >> 20),
            });
        }
        if let Some(host) = crate::host::mem_total() {
            if self.memory > host {
                return Err(ConfigError::Invalid {
                    option: "--memory",
                    reason: format!("{} MiB is more than this host has ({} MiB)", self.memory >> 20, host >> 20),
                });
            }
        }
        if self.cmdline.len() + 1 > CMDLINE_MAX_SIZE {
            return Err(ConfigError::Invalid {
                option: "--cmdline",
                reason: format!("{} bytes: the kernel reads at most {}", self.cmdline.len(), CMDLINE_MAX_SIZE - 1),
            });
        }
        if self.cmdline.bytes().any(|b| b == 0) {
            return Err(ConfigError::Invalid { option: "--cmdline", reason: "contains a NUL byte".into() });
        }
        KernelFormat::detect(&self.kernel)?;
        self.validate_devices()?;
        if let Some(initrd) = &self.initrd {
            let meta = std::fs::metadata(initrd).map_err(|e| file_err("--initrd", initrd, e))?;
            if !meta.is_file() {
                return Err(ConfigError::File {
                    option: "--initrd",
                    path: initrd.clone(),
                    reason: "not a regular file".into(),
                });
            }
        }
        Ok(())
    }
}

impl VmConfig {
    /// Number of virtio devices this configuration asks for.
    pub fn virtio_device_count(&self) -> usize {
        self.drives.len()
            + self.net.len()
            + usize::from(self.vsock.is_some())
            + usize::from(self.balloon.is_some())
            + usize::from(self.entropy)
    }

    fn validate_devices(&self) -> Result<(), ConfigError> {
        let max = isla_arch::acpi::MAX_VIRTIO_DEVICES;
        if self.virtio_device_count() > max {
            return Err(ConfigError::Invalid {
                option: "devices",
                reason: format!(
                    "{} virtio devices: at most {max} fit (one interrupt line each)",
                    self.virtio_device_count()
                ),
            });
        }
        if self.drives.iter().filter(|d| d.is_root).count() > 1 {
            return Err(ConfigError::Invalid { option: "--rootfs", reason: "more than one root drive".into() });
        }
        for (i, d) in self.drives.iter().enumerate() {
            let meta = std::fs::metadata(&d.path).map_err(|e| file_err("--disk", &d.path, e))?;
            if meta.is_dir() {
                return Err(ConfigError::File {
                    option: "--disk",
                    path: d.path.clone(),
                    reason: "is a directory".into(),
                });
            }
            if self.drives[..i].iter().any(|o| o.id == d.id) {
                return Err(ConfigError::Invalid {
                    option: "--disk",
                    reason: format!("two drives are named `{}`", d.id),
                });
            }
        }
        for n in &self.net {
            if n.host_dev.is_empty() || n.host_dev.len() > 15 || n.host_dev.contains(['/', ' ']) {
                return Err(ConfigError::Invalid {
                    option: "--net",
                    reason: format!("`{}`: a TAP name is 1 to 15 characters, without '/' or spaces", n.host_dev),
                });
            }
            if let Some(m) = &n.mac {
                parse_mac(m, "--net mac")?;
            }
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid == u32::MAX {
                return Err(ConfigError::Invalid {
                    option: "--vsock",
                    reason: format!(
                        "guest CID {}: 0-2 are reserved (hypervisor, local, host); use 3 or more",
                        v.guest_cid
                    ),
                });
            }
            let dir = v.uds_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(ConfigError::File {
                    option: "--vsock",
                    path: v.uds_path.clone(),
                    reason: "its directory does not exist".into(),
                });
            }
        }
        if let Some(b) = &self.balloon {
            if u64::from(b.amount_mib) << 20 > self.memory {
                return Err(ConfigError::Invalid {
                    option: "--balloon",
                    reason: format!("{} MiB is more than the guest's {} MiB", b.amount_mib, self.memory >> 20),
                });
            }
        }
        Ok(())
    }
}

fn file_err(option: &'static str, path: &Path, e: std::io::Error) -> ConfigError {
    ConfigError::File { option, path: path.to_path_buf(), reason: e.to_string() }
}

/// Kernel image formats the loader accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF vmlinux, entered at its ELF entry point.
    Elf,
    /// A bzImage, entered at its 64-bit entry point.
    BzImage,
}

impl KernelFormat {
    /// Reads the file's magic numbers.
    pub fn detect(path: &Path) -> Result<KernelFormat, ConfigError> {
        let mut f = File::open(path).map_err(|e| file_err("--kernel", path, e))?;
        let mut head = [0u8; 0x206];
        let mut n = 0;
        while n < head.len() {
            match f.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) => return Err(file_err("--kernel", path, e)),
            }
        }
        if n >= 4 && head[..4] == *b"\x7fELF" {
            return Ok(KernelFormat::Elf);
        }
        if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
            return Ok(KernelFormat::BzImage);
        }
        Err(ConfigError::File {
            option: "--kernel",
            path: path.to_path_buf(),
            reason: "not a Linux kernel: neither an ELF vmlinux nor a bzImage (no \"HdrS\" at 0x202)".into(),
        })
    }
}

/// Parses a memory size: a number of MiB (`128`), or with a unit (`128M`, `1G`, `512MiB`, `65536K`).
pub fn parse_memory(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::Invalid {
        option: "--memory",
        reason: format!("`{s}`: expected a size such as 128M, 1G or 512 (MiB)"),
    };
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| err())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        _ => return Err(err()),
    };
    n.checked_mul(1 << shift).ok_or_else(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_arguments() {
        let d = DriveConfig::parse_arg("/x/data.img,ro,id=data", false).unwrap();
        assert_eq!((d.id.as_str(), d.read_only, d.is_root), ("data", true, false));
        assert_eq!(DriveConfig::parse_arg("/x/root.ext4", true).unwrap().id, "rootfs");
        assert!(DriveConfig::parse_arg("/x,bogus", false).unwrap_err().to_string().contains("unknown option `bogus`"));
        assert!(DriveConfig::parse_arg("", false).is_err());
        let n = NetConfig::parse_arg("isla-t1,mac=06:00:0a:00:00:02", 0).unwrap();
        assert_eq!(
            (n.id.as_str(), n.host_dev.as_str(), n.mac.as_deref()),
            ("eth0", "isla-t1", Some("06:00:0a:00:00:02"))
        );
        assert!(NetConfig::parse_arg("t,mac=01:00:00:00:00:00", 0).unwrap_err().to_string().contains("multicast"));
        assert!(NetConfig::parse_arg("t,mac=zz", 0).is_err());
        let v = parse_vsock_arg("/run/v.sock,cid=7").unwrap();
        assert_eq!((v.guest_cid, v.uds_path.as_path()), (7, Path::new("/run/v.sock")));
        assert_eq!(parse_vsock_arg("/run/v.sock").unwrap().guest_cid, 3);
        let b = parse_balloon_arg("32,deflate-on-oom,stats=1,reporting").unwrap();
        assert_eq!(
            (b.amount_mib, b.deflate_on_oom, b.stats_polling_interval_s, b.free_page_reporting),
            (32, true, 1, true)
        );
        assert!(parse_balloon_arg("lots").unwrap_err().to_string().contains("in MiB"));
    }

    #[test]
    fn device_validation() {
        let mut c = VmConfig::new("/nonexistent-kernel");
        c.vsock = Some(VsockConfig { guest_cid: 2, uds_path: "/tmp/v.sock".into() });
        assert!(c.validate_devices().unwrap_err().to_string().contains("reserved"));
        c.vsock = None;
        c.balloon = Some(BalloonConfig { amount_mib: 4096, ..Default::default() });
        assert!(c.validate_devices().unwrap_err().to_string().contains("more than the guest"));
        c.balloon = None;
        c.drives.push(DriveConfig::parse_arg("/nonexistent-disk", false).unwrap());
        assert!(c.validate_devices().unwrap_err().to_string().contains("/nonexistent-disk"));
        c.drives.clear();
        c.net.push(NetConfig::parse_arg("a-name-much-too-long", 0).unwrap());
        assert!(c.validate_devices().unwrap_err().to_string().contains("15 characters"));
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("128").unwrap(), 128 << 20);
        assert_eq!(parse_memory("128M").unwrap(), 128 << 20);
        assert_eq!(parse_memory("1G").unwrap(), 1 << 30);
        assert_eq!(parse_memory("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_memory("65536k").unwrap(), 64 << 20);
        for bad in ["", "M", "12X", "-5", "1.5G", "99999999999999999999G"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn console_choices() {
        assert_eq!("stdio".parse::<ConsoleConfig>().unwrap(), ConsoleConfig::Stdio);
        assert_eq!("file:/tmp/x".parse::<ConsoleConfig>().unwrap(), ConsoleConfig::File("/tmp/x".into()));
        assert_eq!("null".parse::<ConsoleConfig>().unwrap(), ConsoleConfig::Null);
        assert!("file:".parse::<ConsoleConfig>().is_err());
        assert!("tcp:1".parse::<ConsoleConfig>().is_err());
    }

    #[test]
    fn templates() {
        assert_eq!("auto".parse::<TemplateChoice>().unwrap(), TemplateChoice::Auto);
        assert_eq!("baseline".parse::<TemplateChoice>().unwrap(), TemplateChoice::Fixed(CpuTemplate::Baseline));
        let e = "t2".parse::<TemplateChoice>().unwrap_err().to_string();
        assert!(e.contains("auto") && e.contains("baseline"), "{e}");
    }

    fn tmp(name: &str, data: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("isla-config-{}-{name}", std::process::id()));
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn kernel_detection() {
        let elf = tmp("elf", b"\x7fELF\x02\x01\x01");
        assert_eq!(KernelFormat::detect(&elf).unwrap(), KernelFormat::Elf);
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bz = tmp("bz", &bz);
        assert_eq!(KernelFormat::detect(&bz).unwrap(), KernelFormat::BzImage);
        let junk = tmp("junk", b"hello world");
        assert!(KernelFormat::detect(&junk).unwrap_err().to_string().contains("not a Linux kernel"));
        let missing = KernelFormat::detect(Path::new("/nonexistent/vmlinux")).unwrap_err().to_string();
        assert!(missing.contains("/nonexistent/vmlinux"), "{missing}");
        for p in [elf, bz, junk] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn validation_names_the_option() {
        let k = tmp("vk", b"\x7fELF\x02\x01\x01");
        let mut c = VmConfig::new(&k);
        c.validate().unwrap();
        c.vcpus = 0;
        assert!(c.validate().unwrap_err().to_string().starts_with("--cpus"));
        c.vcpus = 33;
        assert!(c.validate().unwrap_err().to_string().starts_with("--cpus"));
        c.vcpus = 32;
        c.memory = 0;
        assert!(c.validate().unwrap_err().to_string().starts_with("--memory"));
        c.memory = 1 << 50;
        assert!(c.validate().unwrap_err().to_string().contains("more than this host has"));
        c.memory = 128 << 20;
        c.cmdline = "x".repeat(3000);
        assert!(c.validate().unwrap_err().to_string().starts_with("--cmdline"));
        c.cmdline = DEFAULT_CMDLINE.into();
        c.initrd = Some("/nonexistent/initrd".into());
        assert!(c.validate().unwrap_err().to_string().starts_with("--initrd"));
        let _ = std::fs::remove_file(k);
    }
}
