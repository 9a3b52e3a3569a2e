//! What a lab run produces (`results.json`): every raw sample, its summary, and how it was
//! measured; or why a figure could not be measured.

use serde::{Deserialize, Serialize};

use crate::stats::Summary;

/// The three kinds of instance the lab compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Vm,
    Container,
    Microvm,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Vm, Kind::Container, Kind::Microvm];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Vm => "vm",
            Kind::Container => "container",
            Kind::Microvm => "microvm",
        }
    }

    /// The seed table's column title.
    pub fn title(self) -> &'static str {
        match self {
            Kind::Vm => "VM (QEMU)",
            Kind::Container => "Container",
            Kind::Microvm => "MicroVM",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        match s.trim() {
            "vm" => Ok(Kind::Vm),
            "container" => Ok(Kind::Container),
            "microvm" => Ok(Kind::Microvm),
            other => Err(format!("unknown kind {other:?}: use microvm, container or vm")),
        }
    }
}

/// Stable keys of the figures, shared by the renderers.
pub mod key {
    pub const START: &str = "start_ms";
    pub const MEMORY: &str = "base_memory_kib";
    pub const DENSITY: &str = "density";
    pub const DENSITY_PROJECTED: &str = "density_projected";
    pub const CPU: &str = "cpu_events_per_s";
    pub const DISK_SEQ_READ: &str = "disk_seq_read_kib_s";
    pub const DISK_SEQ_WRITE: &str = "disk_seq_write_kib_s";
    pub const DISK_RAND_READ: &str = "disk_rand_read_iops";
    pub const NET: &str = "net_mbit_s";
    pub const HTTP_RPS: &str = "http_requests_per_s";
    pub const HTTP_P50: &str = "http_latency_p50_ms";
    pub const HTTP_P90: &str = "http_latency_p90_ms";
    pub const HTTP_P99: &str = "http_latency_p99_ms";

    /// The workload figures, measured inside each kind and on the host, in report order.
    pub const WORKLOADS: [&str; 9] =
        [CPU, DISK_SEQ_READ, DISK_SEQ_WRITE, DISK_RAND_READ, NET, HTTP_RPS, HTTP_P50, HTTP_P90, HTTP_P99];

    /// Every figure of one of isla's kinds.
    pub const ALL: [&str; 13] = [
        START,
        MEMORY,
        DENSITY,
        DENSITY_PROJECTED,
        CPU,
        DISK_SEQ_READ,
        DISK_SEQ_WRITE,
        DISK_RAND_READ,
        NET,
        HTTP_RPS,
        HTTP_P50,
        HTTP_P90,
        HTTP_P99,
    ];
}

/// How a figure turned out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Measured: every raw sample and their summary.
    Measured {
        samples: Vec<f64>,
        summary: Summary,
        /// Sub-phases (e.g. kernel, init), each with its own samples.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        phases: Vec<Phase>,
        /// Retries, bounds that stopped a run, and other facts a reader needs.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        notes: Vec<String>,
    },
    /// Could not be measured here (the kind or the tool is missing), with the reason.
    NotRun { reason: String },
    /// Was tried and failed, with the reason.
    Failed { reason: String },
}

/// One phase of a start, with its samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub samples: Vec<f64>,
    pub summary: Summary,
}

impl Phase {
    /// A phase from its samples; `None` when there are none.
    pub fn new(name: &str, samples: Vec<f64>) -> Option<Phase> {
        Summary::of(&samples).map(|summary| Phase { name: name.to_string(), samples, summary })
    }
}

/// One measured quantity of one subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub key: String,
    pub title: String,
    pub unit: String,
    /// Higher is better (throughput) or lower is better (time, memory).
    pub higher_is_better: bool,
    /// How it was measured: the command, the workload, the bounds.
    pub method: String,
    pub outcome: Outcome,
}

impl Figure {
    /// A figure from samples: `Failed { reason }` when there are none.
    pub fn from_samples(
        key: &str,
        title: &str,
        unit: &str,
        method: String,
        samples: Vec<f64>,
        failure: &str,
    ) -> Figure {
        let outcome = match Summary::of(&samples) {
            Some(summary) => Outcome::Measured { samples, summary, phases: Vec::new(), notes: Vec::new() },
            None => Outcome::Failed { reason: failure.to_string() },
        };
        Figure {
            key: key.into(),
            title: title.into(),
            unit: unit.into(),
            higher_is_better: higher_is_better(key),
            method,
            outcome,
        }
    }

    /// A figure that could not be measured.
    pub fn not_run(key: &str, title: &str, unit: &str, method: String, reason: String) -> Figure {
        Figure {
            key: key.into(),
            title: title.into(),
            unit: unit.into(),
            higher_is_better: higher_is_better(key),
            method,
            outcome: Outcome::NotRun { reason },
        }
    }

    /// A figure that was tried and failed.
    pub fn failed(key: &str, title: &str, unit: &str, method: String, reason: String) -> Figure {
        let mut f = Figure::not_run(key, title, unit, method, reason.clone());
        f.outcome = Outcome::Failed { reason };
        f
    }

    pub fn summary(&self) -> Option<&Summary> {
        match &self.outcome {
            Outcome::Measured { summary, .. } => Some(summary),
            _ => None,
        }
    }

    pub fn median(&self) -> Option<f64> {
        self.summary().map(|s| s.median)
    }

    /// Adds a phase (ignored unless measured).
    pub fn with_phase(mut self, phase: Option<Phase>) -> Figure {
        if let (Outcome::Measured { phases, .. }, Some(p)) = (&mut self.outcome, phase) {
            phases.push(p);
        }
        self
    }

    /// Adds a note (ignored unless measured: the reason of a failure says it all).
    pub fn with_note(mut self, note: impl Into<String>) -> Figure {
        if let Outcome::Measured { notes, .. } = &mut self.outcome {
            notes.push(note.into());
        }
        self
    }

    /// The one-line text of the outcome: median and spread, or the reason.
    pub fn brief(&self) -> String {
        match &self.outcome {
            Outcome::Measured { summary: s, .. } if s.n == 1 => format!("{} {}", num(s.median), self.unit),
            Outcome::Measured { summary: s, .. } => {
                format!("{} {} ({}-{})", num(s.median), self.unit, num(s.min), num(s.max))
            }
            Outcome::NotRun { reason } => format!("not run: {reason}"),
            Outcome::Failed { reason } => format!("failed: {reason}"),
        }
    }
}

fn higher_is_better(key: &str) -> bool {
    // Throughputs and counts; times and memory are better lower.
    !(key == key::START || key == key::MEMORY || key.starts_with("http_latency"))
}

/// A number with as many digits as it deserves.
pub fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 || x.fract() == 0.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 0.1 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// What the isolation probes saw inside one subject (or on the host).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub kernel_release: String,
    pub boot_id: String,
    pub pid1: String,
    pub processes: u32,
    /// A sentinel process the lab started on the host is visible in /proc.
    pub host_process_visible: bool,
    /// name/MAC of each interface.
    pub interfaces: Vec<String>,
    /// The marker file the lab wrote on the host is readable with its token.
    pub host_marker_visible: bool,
    pub dev_entries: u32,
    pub dev_kvm: bool,
}

/// One row of the isolation table: is this shared with the host, and the evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shared {
    pub dimension: String,
    pub shared: bool,
    pub evidence: String,
}

/// The isolation result of one subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Isolation {
    Probed { probe: Probe, rows: Vec<Shared>, method: String },
    NotRun { reason: String },
    Failed { reason: String },
}

/// One thing measured: an isla kind or a peer of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subject {
    /// "isla microVM", "firecracker", "crun", ...
    pub name: String,
    pub kind: Kind,
    /// A peer given by path (measured beside isla's own implementation of the kind).
    pub peer: bool,
    pub figures: Vec<Figure>,
    pub isolation: Isolation,
}

impl Subject {
    pub fn figure(&self, key: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.key == key)
    }
}

/// The machine the lab ran on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub kernel: String,
    pub cpus: u32,
    pub mem_total_kib: u64,
    pub cpu_model: String,
    /// /dev/kvm is the nested PVM kind that emulates ordinary guest kernels.
    pub nested_pvm: bool,
}

/// The options the run was made with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub quick: bool,
    pub runs: usize,
    pub kinds: Vec<Kind>,
    pub budget_mib: u64,
    pub started_unix: u64,
    pub wall_s: f64,
    pub isla_version: String,
}

/// Everything a lab run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub run: RunInfo,
    pub host: HostInfo,
    /// The same workloads run directly on the host (in a network namespace of the lab's own).
    pub host_baseline: Vec<Figure>,
    pub host_probe: Option<Probe>,
    pub subjects: Vec<Subject>,
}

impl Results {
    /// isla's own subject of this kind.
    pub fn isla(&self, kind: Kind) -> Option<&Subject> {
        self.subjects.iter().find(|s| s.kind == kind && !s.peer)
    }

    pub fn peers(&self, kind: Kind) -> impl Iterator<Item = &Subject> {
        self.subjects.iter().filter(move |s| s.kind == kind && s.peer)
    }

    pub fn baseline(&self, key: &str) -> Option<&Figure> {
        self.host_baseline.iter().find(|f| f.key == key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_say_what_they_are() {
        let f = Figure::from_samples(key::START, "start", "ms", "m".into(), vec![3.0, 1.0, 2.0], "none");
        assert_eq!(f.median(), Some(2.0));
        assert_eq!(f.brief(), "2 ms (1-3)");
        assert!(!f.higher_is_better);
        let f = Figure::from_samples(key::CPU, "cpu", "events/s", "m".into(), vec![], "sysbench printed nothing");
        assert!(f.higher_is_better);
        assert_eq!(f.brief(), "failed: sysbench printed nothing");
        let f = Figure::not_run(key::NET, "net", "Mbit/s", "m".into(), "no iperf3".into());
        assert_eq!(f.brief(), "not run: no iperf3");
        assert_eq!("microvm".parse::<Kind>(), Ok(Kind::Microvm));
        assert!("lxc".parse::<Kind>().unwrap_err().contains("microvm, container or vm"));
        assert_eq!(num(1234.5), "1234");
        assert_eq!(num(0.01234), "0.012");
        assert_eq!(num(2.0), "2");
    }

    #[test]
    fn outcome_json_names_its_status() {
        let f = Figure::failed(key::NET, "net", "Mbit/s", "iperf3".into(), "stalled".into());
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["outcome"]["status"], "failed");
        assert_eq!(v["outcome"]["reason"], "stalled");
        let back: Figure = serde_json::from_value(v).unwrap();
        assert_eq!(back, f);
    }
}
