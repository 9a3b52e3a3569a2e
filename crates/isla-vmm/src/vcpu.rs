//! vCPU set-up and the run loop of each vCPU thread: port I/O and MMIO go to the devices, guest
//! power events end the run, and emulation failures go to the instruction fallback
//! ([`isla_insn`]) — which only runs on an exit that would otherwise stop the VM, so it costs
//! nothing on hardware KVM.

use std::collections::BTreeMap;
use std::sync::Arc;

use isla_arch::boot;
use isla_arch::cpuid::{self, CpuTemplate};
use isla_insn::{InsnError, Machine};
use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_xcr, kvm_xcrs, CpuId, Msrs, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::devices::Devices;
use crate::fpstate;
use crate::kvm_exit;
use crate::state::{GuestExit, VmShared};
use crate::{kvm_err, VmmError};
use isla_insn::hex;

/// Configures one vCPU: CPUID for its id, boot MSRs, LAPIC virtual wire, and for the boot vCPU
/// the long-mode registers at `entry`. Returns the CPUID as KVM reports it back (what the guest sees).
pub fn configure(fd: &VcpuFd, id: u8, cpuid: &CpuId, boot_entry: Option<u64>) -> Result<CpuId, VmmError> {
    fd.set_cpuid2(cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    // What the vCPU really shows: some hosts (nested PVM) answer CPUID from the host whatever was set.
    let effective = fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_CPUID2"))?;
    for (set, got) in cpuid.as_slice().iter().zip(effective.as_slice()) {
        if (set.eax, set.ebx, set.ecx, set.edx) != (got.eax, got.ebx, got.ecx, got.edx) {
            tracing::debug!(
                "vCPU {id} CPUID {:#x}.{}: set {:08x} {:08x} {:08x} {:08x}, KVM shows {:08x} {:08x} {:08x} {:08x}",
                set.function,
                set.index,
                set.eax,
                set.ebx,
                set.ecx,
                set.edx,
                got.eax,
                got.ebx,
                got.ecx,
                got.edx
            );
        }
    }
    let entries: Vec<kvm_msr_entry> = boot::boot_msrs()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| VmmError::Setup(format!("MSR list: {e:?}")))?;
    let n = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if n != entries.len() {
        let idx = entries.get(n).map_or(0, |e| e.index);
        return Err(VmmError::Setup(format!("KVM refused boot MSR {idx:#x} on vCPU {id}")));
    }
    let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    // SAFETY: kvm_lapic_state.regs is a plain 1 KiB byte array; reinterpreting c_char as u8 is sound.
    let regs: &mut [u8] =
        unsafe { std::slice::from_raw_parts_mut(lapic.regs.as_mut_ptr().cast::<u8>(), lapic.regs.len()) };
    boot::set_lapic_virtual_wire(regs);
    fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    if let Some(entry) = boot_entry {
        let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        boot::long_mode_sregs(&mut sregs);
        fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        fd.set_regs(&boot::boot_regs(entry)).map_err(kvm_err("KVM_SET_REGS"))?;
        fd.set_fpu(&boot::boot_fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
    }
    Ok(effective)
}

/// Builds the CPUID of vCPU `id` from what KVM supports.
pub fn cpuid_for(supported: &CpuId, template: CpuTemplate, id: u8, count: u8) -> Result<CpuId, VmmError> {
    let mut c = supported.clone();
    cpuid::normalize(&mut c, template, id, count).map_err(|e| VmmError::Setup(format!("CPUID: {e}")))?;
    Ok(c)
}

/// One vCPU thread's state.
pub struct Vcpu {
    /// Index (APIC id).
    pub id: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Devices.
    pub devices: Arc<Devices>,
    /// Shared run state.
    pub shared: Arc<VmShared>,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Instruction fallback options; None disables the fallback.
    pub fallback: Option<isla_insn::Options>,
    exits: BTreeMap<(&'static str, &'static str), u64>,
    emulated: isla_insn::Stats,
}

enum Next {
    Continue,
    InternalError,
    Exit(GuestExit),
}

impl Vcpu {
    /// A vCPU ready to run.
    pub fn new(
        id: u8,
        fd: VcpuFd,
        devices: Arc<Devices>,
        shared: Arc<VmShared>,
        mem: GuestMemoryMmap,
        fallback: Option<isla_insn::Options>,
    ) -> Self {
        Vcpu { id, fd, devices, shared, mem, fallback, exits: BTreeMap::new(), emulated: isla_insn::Stats::new() }
    }

    fn count(&mut self, kind: &'static str, target: &'static str) {
        *self.exits.entry((kind, target)).or_default() += 1;
    }

    /// Runs until the VM stops; then adds this vCPU's counters to the shared totals.
    pub fn run(mut self) {
        if self.id == 0 {
            self.shared.mark_boot_start();
        }
        while !self.shared.should_stop() {
            let next = self.step();
            let next = match next {
                Next::InternalError => self.internal_error(),
                n => n,
            };
            if let Next::Exit(e) = next {
                self.shared.request_exit(e);
            }
        }
        if let Ok(r) = self.fd.get_regs() {
            self.shared.set_final_rip(self.id, r.rip);
        }
        let exits = self.exits.iter().map(|((k, t), v)| (format!("{k}:{t}"), *v)).collect();
        self.shared.add_counters(&exits, &self.emulated);
    }

    fn step(&mut self) -> Next {
        let devices = self.devices.clone();
        let (kind, target, next) = match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => ("io-in", devices.pio_read(port, data), Next::Continue),
            Ok(VcpuExit::IoOut(port, data)) => ("io-out", devices.pio_write(port, data), Next::Continue),
            Ok(VcpuExit::MmioRead(addr, data)) => ("mmio-read", devices.mmio_read(addr, data), Next::Continue),
            Ok(VcpuExit::MmioWrite(addr, data)) => ("mmio-write", devices.mmio_write(addr, data), Next::Continue),
            Ok(VcpuExit::Shutdown) => ("shutdown", "", Next::Exit(GuestExit::TripleFault)),
            // With the in-kernel LAPIC, HLT is handled by KVM; an HLT exit means something is wrong.
            Ok(VcpuExit::Hlt) => {
                let message =
                    format!("vCPU {}: unexpected KVM_EXIT_HLT (the in-kernel LAPIC should handle HLT)", self.id);
                ("hlt", "", Next::Exit(GuestExit::Error { message }))
            }
            Ok(VcpuExit::SystemEvent(t, _)) if t == KVM_SYSTEM_EVENT_SHUTDOWN => {
                ("system-event", "", Next::Exit(GuestExit::Poweroff { via: "system-event" }))
            }
            Ok(VcpuExit::SystemEvent(t, _)) if t == KVM_SYSTEM_EVENT_RESET => {
                ("system-event", "", Next::Exit(GuestExit::Reboot { via: "system-event" }))
            }
            Ok(VcpuExit::InternalError) => ("internal-error", "", Next::InternalError),
            Ok(VcpuExit::FailEntry(reason, cpu)) => (
                "fail-entry",
                "",
                Next::Exit(GuestExit::Error {
                    message: format!(
                        "vCPU {}: KVM_EXIT_FAIL_ENTRY, hardware entry failure reason {reason:#x} on host CPU {cpu}",
                        self.id
                    ),
                }),
            ),
            Ok(other) => {
                let message = format!("vCPU {}: unexpected exit {other:?}", self.id);
                ("other", "", Next::Exit(GuestExit::Error { message }))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if self.shared.profiling() {
                    if let Ok(r) = self.fd.get_regs() {
                        self.shared.add_sample(self.id, r.rip);
                    }
                }
                ("interrupted", "", Next::Continue)
            }
            Err(e) => (
                "error",
                "",
                Next::Exit(GuestExit::Error { message: format!("vCPU {}: KVM_RUN failed: {e}", self.id) }),
            ),
        };
        self.count(kind, target);
        next
    }

    /// A KVM_EXIT_INTERNAL_ERROR: emulation failures go to the fallback; anything else, or an
    /// instruction the fallback does not handle, ends the run with the vCPU state named.
    fn internal_error(&mut self) -> Next {
        let Some(info) = kvm_exit::internal_error(self.fd.get_kvm_run()) else {
            return Next::Exit(GuestExit::Error { message: format!("vCPU {}: internal error without data", self.id) });
        };
        let (rip, mode) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => (r.rip, isla_insn::mode_of(&s)),
            _ => (0, isla_insn::Mode::Long64),
        };
        let name = kvm_exit::suberror_name(info.suberror);
        if info.suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            return Next::Exit(GuestExit::Error {
                message: format!(
                    "vCPU {}: KVM internal error {} ({name}) at RIP {rip:#x}, data {:x?}",
                    self.id, info.suberror, info.data
                ),
            });
        }
        let bytes = match info.insn {
            Some(b) if !b.is_empty() => b,
            _ => self.fetch_instruction(rip),
        };
        let Some(opts) = self.fallback else {
            return Next::Exit(GuestExit::Error {
                message: format!("vCPU {}: emulation failure ({name}) at RIP {rip:#x}, instruction bytes [{}] (the instruction fallback is off)", self.id, hex(&bytes)),
            });
        };
        let mut m = KvmMachine { fd: &self.fd, mem: &self.mem };
        match isla_insn::emulate(&mut m, &bytes, opts) {
            Ok(mnemonic) => {
                self.emulated.record(mnemonic);
                Next::Continue
            }
            Err(e) => {
                let decoded = isla_insn::decode(&bytes, mode).map(|d| d.mnemonic).unwrap_or("unknown");
                Next::Exit(GuestExit::Error {
                    message: format!(
                        "vCPU {}: emulation failure ({name}) at RIP {rip:#x} ({mode:?}): instruction `{decoded}` [{}] is not handled: {e}",
                        self.id,
                        hex(&bytes)
                    ),
                })
            }
        }
    }

    /// Reads up to 15 instruction bytes at RIP when KVM did not provide them.
    fn fetch_instruction(&self, rip: u64) -> Vec<u8> {
        let mut m = KvmMachine { fd: &self.fd, mem: &self.mem };
        let mut out = Vec::with_capacity(15);
        for i in 0..15u64 {
            let mut b = [0u8];
            if m.read_virt(rip.wrapping_add(i), &mut b).is_err() {
                break;
            }
            out.push(b[0]);
        }
        out
    }
}

/// The instruction fallback's view of a KVM vCPU and guest memory.
struct KvmMachine<'a> {
    fd: &'a VcpuFd,
    mem: &'a GuestMemoryMmap,
}

fn verr(what: &str) -> impl Fn(kvm_ioctls::Error) -> InsnError + '_ {
    move |e| InsnError::Vcpu(format!("{what}: {e}"))
}

impl KvmMachine<'_> {
    /// Translates a guest-virtual address; returns the guest-physical address.
    fn translate(&self, gva: u64, write: bool) -> Result<u64, InsnError> {
        let t = self.fd.translate_gva(gva).map_err(verr("KVM_TRANSLATE"))?;
        if t.valid == 0 {
            return Err(InsnError::Memory { gva, reason: "not mapped".into() });
        }
        if write && t.writeable == 0 {
            return Err(InsnError::Memory { gva, reason: "read-only".into() });
        }
        Ok(t.physical_address)
    }

    /// Walks `len` bytes at `gva` page by page, calling `f(offset, gpa, n)` for each piece.
    fn each_page(
        &self,
        gva: u64,
        len: usize,
        write: bool,
        mut f: impl FnMut(usize, u64, usize) -> Result<(), InsnError>,
    ) -> Result<(), InsnError> {
        let mut done = 0usize;
        while done < len {
            let va = gva.wrapping_add(done as u64);
            let n = ((0x1000 - (va & 0xfff)) as usize).min(len - done);
            let gpa = self.translate(va, write)?;
            f(done, gpa, n)?;
            done += n;
        }
        Ok(())
    }
}

impl Machine for KvmMachine<'_> {
    fn regs(&mut self) -> Result<kvm_regs, InsnError> {
        self.fd.get_regs().map_err(verr("KVM_GET_REGS"))
    }
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), InsnError> {
        self.fd.set_regs(regs).map_err(verr("KVM_SET_REGS"))
    }
    fn sregs(&mut self) -> Result<kvm_sregs, InsnError> {
        self.fd.get_sregs().map_err(verr("KVM_GET_SREGS"))
    }
    fn fpu(&mut self) -> Result<kvm_fpu, InsnError> {
        let xs = self.fd.get_xsave().map_err(verr("KVM_GET_XSAVE"))?;
        Ok(fpstate::fpu_from_xsave(&xs))
    }
    fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<(), InsnError> {
        let mut xs = self.fd.get_xsave().map_err(verr("KVM_GET_XSAVE"))?;
        fpstate::fpu_into_xsave(fpu, &mut xs);
        // SAFETY: `xs` is a whole `kvm_xsave` (4 KiB). KVM reads more than that only for guests
        // given dynamically enabled state (AMX), which needs ARCH_REQ_XCOMP_GUEST_PERM; isla never
        // asks for it, so the guest's XSAVE size stays within 4 KiB.
        unsafe { self.fd.set_xsave(&xs) }.map_err(verr("KVM_SET_XSAVE"))
    }
    fn xcr0(&mut self) -> Result<u64, InsnError> {
        let x = self.fd.get_xcrs().map_err(verr("KVM_GET_XCRS"))?;
        let n = (x.nr_xcrs as usize).min(x.xcrs.len());
        Ok(x.xcrs[..n].iter().find(|e| e.xcr == 0).map_or(1, |e| e.value))
    }
    fn set_xcr0(&mut self, value: u64) -> Result<bool, InsnError> {
        let mut x = kvm_xcrs { nr_xcrs: 1, ..Default::default() };
        x.xcrs[0] = kvm_xcr { xcr: 0, reserved: 0, value };
        match self.fd.set_xcrs(&x) {
            Ok(()) => Ok(true),
            // KVM refuses an XCR0 the guest's CPUID does not allow.
            Err(e) if e.errno() == libc::EINVAL => Ok(false),
            Err(e) => Err(verr("KVM_SET_XCRS")(e)),
        }
    }
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), InsnError> {
        let mut ev = self.fd.get_vcpu_events().map_err(verr("KVM_GET_VCPU_EVENTS"))?;
        ev.exception.injected = 1;
        ev.exception.pending = 0;
        ev.exception.nr = vector;
        ev.exception.has_error_code = u8::from(error_code.is_some());
        ev.exception.error_code = error_code.unwrap_or(0);
        self.fd.set_vcpu_events(&ev).map_err(verr("KVM_SET_VCPU_EVENTS"))
    }
    fn read_virt(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), InsnError> {
        let mem = self.mem;
        self.each_page(gva, buf.len(), false, |off, gpa, n| {
            mem.read_slice(&mut buf[off..off + n], GuestAddress(gpa))
                .map_err(|e| InsnError::Memory { gva: gva + off as u64, reason: e.to_string() })
        })
    }
    fn write_virt(&mut self, gva: u64, data: &[u8]) -> Result<(), InsnError> {
        let mem = self.mem;
        self.each_page(gva, data.len(), true, |off, gpa, n| {
            mem.write_slice(&data[off..off + n], GuestAddress(gpa))
                .map_err(|e| InsnError::Memory { gva: gva + off as u64, reason: e.to_string() })
        })
    }
    fn cmpxchg16(&mut self, gva: u64, expected: u128, new: u128) -> Result<(bool, u128), InsnError> {
        if gva % 16 != 0 {
            return Err(InsnError::Memory { gva, reason: "cmpxchg16b operand is not 16-byte aligned".into() });
        }
        let gpa = self.translate(gva, true)?;
        let slice =
            self.mem.get_slice(GuestAddress(gpa), 16).map_err(|e| InsnError::Memory { gva, reason: e.to_string() })?;
        let guard = slice.ptr_guard_mut();
        // SAFETY: the pointer comes from a 16-byte slice of guest memory, which stays mapped while
        // the vCPU threads run (they hold `mem`); the guest itself accesses it only atomically.
        unsafe { isla_insn::atomic::cmpxchg16b(guard.as_ptr(), expected, new) }
            .ok_or_else(|| InsnError::Vcpu("the host CPU lacks cmpxchg16b".into()))
    }
}
