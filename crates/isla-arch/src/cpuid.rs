//! CPUID of an isla vCPU: normalisation of what KVM reports as supported, and CPU templates.
//!
//! [`normalize`] takes the table from `KVM_GET_SUPPORTED_CPUID` and makes it describe *this* VM
//! rather than the host: one package of `cpu_count` single-threaded cores, APIC ID = vCPU index,
//! the hypervisor bit set, no thermal/power management and no PMU. Then it applies a
//! [`CpuTemplate`]:
//!
//! * [`CpuTemplate::Host`] keeps every feature KVM supports on this host.
//! * [`CpuTemplate::Baseline`] is an *allow-list* ANDed with what the host supports (it never adds
//!   a feature): roughly an x86-64 CPU with SSE4.2, x2APIC and the TSC-deadline timer, and without
//!   the instructions that an instruction emulator may lack (CMPXCHG16B, XSAVE/XRSTOR, POPCNT,
//!   CLAC/STAC, RDRAND, RDFSBASE/WRFSBASE, INVPCID, AVX, BMI, ...). A guest kernel run through
//!   KVM's x86 emulator (as on nested PVM hosts) then never meets an instruction the emulator
//!   cannot handle, and the same template is a common denominator for moving guests across hosts.
//!
//! Entries are matched by (function, index), the index counting only when the entry has
//! `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`. Leaves missing from the input are left missing, except that
//! leaf 0 and leaf 1 must be present and that the topology leaf 0xB is generated whenever the
//! maximum basic leaf covers it.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES};

/// Largest vCPU count the CPUID topology is built for (the MADT's limit as well).
pub const MAX_CPUS: u8 = crate::acpi::MAX_CPUS;

/// Which CPU features a guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuTemplate {
    /// Everything KVM supports on this host (after normalisation).
    #[default]
    Host,
    /// A conservative allow-list ANDed with the host: safe under an instruction emulator and
    /// common to x86-64 hosts (see the module documentation).
    Baseline,
}

impl CpuTemplate {
    /// Every template, in the order they are documented.
    pub const ALL: [CpuTemplate; 2] = [CpuTemplate::Host, CpuTemplate::Baseline];

    /// The name accepted by [`FromStr`] and printed by [`fmt::Display`].
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::Baseline => "baseline",
        }
    }
}

impl FromStr for CpuTemplate {
    type Err = CpuidError;

    /// Parses `host` or `baseline` (ASCII case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CpuTemplate::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| CpuidError::UnknownTemplate(s.to_string()))
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One CPUID feature bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    /// Conventional lower-case name (as in Linux's /proc/cpuinfo where it has one).
    pub name: &'static str,
    /// CPUID function (EAX input).
    pub leaf: u32,
    /// CPUID index (ECX input); ignored for leaves whose index is not significant.
    pub subleaf: u32,
    /// Output register holding the bit.
    pub reg: Reg,
    /// Bit number, 0..=31.
    pub bit: u8,
}

impl Feature {
    const fn new(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Self {
        Feature { name, leaf, subleaf, reg, bit }
    }

    fn mask(&self) -> u32 {
        1u32.checked_shl(u32::from(self.bit)).unwrap_or(0)
    }
}

/// Why a CPUID table could not be normalised, or a template name not parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuidError {
    /// A leaf the normalisation needs is absent from the input.
    #[error("CPUID leaf {leaf:#x} is missing from the CPUID reported by KVM")]
    MissingLeaf {
        /// The missing CPUID function.
        leaf: u32,
    },
    /// The vCPU count is outside 1..=[`MAX_CPUS`].
    #[error("invalid vCPU count {0}: expected 1 to {MAX_CPUS}")]
    InvalidCpuCount(u8),
    /// The vCPU index is not below the vCPU count.
    #[error("vCPU index {vcpu_id} is out of range for {cpu_count} vCPUs")]
    InvalidVcpuId {
        /// The vCPU index given.
        vcpu_id: u8,
        /// The vCPU count given.
        cpu_count: u8,
    },
    /// The topology entries do not fit in a KVM CPUID table.
    #[error("the CPUID table would exceed {KVM_MAX_CPUID_ENTRIES} entries")]
    TooManyEntries,
    /// [`CpuTemplate::from_str`] got an unknown name.
    #[error("unknown CPU template {0:?}: valid templates are \"host\" and \"baseline\"")]
    UnknownTemplate(String),
}

/// Well-known named features, so callers can ask e.g. `has_feature(&cpuid, &features::SMAP)`.
pub mod features {
    use super::{Feature, Reg};

    const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> Feature {
        Feature::new(name, leaf, subleaf, reg, bit)
    }

    // Leaf 1, EDX.
    /// x87 FPU on chip.
    pub const FPU: Feature = f("fpu", 1, 0, Reg::Edx, 0);
    /// Time-stamp counter (RDTSC).
    pub const TSC: Feature = f("tsc", 1, 0, Reg::Edx, 4);
    /// RDMSR/WRMSR.
    pub const MSR: Feature = f("msr", 1, 0, Reg::Edx, 5);
    /// Physical address extension.
    pub const PAE: Feature = f("pae", 1, 0, Reg::Edx, 6);
    /// CMPXCHG8B.
    pub const CX8: Feature = f("cx8", 1, 0, Reg::Edx, 8);
    /// On-chip local APIC.
    pub const APIC: Feature = f("apic", 1, 0, Reg::Edx, 9);
    /// SYSENTER/SYSEXIT.
    pub const SEP: Feature = f("sep", 1, 0, Reg::Edx, 11);
    /// Global pages.
    pub const PGE: Feature = f("pge", 1, 0, Reg::Edx, 13);
    /// CMOVcc.
    pub const CMOV: Feature = f("cmov", 1, 0, Reg::Edx, 15);
    /// Page attribute table.
    pub const PAT: Feature = f("pat", 1, 0, Reg::Edx, 16);
    /// CLFLUSH.
    pub const CLFSH: Feature = f("clflush", 1, 0, Reg::Edx, 19);
    /// MMX.
    pub const MMX: Feature = f("mmx", 1, 0, Reg::Edx, 23);
    /// FXSAVE/FXRSTOR.
    pub const FXSR: Feature = f("fxsr", 1, 0, Reg::Edx, 24);
    /// SSE.
    pub const SSE: Feature = f("sse", 1, 0, Reg::Edx, 25);
    /// SSE2.
    pub const SSE2: Feature = f("sse2", 1, 0, Reg::Edx, 26);
    /// Max logical processor count in leaf 1 EBX is valid.
    pub const HTT: Feature = f("ht", 1, 0, Reg::Edx, 28);

    // Leaf 1, ECX.
    /// SSE3.
    pub const SSE3: Feature = f("pni", 1, 0, Reg::Ecx, 0);
    /// PCLMULQDQ.
    pub const PCLMULQDQ: Feature = f("pclmulqdq", 1, 0, Reg::Ecx, 1);
    /// MONITOR/MWAIT.
    pub const MONITOR: Feature = f("monitor", 1, 0, Reg::Ecx, 3);
    /// VMX (nested virtualisation).
    pub const VMX: Feature = f("vmx", 1, 0, Reg::Ecx, 5);
    /// SSSE3.
    pub const SSSE3: Feature = f("ssse3", 1, 0, Reg::Ecx, 9);
    /// FMA3.
    pub const FMA: Feature = f("fma", 1, 0, Reg::Ecx, 12);
    /// CMPXCHG16B.
    pub const CX16: Feature = f("cx16", 1, 0, Reg::Ecx, 13);
    /// Process-context identifiers.
    pub const PCID: Feature = f("pcid", 1, 0, Reg::Ecx, 17);
    /// SSE4.1.
    pub const SSE4_1: Feature = f("sse4_1", 1, 0, Reg::Ecx, 19);
    /// SSE4.2.
    pub const SSE4_2: Feature = f("sse4_2", 1, 0, Reg::Ecx, 20);
    /// x2APIC.
    pub const X2APIC: Feature = f("x2apic", 1, 0, Reg::Ecx, 21);
    /// MOVBE.
    pub const MOVBE: Feature = f("movbe", 1, 0, Reg::Ecx, 22);
    /// POPCNT.
    pub const POPCNT: Feature = f("popcnt", 1, 0, Reg::Ecx, 23);
    /// Local APIC TSC-deadline timer mode.
    pub const TSC_DEADLINE: Feature = f("tsc_deadline_timer", 1, 0, Reg::Ecx, 24);
    /// AES-NI.
    pub const AES: Feature = f("aes", 1, 0, Reg::Ecx, 25);
    /// XSAVE/XRSTOR/XSETBV/XGETBV.
    pub const XSAVE: Feature = f("xsave", 1, 0, Reg::Ecx, 26);
    /// The OS has set CR4.OSXSAVE.
    pub const OSXSAVE: Feature = f("osxsave", 1, 0, Reg::Ecx, 27);
    /// AVX.
    pub const AVX: Feature = f("avx", 1, 0, Reg::Ecx, 28);
    /// F16C.
    pub const F16C: Feature = f("f16c", 1, 0, Reg::Ecx, 29);
    /// RDRAND.
    pub const RDRAND: Feature = f("rdrand", 1, 0, Reg::Ecx, 30);
    /// Running under a hypervisor.
    pub const HYPERVISOR: Feature = f("hypervisor", 1, 0, Reg::Ecx, 31);

    // Leaf 7 subleaf 0, EBX.
    /// RDFSBASE/RDGSBASE/WRFSBASE/WRGSBASE.
    pub const FSGSBASE: Feature = f("fsgsbase", 7, 0, Reg::Ebx, 0);
    /// IA32_TSC_ADJUST MSR.
    pub const TSC_ADJUST: Feature = f("tsc_adjust", 7, 0, Reg::Ebx, 1);
    /// BMI1 (ANDN, BEXTR, BLSI, ..., TZCNT).
    pub const BMI1: Feature = f("bmi1", 7, 0, Reg::Ebx, 3);
    /// Hardware lock elision.
    pub const HLE: Feature = f("hle", 7, 0, Reg::Ebx, 4);
    /// AVX2.
    pub const AVX2: Feature = f("avx2", 7, 0, Reg::Ebx, 5);
    /// Supervisor-mode execution prevention.
    pub const SMEP: Feature = f("smep", 7, 0, Reg::Ebx, 7);
    /// BMI2 (BZHI, MULX, PDEP, PEXT, RORX, SARX, ...).
    pub const BMI2: Feature = f("bmi2", 7, 0, Reg::Ebx, 8);
    /// Enhanced REP MOVSB/STOSB.
    pub const ERMS: Feature = f("erms", 7, 0, Reg::Ebx, 9);
    /// INVPCID.
    pub const INVPCID: Feature = f("invpcid", 7, 0, Reg::Ebx, 10);
    /// Restricted transactional memory.
    pub const RTM: Feature = f("rtm", 7, 0, Reg::Ebx, 11);
    /// AVX-512 foundation.
    pub const AVX512F: Feature = f("avx512f", 7, 0, Reg::Ebx, 16);
    /// RDSEED.
    pub const RDSEED: Feature = f("rdseed", 7, 0, Reg::Ebx, 18);
    /// ADCX/ADOX.
    pub const ADX: Feature = f("adx", 7, 0, Reg::Ebx, 19);
    /// Supervisor-mode access prevention (CLAC/STAC).
    pub const SMAP: Feature = f("smap", 7, 0, Reg::Ebx, 20);
    /// CLFLUSHOPT.
    pub const CLFLUSHOPT: Feature = f("clflushopt", 7, 0, Reg::Ebx, 23);
    /// CLWB.
    pub const CLWB: Feature = f("clwb", 7, 0, Reg::Ebx, 24);
    /// SHA extensions.
    pub const SHA: Feature = f("sha_ni", 7, 0, Reg::Ebx, 29);

    // Leaf 7 subleaf 0, ECX.
    /// User-mode instruction prevention.
    pub const UMIP: Feature = f("umip", 7, 0, Reg::Ecx, 2);
    /// Protection keys for user pages.
    pub const PKU: Feature = f("pku", 7, 0, Reg::Ecx, 3);
    /// UMONITOR/UMWAIT/TPAUSE.
    pub const WAITPKG: Feature = f("waitpkg", 7, 0, Reg::Ecx, 5);
    /// Vector AES.
    pub const VAES: Feature = f("vaes", 7, 0, Reg::Ecx, 9);
    /// 5-level paging.
    pub const LA57: Feature = f("la57", 7, 0, Reg::Ecx, 16);
    /// RDPID.
    pub const RDPID: Feature = f("rdpid", 7, 0, Reg::Ecx, 22);

    // Leaf 7 subleaf 0, EDX.
    /// Fast short REP MOVSB.
    pub const FSRM: Feature = f("fsrm", 7, 0, Reg::Edx, 4);
    /// VERW clears CPU buffers (MDS mitigation enumeration).
    pub const MD_CLEAR: Feature = f("md_clear", 7, 0, Reg::Edx, 10);
    /// IBRS and IBPB (IA32_SPEC_CTRL, IA32_PRED_CMD).
    pub const SPEC_CTRL: Feature = f("spec_ctrl", 7, 0, Reg::Edx, 26);
    /// Single-thread indirect branch predictors.
    pub const STIBP: Feature = f("intel_stibp", 7, 0, Reg::Edx, 27);
    /// IA32_FLUSH_CMD.
    pub const FLUSH_L1D: Feature = f("flush_l1d", 7, 0, Reg::Edx, 28);
    /// IA32_ARCH_CAPABILITIES.
    pub const ARCH_CAPABILITIES: Feature = f("arch_capabilities", 7, 0, Reg::Edx, 29);
    /// Speculative store bypass disable.
    pub const SSBD: Feature = f("ssbd", 7, 0, Reg::Edx, 31);

    // Leaf 0xD subleaf 1, EAX.
    /// XSAVEOPT.
    pub const XSAVEOPT: Feature = f("xsaveopt", 0xd, 1, Reg::Eax, 0);
    /// XSAVES/XRSTORS.
    pub const XSAVES: Feature = f("xsaves", 0xd, 1, Reg::Eax, 3);

    // Leaf 0x80000001.
    /// LAHF/SAHF in 64-bit mode.
    pub const LAHF_LM: Feature = f("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0);
    /// LZCNT (ABM).
    pub const LZCNT: Feature = f("abm", 0x8000_0001, 0, Reg::Ecx, 5);
    /// PREFETCHW.
    pub const PREFETCHW: Feature = f("3dnowprefetch", 0x8000_0001, 0, Reg::Ecx, 8);
    /// SYSCALL/SYSRET.
    pub const SYSCALL: Feature = f("syscall", 0x8000_0001, 0, Reg::Edx, 11);
    /// No-execute page protection.
    pub const NX: Feature = f("nx", 0x8000_0001, 0, Reg::Edx, 20);
    /// 1 GiB pages.
    pub const PDPE1GB: Feature = f("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26);
    /// RDTSCP.
    pub const RDTSCP: Feature = f("rdtscp", 0x8000_0001, 0, Reg::Edx, 27);
    /// Long mode (x86-64).
    pub const LM: Feature = f("lm", 0x8000_0001, 0, Reg::Edx, 29);

    // Leaf 0x80000007.
    /// Invariant TSC.
    pub const INVARIANT_TSC: Feature = f("constant_tsc", 0x8000_0007, 0, Reg::Edx, 8);

    /// Every feature named in this module.
    pub const ALL: &[Feature] = &[
        FPU,
        TSC,
        MSR,
        PAE,
        CX8,
        APIC,
        SEP,
        PGE,
        CMOV,
        PAT,
        CLFSH,
        MMX,
        FXSR,
        SSE,
        SSE2,
        HTT,
        SSE3,
        PCLMULQDQ,
        MONITOR,
        VMX,
        SSSE3,
        FMA,
        CX16,
        PCID,
        SSE4_1,
        SSE4_2,
        X2APIC,
        MOVBE,
        POPCNT,
        TSC_DEADLINE,
        AES,
        XSAVE,
        OSXSAVE,
        AVX,
        F16C,
        RDRAND,
        HYPERVISOR,
        FSGSBASE,
        TSC_ADJUST,
        BMI1,
        HLE,
        AVX2,
        SMEP,
        BMI2,
        ERMS,
        INVPCID,
        RTM,
        AVX512F,
        RDSEED,
        ADX,
        SMAP,
        CLFLUSHOPT,
        CLWB,
        SHA,
        UMIP,
        PKU,
        WAITPKG,
        VAES,
        LA57,
        RDPID,
        FSRM,
        MD_CLEAR,
        SPEC_CTRL,
        STIBP,
        FLUSH_L1D,
        ARCH_CAPABILITIES,
        SSBD,
        XSAVEOPT,
        XSAVES,
        LAHF_LM,
        LZCNT,
        PREFETCHW,
        SYSCALL,
        NX,
        PDPE1GB,
        RDTSCP,
        LM,
        INVARIANT_TSC,
    ];
}

/// Features [`CpuTemplate::Baseline`] hides (every named feature outside its allow-list).
const BASELINE_HIDDEN: &[Feature] = {
    use features::*;
    &[
        SMAP, SMEP, POPCNT, CX16, XSAVE, OSXSAVE, AVX, AVX2, RDRAND, RDSEED, FSGSBASE, INVPCID, PCID, MOVBE, BMI1,
        BMI2, LZCNT, PDPE1GB, RDTSCP, PKU, LA57, UMIP, AVX512F, PCLMULQDQ, MONITOR, VMX, FMA, AES, F16C, TSC_ADJUST,
        HLE, RTM, ADX, CLFLUSHOPT, CLWB, SHA, WAITPKG, VAES, RDPID, FSRM, MD_CLEAR, FLUSH_L1D, XSAVEOPT, XSAVES,
        PREFETCHW,
    ]
};

/// Features Linux drops by itself when told `noxsave` (its cpuid-deps table: they depend on XSAVE
/// directly or through AVX). Not F16C: Linux 6.1 ties it to SSE2, and it stays without XSAVE.
const NEEDS_XSAVE: &[Feature] = {
    use features::*;
    &[XSAVEOPT, XSAVES, AVX, AVX2, AVX512F, FMA, VAES, PKU]
};

/// Features hidden from the guest, whatever the template, where the host runs the guest kernel
/// in its instruction emulator (nested PVM hosts). Each one makes Linux pick a variant of a hot
/// routine that costs far more under emulation than the one it falls back to:
///
/// - ERMS: with it `memset`, `memcpy`, `clear_page` and the user-copy routines use `rep stosb`
///   and `rep movsb`; the host's emulator runs a `rep` string instruction one element at a time,
///   so bytes cost eight times what the quadwords of `rep stosq`/`rep movsq` (Linux's choice
///   without ERMS, on CPUs with good `rep` strings) cost.
pub const EMULATED_KERNEL_HIDDEN: &[Feature] = &[features::ERMS];

/// Bits of a 32-bit register from `lo` to `hi` inclusive.
const fn bits(lo: u32, hi: u32) -> u32 {
    (u32::MAX >> (31 - hi)) & (u32::MAX << lo)
}

/// Baseline leaf 1 ECX: SSE3, SSSE3, SSE4.1, SSE4.2, x2APIC, TSC-deadline, hypervisor.
const BASELINE_L1_ECX: u32 = 1 | 1 << 9 | 1 << 19 | 1 << 20 | 1 << 21 | 1 << 24 | 1 << 31;
/// Baseline leaf 1 EDX: FPU..APIC, SEP..CMOV/PAT/PSE36, CLFSH, MMX, FXSR, SSE, SSE2, HTT.
const BASELINE_L1_EDX: u32 = bits(0, 9) | bits(11, 17) | 1 << 19 | bits(23, 26) | 1 << 28;
/// Baseline leaf 7.0 EBX: ERMS.
const BASELINE_L7_EBX: u32 = 1 << 9;
/// Baseline leaf 7.0 EDX: speculation-control enumeration (IBRS/IBPB, STIBP, ARCH_CAPABILITIES,
/// SSBD).
const BASELINE_L7_EDX: u32 = 1 << 26 | 1 << 27 | 1 << 29 | 1 << 31;
/// Baseline leaf 0x80000001 ECX: LAHF/SAHF in long mode.
const BASELINE_EXT1_ECX: u32 = 1;
/// Baseline leaf 0x80000001 EDX: SYSCALL, NX, LM.
const BASELINE_EXT1_EDX: u32 = 1 << 11 | 1 << 20 | 1 << 29;

/// Baseline leaf 0x80000008 EBX: XSAVEERPTR (FXSAVE and XSAVE always save the x87 error pointers).
/// A fact about the CPU rather than a feature: without it Linux assumes the old AMD FXSAVE leak
/// and runs `fnclex; emms; fild` before every FPU-state restore, three instructions the host's
/// emulator lacks on nested hosts.
const BASELINE_EXT8_EBX: u32 = 1 << 2;

/// Leaves [`CpuTemplate::Baseline`] zeroes entirely: XSAVE state (0xD), RDT monitoring (0xF) and
/// allocation (0x10), SGX (0x12), processor trace (0x14).
/// KVM paravirtual features that work through hypercalls (leaf 0x40000001 EAX): PV_UNHALT (7,
/// the pv-spinlock kick), PV_SEND_IPI (11) and PV_SCHED_YIELD (13). Baseline hides them: on hosts
/// where the guest kernel is emulated a hypercall never completes, and the kernel falls back to
/// plain APIC IPIs and spinlocks. Features that use shared memory or MSRs (kvmclock, PV TLB flush,
/// async page faults) stay.
pub const BASELINE_KVM_HYPERCALL_FEATURES: u32 = 1 << 7 | 1 << 11 | 1 << 13;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

const BASELINE_ZEROED_LEAVES: &[u32] = &[0xd, 0xf, 0x10, 0x12, 0x14];

const LEAF_VENDOR: u32 = 0;
const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE: u32 = 4;
const LEAF_THERMAL: u32 = 6;
const LEAF_EXT_FEATURES: u32 = 7;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT1: u32 = 0x8000_0001;
const LEAF_ADDR_SIZES: u32 = 0x8000_0008;

/// Leaf 0xB/0x1F level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// CLFLUSH line size in 8-byte units (64-byte lines).
const CLFLUSH_LINE_SIZE_QWORDS: u32 = 8;

/// Normalises the CPUID KVM reports as supported (KVM_GET_SUPPORTED_CPUID) for one vCPU, then applies the template.
pub fn normalize(cpuid: &mut CpuId, template: CpuTemplate, vcpu_id: u8, cpu_count: u8) -> Result<(), CpuidError> {
    if cpu_count == 0 || cpu_count > MAX_CPUS {
        return Err(CpuidError::InvalidCpuCount(cpu_count));
    }
    if vcpu_id >= cpu_count {
        return Err(CpuidError::InvalidVcpuId { vcpu_id, cpu_count });
    }
    let max_basic_leaf =
        find(cpuid, LEAF_VENDOR, 0).map(|e| e.eax).ok_or(CpuidError::MissingLeaf { leaf: LEAF_VENDOR })?;
    if find(cpuid, LEAF_FEATURES, 0).is_none() {
        return Err(CpuidError::MissingLeaf { leaf: LEAF_FEATURES });
    }

    let vcpu = u32::from(vcpu_id);
    let count = u32::from(cpu_count);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => normalize_leaf1(entry, vcpu, count),
            LEAF_CACHE => normalize_leaf4(entry, count),
            LEAF_THERMAL | LEAF_PMU => zero(entry),
            _ => {}
        }
    }
    rebuild_topology(cpuid, max_basic_leaf, vcpu, count)?;

    if template == CpuTemplate::Baseline {
        for entry in cpuid.as_mut_slice() {
            apply_baseline(entry);
        }
    }
    Ok(())
}

/// Is this feature set in this CPUID?
pub fn has_feature(cpuid: &CpuId, f: &Feature) -> bool {
    find(cpuid, f.leaf, f.subleaf).is_some_and(|e| reg(e, f.reg) & f.mask() != 0)
}

/// Features the template hides (for docs, logs and tests). Host hides nothing beyond normalisation.
pub fn hidden_features(template: CpuTemplate) -> &'static [Feature] {
    match template {
        CpuTemplate::Host => &[],
        CpuTemplate::Baseline => BASELINE_HIDDEN,
    }
}

/// Linux's capability number (`word * 32 + bit`, as in arch/x86/include/asm/cpufeatures.h) of a
/// CPUID feature, which `clearcpuid=` accepts on every kernel (names need CONFIG_X86_FEATURE_NAMES).
pub fn linux_cap_number(f: &Feature) -> Option<u16> {
    let word: u16 = match (f.leaf, f.subleaf, f.reg) {
        (0x1, 0, Reg::Edx) => 0,
        (0x8000_0001, 0, Reg::Edx) => 1,
        (0x1, 0, Reg::Ecx) => 4,
        (0x8000_0001, 0, Reg::Ecx) => 6,
        (0x7, 0, Reg::Ebx) => 9,
        (0xd, 1, Reg::Eax) => 10,
        (0x7, 1, Reg::Eax) => 12,
        (0x8000_0008, 0, Reg::Ebx) => 13,
        (0x7, 0, Reg::Ecx) => 16,
        (0x7, 0, Reg::Edx) => 18,
        _ => return None,
    };
    Some(word * 32 + u16::from(f.bit))
}

/// Longest `clearcpuid=` value Linux reads (its parser's buffer is 128 bytes with the NUL).
pub const CLEARCPUID_MAX: usize = 127;

/// Kernel command-line arguments that make a Linux guest drop the features `template` hides but
/// the vCPU still shows (`effective` is the CPUID read back from KVM after KVM_SET_CPUID2).
///
/// On hosts whose KVM honours KVM_SET_CPUID2 this is empty. Where it does not (nested PVM hosts
/// answer CPUID from the host), the guest must be told on its command line: `noxsave` (which also
/// drops AVX and everything else that depends on XSAVE) and `clearcpuid=` with Linux capability
/// numbers, in the template's order of importance. Returns the arguments and the names of the
/// features that did not fit in `clearcpuid=`'s buffer.
///
/// `extra` are features hidden on top of the template (see [`EMULATED_KERNEL_HIDDEN`]); they come
/// first in `clearcpuid=`. Features that `noxsave` already removes (Linux clears what depends on
/// XSAVE) are not repeated, which leaves room in the 127-byte list.
pub fn guest_clear_args(
    template: CpuTemplate,
    extra: &[Feature],
    effective: &CpuId,
) -> (Vec<String>, Vec<&'static str>) {
    let mut args = Vec::new();
    let mut numbers = String::new();
    let mut left_out = Vec::new();
    let hidden: Vec<&Feature> = extra.iter().chain(hidden_features(template)).collect();
    let noxsave = hidden.iter().any(|f| **f == features::XSAVE) && has_feature(effective, &features::XSAVE);
    for f in hidden.into_iter().filter(|f| has_feature(effective, f)) {
        if *f == features::XSAVE {
            args.push("noxsave".to_string());
            continue;
        }
        if noxsave && NEEDS_XSAVE.contains(f) {
            continue;
        }
        let Some(n) = linux_cap_number(f) else { continue };
        let item = if numbers.is_empty() { n.to_string() } else { format!(",{n}") };
        if numbers.len() + item.len() > CLEARCPUID_MAX {
            left_out.push(f.name);
        } else {
            numbers.push_str(&item);
        }
    }
    if !numbers.is_empty() {
        args.push(format!("clearcpuid={numbers}"));
    }
    (args, left_out)
}

/// Does `entry` answer CPUID with EAX = `leaf`, ECX = `subleaf`?
fn matches(entry: &kvm_cpuid_entry2, leaf: u32, subleaf: u32) -> bool {
    entry.function == leaf && (entry.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || entry.index == subleaf)
}

fn find(cpuid: &CpuId, leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| matches(e, leaf, subleaf))
}

fn reg(entry: &kvm_cpuid_entry2, r: Reg) -> u32 {
    match r {
        Reg::Eax => entry.eax,
        Reg::Ebx => entry.ebx,
        Reg::Ecx => entry.ecx,
        Reg::Edx => entry.edx,
    }
}

fn zero(entry: &mut kvm_cpuid_entry2) {
    entry.eax = 0;
    entry.ebx = 0;
    entry.ecx = 0;
    entry.edx = 0;
}

/// Leaf 1: APIC ID, logical processor count, CLFLUSH size, hypervisor and HTT bits.
fn normalize_leaf1(entry: &mut kvm_cpuid_entry2, vcpu: u32, count: u32) {
    // EBX[7:0] (brand index) is kept.
    entry.ebx = (vcpu << 24) | (count << 16) | (CLFLUSH_LINE_SIZE_QWORDS << 8) | (entry.ebx & 0xff);
    entry.ecx |= features::HYPERVISOR.mask();
    if count > 1 {
        entry.edx |= features::HTT.mask();
    } else {
        entry.edx &= !features::HTT.mask();
    }
}

/// Leaf 4 (deterministic cache parameters): `count` cores per package; L1/L2 private to a core,
/// L3 shared by all of them. The terminating subleaf (cache type 0) is left as it is.
fn normalize_leaf4(entry: &mut kvm_cpuid_entry2, count: u32) {
    let cache_type = entry.eax & 0x1f;
    if cache_type == 0 {
        return;
    }
    let level = (entry.eax >> 5) & 0x7;
    let sharing = if level >= 3 { count - 1 } else { 0 };
    entry.eax = (entry.eax & bits(0, 13)) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
}

/// Number of APIC-ID bits needed to number `count` cores (ceil(log2(count))).
fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        u32::BITS - (count - 1).leading_zeros()
    }
}

/// The three subleaves of the extended topology leaf (0xB, or 0x1F mirroring it): SMT level with
/// one thread, core level with `count` cores, then the invalid level that ends the list.
fn topology_entries(function: u32, vcpu: u32, count: u32) -> [kvm_cpuid_entry2; 3] {
    let entry = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: vcpu,
        ..Default::default()
    };
    [entry(0, 0, 1, LEVEL_TYPE_SMT), entry(1, bits_for(count), count, LEVEL_TYPE_CORE), entry(2, 0, 0, 0)]
}

/// Replaces leaf 0xB with our topology (generated when the maximum basic leaf covers it even if
/// KVM did not report it), and leaf 0x1F, when present, with a mirror of it.
fn rebuild_topology(cpuid: &mut CpuId, max_basic_leaf: u32, vcpu: u32, count: u32) -> Result<(), CpuidError> {
    let has = |cpuid: &CpuId, leaf: u32| cpuid.as_slice().iter().any(|e| e.function == leaf);
    let want_b = max_basic_leaf >= LEAF_TOPOLOGY || has(cpuid, LEAF_TOPOLOGY);
    let want_1f = has(cpuid, LEAF_TOPOLOGY_V2);
    cpuid.retain(|e| e.function != LEAF_TOPOLOGY && e.function != LEAF_TOPOLOGY_V2);
    let mut leaves = Vec::new();
    if want_b {
        leaves.push(LEAF_TOPOLOGY);
    }
    if want_1f {
        leaves.push(LEAF_TOPOLOGY_V2);
    }
    for leaf in leaves {
        for entry in topology_entries(leaf, vcpu, count) {
            cpuid.push(entry).map_err(|_| CpuidError::TooManyEntries)?;
        }
    }
    Ok(())
}

/// The Baseline allow-list, ANDed into one entry.
fn apply_baseline(entry: &mut kvm_cpuid_entry2) {
    match entry.function {
        LEAF_FEATURES => {
            entry.ecx &= BASELINE_L1_ECX;
            entry.edx &= BASELINE_L1_EDX;
        }
        LEAF_EXT_FEATURES => {
            let subleaf_0 = entry.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || entry.index == 0;
            if subleaf_0 {
                entry.eax = 0;
                entry.ebx &= BASELINE_L7_EBX;
                entry.ecx = 0;
                entry.edx &= BASELINE_L7_EDX;
            } else {
                zero(entry);
            }
        }
        f if BASELINE_ZEROED_LEAVES.contains(&f) => zero(entry),
        LEAF_EXT1 => {
            entry.ecx &= BASELINE_EXT1_ECX;
            entry.edx &= BASELINE_EXT1_EDX;
        }
        LEAF_ADDR_SIZES => entry.ebx &= BASELINE_EXT8_EBX,
        LEAF_KVM_FEATURES => entry.eax &= !BASELINE_KVM_HYPERCALL_FEATURES,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_drops_hypercall_features_only() {
        let entries = intel_entries();
        let host_eax = get(&cpuid_from(&entries), 0x4000_0001, 0).eax;
        assert_ne!(host_eax & BASELINE_KVM_HYPERCALL_FEATURES, 0, "the fake host offers them");
        let mut c = cpuid_from(&entries);
        normalize(&mut c, CpuTemplate::Baseline, 0, 2).unwrap();
        assert_eq!(get(&c, 0x4000_0001, 0).eax, host_eax & !BASELINE_KVM_HYPERCALL_FEATURES);
        let mut h = cpuid_from(&entries);
        normalize(&mut h, CpuTemplate::Host, 0, 2).unwrap();
        assert_eq!(get(&h, 0x4000_0001, 0).eax, host_eax);
    }

    #[test]
    fn linux_cap_numbers_match_cpufeatures_h() {
        assert_eq!(linux_cap_number(&features::XSAVE), Some(4 * 32 + 26));
        assert_eq!(linux_cap_number(&features::POPCNT), Some(4 * 32 + 23));
        assert_eq!(linux_cap_number(&features::SMAP), Some(9 * 32 + 20));
        assert_eq!(linux_cap_number(&features::UMIP), Some(16 * 32 + 2));
        assert_eq!(linux_cap_number(&features::RDTSCP), Some(32 + 27));
        assert_eq!(linux_cap_number(&features::LZCNT), Some(6 * 32 + 5));
        assert_eq!(linux_cap_number(&features::MD_CLEAR), Some(18 * 32 + 10));
        assert_eq!(linux_cap_number(&Feature { name: "x", leaf: 0x14, subleaf: 0, reg: Reg::Ebx, bit: 1 }), None);
    }

    #[test]
    fn guest_clear_args_only_for_features_the_vcpu_still_shows() {
        // A vCPU that honoured the template shows nothing hidden: no arguments.
        let mut honoured = cpuid_from(&intel_entries());
        normalize(&mut honoured, CpuTemplate::Baseline, 0, 1).unwrap();
        assert_eq!(guest_clear_args(CpuTemplate::Baseline, &[], &honoured), (vec![], vec![]));
        // Host template: nothing to hide.
        assert_eq!(guest_clear_args(CpuTemplate::Host, &[], &cpuid_from(&intel_entries())).0, Vec::<String>::new());
        // A vCPU that still shows everything (a host that ignores KVM_SET_CPUID2).
        let (args, left_out) = guest_clear_args(CpuTemplate::Baseline, &[], &cpuid_from(&intel_entries()));
        assert_eq!(args[0], "noxsave");
        let list = args[1].strip_prefix("clearcpuid=").unwrap();
        assert!(list.len() <= CLEARCPUID_MAX);
        let nums: Vec<u16> = list.split(',').map(|n| n.parse().unwrap()).collect();
        // The most important ones come first and always fit.
        assert_eq!(nums[0], 9 * 32 + 20, "SMAP first");
        for f in [features::POPCNT, features::CX16, features::RDRAND, features::FSGSBASE, features::INVPCID] {
            assert!(nums.contains(&linux_cap_number(&f).unwrap()), "{}", f.name);
        }
        assert!(!nums.contains(&linux_cap_number(&features::XSAVE).unwrap()));
        assert!(left_out.len() + nums.len() < hidden_features(CpuTemplate::Baseline).len());
        // noxsave takes AVX and the rest of its dependants with it: they are not repeated.
        for f in [features::AVX, features::AVX2, features::XSAVEOPT, features::FMA] {
            assert!(!nums.contains(&linux_cap_number(&f).unwrap()), "{}", f.name);
        }
        // F16C does not depend on XSAVE in Linux: it must still be named.
        assert!(nums.contains(&linux_cap_number(&features::F16C).unwrap()), "f16c");

        // Extra features (an emulating host) come first, with either template.
        let (args, _) = guest_clear_args(CpuTemplate::Host, EMULATED_KERNEL_HIDDEN, &cpuid_from(&intel_entries()));
        assert_eq!(args, vec![format!("clearcpuid={}", 9 * 32 + 9)], "ERMS");
        let (args, _) = guest_clear_args(CpuTemplate::Baseline, EMULATED_KERNEL_HIDDEN, &cpuid_from(&intel_entries()));
        assert!(args[1].starts_with(&format!("clearcpuid={},", 9 * 32 + 9)));
    }

    const SIG: u32 = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
    const ONES: u32 = u32::MAX;

    fn e(function: u32, index: u32, flags: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// Something like KVM_GET_SUPPORTED_CPUID on a recent Intel server, every feature bit set
    /// except HYPERVISOR and HTT (which the normalisation sets).
    fn intel_entries() -> Vec<kvm_cpuid_entry2> {
        vec![
            // "GenuineIntel", max basic leaf 0x1f.
            e(0, 0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            e(1, 0, 0, [0x0008_06f8, 0x7f80_08ab, !(1 << 31), !(1 << 28)]),
            // L1d, L1i, L2, L3 and the terminating subleaf; host says 56 cores, 2 threads.
            e(4, 0, SIG, [0xdc00_4121, 0x02c0_003f, 0x3f, 0]),
            e(4, 1, SIG, [0xdc00_4122, 0x01c0_003f, 0x3f, 0]),
            e(4, 2, SIG, [0xdc00_4143, 0x03c0_003f, 0x7ff, 0]),
            e(4, 3, SIG, [0xdc1b_c163, 0x03c0_003f, 0xdfff, 4]),
            e(4, 4, SIG, [0, 0, 0, 0]),
            e(6, 0, 0, [ONES; 4]),
            e(7, 0, SIG, [2, ONES, ONES, ONES]),
            e(7, 1, SIG, [ONES, ONES, ONES, ONES]),
            e(7, 2, SIG, [0, 0, 0, ONES]),
            e(0xa, 0, 0, [0x0708_8005, 0, 0, 0x8603]),
            e(0xb, 0, SIG, [1, 2, 0x100, 0x3a]),
            e(0xb, 1, SIG, [7, 112, 0x201, 0x3a]),
            e(0xd, 0, SIG, [0x2e7, 0x2a88, 0x2a88, 0]),
            e(0xd, 1, SIG, [0x1f, 0x2a88, 0x1800, 0]),
            e(0xd, 2, SIG, [0x100, 0x240, 0, 0]),
            e(0x12, 0, SIG, [ONES; 4]),
            e(0x14, 0, SIG, [ONES; 4]),
            e(0x1f, 0, SIG, [1, 2, 0x100, 0x3a]),
            e(0x1f, 1, SIG, [7, 112, 0x201, 0x3a]),
            e(0x1f, 2, SIG, [7, 112, 0x502, 0x3a]),
            e(0x4000_0000, 0, 0, [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d]),
            e(0x4000_0001, 0, 0, [0x0100_7afb, 0, 0, 0]),
            e(0x8000_0000, 0, 0, [0x8000_0008, 0, 0, 0]),
            e(0x8000_0001, 0, 0, [0, 0, ONES, ONES]),
            e(0x8000_0007, 0, 0, [0, 0, 0, 0x100]),
            e(0x8000_0008, 0, 0, [0x3934, ONES, 0, 0]),
        ]
    }

    fn cpuid_from(entries: &[kvm_cpuid_entry2]) -> CpuId {
        CpuId::from_entries(entries).expect("CpuId")
    }

    fn normalized(template: CpuTemplate, vcpu: u8, count: u8) -> CpuId {
        let mut cpuid = cpuid_from(&intel_entries());
        normalize(&mut cpuid, template, vcpu, count).expect("normalize");
        cpuid
    }

    fn get(cpuid: &CpuId, leaf: u32, subleaf: u32) -> kvm_cpuid_entry2 {
        *find(cpuid, leaf, subleaf).expect("entry")
    }

    fn all_of(cpuid: &CpuId, leaf: u32) -> Vec<kvm_cpuid_entry2> {
        let mut v: Vec<_> = cpuid.as_slice().iter().filter(|e| e.function == leaf).copied().collect();
        v.sort_by_key(|e| e.index);
        v
    }

    #[test]
    fn leaf1_carries_apic_id_counts_and_clflush_size() {
        for template in CpuTemplate::ALL {
            for count in [1u8, 4, MAX_CPUS] {
                for vcpu in [0, count / 2, count - 1] {
                    let c = normalized(template, vcpu, count);
                    let l1 = get(&c, 1, 0);
                    assert_eq!(l1.ebx >> 24, u32::from(vcpu));
                    assert_eq!((l1.ebx >> 16) & 0xff, u32::from(count));
                    assert_eq!((l1.ebx >> 8) & 0xff, 8);
                    assert_eq!(l1.ebx & 0xff, 0xab, "brand index kept");
                    assert_eq!(l1.eax, 0x0008_06f8, "signature kept");
                    assert_eq!(has_feature(&c, &features::HTT), count > 1);
                }
            }
        }
    }

    #[test]
    fn hypervisor_bit_is_set() {
        for template in CpuTemplate::ALL {
            let c = normalized(template, 0, 1);
            assert!(has_feature(&c, &features::HYPERVISOR), "{template}");
        }
    }

    #[test]
    fn cache_leaf_describes_one_package_of_cores() {
        for count in [1u8, 2, 32] {
            let c = normalized(CpuTemplate::Host, 0, count);
            let l4 = all_of(&c, 4);
            assert_eq!(l4.len(), 5);
            let n = u32::from(count);
            for (i, entry) in l4.iter().take(4).enumerate() {
                assert_eq!(entry.eax >> 26, n - 1, "cores, subleaf {i}");
                let sharing = (entry.eax >> 14) & 0xfff;
                let level = (entry.eax >> 5) & 7;
                assert_eq!(sharing, if level == 3 { n - 1 } else { 0 }, "sharing, {i}");
                let original = intel_entries()[2 + i].eax;
                assert_eq!(entry.eax & 0x3fff, original & 0x3fff, "type/level kept");
                assert_eq!(entry.ebx, intel_entries()[2 + i].ebx, "geometry kept");
            }
            assert_eq!(l4[4].eax, 0, "terminator untouched");
        }
    }

    #[test]
    fn topology_leaf_for_1_2_and_32_cpus() {
        for (count, shift) in [(1u8, 0u32), (2, 1), (3, 2), (32, 5)] {
            for vcpu in [0, count - 1] {
                let c = normalized(CpuTemplate::Host, vcpu, count);
                for leaf in [0xb, 0x1f] {
                    let t = all_of(&c, leaf);
                    assert_eq!(t.len(), 3, "leaf {leaf:#x}");
                    let v = u32::from(vcpu);
                    assert_eq!([t[0].eax, t[0].ebx, t[0].ecx, t[0].edx], [0, 1, 0x100, v]);
                    assert_eq!([t[1].eax, t[1].ebx, t[1].ecx, t[1].edx], [shift, u32::from(count), 0x201, v]);
                    assert_eq!((t[2].ecx >> 8) & 0xff, 0, "invalid level type");
                    assert_eq!(t[2].ebx, 0);
                    assert_eq!(t[2].edx, v);
                    assert!(t.iter().all(|e| e.flags & SIG != 0));
                }
            }
        }
    }

    #[test]
    fn thermal_and_pmu_are_zeroed_and_paravirt_and_address_sizes_kept() {
        let c = normalized(CpuTemplate::Host, 0, 2);
        for leaf in [6, 0xa] {
            let x = get(&c, leaf, 0);
            assert_eq!([x.eax, x.ebx, x.ecx, x.edx], [0; 4], "leaf {leaf:#x}");
        }
        let input = intel_entries();
        for leaf in [0x4000_0000, 0x4000_0001] {
            let before = input.iter().find(|x| x.function == leaf).expect("input");
            assert_eq!(get(&c, leaf, 0), *before);
        }
        assert_eq!(get(&c, 0x8000_0008, 0).eax, 0x3934);
        let b = normalized(CpuTemplate::Baseline, 0, 2);
        assert_eq!(get(&b, 0x8000_0008, 0).eax, 0x3934);
        assert_eq!(get(&b, 0x8000_0008, 0).ebx, BASELINE_EXT8_EBX, "XSAVEERPTR only");
    }

    #[test]
    fn host_template_keeps_host_features() {
        let c = normalized(CpuTemplate::Host, 0, 2);
        assert!(hidden_features(CpuTemplate::Host).is_empty());
        for f in [features::SMAP, features::POPCNT, features::XSAVE, features::AVX512F, features::CX16] {
            assert!(has_feature(&c, &f), "{}", f.name);
        }
        // Every baseline-hidden feature is still there under Host.
        for f in hidden_features(CpuTemplate::Baseline) {
            assert!(has_feature(&c, f), "{}", f.name);
        }
    }

    #[test]
    fn baseline_hides_its_list_and_keeps_the_basics() {
        let c = normalized(CpuTemplate::Baseline, 0, 2);
        let hidden = hidden_features(CpuTemplate::Baseline);
        let required = [
            "smap", "smep", "popcnt", "cx16", "xsave", "osxsave", "avx", "avx2", "rdrand", "rdseed", "fsgsbase",
            "invpcid", "pcid", "movbe", "bmi1", "bmi2", "abm", "pdpe1gb", "rdtscp", "pku", "la57", "umip", "avx512f",
        ];
        for name in required {
            assert!(hidden.iter().any(|f| f.name == name), "{name} listed");
        }
        for f in hidden {
            assert!(!has_feature(&c, f), "{} hidden", f.name);
        }
        use features::*;
        for f in [
            SSE,
            SSE2,
            FXSR,
            LM,
            SYSCALL,
            NX,
            TSC_DEADLINE,
            X2APIC,
            SSE3,
            SSSE3,
            SSE4_1,
            SSE4_2,
            HYPERVISOR,
            HTT,
            CX8,
            CMOV,
            PAE,
            PGE,
            PAT,
            APIC,
            TSC,
            MSR,
            CLFSH,
            MMX,
            ERMS,
            LAHF_LM,
            SPEC_CTRL,
            STIBP,
            ARCH_CAPABILITIES,
            SSBD,
        ] {
            assert!(has_feature(&c, &f), "{} kept", f.name);
        }
        // Every named feature is either hidden or kept: the allow-list and the list agree.
        for f in features::ALL {
            if !hidden.contains(f) {
                assert!(has_feature(&c, f), "{} neither hidden nor kept", f.name);
            }
        }
        let l7 = get(&c, 7, 0);
        assert_eq!(l7.eax, 0, "max subleaf of leaf 7");
        assert_eq!(l7.ecx, 0);
        for sub in [1, 2] {
            let x = get(&c, 7, sub);
            assert_eq!([x.eax, x.ebx, x.ecx, x.edx], [0; 4], "leaf 7.{sub}");
        }
    }

    #[test]
    fn baseline_zeroes_xsave_sgx_and_pt_leaves() {
        let c = normalized(CpuTemplate::Baseline, 1, 2);
        for leaf in [0xd, 0x12, 0x14] {
            let entries = all_of(&c, leaf);
            assert!(!entries.is_empty());
            for x in entries {
                assert_eq!([x.eax, x.ebx, x.ecx, x.edx], [0; 4], "leaf {leaf:#x}.{}", x.index);
            }
        }
        // Host keeps them.
        let h = normalized(CpuTemplate::Host, 1, 2);
        assert_eq!(get(&h, 0xd, 0).eax, 0x2e7);
    }

    #[test]
    fn baseline_never_adds_a_feature() {
        // SSE4.2 cleared on the host stays cleared.
        let mut entries = intel_entries();
        entries[1].ecx &= !features::SSE4_2.mask();
        let mut c = cpuid_from(&entries);
        normalize(&mut c, CpuTemplate::Baseline, 0, 1).expect("normalize");
        assert!(!has_feature(&c, &features::SSE4_2));
        assert!(has_feature(&c, &features::SSE4_1));

        // The same for every named feature the normalisation itself does not set.
        for f in features::ALL {
            if *f == features::HYPERVISOR || *f == features::HTT {
                continue;
            }
            let mut entries = intel_entries();
            for x in entries.iter_mut().filter(|x| matches(x, f.leaf, f.subleaf)) {
                let r = match f.reg {
                    Reg::Eax => &mut x.eax,
                    Reg::Ebx => &mut x.ebx,
                    Reg::Ecx => &mut x.ecx,
                    Reg::Edx => &mut x.edx,
                };
                *r &= !f.mask();
            }
            let mut c = cpuid_from(&entries);
            normalize(&mut c, CpuTemplate::Baseline, 0, 2).expect("normalize");
            assert!(!has_feature(&c, f), "{} appeared", f.name);
        }

        // A host with nothing but leaves 0 and 1 gets nothing but the normalisation bits.
        let mut c = cpuid_from(&[e(0, 0, 0, [1, 0, 0, 0]), e(1, 0, 0, [0, 0, 0, 0])]);
        normalize(&mut c, CpuTemplate::Baseline, 0, 2).expect("normalize");
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ecx, features::HYPERVISOR.mask());
        assert_eq!(l1.edx, features::HTT.mask());
    }

    #[test]
    fn missing_leaves_are_handled() {
        let mut no_leaf1 = cpuid_from(&[e(0, 0, 0, [0xd, 0, 0, 0]), e(7, 0, SIG, [0; 4])]);
        let err = normalize(&mut no_leaf1, CpuTemplate::Host, 0, 1).expect_err("no leaf 1");
        assert_eq!(err, CpuidError::MissingLeaf { leaf: 1 });
        assert!(err.to_string().contains("0x1"), "{err}");

        let mut no_leaf0 = cpuid_from(&[e(1, 0, 0, [0; 4])]);
        let err = normalize(&mut no_leaf0, CpuTemplate::Host, 0, 1).expect_err("no leaf 0");
        assert_eq!(err, CpuidError::MissingLeaf { leaf: 0 });

        // Max basic leaf 0xd without a 0xB entry: the topology leaf is generated.
        let mut c = cpuid_from(&[e(0, 0, 0, [0xd, 0, 0, 0]), e(1, 0, 0, [0; 4])]);
        normalize(&mut c, CpuTemplate::Host, 1, 2).expect("normalize");
        assert_eq!(all_of(&c, 0xb).len(), 3);
        assert_eq!(get(&c, 0xb, 1).ebx, 2);
        assert!(all_of(&c, 0x1f).is_empty());

        // Max basic leaf 7: no topology leaf is made up.
        let mut c = cpuid_from(&[e(0, 0, 0, [7, 0, 0, 0]), e(1, 0, 0, [0; 4])]);
        normalize(&mut c, CpuTemplate::Baseline, 0, 1).expect("normalize");
        assert_eq!(c.as_slice().len(), 2);
    }

    #[test]
    fn bad_counts_and_full_tables_are_errors() {
        let mut c = cpuid_from(&intel_entries());
        assert_eq!(normalize(&mut c, CpuTemplate::Host, 0, 0), Err(CpuidError::InvalidCpuCount(0)));
        assert_eq!(
            normalize(&mut c, CpuTemplate::Host, 0, MAX_CPUS + 1),
            Err(CpuidError::InvalidCpuCount(MAX_CPUS + 1))
        );
        assert_eq!(
            normalize(&mut c, CpuTemplate::Host, 2, 2),
            Err(CpuidError::InvalidVcpuId { vcpu_id: 2, cpu_count: 2 })
        );

        let mut entries = vec![e(0, 0, 0, [0xb, 0, 0, 0]), e(1, 0, 0, [0; 4])];
        for i in 0..(KVM_MAX_CPUID_ENTRIES - 2) as u32 {
            entries.push(e(0x4000_0100 + i, 0, 0, [0; 4]));
        }
        let mut full = cpuid_from(&entries);
        assert_eq!(normalize(&mut full, CpuTemplate::Host, 0, 1), Err(CpuidError::TooManyEntries));
    }

    #[test]
    fn has_feature_respects_significant_index() {
        let c = cpuid_from(&[
            e(7, 0, SIG, [0, 0, 0, 0]),
            e(7, 1, SIG, [ONES; 4]),
            e(1, 5, 0, [0, 0, features::POPCNT.mask(), 0]),
        ]);
        assert!(!has_feature(&c, &features::SMAP), "subleaf 1 is not subleaf 0");
        assert!(has_feature(&c, &features::POPCNT), "index ignored without the flag");
        assert!(!has_feature(&c, &features::LM), "missing leaf");
    }

    #[test]
    fn template_names_round_trip() {
        assert_eq!(CpuTemplate::default(), CpuTemplate::Host);
        for t in CpuTemplate::ALL {
            assert_eq!(t.to_string().parse::<CpuTemplate>(), Ok(t));
        }
        assert_eq!("Baseline".parse::<CpuTemplate>(), Ok(CpuTemplate::Baseline));
        let err = "fast".parse::<CpuTemplate>().expect_err("unknown");
        let msg = err.to_string();
        assert!(msg.contains("fast") && msg.contains("host") && msg.contains("baseline"), "{msg}");
    }

    #[test]
    fn allow_list_masks_match_the_documented_bits() {
        assert_eq!(BASELINE_L1_EDX, 0x178b_fbff);
        assert_eq!(bits(0, 31), u32::MAX);
        assert_eq!(bits(4, 7), 0xf0);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
        assert_eq!(bits_for(32), 5);
    }
}
