//! A vCPU's x87 and SSE state as the instruction fallback reads and writes it: through
//! `KVM_GET_XSAVE`/`KVM_SET_XSAVE`, never `KVM_GET_FPU`/`KVM_SET_FPU`.
//!
//! KVM keeps a guest's FPU state in the host's XSAVE format. Where the host saves it with
//! XSAVEOPT or XSAVES (this project's machines do), a component in its initial state is not
//! written: the header's XSTATE_BV bit is cleared and the component's bytes keep what an earlier
//! save left there. `KVM_GET_FPU` copies the legacy area without looking at XSTATE_BV, so a guest
//! whose XMM registers are all zero is reported with some earlier context's registers; and
//! `KVM_SET_FPU` writes the legacy area without setting the bit, so the next XRSTOR ignores what
//! was written and loads zeros. The guest kernel's FXSAVE and FXRSTOR, which the fallback emulates
//! on hosts that run the guest kernel in an emulator (`docs/nested-kvm.md`), are its task
//! switches' save and restore of user registers: either fault hands a process registers that are
//! not its own. `KVM_GET_XSAVE` gives initial values for components whose bit is clear, and a
//! header whose bits are set makes `KVM_SET_XSAVE` load the area as written.
//!
//! This is written here rather than taken from a crate: it is a few dozen lines of the x86 FXSAVE
//! layout (the same one `isla_insn::fxsave` reads and writes for the guest) on top of the
//! `kvm_xsave` that `kvm-bindings` already defines.

use kvm_bindings::{kvm_fpu, kvm_xsave};

/// XSTATE_BV bits for the components kept in the legacy area.
const XFEATURE_FP: u64 = 1;
const XFEATURE_SSE: u64 = 1 << 1;
/// Byte offset of XSTATE_BV (the XSAVE header follows the 512-byte legacy area).
const XSTATE_BV: usize = 512;
/// Byte offsets in the legacy (FXSAVE) area.
const FCW: usize = 0;
const FSW: usize = 2;
const FTW: usize = 4;
const FOP: usize = 6;
const FIP: usize = 8;
const FDP: usize = 16;
const MXCSR: usize = 24;
const ST0: usize = 32;
const XMM0: usize = 160;
/// x87 control word after FNINIT.
const FCW_INIT: u16 = 0x37f;

fn bytes(xs: &kvm_xsave) -> [u8; 4096] {
    let mut b = [0u8; 4096];
    for (chunk, word) in b.chunks_exact_mut(4).zip(xs.region.iter()) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    b
}

fn store(b: &[u8; 4096], xs: &mut kvm_xsave) {
    for (word, chunk) in xs.region.iter_mut().zip(b.chunks_exact(4)) {
        *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
}

fn le<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

/// The x87 and SSE registers in `xs` (a `KVM_GET_XSAVE` result). Components whose XSTATE_BV bit
/// is clear read as their initial values, whatever the area holds.
pub fn fpu_from_xsave(xs: &kvm_xsave) -> kvm_fpu {
    let b = bytes(xs);
    let bv = u64::from_le_bytes(le(&b, XSTATE_BV));
    let mut fpu = kvm_fpu { mxcsr: u32::from_le_bytes(le(&b, MXCSR)), ..Default::default() };
    if bv & XFEATURE_FP != 0 {
        fpu.fcw = u16::from_le_bytes(le(&b, FCW));
        fpu.fsw = u16::from_le_bytes(le(&b, FSW));
        fpu.ftwx = b[FTW];
        fpu.last_opcode = u16::from_le_bytes(le(&b, FOP));
        fpu.last_ip = u64::from_le_bytes(le(&b, FIP));
        fpu.last_dp = u64::from_le_bytes(le(&b, FDP));
        for (i, st) in fpu.fpr.iter_mut().enumerate() {
            *st = le(&b, ST0 + 16 * i);
        }
    } else {
        fpu.fcw = FCW_INIT;
    }
    if bv & XFEATURE_SSE != 0 {
        for (i, xmm) in fpu.xmm.iter_mut().enumerate() {
            *xmm = le(&b, XMM0 + 16 * i);
        }
    }
    fpu
}

/// Writes the x87 and SSE registers of `fpu` into `xs` (a `KVM_GET_XSAVE` result, to be given to
/// `KVM_SET_XSAVE`) and marks both components present, so that the host loads them as written.
/// Other components and MXCSR_MASK are left as they are.
pub fn fpu_into_xsave(fpu: &kvm_fpu, xs: &mut kvm_xsave) {
    let mut b = bytes(xs);
    b[FCW..FCW + 2].copy_from_slice(&fpu.fcw.to_le_bytes());
    b[FSW..FSW + 2].copy_from_slice(&fpu.fsw.to_le_bytes());
    b[FTW] = fpu.ftwx;
    b[FTW + 1] = 0;
    b[FOP..FOP + 2].copy_from_slice(&fpu.last_opcode.to_le_bytes());
    b[FIP..FIP + 8].copy_from_slice(&fpu.last_ip.to_le_bytes());
    b[FDP..FDP + 8].copy_from_slice(&fpu.last_dp.to_le_bytes());
    b[MXCSR..MXCSR + 4].copy_from_slice(&fpu.mxcsr.to_le_bytes());
    for (i, st) in fpu.fpr.iter().enumerate() {
        b[ST0 + 16 * i..ST0 + 16 * (i + 1)].copy_from_slice(st);
    }
    for (i, xmm) in fpu.xmm.iter().enumerate() {
        b[XMM0 + 16 * i..XMM0 + 16 * (i + 1)].copy_from_slice(xmm);
    }
    let bv = u64::from_le_bytes(le(&b, XSTATE_BV)) | XFEATURE_FP | XFEATURE_SSE;
    b[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    store(&b, xs);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_bv(bv: u64) -> kvm_xsave {
        let mut xs = kvm_xsave::default();
        let mut b = bytes(&xs);
        b[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
        // What an earlier save left behind: non-zero everywhere in the legacy area.
        for (i, v) in b[..XSTATE_BV].iter_mut().enumerate() {
            *v = (i % 251) as u8 | 1;
        }
        b[MXCSR..MXCSR + 4].copy_from_slice(&0x1f80u32.to_le_bytes());
        store(&b, &mut xs);
        xs
    }

    #[test]
    fn components_not_in_use_read_as_their_initial_values_not_the_stale_area() {
        let fpu = fpu_from_xsave(&with_bv(0));
        assert_eq!(fpu.xmm, [[0u8; 16]; 16]);
        assert_eq!(fpu.fpr, [[0u8; 16]; 8]);
        assert_eq!((fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_ip), (FCW_INIT, 0, 0, 0));
        assert_eq!(fpu.mxcsr, 0x1f80);
        let sse_only = fpu_from_xsave(&with_bv(XFEATURE_SSE));
        assert_ne!(sse_only.xmm[3], [0u8; 16]);
        assert_eq!(sse_only.fcw, FCW_INIT);
    }

    #[test]
    fn written_registers_come_back_and_are_marked_present() {
        let mut xs = with_bv(0);
        let mut fpu = kvm_fpu { fcw: 0x27f, fsw: 0x20, ftwx: 0x81, mxcsr: 0x1fa0, ..Default::default() };
        fpu.last_ip = 0xdead_beef;
        fpu.fpr[7] = [7; 16];
        fpu.xmm[0] = [0x5a; 16];
        fpu.xmm[15] = *b"0123456789abcdef";
        fpu_into_xsave(&fpu, &mut xs);
        let b = bytes(&xs);
        assert_eq!(u64::from_le_bytes(le(&b, XSTATE_BV)), XFEATURE_FP | XFEATURE_SSE);
        let back = fpu_from_xsave(&xs);
        assert_eq!((back.fcw, back.fsw, back.ftwx, back.mxcsr), (0x27f, 0x20, 0x81, 0x1fa0));
        assert_eq!(back.last_ip, 0xdead_beef);
        assert_eq!(back.fpr, fpu.fpr);
        assert_eq!(back.xmm, fpu.xmm);
        // Beyond the legacy area and its header word nothing changed.
        assert_eq!(b[XSTATE_BV + 8..], bytes(&with_bv(0))[XSTATE_BV + 8..]);
    }

    #[test]
    fn other_components_bits_are_kept() {
        let mut xs = with_bv(1 << 2);
        fpu_into_xsave(&kvm_fpu::default(), &mut xs);
        let bv = u64::from_le_bytes(le(&bytes(&xs), XSTATE_BV));
        assert_eq!(bv, 1 << 2 | XFEATURE_FP | XFEATURE_SSE);
    }
}
