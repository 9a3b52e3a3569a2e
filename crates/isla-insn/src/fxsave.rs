//! The 512-byte FXSAVE area, built from and parsed into `kvm_fpu`.
//!
//! Layout (byte offsets): 0 FCW, 2 FSW, 4 abridged FTW, 6 FOP, 8 FPU IP, 16 FPU data pointer,
//! 24 MXCSR, 28 MXCSR_MASK, 32 ST0..ST7/MM0..MM7 (16 bytes each, 10 used), 160 XMM0..XMM15.
//! With REX.W the IP and data pointer are 64-bit offsets; without it they are 32-bit offsets
//! followed by a 16-bit selector, which is stored as zero (as CPUs that deprecate FCS/FDS do) and
//! ignored on restore. Outside 64-bit mode only XMM0..XMM7 take part. Bytes past the last
//! register used are neither written nor read: 464..511 belong to software, and the rest is
//! reserved.

use crate::kvm_fpu;

/// Size of the FXSAVE area.
pub const FXSAVE_AREA_SIZE: usize = 512;

/// The MXCSR bits the fallback accepts (and reports as MXCSR_MASK): all of 0..15, DAZ included.
pub const MXCSR_MASK: u32 = 0xffff;

const OFF_FCW: usize = 0;
const OFF_FSW: usize = 2;
const OFF_FTW: usize = 4;
const OFF_FOP: usize = 6;
const OFF_FIP: usize = 8;
const OFF_FDP: usize = 16;
const OFF_MXCSR: usize = 24;
const OFF_MXCSR_MASK: usize = 28;
const OFF_ST: usize = 32;
const OFF_XMM: usize = 160;
/// Bytes of an x87 register image that hold the 80-bit value.
const ST_BYTES: usize = 10;

/// How an FXSAVE/FXRSTOR instruction lays out the area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Form {
    /// REX.W: 64-bit FPU IP and data pointer.
    pub wide_pointers: bool,
    /// XMM registers saved: 16 in 64-bit mode, else 8.
    pub xmm_regs: usize,
}

impl Form {
    /// Number of leading bytes of the area the instruction accesses.
    pub fn used_len(self) -> usize {
        OFF_XMM + 16 * self.xmm_regs.min(16)
    }
}

/// Bytes `off..off+n` of `area`, or an empty slice if out of range (never with the constants
/// used here, but the code stays panic-free).
fn field(area: &[u8], off: usize, n: usize) -> &[u8] {
    area.get(off..off.saturating_add(n)).unwrap_or(&[])
}

fn put(area: &mut [u8], off: usize, data: &[u8]) {
    if let Some(dst) = area.get_mut(off..off.saturating_add(data.len())) {
        dst.copy_from_slice(data);
    }
}

fn get_u16(area: &[u8], off: usize) -> u16 {
    let mut b = [0u8; 2];
    b.copy_from_slice(field(area, off, 2).get(..2).unwrap_or(&[0, 0]));
    u16::from_le_bytes(b)
}

fn get_u32(area: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(src) = field(area, off, 4).get(..4) {
        b.copy_from_slice(src);
    }
    u32::from_le_bytes(b)
}

fn get_u64(area: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(src) = field(area, off, 8).get(..8) {
        b.copy_from_slice(src);
    }
    u64::from_le_bytes(b)
}

/// Builds the area FXSAVE stores; only the first `form.used_len()` bytes are meaningful.
pub(crate) fn save(fpu: &kvm_fpu, form: Form) -> [u8; FXSAVE_AREA_SIZE] {
    let mut a = [0u8; FXSAVE_AREA_SIZE];
    put(&mut a, OFF_FCW, &fpu.fcw.to_le_bytes());
    put(&mut a, OFF_FSW, &fpu.fsw.to_le_bytes());
    put(&mut a, OFF_FTW, &[fpu.ftwx]);
    put(&mut a, OFF_FOP, &(fpu.last_opcode & 0x7ff).to_le_bytes());
    if form.wide_pointers {
        put(&mut a, OFF_FIP, &fpu.last_ip.to_le_bytes());
        put(&mut a, OFF_FDP, &fpu.last_dp.to_le_bytes());
    } else {
        // 32-bit offsets; the selector halves stay zero.
        put(&mut a, OFF_FIP, &(fpu.last_ip as u32).to_le_bytes());
        put(&mut a, OFF_FDP, &(fpu.last_dp as u32).to_le_bytes());
    }
    put(&mut a, OFF_MXCSR, &fpu.mxcsr.to_le_bytes());
    put(&mut a, OFF_MXCSR_MASK, &MXCSR_MASK.to_le_bytes());
    for (i, st) in fpu.fpr.iter().enumerate() {
        put(&mut a, OFF_ST + 16 * i, st.get(..ST_BYTES).unwrap_or(&[]));
    }
    for (i, x) in fpu.xmm.iter().take(form.xmm_regs).enumerate() {
        put(&mut a, OFF_XMM + 16 * i, x);
    }
    a
}

/// Why an area cannot be loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RestoreError {
    /// MXCSR has bits outside [`MXCSR_MASK`] set (#GP(0) on hardware).
    ReservedMxcsr(u32),
}

/// Applies the first `form.used_len()` bytes of `area` (it may be that short) to `fpu`.
/// Fields FXRSTOR does not load (the XMM registers it skips, `pad*`) keep their values.
pub(crate) fn restore(area: &[u8], form: Form, fpu: &mut kvm_fpu) -> Result<(), RestoreError> {
    let mxcsr = get_u32(area, OFF_MXCSR);
    if mxcsr & !MXCSR_MASK != 0 {
        return Err(RestoreError::ReservedMxcsr(mxcsr));
    }
    fpu.fcw = get_u16(area, OFF_FCW);
    fpu.fsw = get_u16(area, OFF_FSW);
    fpu.ftwx = field(area, OFF_FTW, 1).first().copied().unwrap_or(0);
    fpu.last_opcode = get_u16(area, OFF_FOP) & 0x7ff;
    if form.wide_pointers {
        fpu.last_ip = get_u64(area, OFF_FIP);
        fpu.last_dp = get_u64(area, OFF_FDP);
    } else {
        fpu.last_ip = u64::from(get_u32(area, OFF_FIP));
        fpu.last_dp = u64::from(get_u32(area, OFF_FDP));
    }
    fpu.mxcsr = mxcsr;
    for (i, st) in fpu.fpr.iter_mut().enumerate() {
        let src = field(area, OFF_ST + 16 * i, ST_BYTES);
        *st = [0; 16];
        if let Some(dst) = st.get_mut(..src.len()) {
            dst.copy_from_slice(src);
        }
    }
    for (i, x) in fpu.xmm.iter_mut().take(form.xmm_regs).enumerate() {
        let src = field(area, OFF_XMM + 16 * i, 16);
        if let Some(dst) = x.get_mut(..src.len()) {
            dst.copy_from_slice(src);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG_WIDE: Form = Form { wide_pointers: true, xmm_regs: 16 };

    fn sample() -> kvm_fpu {
        let mut fpu = kvm_fpu {
            fcw: 0x027f,
            fsw: 0x3800,
            ftwx: 0x81,
            last_opcode: 0x0123,
            last_ip: 0x1122_3344_5566_7788,
            last_dp: 0x99aa_bbcc_ddee_ff00,
            mxcsr: 0x1fa0,
            ..Default::default()
        };
        for (i, st) in fpu.fpr.iter_mut().enumerate() {
            for (j, b) in st.iter_mut().enumerate().take(ST_BYTES) {
                *b = (0x10 * i + j) as u8;
            }
        }
        for (i, x) in fpu.xmm.iter_mut().enumerate() {
            *x = [0xa0 + i as u8; 16];
        }
        fpu
    }

    #[test]
    fn layout_offsets() {
        let a = save(&sample(), LONG_WIDE);
        assert_eq!(&a[0..2], &[0x7f, 0x02]);
        assert_eq!(&a[2..4], &[0x00, 0x38]);
        assert_eq!(a[4], 0x81);
        assert_eq!(a[5], 0);
        assert_eq!(&a[6..8], &[0x23, 0x01]);
        assert_eq!(&a[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&a[16..24], &0x99aa_bbcc_ddee_ff00u64.to_le_bytes());
        assert_eq!(&a[24..28], &0x1fa0u32.to_le_bytes());
        assert_eq!(&a[28..32], &0xffffu32.to_le_bytes());
        // ST3: ten value bytes, six zero bytes.
        assert_eq!(a[32 + 48], 0x30);
        assert_eq!(a[32 + 48 + 9], 0x39);
        assert_eq!(&a[32 + 48 + 10..32 + 64], &[0; 6]);
        assert_eq!(&a[160..176], &[0xa0; 16]);
        assert_eq!(&a[400..416], &[0xaf; 16]);
        assert!(a[416..].iter().all(|&b| b == 0));
    }

    #[test]
    fn narrow_form_truncates_pointers_and_xmm() {
        let form = Form { wide_pointers: false, xmm_regs: 8 };
        assert_eq!(form.used_len(), 288);
        let a = save(&sample(), form);
        assert_eq!(&a[8..16], &[0x88, 0x77, 0x66, 0x55, 0, 0, 0, 0]);
        assert_eq!(&a[16..24], &[0x00, 0xff, 0xee, 0xdd, 0, 0, 0, 0]);
        assert_eq!(&a[272..288], &[0xa7; 16]);
        assert!(a[288..].iter().all(|&b| b == 0));

        let mut back = kvm_fpu::default();
        restore(&a[..form.used_len()], form, &mut back).expect("valid area");
        assert_eq!(back.last_ip, 0x5566_7788);
        assert_eq!(back.last_dp, 0xddee_ff00);
        assert_eq!(back.xmm[7], [0xa7; 16]);
        assert_eq!(back.xmm[8], [0; 16], "xmm8 untouched outside 64-bit mode");
    }

    #[test]
    fn round_trip_wide() {
        let fpu = sample();
        let a = save(&fpu, LONG_WIDE);
        let mut back = kvm_fpu::default();
        restore(&a, LONG_WIDE, &mut back).expect("valid area");
        assert_eq!(back, fpu);
    }

    #[test]
    fn reserved_mxcsr_rejected_and_nothing_changed() {
        let mut a = save(&sample(), LONG_WIDE);
        a[26] = 1; // MXCSR bit 16
        let mut fpu = kvm_fpu::default();
        assert_eq!(restore(&a, LONG_WIDE, &mut fpu), Err(RestoreError::ReservedMxcsr(0x1_1fa0)));
        assert_eq!(fpu, kvm_fpu::default());
    }

    #[test]
    fn short_area_does_not_panic() {
        let mut fpu = sample();
        restore(&[0x7f, 0x03], LONG_WIDE, &mut fpu).expect("mxcsr reads as zero");
        assert_eq!(fpu.fcw, 0x037f);
        assert_eq!(fpu.xmm[0], [0xa0; 16]);
    }
}
