//! `isla vm bench`: boots the same microVM several times, each in a fresh monitor process (as a
//! user would start it), and reports the boot phases and the monitor's memory with median and
//! spread. `isla lab` reuses it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;

use crate::kit::{boot_files, Kit};
use crate::peer;

#[derive(Args)]
pub struct BenchArgs {
    /// Kernel (default: the guest kit's vmlinux).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Which guest-kit kernel to use when --kernel is not given.
    #[arg(long, value_enum, default_value = "auto")]
    flavour: crate::kit::Flavour,
    /// Initrd (default: the guest kit's initramfs, unless --rootfs is given).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Boot from this ext4 image, read-only, as /dev/vda instead of an initramfs; `kit` is the
    /// guest kit's rootfs.ext4 (the same files as its initramfs).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Boots to measure.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory.
    #[arg(long, default_value = "128M")]
    memory: String,
    /// Kernel command line (default: the monitor's).
    #[arg(long)]
    cmdline: Option<String>,
    /// Write every run's report and the summary as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A Firecracker binary: boot the same kernel and initrd there too, measured the same way from
    /// outside, and print the ratios.
    #[arg(long)]
    firecracker: Option<PathBuf>,
    /// How long a side-by-side run may take before the bench stops it, seconds.
    #[arg(long, default_value_t = 150)]
    peer_limit: u64,
}

impl BenchArgs {
    /// The command line the guests get: --cmdline, or the monitor's default.
    fn cmdline_or_default(&self) -> String {
        self.cmdline.clone().unwrap_or_else(|| isla_vmm::config::DEFAULT_CMDLINE.to_string())
    }
}

/// Median, minimum and maximum of the samples.
pub fn stats(samples: &[f64]) -> Option<(f64, f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    Some((median, s[0], s[n - 1]))
}

const METRICS: &[(&str, &str, &str)] = &[
    ("process start -> boot start", "/phases/vmm_start_to_boot_start_ms", "ms"),
    ("boot start -> kernel banner", "/phases/boot_start_to_kernel_banner_ms", "ms"),
    ("boot start -> init exec", "/phases/boot_start_to_init_exec_ms", "ms"),
    ("boot start -> init marker", "/phases/boot_start_to_boot_marker_ms", "ms"),
    ("process start -> init marker", "/phases/process_start_to_boot_marker_ms", "ms"),
    ("monitor overhead (Pss - guest)", "/memory/vmm_overhead_pss_kib", "KiB"),
    ("guest memory touched (Pss)", "/memory/guest_touched_pss_kib", "KiB"),
];

pub fn run(a: &BenchArgs) -> Result<()> {
    if a.runs == 0 {
        bail!("--runs: at least 1");
    }
    if a.rootfs.is_some() && a.firecracker.is_some() {
        bail!("--rootfs and --firecracker: the side-by-side run boots an initrd only");
    }
    // The kit is looked up for its ext4 image here (--rootfs kit), for its kernel in boot_files.
    let kit = if a.rootfs.as_deref() == Some(Path::new("kit")) { Some(Kit::find()?) } else { None };
    let rootfs = match &kit {
        Some(kit) => Some(kit.rootfs.clone()),
        None => a.rootfs.clone(),
    };
    // The same kernel and initrd as `isla vm run` would pick.
    let (kernel, initrd) =
        boot_files(kit.as_ref(), a.kernel.as_deref(), a.flavour, a.initrd.as_deref(), rootfs.is_some())?;
    let exe = std::env::current_exe().context("finding the isla binary")?;
    let dir = std::env::temp_dir().join(format!("isla-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let boot = |name: &str, cmdline: Option<&str>| -> Result<Value> {
        let report = dir.join(format!("{name}.json"));
        let mut cmd = Command::new(&exe);
        cmd.args(["vm", "run", "--quiet", "--console", "null", "--stop-on-console", "Kernel panic"])
            .args(["--cpus", &a.cpus.to_string(), "--memory", &a.memory])
            .arg("--kernel")
            .arg(&kernel)
            .arg("--report")
            .arg(&report);
        if let Some(i) = &initrd {
            cmd.arg("--initrd").arg(i);
        }
        if let Some(r) = &rootfs {
            let mut arg = r.clone().into_os_string();
            arg.push(",ro");
            cmd.arg("--rootfs").arg(arg);
        }
        if let Some(c) = cmdline {
            cmd.args(["--cmdline", c]);
        }
        cmd.env("ISLA_START_TIME_US", isla_vmm::host::now_us().to_string());
        let status = cmd.status().context("starting the monitor")?;
        let text = std::fs::read_to_string(&report).with_context(|| format!("{name}: no report ({status})"))?;
        let v: Value = serde_json::from_str(&text)?;
        if v.pointer("/exit/status").and_then(Value::as_str) == Some("error") {
            bail!("{name} failed: {}", v.pointer("/exit/message").and_then(Value::as_str).unwrap_or(""));
        }
        Ok(v)
    };
    let mut reports = Vec::new();
    for i in 0..a.runs {
        let v = boot(&format!("run{i}"), a.cmdline.as_deref())?;
        eprintln!(
            "run {}/{}: {}, init marker at {} ms",
            i + 1,
            a.runs,
            v.pointer("/exit/status").and_then(Value::as_str).unwrap_or("?"),
            v.pointer("/phases/boot_start_to_boot_marker_ms")
                .and_then(Value::as_f64)
                .map_or("-".into(), |x| format!("{x:.0}"))
        );
        reports.push(v);
    }
    // The timed runs keep the kernel log off the console (it costs VM exits); one more boot with
    // the log on shows where the kernel's time goes, from its own printk timestamps.
    let base = a.cmdline_or_default();
    let verbose = verbose_cmdline(&base);
    let anatomy = if verbose != base {
        eprintln!("one more boot with the kernel log on the console, for the split by phase ...");
        Some(boot("anatomy", Some(&verbose))?)
    } else {
        None
    };
    let first = &reports[0];
    println!(
        "isla microVM boot: {} vCPU, {} MiB, kernel {} ({}), template {}, {} host, {} run(s)",
        a.cpus,
        first.pointer("/memory_mib").and_then(Value::as_u64).unwrap_or(0),
        kernel.display(),
        first.pointer("/kernel_format").and_then(Value::as_str).unwrap_or("?"),
        first.pointer("/cpu_template").and_then(Value::as_str).unwrap_or("?"),
        if first.pointer("/nested_host").and_then(Value::as_bool) == Some(true) {
            "nested (PVM)"
        } else {
            "hardware KVM"
        },
        a.runs
    );
    println!("{:<34} {:>12} {:>12} {:>12}", "metric", "median", "min", "max");
    let mut summary = serde_json::Map::new();
    for (name, ptr, unit) in METRICS {
        let samples: Vec<f64> = reports.iter().filter_map(|r| r.pointer(ptr).and_then(Value::as_f64)).collect();
        match stats(&samples) {
            Some((med, min, max)) => {
                println!("{name:<34} {med:>9.1} {unit:<2} {min:>9.1} {unit:<2} {max:>9.1} {unit:<2}");
                summary.insert(
                    ptr.to_string(),
                    serde_json::json!({"median": med, "min": min, "max": max, "samples": samples}),
                );
            }
            None => println!("{name:<34} {:>12}", "not reached"),
        }
    }
    if let Some(v) = anatomy.as_ref().or(reports.first()) {
        print_anatomy(v);
    }
    let peers = match &a.firecracker {
        Some(fc) => side_by_side(a, fc, &kernel, initrd.as_deref(), &dir)?,
        None => Value::Null,
    };
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(out) = &a.out {
        let doc = serde_json::json!({"summary": summary, "runs": reports, "anatomy": anatomy, "side_by_side": peers});
        std::fs::write(out, serde_json::to_string_pretty(&doc)?).with_context(|| format!("--out {}", out.display()))?;
    }
    Ok(())
}

/// The command line without `quiet` (and `loglevel=`): the kernel log on the console.
pub fn verbose_cmdline(cmdline: &str) -> String {
    cmdline.split_whitespace().filter(|w| *w != "quiet" && !w.starts_with("loglevel=")).collect::<Vec<_>>().join(" ")
}

/// The kernel's phases from one boot's console milestones: for each, the guest's printk time and
/// the monitor's time since boot start, and the time since the previous milestone.
fn print_anatomy(report: &Value) {
    let Some(ms) = report.pointer("/milestones").and_then(Value::as_array) else { return };
    println!("split by phase (one boot with the kernel log on the console; guest printk time and monitor time):");
    println!("{:<22} {:>12} {:>14} {:>12}", "milestone", "guest s", "boot start ms", "phase ms");
    let mut prev = 0.0;
    for m in ms {
        let t = m.pointer("/ms_since_boot_start").and_then(Value::as_f64).unwrap_or(0.0);
        let guest = m.pointer("/guest_time_s").and_then(Value::as_f64).map_or("-".to_string(), |g| format!("{g:.3}"));
        println!(
            "{:<22} {:>12} {:>14.1} {:>12.1}",
            m.pointer("/name").and_then(Value::as_str).unwrap_or("?"),
            guest,
            t,
            t - prev
        );
        prev = t;
    }
}

/// Boots the same kernel and initrd on isla and on Firecracker, each spawned by the bench with
/// its console on stdout, and prints both with ratios (Firecracker / isla).
fn side_by_side(a: &BenchArgs, fc: &Path, kernel: &Path, initrd: Option<&Path>, dir: &Path) -> Result<Value> {
    let memory = isla_vmm::config::parse_memory(&a.memory)?;
    // Both are timed to lines of the kernel log: it must be on the console.
    let cmdline = verbose_cmdline(&a.cmdline_or_default());
    let limit = Duration::from_secs(a.peer_limit);
    let stop_text = "Run /init";

    let mut isla = Command::new(std::env::current_exe()?);
    isla.env("ISLA_LOG", "isla_vmm=info");
    isla.args(["vm", "run", "--quiet", "--console", "stdio", "--cpus", &a.cpus.to_string(), "--memory", &a.memory])
        .args(["--cmdline", &cmdline])
        .arg("--kernel")
        .arg(kernel);
    if let Some(i) = initrd {
        isla.arg("--initrd").arg(i);
    }
    eprintln!("side by side: isla ...");
    let isla_s = peer::measure(isla, memory, isla_vmm::builder::STARTED_LOG, stop_text, limit)?;

    let mut boot = serde_json::json!({"kernel_image_path": kernel, "boot_args": cmdline});
    if let Some(i) = initrd {
        boot["initrd_path"] = serde_json::json!(i);
    }
    let config = serde_json::json!({
        "boot-source": boot,
        "drives": [],
        "machine-config": {"vcpu_count": a.cpus, "mem_size_mib": memory >> 20},
    });
    let cfg_path = dir.join("firecracker.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&config)?)?;
    let mut fcc = Command::new(fc);
    fcc.arg("--no-api").arg("--config-file").arg(&cfg_path);
    eprintln!("side by side: firecracker ({}) ...", fc.display());
    let fc_s = peer::measure(fcc, memory, "Successfully started microvm", stop_text, limit)?;

    let f1 = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1} ms"));
    let ratio = |i: Option<f64>, f: Option<f64>| match (i, f) {
        (Some(i), Some(f)) if i > 0.0 => format!("{:.2}x", f / i),
        _ => "-".to_string(),
    };
    println!();
    println!("side by side, same kernel and initrd, measured from outside (ratio = firecracker / isla):");
    println!("{:<36} {:>16} {:>16} {:>8}", "metric", "isla", "firecracker", "ratio");
    println!(
        "{:<36} {:>16} {:>16} {:>8}",
        "spawn -> guest started (monitor ready)",
        f1(isla_s.spawn_to_ready_ms),
        f1(fc_s.spawn_to_ready_ms),
        ratio(isla_s.spawn_to_ready_ms, fc_s.spawn_to_ready_ms)
    );
    println!(
        "{:<36} {:>16} {:>16} {:>8}",
        "spawn -> kernel banner",
        f1(isla_s.spawn_to_kernel_banner_ms),
        f1(fc_s.spawn_to_kernel_banner_ms),
        ratio(isla_s.spawn_to_kernel_banner_ms, fc_s.spawn_to_kernel_banner_ms)
    );
    println!(
        "{:<36} {:>16} {:>16} {:>8}",
        format!("spawn -> {stop_text:?}"),
        f1(isla_s.spawn_to_stop_text_ms),
        f1(fc_s.spawn_to_stop_text_ms),
        ratio(isla_s.spawn_to_stop_text_ms, fc_s.spawn_to_stop_text_ms)
    );
    let kib = |v: Option<u64>| v.map_or("-".to_string(), |x| format!("{x} KiB"));
    println!(
        "{:<36} {:>16} {:>16} {:>8}",
        "monitor Pss beside guest RAM",
        kib(isla_s.overhead_pss_kib),
        kib(fc_s.overhead_pss_kib),
        ratio(isla_s.overhead_pss_kib.map(|x| x as f64), fc_s.overhead_pss_kib.map(|x| x as f64))
    );
    println!("{:<36} {:>16} {:>16}", "ended", short(&isla_s.ended), short(&fc_s.ended));
    println!("firecracker's last lines:");
    for l in fc_s.tail.iter().rev().take(6).rev() {
        println!("  | {l}");
    }
    Ok(serde_json::json!({"isla": isla_s, "firecracker": fc_s, "firecracker_binary": fc}))
}

fn short(s: &str) -> String {
    s.replace("stopped by the bench", "stopped").chars().take(16).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(stats(&[]), None);
        assert_eq!(stats(&[3.0]), Some((3.0, 3.0, 3.0)));
        assert_eq!(stats(&[5.0, 1.0, 3.0]), Some((3.0, 1.0, 5.0)));
        assert_eq!(stats(&[4.0, 1.0, 3.0, 2.0]), Some((2.5, 1.0, 4.0)));
    }

    #[test]
    fn verbose_command_line_drops_quiet_and_loglevel() {
        assert_eq!(verbose_cmdline("console=ttyS0 quiet pci=off loglevel=3"), "console=ttyS0 pci=off");
        assert_eq!(verbose_cmdline("console=ttyS0 reboot=k"), "console=ttyS0 reboot=k");
    }
}
