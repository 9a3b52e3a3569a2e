//! The report of one run: outcome, boot timeline split by phase, VM exits by kind, instructions
//! the fallback executed, and the monitor's own memory.

use std::collections::BTreeMap;
use std::path::PathBuf;

use isla_arch::cpuid::CpuTemplate;
use serde::Serialize;

use crate::config::{KernelFormat, VmConfig};
use crate::profile::ProfileReport;
use crate::state::{GuestExit, Milestone, VmShared};

/// Memory of the monitor process, measured from /proc/self/smaps.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    /// When it was measured: `boot_marker`, `init_exec` or `exit`.
    pub measured_at: &'static str,
    /// Pss of everything but guest RAM (the monitor's own overhead), KiB.
    pub vmm_overhead_pss_kib: u64,
    /// Pss of guest RAM: the guest memory actually touched, KiB.
    pub guest_touched_pss_kib: u64,
    /// Configured guest RAM, KiB.
    pub guest_ram_kib: u64,
}

/// Boot phases in milliseconds (absent where the milestone was not reached).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    /// Monitor process start to boot start (first KVM_RUN): the monitor's own start-up.
    pub vmm_start_to_boot_start_ms: Option<f64>,
    /// Boot start to the kernel's banner on the console.
    pub boot_start_to_kernel_banner_ms: Option<f64>,
    /// Boot start to the kernel running init ("Run /init as init process").
    pub boot_start_to_init_exec_ms: Option<f64>,
    /// Boot start to the guest's boot-time marker write (init reached user space).
    pub boot_start_to_boot_marker_ms: Option<f64>,
    /// Process start to the boot-time marker.
    pub process_start_to_boot_marker_ms: Option<f64>,
    /// Boot start to the end of the run.
    pub boot_start_to_exit_ms: Option<f64>,
}

/// Everything measured in one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// How the guest ended.
    pub exit: GuestExit,
    /// Kernel image.
    pub kernel: PathBuf,
    /// `elf` or `bzimage`.
    pub kernel_format: &'static str,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// CPU template applied.
    pub cpu_template: String,
    /// The command line the guest got (the configured one plus any CPU-template additions).
    pub cmdline: String,
    /// Host KVM is nested (PVM).
    pub nested_host: bool,
    /// KVM_CAP_EXIT_ON_EMULATION_FAILURE was available and enabled.
    pub emulation_failure_exits: bool,
    /// Boot phases.
    pub phases: Phases,
    /// Every milestone seen, in order.
    pub milestones: Vec<Milestone>,
    /// VM exits by kind and device.
    pub exits: BTreeMap<String, u64>,
    /// Instructions executed by the fallback, by mnemonic.
    pub emulated_instructions: BTreeMap<&'static str, u64>,
    /// Monitor memory.
    pub memory: Option<MemoryReport>,
    /// Every vCPU thread left KVM_RUN before the report was made.
    pub vcpus_stopped: bool,
    /// Guest RIP of each vCPU when it stopped (hex), to locate a guest that hangs.
    pub final_rip: BTreeMap<u8, String>,
    /// Where the guest spent its time, when the profiler ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileReport>,
}

impl RunReport {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        cfg: &VmConfig,
        cmdline: &str,
        format: KernelFormat,
        template: CpuTemplate,
        emulation_failure_exits: bool,
        shared: &VmShared,
        exit: GuestExit,
        vcpus_stopped: bool,
    ) -> Self {
        let milestones = shared.milestones();
        let at = |name: &str| milestones.iter().find(|m| m.name == name).map(|m| m.ms_since_boot_start);
        let boot = shared.boot_start_us();
        let ms = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1000.0;
        let marker_us = milestones.iter().find(|m| m.name == "boot_marker").map(|m| m.host_us);
        let phases = Phases {
            vmm_start_to_boot_start_ms: boot.map(|b| ms(shared.process_start_us, b)),
            boot_start_to_kernel_banner_ms: at("kernel_banner"),
            boot_start_to_init_exec_ms: at("init_exec"),
            boot_start_to_boot_marker_ms: at("boot_marker"),
            process_start_to_boot_marker_ms: marker_us.map(|m| ms(shared.process_start_us, m)),
            boot_start_to_exit_ms: boot.map(|b| ms(b, crate::host::now_us())),
        };
        let memory = shared.memory().map(|(at, split)| MemoryReport {
            measured_at: at,
            vmm_overhead_pss_kib: split.vmm_kib,
            guest_touched_pss_kib: split.guest_kib,
            guest_ram_kib: cfg.memory >> 10,
        });
        RunReport {
            exit,
            kernel: cfg.kernel.clone(),
            kernel_format: match format {
                KernelFormat::Elf => "elf",
                KernelFormat::BzImage => "bzimage",
            },
            vcpus: cfg.vcpus,
            memory_mib: cfg.memory >> 20,
            cpu_template: template.to_string(),
            cmdline: cmdline.to_string(),
            nested_host: crate::host::is_nested_pvm(),
            emulation_failure_exits,
            phases,
            milestones,
            exits: shared.counters(),
            emulated_instructions: shared.emulated(),
            memory,
            vcpus_stopped,
            final_rip: shared.final_rips().into_iter().map(|(k, v)| (k, format!("{v:#x}"))).collect(),
            profile: None,
        }
    }

    /// A few lines for the terminal.
    pub fn summary(&self) -> String {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1} ms"));
        let mut s = format!("isla: {}\n", self.exit.describe());
        s += &format!(
            "isla: {} {} vCPU(s), {} MiB, template {}{}\n",
            self.kernel_format,
            self.vcpus,
            self.memory_mib,
            self.cpu_template,
            if self.nested_host { ", nested (PVM) host" } else { "" }
        );
        let p = &self.phases;
        s += &format!(
            "isla: process start -> boot start {} | boot start -> kernel banner {} -> init exec {} -> boot marker {} | run {}\n",
            f(p.vmm_start_to_boot_start_ms),
            f(p.boot_start_to_kernel_banner_ms),
            f(p.boot_start_to_init_exec_ms),
            f(p.boot_start_to_boot_marker_ms),
            f(p.boot_start_to_exit_ms)
        );
        if let Some(m) = &self.memory {
            s += &format!(
                "isla: memory at {}: monitor overhead {} KiB Pss, guest touched {} KiB of {} KiB\n",
                m.measured_at, m.vmm_overhead_pss_kib, m.guest_touched_pss_kib, m.guest_ram_kib
            );
        }
        let total: u64 = self.exits.values().sum();
        let mut top: Vec<_> = self.exits.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = top.iter().take(6).map(|(k, v)| format!("{k} {v}")).collect();
        s += &format!("isla: {total} exits: {}\n", top.join(", "));
        if !self.emulated_instructions.is_empty() {
            let e: Vec<String> = self.emulated_instructions.iter().map(|(k, v)| format!("{k} {v}")).collect();
            s += &format!("isla: instruction fallback: {}\n", e.join(", "));
        }
        if let Some(p) = &self.profile {
            s += &p.summary();
        }
        s
    }
}
