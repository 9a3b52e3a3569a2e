//! `GET /metrics`: Prometheus text format 0.0.4, read fresh from the manager at each scrape.
//! Per running or paused instance: CPU seconds, memory bytes and limit, processes (vCPU
//! threads for VMs) from `Manager::stats`, and block I/O bytes from the container's cgroup
//! where the kernel accounts them (`blkio` on cgroup v1, `io.stat` on v2); VMs have none.

use std::fmt::Write;

use isla_core::{Instance, Kind, Manager, Stats};

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Read and written block I/O bytes of a container's cgroup, if the kernel accounts them.
fn cgroup_io(id: &str) -> Option<(u64, u64)> {
    let cg = isla_core::container::cgroup_path(id);
    let v1 = format!("/sys/fs/cgroup/blkio{cg}/blkio.throttle.io_service_bytes");
    if let Ok(s) = std::fs::read_to_string(&v1) {
        let (mut r, mut w) = (0, 0);
        for l in s.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if let [_, op, n] = f[..] {
                let n: u64 = n.parse().unwrap_or(0);
                match op {
                    "Read" => r += n,
                    "Write" => w += n,
                    _ => {}
                }
            }
        }
        return Some((r, w));
    }
    let s = std::fs::read_to_string(format!("/sys/fs/cgroup{cg}/io.stat")).ok()?;
    let (mut r, mut w) = (0, 0);
    for kv in s.split_whitespace() {
        if let Some(n) = kv.strip_prefix("rbytes=") {
            r += n.parse::<u64>().unwrap_or(0);
        } else if let Some(n) = kv.strip_prefix("wbytes=") {
            w += n.parse::<u64>().unwrap_or(0);
        }
    }
    Some((r, w))
}

/// One instance's numbers.
struct Sample {
    inst: Instance,
    stats: Stats,
    /// Block I/O bytes read and written, where known.
    io: Option<(u64, u64)>,
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&Sample) -> Option<String>,
}

const FAMILIES: &[Family] = &[
    Family {
        name: "isla_instance_cpu_seconds_total",
        kind: "counter",
        help: "CPU time used by the instance",
        value: |s| Some(format!("{:.9}", s.stats.cpu_ns as f64 / 1e9)),
    },
    Family {
        name: "isla_instance_memory_bytes",
        kind: "gauge",
        help: "Memory in use (cgroup usage for containers, monitor RSS for VMs)",
        value: |s| Some(s.stats.memory.to_string()),
    },
    Family {
        name: "isla_instance_memory_limit_bytes",
        kind: "gauge",
        help: "Memory limit, when one is set",
        value: |s| s.stats.memory_limit.map(|l| l.to_string()),
    },
    Family {
        name: "isla_instance_pids",
        kind: "gauge",
        help: "Processes (containers) or threads (VM monitors)",
        value: |s| Some(s.stats.pids.to_string()),
    },
    Family {
        name: "isla_instance_io_read_bytes_total",
        kind: "counter",
        help: "Block I/O bytes read (containers, where the cgroup accounts it)",
        value: |s| s.io.map(|(r, _)| r.to_string()),
    },
    Family {
        name: "isla_instance_io_write_bytes_total",
        kind: "counter",
        help: "Block I/O bytes written (containers, where the cgroup accounts it)",
        value: |s| s.io.map(|(_, w)| w.to_string()),
    },
];

/// The whole scrape. Instances that end between the listing and their stats are left out.
pub fn render(m: &Manager) -> isla_core::Result<String> {
    let all = m.list(true)?;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP isla_instances Instances by status\n# TYPE isla_instances gauge");
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for i in &all {
        *counts.entry(i.status.to_string()).or_default() += 1;
    }
    for (status, n) in counts {
        let _ = writeln!(out, "isla_instances{{status=\"{}\"}} {n}", esc(&status));
    }
    let mut rows = Vec::new();
    for i in all.iter().filter(|i| i.status.is_active()) {
        match m.stats(&i.id) {
            Ok((inst, s)) => {
                let io = if inst.spec.kind == Kind::Container { cgroup_io(&inst.id) } else { None };
                rows.push(Sample { inst, stats: s, io });
            }
            Err(e) => tracing::debug!("metrics: {}: {e}", i.spec.name),
        }
    }
    for f in FAMILIES {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {}", f.name, f.help, f.name, f.kind);
        for s in &rows {
            let inst = &s.inst;
            if let Some(v) = (f.value)(s) {
                let _ = writeln!(
                    out,
                    "{}{{name=\"{}\",id=\"{}\",kind=\"{}\"}} {v}",
                    f.name,
                    esc(&inst.spec.name),
                    esc(&inst.id),
                    inst.spec.kind.as_str()
                );
            }
        }
    }
    Ok(out)
}
