//! The one atomic operation on guest memory that the instruction fallback needs: a 16-byte
//! compare-and-exchange, so a guest `lock cmpxchg16b` stays atomic against the other vCPUs.

use std::sync::atomic::Ordering;

/// Atomically compares the 16 bytes at `ptr` with `expected` and, if equal, stores `new`.
/// Returns (swapped, value found); None if the host CPU lacks cmpxchg16b.
///
/// `ptr` must point into a live guest-memory mapping, 16-byte aligned, with 16 bytes available.
pub fn cmpxchg16b(ptr: *mut u128, expected: u128, new: u128) -> Option<(bool, u128)> {
    if !std::is_x86_feature_detected!("cmpxchg16b") || ptr.align_offset(16) != 0 {
        return None;
    }
    // SAFETY: the feature was detected above; the caller obtained `ptr` from a guest-memory slice
    // of 16 bytes that outlives this call, and alignment was checked.
    let found = unsafe { inner(ptr, expected, new) };
    Some((found == expected, found))
}

#[target_feature(enable = "cmpxchg16b")]
unsafe fn inner(ptr: *mut u128, expected: u128, new: u128) -> u128 {
    // SAFETY: forwarded from `cmpxchg16b`'s checks.
    unsafe { std::arch::x86_64::cmpxchg16b(ptr, expected, new, Ordering::SeqCst, Ordering::SeqCst) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_only_when_equal() {
        #[repr(align(16))]
        struct A(u128);
        let mut a = A(5);
        let p = &mut a.0 as *mut u128;
        assert_eq!(cmpxchg16b(p, 5, 9), Some((true, 5)));
        assert_eq!(cmpxchg16b(p, 5, 1), Some((false, 9)));
        assert_eq!(a.0, 9);
    }
}
