//! A `Machine` for tests: plain register structs, a flat guest memory addressed directly by
//! guest-virtual address, and a log of injected exceptions and atomic exchanges.

#![allow(dead_code)]

use isla_insn::{kvm_fpu, kvm_regs, kvm_sregs, InsnError, Machine};

/// Guest memory size of [`TestMachine`].
pub const MEM_SIZE: usize = 0x10000;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_EM: u64 = 1 << 2;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;

pub const CF: u64 = 1 << 0;
pub const PF: u64 = 1 << 2;
pub const AF: u64 = 1 << 4;
pub const ZF: u64 = 1 << 6;
pub const SF: u64 = 1 << 7;
pub const OF: u64 = 1 << 11;
pub const AC: u64 = 1 << 18;
/// RFLAGS bit 1 is always set.
pub const FLAGS_FIXED: u64 = 1 << 1;

#[derive(Debug, Clone)]
pub struct TestMachine {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: kvm_fpu,
    pub mem: Vec<u8>,
    pub injected: Vec<(u8, Option<u32>)>,
    /// Addresses passed to `cmpxchg16`.
    pub cmpxchg16_calls: Vec<u64>,
    pub set_regs_calls: usize,
    pub set_fpu_calls: usize,
    pub xcr0: u64,
    /// XCR0 values `set_xcr0` refuses, as a hypervisor would.
    pub xcr0_refused: Vec<u64>,
}

impl TestMachine {
    /// A vCPU in 64-bit mode with SSE enabled, RIP 0x1000 and RSP 0x8000.
    pub fn long64() -> Self {
        let mut m = Self::bare();
        m.sregs.cs.l = 1;
        m.sregs.cr0 = CR0_PE | CR0_MP | CR0_NE | CR0_PG;
        m.sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        m.sregs.efer = (1 << 8) | (1 << 10);
        m
    }

    /// A vCPU in 32-bit protected mode with SSE enabled.
    pub fn protected32() -> Self {
        let mut m = Self::bare();
        m.sregs.cs.db = 1;
        m.sregs.cr0 = CR0_PE | CR0_MP | CR0_NE;
        m.sregs.cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT;
        m
    }

    /// A vCPU in real mode (CR4.OSFXSR set so SSE control instructions work).
    pub fn real16() -> Self {
        let mut m = Self::bare();
        m.sregs.cr4 = CR4_OSFXSR;
        m
    }

    fn bare() -> Self {
        let regs = kvm_regs { rip: 0x1000, rsp: 0x8000, rflags: FLAGS_FIXED, ..Default::default() };
        let fpu = kvm_fpu { fcw: 0x037f, mxcsr: 0x1f80, ..Default::default() };
        TestMachine {
            regs,
            sregs: kvm_sregs::default(),
            fpu,
            mem: vec![0; MEM_SIZE],
            injected: Vec::new(),
            cmpxchg16_calls: Vec::new(),
            set_regs_calls: 0,
            set_fpu_calls: 0,
            xcr0: 1,
            xcr0_refused: Vec::new(),
        }
    }

    fn range(&self, gva: u64, len: usize) -> Result<std::ops::Range<usize>, InsnError> {
        let start = usize::try_from(gva).ok();
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.mem.len() => Ok(s..e),
            _ => Err(InsnError::Memory {
                gva,
                reason: format!("{len} bytes outside the {:#x}-byte test memory", self.mem.len()),
            }),
        }
    }

    /// Test helper: store bytes (panics when out of range).
    pub fn poke(&mut self, gva: u64, data: &[u8]) {
        let r = self.range(gva, data.len()).expect("poke in range");
        self.mem[r].copy_from_slice(data);
    }

    /// Test helper: load bytes (panics when out of range).
    pub fn peek(&self, gva: u64, len: usize) -> Vec<u8> {
        let r = self.range(gva, len).expect("peek in range");
        self.mem[r].to_vec()
    }

    pub fn peek_u16(&self, gva: u64) -> u16 {
        u16::from_le_bytes(self.peek(gva, 2).try_into().expect("2 bytes"))
    }

    pub fn peek_u32(&self, gva: u64) -> u32 {
        u32::from_le_bytes(self.peek(gva, 4).try_into().expect("4 bytes"))
    }

    pub fn peek_u64(&self, gva: u64) -> u64 {
        u64::from_le_bytes(self.peek(gva, 8).try_into().expect("8 bytes"))
    }
}

impl Machine for TestMachine {
    fn regs(&mut self) -> Result<kvm_regs, InsnError> {
        Ok(self.regs)
    }

    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), InsnError> {
        self.set_regs_calls += 1;
        self.regs = *regs;
        Ok(())
    }

    fn sregs(&mut self) -> Result<kvm_sregs, InsnError> {
        Ok(self.sregs)
    }

    fn fpu(&mut self) -> Result<kvm_fpu, InsnError> {
        Ok(self.fpu)
    }

    fn set_fpu(&mut self, fpu: &kvm_fpu) -> Result<(), InsnError> {
        self.set_fpu_calls += 1;
        self.fpu = *fpu;
        Ok(())
    }

    fn xcr0(&mut self) -> Result<u64, InsnError> {
        Ok(self.xcr0)
    }

    fn set_xcr0(&mut self, value: u64) -> Result<bool, InsnError> {
        if self.xcr0_refused.contains(&value) {
            return Ok(false);
        }
        self.xcr0 = value;
        Ok(true)
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), InsnError> {
        self.injected.push((vector, error_code));
        Ok(())
    }

    fn read_virt(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), InsnError> {
        let r = self.range(gva, buf.len())?;
        buf.copy_from_slice(&self.mem[r]);
        Ok(())
    }

    fn write_virt(&mut self, gva: u64, data: &[u8]) -> Result<(), InsnError> {
        let r = self.range(gva, data.len())?;
        self.mem[r].copy_from_slice(data);
        Ok(())
    }

    fn cmpxchg16(&mut self, gva: u64, expected: u128, new: u128) -> Result<(bool, u128), InsnError> {
        if gva % 16 != 0 {
            return Err(InsnError::Memory { gva, reason: "cmpxchg16 on a misaligned address".into() });
        }
        self.cmpxchg16_calls.push(gva);
        let r = self.range(gva, 16)?;
        let found = u128::from_le_bytes(self.mem[r.clone()].try_into().expect("16 bytes"));
        if found == expected {
            self.mem[r].copy_from_slice(&new.to_le_bytes());
            Ok((true, found))
        } else {
            Ok((false, found))
        }
    }
}
