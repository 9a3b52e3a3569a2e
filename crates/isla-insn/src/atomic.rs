//! Host-side atomic 16-byte compare-and-exchange, for [`crate::Machine::cmpxchg16`]
//! implementations that reach guest memory through a host mapping.
//!
//! Rust has no stable 128-bit atomic, so this is the crate's only `unsafe`: one `lock
//! cmpxchg16b` in inline assembly. Guest vCPUs and other host threads that use locked
//! instructions on the same bytes see it as one atomic operation.

#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

/// Whether the host CPU has CMPXCHG16B (every x86-64 CPU with VMX or SVM does).
pub fn host_has_cmpxchg16b() -> bool {
    std::arch::is_x86_feature_detected!("cmpxchg16b")
}

/// Atomically: if the 16 bytes at `ptr` equal `expected`, store `new`. Returns whether the store
/// happened and the value found (which is `expected` when it did). Values are little-endian,
/// bits 0..63 at `ptr`, as the instruction sees RAX/RBX (low) and RDX/RCX (high).
///
/// Returns `None`, touching nothing, if `ptr` is not 16-byte aligned or the host CPU lacks the
/// instruction.
///
/// # Safety
///
/// `ptr` must be valid for reads and writes of 16 bytes for the duration of the call (for guest
/// memory: inside a mapping that stays mapped). Other threads may access the bytes concurrently
/// only with atomic operations or with guest instructions, as for any shared guest memory.
pub unsafe fn cmpxchg16b(ptr: *mut u8, expected: u128, new: u128) -> Option<(bool, u128)> {
    if (ptr as usize) % 16 != 0 || !host_has_cmpxchg16b() {
        return None;
    }
    let mut lo = expected as u64;
    let mut hi = (expected >> 64) as u64;
    let new_lo = new as u64;
    let new_hi = (new >> 64) as u64;
    let zf: u8;
    // SAFETY: the caller guarantees `ptr` is valid for 16-byte reads and writes, and it was
    // checked to be 16-byte aligned as CMPXCHG16B requires, so the locked access cannot fault or
    // split. RBX cannot be named as an operand (the compiler reserves it), so the low half of
    // `new` goes in through a scratch register that is swapped with RBX around the instruction,
    // which leaves RBX as it was. The stack is not used, and the flags the instruction changes
    // are clobbered by default.
    unsafe {
        std::arch::asm!(
            "xchg {scratch}, rbx",
            "lock cmpxchg16b xmmword ptr [{ptr}]",
            "sete {zf}",
            "mov rbx, {scratch}",
            ptr = in(reg) ptr,
            scratch = inout(reg) new_lo => _,
            zf = out(reg_byte) zf,
            inout("rax") lo,
            inout("rdx") hi,
            in("rcx") new_hi,
            options(nostack),
        );
    }
    let found = (u128::from(hi) << 64) | u128::from(lo);
    Some((zf != 0, found))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(16))]
    struct Cell([u8; 32]);

    #[test]
    fn swaps_on_match_and_reports_on_mismatch() {
        let mut cell = Cell([0; 32]);
        let p = cell.0.as_mut_ptr();
        let v0 = 0x0011_2233_4455_6677_8899_aabb_ccdd_eeffu128;
        cell.0[..16].copy_from_slice(&v0.to_le_bytes());
        let v1 = 0xfedc_ba98_7654_3210_0123_4567_89ab_cdefu128;
        // SAFETY: `p` points at 32 bytes owned by `cell`, aligned by the type.
        let r = unsafe { cmpxchg16b(p, v0, v1) };
        assert_eq!(r, Some((true, v0)));
        assert_eq!(cell.0[..16], v1.to_le_bytes());
        let p = cell.0.as_mut_ptr();
        // SAFETY: as above.
        let r = unsafe { cmpxchg16b(p, v0, 5) };
        assert_eq!(r, Some((false, v1)));
        assert_eq!(cell.0[..16], v1.to_le_bytes());
    }

    #[test]
    fn misaligned_pointer_is_refused() {
        let mut cell = Cell([7; 32]);
        // SAFETY: bytes 8..24 are inside `cell`.
        let r = unsafe { cmpxchg16b(cell.0.as_mut_ptr().wrapping_add(8), 0, 1) };
        assert_eq!(r, None);
        assert_eq!(cell.0, [7; 32]);
    }

    #[test]
    fn concurrent_increments_are_not_lost() {
        let mut storage = Box::new(Cell([0; 32]));
        let addr = storage.0.as_mut_ptr() as usize;
        let threads: Vec<_> = (0..2)
            .map(|_| {
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        let mut cur = 0u128;
                        loop {
                            // Both halves move, so a torn update would show up in the total.
                            let next = cur.wrapping_add((1u128 << 64) | 1);
                            // SAFETY: `storage` outlives the threads (joined below) and every
                            // access to it during that time goes through this function.
                            match unsafe { cmpxchg16b(addr as *mut u8, cur, next) } {
                                Some((true, _)) => break,
                                Some((false, found)) => cur = found,
                                None => panic!("host without cmpxchg16b"),
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread panicked");
        }
        let v = u128::from_le_bytes(storage.0[..16].try_into().expect("16 bytes"));
        assert_eq!(v, (4000u128 << 64) | 4000);
    }
}
