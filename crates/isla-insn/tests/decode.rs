//! Decoder tests: lengths, mnemonics, operands and the text form, in all three modes, and the
//! errors for truncated, over-long and unsupported instructions.

use isla_insn::{
    decode, decode_with, AddrSize, Base, InsnError, Kind, MemOperand, Mode, OpSize, Operand, Options, Seg,
};

const L: Mode = Mode::Long64;

fn dec(bytes: &[u8], mode: Mode) -> isla_insn::Decoded {
    decode(bytes, mode).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"))
}

fn mem(seg: Seg, base: Option<Base>, index: Option<u8>, scale: u8, disp: i64) -> MemOperand {
    MemOperand { seg, seg_override: false, base, index, scale, disp, addr_size: AddrSize::Addr64 }
}

#[test]
fn popcnt_register_rex_w() {
    let d = dec(&[0xf3, 0x48, 0x0f, 0xb8, 0xc3], L);
    assert_eq!(d.len, 5);
    assert_eq!(d.mnemonic, "popcnt");
    assert_eq!(d.kind, Kind::Popcnt);
    assert_eq!(d.op_size, OpSize::Qword);
    assert_eq!(d.reg, Some(0));
    assert_eq!(d.rm, Some(Operand::Reg(3)));
    assert!(d.rex_w);
    assert!(!d.lock);
    assert_eq!(d.to_string(), "popcnt rax, rbx");
}

#[test]
fn popcnt_sib_rsp_base_defaults_to_ss() {
    let d = dec(&[0xf3, 0x0f, 0xb8, 0x04, 0x24], L);
    assert_eq!(d.len, 5);
    assert_eq!(d.op_size, OpSize::Dword);
    assert_eq!(d.rm, Some(Operand::Mem(mem(Seg::Ss, Some(Base::Reg(4)), None, 1, 0))));
    assert_eq!(d.to_string(), "popcnt eax, [rsp]");
}

#[test]
fn popcnt_rip_relative() {
    let d = dec(&[0xf3, 0x48, 0x0f, 0xb8, 0x05, 0x10, 0, 0, 0], L);
    assert_eq!(d.len, 9);
    assert_eq!(d.mem(), Some(&mem(Seg::Ds, Some(Base::Rip), None, 1, 0x10)));
    assert_eq!(d.to_string(), "popcnt rax, [rip+0x10]");
}

#[test]
fn popcnt_fs_override_absolute_sib() {
    // SIB with no base and no index: disp32 only.
    let d = dec(&[0x64, 0xf3, 0x0f, 0xb8, 0x04, 0x25, 0x00, 0x01, 0, 0], L);
    assert_eq!(d.len, 10);
    let m = d.mem().expect("memory operand");
    assert_eq!(m.seg, Seg::Fs);
    assert!(m.seg_override);
    assert_eq!(m.base, None);
    assert_eq!(m.index, None);
    assert_eq!(m.disp, 0x100);
    assert_eq!(d.to_string(), "popcnt eax, [fs:0x100]");
}

#[test]
fn popcnt_sib_index_scale_disp8_and_rex_x() {
    // 4a = REX.W|REX.X; SIB 8d: scale 4, index 1+8 (r9), base 5 (rbp, mod=01).
    let d = dec(&[0xf3, 0x4a, 0x0f, 0xb8, 0x44, 0x8d, 0xf8], L);
    assert_eq!(d.len, 7);
    assert_eq!(d.mem(), Some(&mem(Seg::Ss, Some(Base::Reg(5)), Some(9), 4, -8)));
    assert_eq!(d.to_string(), "popcnt rax, [rbp+r9*4-0x8]");
}

#[test]
fn sib_index_100_means_none_but_rex_x_makes_it_r12() {
    let d = dec(&[0xf3, 0x0f, 0xb8, 0x04, 0x20], L); // [rax], SIB index 100
    assert_eq!(d.mem().and_then(|m| m.index), None);
    let d = dec(&[0xf3, 0x42, 0x0f, 0xb8, 0x04, 0x20], L); // REX.X: [rax+r12*1]
    assert_eq!(d.mem().and_then(|m| m.index), Some(12));
    assert_eq!(d.to_string(), "popcnt eax, [rax+r12*1]");
}

#[test]
fn rex_r_and_rex_b_extend_registers() {
    let d = dec(&[0xf3, 0x4d, 0x0f, 0xb8, 0xc8], L);
    assert_eq!(d.reg, Some(9));
    assert_eq!(d.rm, Some(Operand::Reg(8)));
    assert_eq!(d.to_string(), "popcnt r9, r8");
    // REX.B on a base register: [r13+disp8] (mod=01 r/m=101 is not RIP-relative).
    let d = dec(&[0xf3, 0x41, 0x0f, 0xb8, 0x45, 0x08], L);
    assert_eq!(d.mem(), Some(&mem(Seg::Ds, Some(Base::Reg(13)), None, 1, 8)));
}

#[test]
fn disp32_with_base() {
    let d = dec(&[0xf3, 0x0f, 0xb8, 0x80, 0x00, 0x01, 0x00, 0x80], L);
    assert_eq!(d.len, 8);
    assert_eq!(d.mem(), Some(&mem(Seg::Ds, Some(Base::Reg(0)), None, 1, -0x7fff_ff00)));
}

#[test]
fn operand_size_prefix_and_rex_placement() {
    let d = dec(&[0x66, 0xf3, 0x0f, 0xb8, 0xc3], L);
    assert_eq!(d.op_size, OpSize::Word);
    assert_eq!(d.to_string(), "popcnt ax, bx");
    // REX.W wins over 66.
    let d = dec(&[0x66, 0xf3, 0x48, 0x0f, 0xb8, 0xc3], L);
    assert_eq!(d.op_size, OpSize::Qword);
    // A REX followed by a legacy prefix is ignored.
    let d = dec(&[0x48, 0xf3, 0x0f, 0xb8, 0xc3], L);
    assert_eq!(d.len, 5);
    assert_eq!(d.op_size, OpSize::Dword);
    assert!(!d.rex_w);
}

#[test]
fn address_size_prefix_in_long_mode() {
    let d = dec(&[0x67, 0xf3, 0x0f, 0xb8, 0x03], L);
    assert_eq!(d.mem().map(|m| m.addr_size), Some(AddrSize::Addr32));
    assert_eq!(d.to_string(), "popcnt eax, [ebx]");
    let d = dec(&[0x67, 0xf3, 0x0f, 0xb8, 0x05, 4, 0, 0, 0], L);
    assert_eq!(d.to_string(), "popcnt eax, [eip+0x4]");
}

#[test]
fn protected_mode_32bit_addressing() {
    let p = Mode::Protected32;
    // mod=00 r/m=101 is an absolute disp32 outside 64-bit mode.
    let d = dec(&[0xf3, 0x0f, 0xb8, 0x05, 0x00, 0x10, 0, 0], p);
    assert_eq!(d.len, 8);
    let m = d.mem().expect("memory operand");
    assert_eq!((m.base, m.disp, m.addr_size), (None, 0x1000, AddrSize::Addr32));
    assert_eq!(d.to_string(), "popcnt eax, [0x1000]");
    // 48 is `dec eax` here, not REX.W.
    let e = decode(&[0x48, 0xf3, 0x0f, 0xb8, 0xc3], p).expect_err("48 is an opcode");
    assert!(matches!(e, InsnError::Unsupported { mnemonic: None, .. }));
    // 66 selects 16-bit operands; 67 selects 16-bit addressing.
    assert_eq!(dec(&[0x66, 0xf3, 0x0f, 0xb8, 0xc3], p).op_size, OpSize::Word);
    let d = dec(&[0x67, 0xf3, 0x0f, 0xb8, 0x07], p);
    assert_eq!(d.mem().map(|m| m.addr_size), Some(AddrSize::Addr16));
}

#[test]
fn real_mode_16bit_addressing() {
    let r = Mode::Real16;
    let d = dec(&[0xf3, 0x0f, 0xb8, 0x07], r);
    assert_eq!(d.len, 4);
    assert_eq!(d.op_size, OpSize::Word);
    assert_eq!(d.to_string(), "popcnt ax, [bx]");
    let d = dec(&[0xf3, 0x0f, 0xb8, 0x46, 0xfe], r);
    let m = d.mem().expect("memory operand");
    assert_eq!((m.seg, m.base, m.disp), (Seg::Ss, Some(Base::Reg(5)), -2));
    let d = dec(&[0xf3, 0x0f, 0xb8, 0x06, 0x34, 0x12], r);
    assert_eq!(d.len, 6);
    assert_eq!(d.to_string(), "popcnt ax, [0x1234]");
    let d = dec(&[0xf3, 0x0f, 0xb8, 0x80, 0x00, 0x01], r);
    assert_eq!(d.to_string(), "popcnt ax, [bx+si*1+0x100]");
    // 66 and 67 switch to 32-bit operands and addressing.
    let d = dec(&[0x66, 0x67, 0xf3, 0x0f, 0xb8, 0x04, 0x24], r);
    assert_eq!(d.op_size, OpSize::Dword);
    assert_eq!(d.to_string(), "popcnt eax, [esp]");
}

#[test]
fn tzcnt_lzcnt_follow_options() {
    let none = Options::default();
    let both = Options { bmi1: true, lzcnt: true };
    assert_eq!(dec(&[0xf3, 0x0f, 0xbc, 0xc1], L).mnemonic, "tzcnt");
    assert_eq!(dec(&[0xf3, 0x0f, 0xbd, 0xc1], L).mnemonic, "lzcnt");
    let d = decode_with(&[0xf3, 0x0f, 0xbc, 0xc1], L, none).expect("decodes");
    assert_eq!((d.kind, d.mnemonic, d.len), (Kind::Bsf, "bsf", 4));
    let d = decode_with(&[0xf3, 0x0f, 0xbd, 0xc1], L, none).expect("decodes");
    assert_eq!((d.kind, d.mnemonic), (Kind::Bsr, "bsr"));
    let d = decode_with(&[0x0f, 0xbc, 0xc1], L, both).expect("decodes");
    assert_eq!(d.to_string(), "bsf eax, ecx");
    let d = decode_with(&[0x48, 0x0f, 0xbd, 0xc1], L, both).expect("decodes");
    assert_eq!(d.to_string(), "bsr rax, rcx");
}

#[test]
fn cmpxchg16b_and_8b() {
    let d = dec(&[0xf0, 0x48, 0x0f, 0xc7, 0x0f], L);
    assert_eq!(d.len, 5);
    assert_eq!(d.kind, Kind::Cmpxchg16b);
    assert!(d.lock && d.rex_w);
    assert_eq!(d.to_string(), "lock cmpxchg16b [rdi]");
    let d = dec(&[0xf0, 0x0f, 0xc7, 0x4e, 0x08], L);
    assert_eq!((d.kind, d.len), (Kind::Cmpxchg8b, 5));
    assert_eq!(d.to_string(), "lock cmpxchg8b [rsi+0x8]");
    // The register form decodes (and raises #UD when executed).
    let d = dec(&[0x48, 0x0f, 0xc7, 0xc8], L);
    assert_eq!((d.kind, d.rm), (Kind::Cmpxchg16b, Some(Operand::Reg(0))));
}

#[test]
fn x87_and_sse_control() {
    let cases: &[(&[u8], &str, Kind, usize)] = &[
        (&[0xdb, 0xe3], "fninit", Kind::Fninit, 2),
        (&[0x9b, 0xdb, 0xe3], "fwait", Kind::Fwait, 1),
        (&[0xdb, 0xe2], "fnclex", Kind::Fnclex, 2),
        (&[0xd9, 0x7c, 0x24, 0x04], "fnstcw", Kind::Fnstcw, 4),
        (&[0xd9, 0x6c, 0x24, 0x04], "fldcw", Kind::Fldcw, 4),
        (&[0xdd, 0x3f], "fnstsw", Kind::FnstswMem, 2),
        (&[0xdf, 0xe0], "fnstsw", Kind::FnstswAx, 2),
        (&[0x0f, 0xae, 0x54, 0x24, 0x08], "ldmxcsr", Kind::Ldmxcsr, 5),
        (&[0x0f, 0xae, 0x18], "stmxcsr", Kind::Stmxcsr, 3),
        (&[0x0f, 0xae, 0x07], "fxsave", Kind::Fxsave, 3),
        (&[0x48, 0x0f, 0xae, 0x07], "fxsave64", Kind::Fxsave, 4),
        (&[0x0f, 0xae, 0x0f], "fxrstor", Kind::Fxrstor, 3),
        (&[0x48, 0x0f, 0xae, 0x0f], "fxrstor64", Kind::Fxrstor, 4),
        (&[0x0f, 0x77], "emms", Kind::Emms, 2),
    ];
    for &(bytes, mnemonic, kind, len) in cases {
        let d = dec(bytes, L);
        assert_eq!((d.mnemonic, d.kind, d.len), (mnemonic, kind, len), "{bytes:02x?}");
    }
    assert_eq!(dec(&[0xdf, 0xe0], L).to_string(), "fnstsw ax");
    assert_eq!(dec(&[0x0f, 0xae, 0x54, 0x24, 0x08], L).to_string(), "ldmxcsr [rsp+0x8]");
    assert_eq!(dec(&[0x48, 0x0f, 0xae, 0x07], L).to_string(), "fxsave64 [rdi]");
}

#[test]
fn simple_instructions_fences_and_hints() {
    let cases: &[(&[u8], &str, Kind, usize)] = &[
        (&[0xcc], "int3", Kind::Int3, 1),
        (&[0x0f, 0x0b], "ud2", Kind::Ud2, 2),
        (&[0x0f, 0x01, 0xca], "clac", Kind::Clac, 3),
        (&[0x0f, 0x01, 0xcb], "stac", Kind::Stac, 3),
        (&[0x0f, 0xae, 0xe8], "lfence", Kind::Lfence, 3),
        (&[0x0f, 0xae, 0xf0], "mfence", Kind::Mfence, 3),
        (&[0x0f, 0xae, 0xf8], "sfence", Kind::Sfence, 3),
        (&[0xf3, 0x90], "pause", Kind::Pause, 2),
        (&[0x90], "nop", Kind::Nop, 1),
        (&[0x0f, 0x1f, 0x00], "nop", Kind::Nop, 3),
        (&[0x0f, 0x1f, 0x44, 0x00, 0x00], "nop", Kind::Nop, 5),
        (&[0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0], "nop", Kind::Nop, 10),
        (&[0xf3, 0x0f, 0x1e, 0xfa], "endbr64", Kind::Nop, 4),
        (&[0xf3, 0x0f, 0x1e, 0xfb], "endbr32", Kind::Nop, 4),
        (&[0x0f, 0x18, 0x08], "prefetcht0", Kind::Nop, 3),
        (&[0x0f, 0x0d, 0x08], "prefetchw", Kind::Nop, 3),
    ];
    for &(bytes, mnemonic, kind, len) in cases {
        let d = dec(bytes, L);
        assert_eq!((d.mnemonic, d.kind, d.len), (mnemonic, kind, len), "{bytes:02x?}");
    }
    // Trailing bytes are not part of the instruction.
    assert_eq!(dec(&[0xcc, 0x0f, 0x0b, 0x90], L).len, 1);
    // The lock prefix is reported (execution rejects it with #UD).
    assert!(dec(&[0xf0, 0xf3, 0x0f, 0xb8, 0xc3], L).lock);
}

fn unsupported(bytes: &[u8], mode: Mode) -> (Option<&'static str>, String) {
    match decode(bytes, mode) {
        Err(InsnError::Unsupported { mnemonic, bytes }) => (mnemonic, bytes),
        other => panic!("{bytes:02x?}: expected Unsupported, got {other:?}"),
    }
}

#[test]
fn recognised_but_unsupported_are_named() {
    let cases: &[(&[u8], &str)] = &[
        (&[0x0f, 0xae, 0x27], "xsave"),
        (&[0x48, 0x0f, 0xae, 0x27], "xsave64"),
        (&[0x0f, 0xae, 0x2f], "xrstor"),
        (&[0x0f, 0xae, 0x37], "xsaveopt"),
        (&[0x0f, 0xae, 0x3f], "clflush"),
        (&[0x0f, 0x01, 0xd5], "xend"),
        (&[0x0f, 0x01, 0xf9], "rdtscp"),
        (&[0x0f, 0xc7, 0xf0], "rdrand"),
        (&[0x0f, 0xc7, 0xf8], "rdseed"),
        (&[0x0f, 0xc7, 0x27], "xsavec"),
        (&[0xf3, 0x48, 0x0f, 0xae, 0xc0], "rdfsbase"),
        (&[0xf3, 0x0f, 0xae, 0xc8], "rdgsbase"),
        (&[0xf3, 0x0f, 0xae, 0xd0], "wrfsbase"),
        (&[0xf3, 0x0f, 0xae, 0xd8], "wrgsbase"),
        (&[0x66, 0x0f, 0x38, 0x82, 0x08], "invpcid"),
        (&[0x0f, 0xa2], "cpuid"),
        (&[0x0f, 0x01, 0x38], "invlpg"),
        (&[0xf4], "hlt"),
        (&[0xd9, 0xe8], "x87"),
        (&[0xc5, 0xf8, 0x77], "vex"),
    ];
    for &(bytes, name) in cases {
        let (mnemonic, hex) = unsupported(bytes, L);
        assert_eq!(mnemonic, Some(name), "{bytes:02x?}");
        assert_eq!(hex, isla_insn::hex(bytes));
    }
    let (m, hex) = unsupported(&[0x0f, 0x04, 0x11], L);
    assert_eq!((m, hex.as_str()), (None, "0f 04 11"));
    // 0F B8 without F3 is not POPCNT.
    assert_eq!(unsupported(&[0x0f, 0xb8, 0xc3], L).0, None);
    // F3 turns the fences into other instructions.
    assert_eq!(unsupported(&[0xf3, 0x0f, 0xae, 0xe8], L).0, Some("incssp"));
    let e = decode(&[0x0f, 0x01, 0xd5], L).expect_err("unsupported");
    assert_eq!(e.to_string(), "unsupported instruction xend (bytes: 0f 01 d5)");
}

#[test]
fn truncated_inputs() {
    let cases: &[&[u8]] = &[
        &[],
        &[0xf3],
        &[0xf3, 0x48],
        &[0x0f],
        &[0xf3, 0x0f, 0xb8],
        &[0xf3, 0x0f, 0xb8, 0x04],
        &[0xf3, 0x0f, 0xb8, 0x44, 0x24],
        &[0xf3, 0x0f, 0xb8, 0x80, 0x00, 0x01],
        &[0xf3, 0x48, 0x0f, 0xb8, 0x05, 0x10, 0x00, 0x00],
        &[0x0f, 0x01],
        &[0xdb],
        &[0x0f, 0x38],
    ];
    for &bytes in cases {
        match decode(bytes, L) {
            Err(InsnError::Truncated { bytes: hex }) => assert_eq!(hex, isla_insn::hex(bytes)),
            other => panic!("{bytes:02x?}: expected Truncated, got {other:?}"),
        }
    }
    assert!(matches!(decode(&[0xf3, 0x0f, 0xb8, 0x06, 0x34], Mode::Real16), Err(InsnError::Truncated { .. })));
}

#[test]
fn fifteen_byte_limit() {
    let mut bytes = vec![0x66u8; 14];
    bytes.push(0x90);
    let d = dec(&bytes, L);
    assert_eq!((d.mnemonic, d.len), ("nop", 15));

    let e = decode(&[0x66; 15], L).expect_err("no opcode in 15 bytes");
    assert!(matches!(e, InsnError::TooLong { .. }), "{e:?}");
    let e = decode(&[0x66; 40], L).expect_err("prefixes only");
    match e {
        InsnError::TooLong { bytes } => assert_eq!(bytes.split(' ').count(), 15),
        other => panic!("{other:?}"),
    }
    let mut bytes = vec![0x2e; 13];
    bytes.extend_from_slice(&[0x0f, 0x0b]);
    assert_eq!(dec(&bytes, L).len, 15);
    let mut bytes = vec![0x2e; 14];
    bytes.extend_from_slice(&[0x0f, 0x0b]);
    assert!(matches!(decode(&bytes, L), Err(InsnError::TooLong { .. })));
}
