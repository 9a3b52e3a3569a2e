//! Typed microVM configuration, validated at the edge: everything the builder uses has been
//! checked here, and every error names the option and how to fix it.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use isla_arch::cpuid::CpuTemplate;
use isla_arch::layout::CMDLINE_MAX_SIZE;

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

/// A block device from a Firecracker `drives` entry (kept typed; served once virtio-blk lands).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    /// Drive name.
    pub id: String,
    /// Backing file.
    pub path: PathBuf,
    /// Root device (adds `root=/dev/vdX` to the command line).
    pub is_root: bool,
    /// Read-only.
    pub read_only: bool,
}

/// A network interface from a Firecracker `network-interfaces` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Interface name.
    pub id: String,
    /// Host TAP device.
    pub host_dev: String,
    /// Guest MAC address.
    pub mac: Option<String>,
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
    /// Stop the VM (cleanly, status `stopped`) when the console prints this text.
    pub stop_on_console: Option<String>,
    /// Handle emulation failures with the instruction fallback (on by default; it only runs on an
    /// exit that would otherwise stop the VM).
    pub insn_fallback: bool,
    /// Sample the guest's RIP at this interval (the guest profiler, [`crate::profile`]); None: off.
    pub profile_interval: Option<std::time::Duration>,
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
            stop_on_console: None,
            insn_fallback: true,
            profile_interval: None,
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
