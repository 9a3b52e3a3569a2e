//! Fuzz-style robustness test: thousands of pseudo-random byte strings (fixed-seed xorshift,
//! biased towards the prefixes and opcodes this crate handles) through `decode` in every mode and
//! through `emulate` against a `TestMachine`. Nothing may panic, and every success must be
//! consistent: a length within bounds, and RIP moved by exactly that length unless a fault was
//! injected.

mod common;

use common::TestMachine;
use isla_insn::{decode, decode_with, emulate_outcome, Mode, Options, MAX_INSN_LEN};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Starts that lead into the interesting parts of the decoder.
const STARTS: &[&[u8]] = &[
    &[],
    &[0x0f],
    &[0xf3, 0x0f, 0xb8],
    &[0xf3, 0x48, 0x0f, 0xb8],
    &[0xf3, 0x0f, 0xbc],
    &[0x0f, 0xbd],
    &[0xf0, 0x48, 0x0f, 0xc7],
    &[0x0f, 0xc7],
    &[0x0f, 0xae],
    &[0x48, 0x0f, 0xae],
    &[0x0f, 0x01],
    &[0xd9],
    &[0xdb],
    &[0xdd],
    &[0xdf],
    &[0x9b],
    &[0x64],
    &[0x67],
    &[0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66, 0x66],
    &[0x0f, 0x1f],
    &[0x0f, 0x38],
];

const PREFIXES: &[u8] =
    &[0x66, 0x67, 0xf0, 0xf2, 0xf3, 0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65, 0x40, 0x41, 0x44, 0x48, 0x4f];

fn random_bytes(rng: &mut XorShift) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..rng.below(4) {
        v.push(PREFIXES[rng.below(PREFIXES.len() as u64) as usize]);
    }
    v.extend_from_slice(STARTS[rng.below(STARTS.len() as u64) as usize]);
    let tail = rng.below(18);
    for _ in 0..tail {
        v.push(rng.next() as u8);
    }
    v
}

fn random_machine(rng: &mut XorShift) -> TestMachine {
    let mut m = match rng.below(3) {
        0 => TestMachine::long64(),
        1 => TestMachine::protected32(),
        _ => TestMachine::real16(),
    };
    let small = rng.below(2) == 0;
    let val = |rng: &mut XorShift| {
        if small {
            rng.below(0x1_0000)
        } else {
            rng.next()
        }
    };
    let r = &mut m.regs;
    for g in [
        &mut r.rax, &mut r.rbx, &mut r.rcx, &mut r.rdx, &mut r.rsi, &mut r.rdi, &mut r.rsp, &mut r.rbp, &mut r.r8,
        &mut r.r9, &mut r.r12, &mut r.r13,
    ] {
        *g = val(rng);
    }
    r.rip = val(rng);
    m.sregs.fs.base = val(rng);
    m.sregs.ds.base = rng.below(0x8000);
    m.sregs.ss.dpl = (rng.below(4)) as u8;
    m.sregs.cr0 ^= rng.below(16) & 0xe; // MP, EM, TS
    m.fpu.fsw = rng.next() as u16;
    for (i, b) in m.mem.iter_mut().enumerate().take(0x4000) {
        *b = (i as u8).wrapping_mul(31);
    }
    m
}

fn rip_mask(mode: Mode) -> u64 {
    match mode {
        Mode::Long64 => u64::MAX,
        Mode::Protected32 => 0xffff_ffff,
        Mode::Real16 => 0xffff,
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut decoded = 0usize;
    let mut executed = 0usize;
    for _ in 0..6000 {
        let bytes = random_bytes(&mut rng);
        for mode in [Mode::Long64, Mode::Protected32, Mode::Real16] {
            if let Ok(d) = decode(&bytes, mode) {
                assert!(d.len >= 1 && d.len <= MAX_INSN_LEN, "{bytes:02x?}");
                assert!(d.len <= bytes.len(), "{bytes:02x?}");
                let _ = d.to_string();
                decoded += 1;
            }
            let _ = decode_with(&bytes, mode, Options::default());
        }

        let mut m = random_machine(&mut rng);
        let before = m.regs;
        let mode = isla_insn::mode_of(&m.sregs);
        let opts = Options { bmi1: rng.below(2) == 0, lzcnt: rng.below(2) == 0 };
        if let Ok(o) = emulate_outcome(&mut m, &bytes, opts) {
            executed += 1;
            let d = decode_with(&bytes, mode, opts).expect("emulate decoded it");
            assert_eq!(d.mnemonic, o.mnemonic);
            assert_eq!(d.len, o.len);
            match o.exception {
                // #BP is a trap: RIP moves past int3.
                Some((3, None)) | None => assert_eq!(
                    m.regs.rip,
                    before.rip.wrapping_add(o.len as u64) & rip_mask(mode),
                    "{bytes:02x?} ({})",
                    o.mnemonic
                ),
                Some(_) => assert_eq!(m.regs, before, "{bytes:02x?} faulted"),
            }
            assert!(m.injected.len() <= 1);
        } else {
            assert_eq!(m.regs.rip, before.rip, "{bytes:02x?}: error must not move RIP");
        }
    }
    eprintln!("decoded {decoded}, executed {executed}");
    // The bias towards known opcodes must actually reach the executors.
    assert!(decoded > 500, "only {decoded} decoded");
    assert!(executed > 200, "only {executed} executed");
}

#[test]
fn every_prefix_of_a_valid_instruction_is_truncated() {
    let valid: &[&[u8]] = &[
        &[0x64, 0xf3, 0x48, 0x0f, 0xb8, 0x84, 0x8d, 0x00, 0x01, 0x00, 0x00],
        &[0xf0, 0x48, 0x0f, 0xc7, 0x4c, 0x24, 0x10],
        &[0x48, 0x0f, 0xae, 0x05, 0x00, 0x10, 0x00, 0x00],
        &[0xd9, 0xbc, 0x24, 0x00, 0x01, 0x00, 0x00],
    ];
    for &bytes in valid {
        let d = decode(bytes, Mode::Long64).expect("valid");
        assert_eq!(d.len, bytes.len());
        for cut in 0..bytes.len() {
            assert!(
                matches!(decode(&bytes[..cut], Mode::Long64), Err(isla_insn::InsnError::Truncated { .. })),
                "{:02x?}",
                &bytes[..cut]
            );
        }
    }
}
