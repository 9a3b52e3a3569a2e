//! State shared by the vCPU threads, the devices and the thread that waits for the guest: how the
//! guest ended, the boot timeline, and exit counters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use serde::Serialize;

use crate::host::{self, PssSplit};
use crate::lock;
use crate::profile::Sample;

/// How a guest run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum GuestExit {
    /// The guest powered off (ACPI S5 through the FADT sleep control register).
    Poweroff {
        /// Which device the request came through.
        via: &'static str,
    },
    /// The guest asked for a reboot; the monitor exits instead of resetting.
    Reboot {
        /// Which device the request came through (`i8042` or `acpi`).
        via: &'static str,
    },
    /// The vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// The monitor stopped the guest (console pattern seen, or a signal).
    Stopped {
        /// Why.
        reason: String,
    },
    /// The guest could not continue.
    Error {
        /// What went wrong, with the vCPU state that explains it.
        message: String,
    },
}

impl GuestExit {
    /// Process exit code for this outcome: 0 poweroff or stopped, 1 error, 3 reboot, 4 triple fault.
    pub fn exit_code(&self) -> i32 {
        match self {
            GuestExit::Poweroff { .. } | GuestExit::Stopped { .. } => 0,
            GuestExit::Error { .. } => 1,
            GuestExit::Reboot { .. } => 3,
            GuestExit::TripleFault => 4,
        }
    }

    /// One line for the terminal.
    pub fn describe(&self) -> String {
        match self {
            GuestExit::Poweroff { via } => format!("guest powered off (via {via})"),
            GuestExit::Reboot { via } => format!("guest requested a reboot (via {via})"),
            GuestExit::TripleFault => "guest triple-faulted (KVM_EXIT_SHUTDOWN)".into(),
            GuestExit::Stopped { reason } => format!("guest stopped: {reason}"),
            GuestExit::Error { message } => format!("guest failed: {message}"),
        }
    }
}

/// A point of the boot timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Milestone {
    /// Name (`kernel_banner`, `init_exec`, `boot_marker`, ...).
    pub name: &'static str,
    /// CLOCK_MONOTONIC microseconds on the host when the monitor saw it.
    #[serde(skip)]
    pub host_us: u64,
    /// Milliseconds since boot start (first KVM_RUN).
    pub ms_since_boot_start: f64,
    /// The guest's own printk timestamp, seconds, where the line carried one.
    pub guest_time_s: Option<f64>,
}

/// Most profiler samples kept (24 bytes each, 48 MB): 10 minutes at 100 Hz on 32 vCPUs, hours
/// on a few.
pub const MAX_PROFILE_SAMPLES: usize = 2_000_000;

/// Shared run state.
pub struct VmShared {
    /// When the monitor process started (CLOCK_MONOTONIC us).
    pub process_start_us: u64,
    boot_start_us: AtomicU64,
    stop: AtomicBool,
    exit: Mutex<Option<GuestExit>>,
    exit_cv: Condvar,
    milestones: Mutex<Vec<Milestone>>,
    counters: Mutex<BTreeMap<String, u64>>,
    emulated: Mutex<BTreeMap<&'static str, u64>>,
    memory: Mutex<Option<(&'static str, PssSplit)>>,
    guest_ranges: Mutex<Vec<(u64, u64)>>,
    final_rips: Mutex<BTreeMap<u8, u64>>,
    profiling: AtomicBool,
    samples: Mutex<Vec<Sample>>,
}

impl VmShared {
    /// New state; `process_start_us` from [`host::process_start_us`].
    pub fn new(process_start_us: u64) -> Self {
        VmShared {
            process_start_us,
            boot_start_us: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
            exit_cv: Condvar::new(),
            milestones: Mutex::new(Vec::new()),
            counters: Mutex::new(BTreeMap::new()),
            emulated: Mutex::new(BTreeMap::new()),
            memory: Mutex::new(None),
            guest_ranges: Mutex::new(Vec::new()),
            final_rips: Mutex::new(BTreeMap::new()),
            profiling: AtomicBool::new(false),
            samples: Mutex::new(Vec::new()),
        }
    }

    /// Host address ranges of guest RAM (for the memory split).
    pub fn set_guest_ranges(&self, ranges: Vec<(u64, u64)>) {
        *lock(&self.guest_ranges) = ranges;
    }

    /// Marks boot start (the first KVM_RUN of the boot vCPU); later calls change nothing.
    pub fn mark_boot_start(&self) {
        let _ = self.boot_start_us.compare_exchange(0, host::now_us(), Ordering::AcqRel, Ordering::Acquire);
    }

    /// Boot start, if the guest has started.
    pub fn boot_start_us(&self) -> Option<u64> {
        match self.boot_start_us.load(Ordering::Acquire) {
            0 => None,
            t => Some(t),
        }
    }

    /// Records the first occurrence of a milestone. Returns true if it was new.
    pub fn milestone(&self, name: &'static str, guest_time_s: Option<f64>) -> bool {
        let now = host::now_us();
        let mut ms = lock(&self.milestones);
        if ms.iter().any(|m| m.name == name) {
            return false;
        }
        let since = self.boot_start_us().map_or(0.0, |b| now.saturating_sub(b) as f64 / 1000.0);
        ms.push(Milestone { name, host_us: now, ms_since_boot_start: since, guest_time_s });
        true
    }

    /// The milestones so far, in order.
    pub fn milestones(&self) -> Vec<Milestone> {
        lock(&self.milestones).clone()
    }

    /// Measures the monitor's memory now, labelled with the moment (kept: the first measurement
    /// at the boot marker wins over later ones).
    pub fn measure_memory(&self, at: &'static str) {
        let ranges = lock(&self.guest_ranges).clone();
        if let Some(split) = host::pss_split(&ranges) {
            let mut m = lock(&self.memory);
            if m.is_none() || at == "boot_marker" && m.as_ref().is_some_and(|(a, _)| *a != "boot_marker") {
                *m = Some((at, split));
            }
        }
    }

    /// The memory measurement, if taken.
    pub fn memory(&self) -> Option<(&'static str, PssSplit)> {
        *lock(&self.memory)
    }

    /// Adds per-vCPU exit counters into the totals.
    pub fn add_counters(&self, exits: &BTreeMap<String, u64>, emulated: &isla_insn::Stats) {
        let mut c = lock(&self.counters);
        for (k, v) in exits {
            *c.entry(k.clone()).or_default() += v;
        }
        let mut e = lock(&self.emulated);
        for (k, v) in emulated.iter() {
            *e.entry(k).or_default() += v;
        }
    }

    /// Turns RIP sampling on: a vCPU kicked out of KVM_RUN records where it was.
    pub fn enable_profiling(&self) {
        self.profiling.store(true, Ordering::Release);
    }

    /// Whether RIP sampling is on.
    pub fn profiling(&self) -> bool {
        self.profiling.load(Ordering::Acquire)
    }

    /// Records a profiler sample of `vcpu` at `rip`, timed from boot start. Past
    /// [`MAX_PROFILE_SAMPLES`] samples are dropped: a long profiled run keeps bounded memory.
    pub fn add_sample(&self, vcpu: u8, rip: u64) {
        let t_us = self.boot_start_us().map_or(0, |b| host::now_us().saturating_sub(b));
        let mut samples = lock(&self.samples);
        if samples.len() < MAX_PROFILE_SAMPLES {
            samples.push(Sample { t_us, vcpu, rip });
        }
    }

    /// The profiler samples so far.
    pub fn samples(&self) -> Vec<Sample> {
        lock(&self.samples).clone()
    }

    /// Records where a vCPU was when it stopped.
    pub fn set_final_rip(&self, vcpu: u8, rip: u64) {
        lock(&self.final_rips).insert(vcpu, rip);
    }

    /// Where each vCPU was when it stopped.
    pub fn final_rips(&self) -> BTreeMap<u8, u64> {
        lock(&self.final_rips).clone()
    }

    /// VM exits by kind, summed over vCPUs that have finished.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        lock(&self.counters).clone()
    }

    /// Instructions the fallback executed, by mnemonic.
    pub fn emulated(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.emulated).clone()
    }

    /// Ends the run with this outcome (the first request wins) and asks every vCPU to stop.
    pub fn request_exit(&self, exit: GuestExit) {
        let mut e = lock(&self.exit);
        if e.is_none() {
            *e = Some(exit);
        }
        self.stop.store(true, Ordering::Release);
        self.exit_cv.notify_all();
    }

    /// Whether vCPUs should stop.
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Blocks until the run has an outcome, or `interrupted()` turns true (checked every 50 ms),
    /// which stops the guest.
    pub fn wait_exit(&self, interrupted: impl Fn() -> Option<String>) -> GuestExit {
        let mut e = lock(&self.exit);
        loop {
            if let Some(x) = e.clone() {
                return x;
            }
            if let Some(reason) = interrupted() {
                drop(e);
                self.request_exit(GuestExit::Stopped { reason });
                e = lock(&self.exit);
                continue;
            }
            e = self.exit_cv.wait_timeout(e, std::time::Duration::from_millis(50)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_wins_and_codes() {
        let s = VmShared::new(0);
        assert!(!s.should_stop());
        s.request_exit(GuestExit::Reboot { via: "i8042" });
        s.request_exit(GuestExit::Poweroff { via: "acpi" });
        assert!(s.should_stop());
        let e = s.wait_exit(|| None);
        assert_eq!(e, GuestExit::Reboot { via: "i8042" });
        assert_eq!(e.exit_code(), 3);
        assert_eq!(GuestExit::Poweroff { via: "acpi" }.exit_code(), 0);
        assert_eq!(GuestExit::TripleFault.exit_code(), 4);
        assert!(GuestExit::Error { message: "x".into() }.describe().contains("x"));
    }

    #[test]
    fn an_interruption_stops_the_run() {
        let s = VmShared::new(0);
        let e = s.wait_exit(|| Some("SIGTERM".into()));
        assert_eq!(e, GuestExit::Stopped { reason: "SIGTERM".into() });
        assert!(s.should_stop());
    }

    #[test]
    fn milestones_are_recorded_once() {
        let s = VmShared::new(0);
        s.mark_boot_start();
        let b = s.boot_start_us().unwrap();
        s.mark_boot_start();
        assert_eq!(s.boot_start_us(), Some(b));
        assert!(s.milestone("init_exec", Some(1.5)));
        assert!(!s.milestone("init_exec", None));
        let m = s.milestones();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].guest_time_s, Some(1.5));
        assert!(m[0].ms_since_boot_start >= 0.0);
    }

    #[test]
    fn counters_add_up() {
        let s = VmShared::new(0);
        let mut a = BTreeMap::new();
        a.insert("io-out:serial".to_string(), 5u64);
        let mut e = isla_insn::Stats::new();
        e.record("clac");
        e.record("clac");
        s.add_counters(&a, &e);
        s.add_counters(&a, &e);
        assert_eq!(s.counters()["io-out:serial"], 10);
        assert_eq!(s.emulated()["clac"], 4);
    }
}
