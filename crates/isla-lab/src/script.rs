//! The in-kind script (`lab.sh`, the same for every kind and the host baseline) and what it
//! prints: isolation probes, sysbench and fio results, readiness of its servers.

use std::collections::BTreeMap;

use crate::model::{Probe, Shared};

/// The script's text.
pub const LAB_SH: &str = include_str!("lab.sh");

/// The guest-kit check (`isla.check=lab`) that reads `lab.*` words from the kernel command line
/// into the script's `LAB_*` variables (`lab.hostpid=1` -> `LAB_HOSTPID=1`), mounts the tools
/// disk and runs the script.
pub const GUEST_CHECK: &str = r#"#!/bin/sh
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    lab.*=*) k=${arg%%=*}; k=${k#lab.}; v=${arg#*=}
             export "LAB_$(echo "$k" | tr a-z A-Z)=$v" ;;
  esac
done
if [ -n "$LAB_TOOLSDEV" ]; then
  mkdir -p /lab && mount -o ro "$LAB_TOOLSDEV" /lab || echo "LAB error tools mount $LAB_TOOLSDEV failed"
  export LAB_TOOLS=/lab
  [ -f /lab/ld-library-path ] && read -r LD_LIBRARY_PATH < /lab/ld-library-path && export LD_LIBRARY_PATH
fi
exec sh /etc/isla/lab.sh
"#;

/// Everything the script printed.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Output {
    pub probe: Option<Probe>,
    /// sysbench cpu events per second.
    pub cpu: Option<f64>,
    /// fio test name -> its terse (v3) line.
    pub fio: BTreeMap<String, String>,
    /// `LAB error ...` lines (what failed, and why).
    pub errors: Vec<String>,
    /// `LAB retry ...` lines.
    pub retries: Vec<String>,
    pub ready: bool,
    pub idle: bool,
}

/// Reads the `LAB ...` lines out of a console or log text (other lines are ignored; a serial
/// console may end lines with CR).
pub fn parse(text: &str) -> Output {
    let mut o = Output::default();
    let mut probe: BTreeMap<String, String> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        let Some(rest) = line.find("LAB ").map(|i| &line[i + 4..]) else { continue };
        let (what, value) = rest.split_once(' ').unwrap_or((rest, ""));
        match what {
            "probe" => {
                if let Some((k, v)) = value.split_once('=') {
                    probe.insert(k.to_string(), v.to_string());
                }
            }
            "cpu" => o.cpu = value.trim().parse().ok(),
            "error" => o.errors.push(value.to_string()),
            "retry" => o.retries.push(value.to_string()),
            "ready" => o.ready = true,
            "idle" => o.idle = true,
            w => {
                if let Some(name) = w.strip_prefix("fio-") {
                    o.fio.insert(name.to_string(), value.to_string());
                }
            }
        }
    }
    if probe.contains_key("boot_id") {
        let get = |k: &str| probe.get(k).cloned().unwrap_or_default();
        let yes = |k: &str| probe.get(k).is_some_and(|v| v == "yes");
        o.probe = Some(Probe {
            kernel_release: get("kernel_release"),
            boot_id: get("boot_id"),
            pid1: get("pid1"),
            processes: get("processes").parse().unwrap_or(0),
            host_process_visible: yes("host_process_visible"),
            interfaces: get("interfaces").split(',').filter(|s| !s.is_empty()).map(String::from).collect(),
            host_marker_visible: yes("host_marker_visible"),
            dev_entries: get("dev_entries").parse().unwrap_or(0),
            dev_kvm: yes("dev_kvm"),
        });
    }
    o
}

/// fio's terse v3 line: (read KiB/s, read IOPS, write KiB/s, write IOPS).
pub fn fio_terse(line: &str) -> Option<(f64, f64, f64, f64)> {
    let f: Vec<&str> = line.split(';').collect();
    if f.len() < 49 || f[0] != "3" {
        return None;
    }
    let n = |i: usize| f[i].trim().parse::<f64>().ok();
    Some((n(6)?, n(7)?, n(47)?, n(48)?))
}

/// Compares a subject's probe with the host's: what is shared, with the evidence.
pub fn compare(inside: &Probe, host: &Probe) -> Vec<Shared> {
    let row = |d: &str, shared: bool, evidence: String| Shared { dimension: d.into(), shared, evidence };
    let same_kernel = inside.boot_id == host.boot_id && !inside.boot_id.is_empty();
    let mut ifs_inside = inside.interfaces.clone();
    let mut ifs_host = host.interfaces.clone();
    ifs_inside.sort();
    ifs_host.sort();
    vec![
        row(
            "kernel",
            same_kernel,
            format!(
                "boot_id {} the host's; uname -r {} (host {})",
                if same_kernel { "equals" } else { "differs from" },
                inside.kernel_release,
                host.kernel_release
            ),
        ),
        row(
            "PID space",
            inside.host_process_visible,
            format!(
                "pid 1 is {:?}, {} processes visible (host: {:?}, {}); the lab's host sentinel process {}",
                inside.pid1,
                inside.processes,
                host.pid1,
                host.processes,
                if inside.host_process_visible { "is visible" } else { "is not visible" }
            ),
        ),
        row(
            "network",
            !ifs_inside.is_empty() && ifs_inside == ifs_host,
            format!("interfaces {} (host: {})", list(&ifs_inside), list(&ifs_host)),
        ),
        row(
            "filesystem",
            inside.host_marker_visible,
            format!(
                "the host marker file {}",
                if inside.host_marker_visible { "is readable with its token" } else { "is not there" }
            ),
        ),
        row(
            "devices",
            inside.dev_kvm && host.dev_kvm && inside.dev_entries == host.dev_entries,
            format!(
                "{} /dev entries (host {}); /dev/kvm {}",
                inside.dev_entries,
                host.dev_entries,
                if inside.dev_kvm { "present" } else { "absent" }
            ),
        ),
    ]
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSOLE: &str = "[    1.0] random kernel line\r\n\
        LAB probe kernel_release=6.1.0-isla\r\n\
        LAB probe boot_id=abc\nLAB probe pid1=init\nLAB probe processes=7\n\
        LAB probe host_process_visible=no\nLAB probe interfaces=eth0/06:00:00:00:00:02,lo/00:00:00:00:00:00,\n\
        LAB probe host_marker_visible=no\nLAB probe dev_entries=40\nLAB probe dev_kvm=no\n\
        LAB retry sysbench (exit 139)\nLAB cpu 1234.56\n\
        LAB fio-randread 3;fio-3.33;randread;0;0;1;2;3;4\n\
        LAB error net iperf3 -s did not start\nLAB ready\nLAB idle\n";

    #[test]
    fn parses_what_the_script_prints() {
        let o = parse(CONSOLE);
        let p = o.probe.clone().unwrap();
        assert_eq!(p.kernel_release, "6.1.0-isla");
        assert_eq!(p.processes, 7);
        assert_eq!(p.interfaces, vec!["eth0/06:00:00:00:00:02", "lo/00:00:00:00:00:00"]);
        assert!(!p.host_marker_visible && !p.dev_kvm && !p.host_process_visible);
        assert_eq!(o.cpu, Some(1234.56));
        assert_eq!(o.retries, vec!["sysbench (exit 139)"]);
        assert_eq!(o.errors, vec!["net iperf3 -s did not start"]);
        assert!(o.fio.contains_key("randread") && o.ready && o.idle);
        assert_eq!(parse("no lab lines\n"), Output::default());
    }

    #[test]
    fn reads_fio_terse_lines() {
        let mut f = vec!["0"; 60];
        f[0] = "3";
        f[6] = "92145";
        f[7] = "23036";
        f[47] = "100";
        f[48] = "25";
        assert_eq!(fio_terse(&f.join(";")), Some((92145.0, 23036.0, 100.0, 25.0)));
        assert_eq!(fio_terse("3;fio;short"), None);
        assert_eq!(fio_terse("fio: error opening file"), None);
    }

    #[test]
    fn compares_with_the_host() {
        let host = Probe {
            kernel_release: "6.18".into(),
            boot_id: "h".into(),
            pid1: "systemd".into(),
            processes: 200,
            host_process_visible: true,
            interfaces: vec!["lo/0".into(), "eth0/1".into()],
            host_marker_visible: true,
            dev_entries: 150,
            dev_kvm: true,
        };
        let rows = compare(&host, &host);
        assert!(rows.iter().all(|r| r.shared), "{rows:?}");
        let container = Probe {
            pid1: "sh".into(),
            processes: 2,
            host_process_visible: false,
            interfaces: vec!["lo/0".into()],
            host_marker_visible: false,
            dev_entries: 12,
            dev_kvm: false,
            ..host.clone()
        };
        let rows = compare(&container, &host);
        let shared: Vec<(&str, bool)> = rows.iter().map(|r| (r.dimension.as_str(), r.shared)).collect();
        assert_eq!(
            shared,
            vec![("kernel", true), ("PID space", false), ("network", false), ("filesystem", false), ("devices", false)]
        );
        assert!(rows[0].evidence.contains("equals"));
        assert!(rows[2].evidence.contains("lo/0"));
    }
}
