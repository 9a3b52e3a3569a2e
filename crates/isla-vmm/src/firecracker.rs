//! Firecracker's JSON configuration file (`--config-file`), mapped onto [`VmConfig`].
//!
//! Sections and fields are matched by name: an unknown one is an error that names it, and a
//! Firecracker feature isla does not implement yet is refused by name rather than ignored.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::config::{
    BalloonConfig, ConfigError, DriveConfig, NetConfig, RateLimiterConfig, TemplateChoice, VmConfig, VsockConfig,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FcConfig {
    #[serde(rename = "boot-source")]
    boot_source: BootSource,
    #[serde(default)]
    drives: Vec<Drive>,
    #[serde(rename = "machine-config")]
    machine_config: Option<MachineConfig>,
    #[serde(rename = "network-interfaces", default)]
    network_interfaces: Vec<NetIface>,
    balloon: Option<FcBalloon>,
    vsock: Option<FcVsock>,
    entropy: Option<FcEntropy>,
    // Firecracker sections that isla knows of but does not implement yet.
    logger: Option<Value>,
    metrics: Option<Value>,
    #[serde(rename = "mmds-config")]
    mmds_config: Option<Value>,
    #[serde(rename = "cpu-config")]
    cpu_config: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BootSource {
    kernel_image_path: PathBuf,
    boot_args: Option<String>,
    initrd_path: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Drive {
    drive_id: String,
    path_on_host: PathBuf,
    is_root_device: bool,
    #[serde(default)]
    is_read_only: bool,
    partuuid: Option<String>,
    cache_type: Option<String>,
    io_engine: Option<String>,
    rate_limiter: Option<RateLimiterConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FcVsock {
    guest_cid: u32,
    uds_path: PathBuf,
    /// Firecracker's device name; accepted, isla has one vsock device.
    #[serde(default, rename = "vsock_id")]
    _vsock_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FcBalloon {
    amount_mib: u32,
    #[serde(default)]
    deflate_on_oom: bool,
    #[serde(default)]
    stats_polling_interval_s: u16,
    #[serde(default)]
    free_page_reporting: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FcEntropy {
    #[serde(default)]
    rate_limiter: Option<RateLimiterConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineConfig {
    vcpu_count: u8,
    mem_size_mib: u64,
    #[serde(default)]
    smt: bool,
    cpu_template: Option<String>,
    #[serde(default)]
    track_dirty_pages: bool,
    huge_pages: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetIface {
    iface_id: String,
    host_dev_name: String,
    guest_mac: Option<String>,
    rx_rate_limiter: Option<RateLimiterConfig>,
    tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Reads a Firecracker configuration file.
pub fn load(path: &Path) -> Result<VmConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::ConfigFile { path: path.to_path_buf(), reason: e.to_string() })?;
    parse(&text, path)
}

/// Parses the text of a Firecracker configuration file (`path` names it in errors).
pub fn parse(text: &str, path: &Path) -> Result<VmConfig, ConfigError> {
    let fc: FcConfig = serde_json::from_str(text)
        .map_err(|e| ConfigError::ConfigFile { path: path.to_path_buf(), reason: e.to_string() })?;
    let unsupported = |field: &str, hint: &str| ConfigError::Unsupported {
        path: path.to_path_buf(),
        field: field.to_string(),
        hint: hint.to_string(),
    };
    for (name, present) in [
        ("logger", fc.logger.is_some()),
        ("metrics", fc.metrics.is_some()),
        ("mmds-config", fc.mmds_config.is_some()),
        ("cpu-config", fc.cpu_config.is_some()),
    ] {
        if present {
            return Err(unsupported(name, "remove this section"));
        }
    }

    let mut cfg = VmConfig::new(fc.boot_source.kernel_image_path);
    cfg.initrd = fc.boot_source.initrd_path;
    if let Some(args) = fc.boot_source.boot_args {
        cfg.cmdline = args;
    }
    if let Some(m) = fc.machine_config {
        cfg.vcpus = m.vcpu_count;
        cfg.memory = m.mem_size_mib.checked_mul(1 << 20).ok_or_else(|| ConfigError::Invalid {
            option: "machine-config.mem_size_mib",
            reason: format!("{} is too large", m.mem_size_mib),
        })?;
        if m.smt {
            return Err(unsupported("machine-config.smt", "isla exposes one thread per core; set it to false"));
        }
        if m.track_dirty_pages {
            return Err(unsupported("machine-config.track_dirty_pages", "dirty page tracking comes with snapshots"));
        }
        if let Some(h) = m.huge_pages.filter(|h| h != "None") {
            return Err(unsupported("machine-config.huge_pages", &format!("`{h}`: only \"None\" for now")));
        }
        if let Some(t) = m.cpu_template.filter(|t| t != "None") {
            cfg.cpu_template = t.to_ascii_lowercase().parse::<TemplateChoice>().map_err(|_| {
                unsupported(
                    "machine-config.cpu_template",
                    &format!("`{t}`: isla's templates are \"host\" and \"baseline\" (or \"None\" for automatic)"),
                )
            })?;
        }
    }
    let mut roots = 0;
    for d in fc.drives {
        let field = |f: &str| format!("drives[{}].{f}", d.drive_id);
        if d.partuuid.is_some() {
            return Err(unsupported(&field("partuuid"), "the root drive is /dev/vda"));
        }
        if let Some(c) = d.cache_type.filter(|c| c != "Unsafe") {
            return Err(unsupported(&field("cache_type"), &format!("`{c}`: only \"Unsafe\" for now")));
        }
        if let Some(e) = d.io_engine.filter(|e| e != "Sync") {
            return Err(unsupported(&field("io_engine"), &format!("`{e}`: only \"Sync\" for now")));
        }
        roots += usize::from(d.is_root_device);
        cfg.drives.push(DriveConfig {
            id: d.drive_id,
            path: d.path_on_host,
            is_root: d.is_root_device,
            read_only: d.is_read_only,
            rate_limiter: d.rate_limiter,
        });
    }
    if roots > 1 {
        return Err(ConfigError::Invalid { option: "drives", reason: "more than one drive has is_root_device".into() });
    }
    for n in fc.network_interfaces {
        cfg.net.push(NetConfig {
            id: n.iface_id,
            host_dev: n.host_dev_name,
            mac: n.guest_mac,
            rx_rate_limiter: n.rx_rate_limiter,
            tx_rate_limiter: n.tx_rate_limiter,
        });
    }
    cfg.vsock = fc.vsock.map(|v| VsockConfig { guest_cid: v.guest_cid, uds_path: v.uds_path });
    cfg.balloon = fc.balloon.map(|b| BalloonConfig {
        amount_mib: b.amount_mib,
        deflate_on_oom: b.deflate_on_oom,
        stats_polling_interval_s: b.stats_polling_interval_s,
        free_page_reporting: b.free_page_reporting,
    });
    // Firecracker adds an entropy device only when the section is there; isla always does
    // unless told otherwise, so the section is accepted (its rate limiter is not applied yet).
    if let Some(FcEntropy { rate_limiter: Some(_) }) = fc.entropy {
        return Err(unsupported("entropy.rate_limiter", "remove it; the entropy device is not rate limited yet"));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `config.json` of seed 000 (Parte 3.2), byte for byte.
    const SEED_000: &str = include_str!("../../../examples/firecracker/seed000-config.json");

    fn p() -> &'static Path {
        Path::new("config.json")
    }

    #[test]
    fn seed_000_config_is_accepted() {
        let c = parse(SEED_000, p()).unwrap();
        assert_eq!(c.kernel, PathBuf::from("hello-vmlinux.bin"));
        assert_eq!(c.cmdline, "console=ttyS0 reboot=k panic=1");
        assert_eq!(c.vcpus, 2);
        assert_eq!(c.memory, 1024 << 20);
        assert_eq!(
            c.drives,
            vec![DriveConfig {
                id: "rootfs".into(),
                path: "hello-rootfs.ext4".into(),
                is_root: true,
                read_only: false,
                rate_limiter: None,
            }]
        );
        assert!(c.net.is_empty());
        assert_eq!(c.initrd, None);
    }

    #[test]
    fn network_interfaces_and_initrd() {
        let c = parse(
            r#"{"boot-source":{"kernel_image_path":"k","initrd_path":"i"},
                "network-interfaces":[{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:00:00:00:01"}],
                "machine-config":{"vcpu_count":1,"mem_size_mib":128,"smt":false,"cpu_template":"None"}}"#,
            p(),
        )
        .unwrap();
        assert_eq!(c.initrd, Some(PathBuf::from("i")));
        assert_eq!(c.net[0].host_dev, "tap0");
        assert_eq!(c.cpu_template, TemplateChoice::Auto);
    }

    #[test]
    fn unknown_fields_are_named() {
        let e = parse(r#"{"boot-source":{"kernel_image_path":"k","bootargs":"x"}}"#, p()).unwrap_err().to_string();
        assert!(e.contains("unknown field `bootargs`"), "{e}");
        let e = parse(r#"{"boot-source":{"kernel_image_path":"k"},"gpu":{}}"#, p()).unwrap_err().to_string();
        assert!(e.contains("unknown field `gpu`"), "{e}");
        let e = parse(r#"{"boot-source":{"kernel_image_path":"k"},"machine-config":{"vcpu_count":1,"mem_size_mib":64,"cores":2}}"#, p())
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `cores`"), "{e}");
    }

    #[test]
    fn unsupported_features_are_refused_by_name() {
        let e = parse(r#"{"boot-source":{"kernel_image_path":"k"},"logger":{"log_path":"x"}}"#, p())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`logger` is not supported"), "{e}");
        let e = parse(r#"{"boot-source":{"kernel_image_path":"k"},"machine-config":{"vcpu_count":1,"mem_size_mib":64,"cpu_template":"T2"}}"#, p())
            .unwrap_err()
            .to_string();
        assert!(e.contains("machine-config.cpu_template") && e.contains("T2"), "{e}");
        let e = parse(r#"{"boot-source":{"kernel_image_path":"k"},"machine-config":{"vcpu_count":1,"mem_size_mib":64,"smt":true}}"#, p())
            .unwrap_err()
            .to_string();
        assert!(e.contains("machine-config.smt"), "{e}");
    }

    #[test]
    fn devices_and_rate_limiters_in_firecracker_form() {
        let c = parse(
            r#"{"boot-source":{"kernel_image_path":"k"},
                "drives":[{"drive_id":"d","path_on_host":"x","is_root_device":false,
                  "rate_limiter":{"bandwidth":{"size":1048576,"one_time_burst":0,"refill_time":100},"ops":{"size":10,"refill_time":1000}}}],
                "network-interfaces":[{"iface_id":"eth0","host_dev_name":"tap0","tx_rate_limiter":{"ops":{"size":5,"refill_time":10}}}],
                "vsock":{"guest_cid":3,"uds_path":"/tmp/v.sock","vsock_id":"vsock0"},
                "balloon":{"amount_mib":16,"deflate_on_oom":true,"stats_polling_interval_s":1},
                "entropy":{}}"#,
            p(),
        )
        .unwrap();
        let rl = c.drives[0].rate_limiter.unwrap();
        assert_eq!(rl.bandwidth.unwrap().refill_time_ms, 100);
        assert_eq!(rl.ops.unwrap().size, 10);
        assert_eq!(c.net[0].tx_rate_limiter.unwrap().ops.unwrap().size, 5);
        assert_eq!(c.vsock.as_ref().unwrap().guest_cid, 3);
        let b = c.balloon.as_ref().unwrap();
        assert_eq!((b.amount_mib, b.deflate_on_oom, b.stats_polling_interval_s), (16, true, 1));
        let e = parse(
            r#"{"boot-source":{"kernel_image_path":"k"},"drives":[{"drive_id":"d","path_on_host":"x","is_root_device":false,"rate_limiter":{"bytes":{}}}]}"#,
            p(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `bytes`"), "{e}");
    }

    #[test]
    fn malformed_json_has_a_position() {
        let e = parse("{\n \"boot-source\": {\n", p()).unwrap_err().to_string();
        assert!(e.starts_with("config.json:") && e.contains("line"), "{e}");
        let e = parse(
            r#"{"boot-source":{"kernel_image_path":"k"},"machine-config":{"vcpu_count":-1,"mem_size_mib":64}}"#,
            p(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("vcpu_count") || e.contains("invalid value"), "{e}");
        assert!(parse("{}", p()).unwrap_err().to_string().contains("boot-source"));
    }
}
