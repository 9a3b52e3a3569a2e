//! Execution tests against `TestMachine`: register, flag, memory and FPU effects, RIP advance,
//! and the exceptions injected.

mod common;

use common::*;
use isla_insn::{emulate, emulate_outcome, kvm_fpu, InsnError, Options, Stats};

const ALL: Options = Options { bmi1: true, lzcnt: true };
const NONE: Options = Options { bmi1: false, lzcnt: false };

fn run(m: &mut TestMachine, bytes: &[u8]) -> &'static str {
    emulate(m, bytes, ALL).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"))
}

/// Asserts that `bytes` raised `vector` (with `code`) as a fault: RIP and registers untouched.
fn assert_fault(m: &mut TestMachine, bytes: &[u8], vector: u8, code: Option<u32>) {
    let before = m.regs;
    let o = emulate_outcome(m, bytes, ALL).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"));
    assert_eq!(o.exception, Some((vector, code)), "{bytes:02x?}");
    assert_eq!(m.injected.last(), Some(&(vector, code)));
    assert_eq!(m.regs, before, "a fault leaves the registers alone");
}

// ---- popcnt / tzcnt / lzcnt / bsf / bsr ----

#[test]
fn popcnt_reg64_sets_result_and_clears_flags() {
    let mut m = TestMachine::long64();
    m.regs.rbx = 0xf0f0_0000_0000_0001;
    m.regs.rax = 0x1234;
    m.regs.rflags = FLAGS_FIXED | CF | PF | AF | SF | OF | ZF;
    assert_eq!(run(&mut m, &[0xf3, 0x48, 0x0f, 0xb8, 0xc3]), "popcnt");
    assert_eq!(m.regs.rax, 9);
    assert_eq!(m.regs.rflags, FLAGS_FIXED, "CF/PF/AF/SF/OF/ZF all clear");
    assert_eq!(m.regs.rip, 0x1005);
    assert!(m.injected.is_empty());
}

#[test]
fn popcnt_zero_source_sets_zf() {
    let mut m = TestMachine::long64();
    m.regs.rbx = 0;
    m.regs.rax = 77;
    m.regs.rflags = FLAGS_FIXED | CF;
    run(&mut m, &[0xf3, 0x48, 0x0f, 0xb8, 0xc3]);
    assert_eq!(m.regs.rax, 0);
    assert_eq!(m.regs.rflags, FLAGS_FIXED | ZF);
}

#[test]
fn popcnt_mem32_via_rsp_zero_extends() {
    let mut m = TestMachine::long64();
    m.regs.rax = 0xdead_beef_ffff_ffff;
    m.poke(0x8000, &[0x01, 0x00, 0x00, 0x80, 0xff, 0xff, 0xff, 0xff]);
    run(&mut m, &[0xf3, 0x0f, 0xb8, 0x04, 0x24]);
    assert_eq!(m.regs.rax, 2, "only the dword is counted, upper half cleared");
    assert_eq!(m.regs.rip, 0x1005);
}

#[test]
fn popcnt_16bit_keeps_upper_bits() {
    let mut m = TestMachine::long64();
    m.regs.rax = 0xaaaa_bbbb_cccc_dddd;
    m.regs.rbx = 0xffff_ffff_ffff_00ff;
    run(&mut m, &[0x66, 0xf3, 0x0f, 0xb8, 0xc3]);
    assert_eq!(m.regs.rax, 0xaaaa_bbbb_cccc_0008);
}

#[test]
fn popcnt_rip_relative_reads_next_rip_plus_disp() {
    let mut m = TestMachine::long64();
    let bytes = [0xf3, 0x48, 0x0f, 0xb8, 0x05, 0x10, 0x00, 0x00, 0x00];
    // 0x1000 + 9 + 0x10
    m.poke(0x1019, &u64::MAX.to_le_bytes());
    run(&mut m, &bytes);
    assert_eq!(m.regs.rax, 64);
    assert_eq!(m.regs.rip, 0x1009);
}

#[test]
fn popcnt_fs_and_gs_override_add_segment_base() {
    let mut m = TestMachine::long64();
    m.sregs.fs.base = 0x4000;
    m.sregs.gs.base = 0x5000;
    m.sregs.ds.base = 0x9999_0000; // ignored in 64-bit mode
    m.poke(0x4100, &0x7u32.to_le_bytes());
    m.poke(0x5100, &0xffu32.to_le_bytes());
    m.poke(0x100, &0x1u32.to_le_bytes());
    run(&mut m, &[0x64, 0xf3, 0x0f, 0xb8, 0x04, 0x25, 0x00, 0x01, 0x00, 0x00]);
    assert_eq!(m.regs.rax, 3);
    assert_eq!(m.regs.rip, 0x100a);
    run(&mut m, &[0x65, 0xf3, 0x0f, 0xb8, 0x04, 0x25, 0x00, 0x01, 0x00, 0x00]);
    assert_eq!(m.regs.rax, 8);
    run(&mut m, &[0x3e, 0xf3, 0x0f, 0xb8, 0x04, 0x25, 0x00, 0x01, 0x00, 0x00]);
    assert_eq!(m.regs.rax, 1, "DS override has no base in 64-bit mode");
}

#[test]
fn popcnt_sib_index_scale_and_negative_disp() {
    let mut m = TestMachine::long64();
    m.regs.rbp = 0x2000;
    m.regs.r9 = 0x10;
    // [rbp + r9*4 - 8] = 0x2038
    m.poke(0x2038, &0x0000_0000_0000_0f0fu64.to_le_bytes());
    run(&mut m, &[0xf3, 0x4a, 0x0f, 0xb8, 0x44, 0x8d, 0xf8]);
    assert_eq!(m.regs.rax, 8);
    assert_eq!(m.regs.rip, 0x1007);
}

#[test]
fn popcnt_extended_registers() {
    let mut m = TestMachine::long64();
    m.regs.r8 = 0b1011;
    m.regs.r9 = u64::MAX;
    run(&mut m, &[0xf3, 0x4d, 0x0f, 0xb8, 0xc8]);
    assert_eq!(m.regs.r9, 3);
    assert_eq!(m.regs.r8, 0b1011);
}

#[test]
fn tzcnt_semantics() {
    let mut m = TestMachine::long64();
    m.regs.rcx = 0;
    m.regs.rflags = FLAGS_FIXED | ZF;
    run(&mut m, &[0xf3, 0x48, 0x0f, 0xbc, 0xc1]);
    assert_eq!(m.regs.rax, 64);
    assert_eq!(m.regs.rflags & (CF | ZF), CF);

    m.regs.rcx = 0x100;
    run(&mut m, &[0xf3, 0x0f, 0xbc, 0xc1]);
    assert_eq!(m.regs.rax, 8);
    assert_eq!(m.regs.rflags & (CF | ZF), 0);

    m.regs.rcx = 1;
    run(&mut m, &[0xf3, 0x0f, 0xbc, 0xc1]);
    assert_eq!(m.regs.rax, 0);
    assert_eq!(m.regs.rflags & (CF | ZF), ZF);

    m.regs.rcx = 0xffff_0000; // low 16 bits zero
    m.regs.rax = 0x1111_2222_3333_4444;
    run(&mut m, &[0x66, 0xf3, 0x0f, 0xbc, 0xc1]);
    assert_eq!(m.regs.rax, 0x1111_2222_3333_0010);
    assert_eq!(m.regs.rflags & (CF | ZF), CF);
}

#[test]
fn lzcnt_semantics() {
    let mut m = TestMachine::long64();
    m.regs.rcx = 0x1000;
    run(&mut m, &[0xf3, 0x0f, 0xbd, 0xc1]);
    assert_eq!(m.regs.rax, 19);
    assert_eq!(m.regs.rflags & (CF | ZF), 0);

    m.regs.rcx = 0x1000;
    run(&mut m, &[0xf3, 0x48, 0x0f, 0xbd, 0xc1]);
    assert_eq!(m.regs.rax, 51);

    m.regs.rcx = 0xffff_0000;
    run(&mut m, &[0x66, 0xf3, 0x0f, 0xbd, 0xc1]);
    assert_eq!(m.regs.rax & 0xffff, 16);
    assert_eq!(m.regs.rflags & (CF | ZF), CF);

    m.regs.rcx = 0x8000_0000;
    run(&mut m, &[0xf3, 0x0f, 0xbd, 0xc1]);
    assert_eq!(m.regs.rax, 0);
    assert_eq!(m.regs.rflags & (CF | ZF), ZF);
}

#[test]
fn bsf_bsr_without_bmi1_lzcnt() {
    let mut m = TestMachine::long64();
    m.regs.rcx = 0x0000_1010;
    // F3 0F BC on a CPU without BMI1 is BSF.
    assert_eq!(emulate(&mut m, &[0xf3, 0x0f, 0xbc, 0xc1], NONE).ok(), Some("bsf"));
    assert_eq!(m.regs.rax, 4);
    assert_eq!(m.regs.rflags & ZF, 0);
    assert_eq!(emulate(&mut m, &[0xf3, 0x0f, 0xbd, 0xc1], NONE).ok(), Some("bsr"));
    assert_eq!(m.regs.rax, 12);
    assert_eq!(m.regs.rip, 0x1008);

    // Zero source: ZF set, destination unchanged (all 64 bits).
    m.regs.rcx = 0;
    m.regs.rax = 0xdead_beef_cafe_f00d;
    emulate(&mut m, &[0x0f, 0xbc, 0xc1], ALL).expect("bsf");
    assert_eq!(m.regs.rax, 0xdead_beef_cafe_f00d);
    assert_eq!(m.regs.rflags & ZF, ZF);
    emulate(&mut m, &[0x0f, 0xbd, 0xc1], ALL).expect("bsr");
    assert_eq!(m.regs.rax, 0xdead_beef_cafe_f00d);
    assert_eq!(m.regs.rflags & ZF, ZF);

    m.regs.rcx = 1 << 40;
    emulate(&mut m, &[0x48, 0x0f, 0xbd, 0xc1], ALL).expect("bsr");
    assert_eq!(m.regs.rax, 40);
    assert_eq!(m.regs.rflags & ZF, 0);
}

// ---- cmpxchg16b / cmpxchg8b ----

const CMPXCHG16B_RDI: [u8; 5] = [0xf0, 0x48, 0x0f, 0xc7, 0x0f];

#[test]
fn cmpxchg16b_success_stores_rcx_rbx() {
    let mut m = TestMachine::long64();
    m.regs.rdi = 0x3000;
    m.poke(0x3000, &0x1111u64.to_le_bytes());
    m.poke(0x3008, &0x2222u64.to_le_bytes());
    m.regs.rax = 0x1111;
    m.regs.rdx = 0x2222;
    m.regs.rbx = 0xaaaa;
    m.regs.rcx = 0xbbbb;
    assert_eq!(run(&mut m, &CMPXCHG16B_RDI), "cmpxchg16b");
    assert_eq!(m.peek_u64(0x3000), 0xaaaa);
    assert_eq!(m.peek_u64(0x3008), 0xbbbb);
    assert_eq!(m.regs.rflags & ZF, ZF);
    assert_eq!((m.regs.rax, m.regs.rdx), (0x1111, 0x2222));
    assert_eq!(m.regs.rip, 0x1005);
    assert_eq!(m.cmpxchg16_calls, vec![0x3000]);
}

#[test]
fn cmpxchg16b_failure_loads_rdx_rax() {
    let mut m = TestMachine::long64();
    m.regs.rdi = 0x3000;
    m.poke(0x3000, &0x5555u64.to_le_bytes());
    m.poke(0x3008, &0x6666u64.to_le_bytes());
    m.regs.rax = 0x1111;
    m.regs.rdx = 0x2222;
    m.regs.rbx = 0xaaaa;
    m.regs.rcx = 0xbbbb;
    m.regs.rflags = FLAGS_FIXED | ZF;
    run(&mut m, &CMPXCHG16B_RDI);
    assert_eq!((m.regs.rax, m.regs.rdx), (0x5555, 0x6666));
    assert_eq!(m.regs.rflags & ZF, 0);
    assert_eq!(m.peek_u64(0x3000), 0x5555, "memory unchanged");
    assert_eq!(m.peek_u64(0x3008), 0x6666);
    assert_eq!(m.regs.rip, 0x1005);
}

#[test]
fn cmpxchg16b_misaligned_raises_gp0() {
    let mut m = TestMachine::long64();
    m.regs.rdi = 0x3008;
    assert_fault(&mut m, &CMPXCHG16B_RDI, 13, Some(0));
    assert!(m.cmpxchg16_calls.is_empty());
}

#[test]
fn cmpxchg16b_register_form_raises_ud() {
    let mut m = TestMachine::long64();
    assert_fault(&mut m, &[0x48, 0x0f, 0xc7, 0xc8], 6, None);
}

#[test]
fn cmpxchg8b_inside_block_is_atomic_via_cmpxchg16() {
    let mut m = TestMachine::long64();
    m.regs.rsi = 0x3000;
    m.poke(0x3000, &0x0102_0304_0506_0708u64.to_le_bytes());
    m.poke(0x3008, &0x1111_2222_3333_4444u64.to_le_bytes());
    m.regs.rax = 0xffff_ffff_3333_4444; // only EAX/EDX count
    m.regs.rdx = 0x1111_2222;
    m.regs.rbx = 0xdddd_dddd;
    m.regs.rcx = 0xcccc_cccc;
    // lock cmpxchg8b [rsi+8]
    assert_eq!(run(&mut m, &[0xf0, 0x0f, 0xc7, 0x4e, 0x08]), "cmpxchg8b");
    assert_eq!(m.peek_u64(0x3008), 0xcccc_cccc_dddd_dddd);
    assert_eq!(m.peek_u64(0x3000), 0x0102_0304_0506_0708, "neighbour kept");
    assert_eq!(m.regs.rflags & ZF, ZF);
    assert_eq!(m.cmpxchg16_calls, vec![0x3000]);
    assert_eq!(m.regs.rip, 0x1005);

    // Now the comparison fails: EDX:EAX get the value, zero-extended.
    run(&mut m, &[0xf0, 0x0f, 0xc7, 0x4e, 0x08]);
    assert_eq!(m.regs.rflags & ZF, 0);
    assert_eq!(m.regs.rax, 0xdddd_dddd);
    assert_eq!(m.regs.rdx, 0xcccc_cccc);
    assert_eq!(m.peek_u64(0x3008), 0xcccc_cccc_dddd_dddd);
    assert_eq!(m.cmpxchg16_calls.len(), 1, "no exchange on mismatch");
}

#[test]
fn cmpxchg8b_across_block_boundary_uses_plain_access() {
    let mut m = TestMachine::long64();
    m.regs.rsi = 0x300c;
    m.poke(0x300c, &0x0000_0002_0000_0001u64.to_le_bytes());
    m.regs.rax = 1;
    m.regs.rdx = 2;
    m.regs.rbx = 3;
    m.regs.rcx = 4;
    run(&mut m, &[0x0f, 0xc7, 0x0e]);
    assert_eq!(m.peek_u64(0x300c), 0x0000_0004_0000_0003);
    assert_eq!(m.regs.rflags & ZF, ZF);
    assert!(m.cmpxchg16_calls.is_empty());
    assert_eq!(m.regs.rip, 0x1003);
}

#[test]
fn cmpxchg8b_in_protected_mode_with_segment_base() {
    let mut m = TestMachine::protected32();
    m.sregs.ds.base = 0x2000;
    m.regs.rdi = 0x100;
    m.poke(0x2100, &7u64.to_le_bytes());
    m.regs.rax = 7;
    m.regs.rbx = 9;
    run(&mut m, &[0xf0, 0x0f, 0xc7, 0x0f]);
    assert_eq!(m.peek_u64(0x2100), 9);
    assert_eq!(m.regs.rflags & ZF, ZF);
    assert_eq!(m.cmpxchg16_calls, vec![0x2100]);
}

#[test]
fn lock_on_other_instructions_raises_ud() {
    let mut m = TestMachine::long64();
    m.regs.rbx = 0xff;
    assert_fault(&mut m, &[0xf0, 0xf3, 0x48, 0x0f, 0xb8, 0xc3], 6, None);
    assert_fault(&mut m, &[0xf0, 0x0f, 0x01, 0xca], 6, None);
    assert_fault(&mut m, &[0xf0, 0x90], 6, None);
    assert_eq!(m.regs.rax, 0);
}

// ---- int3, ud2, clac, stac ----

#[test]
fn int3_advances_then_raises_bp() {
    let mut m = TestMachine::long64();
    let o = emulate_outcome(&mut m, &[0xcc, 0x90], ALL).expect("int3");
    assert_eq!(o.mnemonic, "int3");
    assert_eq!(o.len, 1);
    assert_eq!(o.exception, Some((3, None)));
    assert_eq!(m.regs.rip, 0x1001);
    assert_eq!(m.injected, vec![(3, None)]);
}

#[test]
fn ud2_raises_ud_without_moving_rip() {
    let mut m = TestMachine::long64();
    assert_eq!(run(&mut m, &[0x0f, 0x0b]), "ud2");
    assert_eq!(m.regs.rip, 0x1000);
    assert_eq!(m.injected, vec![(6, None)]);
    assert_eq!(m.set_regs_calls, 0);
}

#[test]
fn clac_stac_toggle_ac() {
    let mut m = TestMachine::long64();
    m.regs.rflags = FLAGS_FIXED | CF;
    assert_eq!(run(&mut m, &[0x0f, 0x01, 0xcb]), "stac");
    assert_eq!(m.regs.rflags, FLAGS_FIXED | CF | AC);
    assert_eq!(m.regs.rip, 0x1003);
    assert_eq!(run(&mut m, &[0x0f, 0x01, 0xca]), "clac");
    assert_eq!(m.regs.rflags, FLAGS_FIXED | CF);
    assert_eq!(m.regs.rip, 0x1006);
}

#[test]
fn clac_in_user_mode_raises_ud() {
    let mut m = TestMachine::long64();
    m.sregs.ss.dpl = 3;
    m.regs.rflags = FLAGS_FIXED | AC;
    assert_fault(&mut m, &[0x0f, 0x01, 0xca], 6, None);
    assert_eq!(m.regs.rflags & AC, AC);
}

// ---- x87 control ----

fn dirty_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x0040,
        fsw: 0xb8ff,
        ftwx: 0xff,
        last_opcode: 0x1d9,
        last_ip: 0x1234,
        last_dp: 0x5678,
        mxcsr: 0x1f80,
        fpr: [[0x11; 16]; 8],
        ..Default::default()
    }
}

#[test]
fn fninit_resets_x87_state() {
    let mut m = TestMachine::long64();
    m.fpu = dirty_fpu();
    assert_eq!(run(&mut m, &[0xdb, 0xe3]), "fninit");
    assert_eq!(m.fpu.fcw, 0x037f);
    assert_eq!(m.fpu.fsw, 0);
    assert_eq!(m.fpu.ftwx, 0);
    assert_eq!(m.fpu.last_opcode, 0);
    assert_eq!(m.fpu.last_ip, 0);
    assert_eq!(m.fpu.last_dp, 0);
    assert_eq!(m.fpu.mxcsr, 0x1f80, "MXCSR is not x87 state");
    assert_eq!(m.fpu.fpr, [[0x11; 16]; 8], "registers keep their contents");
    assert_eq!(m.regs.rip, 0x1002);
}

#[test]
fn fwait_then_fninit_are_two_steps() {
    let mut m = TestMachine::long64();
    m.fpu = dirty_fpu();
    m.fpu.fsw = 0x3800; // no pending exception
    let bytes = [0x9b, 0xdb, 0xe3];
    assert_eq!(run(&mut m, &bytes), "fwait");
    assert_eq!(m.regs.rip, 0x1001);
    assert_eq!(m.fpu.fcw, 0x0040, "fwait alone changes nothing");
    assert_eq!(m.set_fpu_calls, 0);
    assert_eq!(run(&mut m, &bytes[1..]), "fninit");
    assert_eq!(m.regs.rip, 0x1003);
    assert_eq!(m.fpu.fcw, 0x037f);
}

#[test]
fn fwait_with_pending_exception_raises_mf() {
    let mut m = TestMachine::long64();
    m.fpu.fsw = 0x8081;
    assert_fault(&mut m, &[0x9b], 16, None);
}

#[test]
fn fnclex_clears_exception_bits() {
    let mut m = TestMachine::long64();
    m.fpu.fsw = 0xb8ff; // busy, TOP=7, C3..C0 partially, ES, SF, all flags
    assert_eq!(run(&mut m, &[0xdb, 0xe2]), "fnclex");
    assert_eq!(m.fpu.fsw, 0x3800);
    assert_eq!(m.regs.rip, 0x1002);
}

#[test]
fn fnstcw_fldcw_roundtrip() {
    let mut m = TestMachine::long64();
    m.fpu.fcw = 0x027f;
    // fnstcw [rsp+4]
    assert_eq!(run(&mut m, &[0xd9, 0x7c, 0x24, 0x04]), "fnstcw");
    assert_eq!(m.peek_u16(0x8004), 0x027f);
    assert_eq!(m.regs.rip, 0x1004);
    // fldcw [rsp+6]
    m.poke(0x8006, &0x0c7fu16.to_le_bytes());
    assert_eq!(run(&mut m, &[0xd9, 0x6c, 0x24, 0x06]), "fldcw");
    assert_eq!(m.fpu.fcw, 0x0c7f);
    assert_eq!(m.regs.rip, 0x1008);
}

#[test]
fn fldcw_unmasking_a_pending_exception_sets_es() {
    let mut m = TestMachine::long64();
    m.fpu.fsw = 0x0004; // ZE pending, masked
    m.poke(0x8000, &0x037bu16.to_le_bytes());
    run(&mut m, &[0xd9, 0x2c, 0x24]);
    assert_eq!(m.fpu.fcw, 0x037b);
    assert_eq!(m.fpu.fsw, 0x8084);
}

#[test]
fn fnstsw_memory_and_ax() {
    let mut m = TestMachine::long64();
    m.fpu.fsw = 0x4123;
    m.regs.rdi = 0x2000;
    m.regs.rax = 0x1111_2222_3333_4444;
    assert_eq!(run(&mut m, &[0xdd, 0x3f]), "fnstsw");
    assert_eq!(m.peek_u16(0x2000), 0x4123);
    assert_eq!(m.regs.rip, 0x1002);
    assert_eq!(run(&mut m, &[0xdf, 0xe0]), "fnstsw");
    assert_eq!(m.regs.rax, 0x1111_2222_3333_4123);
    assert_eq!(m.regs.rip, 0x1004);
}

#[test]
fn x87_with_cr0_ts_raises_nm() {
    let mut m = TestMachine::long64();
    m.sregs.cr0 |= CR0_TS;
    m.fpu = dirty_fpu();
    assert_fault(&mut m, &[0xdb, 0xe3], 7, None);
    assert_eq!(m.fpu.fcw, 0x0040);
    assert_fault(&mut m, &[0x0f, 0xae, 0x07], 7, None);
    // FWAIT faults only when MP is set too.
    assert_fault(&mut m, &[0x9b], 7, None);
    m.sregs.cr0 &= !CR0_MP;
    m.fpu.fsw = 0;
    assert_eq!(run(&mut m, &[0x9b]), "fwait");
}

// ---- MXCSR ----

#[test]
fn ldmxcsr_loads_and_stmxcsr_stores() {
    let mut m = TestMachine::long64();
    m.poke(0x8008, &0x7fc0u32.to_le_bytes());
    assert_eq!(run(&mut m, &[0x0f, 0xae, 0x54, 0x24, 0x08]), "ldmxcsr");
    assert_eq!(m.fpu.mxcsr, 0x7fc0);
    assert_eq!(m.regs.rip, 0x1005);
    m.regs.rax = 0x2000;
    assert_eq!(run(&mut m, &[0x0f, 0xae, 0x18]), "stmxcsr");
    assert_eq!(m.peek_u32(0x2000), 0x7fc0);
    assert_eq!(m.regs.rip, 0x1008);
}

#[test]
fn ldmxcsr_reserved_bits_raise_gp0() {
    let mut m = TestMachine::long64();
    m.poke(0x8008, &0x0001_1f80u32.to_le_bytes());
    assert_fault(&mut m, &[0x0f, 0xae, 0x54, 0x24, 0x08], 13, Some(0));
    assert_eq!(m.fpu.mxcsr, 0x1f80);
    assert_eq!(m.set_fpu_calls, 0);
}

#[test]
fn ldmxcsr_without_osfxsr_raises_ud() {
    let mut m = TestMachine::long64();
    m.sregs.cr4 &= !CR4_OSFXSR;
    assert_fault(&mut m, &[0x0f, 0xae, 0x54, 0x24, 0x08], 6, None);
    m.sregs.cr4 |= CR4_OSFXSR;
    m.sregs.cr0 |= CR0_TS;
    assert_fault(&mut m, &[0x0f, 0xae, 0x1c, 0x24], 7, None);
}

// ---- FXSAVE / FXRSTOR ----

fn sample_fpu() -> kvm_fpu {
    let mut fpu = kvm_fpu {
        fcw: 0x027f,
        fsw: 0x3820,
        ftwx: 0x83,
        last_opcode: 0x05d9,
        last_ip: 0xffff_8000_0010_2030,
        last_dp: 0xffff_8800_0000_4000,
        mxcsr: 0x1fa0,
        ..Default::default()
    };
    for (i, st) in fpu.fpr.iter_mut().enumerate() {
        st[..10].copy_from_slice(&[i as u8 + 1; 10]);
    }
    for (i, x) in fpu.xmm.iter_mut().enumerate() {
        *x = [0x40 + i as u8; 16];
    }
    fpu
}

#[test]
fn fxsave64_writes_standard_layout() {
    let mut m = TestMachine::long64();
    m.fpu = sample_fpu();
    m.regs.rdi = 0x4000;
    m.poke(0x4000, &[0xee; 512]);
    assert_eq!(run(&mut m, &[0x48, 0x0f, 0xae, 0x07]), "fxsave64");
    assert_eq!(m.regs.rip, 0x1004);
    assert_eq!(m.peek_u16(0x4000), 0x027f);
    assert_eq!(m.peek_u16(0x4002), 0x3820);
    assert_eq!(m.peek(0x4004, 2), vec![0x83, 0x00]);
    assert_eq!(m.peek_u16(0x4006), 0x05d9);
    assert_eq!(m.peek_u64(0x4008), 0xffff_8000_0010_2030);
    assert_eq!(m.peek_u64(0x4010), 0xffff_8800_0000_4000);
    assert_eq!(m.peek_u32(0x4018), 0x1fa0);
    assert_eq!(m.peek_u32(0x401c), 0xffff, "MXCSR_MASK");
    // ST2 at 32 + 2*16: ten value bytes, then zeros.
    assert_eq!(m.peek(0x4040, 16), [&[3u8; 10][..], &[0; 6]].concat());
    assert_eq!(m.peek(0x40a0, 16), vec![0x40; 16], "XMM0 at 160");
    assert_eq!(m.peek(0x4190, 16), vec![0x4f; 16], "XMM15 at 400");
    assert_eq!(m.peek(0x41a0, 96), vec![0xee; 96], "bytes 416..511 untouched");
}

#[test]
fn fxsave_without_rex_w_uses_32bit_pointers() {
    let mut m = TestMachine::long64();
    m.fpu = sample_fpu();
    m.regs.rdi = 0x4000;
    assert_eq!(run(&mut m, &[0x0f, 0xae, 0x07]), "fxsave");
    assert_eq!(m.peek_u32(0x4008), 0x0010_2030);
    assert_eq!(m.peek_u32(0x400c), 0, "FCS and reserved");
    assert_eq!(m.peek_u32(0x4010), 0x0000_4000);
    assert_eq!(m.peek_u32(0x4014), 0, "FDS and reserved");
    assert_eq!(m.peek(0x4190, 16), vec![0x4f; 16], "all 16 XMM in 64-bit mode");
}

#[test]
fn fxsave_in_protected_mode_saves_eight_xmm() {
    let mut m = TestMachine::protected32();
    m.fpu = sample_fpu();
    m.regs.rdi = 0x4000;
    m.poke(0x4000, &[0xee; 512]);
    run(&mut m, &[0x0f, 0xae, 0x07]);
    assert_eq!(m.peek(0x4110, 16), vec![0x47; 16], "XMM7 at 272");
    assert_eq!(m.peek(0x4120, 16), vec![0xee; 16], "XMM8 slot untouched");
    assert_eq!(m.regs.rip, 0x1003);
}

#[test]
fn fxsave_misaligned_raises_gp0() {
    let mut m = TestMachine::long64();
    m.regs.rdi = 0x4008;
    assert_fault(&mut m, &[0x0f, 0xae, 0x07], 13, Some(0));
    assert_eq!(m.peek(0x4000, 512), vec![0; 512]);
    m.regs.rdi = 0x4004;
    assert_fault(&mut m, &[0x48, 0x0f, 0xae, 0x0f], 13, Some(0));
}

#[test]
fn fxsave64_fxrstor64_roundtrip() {
    let mut m = TestMachine::long64();
    let original = sample_fpu();
    m.fpu = original;
    m.regs.rdi = 0x4000;
    run(&mut m, &[0x48, 0x0f, 0xae, 0x07]);
    m.fpu = dirty_fpu();
    assert_eq!(run(&mut m, &[0x48, 0x0f, 0xae, 0x0f]), "fxrstor64");
    assert_eq!(m.fpu, original);
    assert_eq!(m.regs.rip, 0x1008);
}

#[test]
fn fxrstor_loads_hand_built_area() {
    let mut m = TestMachine::long64();
    let mut area = [0u8; 512];
    area[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
    area[2..4].copy_from_slice(&0x0100u16.to_le_bytes());
    area[4] = 0x01;
    area[8..12].copy_from_slice(&0xc000_1000u32.to_le_bytes());
    area[12..14].copy_from_slice(&0x0023u16.to_le_bytes()); // FCS, ignored
    area[24..28].copy_from_slice(&0x9fc0u32.to_le_bytes());
    area[32..42].copy_from_slice(&[0x5a; 10]);
    area[42..48].copy_from_slice(&[0xa5; 6]); // reserved bytes of ST0
    area[160 + 16 * 3..160 + 16 * 4].copy_from_slice(&[0x33; 16]);
    m.poke(0x5000, &area);
    m.regs.rbx = 0x5000;
    assert_eq!(run(&mut m, &[0x0f, 0xae, 0x0b]), "fxrstor");
    assert_eq!(m.fpu.fcw, 0x037f);
    assert_eq!(m.fpu.fsw, 0x0100);
    assert_eq!(m.fpu.ftwx, 0x01);
    assert_eq!(m.fpu.last_ip, 0xc000_1000);
    assert_eq!(m.fpu.mxcsr, 0x9fc0);
    assert_eq!(m.fpu.fpr[0], [&[0x5a; 10][..], &[0; 6]].concat()[..]);
    assert_eq!(m.fpu.xmm[3], [0x33; 16]);
    assert_eq!(m.fpu.xmm[15], [0; 16]);
}

#[test]
fn fxrstor_reserved_mxcsr_raises_gp0_and_keeps_state() {
    let mut m = TestMachine::long64();
    m.fpu = sample_fpu();
    let mut area = [0u8; 512];
    area[24..28].copy_from_slice(&0x8000_1f80u32.to_le_bytes());
    m.poke(0x5000, &area);
    m.regs.rbx = 0x5000;
    assert_fault(&mut m, &[0x0f, 0xae, 0x0b], 13, Some(0));
    assert_eq!(m.fpu, sample_fpu());
}

#[test]
fn emms_empties_tag_word() {
    let mut m = TestMachine::long64();
    m.fpu.ftwx = 0xff;
    assert_eq!(run(&mut m, &[0x0f, 0x77]), "emms");
    assert_eq!(m.fpu.ftwx, 0);
    assert_eq!(m.regs.rip, 0x1002);
    m.sregs.cr0 |= CR0_EM;
    assert_fault(&mut m, &[0x0f, 0x77], 6, None);
}

// ---- fences and hints ----

#[test]
fn fences_and_hints_only_advance_rip() {
    let cases: &[(&[u8], &str)] = &[
        (&[0x0f, 0xae, 0xe8], "lfence"),
        (&[0x0f, 0xae, 0xf0], "mfence"),
        (&[0x0f, 0xae, 0xf8], "sfence"),
        (&[0xf3, 0x90], "pause"),
        (&[0x90], "nop"),
        (&[0x0f, 0x1f, 0x44, 0x00, 0x00], "nop"),
        (&[0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00], "nop"),
        (&[0xf3, 0x0f, 0x1e, 0xfa], "endbr64"),
        (&[0x0f, 0x18, 0x0c, 0x25, 0xf0, 0xff, 0xff, 0x7f], "prefetcht0"),
    ];
    for &(bytes, mnemonic) in cases {
        let mut m = TestMachine::long64();
        m.regs.rax = 0xffff_ffff_ffff_fff0; // nop [rax+...] must not touch memory
        let mut expected = m.regs;
        expected.rip += bytes.len() as u64;
        let fpu = m.fpu;
        assert_eq!(run(&mut m, bytes), mnemonic);
        assert_eq!(m.regs, expected, "{mnemonic}");
        assert_eq!(m.fpu, fpu);
        assert!(m.injected.is_empty());
        assert_eq!(m.mem, vec![0; MEM_SIZE]);
    }
}

// ---- modes ----

#[test]
fn protected_mode_segment_bases_and_eip_wrap() {
    let mut m = TestMachine::protected32();
    m.sregs.ds.base = 0x1000;
    m.sregs.ss.base = 0x3000;
    m.regs.rbx = 0x200;
    m.regs.rsp = 0x100;
    m.poke(0x1200, &0xffu32.to_le_bytes());
    m.poke(0x3100, &0x3u32.to_le_bytes());
    run(&mut m, &[0xf3, 0x0f, 0xb8, 0x03]); // [ebx] via DS
    assert_eq!(m.regs.rax, 8);
    run(&mut m, &[0xf3, 0x0f, 0xb8, 0x04, 0x24]); // [esp] via SS
    assert_eq!(m.regs.rax, 2);
    m.regs.rip = 0xffff_fffe;
    run(&mut m, &[0x0f, 0xae, 0xe8, 0x00]);
    assert_eq!(m.regs.rip, 0x1, "EIP wraps at 4 GiB");
}

#[test]
fn real_mode_16bit_addressing() {
    let mut m = TestMachine::real16();
    m.sregs.ds.base = 0x2000;
    m.regs.rbx = 0x0010;
    m.regs.rsi = 0xfff0; // bx+si wraps to 0x0000
    m.regs.rax = 0xffff_0000;
    m.poke(0x2010, &0x0f0fu16.to_le_bytes());
    m.poke(0x2000, &0x0001u16.to_le_bytes());
    run(&mut m, &[0xf3, 0x0f, 0xb8, 0x07]); // popcnt ax, [bx]
    assert_eq!(m.regs.rax, 0xffff_0008);
    run(&mut m, &[0xf3, 0x0f, 0xb8, 0x00]); // popcnt ax, [bx+si]
    assert_eq!(m.regs.rax, 0xffff_0001);
    assert_eq!(m.regs.rip, 0x1008);
    // ldmxcsr with a 32-bit address in real mode (67 prefix).
    m.sregs.ss.base = 0x3000;
    m.regs.rsp = 0x20;
    m.poke(0x3020, &0x1f00u32.to_le_bytes());
    run(&mut m, &[0x67, 0x0f, 0xae, 0x14, 0x24]);
    assert_eq!(m.fpu.mxcsr, 0x1f00);
}

// ---- errors ----

#[test]
fn memory_errors_leave_rip() {
    let mut m = TestMachine::long64();
    m.regs.rbx = 0x10_0000;
    let e = emulate(&mut m, &[0xf3, 0x0f, 0xb8, 0x03], ALL).expect_err("out of range");
    assert!(matches!(e, InsnError::Memory { gva: 0x10_0000, .. }), "{e:?}");
    assert_eq!(m.regs.rip, 0x1000);
    assert_eq!(m.set_regs_calls, 0);
}

#[test]
fn unsupported_leaves_state() {
    let mut m = TestMachine::long64();
    let e = emulate(&mut m, &[0x0f, 0x01, 0xd5, 0x90], ALL).expect_err("xend");
    match &e {
        InsnError::Unsupported { mnemonic, bytes } => {
            assert_eq!(*mnemonic, Some("xend"));
            assert_eq!(bytes, "0f 01 d5 90");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.regs.rip, 0x1000);
    assert!(m.injected.is_empty());
    assert!(matches!(emulate(&mut m, &[], ALL), Err(InsnError::Truncated { .. })));
}

#[test]
fn stats_count_handled_mnemonics() {
    let mut m = TestMachine::long64();
    let mut stats = Stats::default();
    let program: &[&[u8]] = &[
        &[0xf3, 0x48, 0x0f, 0xb8, 0xc3],
        &[0x0f, 0x01, 0xcb],
        &[0xf3, 0x48, 0x0f, 0xb8, 0xc3],
        &[0x0f, 0x01, 0xca],
        &[0xf3, 0x48, 0x0f, 0xb8, 0xc3],
    ];
    for bytes in program {
        stats.record(run(&mut m, bytes));
    }
    assert_eq!(stats.sorted_by_count(), vec![("popcnt", 3), ("clac", 1), ("stac", 1)]);
    assert_eq!(stats.total(), 5);
    assert_eq!(m.regs.rip, 0x1000 + 5 + 3 + 5 + 3 + 5);
}

#[test]
fn linux_fxsave_leak_sequence_fnclex_emms_fild() {
    // restore_fpregs_from_fpstate() on AMD: fnclex; emms; fild dword [rdi]
    let mut m = TestMachine::long64();
    m.fpu.fcw = 0x037f;
    m.fpu.ftwx = 0x01;
    m.regs.rdi = 0x8010;
    m.poke(0x8010, &(-7i32).to_le_bytes());
    assert_eq!(run(&mut m, &[0xdb, 0xe2]), "fnclex");
    assert_eq!(run(&mut m, &[0x0f, 0x77]), "emms");
    assert_eq!(m.fpu.ftwx, 0);
    assert_eq!(run(&mut m, &[0xdb, 0x07]), "fild");
    assert_eq!((m.fpu.fsw >> 11) & 7, 7, "TOP moved down");
    assert_eq!(m.fpu.ftwx, 0x80);
    // -7.0 = sign 1, exponent 16383+2, mantissa 0b111 << 61
    assert_eq!(&m.fpu.fpr[0][..10], &[0, 0, 0, 0, 0, 0, 0, 0xe0, 0x01, 0xc0]);
    assert_eq!(m.regs.rip, 0x1006);
}

#[test]
fn fild_word_and_qword() {
    let mut m = TestMachine::long64();
    m.fpu.fcw = 0x037f;
    m.poke(0x8000, &1u16.to_le_bytes());
    m.poke(0x8008, &(1i64 << 40).to_le_bytes());
    // fild word [rsp]; fild qword [rsp+8]
    assert_eq!(run(&mut m, &[0xdf, 0x04, 0x24]), "fild");
    assert_eq!(&m.fpu.fpr[0][7..10], &[0x80, 0xff, 0x3f]);
    assert_eq!(run(&mut m, &[0xdf, 0x6c, 0x24, 0x08]), "fild");
    assert_eq!(&m.fpu.fpr[0][7..10], &[0x80, 0x27, 0x40], "2^40");
    assert_eq!(&m.fpu.fpr[1][7..10], &[0x80, 0xff, 0x3f], "1.0 now in ST(1)");
    assert_eq!(m.fpu.ftwx, 0xc0);
}

const CR4_OSXSAVE: u64 = 1 << 18;

#[test]
fn xsetbv_and_xgetbv_reach_xcr0() {
    let mut m = TestMachine::long64();
    m.sregs.cr4 |= CR4_OSXSAVE;
    // xsetbv with EDX:EAX = 0:3 (x87 | SSE), then xgetbv reads it back.
    m.regs.rax = 0xffff_ffff_0000_0003;
    m.regs.rdx = 0xffff_ffff_0000_0000;
    m.regs.rcx = 0xffff_ffff_0000_0000;
    assert_eq!(emulate(&mut m, &[0x0f, 0x01, 0xd1], ALL).expect("xsetbv"), "xsetbv");
    assert_eq!((m.xcr0, m.regs.rip), (3, 0x1003));
    m.regs.rax = u64::MAX;
    m.regs.rdx = u64::MAX;
    assert_eq!(emulate(&mut m, &[0x0f, 0x01, 0xd0], ALL).expect("xgetbv"), "xgetbv");
    assert_eq!((m.regs.rax, m.regs.rdx, m.regs.rip), (3, 0, 0x1006));
    assert!(m.injected.is_empty());
}

#[test]
fn xsetbv_faults_as_the_architecture_says() {
    let gp = Some((13u8, Some(0u32)));
    let run = |setup: &dyn Fn(&mut TestMachine)| {
        let mut m = TestMachine::long64();
        m.sregs.cr4 |= CR4_OSXSAVE;
        m.regs.rax = 3;
        setup(&mut m);
        let out = emulate_outcome(&mut m, &[0x0f, 0x01, 0xd1], ALL).expect("handled");
        (out.exception, m.xcr0, m.regs.rip)
    };
    // Without CR4.OSXSAVE: #UD.
    assert_eq!(run(&|m| m.sregs.cr4 &= !CR4_OSXSAVE), (Some((6, None)), 1, 0x1000));
    // XCR1 and beyond: #GP(0).
    assert_eq!(run(&|m| m.regs.rcx = 1), (gp, 1, 0x1000));
    // x87 off, or AVX without SSE: #GP(0).
    assert_eq!(run(&|m| m.regs.rax = 2), (gp, 1, 0x1000));
    assert_eq!(run(&|m| m.regs.rax = 5), (gp, 1, 0x1000));
    // Above CPL 0: #GP(0).
    assert_eq!(run(&|m| m.sregs.ss.dpl = 3), (gp, 1, 0x1000));
    // A value the hypervisor refuses: #GP(0), XCR0 unchanged.
    assert_eq!(run(&|m| m.xcr0_refused.push(3)), (gp, 1, 0x1000));
}
