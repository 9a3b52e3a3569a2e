//! # isla-insn: instruction fallback for KVM emulation failures
//!
//! On nested hosts (PVM and similar), the guest kernel runs under the host's x86 instruction
//! emulator. When that emulator meets an instruction it does not implement, KVM stops the vCPU
//! with `KVM_EXIT_INTERNAL_ERROR` / `KVM_INTERNAL_ERROR_EMULATION`; with
//! `KVM_CAP_EXIT_ON_EMULATION_FAILURE` the exit also carries up to 15 instruction bytes from RIP.
//! The monitor hands those bytes and access to the vCPU (the [`Machine`] trait) to [`emulate`],
//! which decodes the instruction, performs its effect on registers, FPU state and guest memory,
//! advances RIP or queues the exception the instruction raises, and lets the vCPU resume.
//! Anything else comes back as an [`InsnError`] naming the instruction and its bytes.
//!
//! ## Why by hand
//!
//! General x86 decoder crates decode and format; none of them also executes instructions
//! against KVM's `kvm_regs`/`kvm_sregs`/`kvm_fpu` and a guest-virtual memory interface, and the
//! fallback needs only a few dozen encodings. A small decoder written for exactly those is easy
//! to audit against the architecture manuals, treats every guest byte as hostile (bounded reads,
//! no panics, no indexing that can go out of range) and pulls no large dependency into the
//! monitor.
//!
//! ## What is handled
//!
//! `int3`, `ud2`, `clac`, `stac`, `xgetbv`, `xsetbv` (XCR0), `popcnt`, `tzcnt`/`bsf`, `lzcnt`/`bsr`, `cmpxchg8b`,
//! `cmpxchg16b`, `fwait`, `fninit`, `fnclex`, `fnstcw`, `fldcw`, `fnstsw` (memory and AX),
//! `ldmxcsr`, `stmxcsr`, `fxsave`/`fxsave64`, `fxrstor`/`fxrstor64`, `emms`, `lfence`, `mfence`,
//! `sfence`, `pause`, `nop` (one-byte and 0F 1F /0), `endbr64`/`endbr32` and the prefetch hints,
//! with legacy prefixes, REX, and 16-, 32- and 64-bit addressing (RIP-relative included).
//!
//! Faults the instructions raise on hardware are injected through [`Machine::inject_exception`]:
//! #UD for a misplaced LOCK prefix, register forms of CMPXCHG8B/16B and CLAC/STAC above CPL 0,
//! XGETBV/XSETBV without CR4.OSXSAVE;
//! #GP(0) for misaligned CMPXCHG16B/FXSAVE/FXRSTOR operands, reserved MXCSR bits, an XCR other
//! than XCR0, XSETBV above CPL 0 or with a value the hypervisor refuses; #NM and
//! #UD from CR0.EM/TS/MP and CR4.OSFXSR; #MF for FWAIT/EMMS with a pending x87 exception.
//!
//! ## Not modelled
//!
//! Segment limits and access rights (bases are applied: FS/GS in 64-bit mode, all segments
//! outside it), alignment-check (#AC), single-step traps (RFLAGS.TF), page faults (a failed
//! guest-virtual access is an [`InsnError::Memory`] for the monitor to handle) and x87
//! exception delivery beyond the pending-exception check. An instruction longer than 15 bytes
//! is reported as [`InsnError::TooLong`] rather than turned into #GP(0). CMPXCHG8B is atomic
//! (through [`Machine::cmpxchg16`] on the enclosing aligned 16 bytes) except when its 8 bytes
//! cross a 16-byte boundary, where it is a plain read-compare-write.

#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(target_arch = "x86_64")]
pub mod atomic;
mod decode;
mod error;
mod exec;
mod fxsave;
mod stats;

pub use decode::{
    decode, decode_with, AddrSize, Base, Decoded, Kind, MemOperand, Mode, OpSize, Operand, Seg, MAX_INSN_LEN,
};
pub use error::{hex, InsnError};
pub use fxsave::{FXSAVE_AREA_SIZE, MXCSR_MASK};
pub use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
pub use stats::Stats;

/// Exception vectors the fallback injects.
pub mod vector {
    /// #BP, from `int3`.
    pub const BP: u8 = 3;
    /// #UD, invalid opcode.
    pub const UD: u8 = 6;
    /// #NM, device not available (CR0.TS/EM).
    pub const NM: u8 = 7;
    /// #GP, general protection (always with error code 0 here).
    pub const GP: u8 = 13;
    /// #MF, pending x87 floating-point exception.
    pub const MF: u8 = 16;
}

/// What the monitor gives the fallback: the vCPU's state and guest memory through virtual
/// addresses.
pub trait Machine {
    /// The vCPU's general-purpose registers, RIP and RFLAGS.
    fn regs(&mut self) -> Result<kvm_regs, InsnError>;
    /// Writes the general-purpose registers, RIP and RFLAGS.
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), InsnError>;
    /// The vCPU's segment and control registers.
    fn sregs(&mut self) -> Result<kvm_sregs, InsnError>;
    /// The vCPU's x87/SSE state.
    fn fpu(&mut self) -> Result<kvm_fpu, InsnError>;
    /// Writes the x87/SSE state.
    fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<(), InsnError>;
    /// The vCPU's XCR0.
    fn xcr0(&mut self) -> Result<u64, InsnError>;
    /// Sets XCR0; `Ok(false)` when the hypervisor refuses the value for this vCPU (the
    /// instruction then raises #GP(0)).
    fn set_xcr0(&mut self, value: u64) -> Result<bool, InsnError>;
    /// Queue exception `vector` for delivery at the next entry (error code if any).
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), InsnError>;
    /// Read guest memory at a guest-virtual address (the implementation translates and checks
    /// every page).
    fn read_virt(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), InsnError>;
    /// Write guest memory at a guest-virtual address (the implementation translates and checks
    /// every page).
    fn write_virt(&mut self, gva: u64, data: &[u8]) -> Result<(), InsnError>;
    /// Atomically compare-and-exchange 16 bytes at `gva` (aligned to 16); returns (swapped, value
    /// found). Values are little-endian (the byte at `gva` is bits 0..7). A host mapping of guest
    /// memory can use [`atomic::cmpxchg16b`].
    fn cmpxchg16(&mut self, gva: u64, expected: u128, new: u128) -> Result<(bool, u128), InsnError>;
}

/// CPUID features that change how an encoding decodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// CPUID exposes BMI1 (F3 0F BC is TZCNT, else BSF)
    pub bmi1: bool,
    /// CPUID exposes LZCNT (F3 0F BD is LZCNT, else BSR)
    pub lzcnt: bool,
}

/// The code size from CS: CS.L => [`Mode::Long64`], else CS.D => [`Mode::Protected32`], else
/// [`Mode::Real16`].
pub fn mode_of(sregs: &kvm_sregs) -> Mode {
    if sregs.cs.l != 0 {
        Mode::Long64
    } else if sregs.cs.db != 0 {
        Mode::Protected32
    } else {
        Mode::Real16
    }
}

/// What [`emulate_outcome`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The instruction's mnemonic.
    pub mnemonic: &'static str,
    /// Its length in bytes.
    pub len: usize,
    /// The exception injected (vector, error code), if the instruction raised one. RIP is past
    /// the instruction for traps (#BP) and on it for faults.
    pub exception: Option<(u8, Option<u32>)>,
}

/// Decode and execute the instruction at RIP: returns its mnemonic when handled (RIP advanced or
/// exception injected).
pub fn emulate<M: Machine>(m: &mut M, bytes: &[u8], opts: Options) -> Result<&'static str, InsnError> {
    emulate_outcome(m, bytes, opts).map(|o| o.mnemonic)
}

/// Like [`emulate`], also telling the length and any exception injected.
pub fn emulate_outcome<M: Machine>(m: &mut M, bytes: &[u8], opts: Options) -> Result<Outcome, InsnError> {
    let sregs = m.sregs()?;
    let mode = mode_of(&sregs);
    let d = decode_with(bytes, mode, opts)?;
    let exception = exec::execute(m, &d, &sregs, mode)?;
    Ok(Outcome { mnemonic: d.mnemonic, len: d.len, exception })
}
