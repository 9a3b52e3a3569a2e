//! Execution of a [`Decoded`] instruction against a [`Machine`].
//!
//! Each handler reads the state it needs, performs the memory accesses first, and writes
//! registers (RIP last, through one `set_regs`) only once nothing can fail any more, so an
//! instruction that returns an error leaves RIP on itself. Faults are injected with RIP unchanged;
//! `int3` is a trap and advances RIP before raising #BP.

use std::sync::atomic::{fence, Ordering};

use crate::decode::{Base, Decoded, Kind, MemOperand, Mode, OpSize, Operand, Seg};
use crate::fxsave::{self, Form, FXSAVE_AREA_SIZE, MXCSR_MASK};
use crate::{kvm_fpu, kvm_regs, kvm_sregs, vector, InsnError, Machine};

const CF: u64 = 1 << 0;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;
const VM: u64 = 1 << 17;
const AC: u64 = 1 << 18;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXSAVE: u64 = 1 << 18;

/// x87 status word: exception flags (IE..PE), stack fault, error summary and busy.
const FSW_EXCEPTIONS: u16 = 0x003f;
const FSW_ES: u16 = 1 << 7;
const FSW_B: u16 = 1 << 15;
/// FCW after FNINIT: all exceptions masked, 64-bit precision, round to nearest.
const FCW_INIT: u16 = 0x037f;

/// How often CMPXCHG8B retries its 16-byte exchange when only the neighbouring 8 bytes changed.
const CMPXCHG8B_RETRIES: usize = 64;

/// The exception an instruction raised, as (vector, error code).
pub(crate) type Raised = Option<(u8, Option<u32>)>;

/// Executes `d`, which was decoded in `mode` from the state in `sregs`.
pub(crate) fn execute<M: Machine>(m: &mut M, d: &Decoded, sregs: &kvm_sregs, mode: Mode) -> Result<Raised, InsnError> {
    let mut x = Exec { m, d, sregs, mode };
    let lockable = matches!(d.kind, Kind::Cmpxchg8b | Kind::Cmpxchg16b) && d.mem().is_some();
    if d.lock && !lockable {
        return x.fault(vector::UD, None);
    }
    match d.kind {
        Kind::Int3 => {
            let regs = x.m.regs()?;
            x.finish(regs)?;
            x.fault(vector::BP, None)
        }
        Kind::Ud2 => x.fault(vector::UD, None),
        Kind::Clac | Kind::Stac => x.clac_stac(),
        Kind::Xgetbv | Kind::Xsetbv => x.xcr(),
        Kind::Popcnt | Kind::Tzcnt | Kind::Bsf | Kind::Lzcnt | Kind::Bsr => x.bit_count(),
        Kind::Cmpxchg16b => x.cmpxchg16b(),
        Kind::Cmpxchg8b => x.cmpxchg8b(),
        Kind::Fwait => x.fwait(),
        Kind::Fninit | Kind::Fnclex | Kind::Fldcw => x.x87_control(),
        Kind::Fnstcw | Kind::FnstswMem | Kind::FnstswAx => x.x87_store(),
        Kind::Ldmxcsr | Kind::Stmxcsr => x.mxcsr(),
        Kind::Fxsave => x.fxsave(),
        Kind::Fxrstor => x.fxrstor(),
        Kind::Emms => x.emms(),
        Kind::Fild16 => x.fild(2),
        Kind::Fild32 => x.fild(4),
        Kind::Fild64 => x.fild(8),
        Kind::Mfence => {
            fence(Ordering::SeqCst);
            x.skip()
        }
        Kind::Pause => {
            std::hint::spin_loop();
            x.skip()
        }
        // A VM exit already serialises the vCPU; hints and NOPs have no effect to reproduce.
        Kind::Lfence | Kind::Sfence | Kind::Nop => x.skip(),
    }
}

/// Encoding number to register.
fn gpr_mut(regs: &mut kvm_regs, r: u8) -> &mut u64 {
    match r & 15 {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

fn gpr(regs: &kvm_regs, r: u8) -> u64 {
    let mut copy = *regs;
    *gpr_mut(&mut copy, r)
}

/// Writes a result of `size`: 16-bit keeps bits 16..63, 32-bit zero-extends.
fn write_gpr(regs: &mut kvm_regs, r: u8, size: OpSize, value: u64) {
    let g = gpr_mut(regs, r);
    *g = match size {
        OpSize::Word => (*g & !0xffff) | (value & 0xffff),
        OpSize::Dword => value & 0xffff_ffff,
        OpSize::Qword => value,
    };
}

fn with_flag(flags: u64, flag: u64, on: bool) -> u64 {
    if on {
        flags | flag
    } else {
        flags & !flag
    }
}

/// Sets or clears the error-summary and busy bits from the pending, unmasked exceptions.
fn update_error_summary(fpu: &mut kvm_fpu) {
    let unmasked = fpu.fsw & FSW_EXCEPTIONS & !(fpu.fcw & FSW_EXCEPTIONS);
    if unmasked != 0 {
        fpu.fsw |= FSW_ES | FSW_B;
    } else {
        fpu.fsw &= !(FSW_ES | FSW_B);
    }
}

fn malformed(d: &Decoded) -> InsnError {
    InsnError::Unsupported { mnemonic: Some(d.mnemonic), bytes: String::from("(operands missing)") }
}

struct Exec<'a, M> {
    m: &'a mut M,
    d: &'a Decoded,
    sregs: &'a kvm_sregs,
    mode: Mode,
}

impl<M: Machine> Exec<'_, M> {
    fn fault(&mut self, vector: u8, error_code: Option<u32>) -> Result<Raised, InsnError> {
        self.m.inject_exception(vector, error_code)?;
        Ok(Some((vector, error_code)))
    }

    fn next_rip(&self, rip: u64) -> u64 {
        let next = rip.wrapping_add(self.d.len as u64);
        match self.mode {
            Mode::Long64 => next,
            Mode::Protected32 => next & 0xffff_ffff,
            Mode::Real16 => next & 0xffff,
        }
    }

    /// Advances RIP past the instruction and writes the registers back.
    fn finish(&mut self, mut regs: kvm_regs) -> Result<Raised, InsnError> {
        regs.rip = self.next_rip(regs.rip);
        self.m.set_regs(&regs)?;
        Ok(None)
    }

    fn skip(&mut self) -> Result<Raised, InsnError> {
        let regs = self.m.regs()?;
        self.finish(regs)
    }

    /// The linear (guest-virtual) address of a memory operand.
    fn linear(&self, mem: &MemOperand, regs: &kvm_regs) -> u64 {
        let mut off = match mem.base {
            Some(Base::Reg(r)) => gpr(regs, r),
            Some(Base::Rip) => self.next_rip(regs.rip),
            None => 0,
        };
        if let Some(i) = mem.index {
            off = off.wrapping_add(gpr(regs, i).wrapping_mul(u64::from(mem.scale)));
        }
        off = off.wrapping_add(mem.disp as u64) & mem.addr_size.mask();
        let s = self.sregs;
        let base = match (self.mode, mem.seg) {
            (_, Seg::Fs) => s.fs.base,
            (_, Seg::Gs) => s.gs.base,
            // 64-bit mode ignores the other segment bases.
            (Mode::Long64, _) => 0,
            (_, Seg::Es) => s.es.base,
            (_, Seg::Cs) => s.cs.base,
            (_, Seg::Ss) => s.ss.base,
            (_, Seg::Ds) => s.ds.base,
        };
        let lin = base.wrapping_add(off);
        match self.mode {
            Mode::Long64 => lin,
            _ => lin & 0xffff_ffff,
        }
    }

    /// The memory operand's address, or `None` for a register operand.
    fn mem_addr(&self, regs: &kvm_regs) -> Option<u64> {
        self.d.mem().map(|mem| self.linear(mem, regs))
    }

    fn read<const N: usize>(&mut self, gva: u64) -> Result<[u8; N], InsnError> {
        let mut b = [0u8; N];
        self.m.read_virt(gva, &mut b)?;
        Ok(b)
    }

    fn read_sized(&mut self, gva: u64, size: OpSize) -> Result<u64, InsnError> {
        Ok(match size {
            OpSize::Word => u64::from(u16::from_le_bytes(self.read(gva)?)),
            OpSize::Dword => u64::from(u32::from_le_bytes(self.read(gva)?)),
            OpSize::Qword => u64::from_le_bytes(self.read(gva)?),
        })
    }

    fn cpl(&self, regs: &kvm_regs) -> u8 {
        if self.sregs.cr0 & CR0_PE == 0 {
            0
        } else if regs.rflags & VM != 0 {
            3
        } else {
            // KVM reports the current privilege level as SS.DPL.
            self.sregs.ss.dpl & 3
        }
    }

    /// #NM for x87 instructions when CR0.EM or CR0.TS is set.
    fn x87_unavailable(&self) -> Option<u8> {
        (self.sregs.cr0 & (CR0_EM | CR0_TS) != 0).then_some(vector::NM)
    }

    /// #UD without SSE enabled (CR0.EM set or CR4.OSFXSR clear), else #NM with CR0.TS.
    fn sse_unavailable(&self) -> Option<u8> {
        if self.sregs.cr0 & CR0_EM != 0 || self.sregs.cr4 & CR4_OSFXSR == 0 {
            Some(vector::UD)
        } else if self.sregs.cr0 & CR0_TS != 0 {
            Some(vector::NM)
        } else {
            None
        }
    }

    fn clac_stac(&mut self) -> Result<Raised, InsnError> {
        let mut regs = self.m.regs()?;
        if self.cpl(&regs) != 0 {
            return self.fault(vector::UD, None);
        }
        regs.rflags = with_flag(regs.rflags, AC, self.d.kind == Kind::Stac);
        self.finish(regs)
    }

    /// XGETBV and XSETBV. Only XCR0 exists here (ECX = 0); XSETBV checks the architectural rules
    /// (x87 always on, AVX only with SSE) and leaves the rest to the hypervisor.
    fn xcr(&mut self) -> Result<Raised, InsnError> {
        if self.sregs.cr4 & CR4_OSXSAVE == 0 {
            return self.fault(vector::UD, None);
        }
        let mut regs = self.m.regs()?;
        if regs.rcx & 0xffff_ffff != 0 {
            return self.fault(vector::GP, Some(0));
        }
        if self.d.kind == Kind::Xgetbv {
            let v = self.m.xcr0()?;
            regs.rax = v & 0xffff_ffff;
            regs.rdx = v >> 32;
            return self.finish(regs);
        }
        let v = (regs.rdx & 0xffff_ffff) << 32 | (regs.rax & 0xffff_ffff);
        let (x87, sse, avx) = (v & 1 != 0, v & 2 != 0, v & 4 != 0);
        if self.cpl(&regs) != 0 || !x87 || (avx && !sse) || !self.m.set_xcr0(v)? {
            return self.fault(vector::GP, Some(0));
        }
        self.finish(regs)
    }

    fn bit_count(&mut self) -> Result<Raised, InsnError> {
        let d = self.d;
        let (Some(dst), Some(src_op)) = (d.reg, d.rm) else {
            return Err(malformed(d));
        };
        let mut regs = self.m.regs()?;
        let size = d.op_size;
        let bits = size.bits();
        let src = match src_op {
            Operand::Reg(r) => gpr(&regs, r) & size.mask(),
            Operand::Mem(mem) => {
                let gva = self.linear(&mem, &regs);
                self.read_sized(gva, size)?
            }
        };
        let mut fl = regs.rflags;
        let result = match d.kind {
            Kind::Popcnt => {
                fl &= !(CF | PF | AF | ZF | SF | OF);
                fl = with_flag(fl, ZF, src == 0);
                Some(src.count_ones())
            }
            Kind::Tzcnt => {
                let r = if src == 0 { bits } else { src.trailing_zeros() };
                fl = with_flag(fl, CF, src == 0);
                fl = with_flag(fl, ZF, r == 0);
                Some(r)
            }
            Kind::Lzcnt => {
                // `src` is zero-extended to 64 bits; discount the bits above the operand.
                let r = if src == 0 { bits } else { src.leading_zeros().saturating_sub(64 - bits) };
                fl = with_flag(fl, CF, src == 0);
                fl = with_flag(fl, ZF, r == 0);
                Some(r)
            }
            Kind::Bsf => {
                fl = with_flag(fl, ZF, src == 0);
                (src != 0).then(|| src.trailing_zeros())
            }
            Kind::Bsr => {
                fl = with_flag(fl, ZF, src == 0);
                (src != 0).then(|| 63 - src.leading_zeros())
            }
            _ => return Err(malformed(d)),
        };
        regs.rflags = fl;
        if let Some(r) = result {
            write_gpr(&mut regs, dst, size, u64::from(r));
        }
        self.finish(regs)
    }

    fn cmpxchg16b(&mut self) -> Result<Raised, InsnError> {
        let mut regs = self.m.regs()?;
        let Some(gva) = self.mem_addr(&regs) else {
            return self.fault(vector::UD, None);
        };
        if gva % 16 != 0 {
            return self.fault(vector::GP, Some(0));
        }
        let expected = (u128::from(regs.rdx) << 64) | u128::from(regs.rax);
        let new = (u128::from(regs.rcx) << 64) | u128::from(regs.rbx);
        let (swapped, found) = self.m.cmpxchg16(gva, expected, new)?;
        if swapped {
            regs.rflags |= ZF;
        } else {
            regs.rflags &= !ZF;
            regs.rax = found as u64;
            regs.rdx = (found >> 64) as u64;
        }
        self.finish(regs)
    }

    fn cmpxchg8b(&mut self) -> Result<Raised, InsnError> {
        let mut regs = self.m.regs()?;
        let Some(gva) = self.mem_addr(&regs) else {
            return self.fault(vector::UD, None);
        };
        let lo32 = |v: u64| v & 0xffff_ffff;
        let expected = (lo32(regs.rdx) << 32) | lo32(regs.rax);
        let new = (lo32(regs.rcx) << 32) | lo32(regs.rbx);
        let (swapped, found) = if gva % 16 <= 8 {
            self.cmpxchg8_in_block(gva, expected, new)?
        } else {
            self.cmpxchg8_split(gva, expected, new)?
        };
        if swapped {
            regs.rflags |= ZF;
        } else {
            regs.rflags &= !ZF;
            regs.rax = lo32(found);
            regs.rdx = found >> 32;
        }
        self.finish(regs)
    }

    /// Atomic CMPXCHG8B when the 8 bytes lie inside one aligned 16-byte block: exchange the
    /// whole block with its other bytes unchanged, retrying while only those other bytes move.
    fn cmpxchg8_in_block(&mut self, gva: u64, expected: u64, new: u64) -> Result<(bool, u64), InsnError> {
        let block = gva & !15;
        let shift = ((gva & 15) * 8) as u32;
        let mask = u128::from(u64::MAX) << shift;
        let mut cur = u128::from_le_bytes(self.read(block)?);
        for _ in 0..CMPXCHG8B_RETRIES {
            let found = (cur >> shift) as u64;
            if found != expected {
                return Ok((false, found));
            }
            let next = (cur & !mask) | (u128::from(new) << shift);
            let (ok, now) = self.m.cmpxchg16(block, cur, next)?;
            if ok {
                return Ok((true, found));
            }
            cur = now;
        }
        Err(InsnError::Memory { gva, reason: String::from("cmpxchg8b: the neighbouring bytes kept changing") })
    }

    /// CMPXCHG8B across a 16-byte boundary (a split lock on hardware): read, compare, write.
    /// Not atomic against other vCPUs; such accesses are rare and slow on hardware as well.
    fn cmpxchg8_split(&mut self, gva: u64, expected: u64, new: u64) -> Result<(bool, u64), InsnError> {
        let found = u64::from_le_bytes(self.read(gva)?);
        if found != expected {
            return Ok((false, found));
        }
        self.m.write_virt(gva, &new.to_le_bytes())?;
        Ok((true, found))
    }

    fn fwait(&mut self) -> Result<Raised, InsnError> {
        if self.sregs.cr0 & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS {
            return self.fault(vector::NM, None);
        }
        let fpu = self.m.fpu()?;
        if fpu.fsw & FSW_ES != 0 {
            return self.fault(vector::MF, None);
        }
        self.skip()
    }

    /// FNINIT, FNCLEX and FLDCW: change the x87 control state.
    fn x87_control(&mut self) -> Result<Raised, InsnError> {
        if let Some(v) = self.x87_unavailable() {
            return self.fault(v, None);
        }
        let regs = self.m.regs()?;
        let mut fpu = self.m.fpu()?;
        match self.d.kind {
            Kind::Fninit => {
                fpu.fcw = FCW_INIT;
                fpu.fsw = 0;
                fpu.ftwx = 0;
                fpu.last_opcode = 0;
                fpu.last_ip = 0;
                fpu.last_dp = 0;
            }
            Kind::Fnclex => fpu.fsw &= !(0x00ff | FSW_B),
            _ => {
                let Some(gva) = self.mem_addr(&regs) else {
                    return self.fault(vector::UD, None);
                };
                fpu.fcw = u16::from_le_bytes(self.read(gva)?);
                update_error_summary(&mut fpu);
            }
        }
        self.m.set_fpu(&fpu)?;
        self.finish(regs)
    }

    /// FNSTCW m16, FNSTSW m16 and FNSTSW AX.
    fn x87_store(&mut self) -> Result<Raised, InsnError> {
        if let Some(v) = self.x87_unavailable() {
            return self.fault(v, None);
        }
        let mut regs = self.m.regs()?;
        let fpu = self.m.fpu()?;
        if self.d.kind == Kind::FnstswAx {
            regs.rax = (regs.rax & !0xffff) | u64::from(fpu.fsw);
            return self.finish(regs);
        }
        let Some(gva) = self.mem_addr(&regs) else {
            return self.fault(vector::UD, None);
        };
        let value = if self.d.kind == Kind::Fnstcw { fpu.fcw } else { fpu.fsw };
        self.m.write_virt(gva, &value.to_le_bytes())?;
        self.finish(regs)
    }

    /// LDMXCSR m32 and STMXCSR m32.
    fn mxcsr(&mut self) -> Result<Raised, InsnError> {
        if let Some(v) = self.sse_unavailable() {
            return self.fault(v, None);
        }
        let regs = self.m.regs()?;
        let Some(gva) = self.mem_addr(&regs) else {
            return self.fault(vector::UD, None);
        };
        let mut fpu = self.m.fpu()?;
        if self.d.kind == Kind::Stmxcsr {
            self.m.write_virt(gva, &fpu.mxcsr.to_le_bytes())?;
            return self.finish(regs);
        }
        let value = u32::from_le_bytes(self.read(gva)?);
        if value & !MXCSR_MASK != 0 {
            return self.fault(vector::GP, Some(0));
        }
        fpu.mxcsr = value;
        self.m.set_fpu(&fpu)?;
        self.finish(regs)
    }

    fn fx_form(&self) -> Form {
        Form { wide_pointers: self.d.rex_w, xmm_regs: if self.mode == Mode::Long64 { 16 } else { 8 } }
    }

    /// The checks FXSAVE and FXRSTOR share: availability, memory operand, 16-byte alignment.
    fn fx_operand(&mut self, regs: &kvm_regs) -> Result<Result<u64, Raised>, InsnError> {
        if let Some(v) = self.x87_unavailable() {
            return self.fault(v, None).map(Err);
        }
        let Some(gva) = self.mem_addr(regs) else {
            return self.fault(vector::UD, None).map(Err);
        };
        if gva % 16 != 0 {
            return self.fault(vector::GP, Some(0)).map(Err);
        }
        Ok(Ok(gva))
    }

    fn fxsave(&mut self) -> Result<Raised, InsnError> {
        let regs = self.m.regs()?;
        let gva = match self.fx_operand(&regs)? {
            Ok(gva) => gva,
            Err(raised) => return Ok(raised),
        };
        let fpu = self.m.fpu()?;
        let form = self.fx_form();
        let area = fxsave::save(&fpu, form);
        let used = area.get(..form.used_len()).unwrap_or(&area);
        self.m.write_virt(gva, used)?;
        self.finish(regs)
    }

    fn fxrstor(&mut self) -> Result<Raised, InsnError> {
        let regs = self.m.regs()?;
        let gva = match self.fx_operand(&regs)? {
            Ok(gva) => gva,
            Err(raised) => return Ok(raised),
        };
        let form = self.fx_form();
        let mut area = [0u8; FXSAVE_AREA_SIZE];
        let n = form.used_len().min(FXSAVE_AREA_SIZE);
        let used = area.get_mut(..n).unwrap_or(&mut []);
        self.m.read_virt(gva, used)?;
        let mut fpu = self.m.fpu()?;
        if fxsave::restore(used, form, &mut fpu).is_err() {
            return self.fault(vector::GP, Some(0));
        }
        self.m.set_fpu(&fpu)?;
        self.finish(regs)
    }

    /// FILD m16/m32/m64int: push the integer, converted to 80-bit extended, onto the x87 stack.
    /// (Linux runs `fnclex; emms; fild` on AMD CPUs to clear the FXSAVE pointer leak.)
    fn fild(&mut self, bytes: usize) -> Result<Raised, InsnError> {
        if let Some(v) = self.x87_unavailable() {
            return self.fault(v, None);
        }
        let regs = self.m.regs()?;
        let Some(gva) = self.mem_addr(&regs) else {
            return self.fault(vector::UD, None);
        };
        let mut buf = [0u8; 8];
        self.m.read_virt(gva, &mut buf[..bytes])?;
        let value = match bytes {
            2 => i64::from(i16::from_le_bytes([buf[0], buf[1]])),
            4 => i64::from(i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]])),
            _ => i64::from_le_bytes(buf),
        };
        let mut fpu = self.m.fpu()?;
        x87_push(&mut fpu, to_extended(value));
        self.m.set_fpu(&fpu)?;
        self.finish(regs)
    }

    fn emms(&mut self) -> Result<Raised, InsnError> {
        if self.sregs.cr0 & CR0_EM != 0 {
            return self.fault(vector::UD, None);
        }
        if self.sregs.cr0 & CR0_TS != 0 {
            return self.fault(vector::NM, None);
        }
        let mut fpu = self.m.fpu()?;
        if fpu.fsw & FSW_ES != 0 {
            return self.fault(vector::MF, None);
        }
        fpu.ftwx = 0;
        self.m.set_fpu(&fpu)?;
        self.skip()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpr_encoding_order() {
        let mut regs = kvm_regs::default();
        for r in 0..16u8 {
            *gpr_mut(&mut regs, r) = 100 + u64::from(r);
        }
        assert_eq!(regs.rax, 100);
        assert_eq!(regs.rcx, 101);
        assert_eq!(regs.rdx, 102);
        assert_eq!(regs.rbx, 103);
        assert_eq!(regs.rsp, 104);
        assert_eq!(regs.rbp, 105);
        assert_eq!(regs.rsi, 106);
        assert_eq!(regs.rdi, 107);
        assert_eq!(regs.r8, 108);
        assert_eq!(regs.r15, 115);
        assert_eq!(gpr(&regs, 13), 113);
    }

    #[test]
    fn write_widths() {
        let mut regs = kvm_regs { rbx: 0xffff_ffff_ffff_ffff, ..Default::default() };
        write_gpr(&mut regs, 3, OpSize::Word, 0x1_2345);
        assert_eq!(regs.rbx, 0xffff_ffff_ffff_2345);
        write_gpr(&mut regs, 3, OpSize::Dword, 0xdead_beef_0000_0007);
        assert_eq!(regs.rbx, 7);
        write_gpr(&mut regs, 3, OpSize::Qword, u64::MAX);
        assert_eq!(regs.rbx, u64::MAX);
    }

    #[test]
    fn error_summary_follows_masks() {
        let mut fpu = kvm_fpu {
            fcw: 0x037f,
            fsw: 0x0004, // ZE pending, masked
            ..Default::default()
        };
        update_error_summary(&mut fpu);
        assert_eq!(fpu.fsw, 0x0004);
        fpu.fcw = 0x037b; // unmask ZE
        update_error_summary(&mut fpu);
        assert_eq!(fpu.fsw, 0x8084);
        fpu.fcw = 0x037f;
        update_error_summary(&mut fpu);
        assert_eq!(fpu.fsw, 0x0004);
    }
}

/// An integer as an x87 80-bit extended value (exact for every i64).
pub(crate) fn to_extended(v: i64) -> [u8; 10] {
    let mut out = [0u8; 10];
    if v == 0 {
        return out;
    }
    let mag = v.unsigned_abs();
    let lz = mag.leading_zeros();
    let mantissa = mag << lz;
    let exponent = 16383 + 63 - lz as u16;
    out[..8].copy_from_slice(&mantissa.to_le_bytes());
    let se = exponent | if v < 0 { 0x8000 } else { 0 };
    out[8..].copy_from_slice(&se.to_le_bytes());
    out
}

/// Pushes a value onto the x87 register stack held in FXSAVE form (`fpr[0]` is ST(0), the
/// abridged tag word has one bit per physical register). On stack overflow with the invalid
/// operation exception masked, the real indefinite is pushed and IE, SF and C1 are set; unmasked,
/// the exception is left pending (ES, B) and the stack is unchanged, as the hardware does.
pub(crate) fn x87_push(fpu: &mut kvm_bindings::kvm_fpu, value: [u8; 10]) {
    const FSW_IE: u16 = 1;
    const FSW_SF: u16 = 1 << 6;
    const FSW_C1: u16 = 1 << 9;
    const INDEFINITE: [u8; 10] = [0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff];
    let top = (fpu.fsw >> 11) & 7;
    let new_top = (top + 7) & 7;
    let mut value = value;
    if fpu.ftwx & (1 << new_top) != 0 {
        fpu.fsw |= FSW_IE | FSW_SF | FSW_C1;
        if fpu.fcw & 1 == 0 {
            fpu.fsw |= FSW_ES | FSW_B;
            return;
        }
        value = INDEFINITE;
    } else {
        fpu.fsw &= !FSW_C1;
    }
    for i in (1..8).rev() {
        fpu.fpr[i] = fpu.fpr[i - 1];
    }
    fpu.fpr[0] = [0; 16];
    fpu.fpr[0][..10].copy_from_slice(&value);
    fpu.ftwx |= 1 << new_top;
    fpu.fsw = (fpu.fsw & !(7 << 11)) | (new_top << 11);
}

#[cfg(test)]
mod fild_tests {
    use super::*;

    fn ext(mantissa: u64, se: u16) -> [u8; 10] {
        let mut o = [0u8; 10];
        o[..8].copy_from_slice(&mantissa.to_le_bytes());
        o[8..].copy_from_slice(&se.to_le_bytes());
        o
    }

    #[test]
    fn integers_to_extended() {
        assert_eq!(to_extended(0), [0; 10]);
        assert_eq!(to_extended(1), ext(1 << 63, 0x3fff));
        assert_eq!(to_extended(-2), ext(1 << 63, 0xc000));
        assert_eq!(to_extended(3), ext(3 << 62, 0x4000));
        assert_eq!(to_extended(i64::MIN), ext(1 << 63, 0x8000 | (16383 + 63)));
    }

    #[test]
    fn push_moves_top_and_tags() {
        let mut f = kvm_bindings::kvm_fpu { fcw: 0x37f, ..Default::default() };
        x87_push(&mut f, to_extended(1));
        assert_eq!((f.fsw >> 11) & 7, 7);
        assert_eq!(f.ftwx, 0x80);
        assert_eq!(f.fpr[0][..10], to_extended(1));
        x87_push(&mut f, to_extended(5));
        assert_eq!((f.fsw >> 11) & 7, 6);
        assert_eq!(f.ftwx, 0xc0);
        assert_eq!(f.fpr[0][..10], to_extended(5));
        assert_eq!(f.fpr[1][..10], to_extended(1));
    }

    #[test]
    fn push_onto_a_full_stack() {
        let mut f = kvm_bindings::kvm_fpu { fcw: 0x37f, ftwx: 0xff, ..Default::default() };
        x87_push(&mut f, to_extended(9));
        assert_eq!(f.fsw & 0x241, 0x241, "IE, SF and C1");
        assert_eq!(f.fpr[0][7..10], [0xc0, 0xff, 0xff], "real indefinite");
        let mut g = kvm_bindings::kvm_fpu { fcw: 0x37e, ftwx: 0xff, ..Default::default() };
        x87_push(&mut g, to_extended(9));
        assert_ne!(g.fsw & FSW_ES, 0);
        assert_eq!(g.fpr[0], [0; 16], "unchanged when unmasked");
    }
}
