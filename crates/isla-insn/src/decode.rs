//! Pure decoder: bytes and CPU mode in, [`Decoded`] out, no vCPU access.
//!
//! It reads legacy prefixes (66, 67, F0, F2/F3, segment overrides), a REX prefix in 64-bit mode,
//! the opcode, and for instructions that have one the ModRM byte with its SIB byte and
//! displacement in all three address sizes (16-bit forms, 32-bit forms, 64-bit forms with
//! RIP-relative addressing). Only the opcodes the fallback executes produce a [`Decoded`]; a list
//! of common opcodes is recognised by name so that the error for them says what the guest ran.
//!
//! Every byte is fetched through a cursor that reports [`InsnError::Truncated`] past the end of
//! the input and [`InsnError::TooLong`] past the 15-byte limit, so no input can index out of bounds.

use std::fmt;

use crate::error::InsnError;
use crate::Options;

/// The architectural maximum length of one x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

const REX_W: u8 = 8;
const REX_R: u8 = 4;
const REX_X: u8 = 2;
const REX_B: u8 = 1;

/// The code size the vCPU executes in, from CS (see [`crate::mode_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 64-bit mode (CS.L = 1): REX prefixes, RIP-relative addressing, 32-bit default operands.
    Long64,
    /// 32-bit protected or compatibility mode (CS.D = 1).
    Protected32,
    /// Real mode, virtual-8086 mode or a 16-bit code segment (CS.D = 0).
    Real16,
}

/// The effective operand size of an instruction that has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpSize {
    /// 16 bits.
    Word,
    /// 32 bits.
    Dword,
    /// 64 bits.
    Qword,
}

impl OpSize {
    /// Size in bytes.
    pub fn bytes(self) -> usize {
        match self {
            OpSize::Word => 2,
            OpSize::Dword => 4,
            OpSize::Qword => 8,
        }
    }

    /// Size in bits.
    pub fn bits(self) -> u32 {
        8 * self.bytes() as u32
    }

    /// All-ones mask of this width.
    pub fn mask(self) -> u64 {
        match self {
            OpSize::Word => 0xffff,
            OpSize::Dword => 0xffff_ffff,
            OpSize::Qword => u64::MAX,
        }
    }
}

/// The effective address size of a memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrSize {
    /// 16-bit addressing (BX/BP/SI/DI forms), offsets wrap at 64 KiB.
    Addr16,
    /// 32-bit addressing, offsets wrap at 4 GiB.
    Addr32,
    /// 64-bit addressing.
    Addr64,
}

impl AddrSize {
    /// Mask applied to the computed offset.
    pub fn mask(self) -> u64 {
        match self {
            AddrSize::Addr16 => 0xffff,
            AddrSize::Addr32 => 0xffff_ffff,
            AddrSize::Addr64 => u64::MAX,
        }
    }
}

/// A segment register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seg {
    /// ES (prefix 26).
    Es,
    /// CS (prefix 2E).
    Cs,
    /// SS (prefix 36), and the default for rSP/rBP-based addresses.
    Ss,
    /// DS (prefix 3E), the default segment.
    Ds,
    /// FS (prefix 64).
    Fs,
    /// GS (prefix 65).
    Gs,
}

impl Seg {
    fn name(self) -> &'static str {
        match self {
            Seg::Es => "es",
            Seg::Cs => "cs",
            Seg::Ss => "ss",
            Seg::Ds => "ds",
            Seg::Fs => "fs",
            Seg::Gs => "gs",
        }
    }
}

/// The base of a memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// A general-purpose register, by encoding number (0 = rAX ... 15 = R15).
    Reg(u8),
    /// The address of the next instruction (64-bit mode, ModRM mod=00 r/m=101).
    Rip,
}

/// A decoded memory operand: `seg:[base + index*scale + disp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOperand {
    /// The segment the access uses: the override prefix if any, else DS, or SS for rSP/rBP bases.
    pub seg: Seg,
    /// Whether `seg` comes from a prefix.
    pub seg_override: bool,
    /// The base, if any.
    pub base: Option<Base>,
    /// The index register (encoding number), if any.
    pub index: Option<u8>,
    /// The index scale: 1, 2, 4 or 8.
    pub scale: u8,
    /// The sign-extended displacement.
    pub disp: i64,
    /// The address size the offset is computed in.
    pub addr_size: AddrSize,
}

/// The ModRM r/m operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// A general-purpose register, by encoding number (0 = rAX ... 15 = R15).
    Reg(u8),
    /// A memory operand.
    Mem(MemOperand),
}

/// The operation of a decoded instruction; the fallback executes every one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `int3` (CC): trap, #BP after the instruction.
    Int3,
    /// `ud2` (0F 0B): #UD.
    Ud2,
    /// `clac` (0F 01 CA).
    Clac,
    /// `stac` (0F 01 CB).
    Stac,
    /// `xgetbv` (0F 01 D0): EDX:EAX = XCR[ECX].
    Xgetbv,
    /// `xsetbv` (0F 01 D1): XCR[ECX] = EDX:EAX.
    Xsetbv,
    /// `popcnt r, r/m` (F3 0F B8).
    Popcnt,
    /// `tzcnt r, r/m` (F3 0F BC with BMI1).
    Tzcnt,
    /// `bsf r, r/m` (0F BC, or F3 0F BC without BMI1).
    Bsf,
    /// `lzcnt r, r/m` (F3 0F BD with LZCNT).
    Lzcnt,
    /// `bsr r, r/m` (0F BD, or F3 0F BD without LZCNT).
    Bsr,
    /// `cmpxchg8b m64` (0F C7 /1).
    Cmpxchg8b,
    /// `cmpxchg16b m128` (REX.W 0F C7 /1).
    Cmpxchg16b,
    /// `fwait` (9B).
    Fwait,
    /// `fninit` (DB E3).
    Fninit,
    /// `fnclex` (DB E2).
    Fnclex,
    /// `fnstcw m16` (D9 /7).
    Fnstcw,
    /// `fldcw m16` (D9 /5).
    Fldcw,
    /// `fnstsw m16` (DD /7).
    FnstswMem,
    /// `fnstsw ax` (DF E0).
    FnstswAx,
    /// `ldmxcsr m32` (0F AE /2).
    Ldmxcsr,
    /// `stmxcsr m32` (0F AE /3).
    Stmxcsr,
    /// `fxsave m512` (0F AE /0), 64-bit pointer form with REX.W.
    Fxsave,
    /// `fxrstor m512` (0F AE /1), 64-bit pointer form with REX.W.
    Fxrstor,
    /// `emms` (0F 77).
    Emms,
    /// `fild m16int` (DF /0).
    Fild16,
    /// `fild m32int` (DB /0).
    Fild32,
    /// `fild m64int` (DF /5).
    Fild64,
    /// `lfence` (0F AE /5, mod=11).
    Lfence,
    /// `mfence` (0F AE /6, mod=11).
    Mfence,
    /// `sfence` (0F AE /7, mod=11).
    Sfence,
    /// `pause` (F3 90).
    Pause,
    /// An instruction with no architectural effect here: `nop` (90, 0F 1F /0), `endbr64`,
    /// `endbr32` and the prefetch hints.
    Nop,
}

/// One decoded instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Length in bytes, prefixes included.
    pub len: usize,
    /// Lowercase mnemonic (`"popcnt"`, `"cmpxchg16b"`, `"fxsave64"`, ...).
    pub mnemonic: &'static str,
    /// What the instruction does.
    pub kind: Kind,
    /// Effective operand size (meaningful for the bit-count instructions).
    pub op_size: OpSize,
    /// A LOCK prefix is present.
    pub lock: bool,
    /// REX.W is set (64-bit mode only).
    pub rex_w: bool,
    /// The ModRM.reg register operand (encoding number with REX.R), for the instructions that
    /// have one (the bit-count destinations).
    pub reg: Option<u8>,
    /// The ModRM r/m operand, for the instructions that have a ModRM byte.
    pub rm: Option<Operand>,
}

impl Decoded {
    /// The memory operand, if the r/m operand is one.
    pub fn mem(&self) -> Option<&MemOperand> {
        match &self.rm {
            Some(Operand::Mem(m)) => Some(m),
            _ => None,
        }
    }
}

/// Decodes the instruction at the start of `bytes` as a disassembler would: F3 0F BC is `tzcnt`
/// and F3 0F BD is `lzcnt` (a CPU with BMI1 and LZCNT). Use [`decode_with`] to decode them as
/// the vCPU's CPUID says. Bytes after the instruction are ignored.
pub fn decode(bytes: &[u8], mode: Mode) -> Result<Decoded, InsnError> {
    decode_with(bytes, mode, Options { bmi1: true, lzcnt: true })
}

/// Decodes the instruction at the start of `bytes`, resolving F3 0F BC/BD through `opts`.
pub fn decode_with(bytes: &[u8], mode: Mode, opts: Options) -> Result<Decoded, InsnError> {
    let mut c = Cursor { bytes, pos: 0 };
    let p = prefixes(&mut c, mode)?;
    let cx = Ctx { mode, p, opts };
    let f = one_byte(&mut c, &cx)?;
    Ok(Decoded {
        len: c.pos,
        mnemonic: f.mnemonic,
        kind: f.kind,
        op_size: cx.op_size(),
        lock: p.lock,
        rex_w: p.rex & REX_W != 0,
        reg: f.reg,
        rm: f.rm,
    })
}

/// Bounded reader over the input bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Result<u8, InsnError> {
        if self.pos >= MAX_INSN_LEN {
            return Err(InsnError::too_long(self.bytes));
        }
        self.bytes.get(self.pos).copied().ok_or_else(|| InsnError::truncated(self.bytes))
    }

    fn u8(&mut self) -> Result<u8, InsnError> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    fn i8(&mut self) -> Result<i64, InsnError> {
        Ok(i64::from(self.u8()? as i8))
    }

    fn i16(&mut self) -> Result<i64, InsnError> {
        let b = [self.u8()?, self.u8()?];
        Ok(i64::from(i16::from_le_bytes(b)))
    }

    fn i32(&mut self) -> Result<i64, InsnError> {
        let b = [self.u8()?, self.u8()?, self.u8()?, self.u8()?];
        Ok(i64::from(i32::from_le_bytes(b)))
    }

    fn unsupported(&self, mnemonic: Option<&'static str>) -> InsnError {
        InsnError::unsupported(mnemonic, self.bytes)
    }
}

/// The prefixes of one instruction.
#[derive(Debug, Clone, Copy, Default)]
struct Prefixes {
    opsize: bool,
    addrsize: bool,
    lock: bool,
    /// The last of F2/F3, which is the one that selects a mandatory-prefix opcode.
    rep: Option<u8>,
    /// The last segment override.
    seg: Option<Seg>,
    /// The REX byte's low nibble, 0 when there is none (or when a legacy prefix followed it).
    rex: u8,
}

impl Prefixes {
    fn f3(&self) -> bool {
        self.rep == Some(0xf3)
    }

    fn f2(&self) -> bool {
        self.rep == Some(0xf2)
    }
}

fn prefixes(c: &mut Cursor<'_>, mode: Mode) -> Result<Prefixes, InsnError> {
    let mut p = Prefixes::default();
    loop {
        let b = c.peek()?;
        match b {
            0x66 => p.opsize = true,
            0x67 => p.addrsize = true,
            0xf0 => p.lock = true,
            0xf2 | 0xf3 => p.rep = Some(b),
            0x26 => p.seg = Some(Seg::Es),
            0x2e => p.seg = Some(Seg::Cs),
            0x36 => p.seg = Some(Seg::Ss),
            0x3e => p.seg = Some(Seg::Ds),
            0x64 => p.seg = Some(Seg::Fs),
            0x65 => p.seg = Some(Seg::Gs),
            0x40..=0x4f if mode == Mode::Long64 => {
                // A REX prefix counts only when the opcode follows it directly; the loop clears
                // it again if a legacy prefix comes next.
                p.rex = b & 0x0f;
                c.pos += 1;
                continue;
            }
            _ => return Ok(p),
        }
        p.rex = 0;
        c.pos += 1;
    }
}

/// Decoding context: mode, prefixes and CPUID options.
struct Ctx {
    mode: Mode,
    p: Prefixes,
    opts: Options,
}

impl Ctx {
    fn op_size(&self) -> OpSize {
        match self.mode {
            Mode::Long64 if self.p.rex & REX_W != 0 => OpSize::Qword,
            Mode::Long64 | Mode::Protected32 if self.p.opsize => OpSize::Word,
            Mode::Long64 | Mode::Protected32 => OpSize::Dword,
            Mode::Real16 if self.p.opsize => OpSize::Dword,
            Mode::Real16 => OpSize::Word,
        }
    }

    fn addr_size(&self) -> AddrSize {
        match (self.mode, self.p.addrsize) {
            (Mode::Long64, false) => AddrSize::Addr64,
            (Mode::Long64, true) | (Mode::Protected32, false) | (Mode::Real16, true) => AddrSize::Addr32,
            (Mode::Protected32, true) | (Mode::Real16, false) => AddrSize::Addr16,
        }
    }

    fn rex_w(&self) -> bool {
        self.p.rex & REX_W != 0
    }
}

/// What an opcode decodes to, before the common fields are filled in.
struct Found {
    kind: Kind,
    mnemonic: &'static str,
    reg: Option<u8>,
    rm: Option<Operand>,
}

fn plain(kind: Kind, mnemonic: &'static str) -> Result<Found, InsnError> {
    Ok(Found { kind, mnemonic, reg: None, rm: None })
}

fn with_rm(kind: Kind, mnemonic: &'static str, m: &ModRm) -> Result<Found, InsnError> {
    Ok(Found { kind, mnemonic, reg: None, rm: Some(m.operand) })
}

fn with_reg_rm(kind: Kind, mnemonic: &'static str, m: &ModRm) -> Result<Found, InsnError> {
    Ok(Found { kind, mnemonic, reg: Some(m.reg_full), rm: Some(m.operand) })
}

/// A decoded ModRM byte with its operand.
struct ModRm {
    raw: u8,
    /// The 3-bit reg field (opcode extension for groups).
    reg: u8,
    /// The reg field extended by REX.R.
    reg_full: u8,
    operand: Operand,
}

impl ModRm {
    fn is_mem(&self) -> bool {
        matches!(self.operand, Operand::Mem(_))
    }
}

fn modrm(c: &mut Cursor<'_>, cx: &Ctx) -> Result<ModRm, InsnError> {
    let raw = c.u8()?;
    let md = raw >> 6;
    let reg = (raw >> 3) & 7;
    let rm = raw & 7;
    let reg_full = reg | if cx.p.rex & REX_R != 0 { 8 } else { 0 };
    let operand = if md == 3 {
        Operand::Reg(rm | if cx.p.rex & REX_B != 0 { 8 } else { 0 })
    } else {
        Operand::Mem(match cx.addr_size() {
            AddrSize::Addr16 => mem16(c, cx, md, rm)?,
            size => mem32(c, cx, md, rm, size)?,
        })
    };
    Ok(ModRm { raw, reg, reg_full, operand })
}

/// 32- and 64-bit addressing: optional SIB, disp8/disp32, RIP-relative in 64-bit mode.
fn mem32(c: &mut Cursor<'_>, cx: &Ctx, md: u8, rm: u8, addr_size: AddrSize) -> Result<MemOperand, InsnError> {
    let rex_b = if cx.p.rex & REX_B != 0 { 8 } else { 0 };
    let rex_x = if cx.p.rex & REX_X != 0 { 8 } else { 0 };
    let mut base = None;
    let mut index = None;
    let mut scale = 1;
    let mut disp = 0;
    if rm == 4 {
        let sib = c.u8()?;
        let idx = ((sib >> 3) & 7) | rex_x;
        if idx != 4 {
            index = Some(idx);
            scale = 1 << (sib >> 6);
        }
        let b = sib & 7;
        if b == 5 && md == 0 {
            disp = c.i32()?;
        } else {
            base = Some(Base::Reg(b | rex_b));
        }
    } else if rm == 5 && md == 0 {
        disp = c.i32()?;
        if cx.mode == Mode::Long64 {
            base = Some(Base::Rip);
        }
    } else {
        base = Some(Base::Reg(rm | rex_b));
    }
    match md {
        1 => disp = c.i8()?,
        2 => disp = c.i32()?,
        _ => {}
    }
    let default_seg = match base {
        Some(Base::Reg(4 | 5)) => Seg::Ss,
        _ => Seg::Ds,
    };
    Ok(MemOperand {
        seg: cx.p.seg.unwrap_or(default_seg),
        seg_override: cx.p.seg.is_some(),
        base,
        index,
        scale,
        disp,
        addr_size,
    })
}

/// 16-bit addressing: BX/BP plus SI/DI, disp8/disp16.
fn mem16(c: &mut Cursor<'_>, cx: &Ctx, md: u8, rm: u8) -> Result<MemOperand, InsnError> {
    const BX: u8 = 3;
    const BP: u8 = 5;
    const SI: u8 = 6;
    const DI: u8 = 7;
    let (base, index) = match rm {
        0 => (Some(BX), Some(SI)),
        1 => (Some(BX), Some(DI)),
        2 => (Some(BP), Some(SI)),
        3 => (Some(BP), Some(DI)),
        4 => (Some(SI), None),
        5 => (Some(DI), None),
        6 if md == 0 => (None, None),
        6 => (Some(BP), None),
        _ => (Some(BX), None),
    };
    let disp = match md {
        0 if rm == 6 => c.i16()?,
        1 => c.i8()?,
        2 => c.i16()?,
        _ => 0,
    };
    let default_seg = if base == Some(BP) { Seg::Ss } else { Seg::Ds };
    Ok(MemOperand {
        seg: cx.p.seg.unwrap_or(default_seg),
        seg_override: cx.p.seg.is_some(),
        base: base.map(Base::Reg),
        index,
        scale: 1,
        disp,
        addr_size: AddrSize::Addr16,
    })
}

fn one_byte(c: &mut Cursor<'_>, cx: &Ctx) -> Result<Found, InsnError> {
    let op = c.u8()?;
    match op {
        0x0f => two_byte(c, cx),
        // With REX.B, 90 is `xchg r8, rax`.
        0x90 if cx.p.rex & REX_B != 0 => Err(c.unsupported(Some("xchg"))),
        0x90 if cx.p.f3() => plain(Kind::Pause, "pause"),
        0x90 => plain(Kind::Nop, "nop"),
        0x9b => plain(Kind::Fwait, "fwait"),
        0xcc => plain(Kind::Int3, "int3"),
        0xd8..=0xdf => x87(c, cx, op),
        0xc4 | 0xc5 if cx.mode == Mode::Long64 => Err(c.unsupported(Some("vex"))),
        0x62 if cx.mode == Mode::Long64 => Err(c.unsupported(Some("evex"))),
        _ => Err(c.unsupported(one_byte_name(op))),
    }
}

/// Names of one-byte opcodes the host emulator may hand over, for error messages.
fn one_byte_name(op: u8) -> Option<&'static str> {
    Some(match op {
        0x6c | 0x6d => "ins",
        0x6e | 0x6f => "outs",
        0x9c => "pushf",
        0x9d => "popf",
        0xa4 | 0xa5 => "movs",
        0xa6 | 0xa7 => "cmps",
        0xaa | 0xab => "stos",
        0xac | 0xad => "lods",
        0xae | 0xaf => "scas",
        0xc8 => "enter",
        0xc9 => "leave",
        0xcd => "int",
        0xce => "into",
        0xcf => "iret",
        0xd7 => "xlat",
        0xe4 | 0xe5 | 0xec | 0xed => "in",
        0xe6 | 0xe7 | 0xee | 0xef => "out",
        0xf1 => "int1",
        0xf4 => "hlt",
        0xfa => "cli",
        0xfb => "sti",
        _ => return None,
    })
}

fn x87(c: &mut Cursor<'_>, cx: &Ctx, op: u8) -> Result<Found, InsnError> {
    let m = modrm(c, cx)?;
    if m.is_mem() {
        match (op, m.reg) {
            (0xd9, 5) => with_rm(Kind::Fldcw, "fldcw", &m),
            (0xd9, 7) => with_rm(Kind::Fnstcw, "fnstcw", &m),
            (0xdd, 7) => with_rm(Kind::FnstswMem, "fnstsw", &m),
            (0xdf, 0) => with_rm(Kind::Fild16, "fild", &m),
            (0xdb, 0) => with_rm(Kind::Fild32, "fild", &m),
            (0xdf, 5) => with_rm(Kind::Fild64, "fild", &m),
            (0xd9, 0) | (0xdb, 5) | (0xdd, 0) => Err(c.unsupported(Some("fld"))),
            (0xd9, 2) | (0xdd, 2) => Err(c.unsupported(Some("fst"))),
            (0xd9, 3) | (0xdb, 7) | (0xdd, 3) => Err(c.unsupported(Some("fstp"))),
            (0xd9, 4) => Err(c.unsupported(Some("fldenv"))),
            (0xd9, 6) => Err(c.unsupported(Some("fnstenv"))),
            (0xdd, 4) => Err(c.unsupported(Some("frstor"))),
            (0xdd, 6) => Err(c.unsupported(Some("fnsave"))),
            _ => Err(c.unsupported(Some("x87"))),
        }
    } else {
        match (op, m.raw) {
            (0xdb, 0xe2) => plain(Kind::Fnclex, "fnclex"),
            (0xdb, 0xe3) => plain(Kind::Fninit, "fninit"),
            (0xdf, 0xe0) => plain(Kind::FnstswAx, "fnstsw"),
            _ => Err(c.unsupported(Some("x87"))),
        }
    }
}

fn two_byte(c: &mut Cursor<'_>, cx: &Ctx) -> Result<Found, InsnError> {
    let op = c.u8()?;
    let name = match op {
        0x00 => {
            let m = modrm(c, cx)?;
            const NAMES: [&str; 8] = ["sldt", "str", "lldt", "ltr", "verr", "verw", "", ""];
            NAMES.get(usize::from(m.reg)).copied().filter(|n| !n.is_empty())
        }
        0x01 => return group7(c, cx),
        0x05 => Some("syscall"),
        0x06 => Some("clts"),
        0x07 => Some("sysret"),
        0x08 => Some("invd"),
        0x09 => Some("wbinvd"),
        0x0b => return plain(Kind::Ud2, "ud2"),
        0x0d => {
            let m = modrm(c, cx)?;
            match (m.is_mem(), m.reg) {
                (true, 0) => return with_rm(Kind::Nop, "prefetch", &m),
                (true, 1) => return with_rm(Kind::Nop, "prefetchw", &m),
                (true, 2) => return with_rm(Kind::Nop, "prefetchwt1", &m),
                _ => None,
            }
        }
        0x18 => {
            let m = modrm(c, cx)?;
            match (m.is_mem(), m.reg) {
                (true, 0) => return with_rm(Kind::Nop, "prefetchnta", &m),
                (true, 1) => return with_rm(Kind::Nop, "prefetcht0", &m),
                (true, 2) => return with_rm(Kind::Nop, "prefetcht1", &m),
                (true, 3) => return with_rm(Kind::Nop, "prefetcht2", &m),
                _ => None,
            }
        }
        0x1e => {
            let m = modrm(c, cx)?;
            match (cx.p.f3(), m.raw) {
                (true, 0xfa) => return plain(Kind::Nop, "endbr64"),
                (true, 0xfb) => return plain(Kind::Nop, "endbr32"),
                (true, _) if !m.is_mem() && m.reg == 1 => Some("rdssp"),
                _ => None,
            }
        }
        0x1f => {
            let m = modrm(c, cx)?;
            if m.reg == 0 {
                return with_rm(Kind::Nop, "nop", &m);
            }
            None
        }
        0x20 | 0x22 => Some("mov cr"),
        0x21 | 0x23 => Some("mov dr"),
        0x30 => Some("wrmsr"),
        0x31 => Some("rdtsc"),
        0x32 => Some("rdmsr"),
        0x33 => Some("rdpmc"),
        0x34 => Some("sysenter"),
        0x35 => Some("sysexit"),
        0x38 => {
            let op3 = c.u8()?;
            match op3 {
                0x80 if cx.p.opsize => Some("invept"),
                0x81 if cx.p.opsize => Some("invvpid"),
                0x82 if cx.p.opsize => Some("invpcid"),
                0xf0 | 0xf1 if cx.p.f2() => Some("crc32"),
                0xf0 | 0xf1 => Some("movbe"),
                _ => None,
            }
        }
        0x77 => return plain(Kind::Emms, "emms"),
        0x78 => Some("vmread"),
        0x79 => Some("vmwrite"),
        0xa2 => Some("cpuid"),
        0xaa => Some("rsm"),
        0xae => return group15(c, cx),
        0xb0 | 0xb1 => Some("cmpxchg"),
        0xb8 if cx.p.f3() => {
            let m = modrm(c, cx)?;
            return with_reg_rm(Kind::Popcnt, "popcnt", &m);
        }
        0xb9 => Some("ud1"),
        0xbc => {
            let m = modrm(c, cx)?;
            return if cx.p.f3() && cx.opts.bmi1 {
                with_reg_rm(Kind::Tzcnt, "tzcnt", &m)
            } else {
                with_reg_rm(Kind::Bsf, "bsf", &m)
            };
        }
        0xbd => {
            let m = modrm(c, cx)?;
            return if cx.p.f3() && cx.opts.lzcnt {
                with_reg_rm(Kind::Lzcnt, "lzcnt", &m)
            } else {
                with_reg_rm(Kind::Bsr, "bsr", &m)
            };
        }
        0xc0 | 0xc1 => Some("xadd"),
        0xc7 => return group9(c, cx),
        0xff => Some("ud0"),
        _ => None,
    };
    Err(c.unsupported(name))
}

/// 0F 01: descriptor tables, SMAP, XCR0, TSC and friends.
fn group7(c: &mut Cursor<'_>, cx: &Ctx) -> Result<Found, InsnError> {
    let m = modrm(c, cx)?;
    let name = if m.is_mem() {
        const NAMES: [&str; 8] = ["sgdt", "sidt", "lgdt", "lidt", "smsw", "", "lmsw", "invlpg"];
        NAMES.get(usize::from(m.reg)).copied().filter(|n| !n.is_empty())
    } else {
        match m.raw {
            0xca => return plain(Kind::Clac, "clac"),
            0xcb => return plain(Kind::Stac, "stac"),
            0xc1 => Some("vmcall"),
            0xc2 => Some("vmlaunch"),
            0xc3 => Some("vmresume"),
            0xc4 => Some("vmxoff"),
            0xc8 => Some("monitor"),
            0xc9 => Some("mwait"),
            0xd0 => return plain(Kind::Xgetbv, "xgetbv"),
            0xd1 => return plain(Kind::Xsetbv, "xsetbv"),
            0xd5 => Some("xend"),
            0xd6 => Some("xtest"),
            0xd9 => Some("vmmcall"),
            0xe0..=0xe7 => Some("smsw"),
            0xee => Some("rdpkru"),
            0xef => Some("wrpkru"),
            0xf0..=0xf7 => Some("lmsw"),
            0xf8 => Some("swapgs"),
            0xf9 => Some("rdtscp"),
            0xfa => Some("monitorx"),
            0xfb => Some("mwaitx"),
            0xfc => Some("clzero"),
            _ => None,
        }
    };
    Err(c.unsupported(name))
}

/// 0F AE: FXSAVE/FXRSTOR, MXCSR, XSAVE family, fences, FS/GS base access.
fn group15(c: &mut Cursor<'_>, cx: &Ctx) -> Result<Found, InsnError> {
    let m = modrm(c, cx)?;
    let w = cx.rex_w();
    let p = &cx.p;
    let name = if !m.is_mem() {
        if p.f3() {
            const NAMES: [&str; 8] =
                ["rdfsbase", "rdgsbase", "wrfsbase", "wrgsbase", "ptwrite", "incssp", "umonitor", ""];
            NAMES.get(usize::from(m.reg)).copied().filter(|n| !n.is_empty())
        } else if p.f2() {
            (m.reg == 6).then_some("umwait")
        } else if p.opsize && m.reg == 6 {
            Some("tpause")
        } else {
            match m.reg {
                5 => return plain(Kind::Lfence, "lfence"),
                6 => return plain(Kind::Mfence, "mfence"),
                7 => return plain(Kind::Sfence, "sfence"),
                _ => None,
            }
        }
    } else if p.f3() {
        match m.reg {
            4 => Some("ptwrite"),
            6 => Some("clrssbsy"),
            _ => None,
        }
    } else if p.f2() {
        None
    } else if p.opsize && m.reg >= 6 {
        Some(if m.reg == 6 { "clwb" } else { "clflushopt" })
    } else {
        match (m.reg, w) {
            (0, false) => return with_rm(Kind::Fxsave, "fxsave", &m),
            (0, true) => return with_rm(Kind::Fxsave, "fxsave64", &m),
            (1, false) => return with_rm(Kind::Fxrstor, "fxrstor", &m),
            (1, true) => return with_rm(Kind::Fxrstor, "fxrstor64", &m),
            (2, _) => return with_rm(Kind::Ldmxcsr, "ldmxcsr", &m),
            (3, _) => return with_rm(Kind::Stmxcsr, "stmxcsr", &m),
            (4, false) => Some("xsave"),
            (4, true) => Some("xsave64"),
            (5, false) => Some("xrstor"),
            (5, true) => Some("xrstor64"),
            (6, false) => Some("xsaveopt"),
            (6, true) => Some("xsaveopt64"),
            _ => Some("clflush"),
        }
    };
    Err(c.unsupported(name))
}

/// 0F C7: CMPXCHG8B/16B, RDRAND/RDSEED, XSAVEC/XSAVES/XRSTORS, VMX pointers.
fn group9(c: &mut Cursor<'_>, cx: &Ctx) -> Result<Found, InsnError> {
    let m = modrm(c, cx)?;
    let w = cx.rex_w();
    let p = &cx.p;
    let name = match (m.is_mem(), m.reg) {
        // The register form is decoded too; executing it raises #UD as on hardware.
        (_, 1) if w => return with_rm(Kind::Cmpxchg16b, "cmpxchg16b", &m),
        (_, 1) => return with_rm(Kind::Cmpxchg8b, "cmpxchg8b", &m),
        (false, 6) => Some("rdrand"),
        (false, 7) if p.f3() => Some("rdpid"),
        (false, 7) => Some("rdseed"),
        (true, 3) => Some(if w { "xrstors64" } else { "xrstors" }),
        (true, 4) => Some(if w { "xsavec64" } else { "xsavec" }),
        (true, 5) => Some(if w { "xsaves64" } else { "xsaves" }),
        (true, 6) if p.opsize => Some("vmclear"),
        (true, 6) if p.f3() => Some("vmxon"),
        (true, 6) => Some("vmptrld"),
        (true, 7) => Some("vmptrst"),
        _ => None,
    };
    Err(c.unsupported(name))
}

const REG64: [&str; 16] =
    ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"];
const REG32: [&str; 16] = [
    "eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "r8d", "r9d", "r10d", "r11d", "r12d", "r13d", "r14d",
    "r15d",
];
const REG16: [&str; 16] =
    ["ax", "cx", "dx", "bx", "sp", "bp", "si", "di", "r8w", "r9w", "r10w", "r11w", "r12w", "r13w", "r14w", "r15w"];

fn reg_name(reg: u8, size: OpSize) -> &'static str {
    let table = match size {
        OpSize::Word => &REG16,
        OpSize::Dword => &REG32,
        OpSize::Qword => &REG64,
    };
    table.get(usize::from(reg)).copied().unwrap_or("?")
}

impl fmt::Display for MemOperand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let size = match self.addr_size {
            AddrSize::Addr16 => OpSize::Word,
            AddrSize::Addr32 => OpSize::Dword,
            AddrSize::Addr64 => OpSize::Qword,
        };
        f.write_str("[")?;
        if self.seg_override {
            write!(f, "{}:", self.seg.name())?;
        }
        let mut any = false;
        match self.base {
            Some(Base::Reg(r)) => {
                f.write_str(reg_name(r, size))?;
                any = true;
            }
            Some(Base::Rip) => {
                f.write_str(if size == OpSize::Qword { "rip" } else { "eip" })?;
                any = true;
            }
            None => {}
        }
        if let Some(i) = self.index {
            if any {
                f.write_str("+")?;
            }
            write!(f, "{}*{}", reg_name(i, size), self.scale)?;
            any = true;
        }
        if self.disp != 0 || !any {
            let sign = if self.disp < 0 {
                "-"
            } else if any {
                "+"
            } else {
                ""
            };
            write!(f, "{sign}{:#x}", self.disp.unsigned_abs())?;
        }
        f.write_str("]")
    }
}

impl fmt::Display for Decoded {
    /// Intel-style text, e.g. `popcnt rax, [rip+0x10]` or `lock cmpxchg16b [rdi]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lock {
            f.write_str("lock ")?;
        }
        f.write_str(self.mnemonic)?;
        let rm = |f: &mut fmt::Formatter<'_>, op: &Operand| match op {
            Operand::Reg(r) => f.write_str(reg_name(*r, self.op_size)),
            Operand::Mem(m) => write!(f, "{m}"),
        };
        match (self.kind, self.reg, &self.rm) {
            (Kind::FnstswAx, _, _) => f.write_str(" ax"),
            (_, Some(r), Some(op)) => {
                write!(f, " {}, ", reg_name(r, self.op_size))?;
                rm(f, op)
            }
            (_, None, Some(op)) => {
                f.write_str(" ")?;
                rm(f, op)
            }
            _ => Ok(()),
        }
    }
}
