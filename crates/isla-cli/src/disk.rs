//! `isla disk`: raw and qcow2 images with `qemu-img`'s conventions (same subcommands, flags,
//! JSON field names and `check` exit statuses). The work is done by `isla_disk`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use isla_disk::{CheckReport, CreateOptions, Format, OpenOptions, RepairMode};

#[derive(Subcommand)]
pub enum DiskCmd {
    /// Create an image: `isla disk create -f qcow2 [-b BASE -F qcow2] [-o cluster_size=64k] FILE [SIZE]`.
    Create(CreateArgs),
    /// Describe an image (format, sizes, backing file, snapshots).
    Info(InfoArgs),
    /// Check a qcow2 image's refcounts and tables. Exit status: 0 clean, 2 corruptions,
    /// 3 leaks only, 1 the check could not run.
    Check(CheckArgs),
    /// Copy an image (through its backing chain) to a new standalone image.
    Convert(ConvertArgs),
    /// Change an image's virtual size: SIZE, +SIZE or -SIZE (shrinking needs --shrink, raw only).
    Resize(ResizeArgs),
    /// Internal snapshots of a qcow2 image: -c NAME, -l, -a NAME|ID, -d NAME|ID.
    Snapshot(SnapshotArgs),
    /// Measure sequential and random I/O on an image (and `qemu-img bench` on it with --qemu).
    Bench(BenchArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

#[derive(Args)]
pub struct CreateArgs {
    /// Image format: raw or qcow2.
    #[arg(short = 'f', default_value = "raw")]
    format: String,
    /// Backing file (qcow2 only); a relative name is resolved from the new image's directory.
    #[arg(short = 'b')]
    backing: Option<PathBuf>,
    /// Backing file format (detected when not given).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Options, comma-separated: cluster_size=SIZE.
    #[arg(short = 'o')]
    options: Option<String>,
    file: PathBuf,
    /// Virtual size (bytes, or with a k/M/G/T suffix); default: the backing file's size.
    size: Option<String>,
}

#[derive(Args)]
pub struct InfoArgs {
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    file: PathBuf,
}

#[derive(Args)]
pub struct CheckArgs {
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Repair: `leaks` (lower refcounts that are too high) or `all`.
    #[arg(short = 'r')]
    repair: Option<String>,
    file: PathBuf,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Source format (detected when not given; checked when given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format: raw or qcow2.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Output options, comma-separated: cluster_size=SIZE.
    #[arg(short = 'o')]
    options: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    src: PathBuf,
    dst: PathBuf,
}

#[derive(Args)]
pub struct ResizeArgs {
    /// Allow shrinking (raw images only; data past the new end is lost).
    #[arg(long)]
    shrink: bool,
    file: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("op").required(true).args(["create", "list", "apply", "delete"])))]
pub struct SnapshotArgs {
    /// Create a snapshot.
    #[arg(short = 'c')]
    create: Option<String>,
    /// List snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Apply (revert to) a snapshot.
    #[arg(short = 'a')]
    apply: Option<String>,
    /// Delete a snapshot.
    #[arg(short = 'd')]
    delete: Option<String>,
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    file: PathBuf,
}

#[derive(Args)]
pub struct BenchArgs {
    file: PathBuf,
    /// Request size.
    #[arg(short = 's', default_value = "4k")]
    size: String,
    /// Requests per pattern.
    #[arg(short = 'c', default_value_t = 20000)]
    count: u64,
    /// Also measure writes (the image's data is overwritten).
    #[arg(short = 'w')]
    write: bool,
    /// Also run `qemu-img bench` (queue depth 1, and its default 64) on the same file.
    #[arg(long)]
    qemu: bool,
}

/// Parses a size: bytes, or a number with a k/K, M, G, T, P or E suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let unit = s[i..].trim_end_matches(['B', 'b']).to_ascii_uppercase();
            let m = match unit.as_str() {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                "P" => 1 << 50,
                "E" => 1 << 60,
                _ => bail!("size `{s}`: unknown unit (use k, M, G, T, P or E)"),
            };
            (&s[..i], m)
        }
    };
    let v = if num.contains('.') {
        let f: f64 = num.parse().with_context(|| format!("size `{s}` is not a number"))?;
        if !f.is_finite() || f < 0.0 || f * mult as f64 > u64::MAX as f64 {
            bail!("size `{s}` is out of range");
        }
        (f * mult as f64) as u64
    } else {
        let n: u64 = num.parse().with_context(|| format!("size `{s}` is not a number"))?;
        n.checked_mul(mult).with_context(|| format!("size `{s}` is too large"))?
    };
    Ok(v)
}

fn parse_format(s: &str) -> Result<Format> {
    Ok(s.parse::<Format>()?)
}

/// Reads `cluster_size=...` out of a `-o` option string.
fn cluster_size_option(opts: Option<&str>) -> Result<Option<u32>> {
    let mut cs = None;
    for kv in opts.unwrap_or("").split(',').filter(|s| !s.is_empty()) {
        match kv.split_once('=') {
            Some(("cluster_size", v)) => {
                let n = parse_size(v)?;
                cs = Some(u32::try_from(n).with_context(|| format!("cluster_size {n} is too large"))?);
            }
            _ => bail!("-o {kv}: unsupported option (only cluster_size=SIZE is)"),
        }
    }
    Ok(cs)
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.3} {}", UNITS[u]).replace(".000 ", " ")
    }
}

pub fn run(cmd: &DiskCmd) -> Result<i32> {
    match cmd {
        DiskCmd::Create(a) => create(a).map(|()| 0),
        DiskCmd::Info(a) => info(a).map(|()| 0),
        DiskCmd::Check(a) => check(a),
        DiskCmd::Convert(a) => convert(a).map(|()| 0),
        DiskCmd::Resize(a) => resize(a).map(|()| 0),
        DiskCmd::Snapshot(a) => snapshot(a).map(|()| 0),
        DiskCmd::Bench(a) => bench(a).map(|()| 0),
    }
}

fn create(a: &CreateArgs) -> Result<()> {
    let format = parse_format(&a.format)?;
    let size = a.size.as_deref().map(parse_size).transpose()?;
    let backing = match &a.backing {
        None => None,
        Some(b) => {
            let fmt = match &a.backing_format {
                Some(f) => parse_format(f)?,
                None => isla_disk::detect(&isla_disk::resolve_backing(&a.file, b))?,
            };
            Some((b.clone(), fmt))
        }
    };
    let opts = CreateOptions { format, size, backing, cluster_size: cluster_size_option(a.options.as_deref())? };
    isla_disk::create(&a.file, &opts)?;
    let size = isla_disk::info(&a.file)?.virtual_size;
    println!("Formatting '{}', fmt={format} size={size}", a.file.display());
    Ok(())
}

fn info(a: &InfoArgs) -> Result<()> {
    let i = isla_disk::info(&a.file)?;
    if let Output::Json = a.output {
        println!("{}", serde_json::to_string_pretty(&i)?);
        return Ok(());
    }
    println!("image: {}", i.filename);
    println!("file format: {}", i.format);
    println!("virtual size: {} ({} bytes)", human_size(i.virtual_size), i.virtual_size);
    println!("disk size: {}", human_size(i.actual_size));
    if let Some(cs) = i.cluster_size {
        println!("cluster_size: {cs}");
    }
    if let Some(b) = &i.backing_filename {
        let full = i.full_backing_filename.as_deref().unwrap_or(b);
        println!("backing file: {b} (actual path: {full})");
    }
    if let Some(f) = &i.backing_filename_format {
        println!("backing file format: {f}");
    }
    if !i.snapshots.is_empty() {
        println!("Snapshot list:");
        print_snapshots(&i.snapshots);
    }
    if let Some(fs) = &i.format_specific {
        let d = &fs.data;
        println!("Format specific information:");
        println!("    compat: {}", d.compat);
        println!("    compression type: {}", d.compression_type);
        println!("    lazy refcounts: {}", d.lazy_refcounts);
        println!("    refcount bits: {}", d.refcount_bits);
        println!("    corrupt: {}", d.corrupt);
        println!("    extended l2: {}", d.extended_l2);
    }
    if i.dirty_flag {
        println!("dirty flag: true");
    }
    Ok(())
}

fn print_snapshots(list: &[isla_disk::snapshot::SnapshotInfo]) {
    println!("{:<10}{:<18}{:>8} {:<19} {:>15}", "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK");
    for s in list {
        let date = format_date(i64::from(s.date_sec));
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            s.vm_clock_sec / 3600,
            s.vm_clock_sec / 60 % 60,
            s.vm_clock_sec % 60,
            s.vm_clock_nsec / 1_000_000
        );
        println!("{:<10}{:<18}{:>8} {date:<19} {clock:>15}", s.id, s.name, human_size(s.vm_state_size));
    }
}

/// UTC date and time of a Unix timestamp (civil-from-days).
fn format_date(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

fn check(a: &CheckArgs) -> Result<i32> {
    let mode = match a.repair.as_deref() {
        None => RepairMode::None,
        Some("leaks") => RepairMode::Leaks,
        Some("all") => RepairMode::All,
        Some(o) => bail!("-r {o}: use `leaks` or `all`"),
    };
    let r = isla_disk::check(&a.file, mode)?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        Output::Human => print_check(&r),
    }
    Ok(if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    })
}

fn print_check(r: &CheckReport) {
    for m in &r.messages {
        println!("{m}");
    }
    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
        println!("The following inconsistencies were found and repaired:");
        println!("\n    {} leaked clusters\n    {} corruptions\n", r.leaks_fixed, r.corruptions_fixed);
    }
    if r.is_clean() {
        println!("No errors were found on the image.");
    } else {
        if r.corruptions > 0 {
            println!("\n{} errors were found on the image.", r.corruptions);
            println!("Data may be corrupted, or further writes to the image may corrupt it.");
        }
        if r.leaks > 0 {
            println!("\n{} leaked clusters were found on the image.", r.leaks);
            println!("This means waste of disk space, but no harm to data.");
        }
        if r.check_errors > 0 {
            println!("\n{} internal errors have occurred during the check.", r.check_errors);
        }
    }
    if r.total_clusters > 0 {
        println!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, 0.00% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            r.allocated_clusters as f64 * 100.0 / r.total_clusters as f64,
            if r.allocated_clusters > 0 {
                r.fragmented_clusters as f64 * 100.0 / r.allocated_clusters as f64
            } else {
                0.0
            }
        );
    }
    println!("Image end offset: {}", r.image_end_offset);
}

fn convert(a: &ConvertArgs) -> Result<()> {
    if let Some(f) = &a.format {
        let want = parse_format(f)?;
        let got = isla_disk::detect(&a.src)?;
        if want != got {
            bail!("{}: -f {want} given, but the file is {got}", a.src.display());
        }
    }
    let out = parse_format(&a.out_format)?;
    let cs = cluster_size_option(a.options.as_deref())?;
    let mut last = 0u64;
    isla_disk::convert(&a.src, &a.dst, out, cs, |done, total| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        if a.progress && pct != last {
            last = pct;
            eprint!("\r    ({pct}.00/100%)");
        }
    })?;
    if a.progress {
        eprintln!();
    }
    Ok(())
}

fn resize(a: &ResizeArgs) -> Result<()> {
    let cur = isla_disk::info(&a.file)?.virtual_size;
    let new = if let Some(d) = a.size.strip_prefix('+') {
        cur.checked_add(parse_size(d)?).context("new size overflows")?
    } else if let Some(d) = a.size.strip_prefix('-') {
        cur.checked_sub(parse_size(d)?).context("cannot shrink below zero")?
    } else {
        parse_size(&a.size)?
    };
    if new < cur && !a.shrink {
        bail!("{}: shrinking ({cur} -> {new} bytes) loses data; pass --shrink to confirm", a.file.display());
    }
    isla_disk::resize(&a.file, new)?;
    println!("Image resized.");
    Ok(())
}

fn snapshot(a: &SnapshotArgs) -> Result<()> {
    if let Some(n) = &a.create {
        isla_disk::snapshot::create(&a.file, n)?;
    } else if let Some(n) = &a.apply {
        isla_disk::snapshot::apply(&a.file, n)?;
    } else if let Some(n) = &a.delete {
        isla_disk::snapshot::delete(&a.file, n)?;
    } else {
        let list = isla_disk::snapshot::list(&a.file)?;
        match a.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
            Output::Human => {
                println!("Snapshot list:");
                print_snapshots(&list);
            }
        }
    }
    Ok(())
}

/// A small fixed-seed generator for random offsets (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn bench(a: &BenchArgs) -> Result<()> {
    let bs = parse_size(&a.size)?;
    if bs == 0 || bs > 64 << 20 {
        bail!("-s {}: request size must be between 1 byte and 64 MiB", a.size);
    }
    let mut dev = isla_disk::open(&a.file, OpenOptions { read_only: !a.write, format: None })?;
    let slots = dev.size() / bs;
    if slots == 0 {
        bail!("{}: the image is smaller than one request", a.file.display());
    }
    let count = a.count;
    let fmt = isla_disk::detect(&a.file)?;
    println!("isla disk bench: {} ({fmt}), {count} requests of {bs} bytes, queue depth 1", a.file.display());
    let mut buf = vec![0xa5u8; bs as usize];
    let mut patterns = vec![("read", false, false), ("randread", false, true)];
    if a.write {
        patterns.extend([("write", true, false), ("randwrite", true, true)]);
    }
    for (name, write, random) in patterns {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let t = Instant::now();
        for i in 0..count {
            let slot = if random { rng.next() % slots } else { i % slots };
            if write {
                dev.write_at(&buf, slot * bs)?;
            } else {
                dev.read_at(&mut buf, slot * bs)?;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let iops = count as f64 / secs;
        print!("  isla {name:<10} {:>10.1} MB/s {:>10.0} IOPS ({secs:.3} s)", iops * bs as f64 / 1e6, iops);
        if write {
            let t = Instant::now();
            dev.flush()?;
            print!(", then fsync {:.3} s", t.elapsed().as_secs_f64());
        }
        println!();
    }
    drop(dev);
    if a.qemu {
        for depth in [1u32, 64] {
            let mut modes = vec![false];
            if a.write {
                modes.push(true);
            }
            for write in modes {
                let mut cmd = std::process::Command::new("qemu-img");
                cmd.args(["bench", "-f", fmt.as_str(), "-c", &count.to_string(), "-s", &bs.to_string()]);
                cmd.args(["-d", &depth.to_string(), "-t", "writeback"]);
                if write {
                    cmd.arg("-w");
                }
                cmd.arg(&a.file);
                let t = Instant::now();
                let out = cmd.output().context("running qemu-img bench (is qemu-utils installed?)")?;
                let secs = t.elapsed().as_secs_f64();
                if !out.status.success() {
                    bail!("qemu-img bench failed: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
                let text = String::from_utf8_lossy(&out.stdout);
                let run = text.lines().find_map(|l| l.strip_prefix("Run completed in ")).unwrap_or("?");
                let secs_run: f64 = run.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(secs);
                let iops = count as f64 / secs_run;
                let name = if write { "write" } else { "read" };
                println!(
                    "  qemu-img bench -d {depth:<2} {name:<6} {:>10.1} MB/s {:>10.0} IOPS ({secs_run:.3} s)",
                    iops * bs as f64 / 1e6,
                    iops
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu_img() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999E").is_err());
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(format_date(0), "1970-01-01 00:00:00");
        assert_eq!(format_date(1_700_000_000), "2023-11-14 22:13:20");
    }
}
